/* Calls of the Lua host (ah_lua.h, ah_lua_internal.h): ah_lua_init, ah_lua_batch, the hooks and
 * ah_lua_release all go through ah_lua_call_user(), the one call wrapper: it arms and disarms the
 * time budget and the memory limit, marks the call in the shared state, runs the function as a
 * coroutine (the call's "main task") and, when that coroutine or a task it spawned waits, runs
 * the loop (core/ah_lua_task.c) until all of them have ended; errors become
 * "<error>\n<traceback>". A call that never waits costs one lua_resume and no loop turn.
 *
 * The time budget: Lua code that does not wait is stopped the way luajit.c handles SIGINT:
 * ah_lua_interrupt() signals the Lua thread, whose handler installs a hook unless the call is
 * parked in the loop, and the hook raises the timeout error inside the Lua thread; a call
 * sequence number makes a late interrupt harmless. Lua thread only, except the ah_lua_interrupt*,
 * ah_lua_waiting* and ah_lua_wake functions (any thread). */
#include "ah_lua_internal.h"

#include "ah_log.h"

#include <assert.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- time budget ------------------------------------------------------------------------- */

/* The state whose call runs on this thread (NULL between calls): read by the interrupt signal's
 * handler, which runs on this thread. */
static _Thread_local ah_lua_t *volatile thread_lua;
static _Thread_local pthread_t thread_self; /* pthread_self() of this thread, once known */
static _Thread_local bool thread_self_known;

static void budget_hook(lua_State *L, lua_Debug *ar);

/* Raises the timeout error in the Lua thread and keeps a hook on every instruction until the call
 * ends (as Redis does after SCRIPT KILL): a script that catches the error (pcall in a loop, an
 * xpcall handler, a coroutine) gets it again at its next instruction outside the catch, so the
 * error reaches the host. Does not return. */
static int raise_timeout(lua_State *L, ah_lua_t *lua)
{
    lua->timed_out = true;
    atomic_store(&lua->hook_set, true);
    lua_sethook(L, budget_hook, LUA_MASKCOUNT, 1);
    return luaL_error(L, "batch timeout: call exceeded BATCH_TIMEOUT (%gs)", lua->batch_timeout);
}

/* Runs in the Lua thread at the next call, return or instruction after ah_lua_interrupt()
 * installed it (and repeatedly once a call has timed out). Note: JIT-compiled traces run no
 * hooks; code looping inside one is only seen by the host's watchdog (liveness, bounded
 * shutdown), not here. */
static void budget_hook(lua_State *L, lua_Debug *ar)
{
    ah_lua_t *lua = ah_lua_host_of(L);
    if (lua == NULL) {
        lua_sethook(L, NULL, 0, 0);
        return;
    }
    uint64_t seq = atomic_load(&lua->call_seq);
    if ((seq & 1) != 0 && lua->timed_out) {
        raise_timeout(L, lua); /* sticky: the call already overran its budget */
    }
    /* Clear first, then look at the request: an interrupt for this call that stores its
     * sequence number after the load below also installs the hook after this clear. */
    lua_sethook(L, NULL, 0, 0);
    uint64_t expected = seq;
    if ((seq & 1) != 0 && atomic_compare_exchange_strong(&lua->interrupt_seq, &expected, 0)) {
        raise_timeout(L, lua);
    }
    /* A late request aimed at a call that has finished: nothing to do. */
}

/* Marks the start of a call of user Lua: a new odd sequence number, the shared state's marker.
 * Lua thread only.
 *
 * There is deliberately no self-check count hook (comparing the clock every N instructions): in
 * LuaJIT installing and removing a hook rewrites the dispatch table, which measured at about
 * +170 ns on an empty batch (~2x the wrapper's own cost), far over the 5% we allow. The watchdog's
 * ah_lua_interrupt() and the deadline in agent.sleep() enforce the budget instead. */
static void budget_arm(ah_lua_t *lua)
{
    /* No clock is read here: the call is stamped when first seen running (the watchdog's tick,
     * or its first wait: ah_lua_task_run_loop), see ah_state_call_begin_at. The generation and
     * the thread are published by the release store of call_seq below. */
    atomic_store_explicit(&lua->call_generation,
                          lua->state != NULL ? ah_state_call_begin_at(lua->state, 0) : 0,
                          memory_order_relaxed);
    /* The thread running this call (the script's main chunk may run on another thread than
     * its batches): compared with a per-thread copy, so no call of pthread_self() per call. */
    if (!thread_self_known) {
        thread_self = pthread_self();
        thread_self_known = true;
    }
    if (!pthread_equal(atomic_load_explicit(&lua->thread, memory_order_relaxed), thread_self)) {
        atomic_store_explicit(&lua->thread, thread_self, memory_order_relaxed);
    }
    /* A signal sent for an earlier call may have reached this thread while it ran no call of
     * this state (its handler then cleared nothing): the next interrupt signals again. */
    if (atomic_load_explicit(&lua->signal_sent, memory_order_relaxed)) {
        atomic_store_explicit(&lua->signal_sent, false, memory_order_relaxed);
    }
    thread_lua = lua;
    /* Only this thread writes call_seq: a release store (a plain move on x86) is enough. */
    uint64_t seq = atomic_load_explicit(&lua->call_seq, memory_order_relaxed);
    atomic_store_explicit(&lua->call_seq, seq + 1, memory_order_release);
    lua->timed_out = false;
}

/* Marks the end of the call (sequence number even again) and removes any hook, stale or not.
 * lua_sethook rewrites LuaJIT's dispatch table, so it is only called when a hook may be set; a
 * hook installed after the exchange below is stale and removes itself in the next call. */
static void budget_disarm(ah_lua_t *lua)
{
    uint64_t seq = atomic_load_explicit(&lua->call_seq, memory_order_relaxed);
    atomic_store_explicit(&lua->call_seq, seq + 1, memory_order_release);
    /* A hook set by an interrupt racing with this check stays installed; it is stale (its
     * interrupt_seq names this finished call) and removes itself at the next call's first
     * instruction without raising. */
    if (atomic_load_explicit(&lua->hook_set, memory_order_acquire) &&
        atomic_exchange(&lua->hook_set, false)) {
        lua_sethook(lua->L, NULL, 0, 0);
    }
    thread_lua = NULL; /* an interrupt signal arriving from now on is stale */
    if (lua->state != NULL) {
        ah_state_call_end(lua->state);
    }
}

/* Interrupting from another thread. lua_sethook() on a state whose thread may itself be calling
 * lua_sethook() (at the end of every call, in the hook) races; so, like luajit.c, whose SIGINT
 * handler runs on the Lua thread, the hook is installed on the Lua thread itself: the
 * interrupter records which call it aims at (interrupt_seq) and sends AH_LUA_INTERRUPT_SIGNAL to
 * that thread, whose handler installs the hook on the state running there (thread_lua). The hook
 * compares sequence numbers, so a signal that arrives late does nothing. */
#define AH_LUA_INTERRUPT_SIGNAL (SIGRTMIN + 5)

static void on_interrupt_signal(int signum)
{
    (void)signum;
    int saved_errno = errno;
    ah_lua_t *lua = thread_lua;
    if (lua != NULL) {
        atomic_store(&lua->signal_sent, false); /* before interrupt_seq is read */
    }
    /* parked is written by this very thread: when set, no Lua code runs (the call waits in the
     * loop, whose own cancellation reaches it) and a hook would only hit the script's unwinding. */
    if (lua != NULL && atomic_load(&lua->interrupt_seq) != 0 && !atomic_load(&lua->parked)) {
        atomic_store(&lua->hook_set, true);
        lua_sethook(lua->L, budget_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
    }
    errno = saved_errno;
}

static pthread_once_t interrupt_signal_once = PTHREAD_ONCE_INIT;

static void install_interrupt_signal(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_interrupt_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(AH_LUA_INTERRUPT_SIGNAL, &sa, NULL) != 0) {
        ah_log_error("cannot install the Lua interrupt signal handler: %s", strerror(errno));
    }
}

void ah_lua_call_install_signal(void)
{
    pthread_once(&interrupt_signal_once, install_interrupt_signal);
}

/* Aims an interrupt at the call numbered seq (odd): its waits are cancelled by its loop
 * (ah_lua_task_on_wake), and its thread is signalled so that Lua code it runs is stopped by the
 * hook. A real-time signal is queued once per kill, so interrupts sent in a burst would queue
 * without bound (each delivered on its own, starving the Lua thread): no signal is sent while one
 * sent for this call is still undelivered, since its handler reads interrupt_seq after clearing
 * signal_sent and so sees the request stored here. */
static void interrupt_call_seq(ah_lua_t *lua, uint64_t seq)
{
    atomic_store(&lua->cancel_seq, seq);
    uv_async_send(&lua->wake);
    atomic_store(&lua->interrupt_seq, seq);
    if (!atomic_exchange(&lua->signal_sent, true)) {
        pthread_kill(atomic_load(&lua->thread), AH_LUA_INTERRUPT_SIGNAL);
    }
}

void ah_lua_interrupt(ah_lua_t *lua)
{
    if (lua == NULL) {
        return;
    }
    uint64_t seq = atomic_load(&lua->call_seq);
    if ((seq & 1) == 0) {
        return; /* no call running: nothing to stop */
    }
    interrupt_call_seq(lua, seq);
}

void ah_lua_interrupt_call(ah_lua_t *lua, uint64_t generation)
{
    if (lua == NULL || generation == 0) {
        return;
    }
    uint64_t seq = atomic_load(&lua->call_seq);
    /* seq first: if the generation still matches after it, seq is that call's (a later call
     * would have changed the generation before making seq odd again). */
    if ((seq & 1) == 0 || atomic_load(&lua->call_generation) != generation) {
        return;
    }
    interrupt_call_seq(lua, seq);
}

bool ah_lua_waiting(ah_lua_t *lua)
{
    return lua != NULL && (atomic_load(&lua->call_seq) & 1) != 0 && atomic_load(&lua->parked);
}

bool ah_lua_waiting_call(ah_lua_t *lua, uint64_t generation)
{
    return lua != NULL && generation != 0 && ah_lua_waiting(lua) &&
           atomic_load(&lua->call_generation) == generation;
}

bool ah_lua_unwinding_call(ah_lua_t *lua, uint64_t generation, int64_t now_us)
{
    return lua != NULL && generation != 0 && atomic_load(&lua->deadline_generation) == generation &&
           now_us - atomic_load(&lua->deadline_fired_us) < AH_LUA_UNWIND_US;
}

void ah_lua_wake(ah_lua_t *lua)
{
    if (lua != NULL) {
        uv_async_send(&lua->wake);
    }
}

/* ---- the one call wrapper ---------------------------------------------------------------- */

/* The main task's coroutine, created on first use. Lua thread. */
static lua_State *main_co(ah_lua_t *lua)
{
    task_t *main = lua->main_task;
    if (main->co == NULL) {
        main->co = lua_newthread(lua->L);
        main->co_ref = luaL_ref(lua->L, LUA_REGISTRYINDEX);
        lua->main_pinned = 0;
    }
    return main->co;
}

/* The rest of a call whose main task did not simply return (it failed, waited, or spawned
 * tasks): runs the loop until the main task and every task it spawned have ended, ends the time
 * budget, releases the tasks. Returns the main task's lua_resume status; on failure the
 * coroutine is dropped (the next call gets a new one). Kept out of line: the empty batch never
 * comes here. */
static __attribute__((noinline)) int call_finish_slow(ah_lua_t *lua, task_t *main, int status,
                                                      bool *timed_out)
{
    ah_lua_task_resumed(lua, main, status);
    if (!main->ended || lua->tasks != NULL || lua->ready_head != NULL) {
        ah_lua_task_run_loop(lua);
    }
    status = lua->main_status;
    *timed_out = lua->timed_out || (status != 0 && lua->cancel_code == ah_lua_code_timeout);
    budget_disarm(lua);
    if (lua->tasks != NULL) {
        ah_lua_task_finish(lua);
    }
    if (status != 0) {
        /* A coroutine that failed is dead: the next call gets a new one. */
        luaL_unref(lua->L, LUA_REGISTRYINDEX, main->co_ref);
        main->co_ref = LUA_NOREF;
        main->co = NULL;
        lua->main_pinned = 0;
        if (status == LUA_ERRMEM) {
            /* err has the message (the limit's when it refused, else Lua's own) and the
             * traceback (push_task_error) */
            lua_gc(lua->L, LUA_GCCOLLECT, 0); /* give the garbage of the failed call back */
        }
    }
    return status;
}

/* Runs the function below the nargs arguments on top of the main task's coroutine as a call
 * (the body of ah_lua_call_user, shared with the batch's fast path). Stack of the coroutine:
 * [-(nargs + 1), +results] on success (the function's results, as many as it returned),
 * [-(nargs + 1), +0] and the coroutine gone on failure. Returns AH_OK, AH_ELUA or AH_ETIMEOUT
 * (err filled with the message and the traceback). A call that returns without waiting or
 * spawning is one lua_resume and the budget's bookkeeping. */
static inline __attribute__((always_inline)) int call_main_task(ah_lua_t *lua, int nargs, char *err,
                                                                size_t errlen)
{
    task_t *main = lua->main_task;
    budget_arm(lua);
    lua->cancel_code = NULL;
    lua->memory_refused = false;
    lua->drained = false;
    lua->call_err = err;
    lua->call_errlen = errlen;
    main->ended = false;
    lua->current = main;
    lua->memory_armed = lua->memory_limit > 0;
    int status = lua_resume(main->co, nargs);
    lua->memory_armed = false;
    lua->current = NULL;
    if (__builtin_expect(status == 0 && lua->tasks == NULL && lua->ready_head == NULL, 1)) {
        main->ended = true;
        lua->main_status = 0;
        budget_disarm(lua);
        lua->call_err = NULL;
        return AH_OK;
    }
    bool timed_out = false;
    status = call_finish_slow(lua, main, status, &timed_out);
    lua->call_err = NULL;
    if (status == 0) {
        return AH_OK;
    }
    return status != LUA_ERRMEM && timed_out ? AH_ETIMEOUT : AH_ELUA;
}

/* Calls the function below the nargs arguments on top of the stack as the main task of a call,
 * under the time budget and the memory limit, and runs the loop until the call (with all its
 * tasks) has ended. Stack: [-(nargs + 1), +nresults] on success, [-(nargs + 1), +0] on failure;
 * nresults is 0 or 1. Returns 0, AH_ELUA or AH_ETIMEOUT (err filled with the message and the
 * traceback). Lua thread only. */
int ah_lua_call_user(ah_lua_t *lua, int nargs, int nresults, char *err, size_t errlen)
{
    lua_State *co = main_co(lua);
    lua_xmove(lua->L, co, nargs + 1);
    int rc = call_main_task(lua, nargs, err, errlen);
    if (rc == AH_OK) {
        lua_settop(co, lua->main_pinned + nresults);
        lua_xmove(co, lua->L, nresults);
    }
    return rc;
}

/* ---- calls ------------------------------------------------------------------------------- */

int ah_lua_init(ah_lua_t *lua, char *err, size_t errlen)
{
    if (lua->fn_refs[FN_INIT] == LUA_NOREF) {
        return AH_OK;
    }
    lua_State *L = lua->L;
    int top = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, lua->fn_refs[FN_INIT]);
    lua_pushvalue(L, SLOT_CTX);
    int rc = ah_lua_call_user(lua, 1, 0, err, errlen);
    assert(lua_gettop(L) == top);
    (void)top;
    return rc;
}

/* A batch's return value as an item count: a number floored, negative and NaN → 0 (for n ≥ 1
 * the conversion's truncation is the floor). */
static long long items_from_result(lua_State *L, int idx)
{
    if (lua_type(L, idx) != LUA_TNUMBER) {
        return 0;
    }
    lua_Number n = lua_tonumber(L, idx);
    if (!(n >= 1)) {
        return 0;
    }
    if (n >= (lua_Number)LLONG_MAX) {
        return LLONG_MAX;
    }
    return (long long)n;
}

/* Pins the batch function and ctx at the bottom of the main task's coroutine (CO_SLOT_*), which
 * rests with an empty stack between calls until then: the first batch of a state, and the first
 * after a call failed (its coroutine died). Returns the coroutine. */
static __attribute__((noinline)) lua_State *batch_co_pin(ah_lua_t *lua)
{
    lua_State *co = main_co(lua);
    assert(lua_gettop(co) == 0);
    lua_pushvalue(lua->L, SLOT_BATCH);
    lua_pushvalue(lua->L, SLOT_CTX);
    lua_xmove(lua->L, co, 2);
    lua->main_pinned = CO_SLOT_COUNT;
    return co;
}

/* The hot path of the host (an empty batch costs this and the worker's few state reads): the
 * function and ctx are pushed from the coroutine's own pinned slots, the result is read there,
 * so nothing moves between the main state and the coroutine. */
int ah_lua_batch(ah_lua_t *lua, long long *items, char *err, size_t errlen)
{
    *items = 0;
    lua->iteration++;
    lua_State *co = lua->main_task->co;
    if (__builtin_expect(co == NULL || lua->main_pinned == 0, 0)) {
        co = batch_co_pin(lua);
    }
    lua_pushvalue(co, CO_SLOT_BATCH);
    lua_pushvalue(co, CO_SLOT_CTX);
    int rc = call_main_task(lua, 1, err, errlen);
    if (rc == AH_OK) {
        *items = items_from_result(co, CO_SLOT_COUNT + 1); /* LUA_TNONE when nothing returned */
        lua_settop(co, CO_SLOT_COUNT);
    }
    return rc;
}

/* Pushes the ev table for a hook (ev.scope only for a scope's command). Stack: [-0, +1]. */
static void push_event(lua_State *L, const ah_event_t *ev)
{
    char timestamp[AH_TIMESTAMP_LEN];
    ah_format_timestamp(ev->timestamp_us, timestamp);
    lua_createtable(L, 0, 7);
    lua_pushstring(L, ah_command_name(ev->command));
    lua_setfield(L, -2, "command");
    lua_pushnumber(L, (lua_Number)ev->version);
    lua_setfield(L, -2, "version");
    lua_pushstring(L, ev->reason);
    lua_setfield(L, -2, "reason");
    lua_pushstring(L, ev->updated_by);
    lua_setfield(L, -2, "updated_by");
    lua_pushstring(L, timestamp);
    lua_setfield(L, -2, "timestamp");
    lua_pushstring(L, ah_source_name(ev->source));
    lua_setfield(L, -2, "source");
    if (ev->scope[0] != '\0') { /* the scope document that decided it; nil: the cluster's */
        lua_pushstring(L, ev->scope);
        lua_setfield(L, -2, "scope");
    }
    if (ev->drain_ms > 0) {
        lua_pushnumber(L, (lua_Number)ev->drain_ms / 1000.0);
        lua_setfield(L, -2, "drain");
    }
}

/* AH_HOOK_NONE (a transition without a hook) and an undefined hook are no-ops returning 0. */
/* The script function a hook calls, or -1 for AH_HOOK_NONE. */
static int hook_fn(ah_hook_t hook)
{
    switch (hook) {
    case AH_HOOK_PAUSE:
        return FN_ON_PAUSE;
    case AH_HOOK_RESUME:
        return FN_ON_RESUME;
    case AH_HOOK_SHUTDOWN:
        return FN_ON_SHUTDOWN;
    default:
        return -1;
    }
}

const char *ah_lua_hook_name(ah_hook_t hook)
{
    int fn = hook_fn(hook);
    return fn < 0 ? "none" : ah_lua_fn_names[fn];
}

int ah_lua_hook(ah_lua_t *lua, ah_hook_t hook, const ah_event_t *ev, char *err, size_t errlen)
{
    int fn = hook_fn(hook);
    if (fn < 0 || lua->fn_refs[fn] == LUA_NOREF) {
        return AH_OK;
    }
    if (ev == NULL) {
        snprintf(err, errlen, "%s: no event", ah_lua_fn_names[fn]);
        return AH_EINVAL;
    }
    lua_State *L = lua->L;
    int top = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, lua->fn_refs[fn]);
    push_event(L, ev);
    int rc = ah_lua_call_user(lua, 1, 0, err, errlen);
    assert(lua_gettop(L) == top);
    (void)top;
    return rc;
}

int ah_lua_on_reload(ah_lua_t *lua, char *err, size_t errlen)
{
    if (lua->fn_refs[FN_ON_RELOAD] == LUA_NOREF) {
        return AH_OK;
    }
    lua_State *L = lua->L;
    int top = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, lua->fn_refs[FN_ON_RELOAD]);
    lua_pushvalue(L, SLOT_CTX);
    int rc = ah_lua_call_user(lua, 1, 0, err, errlen);
    assert(lua_gettop(L) == top);
    (void)top;
    return rc;
}

/* ah_lua_run_schedule once the script may have schedules (out of line: its frame is large). */
static __attribute__((noinline)) int run_schedule(ah_lua_t *lua, double *next_in, char *err,
                                                  size_t errlen)
{
    lua_State *L = lua->L;
    int top = lua_gettop(L);
    int rc = 0;
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_getfield(L, -1, "agent");
    if (!lua_istable(L, -1)) {
        goto out; /* the script never required agent: no schedules */
    }
    lua_getfield(L, -1, "_due");
    if (!lua_isfunction(L, -1)) {
        goto out;
    }
    /* the host's own code: plain pcall, no user code runs in it */
    if (lua_pcall(L, 0, 2, 0) != 0) {
        snprintf(err, errlen, "agent.every: %s", lua_tostring(L, -1));
        rc = AH_ELUA;
        goto out;
    }
    if (!lua_isfunction(L, -2)) {
        if (lua_isnumber(L, -1)) {
            *next_in = lua_tonumber(L, -1);
        } else if (lua_isnil(L, -2) && lua_isnil(L, -1)) {
            lua->schedules_none = true; /* none now, and agent.every is closed after _due */
        }
        goto out;
    }
    char spec[96] = "";
    lua_getfield(L, -1, "spec");
    ah_strlcpy(spec, lua_isstring(L, -1) ? lua_tostring(L, -1) : "", sizeof(spec));
    lua_pop(L, 1);
    /* with a lease: losing it cancels the run's waits (ah_lua_task.c, on_lease_guard) */
    lua_getfield(L, -1, "lease");
    ah_strlcpy(lua->guard_lease, lua_isstring(L, -1) ? lua_tostring(L, -1) : "",
               sizeof(lua->guard_lease));
    lua_pop(L, 1);
    char msg[AH_ERRLEN * 4];
    rc = ah_lua_call_user(lua, 1, 0, msg, sizeof(msg));
    lua->guard_lease[0] = '\0';
    if (rc == AH_OK) {
        rc = 1;
    } else {
        snprintf(err, errlen, "agent.every(%s): %s", spec, msg);
    }
out:
    lua_settop(L, top);
    return rc;
}

int ah_lua_run_schedule(ah_lua_t *lua, double *next_in, char *err, size_t errlen)
{
    *next_in = -1;
    if (!lua->agent_opened || lua->schedules_none) {
        return 0; /* the script never required agent, or has no schedule: every batch */
    }
    return run_schedule(lua, next_in, err, errlen);
}

bool ah_lua_drained(const ah_lua_t *lua)
{
    return lua != NULL && lua->drained;
}

int ah_lua_release(ah_lua_t *lua, char *err, size_t errlen)
{
    lua_State *L = lua->L;
    int top = lua_gettop(L);
    int rc = AH_OK;
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_getfield(L, -1, "agent");
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "_release");
        if (lua_isfunction(L, -1)) {
            rc = ah_lua_call_user(lua, 0, 0, err, errlen);
        } else {
            lua_pop(L, 1);
        }
    }
    lua_settop(L, top);
    return rc;
}
