/* Unit tests for the checked conversions and clamped formatting in ah_common.c: the inputs that
 * are undefined behaviour as plain casts (NaN, infinities, values past int64) give defined
 * results, which the ASan/UBSan build (float-cast-overflow, signed overflow) would catch. */
#include "ah_common.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

static void test_double_to_int64_accepts_the_int64_range(void **state)
{
    (void)state;
    int64_t v = 7;
    assert_int_equal(ah_double_to_int64(0.0, &v), AH_OK);
    assert_true(v == 0);
    assert_int_equal(ah_double_to_int64(1.9, &v), AH_OK);
    assert_true(v == 1);
    assert_int_equal(ah_double_to_int64(-1.9, &v), AH_OK);
    assert_true(v == -1);
    assert_int_equal(ah_double_to_int64(-9223372036854775808.0, &v), AH_OK);
    assert_true(v == INT64_MIN);
    assert_int_equal(ah_double_to_int64(9223372036854774784.0, &v), AH_OK); /* largest below 2^63 */
    assert_true(v == INT64_C(9223372036854774784));
}

static void test_double_to_int64_rejects_and_saturates_the_rest(void **state)
{
    (void)state;
    int64_t v = 7;
    assert_int_equal(ah_double_to_int64(9223372036854775808.0, &v), AH_EINVAL); /* 2^63 */
    assert_true(v == INT64_MAX);
    assert_int_equal(ah_double_to_int64(1e300, &v), AH_EINVAL);
    assert_true(v == INT64_MAX);
    assert_int_equal(ah_double_to_int64(-1e300, &v), AH_EINVAL);
    assert_true(v == INT64_MIN);
    assert_int_equal(ah_double_to_int64(INFINITY, &v), AH_EINVAL);
    assert_true(v == INT64_MAX);
    assert_int_equal(ah_double_to_int64(-INFINITY, &v), AH_EINVAL);
    assert_true(v == INT64_MIN);
    assert_int_equal(ah_double_to_int64(NAN, &v), AH_EINVAL);
    assert_true(v == 0);
}

static void test_int64_mul_sat_saturates_instead_of_overflowing(void **state)
{
    (void)state;
    assert_true(ah_int64_mul_sat(1700000000000, 1000) == INT64_C(1700000000000000));
    assert_true(ah_int64_mul_sat(-5, 1000) == -5000);
    assert_true(ah_int64_mul_sat(INT64_C(1) << 62, 1000) == INT64_MAX);
    assert_true(ah_int64_mul_sat(-(INT64_C(1) << 62), 1000) == INT64_MIN);
    assert_true(ah_int64_mul_sat(INT64_MIN, -1) == INT64_MAX);
}

static void test_int64_add_and_sub_sat_saturate_instead_of_overflowing(void **state)
{
    (void)state;
    assert_true(ah_int64_add_sat(5, -7) == -2);
    assert_true(ah_int64_add_sat(INT64_MAX, 1) == INT64_MAX);
    assert_true(ah_int64_add_sat(INT64_MIN, -1) == INT64_MIN);
    assert_true(ah_int64_sub_sat(5, 7) == -2);
    assert_true(ah_int64_sub_sat(INT64_MIN + 1, INT64_C(1700000000000000)) == INT64_MIN);
    assert_true(ah_int64_sub_sat(INT64_MAX, -1) == INT64_MAX);
}

static void test_format_timestamp_clamps_to_years_0_to_9999(void **state)
{
    (void)state;
    char text[AH_TIMESTAMP_LEN];
    ah_format_timestamp(INT64_C(1768127400123456), text);
    assert_string_equal(text, "2026-01-11T10:30:00.123456Z");
    ah_format_timestamp(INT64_MAX, text);
    assert_string_equal(text, "9999-12-31T23:59:59.999999Z");
    ah_format_timestamp(INT64_MIN, text);
    assert_string_equal(text, "0000-01-01T00:00:00.000000Z");
    ah_format_timestamp(-1, text);
    assert_string_equal(text, "1969-12-31T23:59:59.999999Z");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_double_to_int64_accepts_the_int64_range),
        cmocka_unit_test(test_double_to_int64_rejects_and_saturates_the_rest),
        cmocka_unit_test(test_int64_mul_sat_saturates_instead_of_overflowing),
        cmocka_unit_test(test_int64_add_and_sub_sat_saturate_instead_of_overflowing),
        cmocka_unit_test(test_format_timestamp_clamps_to_years_0_to_9999),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
