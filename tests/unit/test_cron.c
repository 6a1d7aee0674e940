/* Unit tests of the five-field cron expressions (core/ah_cron.c): each field's forms (*, N,
 * N-M, lists, steps), the day-of-month / day-of-week rule, the next matching minute in UTC, and
 * the messages of bad expressions. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <string.h>
#include <time.h>

#include "ah_common.h"
#include "ah_cron.h"

/* Seconds since the epoch of a UTC date and time. */
static int64_t utc(int year, int month, int day, int hour, int minute, int second)
{
    struct tm tm = {.tm_year = year - 1900,
                    .tm_mon = month - 1,
                    .tm_mday = day,
                    .tm_hour = hour,
                    .tm_min = minute,
                    .tm_sec = second};
    return (int64_t)timegm(&tm);
}

static ah_cron_t parse_ok(const char *expr)
{
    ah_cron_t c;
    char err[AH_ERRLEN] = "";
    int rc = ah_cron_parse(expr, &c, err, sizeof(err));
    if (rc != 0) {
        fail_msg("'%s' did not parse: %s", expr, err);
    }
    return c;
}

static void test_star_matches_every_minute(void **state)
{
    (void)state;
    ah_cron_t c = parse_ok("* * * * *");
    assert_true(c.minutes == (UINT64_C(1) << 60) - 1);
    assert_int_equal(c.hours, (1u << 24) - 1);
    assert_int_equal(ah_cron_next(&c, utc(2026, 12, 5, 18, 4, 30)), utc(2026, 12, 5, 18, 5, 0));
    /* strictly after: on the minute gives the next one */
    assert_int_equal(ah_cron_next(&c, utc(2026, 12, 5, 18, 5, 0)), utc(2026, 12, 5, 18, 6, 0));
}

static void test_single_values_ranges_and_lists(void **state)
{
    (void)state;
    ah_cron_t c = parse_ok("5,10-12 3 * * *");
    assert_true(c.minutes == ((UINT64_C(1) << 5) | (UINT64_C(7) << 10)));
    assert_int_equal(c.hours, 1u << 3);
    assert_int_equal(ah_cron_next(&c, utc(2026, 1, 1, 3, 5, 0)), utc(2026, 1, 1, 3, 10, 0));
    assert_int_equal(ah_cron_next(&c, utc(2026, 1, 1, 3, 12, 0)), utc(2026, 1, 2, 3, 5, 0));
    /* blanks: tabs and runs of spaces separate fields */
    ah_cron_t t = parse_ok("  0\t12   1 1  * ");
    assert_int_equal(ah_cron_next(&t, utc(2026, 6, 1, 0, 0, 0)), utc(2027, 1, 1, 12, 0, 0));
}

static void test_steps_over_star_ranges_and_a_start(void **state)
{
    (void)state;
    ah_cron_t every15 = parse_ok("*/15 * * * *");
    assert_true(every15.minutes == ((UINT64_C(1) << 0) | (UINT64_C(1) << 15) | (UINT64_C(1) << 30) |
                                    (UINT64_C(1) << 45)));
    assert_int_equal(ah_cron_next(&every15, utc(2026, 1, 1, 0, 46, 0)), utc(2026, 1, 1, 1, 0, 0));
    ah_cron_t range = parse_ok("10-20/5 * * * *");
    assert_true(range.minutes == ((UINT64_C(1) << 10) | (UINT64_C(1) << 15) | (UINT64_C(1) << 20)));
    ah_cron_t from = parse_ok("50/4 * * * *"); /* N/STEP: from N to the end of the field */
    assert_true(from.minutes == ((UINT64_C(1) << 50) | (UINT64_C(1) << 54) | (UINT64_C(1) << 58)));
    ah_cron_t hours = parse_ok("0 */6 * * *");
    assert_int_equal(hours.hours, (1u << 0) | (1u << 6) | (1u << 12) | (1u << 18));
}

static void test_months_and_month_ends(void **state)
{
    (void)state;
    ah_cron_t c = parse_ok("0 0 31 * *"); /* only months with a 31st */
    assert_int_equal(ah_cron_next(&c, utc(2026, 4, 1, 0, 0, 0)), utc(2026, 5, 31, 0, 0, 0));
    ah_cron_t feb29 = parse_ok("30 6 29 2 *");
    assert_int_equal(ah_cron_next(&feb29, utc(2026, 3, 1, 0, 0, 0)), utc(2028, 2, 29, 6, 30, 0));
    ah_cron_t never = parse_ok("0 0 30 2 *");
    assert_int_equal(ah_cron_next(&never, utc(2026, 1, 1, 0, 0, 0)), -1);
    ah_cron_t year_end = parse_ok("59 23 31 12 *");
    assert_int_equal(ah_cron_next(&year_end, utc(2026, 12, 31, 23, 59, 0)),
                     utc(2027, 12, 31, 23, 59, 0));
}

static void test_day_of_week_and_the_either_rule(void **state)
{
    (void)state;
    /* 2026-12-05 is a Saturday */
    ah_cron_t mondays = parse_ok("0 9 * * 1");
    assert_int_equal(ah_cron_next(&mondays, utc(2026, 12, 5, 10, 0, 0)), utc(2026, 12, 7, 9, 0, 0));
    ah_cron_t sunday7 = parse_ok("0 0 * * 7"); /* 7 and 0 are both Sunday */
    assert_int_equal(sunday7.weekdays, 1);
    assert_int_equal(ah_cron_next(&sunday7, utc(2026, 12, 5, 10, 0, 0)), utc(2026, 12, 6, 0, 0, 0));
    ah_cron_t weekdays = parse_ok("0 0 * * 1-5");
    assert_int_equal(weekdays.weekdays, 0x3e);
    /* both restricted: the 15th or any Monday, whichever comes first */
    ah_cron_t either = parse_ok("0 0 15 * 1");
    assert_int_equal(ah_cron_next(&either, utc(2026, 12, 5, 10, 0, 0)), utc(2026, 12, 7, 0, 0, 0));
    assert_int_equal(ah_cron_next(&either, utc(2026, 12, 14, 0, 0, 0)), utc(2026, 12, 15, 0, 0, 0));
}

static void expect_error(const char *expr, const char *needle)
{
    ah_cron_t c;
    char err[AH_ERRLEN] = "";
    assert_int_equal(ah_cron_parse(expr, &c, err, sizeof(err)), AH_EINVAL);
    if (strstr(err, needle) == NULL) {
        fail_msg("error for '%s' is '%s', expected it to mention '%s'", expr, err, needle);
    }
}

static void test_bad_expressions_name_the_field(void **state)
{
    (void)state;
    expect_error("", "needs five fields");
    expect_error("* * * *", "has 4");
    expect_error("* * * * * *", "more than five fields");
    expect_error("60 * * * *", "minute field '60'");
    expect_error("* 24 * * *", "hour field");
    expect_error("* * 0 * *", "day of month field");
    expect_error("* * * 13 *", "month field");
    expect_error("* * * * 8", "day of week field");
    expect_error("5-1 * * * *", "low to high");
    expect_error("*/0 * * * *", "minute field '*/0'");
    expect_error("1,,2 * * * *", "minute field");
    expect_error("1, * * * *", "minute field");
    expect_error("a * * * *", "minute field 'a'");
    expect_error("* * * jan *", "month field 'jan'");
    expect_error("1-2-3 * * * *", "minute field");
    expect_error("99999 * * * *", "minute field");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_star_matches_every_minute),
        cmocka_unit_test(test_single_values_ranges_and_lists),
        cmocka_unit_test(test_steps_over_star_ranges_and_a_start),
        cmocka_unit_test(test_months_and_month_ends),
        cmocka_unit_test(test_day_of_week_and_the_either_rule),
        cmocka_unit_test(test_bad_expressions_name_the_field),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
