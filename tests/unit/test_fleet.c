/* Unit tests of the fleet's rules (core/ah_fleet.c) that GET /api/cluster/agents ("stale") and
 * every wait= (acknowledged / pending / excluded) read: the stale rule at its edge. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "ah_common.h"
#include "ah_fleet.h"

#include <string.h>

#define NOW_US ((int64_t)1800000000 * 1000000) /* any wall-clock instant */

/* A record of a live agent ("running", version 4) last written age_s seconds before NOW_US. */
static ah_agent_status_t record_aged(double age_s)
{
    ah_agent_status_t rec;
    memset(&rec, 0, sizeof(rec));
    ah_strlcpy(rec.agent_id, "a1", sizeof(rec.agent_id));
    ah_strlcpy(rec.state, "running", sizeof(rec.state));
    rec.applied_version = 4;
    rec.last_seen_us = NOW_US - (int64_t)(age_s * 1e6);
    return rec;
}

static void test_a_record_is_stale_after_three_missed_heartbeats_not_before(void **unused)
{
    (void)unused;
    const double heartbeat = 10.0;
    assert_int_equal(AH_FLEET_STALE_HEARTBEATS, 3);
    static const struct {
        double age_s;
        bool stale;
    } rows[] = {{0, false},     {10, false}, {29, false}, {29.999, false},
                {30.001, true}, {31, true},  {300, true}};
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        ah_agent_status_t rec = record_aged(rows[i].age_s);
        if (ah_fleet_is_stale(&rec, NOW_US, heartbeat) != rows[i].stale) {
            fail_msg("age %.3f s with a 10 s heartbeat: stale should be %s", rows[i].age_s,
                     rows[i].stale ? "true" : "false");
        }
    }
    /* The rule scales with the heartbeat: 31 s is fresh with a 20 s one. */
    ah_agent_status_t rec = record_aged(31);
    assert_false(ah_fleet_is_stale(&rec, NOW_US, 20.0));
}

static void test_a_wait_excludes_a_record_only_once_it_is_stale(void **unused)
{
    (void)unused;
    const double heartbeat = 10.0;
    ah_agent_status_t rec = record_aged(29);
    assert_int_equal(ah_fleet_classify(&rec, 5, NOW_US, heartbeat), AH_FLEET_PENDING);
    rec = record_aged(31);
    assert_int_equal(ah_fleet_classify(&rec, 5, NOW_US, heartbeat), AH_FLEET_EXCLUDED);
    /* A stale record that applied the version still counts as acknowledged. */
    assert_int_equal(ah_fleet_classify(&rec, 4, NOW_US, heartbeat), AH_FLEET_ACKNOWLEDGED);
    /* Stopping and stopped agents are excluded at once, fresh or not. */
    rec = record_aged(0);
    ah_strlcpy(rec.state, "stopping", sizeof(rec.state));
    assert_int_equal(ah_fleet_classify(&rec, 5, NOW_US, heartbeat), AH_FLEET_EXCLUDED);
    ah_strlcpy(rec.state, "stopped", sizeof(rec.state));
    assert_int_equal(ah_fleet_classify(&rec, 5, NOW_US, heartbeat), AH_FLEET_EXCLUDED);
    ah_strlcpy(rec.state, "paused", sizeof(rec.state));
    assert_int_equal(ah_fleet_classify(&rec, 5, NOW_US, heartbeat), AH_FLEET_PENDING);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_a_record_is_stale_after_three_missed_heartbeats_not_before),
        cmocka_unit_test(test_a_wait_excludes_a_record_only_once_it_is_stale),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
