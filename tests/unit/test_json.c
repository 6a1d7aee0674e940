/* Unit tests for the JSON writers of core/ah_json.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "ah_json.h"

#include <math.h>
#include <stdlib.h>

/* Numbers are written in the shortest form that reads back as the same double, separated by
 * commas like every other value; NaN and infinities (not JSON) become null. */
static void test_numbers_are_shortest_round_trip_and_comma_separated(void **unused)
{
    ah_buf_t b;
    ah_buf_init(&b);
    ah_json_open(&b);
    ah_json_num(&b, "tenth", 0.1);
    ah_json_num(&b, "third", 1.0 / 3.0);
    ah_json_num(&b, "whole", 10.0);
    ah_json_num(&b, "tiny", 1e-300);
    ah_json_num(&b, "nan", NAN);
    ah_json_num(&b, "inf", -INFINITY);
    ah_json_open_array(&b, "list");
    ah_json_num(&b, NULL, 2.5);
    ah_json_num(&b, NULL, 0.30000000000000004);
    ah_json_close_array(&b);
    ah_json_close(&b);
    assert_true(ah_buf_ok(&b));
    assert_string_equal(b.data, "{\"tenth\":0.1,\"third\":0.33333333333333331,\"whole\":10,"
                                "\"tiny\":1e-300,\"nan\":null,\"inf\":null,"
                                "\"list\":[2.5,0.30000000000000004]}");
    ah_buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_numbers_are_shortest_round_trip_and_comma_separated),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
