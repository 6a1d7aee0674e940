/* Unit tests for the Lua host (core/ah_lua*.c): loading and the script contract, the results of
 * batch, errors with tracebacks, hook events, the agent module, require of modules next to the
 * script, and the time budget (interrupts from another thread, late interrupts, agent.sleep). The
 * fixture scripts live in tests/unit/lua (AH_TEST_LUA_DIR). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ah_lua.h"
#include "ah_state.h"

#define FIXTURE(name) AH_TEST_LUA_DIR "/" name

static ah_lua_t *open_fixture(const char *name, ah_state_t *state, double batch_timeout, char *err)
{
    ah_lua_options_t opts = {
        .agent_id = "unit-agent", .state = state, .batch_timeout = batch_timeout};
    return ah_lua_open(&opts, name, err, AH_ERRLEN);
}

static ah_lua_t *open_ok(const char *name, ah_state_t *state, double batch_timeout)
{
    char err[AH_ERRLEN] = "";
    ah_lua_t *lua = open_fixture(name, state, batch_timeout, err);
    if (lua == NULL) {
        fail_msg("open %s: %s", name, err);
    }
    return lua;
}

static long long batch_ok(ah_lua_t *lua)
{
    char err[AH_ERRLEN] = "";
    long long items = -1;
    int rc = ah_lua_batch(lua, &items, err, sizeof(err));
    if (rc != AH_OK) {
        fail_msg("batch failed (%d): %s", rc, err);
    }
    return items;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- loading ----------------------------------------------------------------------------- */

static void test_open_accepts_a_script_that_fulfils_the_contract(void **unused)
{
    ah_lua_t *lua = open_ok(FIXTURE("ok.lua"), NULL, 0);
    char err[AH_ERRLEN] = "";
    assert_int_equal(ah_lua_init(lua, err, sizeof(err)), AH_OK);
    ah_lua_close(lua);
}

static void test_open_reports_syntax_error_with_file_and_line(void **unused)
{
    char err[AH_ERRLEN] = "";
    assert_null(open_fixture(FIXTURE("syntax_error.lua"), NULL, 0, err));
    assert_non_null(strstr(err, "syntax_error.lua:3:"));
    assert_null(strstr(err, "stack traceback")); /* Lua's own message, nothing added */
}

static void test_open_reports_missing_file(void **unused)
{
    char err[AH_ERRLEN] = "";
    assert_null(open_fixture(FIXTURE("does_not_exist.lua"), NULL, 0, err));
    assert_non_null(strstr(err, "cannot open"));
    assert_non_null(strstr(err, "does_not_exist.lua"));
}

static void test_open_rejects_script_not_returning_a_table(void **unused)
{
    char err[AH_ERRLEN] = "";
    assert_null(open_fixture(FIXTURE("not_table.lua"), NULL, 0, err));
    assert_string_equal(err, FIXTURE("not_table.lua") ": script must return a table (got number)");
}

static void test_open_rejects_script_without_batch(void **unused)
{
    char err[AH_ERRLEN] = "";
    assert_null(open_fixture(FIXTURE("no_batch.lua"), NULL, 0, err));
    assert_string_equal(err, FIXTURE("no_batch.lua") ": script does not define function batch");
}

static void test_open_rejects_hook_that_is_not_a_function(void **unused)
{
    char err[AH_ERRLEN] = "";
    assert_null(open_fixture(FIXTURE("hook_not_function.lua"), NULL, 0, err));
    assert_string_equal(
        err, FIXTURE("hook_not_function.lua") ": on_pause must be a function (got string)");
}

static void test_open_reports_error_raised_while_loading_with_traceback(void **unused)
{
    char err[AH_ERRLEN] = "";
    assert_null(open_fixture(FIXTURE("load_error.lua"), NULL, 0, err));
    assert_non_null(strstr(err, "load_error.lua:2: refusing to load"));
    assert_non_null(strstr(err, "stack traceback"));
}

/* ---- calls ------------------------------------------------------------------------------- */

static void test_batch_result_becomes_item_count(void **unused)
{
    /* ok.lua returns 3, 2.7, -5, nil, "7", false, 1e300, NaN, {}, then nil. */
    const long long expected[] = {3, 2, 0, 0, 0, 0, LLONG_MAX, 0, 0, 0};
    ah_lua_t *lua = open_ok(FIXTURE("ok.lua"), NULL, 0);
    char err[AH_ERRLEN] = "";
    assert_int_equal(ah_lua_init(lua, err, sizeof(err)), AH_OK);
    for (size_t i = 0; i < sizeof(expected) / sizeof(expected[0]); i++) {
        assert_int_equal(batch_ok(lua), expected[i]);
    }
    ah_lua_close(lua);
}

static void test_batch_error_returns_traceback_and_state_stays_usable(void **unused)
{
    ah_lua_t *lua = open_ok(FIXTURE("errors.lua"), NULL, 0);
    char err[AH_ERRLEN] = "";
    long long items = -1;

    assert_int_equal(ah_lua_batch(lua, &items, err, sizeof(err)), AH_ELUA);
    assert_int_equal(items, 0);
    assert_non_null(strstr(err, "errors.lua:8: boom at iteration 1\nstack traceback:"));
    assert_non_null(strstr(err, "in function 'fail'"));

    assert_int_equal(batch_ok(lua), 1);

    assert_int_equal(ah_lua_batch(lua, &items, err, sizeof(err)), AH_ELUA);
    assert_non_null(strstr(err, "(error object is a table value)\nstack traceback:"));

    assert_int_equal(batch_ok(lua), 1);
    ah_lua_close(lua);
}

static void test_hook_error_is_reported_and_state_stays_usable(void **unused)
{
    ah_lua_t *lua = open_ok(FIXTURE("errors.lua"), NULL, 0);
    char err[AH_ERRLEN] = "";
    ah_event_t ev = {.command = AH_CMD_PAUSE, .source = AH_SOURCE_LOCAL};
    assert_int_equal(ah_lua_hook(lua, AH_HOOK_PAUSE, &ev, err, sizeof(err)), AH_ELUA);
    assert_non_null(strstr(err, "pause hook failed"));
    assert_non_null(strstr(err, "stack traceback"));
    /* errors.lua defines no on_resume: a missing hook is a no-op. */
    assert_int_equal(ah_lua_hook(lua, AH_HOOK_RESUME, &ev, err, sizeof(err)), AH_OK);
    assert_int_equal(ah_lua_hook(lua, AH_HOOK_NONE, &ev, err, sizeof(err)), AH_OK);
    long long items = -1;
    assert_int_equal(ah_lua_batch(lua, &items, err, sizeof(err)), AH_ELUA); /* iteration 1 */
    assert_int_equal(batch_ok(lua), 1);
    ah_lua_close(lua);
}

static void test_hooks_receive_event_fields(void **unused)
{
    char path[] = "/tmp/ah_test_lua_hooks_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    setenv("AH_TEST_OUT", path, 1);

    ah_lua_t *lua = open_ok(FIXTURE("hooks.lua"), NULL, 0);
    char err[AH_ERRLEN] = "";
    ah_event_t pause = {.command = AH_CMD_PAUSE,
                        .version = 7,
                        .timestamp_us = 1768127400123456LL,
                        .reason = "maintenance window",
                        .updated_by = "ops",
                        .source = AH_SOURCE_CLUSTER};
    ah_event_t resume = {.command = AH_CMD_RUNNING,
                         .version = 8,
                         .timestamp_us = 1768127401000001LL,
                         .reason = "",
                         .updated_by = "api",
                         .source = AH_SOURCE_LOCAL};
    ah_event_t shutdown = {.command = AH_CMD_SHUTDOWN,
                           .version = 0,
                           .timestamp_us = 1768127402000000LL,
                           .reason = "SIGTERM",
                           .updated_by = "signal",
                           .source = AH_SOURCE_SIGNAL};
    assert_int_equal(ah_lua_hook(lua, AH_HOOK_PAUSE, &pause, err, sizeof(err)), AH_OK);
    assert_int_equal(ah_lua_hook(lua, AH_HOOK_RESUME, &resume, err, sizeof(err)), AH_OK);
    assert_int_equal(ah_lua_hook(lua, AH_HOOK_SHUTDOWN, &shutdown, err, sizeof(err)), AH_OK);
    ah_lua_close(lua);

    char buf[1024] = "";
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = '\0';
    fclose(f);
    unlink(path);
    assert_string_equal(
        buf, "on_pause|pause|7|maintenance window|ops|2026-01-11T10:30:00.123456Z|cluster\n"
             "on_resume|running|8||api|2026-01-11T10:30:01.000001Z|local\n"
             "on_shutdown|shutdown|0|SIGTERM|signal|2026-01-11T10:30:02.000000Z|signal\n");
}

/* ---- the agent module -------------------------------------------------------------------- */

static void test_require_finds_module_next_to_script(void **unused)
{
    ah_lua_t *lua = open_ok(FIXTURE("require_local.lua"), NULL, 0);
    assert_int_equal(batch_ok(lua), 42);
    ah_lua_close(lua);
}

static void test_embedded_modules_are_compiled_when_first_required(void **unused)
{
    ah_lua_t *lua = open_ok(FIXTURE("lazy_modules.lua"), NULL, 0);
    assert_int_equal(batch_ok(lua), 1);
    ah_lua_close(lua);
}

/* The generated table of embedded modules (cmake/embed_lua.cmake, as core/ah_lua.c reads it). */
typedef struct {
    const char *name;
    const char *file;
    const unsigned char *data;
    size_t size;
    const unsigned char *bytecode;
    size_t bytecode_size;
} embedded_module_t;
extern const embedded_module_t ah_lua_modules[];

static void test_embedded_modules_are_bytecode_that_keeps_its_lines(void **unused)
{
    int count = 0;
    for (const embedded_module_t *m = ah_lua_modules; m->name != NULL; m++, count++) {
        assert_non_null(m->bytecode); /* LuaJIT's bytecode signature: ESC 'L' 'J' */
        assert_true(m->bytecode_size > 3 && m->bytecode[0] == 0x1b && m->bytecode[1] == 'L' &&
                    m->bytecode[2] == 'J');
    }
    assert_true(count >= 3);
    ah_lua_t *lua = open_ok(FIXTURE("module_lines.lua"), NULL, 0);
    assert_int_equal(batch_ok(lua), 1);
    ah_lua_close(lua);
}

static void test_agent_json_round_trip(void **unused)
{
    ah_lua_t *lua = open_ok(FIXTURE("json.lua"), NULL, 0);
    assert_int_equal(batch_ok(lua), 1);
    ah_lua_close(lua);
}

static void test_agent_module_without_state(void **unused)
{
    setenv("AH_TEST_SET", "value", 1);
    ah_lua_t *lua = open_ok(FIXTURE("api.lua"), NULL, 0);
    assert_int_equal(batch_ok(lua), 1);
    char err[AH_ERRLEN] = "";
    ah_event_t ev = {.command = AH_CMD_PAUSE, .source = AH_SOURCE_LOCAL};
    /* on_pause calls agent.sleep(-1): misuse raises an argument error. */
    assert_int_equal(ah_lua_hook(lua, AH_HOOK_PAUSE, &ev, err, sizeof(err)), AH_ELUA);
    assert_non_null(strstr(err, "bad argument #1 to 'sleep'"));
    ah_lua_close(lua);
}

static void test_agent_module_sees_the_shared_state(void **unused)
{
    ah_state_t *state = ah_state_new();
    assert_non_null(state);
    ah_lua_t *lua = open_ok(FIXTURE("state.lua"), state, 0);
    assert_int_equal(batch_ok(lua), 1); /* "starting", not stopping */
    ah_state_snapshot_t snap;
    ah_state_snapshot(state, &snap);
    assert_int_equal(snap.batch_started_us, 0); /* the call marker was cleared */
    assert_int_equal(snap.call_generation, 0);

    ah_state_offer_local(state, AH_CMD_SHUTDOWN, AH_SOURCE_SIGNAL, "test", "unit");
    assert_int_equal(batch_ok(lua), 1); /* should_stop */
    ah_lua_close(lua);
    ah_state_free(state);
}

typedef struct {
    ah_state_t *state;
    atomic_bool done;
} offer_arg_t;

static void *offer_pause_until_done(void *p)
{
    offer_arg_t *arg = p;
    while (!atomic_load(&arg->done)) {
        ah_state_offer_local(arg->state, AH_CMD_PAUSE, AH_SOURCE_LOCAL, "test", "unit");
        sleep_ms(10);
    }
    return NULL;
}

static void wake_lua(void *lua)
{
    ah_lua_wake(lua);
}

static void test_sleep_returns_early_when_a_command_arrives(void **unused)
{
    setenv("AH_TEST_SLEEP", "30", 1);
    ah_state_t *state = ah_state_new();
    assert_non_null(state);
    /* synced and running: local commands are accepted (not while starting) */
    assert_int_equal(ah_state_offer_local(state, AH_CMD_RUNNING, AH_SOURCE_STARTUP, "", ""), AH_OK);
    ah_event_t ev;
    ah_run_state_t from, to;
    ah_hook_t hook;
    assert_true(ah_state_take_event(state, &ev));
    assert_int_equal(ah_state_apply(state, &ev, &from, &to, &hook), AH_OK);
    ah_lua_t *lua = open_ok(FIXTURE("sleepy.lua"), state, 0);
    /* What the host does: a command wakes the state's loop. */
    ah_state_set_waker(state, wake_lua, lua);
    offer_arg_t arg = {.state = state};
    atomic_init(&arg.done, false);
    pthread_t thread;
    assert_int_equal(pthread_create(&thread, NULL, offer_pause_until_done, &arg), 0);
    assert_int_equal(batch_ok(lua), 1); /* woken early */
    atomic_store(&arg.done, true);
    pthread_join(thread, NULL);
    ah_lua_close(lua);
    ah_state_free(state);
}

/* ---- time budget ------------------------------------------------------------------------- */

typedef struct {
    ah_lua_t *lua;
    ah_state_t *state;
    int delay_ms;
} single_interrupt_t;

/* Waits (up to 20 s) until the state shows a running call, lets it run delay_ms, then interrupts
 * it exactly once. */
static void *interrupt_once_running(void *p)
{
    single_interrupt_t *it = p;
    for (int i = 0; i < 20000; i++) {
        ah_state_snapshot_t snap;
        ah_state_snapshot(it->state, &snap);
        if (snap.call_generation != 0) {
            sleep_ms(it->delay_ms);
            ah_lua_interrupt(it->lua);
            return NULL;
        }
        sleep_ms(1);
    }
    return NULL;
}

static int batch_with_one_interrupt(ah_lua_t *lua, ah_state_t *state, char *err)
{
    single_interrupt_t it = {.lua = lua, .state = state, .delay_ms = 100};
    pthread_t thread;
    assert_int_equal(pthread_create(&thread, NULL, interrupt_once_running, &it), 0);
    long long items = -1;
    int rc = ah_lua_batch(lua, &items, err, AH_ERRLEN);
    pthread_join(thread, NULL);
    return rc;
}

static void test_interrupt_stops_an_interpreted_busy_loop(void **unused)
{
    ah_state_t *state = ah_state_new();
    assert_non_null(state);
    ah_lua_t *lua = open_ok(FIXTURE("busy.lua"), state, 1.5);
    char err[AH_ERRLEN] = "";
    assert_int_equal(batch_with_one_interrupt(lua, state, err), AH_ETIMEOUT);
    assert_non_null(strstr(err, "batch timeout: call exceeded BATCH_TIMEOUT (1.5s)"));
    assert_non_null(strstr(err, "stack traceback"));
    assert_non_null(strstr(err, "busy.lua"));
    ah_lua_close(lua);
    ah_state_free(state);
}

static void test_interrupt_survives_a_script_that_catches_it(void **unused)
{
    ah_state_t *state = ah_state_new();
    assert_non_null(state);
    ah_lua_t *lua = open_ok(FIXTURE("busy.lua"), state, 0);
    char err[AH_ERRLEN] = "";
    assert_int_equal(batch_with_one_interrupt(lua, state, err), AH_ETIMEOUT); /* iteration 1 */
    /* Iteration 2 runs pcall in a loop: one interrupt still ends the call. */
    assert_int_equal(batch_with_one_interrupt(lua, state, err), AH_ETIMEOUT);
    assert_non_null(strstr(err, "batch timeout"));
    /* The next call runs normally. */
    assert_int_equal(batch_ok(lua), 5);
    ah_lua_close(lua);
    ah_state_free(state);
}

typedef struct {
    ah_lua_t *lua;
    atomic_bool done;
    atomic_long interrupts;
} interrupter_t;

static void *interrupt_until_done(void *p)
{
    interrupter_t *it = p;
    while (!atomic_load(&it->done)) {
        ah_lua_interrupt(it->lua);
        atomic_fetch_add(&it->interrupts, 1);
    }
    return NULL;
}

static void test_late_interrupt_does_not_break_the_next_call(void **unused)
{
    ah_lua_t *lua = open_ok(FIXTURE("require_local.lua"), NULL, 5);
    assert_int_equal(batch_ok(lua), 42);
    ah_lua_interrupt(lua); /* aimed at a call that has finished */
    ah_lua_interrupt(NULL);
    assert_int_equal(batch_ok(lua), 42);

    /* Interrupts racing with many short calls: each call either completes or times out, and
     * once the interrupts stop, no stale request reaches a later call. The calls go on until
     * the interrupter has really run alongside them (whenever the scheduler lets it: under
     * load it may not run at all during a fixed number of calls). */
    interrupter_t it = {.lua = lua};
    atomic_init(&it.done, false);
    atomic_init(&it.interrupts, 0);
    pthread_t thread;
    assert_int_equal(pthread_create(&thread, NULL, interrupt_until_done, &it), 0);
    while (atomic_load(&it.interrupts) == 0) {
        sched_yield();
    }
    long racing_from = atomic_load(&it.interrupts);
    for (long i = 0; i < 20000 || atomic_load(&it.interrupts) < racing_from + 1000; i++) {
        char err[AH_ERRLEN] = "";
        long long items = -1;
        int rc = ah_lua_batch(lua, &items, err, sizeof(err));
        assert_true(rc == AH_OK || rc == AH_ETIMEOUT);
        assert_int_equal(items, rc == AH_OK ? 42 : 0);
    }
    atomic_store(&it.done, true);
    pthread_join(thread, NULL);
    assert_true(atomic_load(&it.interrupts) >= racing_from + 1000);
    for (int i = 0; i < 1000; i++) {
        assert_int_equal(batch_ok(lua), 42);
    }
    ah_lua_close(lua);
}

typedef struct {
    ah_lua_t *lua;
    ah_state_t *state;
    atomic_bool stale_sent;
} stale_interrupter_t;

/* Takes the generation of the first call it sees (as the watchdog's snapshot would), waits until
 * that call has ended and the next one runs, then interrupts with the old generation. */
static void *interrupt_with_a_stale_generation(void *p)
{
    stale_interrupter_t *it = p;
    uint64_t first = 0;
    for (int i = 0; i < 20000 && !atomic_load(&it->stale_sent); i++) {
        ah_state_snapshot_t snap;
        ah_state_snapshot(it->state, &snap);
        if (first == 0) {
            first = snap.call_generation;
        } else if (snap.call_generation != 0 && snap.call_generation != first) {
            ah_lua_interrupt_call(it->lua, first); /* decided on the first call's snapshot */
            atomic_store(&it->stale_sent, true);
        }
        sleep_ms(1);
    }
    return NULL;
}

static void test_an_interrupt_decided_for_one_call_never_stops_the_next(void **unused)
{
    setenv("AH_TEST_SPIN_MS", "300", 1);
    ah_state_t *state = ah_state_new();
    assert_non_null(state);
    ah_lua_t *lua = open_ok(FIXTURE("spin.lua"), state, 0);
    stale_interrupter_t it = {.lua = lua, .state = state};
    atomic_init(&it.stale_sent, false);
    pthread_t thread;
    assert_int_equal(pthread_create(&thread, NULL, interrupt_with_a_stale_generation, &it), 0);
    /* Calls go on until the stale interrupt has been sent during one of them: every one
     * completes. */
    for (int i = 0; i < 100 && !atomic_load(&it.stale_sent); i++) {
        assert_int_equal(batch_ok(lua), 1);
    }
    assert_int_equal(batch_ok(lua), 1);
    pthread_join(thread, NULL);
    assert_true(atomic_load(&it.stale_sent));

    /* The current generation does stop the running call. */
    setenv("AH_TEST_SPIN_MS", "20000", 1);
    single_interrupt_t current = {.lua = lua, .state = state, .delay_ms = 50};
    assert_int_equal(pthread_create(&thread, NULL, interrupt_once_running, &current), 0);
    char err[AH_ERRLEN] = "";
    long long items = -1;
    assert_int_equal(ah_lua_batch(lua, &items, err, sizeof(err)), AH_ETIMEOUT);
    pthread_join(thread, NULL);
    ah_lua_close(lua);
    ah_state_free(state);
}

static void test_sleep_never_outlasts_the_budget(void **unused)
{
    setenv("AH_TEST_SLEEP", "30", 1);
    ah_lua_t *lua = open_ok(FIXTURE("sleepy.lua"), NULL, 0.2);
    char err[AH_ERRLEN] = "";
    long long items = -1;
    assert_int_equal(ah_lua_batch(lua, &items, err, sizeof(err)), AH_ETIMEOUT);
    assert_non_null(strstr(err, "batch timeout: call exceeded BATCH_TIMEOUT (0.2s)"));
    setenv("AH_TEST_SLEEP", "0", 1);
    assert_int_equal(batch_ok(lua), 0);
    ah_lua_close(lua);
}

/* ---- tasks --------------------------------------------------------------------------------- */

static void test_tasks_wait_concurrently_and_join(void **unused)
{
    setenv("AH_TEST_TASKS", "concurrent", 1);
    ah_lua_t *lua = open_ok(FIXTURE("tasks.lua"), NULL, 30);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(batch_ok(lua), 50 * 51 / 2);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double elapsed = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    assert_true(elapsed < 5.0); /* 50 sleeps of 0.2 s one after the other would take 10 s */
    assert_int_equal(batch_ok(lua), 50 * 51 / 2); /* the loop is reusable */
    ah_lua_close(lua); /* debug builds assert that uv_loop_close() returned 0 */
}

static void test_tasks_waiting_for_each_other_are_cancelled(void **unused)
{
    setenv("AH_TEST_TASKS", "deadlock", 1);
    ah_lua_t *lua = open_ok(FIXTURE("tasks.lua"), NULL, 0); /* no deadline to end it */
    assert_int_equal(batch_ok(lua), 0);
    setenv("AH_TEST_TASKS", "after_deadlock", 1);
    assert_int_equal(batch_ok(lua), 2);
    ah_lua_close(lua);
}

static void test_waiting_in_a_script_coroutine_raises(void **unused)
{
    setenv("AH_TEST_TASKS", "foreign_coroutine", 1);
    ah_lua_t *lua = open_ok(FIXTURE("tasks.lua"), NULL, 5);
    assert_int_equal(batch_ok(lua), 1);
    ah_lua_close(lua);
}

static void test_failing_function_cancels_its_tasks_then_reports(void **unused)
{
    setenv("AH_TEST_TASKS", "main_fails", 1);
    ah_lua_t *lua = open_ok(FIXTURE("tasks.lua"), NULL, 30);
    char err[AH_ERRLEN] = "";
    long long items = -1;
    assert_int_equal(ah_lua_batch(lua, &items, err, sizeof(err)), AH_ELUA);
    assert_non_null(strstr(err, "main failed"));
    assert_non_null(strstr(err, "stack traceback"));
    setenv("AH_TEST_TASKS", "after_main_fails", 1);
    assert_int_equal(batch_ok(lua), 1); /* the task saw "cancelled"; a new coroutine runs */
    ah_lua_close(lua);
}

static void test_batch_results_and_ctx_survive_waits_failures_and_hooks(void **unused)
{
    /* The batch's function and ctx are kept on the main coroutine between calls: its results
     * must be the batch's own after waits, after a failed call (a new coroutine) and hooks. */
    ah_lua_t *lua = open_ok(FIXTURE("tasks.lua"), NULL, 30);
    char err[AH_ERRLEN] = "";
    long long items = -1;
    ah_event_t ev = {.command = AH_CMD_PAUSE, .source = AH_SOURCE_LOCAL};
    setenv("AH_TEST_TASKS", "plain_results", 1);
    assert_int_equal(batch_ok(lua), 0); /* returned nothing */
    assert_int_equal(batch_ok(lua), 0); /* nil */
    assert_int_equal(batch_ok(lua), 6); /* 6, 7: the first counts */
    setenv("AH_TEST_TASKS", "result_after_waits", 1);
    assert_int_equal(batch_ok(lua), 41);
    assert_int_equal(ah_lua_hook(lua, AH_HOOK_PAUSE, &ev, err, sizeof(err)), AH_OK);
    assert_int_equal(batch_ok(lua), 42);
    setenv("AH_TEST_TASKS", "main_fails", 1);
    assert_int_equal(ah_lua_batch(lua, &items, err, sizeof(err)), AH_ELUA);
    assert_int_equal(items, 0);
    assert_int_equal(ah_lua_hook(lua, AH_HOOK_PAUSE, &ev, err, sizeof(err)), AH_OK);
    setenv("AH_TEST_TASKS", "result_after_waits", 1);
    assert_int_equal(batch_ok(lua), 43);
    setenv("AH_TEST_TASKS", "plain_results", 1);
    assert_int_equal(batch_ok(lua), 6);
    ah_lua_close(lua);
}

static void test_many_calls_keep_the_stack_balanced(void **unused)
{
    /* Debug builds assert lua_gettop before == after in every call; a leak of one slot per call
     * would also overflow the Lua stack long before 20000 calls. */
    ah_lua_t *lua = open_ok(FIXTURE("errors.lua"), NULL, 10);
    ah_event_t ev = {.command = AH_CMD_PAUSE, .source = AH_SOURCE_LOCAL};
    for (int i = 1; i <= 20000; i++) {
        char err[AH_ERRLEN] = "";
        long long items = -1;
        int rc = ah_lua_batch(lua, &items, err, sizeof(err));
        assert_int_equal(rc, i % 2 == 1 ? AH_ELUA : AH_OK);
        assert_int_equal(ah_lua_hook(lua, AH_HOOK_PAUSE, &ev, err, sizeof(err)), AH_ELUA);
    }
    ah_lua_close(lua);
    ah_lua_close(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_open_accepts_a_script_that_fulfils_the_contract),
        cmocka_unit_test(test_open_reports_syntax_error_with_file_and_line),
        cmocka_unit_test(test_open_reports_missing_file),
        cmocka_unit_test(test_open_rejects_script_not_returning_a_table),
        cmocka_unit_test(test_open_rejects_script_without_batch),
        cmocka_unit_test(test_open_rejects_hook_that_is_not_a_function),
        cmocka_unit_test(test_open_reports_error_raised_while_loading_with_traceback),
        cmocka_unit_test(test_batch_result_becomes_item_count),
        cmocka_unit_test(test_batch_error_returns_traceback_and_state_stays_usable),
        cmocka_unit_test(test_hook_error_is_reported_and_state_stays_usable),
        cmocka_unit_test(test_hooks_receive_event_fields),
        cmocka_unit_test(test_require_finds_module_next_to_script),
        cmocka_unit_test(test_embedded_modules_are_compiled_when_first_required),
        cmocka_unit_test(test_embedded_modules_are_bytecode_that_keeps_its_lines),
        cmocka_unit_test(test_agent_json_round_trip),
        cmocka_unit_test(test_agent_module_without_state),
        cmocka_unit_test(test_agent_module_sees_the_shared_state),
        cmocka_unit_test(test_sleep_returns_early_when_a_command_arrives),
        cmocka_unit_test(test_interrupt_stops_an_interpreted_busy_loop),
        cmocka_unit_test(test_interrupt_survives_a_script_that_catches_it),
        cmocka_unit_test(test_late_interrupt_does_not_break_the_next_call),
        cmocka_unit_test(test_an_interrupt_decided_for_one_call_never_stops_the_next),
        cmocka_unit_test(test_sleep_never_outlasts_the_budget),
        cmocka_unit_test(test_tasks_wait_concurrently_and_join),
        cmocka_unit_test(test_tasks_waiting_for_each_other_are_cancelled),
        cmocka_unit_test(test_waiting_in_a_script_coroutine_raises),
        cmocka_unit_test(test_failing_function_cancels_its_tasks_then_reports),
        cmocka_unit_test(test_batch_results_and_ctx_survive_waits_failures_and_hooks),
        cmocka_unit_test(test_many_calls_keep_the_stack_balanced),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
