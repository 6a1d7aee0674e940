/* Unit tests for the state machine: the transition table, "latest wins" and final shutdown. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "ah_common.h"
#include "ah_state.h"

#include <string.h>

static void test_transition_table(void **unused)
{
    static const struct {
        ah_run_state_t from;
        ah_command_t cmd;
        ah_source_t src;
        int rc;
        ah_run_state_t to;
        ah_hook_t hook;
    } rows[] = {
        {AH_STATE_STARTING, AH_CMD_RUNNING, AH_SOURCE_STARTUP, AH_OK, AH_STATE_RUNNING,
         AH_HOOK_NONE},
        {AH_STATE_STARTING, AH_CMD_PAUSE, AH_SOURCE_STARTUP, AH_OK, AH_STATE_PAUSED, AH_HOOK_PAUSE},
        {AH_STATE_STARTING, AH_CMD_SHUTDOWN, AH_SOURCE_STARTUP, AH_OK, AH_STATE_PAUSED,
         AH_HOOK_PAUSE},
        {AH_STATE_STARTING, AH_CMD_SHUTDOWN, AH_SOURCE_SIGNAL, AH_OK, AH_STATE_STOPPING,
         AH_HOOK_SHUTDOWN},
        {AH_STATE_RUNNING, AH_CMD_PAUSE, AH_SOURCE_CLUSTER, AH_OK, AH_STATE_PAUSED, AH_HOOK_PAUSE},
        {AH_STATE_RUNNING, AH_CMD_RUNNING, AH_SOURCE_CLUSTER, AH_ENOOP, AH_STATE_RUNNING,
         AH_HOOK_NONE},
        {AH_STATE_RUNNING, AH_CMD_SHUTDOWN, AH_SOURCE_CLUSTER, AH_OK, AH_STATE_STOPPING,
         AH_HOOK_SHUTDOWN},
        {AH_STATE_PAUSED, AH_CMD_RUNNING, AH_SOURCE_LOCAL, AH_OK, AH_STATE_RUNNING, AH_HOOK_RESUME},
        {AH_STATE_PAUSED, AH_CMD_PAUSE, AH_SOURCE_CLUSTER, AH_ENOOP, AH_STATE_PAUSED, AH_HOOK_NONE},
        {AH_STATE_PAUSED, AH_CMD_SHUTDOWN, AH_SOURCE_SIGNAL, AH_OK, AH_STATE_STOPPING,
         AH_HOOK_SHUTDOWN},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        ah_run_state_t to = AH_STATE_STOPPED;
        ah_hook_t hook = AH_HOOK_NONE;
        assert_int_equal(ah_state_target(rows[i].from, rows[i].cmd, rows[i].src, &to, &hook),
                         rows[i].rc);
        assert_int_equal(to, rows[i].to);
        assert_int_equal(hook, rows[i].hook);
    }
    ah_run_state_t to;
    ah_hook_t hook;
    assert_int_equal(
        ah_state_target(AH_STATE_STOPPING, AH_CMD_RUNNING, AH_SOURCE_CLUSTER, &to, &hook),
        AH_EINVAL);
    assert_int_equal(ah_state_target(AH_STATE_STOPPED, AH_CMD_PAUSE, AH_SOURCE_LOCAL, &to, &hook),
                     AH_EINVAL);
    assert_int_equal(ah_state_target(AH_STATE_RUNNING, AH_CMD_NONE, AH_SOURCE_LOCAL, &to, &hook),
                     AH_EINVAL);
}

static void test_held_row_only_a_cluster_command_releases(void **unused)
{
    static const struct {
        ah_command_t cmd;
        ah_source_t src;
        int rc;
        ah_run_state_t to;
        bool held;
        ah_hook_t hook;
    } rows[] = {
        {AH_CMD_RUNNING, AH_SOURCE_LOCAL, AH_EREFUSED, AH_STATE_PAUSED, true, AH_HOOK_NONE},
        {AH_CMD_RUNNING, AH_SOURCE_SIGNAL, AH_EREFUSED, AH_STATE_PAUSED, true, AH_HOOK_NONE},
        {AH_CMD_PAUSE, AH_SOURCE_LOCAL, AH_ENOOP, AH_STATE_PAUSED, true, AH_HOOK_NONE},
        {AH_CMD_SHUTDOWN, AH_SOURCE_SIGNAL, AH_OK, AH_STATE_STOPPING, false, AH_HOOK_SHUTDOWN},
        {AH_CMD_RUNNING, AH_SOURCE_CLUSTER, AH_OK, AH_STATE_RUNNING, false, AH_HOOK_RESUME},
        {AH_CMD_PAUSE, AH_SOURCE_CLUSTER, AH_OK, AH_STATE_PAUSED, false, AH_HOOK_NONE},
        {AH_CMD_SHUTDOWN, AH_SOURCE_CLUSTER, AH_OK, AH_STATE_STOPPING, false, AH_HOOK_SHUTDOWN},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        ah_run_state_t to = AH_STATE_STOPPED;
        bool held = !rows[i].held;
        ah_hook_t hook = AH_HOOK_SHUTDOWN;
        assert_int_equal(ah_state_target_held(rows[i].cmd, rows[i].src, &to, &held, &hook),
                         rows[i].rc);
        assert_int_equal(to, rows[i].to);
        assert_int_equal(held, rows[i].held);
        assert_int_equal(hook, rows[i].hook);
    }
}

/* Applies one pending event the way the worker does; returns ah_state_apply's code. */
static int apply_next(ah_state_t *s)
{
    ah_event_t ev;
    assert_true(ah_state_take_event(s, &ev));
    ah_run_state_t from;
    ah_run_state_t to;
    ah_hook_t hook;
    return ah_state_apply(s, &ev, &from, &to, &hook);
}

static ah_control_t doc(ah_command_t cmd, int64_t version);

static void test_startup_shutdown_holds_until_a_cluster_resume(void **unused)
{
    ah_state_t *s = ah_state_new();
    ah_control_t d = doc(AH_CMD_SHUTDOWN, 3);
    ah_state_offer_cluster(s, &d);
    assert_int_equal(apply_next(s), AH_OK);
    assert_int_equal(ah_state_get(s), AH_STATE_PAUSED);
    assert_true(ah_state_held(s));
    ah_state_offer_local(s, AH_CMD_RUNNING, AH_SOURCE_SIGNAL, "SIGUSR2", "signal");
    assert_int_equal(apply_next(s), AH_EREFUSED);
    assert_int_equal(ah_state_get(s), AH_STATE_PAUSED);
    assert_true(ah_state_held(s));
    ah_control_t resume = doc(AH_CMD_RUNNING, 4);
    ah_state_offer_cluster(s, &resume);
    assert_int_equal(apply_next(s), AH_OK);
    assert_int_equal(ah_state_get(s), AH_STATE_RUNNING);
    assert_false(ah_state_held(s));
    ah_state_free(s);
}

static void test_sleep_is_not_cut_short_by_the_startup_sync(void **unused)
{
    ah_state_t *s = ah_state_new();
    ah_control_t d = doc(AH_CMD_RUNNING, 1);
    ah_state_offer_cluster(s, &d); /* pending, source startup */
    assert_false(ah_state_sleep(s, 0));
    assert_false(ah_state_sleep(s, 0.05));
    assert_true(ah_state_wait(s, 0.05)); /* the worker itself is woken by it */
    /* a local pause is refused while starting (the sync stays pending); a shutdown ends it */
    assert_int_equal(ah_state_offer_local(s, AH_CMD_PAUSE, AH_SOURCE_LOCAL, "", ""), AH_EUNAVAIL);
    assert_false(ah_state_sleep(s, 0));
    assert_int_equal(ah_state_offer_local(s, AH_CMD_SHUTDOWN, AH_SOURCE_SIGNAL, "", ""), AH_OK);
    assert_true(ah_state_sleep(s, 30));
    ah_state_free(s);
}

static ah_control_t doc(ah_command_t cmd, int64_t version)
{
    ah_control_t d;
    memset(&d, 0, sizeof(d));
    d.command = cmd;
    d.version = version;
    d.timestamp_us = ah_now_us();
    strcpy(d.reason, "r");
    strcpy(d.updated_by, "u");
    return d;
}

/* Applies events the way the Lua worker does. */
static void drain(ah_state_t *s)
{
    ah_event_t ev;
    while (ah_state_take_event(s, &ev)) {
        ah_run_state_t from;
        ah_run_state_t to;
        ah_hook_t hook;
        ah_state_apply(s, &ev, &from, &to, &hook);
    }
}

static void test_first_document_is_a_startup_sync(void **unused)
{
    ah_state_t *s = ah_state_new();
    ah_control_t d = doc(AH_CMD_PAUSE, 42);
    ah_state_offer_cluster(s, &d);
    ah_event_t ev;
    assert_true(ah_state_take_event(s, &ev));
    assert_int_equal(ev.source, AH_SOURCE_STARTUP);
    assert_int_equal(ev.version, 42);
    ah_state_free(s);
}

static void test_older_or_equal_versions_are_ignored(void **unused)
{
    ah_state_t *s = ah_state_new();
    ah_control_t d5 = doc(AH_CMD_PAUSE, 5);
    ah_state_offer_cluster(s, &d5);
    drain(s);
    ah_control_t d4 = doc(AH_CMD_RUNNING, 4);
    ah_control_t d5b = doc(AH_CMD_RUNNING, 5);
    ah_state_offer_cluster(s, &d4);
    ah_state_offer_cluster(s, &d5b);
    assert_false(ah_state_has_event(s));
    ah_state_snapshot_t snap;
    ah_state_snapshot(s, &snap);
    assert_int_equal(snap.state, AH_STATE_PAUSED);
    assert_int_equal(snap.applied_version, 5);
    ah_state_free(s);
}

static void test_latest_command_wins_between_batches(void **unused)
{
    ah_state_t *s = ah_state_new();
    ah_control_t d1 = doc(AH_CMD_RUNNING, 1);
    ah_state_offer_cluster(s, &d1);
    drain(s);
    /* Two commands arrive during one batch: only the latest is applied. */
    ah_control_t d2 = doc(AH_CMD_PAUSE, 2);
    ah_control_t d3 = doc(AH_CMD_RUNNING, 3);
    ah_state_offer_cluster(s, &d2);
    ah_state_offer_cluster(s, &d3);
    ah_event_t ev;
    assert_true(ah_state_take_event(s, &ev));
    assert_int_equal(ev.version, 3);
    assert_false(ah_state_take_event(s, &ev));
    ah_state_free(s);
}

static void test_latest_wins_over_an_older_version_arriving_while_pending(void **unused)
{
    ah_state_t *s = ah_state_new();
    /* Nothing is drained in between: v3 is pending when the late v2 arrives. */
    ah_control_t d1 = doc(AH_CMD_RUNNING, 1);
    ah_control_t d3 = doc(AH_CMD_PAUSE, 3);
    ah_control_t d2 = doc(AH_CMD_RUNNING, 2);
    ah_state_offer_cluster(s, &d1);
    ah_state_offer_cluster(s, &d3);
    ah_state_offer_cluster(s, &d2);
    ah_event_t ev;
    assert_true(ah_state_take_event(s, &ev));
    assert_int_equal(ev.version, 3);
    assert_int_equal(ev.command, AH_CMD_PAUSE);
    assert_false(ah_state_take_event(s, &ev));
    ah_state_free(s);
}

static void test_local_override_until_next_cluster_command(void **unused)
{
    ah_state_t *s = ah_state_new();
    ah_control_t d1 = doc(AH_CMD_RUNNING, 1);
    ah_state_offer_cluster(s, &d1);
    drain(s);
    ah_state_offer_local(s, AH_CMD_PAUSE, AH_SOURCE_LOCAL, "debug", "me");
    drain(s);
    ah_state_snapshot_t snap;
    ah_state_snapshot(s, &snap);
    assert_int_equal(snap.state, AH_STATE_PAUSED);
    assert_true(snap.local_override);
    ah_control_t d2 = doc(AH_CMD_RUNNING, 2);
    ah_state_offer_cluster(s, &d2);
    drain(s);
    ah_state_snapshot(s, &snap);
    assert_int_equal(snap.state, AH_STATE_RUNNING);
    assert_false(snap.local_override);
    assert_int_equal(snap.applied_version, 2);
    ah_state_free(s);
}

static void test_local_shutdown_is_final(void **unused)
{
    ah_state_t *s = ah_state_new();
    ah_control_t d1 = doc(AH_CMD_RUNNING, 1);
    ah_state_offer_cluster(s, &d1);
    drain(s);
    ah_state_offer_local(s, AH_CMD_SHUTDOWN, AH_SOURCE_SIGNAL, "SIGTERM", "signal");
    assert_true(ah_state_should_stop(s));
    ah_control_t d2 = doc(AH_CMD_RUNNING, 2);
    ah_state_offer_cluster(s, &d2);
    ah_state_offer_local(s, AH_CMD_RUNNING, AH_SOURCE_LOCAL, "", "");
    ah_event_t ev;
    assert_true(ah_state_take_event(s, &ev));
    assert_int_equal(ev.command, AH_CMD_SHUTDOWN);
    ah_state_free(s);
}

static void test_local_commands_wait_for_the_startup_sync_and_end_at_a_final_shutdown(void **unused)
{
    ah_state_t *s = ah_state_new();
    /* starting: pause/resume refused (the startup sync comes first); nothing pending */
    assert_int_equal(ah_state_offer_local(s, AH_CMD_RUNNING, AH_SOURCE_LOCAL, "", ""), AH_EUNAVAIL);
    assert_int_equal(ah_state_offer_local(s, AH_CMD_PAUSE, AH_SOURCE_SIGNAL, "", ""), AH_EUNAVAIL);
    assert_false(ah_state_has_event(s));
    /* a startup document offered, then a local resume: the document stays pending */
    ah_control_t d1 = doc(AH_CMD_SHUTDOWN, 1);
    ah_state_offer_cluster(s, &d1);
    assert_int_equal(ah_state_offer_local(s, AH_CMD_RUNNING, AH_SOURCE_LOCAL, "", ""), AH_EUNAVAIL);
    drain(s);
    ah_state_snapshot_t snap;
    ah_state_snapshot(s, &snap);
    assert_int_equal(snap.state, AH_STATE_PAUSED); /* held by the cluster shutdown */
    assert_int_equal(ah_state_offer_local(s, AH_CMD_SHUTDOWN, AH_SOURCE_LOCAL, "", ""), AH_OK);
    assert_int_equal(ah_state_offer_local(s, AH_CMD_RUNNING, AH_SOURCE_LOCAL, "", ""), AH_EINVAL);
    assert_int_equal(ah_state_offer_local(s, AH_CMD_SHUTDOWN, AH_SOURCE_LOCAL, "", ""), AH_EINVAL);
    ah_state_free(s);
}

static void test_wait_returns_early_on_command(void **unused)
{
    ah_state_t *s = ah_state_new();
    ah_control_t d1 = doc(AH_CMD_RUNNING, 1);
    ah_state_offer_cluster(s, &d1);
    drain(s);
    assert_false(ah_state_wait(s, 0.01));
    ah_state_offer_local(s, AH_CMD_PAUSE, AH_SOURCE_LOCAL, "", "");
    int64_t t0 = ah_mono_us();
    assert_true(ah_state_wait(s, 30));
    assert_true(ah_mono_us() - t0 < 10 * 1000000);
    ah_state_free(s);
}

/* Seconds from now to the pending command's drain deadline (-1: none pending, 0 left: 0). */
static double pending_deadline_s(ah_state_t *s)
{
    ah_pending_t p;
    if (!ah_state_pending(s, &p)) {
        return -1;
    }
    return p.drain_deadline_us == 0 ? 0 : (double)(p.drain_deadline_us - ah_mono_us()) / 1e6;
}

static void test_drain_deadline_of_a_pending_command(void **unused)
{
    ah_state_t *s = ah_state_new();
    ah_state_set_drain_limits(s, 0, 20);
    ah_control_t d1 = doc(AH_CMD_RUNNING, 1);
    ah_state_offer_cluster(s, &d1);
    assert_true(pending_deadline_s(s) < 0); /* the startup sync is not "pending" */
    drain(s);

    /* a cluster pause: timestamp + drain on the wall clock */
    ah_control_t d2 = doc(AH_CMD_PAUSE, 2);
    d2.drain_ms = 30000;
    ah_state_offer_cluster(s, &d2);
    double left = pending_deadline_s(s);
    assert_true(left > 29 && left <= 30);
    ah_pending_t p;
    assert_true(ah_state_pending(s, &p));
    assert_int_equal(p.command, AH_CMD_PAUSE);
    assert_string_equal(p.reason, "r");

    /* written 10 s ago (or by a clock 10 s behind): 20 s left */
    ah_control_t d3 = doc(AH_CMD_PAUSE, 3);
    d3.drain_ms = 30000;
    d3.timestamp_us -= 10000000;
    ah_state_offer_cluster(s, &d3);
    left = pending_deadline_s(s);
    assert_true(left > 19 && left <= 20);

    /* a clock far ahead cannot lengthen it; one far behind makes it due at once */
    ah_control_t d4 = doc(AH_CMD_PAUSE, 4);
    d4.drain_ms = 30000;
    d4.timestamp_us += 3600 * INT64_C(1000000);
    ah_state_offer_cluster(s, &d4);
    left = pending_deadline_s(s);
    assert_true(left > 29 && left <= 30);
    ah_control_t d5 = doc(AH_CMD_PAUSE, 5);
    d5.drain_ms = 30000;
    d5.timestamp_us -= 3600 * INT64_C(1000000);
    ah_state_offer_cluster(s, &d5);
    assert_true(ah_state_pending(s, &p) && p.drain_deadline_us != 0);
    assert_true(p.drain_deadline_us <= ah_mono_us());

    /* latest wins: a resume brings no deadline */
    ah_control_t d6 = doc(AH_CMD_RUNNING, 6);
    d6.drain_ms = 0;
    ah_state_offer_cluster(s, &d6);
    assert_true(pending_deadline_s(s) == 0);
    drain(s);

    /* a shutdown's drain stops at its bound (20 s here) */
    ah_control_t d7 = doc(AH_CMD_SHUTDOWN, 7);
    d7.drain_ms = 600000;
    ah_state_offer_cluster(s, &d7);
    left = pending_deadline_s(s);
    assert_true(left > 19 && left <= 20);
    ah_state_free(s);
}

static void test_pause_drain_timeout_applies_to_a_pause_without_drain(void **unused)
{
    ah_state_t *s = ah_state_new();
    ah_state_set_drain_limits(s, 5, 0);
    ah_control_t d1 = doc(AH_CMD_RUNNING, 1);
    ah_state_offer_cluster(s, &d1);
    drain(s);
    assert_int_equal(ah_state_offer_local(s, AH_CMD_PAUSE, AH_SOURCE_SIGNAL, "SIGUSR1", "signal"),
                     AH_OK);
    double left = pending_deadline_s(s);
    assert_true(left > 4 && left <= 5);
    /* a command's own drain wins */
    assert_int_equal(ah_state_offer_local_drain(s, AH_CMD_PAUSE, AH_SOURCE_LOCAL, "", "api", 60000),
                     AH_OK);
    left = pending_deadline_s(s);
    assert_true(left > 59 && left <= 60);
    /* a shutdown without drain has none (no bound set here) */
    assert_int_equal(ah_state_offer_local(s, AH_CMD_SHUTDOWN, AH_SOURCE_LOCAL, "", "api"), AH_OK);
    assert_true(pending_deadline_s(s) == 0);
    ah_state_free(s);
}

static void test_timestamps_are_iso8601_utc_with_microseconds(void **unused)
{
    char ts[AH_TIMESTAMP_LEN];
    ah_format_timestamp(1768127400123456LL, ts);
    assert_string_equal(ts, "2026-01-11T10:30:00.123456Z");
}

static void test_utf8_validation(void **unused)
{
    assert_true(ah_utf8_valid("plain", 5));
    assert_true(ah_utf8_valid("caf\xc3\xa9 \xe2\x9c\x93", 9));
    assert_false(ah_utf8_valid("\xff", 1));
    assert_false(ah_utf8_valid("\xc3", 1));         /* truncated */
    assert_false(ah_utf8_valid("\xc0\xaf", 2));     /* overlong */
    assert_false(ah_utf8_valid("\xed\xa0\x80", 3)); /* surrogate */
    assert_false(ah_utf8_valid("a\0b", 3));         /* embedded NUL */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_transition_table),
        cmocka_unit_test(test_first_document_is_a_startup_sync),
        cmocka_unit_test(test_older_or_equal_versions_are_ignored),
        cmocka_unit_test(test_latest_command_wins_between_batches),
        cmocka_unit_test(test_latest_wins_over_an_older_version_arriving_while_pending),
        cmocka_unit_test(test_local_override_until_next_cluster_command),
        cmocka_unit_test(test_local_shutdown_is_final),
        cmocka_unit_test(test_local_commands_wait_for_the_startup_sync_and_end_at_a_final_shutdown),
        cmocka_unit_test(test_wait_returns_early_on_command),
        cmocka_unit_test(test_held_row_only_a_cluster_command_releases),
        cmocka_unit_test(test_startup_shutdown_holds_until_a_cluster_resume),
        cmocka_unit_test(test_sleep_is_not_cut_short_by_the_startup_sync),
        cmocka_unit_test(test_drain_deadline_of_a_pending_command),
        cmocka_unit_test(test_pause_drain_timeout_applies_to_a_pause_without_drain),
        cmocka_unit_test(test_timestamps_are_iso8601_utc_with_microseconds),
        cmocka_unit_test(test_utf8_validation),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
