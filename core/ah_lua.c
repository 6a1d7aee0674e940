/* The Lua host (see ah_lua.h): one LuaJIT state per agent, with its own libuv loop. Opening runs
 * protected, like luajit.c's pmain: standard libraries, `cjson`, the embedded lua/<name>.lua
 * modules and the C half of the agent module ("agent.core") are registered in package.preload,
 * package.path gets the script's directory first, the script runs and its contract is checked, and
 * its functions are kept as registry refs. Every call of user Lua goes through call_user(), the
 * one wrapper: it arms and disarms the time budget and the memory limit, marks the call in the
 * shared state, runs the function as a coroutine (the call's "main task") and, when that
 * coroutine or a task it spawned waits, runs the loop until all of them have ended; errors become
 * "<error>\n<traceback>". A call that never waits costs one lua_resume and no loop turn.
 *
 * Waiting: a C function that waits registers what it waits for on the running task and yields
 * (lua_yield); a loop callback pushes the results onto the task's coroutine and queues it; only
 * the scheduler (run_loop) resumes tasks, never a libuv or curl callback. At the call's deadline
 * (BATCH_TIMEOUT, a timer on the loop) every wait is cancelled and resumes with nil, msg,
 * "timeout"; ah_lua_interrupt() does the same with "cancelled" through an async handle. Lua code
 * that does not wait is stopped the way luajit.c handles SIGINT: ah_lua_interrupt() signals the
 * Lua thread, whose handler installs a hook unless the call is parked in the loop, and the hook
 * raises the timeout error inside the Lua thread; a call sequence number makes a late interrupt
 * harmless. */
#include "ah_lua.h"

#include "ah_log.h"
#include "ah_curl.h"
#include "ah_mongo.h"
#include "ah_metrics.h"

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include <luajit.h>
#include <uv.h>

#include "lua-cjson.h"

/* The generated table of lua/<name>.lua modules (cmake/embed_lua.cmake), NULL-terminated by name.
 */
typedef struct {
    const char *name; /* the require() name: lua/agent_queue.lua is "agent.queue" */
    const char *file; /* the file under lua/, for the chunk name */
    const unsigned char *data;
    size_t size;
} ah_lua_module_t;
extern const ah_lua_module_t ah_lua_modules[];

/* The script's functions, resolved once after loading. */
enum { FN_INIT = 0, FN_BATCH, FN_ON_PAUSE, FN_ON_RESUME, FN_ON_SHUTDOWN, FN_ON_RELOAD, FN_COUNT };
static const char *const fn_names[FN_COUNT] = {"init",      "batch",       "on_pause",
                                               "on_resume", "on_shutdown", "on_reload"};

/* agent.sleep() never waits longer than this (a year); math.huge means "until woken". */
#define SLEEP_MAX_SECONDS (365.0 * 86400.0)

/* Metatable name of the script's task objects (agent.spawn). */
#define TASK_META "agent.task"
/* Cancellation codes of waits (the third value a cancelled wait returns). */
static const char code_timeout[] = "timeout";
static const char code_cancelled[] = "cancelled";

typedef struct task_s task_t;
typedef struct task_handle_s task_handle_t;

/* What a task is suspended in. */
enum { WAIT_NONE = 0, WAIT_SLEEP, WAIT_JOIN, WAIT_OP };
/* The outcome of a spawned task. */
enum { TASK_RUNNING = 0, TASK_OK, TASK_FAILED };

/* One coroutine of the running call: the call's function (lua->main_task, reused by every call)
 * or a task started by agent.spawn (allocated by spawn, freed when its call ends). Lua thread. */
struct task_s {
    ah_lua_t *lua;
    lua_State *co;         /* NULL when the main task's coroutine died with an error */
    int co_ref;            /* keeps co alive while the task may run */
    task_t *next;          /* lua->tasks (spawned tasks of the running call) */
    task_t *ready_next;    /* lua->ready_head queue */
    bool queued;           /* in the ready queue */
    int resume_nargs;      /* values pushed on co for its next resume */
    int wait;              /* WAIT_* */
    uv_timer_t timer;      /* agent.sleep and task:join's timeout */
    task_t *joining;       /* WAIT_JOIN: the task waited for */
    task_t *joiner;        /* the task waiting in task:join for this one */
    ah_lua_op_t *op;       /* WAIT_OP */
    task_handle_t *handle; /* the script's task object; NULL for the main task */
    int handle_ref;        /* keeps the task object alive while the task runs */
    bool ended;
};

/* The script's task object (full userdata, TASK_META). It outlives its task to keep the
 * outcome for task:join. */
struct task_handle_s {
    task_t *task;    /* NULL once the call that ran it has ended */
    int status;      /* TASK_* */
    int outcome_ref; /* TASK_OK: table {n = N, ...} of results; TASK_FAILED: the message */
    bool joined;     /* the outcome was handed to a join (else a failure is logged) */
};

struct ah_lua_s {
    lua_State *L;
    ah_state_t *state; /* not owned; may be NULL */
    char agent_id[AH_NAME_MAX + 1];
    char *script; /* owned copy of the script path */
    double batch_timeout;
    int fn_refs[FN_COUNT]; /* LUA_NOREF for an undefined optional function */
    int ctx_ref;           /* the ctx table passed to init and batch */
    int traceback_ref;     /* traceback_of, created once (pushing a C function allocates) */
    long long iteration;   /* batch calls so far, including the running one */

    /* Time budget. call_seq is odd while a call of user Lua runs; interrupt_seq holds the
     * call_seq value of the call an interrupt is aimed at (0: none). Both are written by any
     * thread (atomics); the rest is Lua-thread only. */
    _Atomic uint64_t call_seq;
    _Atomic uint64_t interrupt_seq;
    _Atomic uint64_t call_generation; /* the state object's number for the running call */
    _Atomic pthread_t thread;         /* the thread running the calls (the signal's target) */
    atomic_bool hook_set;             /* a hook may be installed: the call's end must remove it */
    atomic_bool signal_sent; /* an interrupt signal may be queued for this state's running call */
    bool timed_out;          /* the running call was stopped by the budget */
    int64_t deadline_us;     /* monotonic deadline of the running call, 0 if none */

    /* agent.mongo's connection (not owned; may be NULL: calls fail "not configured"). */
    ah_lua_mongo_t *mongo;

    /* Only during ah_lua_open(): the script's text (NULL: load lua->script as a file) and the
     * agent.ext functions (not owned). */
    const char *source;
    const ah_lua_function_t *functions;
    size_t function_count;

    /* agent.metrics: the host's registry, or a private one (owned) when none was given. */
    ah_metrics_t *metrics;
    bool metrics_owned;

    /* LUA_MEMORY_LIMIT: bytes allocated by the state, counted by limited_alloc(); the limit is
     * enforced only while user Lua runs (armed), so the host's own pushes never fail. */
    size_t memory_limit;
    size_t memory_used;
    bool memory_armed;

    /* The loop every call runs on, and the tasks of the running call. Lua thread only, except
     * wake (uv_async_send from any thread), cancel_seq and parked (atomics). */
    uv_loop_t loop;
    bool loop_open;
    uv_async_t wake;     /* commands (agent.sleep) and interrupts (cancellation) reach the call */
    uv_timer_t deadline; /* the running call's BATCH_TIMEOUT, armed when the call first waits */
    task_t *main_task;   /* the call's function; its coroutine is reused while it ends well */
    task_t *tasks;       /* spawned tasks of the running call, ended or not */
    task_t *ready_head;  /* tasks to resume, in order */
    task_t *ready_tail;
    int live_tasks;          /* spawned tasks that have not ended */
    task_t *current;         /* the task being resumed, NULL in the loop */
    int main_status;         /* lua_resume status with which the main task ended */
    const char *cancel_code; /* code_timeout | code_cancelled once the call's waits are cancelled */
    char cancel_msg[160];
    char *call_err; /* the running call's error buffer (filled when the main task fails) */
    size_t call_errlen;
    int pending_work;            /* ah_lua_queue_work() jobs not finished yet */
    _Atomic uint64_t cancel_seq; /* call_seq of the call ah_lua_interrupt() asked to cancel */
    atomic_bool parked;          /* the running call is in the loop, not in Lua code */
};

/* Values pinned at the bottom of the main Lua stack for the life of the state, so that the hot
 * path (a batch) pushes them with lua_pushvalue instead of registry lookups. */
enum { SLOT_CTX = 1, SLOT_BATCH, SLOT_COUNT = SLOT_BATCH };

/* Registry key whose value is the ah_lua_t (a light userdata), for the hook. */
static const char registry_key_host = 'h';

static ah_lua_t *host_from_registry(lua_State *L)
{
    lua_pushlightuserdata(L, (void *)&registry_key_host);
    lua_rawget(L, LUA_REGISTRYINDEX);
    ah_lua_t *lua = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return lua;
}

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
    ah_lua_t *lua = host_from_registry(L);
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

/* Marks the start of a call of user Lua: a new odd sequence number, the deadline, the shared
 * state's marker. Lua thread only.
 *
 * There is deliberately no self-check count hook (comparing the clock every N instructions): in
 * LuaJIT installing and removing a hook rewrites the dispatch table, which measured at about
 * +170 ns on an empty batch (~2x the wrapper's own cost), far over the 5% we allow. The watchdog's
 * ah_lua_interrupt() and the deadline in agent.sleep() enforce the budget instead. */
static void budget_arm(ah_lua_t *lua)
{
    int64_t now = ah_mono_coarse_us(); /* one cheap clock read per call */
    /* The generation and the thread are published by the release store of call_seq below. */
    atomic_store_explicit(&lua->call_generation,
                          lua->state != NULL ? ah_state_call_begin_at(lua->state, now) : 0,
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
    lua->deadline_us = 0;
    if (lua->batch_timeout > 0) {
        lua->deadline_us = now + (int64_t)(lua->batch_timeout * 1e6);
    }
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
    lua->deadline_us = 0;
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

/* Aims an interrupt at the call numbered seq (odd): its waits are cancelled by its loop
 * (on_wake), and its thread is signalled so that Lua code it runs is stopped by the hook. A
 * real-time signal is queued once per kill, so interrupts sent in a burst would queue without
 * bound (each delivered on its own, starving the Lua thread): no signal is sent while one sent
 * for this call is still undelivered, since its handler reads interrupt_seq after clearing
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

void ah_lua_wake(ah_lua_t *lua)
{
    if (lua != NULL) {
        uv_async_send(&lua->wake);
    }
}

/* The allocator used when LUA_MEMORY_LIMIT is set: counts every byte and, while user Lua runs,
 * refuses growth beyond the limit (Lua then raises "not enough memory"; the state stays usable).
 * Shrinking and freeing always succeed. */
static void *limited_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    ah_lua_t *lua = ud;
    size_t old = ptr != NULL ? osize : 0;
    if (nsize == 0) {
        free(ptr);
        lua->memory_used -= old;
        return NULL;
    }
    if (nsize > old && lua->memory_armed && lua->memory_used - old + nsize > lua->memory_limit) {
        return NULL;
    }
    void *p = realloc(ptr, nsize);
    if (p == NULL) {
        return NULL;
    }
    lua->memory_used = lua->memory_used - old + nsize;
    return p;
}

/* ---- tasks: coroutines on the loop ------------------------------------------------------- */

/* Queues t to be resumed with the nargs values already pushed on its coroutine. */
static void task_ready(ah_lua_t *lua, task_t *t, int nargs)
{
    t->wait = WAIT_NONE;
    t->resume_nargs = nargs;
    if (t->queued) {
        return;
    }
    t->queued = true;
    t->ready_next = NULL;
    if (lua->ready_tail != NULL) {
        lua->ready_tail->ready_next = t;
    } else {
        lua->ready_head = t;
    }
    lua->ready_tail = t;
}

/* Pushes nil, the cancellation message, its code. Stack: [-0, +3]. */
static int push_cancelled(lua_State *L, ah_lua_t *lua)
{
    lua_pushnil(L);
    lua_pushstring(L, lua->cancel_msg);
    lua_pushstring(L, lua->cancel_code);
    return 3;
}

/* Stops what t waits for, without resuming it. */
static void task_stop_wait(task_t *t)
{
    switch (t->wait) {
    case WAIT_SLEEP:
        uv_timer_stop(&t->timer);
        break;
    case WAIT_JOIN:
        uv_timer_stop(&t->timer);
        if (t->joining != NULL) {
            t->joining->joiner = NULL;
            t->joining = NULL;
        }
        break;
    case WAIT_OP: {
        ah_lua_op_t *op = t->op;
        t->op = NULL;
        if (op != NULL) {
            op->task = NULL;
            op->cancel(op);
        }
        break;
    }
    default:
        break;
    }
    t->wait = WAIT_NONE;
}

/* Cancels every wait of the running call: each resumes with nil, msg, code, and every later wait
 * of the call returns that at once. The first reason stands. task:join is not cancelled (the task
 * it waits for unwinds through its own cancelled waits, and the joiner gets its outcome) unless
 * joins_too: tasks that wait for each other and nothing else. */
static void cancel_waits(ah_lua_t *lua, const char *code, const char *msg, bool joins_too)
{
    if (lua->cancel_code == NULL) {
        lua->cancel_code = code;
        ah_strlcpy(lua->cancel_msg, msg, sizeof(lua->cancel_msg));
    }
    task_t *main = lua->main_task;
    for (task_t *t = main; t != NULL; t = t == main ? lua->tasks : t->next) {
        if (t->ended || t->wait == WAIT_NONE || (t->wait == WAIT_JOIN && !joins_too)) {
            continue;
        }
        task_stop_wait(t);
        lua_checkstack(t->co, 3);
        task_ready(lua, t, push_cancelled(t->co, lua));
    }
}

/* The task allowed to wait on L, i.e. the running task itself (not a coroutine the script
 * created inside it); raises otherwise. */
static task_t *waiting_task(lua_State *L, ah_lua_t *lua, const char *what)
{
    task_t *t = lua != NULL ? lua->current : NULL;
    if (t == NULL || t->co != L) {
        luaL_error(L,
                   "%s: cannot wait here: only the script's functions and tasks started by "
                   "agent.spawn can wait (not a coroutine the script created itself)",
                   what);
    }
    return t;
}

/* Error value of a failed coroutine → "<message>\n<traceback of co>" (luajit.c's traceback).
 * Kept as lua->traceback_ref; arguments: the error value, co (light userdata). */
static int traceback_of(lua_State *L)
{
    lua_State *co = lua_touserdata(L, 2);
    lua_settop(L, 1);
    if (!lua_isstring(L, 1)) { /* non-string error object */
        if (lua_isnoneornil(L, 1) || !luaL_callmeta(L, 1, "__tostring") || !lua_isstring(L, -1)) {
            lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
        }
        lua_replace(L, 1);
        lua_settop(L, 1);
    }
    luaL_traceback(L, co, lua_tostring(L, 1), 0);
    return 1;
}

/* Moves the error value off the dead coroutine co and pushes its message with co's traceback
 * on L. Stack of L: [-0, +1]. */
static void push_task_error(ah_lua_t *lua, lua_State *co, int status)
{
    lua_State *L = lua->L;
    if (status == LUA_ERRMEM && lua->memory_limit > 0) {
        lua_pushfstring(L, "not enough memory: the script exceeded LUA_MEMORY_LIMIT (%d bytes)",
                        (int)(lua->memory_limit > INT_MAX ? INT_MAX : lua->memory_limit));
        return;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, lua->traceback_ref); /* no allocation */
    lua_xmove(co, L, 1);
    lua_pushlightuserdata(L, co);
    if (lua_pcall(L, 2, 1, 0) != 0 || !lua_isstring(L, -1)) {
        lua_pop(L, 1);
        lua_pushliteral(L, "(error while formatting a Lua error)");
    }
}

/* Pushes the outcome of a finished task for task:join on `to`: true, results... or false, msg.
 * Returns the number of values pushed. */
static int push_outcome(lua_State *to, task_handle_t *hd)
{
    hd->joined = true;
    lua_checkstack(to, 3);
    lua_rawgeti(to, LUA_REGISTRYINDEX, hd->outcome_ref);
    if (hd->status == TASK_FAILED) {
        lua_pushboolean(to, 0);
        lua_insert(to, -2);
        return 2;
    }
    lua_getfield(to, -1, "n");
    int n = (int)lua_tointeger(to, -1);
    lua_pop(to, 1);
    if (!lua_checkstack(to, n + 2)) {
        lua_pop(to, 1);
        lua_pushboolean(to, 0);
        lua_pushliteral(to, "task:join: too many results");
        return 2;
    }
    lua_pushboolean(to, 1);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(to, -(i + 1), i); /* the table sits below true and the i - 1 values */
    }
    lua_remove(to, -(n + 2));
    return n + 1;
}

/* A task's coroutine returned or failed (status of lua_resume). */
__attribute__((noinline)) static void task_end(ah_lua_t *lua, task_t *t, int status)
{
    lua_State *L = lua->L;
    t->ended = true;
    if (t == lua->main_task) {
        lua->main_status = status;
        if (status != 0) {
            push_task_error(lua, t->co, status);
            snprintf(lua->call_err, lua->call_errlen, "%s", lua_tostring(L, -1));
            lua_pop(L, 1);
            cancel_waits(lua, code_cancelled,
                         "cancelled: the function that started this task failed", false);
        }
        return;
    }
    lua->live_tasks--;
    task_handle_t *hd = t->handle;
    if (status == 0) {
        int n = lua_gettop(t->co);
        lua_createtable(L, n, 1);
        for (int i = n; i >= 1; i--) {
            lua_xmove(t->co, L, 1);
            lua_rawseti(L, -2, i);
        }
        lua_pushinteger(L, n);
        lua_setfield(L, -2, "n");
        hd->status = TASK_OK;
    } else {
        push_task_error(lua, t->co, status);
        hd->status = TASK_FAILED;
    }
    hd->outcome_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    luaL_unref(L, LUA_REGISTRYINDEX, t->co_ref);
    t->co_ref = LUA_NOREF;
    t->co = NULL;
    task_t *joiner = t->joiner;
    if (joiner != NULL) {
        t->joiner = NULL;
        joiner->joining = NULL;
        uv_timer_stop(&joiner->timer);
        task_ready(lua, joiner, push_outcome(joiner->co, hd));
    }
}

/* Resumes t with nargs values from its stack, under the memory limit. */
static inline void task_resume(ah_lua_t *lua, task_t *t, int nargs)
{
    lua->current = t;
    lua->memory_armed = lua->memory_limit > 0;
    int status = lua_resume(t->co, nargs);
    lua->memory_armed = false;
    lua->current = NULL;
    if (status == 0 && t == lua->main_task) {
        t->ended = true; /* the common case, kept off task_end's path */
        lua->main_status = 0;
    } else if (status != LUA_YIELD) {
        task_end(lua, t, status);
    } else if (t->wait == WAIT_NONE) {
        /* coroutine.yield() in the task itself: the others run first */
        lua_settop(t->co, 0);
        task_ready(lua, t, 0);
    }
}

static void on_deadline(uv_timer_t *timer)
{
    ah_lua_t *lua = timer->data;
    char msg[sizeof(lua->cancel_msg)];
    snprintf(msg, sizeof(msg), "batch timeout: call exceeded BATCH_TIMEOUT (%gs)",
             lua->batch_timeout);
    cancel_waits(lua, code_timeout, msg, false);
}

/* Commands (a wait that ends on a pending command) and interrupts reach the running call here. */
static void on_wake(uv_async_t *handle)
{
    ah_lua_t *lua = handle->data;
    uint64_t seq = atomic_load(&lua->call_seq);
    if ((seq & 1) == 0) {
        return; /* between calls: the next call looks at the state itself */
    }
    if (atomic_load(&lua->cancel_seq) == seq) {
        cancel_waits(lua, code_cancelled, "cancelled: the host stopped this call (shutdown)",
                     false);
    }
    if (lua->state == NULL || !ah_state_sleep(lua->state, 0)) {
        return;
    }
    task_t *main = lua->main_task;
    for (task_t *t = main; t != NULL; t = t == main ? lua->tasks : t->next) {
        if (!t->ended && t->wait == WAIT_SLEEP) {
            uv_timer_stop(&t->timer);
            lua_pushboolean(t->co, 1);
            task_ready(lua, t, 1);
        }
    }
}

/* Runs the loop until the main task and every task it spawned have ended. */
__attribute__((noinline)) static void run_loop(ah_lua_t *lua)
{
    bool deadline_armed = false;
    for (;;) {
        while (lua->ready_head != NULL) {
            task_t *t = lua->ready_head;
            lua->ready_head = t->ready_next;
            if (lua->ready_head == NULL) {
                lua->ready_tail = NULL;
            }
            t->queued = false;
            task_resume(lua, t, t->resume_nargs);
        }
        if (lua->main_task->ended && lua->live_tasks == 0) {
            break;
        }
        if (!deadline_armed) {
            deadline_armed = true;
            if (lua->deadline_us > 0) {
                int64_t left_us = lua->deadline_us - ah_mono_us();
                uint64_t ms = left_us > 0 ? (uint64_t)(left_us + 999) / 1000 : 0;
                uv_update_time(&lua->loop);
                uv_timer_start(&lua->deadline, on_deadline, ms, 0);
            }
        }
        atomic_store(&lua->parked, true);
        int alive = uv_run(&lua->loop, lua->ready_head != NULL ? UV_RUN_NOWAIT : UV_RUN_ONCE);
        atomic_store(&lua->parked, false);
        if (alive == 0 && lua->ready_head == NULL) {
            /* Nothing left that could wake a task (the deadline timer does not count): tasks
             * wait for each other. */
            cancel_waits(lua, code_cancelled,
                         "cancelled: every task of the call waits for another task", true);
        }
    }
    if (deadline_armed) {
        uv_timer_stop(&lua->deadline);
    }
}

static void free_task(uv_handle_t *handle)
{
    free(handle->data);
}

/* The call has ended: reports failed tasks nobody joined, releases every spawned task. */
__attribute__((noinline)) static void finish_tasks(ah_lua_t *lua)
{
    lua_State *L = lua->L;
    task_t *t = lua->tasks;
    lua->tasks = NULL;
    while (t != NULL) {
        task_t *next = t->next;
        task_handle_t *hd = t->handle;
        if (hd->status == TASK_FAILED && !hd->joined) {
            lua_rawgeti(L, LUA_REGISTRYINDEX, hd->outcome_ref);
            ah_log_error("Lua error in a task nobody joined: %s", lua_tostring(L, -1));
            lua_pop(L, 1);
        }
        hd->task = NULL;
        luaL_unref(L, LUA_REGISTRYINDEX, t->handle_ref);
        uv_close((uv_handle_t *)&t->timer, free_task);
        t = next;
    }
    uv_run(&lua->loop, UV_RUN_NOWAIT); /* the close callbacks */
}

/* ---- the one call wrapper ---------------------------------------------------------------- */

/* Calls the function below the nargs arguments on top of the stack as the main task of a call,
 * under the time budget and the memory limit, and runs the loop until the call (with all its
 * tasks) has ended. Stack: [-(nargs + 1), +nresults] on success, [-(nargs + 1), +0] on failure;
 * nresults is 0 or 1. Returns 0, AH_ELUA or AH_ETIMEOUT (err filled with the message and the
 * traceback). Lua thread only. */
static int call_user(ah_lua_t *lua, int nargs, int nresults, char *err, size_t errlen)
{
    lua_State *L = lua->L;
    task_t *main = lua->main_task;
    if (main->co == NULL) {
        main->co = lua_newthread(L);
        main->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_xmove(L, main->co, nargs + 1);
    budget_arm(lua);
    lua->cancel_code = NULL;
    lua->call_err = err;
    lua->call_errlen = errlen;
    main->ended = false;
    task_resume(lua, main, nargs);
    if (!main->ended || lua->tasks != NULL || lua->ready_head != NULL) {
        run_loop(lua);
    }
    int status = lua->main_status;
    bool timed_out = lua->timed_out || (status != 0 && lua->cancel_code == code_timeout);
    budget_disarm(lua);
    if (lua->tasks != NULL) {
        finish_tasks(lua);
    }
    lua->call_err = NULL;
    if (status == 0) {
        if (lua_gettop(main->co) != nresults) {
            lua_settop(main->co, nresults);
        }
        lua_xmove(main->co, L, nresults);
        return AH_OK;
    }
    /* A coroutine that failed is dead: the next call gets a new one. */
    luaL_unref(L, LUA_REGISTRYINDEX, main->co_ref);
    main->co_ref = LUA_NOREF;
    main->co = NULL;
    if (status == LUA_ERRMEM && lua->memory_limit > 0) {
        snprintf(err, errlen,
                 "not enough memory: the script exceeded LUA_MEMORY_LIMIT (%zu bytes; %zu in use)",
                 lua->memory_limit, lua->memory_used);
        lua_gc(L, LUA_GCCOLLECT, 0); /* give the garbage of the failed call back at once */
        return AH_ELUA;
    }
    return timed_out ? AH_ETIMEOUT : AH_ELUA;
}

/* ---- waiting, for C functions (ah_lua.h) ------------------------------------------------- */

uv_loop_t *ah_lua_loop(lua_State *L)
{
    return &host_from_registry(L)->loop;
}

bool ah_lua_can_wait(lua_State *L)
{
    ah_lua_t *lua = host_from_registry(L);
    return lua != NULL && lua->current != NULL && lua->current->co == L;
}

int ah_lua_push_cancelled(lua_State *L)
{
    ah_lua_t *lua = host_from_registry(L);
    return lua->cancel_code != NULL ? push_cancelled(L, lua) : 0;
}

int ah_lua_op_wait(lua_State *L, ah_lua_op_t *op, const char *what)
{
    ah_lua_t *lua = host_from_registry(L);
    task_t *t = waiting_task(L, lua, what);
    if (lua->cancel_code != NULL) {
        op->task = NULL;
        op->cancel(op);
        return push_cancelled(L, lua);
    }
    op->task = t;
    t->op = op;
    t->wait = WAIT_OP;
    return lua_yield(L, 0);
}

void ah_lua_op_done(ah_lua_op_t *op)
{
    task_t *t = op->task;
    if (t == NULL) {
        return;
    }
    op->task = NULL;
    t->op = NULL;
    lua_pushboolean(t->co, 1);
    task_ready(t->lua, t, 1);
}

void ah_lua_op_done_ref(ah_lua_op_t *op, int ref)
{
    task_t *t = op->task;
    if (t == NULL) {
        return;
    }
    op->task = NULL;
    t->op = NULL;
    lua_checkstack(t->co, 2);
    lua_pushboolean(t->co, 1);
    lua_rawgeti(t->co, LUA_REGISTRYINDEX, ref);
    task_ready(t->lua, t, 2);
}

lua_State *ah_lua_main(lua_State *L)
{
    return host_from_registry(L)->L;
}

int ah_lua_queue_work(lua_State *L, uv_work_t *req, uv_work_cb work, uv_after_work_cb after)
{
    ah_lua_t *lua = host_from_registry(L);
    int rc = uv_queue_work(&lua->loop, req, work, after);
    if (rc == 0) {
        lua->pending_work++;
    }
    return rc;
}

void ah_lua_work_finished(uv_work_t *req)
{
    ah_lua_t *lua = req->loop->data;
    lua->pending_work--;
}

/* ---- the agent.core module (C half of `agent`) ------------------------------------------- */

static ah_lua_t *host_upvalue(lua_State *L)
{
    return lua_touserdata(L, lua_upvalueindex(1));
}

static int core_id(lua_State *L)
{
    lua_pushstring(L, host_upvalue(L)->agent_id);
    return 1;
}

static int core_state(lua_State *L)
{
    ah_lua_t *lua = host_upvalue(L);
    lua_pushstring(L, lua->state != NULL ? ah_run_state_name(ah_state_get(lua->state)) : "running");
    return 1;
}

static const char *const log_level_names[] = {"debug", "info", "warn", "error", NULL};
static const ah_log_level_t log_levels[] = {AH_LOG_DEBUG, AH_LOG_INFO, AH_LOG_WARN, AH_LOG_ERROR};

/* core.log(level, msg): logs msg as is. */
static int core_log(lua_State *L)
{
    int level = luaL_checkoption(L, 1, NULL, log_level_names);
    const char *msg = luaL_checkstring(L, 2);
    ah_log(log_levels[level], "%s", msg);
    return 0;
}

/* core.log_enabled(level): lets agent.log skip formatting messages nobody will see. */
static int core_log_enabled(lua_State *L)
{
    int level = luaL_checkoption(L, 1, NULL, log_level_names);
    lua_pushboolean(L, ah_log_enabled(log_levels[level]));
    return 1;
}

static void on_sleep_timer(uv_timer_t *timer)
{
    task_t *t = timer->data;
    lua_pushboolean(t->co, 0);
    task_ready(t->lua, t, 1);
}

/* core.sleep(seconds) -> true if woken early (a command is pending, shutdown or a reload was
 * requested), false if the full time passed; nil, msg, "timeout" | "cancelled" when the call's
 * waits are cancelled. Suspends the calling task on a loop timer. */
static int core_sleep(lua_State *L)
{
    ah_lua_t *lua = host_upvalue(L);
    lua_Number seconds = luaL_checknumber(L, 1);
    luaL_argcheck(L, seconds >= 0, 1, "must be a non-negative number of seconds"); /* NaN too */
    if (seconds > SLEEP_MAX_SECONDS) {
        seconds = SLEEP_MAX_SECONDS;
    }
    task_t *t = waiting_task(L, lua, "agent.sleep");
    if (lua->cancel_code != NULL) {
        return push_cancelled(L, lua);
    }
    if (lua->state != NULL && ah_state_sleep(lua->state, 0)) {
        lua_pushboolean(L, 1);
        return 1;
    }
    uv_update_time(&lua->loop); /* the loop does not run between calls: its clock is stale */
    uv_timer_start(&t->timer, on_sleep_timer, (uint64_t)ceil(seconds * 1000.0), 0);
    t->wait = WAIT_SLEEP;
    return lua_yield(L, 0);
}

/* core.spawn(fn, ...) -> task: a new task of the running call, started at the loop's next turn
 * with the arguments. Raises outside a call (misuse). */
static int core_spawn(lua_State *L)
{
    ah_lua_t *lua = host_upvalue(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (lua->current == NULL) {
        return luaL_error(L, "agent.spawn: only during a call of the script");
    }
    int nargs = lua_gettop(L) - 1;
    task_handle_t *hd = lua_newuserdata(L, sizeof(*hd));
    *hd = (task_handle_t){.status = TASK_RUNNING, .outcome_ref = LUA_NOREF};
    luaL_getmetatable(L, TASK_META);
    lua_setmetatable(L, -2);
    lua_State *co = lua_newthread(L);
    if (!lua_checkstack(co, nargs + 1)) {
        return luaL_error(L, "agent.spawn: too many arguments");
    }
    for (int i = 1; i <= nargs + 1; i++) {
        lua_pushvalue(L, i);
    }
    lua_xmove(L, co, nargs + 1);
    int co_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* pops the thread */
    lua_pushvalue(L, -1);
    int handle_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    task_t *t = calloc(1, sizeof(*t));
    if (t == NULL) {
        luaL_unref(L, LUA_REGISTRYINDEX, handle_ref);
        luaL_unref(L, LUA_REGISTRYINDEX, co_ref);
        return luaL_error(L, "agent.spawn: out of memory");
    }
    t->lua = lua;
    t->co = co;
    t->co_ref = co_ref;
    t->handle = hd;
    t->handle_ref = handle_ref;
    uv_timer_init(&lua->loop, &t->timer);
    t->timer.data = t;
    t->next = lua->tasks;
    lua->tasks = t;
    lua->live_tasks++;
    hd->task = t;
    task_ready(lua, t, nargs);
    return 1;
}

static void on_join_timer(uv_timer_t *timer)
{
    task_t *t = timer->data;
    if (t->joining != NULL) {
        t->joining->joiner = NULL;
        t->joining = NULL;
    }
    lua_checkstack(t->co, 3);
    lua_pushnil(t->co);
    lua_pushliteral(t->co, "task:join: the task did not end in time");
    lua_pushstring(t->co, code_timeout);
    task_ready(t->lua, t, 3);
}

/* task:join([timeout]) -> true, results... | false, error message; nil, msg, "timeout" when
 * the timeout passed first (the task keeps running); nil, msg, "cancelled" when every task of
 * the call waits for another one. Upvalue 1: the ah_lua_t. */
static int task_join(lua_State *L)
{
    ah_lua_t *lua = host_upvalue(L);
    task_handle_t *hd = luaL_checkudata(L, 1, TASK_META);
    double timeout = -1;
    if (!lua_isnoneornil(L, 2)) {
        timeout = luaL_checknumber(L, 2);
        luaL_argcheck(L, timeout >= 0, 2, "must be a non-negative number of seconds");
    }
    if (hd->status != TASK_RUNNING) {
        return push_outcome(L, hd);
    }
    task_t *self = waiting_task(L, lua, "task:join");
    task_t *target = hd->task;
    if (target == self) {
        return luaL_error(L, "task:join: a task cannot join itself");
    }
    if (target->joiner != NULL) {
        return luaL_error(L, "task:join: another task already waits for this task");
    }
    /* Not cut short when the call's waits are cancelled: the task unwinds through its own
     * cancelled waits and the joiner gets its outcome. */
    target->joiner = self;
    self->joining = target;
    self->wait = WAIT_JOIN;
    if (timeout >= 0) {
        if (timeout > SLEEP_MAX_SECONDS) {
            timeout = SLEEP_MAX_SECONDS;
        }
        uv_update_time(&lua->loop);
        uv_timer_start(&self->timer, on_join_timer, (uint64_t)ceil(timeout * 1000.0), 0);
    }
    return lua_yield(L, 0);
}

/* __gc of a task object: its task has ended (a running task keeps its object alive). */
static int task_gc(lua_State *L)
{
    task_handle_t *hd = lua_touserdata(L, 1);
    if (hd != NULL && hd->outcome_ref != LUA_NOREF) {
        luaL_unref(L, LUA_REGISTRYINDEX, hd->outcome_ref);
        hd->outcome_ref = LUA_NOREF;
    }
    return 0;
}

/* Creates the task objects' metatable (TASK_META). Stack: [-0, +0]. */
static void register_task_meta(lua_State *L, ah_lua_t *lua)
{
    luaL_newmetatable(L, TASK_META);
    lua_createtable(L, 0, 1);
    lua_pushlightuserdata(L, lua);
    lua_pushcclosure(L, task_join, 1);
    lua_setfield(L, -2, "join");
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, task_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushliteral(L, "agent.task");
    lua_setfield(L, -2, "__name");
    lua_pop(L, 1);
}

/* core.shutdown([reason]) -> true: asks for a local shutdown of this agent (final, like SIGTERM):
 * the running call finishes, then on_shutdown runs and the process exits 0. Without a state
 * (agenthost check) it does nothing and returns false. */
static int core_shutdown(lua_State *L)
{
    ah_lua_t *lua = host_upvalue(L);
    const char *reason = luaL_optstring(L, 1, "requested by the script");
    if (lua->state == NULL) {
        lua_pushboolean(L, 0);
        return 1;
    }
    ah_state_offer_local(lua->state, AH_CMD_SHUTDOWN, AH_SOURCE_LOCAL, reason, "script");
    lua_pushboolean(L, 1);
    return 1;
}

static int core_should_stop(lua_State *L)
{
    ah_lua_t *lua = host_upvalue(L);
    lua_pushboolean(L, lua->state != NULL && ah_state_should_stop(lua->state));
    return 1;
}

/* core.env(name, default) -> the variable's value, or default (any value, nil if absent). */
static int core_env(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    lua_settop(L, 2);
    const char *value = getenv(name);
    if (value != NULL) {
        lua_pushstring(L, value);
    }
    return 1;
}

static int core_now(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)ah_now_us() / 1e6);
    return 1;
}

static int core_monotonic(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)ah_mono_us() / 1e6);
    return 1;
}

/* agent.core.metric_declare(kind, name [, help]) -> index; kind "counter" | "gauge". A bad
 * name is API misuse and raises. */
static int core_metric_declare(lua_State *L)
{
    static const char *const kinds[] = {"counter", "gauge", NULL};
    ah_lua_t *lua = host_upvalue(L);
    int kind = luaL_checkoption(L, 1, NULL, kinds);
    const char *name = luaL_checkstring(L, 2);
    const char *help = luaL_optstring(L, 3, "");
    char err[AH_ERRLEN];
    int index = ah_metrics_declare(lua->metrics, kind == 0 ? AH_METRIC_COUNTER : AH_METRIC_GAUGE,
                                   name, help, err, sizeof(err));
    if (index < 0) {
        return luaL_error(L, "agent.metrics: %s", err);
    }
    lua_pushinteger(L, index);
    return 1;
}

/* agent.core.metric_update(index, "add" | "set", value) */
static int core_metric_update(lua_State *L)
{
    ah_lua_t *lua = host_upvalue(L);
    int index = luaL_checkint(L, 1);
    const char *op = luaL_checkstring(L, 2);
    lua_Number value = luaL_checknumber(L, 3);
    if (op[0] == 's') {
        ah_metrics_set(lua->metrics, index, value);
    } else {
        ah_metrics_add(lua->metrics, index, value);
    }
    return 0;
}

static int core_metric_get(lua_State *L)
{
    ah_lua_t *lua = host_upvalue(L);
    lua_pushnumber(L, ah_metrics_get(lua->metrics, luaL_checkint(L, 1)));
    return 1;
}

/* agent.core.memory() -> bytes the state uses (Lua's own count), the limit (0: none). */
static int core_memory(lua_State *L)
{
    ah_lua_t *lua = host_upvalue(L);
    lua_pushnumber(L, (lua_Number)lua_gc(L, LUA_GCCOUNT, 0) * 1024.0 + lua_gc(L, LUA_GCCOUNTB, 0));
    lua_pushnumber(L, (lua_Number)lua->memory_limit);
    return 2;
}

static const luaL_Reg core_functions[] = {
    {"metric_declare", core_metric_declare},
    {"metric_update", core_metric_update},
    {"metric_get", core_metric_get},
    {"memory", core_memory},
    {"id", core_id},
    {"state", core_state},
    {"log", core_log},
    {"log_enabled", core_log_enabled},
    {"sleep", core_sleep},
    {"spawn", core_spawn},
    {"should_stop", core_should_stop},
    {"shutdown", core_shutdown},
    {"env", core_env},
    {"now", core_now},
    {"monotonic", core_monotonic},
    {NULL, NULL},
};

/* package.preload["agent.core"]; upvalue 1 is the ah_lua_t. Stack: [-0, +1]. */
static int open_agent_core(lua_State *L)
{
    lua_newtable(L);
    lua_pushvalue(L, lua_upvalueindex(1));
    luaL_setfuncs(L, core_functions, 1);
    return 1;
}

/* ---- opening ----------------------------------------------------------------------------- */

/* package.preload["agent"] wrapper: upvalue 1 is the embedded loader, upvalue 2 the agent.ext
 * table, stored as agent.ext in the module it returns. Stack: [-n, +1]. */
static int open_agent_with_ext(lua_State *L)
{
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    if (lua_istable(L, -1)) {
        lua_pushliteral(L, "ext");
        lua_pushvalue(L, lua_upvalueindex(2));
        lua_rawset(L, -3);
    }
    return 1;
}

/* Builds the agent.ext table from lua->functions (each a closure over its ud), stores it as
 * package.loaded["agent.ext"] and wraps package.preload["agent"] so that the module carries it.
 * Stack: [-0, +0]. */
static void register_ext(lua_State *L, ah_lua_t *lua)
{
    lua_createtable(L, 0, (int)lua->function_count);
    int ext = lua_gettop(L);
    for (size_t i = 0; i < lua->function_count; i++) {
        const ah_lua_function_t *f = &lua->functions[i];
        if (f->name == NULL || f->fn == NULL) {
            luaL_error(L, "agent.ext: function %d has no name or no function", (int)i + 1);
        }
        lua_pushlightuserdata(L, f->ud);
        lua_pushcclosure(L, f->fn, 1);
        lua_setfield(L, ext, f->name);
    }
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_pushvalue(L, ext);
    lua_setfield(L, -2, "agent.ext");
    lua_getfield(L, -2, "preload");
    lua_getfield(L, -1, "agent");
    if (lua_isfunction(L, -1)) {
        lua_pushvalue(L, ext);
        lua_pushcclosure(L, open_agent_with_ext, 2);
        lua_setfield(L, -2, "agent");
    } else {
        lua_pop(L, 1);
    }
    lua_settop(L, ext - 1);
}

/* Sets package.path to "<dir>/?.lua;<dir>/?/init.lua;" + the current path (LuaJIT's default,
 * or LUA_PATH) [+ ";<install dir>/?.lua;<install dir>/?/init.lua"]. Stack: [-0, +0]. */
static void set_package_path(lua_State *L, const char *script_path)
{
    const char *slash = strrchr(script_path, '/');
    if (slash == NULL) {
        lua_pushliteral(L, ".");
    } else if (slash == script_path) {
        lua_pushliteral(L, "");
    } else {
        lua_pushlstring(L, script_path, (size_t)(slash - script_path));
    }
    const char *dir = lua_tostring(L, -1);

    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    const char *old_path = lua_tostring(L, -1);
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", dir, dir, old_path != NULL ? old_path : "");
#ifdef AH_LUA_INSTALL_DIR
    lua_pushliteral(L, ";" AH_LUA_INSTALL_DIR "/?.lua;" AH_LUA_INSTALL_DIR "/?/init.lua");
    lua_concat(L, 2);
#endif
    lua_setfield(L, -3, "path");
    lua_pop(L, 3); /* old path, package, dir */
}

/* Registers cjson, agent.core and every embedded lua/<name>.lua module in package.preload.
 * Stack: [-0, +0]; raises on a broken embedded module (a build bug). */
static void register_preloads(lua_State *L, ah_lua_t *lua)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");

    lua_pushcfunction(L, luaopen_cjson);
    lua_setfield(L, -2, "cjson");

    lua_pushlightuserdata(L, lua);
    lua_pushcclosure(L, open_agent_core, 1);
    lua_setfield(L, -2, "agent.core");

    lua_pushlightuserdata(L, lua->mongo);
    lua_pushcclosure(L, ah_lua_mongo_open, 1);
    lua_setfield(L, -2, "agent.mongo");

    lua_pushcfunction(L, ah_lua_http_open);
    lua_setfield(L, -2, "agent.http.core");

    for (const ah_lua_module_t *m = ah_lua_modules; m->name != NULL; m++) {
        lua_pushfstring(L, "@lua/%s", m->file);
        if (luaL_loadbuffer(L, (const char *)m->data, m->size, lua_tostring(L, -1)) != 0) {
            lua_error(L);
        }
        lua_setfield(L, -3, m->name);
        lua_pop(L, 1); /* chunkname */
    }
    lua_pop(L, 2); /* preload, package */
}

/* Checks the table on top of the stack (the script's return value) and keeps its functions as
 * registry refs. Raises "<path>: ..." on a contract violation. Stack: [-0, +0]. */
static void resolve_functions(lua_State *L, ah_lua_t *lua)
{
    int module = lua_gettop(L);
    for (int i = 0; i < FN_COUNT; i++) {
        lua_getfield(L, module, fn_names[i]);
        if (lua_isfunction(L, -1)) {
            lua->fn_refs[i] = luaL_ref(L, LUA_REGISTRYINDEX);
            continue;
        }
        if (i == FN_BATCH) {
            if (lua_isnil(L, -1)) {
                luaL_error(L, "%s: script does not define function batch", lua->script);
            }
            luaL_error(L, "%s: batch must be a function (got %s)", lua->script,
                       luaL_typename(L, -1));
        }
        if (!lua_isnil(L, -1)) {
            luaL_error(L, "%s: %s must be a function (got %s)", lua->script, fn_names[i],
                       luaL_typename(L, -1));
        }
        lua_pop(L, 1);
    }
}

/* Levenshtein distance between two short names (at most 32 bytes each; longer: a large value). */
static size_t name_distance(const char *a, const char *b)
{
    size_t la = strlen(a);
    size_t lb = strlen(b);
    if (la > 32 || lb > 32) {
        return SIZE_MAX;
    }
    size_t row[33];
    for (size_t j = 0; j <= lb; j++) {
        row[j] = j;
    }
    for (size_t i = 1; i <= la; i++) {
        size_t diagonal = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t above = row[j];
            size_t best = diagonal + (a[i - 1] != b[j - 1]);
            if (above + 1 < best) {
                best = above + 1;
            }
            if (row[j - 1] + 1 < best) {
                best = row[j - 1] + 1;
            }
            row[j] = best;
            diagonal = above;
        }
    }
    return row[lb];
}

/* Warns about every "on_*" key of the script's table (on top of the stack) that names no hook:
 * a misspelled hook would otherwise never run. Suggests the closest hook within two edits.
 * Stack: [-0, +0]. */
static void warn_unknown_hooks(lua_State *L, const ah_lua_t *lua)
{
    int module = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, module) != 0) {
        lua_pop(L, 1); /* the value */
        if (lua_type(L, -1) != LUA_TSTRING) {
            continue;
        }
        const char *key = lua_tostring(L, -1);
        if (strncmp(key, "on_", 3) != 0) {
            continue;
        }
        const char *closest = NULL;
        size_t best = 3;
        bool known = false;
        for (int i = 0; i < FN_COUNT; i++) {
            size_t d = name_distance(key, fn_names[i]);
            known = known || d == 0;
            if (d < best) {
                best = d;
                closest = fn_names[i];
            }
        }
        if (known) {
            continue;
        }
        if (closest != NULL) {
            ah_log_warn("%s: the script's table has '%s', which is not a hook (did you mean "
                        "'%s'?)",
                        lua->script, key, closest);
        } else {
            ah_log_warn("%s: the script's table has '%s', which is not a hook (hooks: on_pause, "
                        "on_resume, on_shutdown, on_reload)",
                        lua->script, key);
        }
    }
}

/* ctx's __index: ctx.iteration is computed on access, so a batch does not pay for a table
 * write it rarely needs. Upvalue 1: the ah_lua_t. */
static int ctx_index(lua_State *L)
{
    const char *key = lua_tostring(L, 2);
    if (key != NULL && strcmp(key, "iteration") == 0) {
        ah_lua_t *lua = lua_touserdata(L, lua_upvalueindex(1));
        lua_pushnumber(L, (lua_Number)lua->iteration);
        return 1;
    }
    return 0;
}

/* Creates the ctx table {agent_id, script, iteration (computed)} as lua->ctx_ref. */
static void create_ctx(lua_State *L, ah_lua_t *lua)
{
    lua_createtable(L, 0, 2);
    lua_pushstring(L, lua->agent_id);
    lua_setfield(L, -2, "agent_id");
    lua_pushstring(L, lua->script);
    lua_setfield(L, -2, "script");
    lua_createtable(L, 0, 1);
    lua_pushlightuserdata(L, lua);
    lua_pushcclosure(L, ctx_index, 1);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, -2);
    lua->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* The protected part of ah_lua_open() (lua_cpcall, like luajit.c's pmain): every error,
 * including out of memory, becomes the message on top of the stack. */
static int open_protected(lua_State *L)
{
    ah_lua_t *lua = lua_touserdata(L, 1);
    lua_settop(L, 0);

    lua_gc(L, LUA_GCSTOP, 0);
    luaL_openlibs(L);
    lua_gc(L, LUA_GCRESTART, -1);

    lua_pushlightuserdata(L, (void *)&registry_key_host);
    lua_pushlightuserdata(L, lua);
    lua_rawset(L, LUA_REGISTRYINDEX);

    lua_pushcfunction(L, traceback_of);
    lua->traceback_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    register_task_meta(L, lua);
    register_preloads(L, lua);
    register_ext(L, lua);
    set_package_path(L, lua->script);
    create_ctx(L, lua);

    int status;
    if (lua->source != NULL) {
        lua_pushfstring(L, "@%s", lua->script);
        status = luaL_loadbuffer(L, lua->source, strlen(lua->source), lua_tostring(L, -1));
        lua_remove(L, -2); /* chunkname */
    } else {
        status = luaL_loadfile(L, lua->script);
    }
    if (status != 0) {
        /* Lua's own message: "path:line: problem", or "cannot open path: <strerror>" */
        lua_error(L);
    }
    char err[AH_ERRLEN];
    if (call_user(lua, 0, 1, err, sizeof(err)) != AH_OK) {
        lua_pushstring(L, err);
        lua_error(L);
    }
    if (!lua_istable(L, -1)) {
        luaL_error(L, "%s: script must return a table (got %s)", lua->script, luaL_typename(L, -1));
    }
    resolve_functions(L, lua);
    warn_unknown_hooks(L, lua);
    return 0;
}

static void close_walk(uv_handle_t *handle, void *arg)
{
    if (!uv_is_closing(handle)) {
        uv_close(handle, NULL);
    }
}

/* Closes every handle left on the loop (the main task's timer, the async handle, the deadline,
 * anything a module failed to close) and the loop itself, then frees the main task. */
static void loop_close(ah_lua_t *lua)
{
    if (!lua->loop_open) {
        return;
    }
    lua->loop_open = false;
    uv_walk(&lua->loop, close_walk, NULL);
    uv_run(&lua->loop, UV_RUN_DEFAULT);
    int rc = uv_loop_close(&lua->loop);
    if (rc != 0) {
        ah_log_error("internal: the Lua worker's loop did not close: %s", uv_strerror(rc));
    }
    assert(rc == 0);
    free(lua->main_task);
    lua->main_task = NULL;
}

/* Opens the loop with its long-lived handles and the main task. */
static int loop_open(ah_lua_t *lua, char *err, size_t errlen)
{
    lua->main_task = calloc(1, sizeof(*lua->main_task));
    if (lua->main_task == NULL) {
        snprintf(err, errlen, "out of memory");
        return AH_ENOMEM;
    }
    int rc = uv_loop_init(&lua->loop);
    if (rc != 0) {
        snprintf(err, errlen, "uv_loop_init: %s", uv_strerror(rc));
        free(lua->main_task);
        lua->main_task = NULL;
        return AH_EIO;
    }
    lua->loop_open = true;
    lua->loop.data = lua;
    rc = uv_async_init(&lua->loop, &lua->wake, on_wake);
    if (rc != 0) {
        snprintf(err, errlen, "uv_async_init: %s", uv_strerror(rc));
        loop_close(lua);
        return AH_EIO;
    }
    lua->wake.data = lua;
    uv_unref((uv_handle_t *)&lua->wake); /* only tasks' own waits keep the loop alive */
    uv_timer_init(&lua->loop, &lua->deadline);
    lua->deadline.data = lua;
    uv_unref((uv_handle_t *)&lua->deadline);
    task_t *main = lua->main_task;
    main->lua = lua;
    main->co_ref = LUA_NOREF;
    main->handle_ref = LUA_NOREF;
    main->ended = true;
    uv_timer_init(&lua->loop, &main->timer);
    main->timer.data = main;
    return AH_OK;
}

ah_lua_t *ah_lua_open(const ah_lua_options_t *opts, const char *script_path, char *err,
                      size_t errlen)
{
    ah_lua_t *lua = calloc(1, sizeof(*lua));
    if (lua == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    ah_strlcpy(lua->agent_id, opts->agent_id, sizeof(lua->agent_id));
    lua->state = opts->state;
    lua->mongo = opts->mongo;
    lua->batch_timeout = opts->batch_timeout;
    lua->source = opts->script_source;
    lua->functions = opts->functions;
    lua->function_count = opts->functions != NULL ? opts->function_count : 0;
    if (lua->source != NULL) {
        script_path = opts->script_name != NULL ? opts->script_name : "script";
    }
    lua->ctx_ref = LUA_NOREF;
    lua->traceback_ref = LUA_NOREF;
    for (int i = 0; i < FN_COUNT; i++) {
        lua->fn_refs[i] = LUA_NOREF;
    }
    atomic_init(&lua->call_seq, 0);
    atomic_init(&lua->interrupt_seq, 0);
    atomic_init(&lua->call_generation, 0);
    atomic_init(&lua->thread, pthread_self());
    pthread_once(&interrupt_signal_once, install_interrupt_signal);
    atomic_init(&lua->hook_set, false);
    atomic_init(&lua->signal_sent, false);
    atomic_init(&lua->cancel_seq, 0);
    atomic_init(&lua->parked, false);

    lua->script = strdup(script_path);
    if (lua->script == NULL) {
        snprintf(err, errlen, "out of memory");
        goto fail_free;
    }
    if (loop_open(lua, err, errlen) != AH_OK) {
        goto fail_loop;
    }
    lua->memory_limit = opts->memory_limit;
    lua->metrics = opts->metrics;
    if (lua->metrics == NULL) {
        lua->metrics = ah_metrics_new();
        lua->metrics_owned = true;
        if (lua->metrics == NULL) {
            snprintf(err, errlen, "out of memory");
            goto fail_script;
        }
    }
    /* LuaJIT's own allocator is faster; the counting one is used only when a limit is set. */
    lua->L = lua->memory_limit > 0 ? lua_newstate(limited_alloc, lua) : luaL_newstate();
    if (lua->L == NULL) {
        snprintf(err, errlen, "cannot create a Lua state: out of memory");
        goto fail_script;
    }
    if (lua_cpcall(lua->L, open_protected, lua) != 0) {
        const char *msg = lua_tostring(lua->L, -1);
        snprintf(err, errlen, "%s", msg != NULL ? msg : "(error object is not a string)");
        goto fail_state;
    }
    assert(lua_gettop(lua->L) == 0);
    lua->source = NULL;
    lua->functions = NULL;
    lua->function_count = 0;
    /* Pin the hot values (see SLOT_*); these pushes need no protection (no allocation). */
    lua_rawgeti(lua->L, LUA_REGISTRYINDEX, lua->ctx_ref);
    lua_rawgeti(lua->L, LUA_REGISTRYINDEX, lua->fn_refs[FN_BATCH]);
    assert(lua_gettop(lua->L) == SLOT_COUNT);
    return lua;

fail_state:
    lua_close(lua->L);
fail_script:
    if (lua->metrics_owned) {
        ah_metrics_free(lua->metrics);
    }
    loop_close(lua);
fail_loop:
    free(lua->script);
fail_free:
    free(lua);
    return NULL;
}

void ah_lua_close(ah_lua_t *lua)
{
    if (lua == NULL) {
        return;
    }
    /* Background work (a driver call whose wait was cancelled) may still use memory the state
     * owns: let it finish first. */
    while (lua->pending_work > 0) {
        uv_run(&lua->loop, UV_RUN_ONCE);
    }
    lua_close(lua->L); /* then: __gc of modules' objects may close their handles */
    loop_close(lua);
    if (lua->metrics_owned) {
        ah_metrics_free(lua->metrics);
    }
    free(lua->script);
    free(lua);
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
    int rc = call_user(lua, 1, 0, err, errlen);
    assert(lua_gettop(L) == top);
    (void)top;
    return rc;
}

/* A batch's return value as an item count: a number floored, negative and NaN → 0. */
static long long items_from_result(lua_State *L, int idx)
{
    if (lua_type(L, idx) != LUA_TNUMBER) {
        return 0;
    }
    lua_Number n = floor(lua_tonumber(L, idx));
    if (!(n > 0)) {
        return 0;
    }
    if (n >= (lua_Number)LLONG_MAX) {
        return LLONG_MAX;
    }
    return (long long)n;
}

int ah_lua_batch(ah_lua_t *lua, long long *items, char *err, size_t errlen)
{
    lua_State *L = lua->L;
    int top = lua_gettop(L);
    *items = 0;

    lua->iteration++;

    lua_pushvalue(L, SLOT_BATCH);
    lua_pushvalue(L, SLOT_CTX);
    int rc = call_user(lua, 1, 1, err, errlen);
    if (rc == AH_OK) {
        *items = items_from_result(L, -1);
        lua_pop(L, 1);
    }
    assert(lua_gettop(L) == top);
    (void)top;
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
    return fn < 0 ? "none" : fn_names[fn];
}

int ah_lua_hook(ah_lua_t *lua, ah_hook_t hook, const ah_event_t *ev, char *err, size_t errlen)
{
    int fn = hook_fn(hook);
    if (fn < 0 || lua->fn_refs[fn] == LUA_NOREF) {
        return AH_OK;
    }
    if (ev == NULL) {
        snprintf(err, errlen, "%s: no event", fn_names[fn]);
        return AH_EINVAL;
    }
    lua_State *L = lua->L;
    int top = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, lua->fn_refs[fn]);
    push_event(L, ev);
    int rc = call_user(lua, 1, 0, err, errlen);
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
    int rc = call_user(lua, 1, 0, err, errlen);
    assert(lua_gettop(L) == top);
    (void)top;
    return rc;
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
            rc = call_user(lua, 0, 0, err, errlen);
        } else {
            lua_pop(L, 1);
        }
    }
    lua_settop(L, top);
    return rc;
}
