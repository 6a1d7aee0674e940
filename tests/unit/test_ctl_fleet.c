/* Unit tests for ctl's tables (core/ah_ctl_fleet.c): `ctl agents`, `ctl scopes` and `ctl leases`
 * print the answers of the fleet routes byte for byte as below (operators' scripts parse them),
 * including the computed cells (a lost agent, a free lease, a scope without expiry), and a body
 * that is not such an answer is refused with a message. */
#include "ah_ctl_fleet.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

typedef int (*print_fn)(const char *body, FILE *out, FILE *err);

/* Runs print on body; returns its exit code, the text written to out in *out_text and to err in
 * *err_text (both malloc'd). */
static int run_print(print_fn print, const char *body, char **out_text, char **err_text)
{
    size_t out_len = 0, err_len = 0;
    FILE *out = open_memstream(out_text, &out_len);
    FILE *err = open_memstream(err_text, &err_len);
    assert_non_null(out);
    assert_non_null(err);
    int rc = print(body, out, err);
    fclose(out);
    fclose(err);
    return rc;
}

static void expect_table(print_fn print, const char *body, const char *expected)
{
    char *out = NULL, *err = NULL;
    assert_int_equal(run_print(print, body, &out, &err), 0);
    assert_string_equal(out, expected);
    assert_string_equal(err, "");
    free(out);
    free(err);
}

static void expect_refused(print_fn print, const char *body, const char *message)
{
    char *out = NULL, *err = NULL;
    assert_int_equal(run_print(print, body, &out, &err), 1);
    assert_string_equal(err, message);
    free(out);
    free(err);
}

static void test_agents_table_is_byte_for_byte(void **state)
{
    (void)state;
    const char *body =
        "{\"version\":7,\"count\":3,\"summary\":{\"total\":3,\"applied_current\":1,\"stale\":1},"
        "\"agents\":["
        "{\"agent_id\":\"worker-1\",\"state\":\"running\",\"applied_version\":7,\"stale\":false,"
        "\"last_seen\":\"2026-12-05T20:00:00.123Z\",\"host\":\"node-a\",\"pid\":4242,"
        "\"batches\":1234567,\"errors\":3,\"labels\":{\"region\":\"eu\",\"tier\":\"gold\"}},"
        "{\"agent_id\":\"worker-2\",\"state\":\"paused\",\"applied_version\":6,\"stale\":true,"
        "\"last_seen\":\"2026-12-05T19:00:00.000Z\",\"host\":\"node-b\",\"pid\":17,"
        "\"batches\":0,\"errors\":0,\"labels\":{}},"
        "{\"agent_id\":\"w\\u00e9-3\",\"state\":\"stopped\",\"applied_version\":5,\"stale\":true,"
        "\"last_seen\":\"2026-12-05T18:00:00.000Z\",\"host\":\"node-c\",\"pid\":1,"
        "\"batches\":9,\"errors\":1}]}";
    expect_table(
        ah_ctl_fleet_print_agents, body,
        "AGENT                    STATE            APPLIED STALE  LAST SEEN                 "
        "HOST                  PID    BATCHES  ERRORS LABELS\n"
        "worker-1                 running                7 no     2026-12-05T20:00:00.123Z  "
        "node-a               4242    1234567       3 region=eu,tier=gold\n"
        "worker-2                 lost (paused)          6 STALE  2026-12-05T19:00:00.000Z  "
        "node-b                 17          0       0 \n"
        "w\xc3\xa9-3                    stopped                5 STALE  2026-12-05T18:00:00.000Z  "
        "node-c                  1          9       1 \n"
        "3 listed; fleet: 3 agents, 1 applied version 7, 1 stale\n");
    expect_table(ah_ctl_fleet_print_agents, "{\"agents\":[],\"count\":0,\"version\":1}",
                 "AGENT                    STATE            APPLIED STALE  LAST SEEN            "
                 "     HOST                  PID    BATCHES  ERRORS LABELS\n"
                 "0 listed; fleet:  agents,  applied version 1,  stale\n");
}

static void test_scopes_table_is_byte_for_byte(void **state)
{
    (void)state;
    const char *body =
        "{\"count\":2,\"active\":1,\"scopes\":["
        "{\"selector\":\"region=eu\",\"command\":\"pause\",\"version\":3,"
        "\"timestamp\":\"2026-12-05T20:00:00.000Z\",\"reason\":\"maintenance\",\"updated_by\":"
        "\"api\","
        "\"expires_at\":\"2026-12-05T21:00:00.000Z\",\"matched\":2,\"acknowledged\":2,\"holds\":2},"
        "{\"selector\":\"tier in (gold,silver)\",\"command\":\"running\",\"version\":12,"
        "\"reason\":\"\",\"expires_at\":null,\"matched\":0,\"acknowledged\":0,\"holds\":0}]}";
    expect_table(ah_ctl_fleet_print_scopes, body,
                 "SELECTOR                         COMMAND  VERSION MATCHED HOLDS EXPIRES          "
                 "        REASON\n"
                 "region=eu                        pause          3       2     2 "
                 "2026-12-05T21:00:00.000Z maintenance\n"
                 "tier in (gold,silver)            running       12       0     0 -              "
                 "          \n"
                 "2 scopes, 1 holding (pause or shutdown)\n");
}

static void test_leases_table_is_byte_for_byte(void **state)
{
    (void)state;
    const char *body = "{\"count\":3,\"leases\":["
                       "{\"name\":\"sweeper\",\"owner\":\"worker-1\",\"token\":4,"
                       "\"expires_in\":12.345,\"last_owner\":\"worker-1\"},"
                       "{\"name\":\"reports\",\"owner\":\"\",\"token\":0,\"expires_in\":0,"
                       "\"last_owner\":\"\"},"
                       "{\"name\":\"long\",\"owner\":\"w\",\"token\":123456789,"
                       "\"expires_in\":1234567.25,\"last_owner\":\"w\"}]}";
    expect_table(ah_ctl_fleet_print_leases, body,
                 "NAME                             OWNER                       TOKEN EXPIRES IN\n"
                 "sweeper                          worker-1                        4      12.3s\n"
                 "reports                          (free)                          0          -\n"
                 "long                             w                        123456789 1234567.2s\n"
                 "3 leases\n");
    expect_table(ah_ctl_fleet_print_leases,
                 "{\"count\":1,\"leases\":[{\"name\":\"a\",\"owner\":\"\",\"token\":1}]}",
                 "NAME                             OWNER                       TOKEN EXPIRES IN\n"
                 "a                                (free)                          1          -\n"
                 "1 lease\n");
}

static void test_a_body_without_the_table_is_refused(void **state)
{
    (void)state;
    expect_refused(ah_ctl_fleet_print_agents, "{\"status\":\"error\"}",
                   "agenthost ctl: the answer has no \"agents\"\n");
    expect_refused(ah_ctl_fleet_print_scopes, "[]",
                   "agenthost ctl: the answer has no \"scopes\"\n");
    expect_refused(ah_ctl_fleet_print_leases, "{\"leases\":[{\"name\":\"a\"},}",
                   "agenthost ctl: malformed \"leases\" in the answer\n");
    expect_refused(ah_ctl_fleet_print_agents, "{\"agents\":[{\"agent_id\":\"a\"} 1]}",
                   "agenthost ctl: malformed \"agents\" in the answer\n");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_agents_table_is_byte_for_byte),
        cmocka_unit_test(test_scopes_table_is_byte_for_byte),
        cmocka_unit_test(test_leases_table_is_byte_for_byte),
        cmocka_unit_test(test_a_body_without_the_table_is_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
