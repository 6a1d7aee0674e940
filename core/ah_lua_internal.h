/* Internal to the Lua host (core/ah_lua*.c), not an API for other modules: the state object
 * (struct ah_lua_s), its tasks, and what the host's files use of each other. The host is split
 * by job, each file calling only downwards:
 *
 * - core/ah_lua.c (ah_lua_open, ah_lua_close): opening — the state, its loop, the preloaded
 *   modules, loading the script and resolving its functions;
 * - core/ah_lua_call.c (ah_lua_call_*): calls — the time budget, interrupts, and the one call
 *   wrapper every call of user Lua goes through (ah_lua_call_user), with init, batch, hooks;
 * - core/ah_lua_core.c (ah_lua_core_*): the `agent.core` module, the C half of `agent`;
 * - core/ah_lua_task.c (ah_lua_task_*): tasks and waits — coroutines on the loop, the scheduler,
 *   cancellation, and waiting for C functions (ah_lua.h).
 *
 * Everything here is Lua-thread only unless a field says otherwise. */
#ifndef AH_LUA_INTERNAL_H
#define AH_LUA_INTERNAL_H

#include "ah_lua.h"
#include "ah_metrics.h"
#include "ah_mongo.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

/* The script's functions, resolved once after loading. */
enum { FN_INIT = 0, FN_BATCH, FN_ON_PAUSE, FN_ON_RESUME, FN_ON_SHUTDOWN, FN_ON_RELOAD, FN_COUNT };
/* Their names in the script's table, by FN_*. */
extern const char *const ah_lua_fn_names[FN_COUNT];

/* Cancellation codes of waits (the third value a cancelled wait returns); lua->cancel_code is
 * one of these two pointers. */
extern const char ah_lua_code_timeout[];
extern const char ah_lua_code_cancelled[];

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
    bool cancelled; /* task:cancel(): its waits resume (and later ones return) "cancelled" */
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
    int traceback_ref;     /* ah_lua_traceback_of, created once (pushing a C function allocates) */
    long long iteration;   /* batch calls so far, including the running one */
    /* agent.every: the worker asks agent._due between batches only once the `agent` module's C
     * half was opened (agent_opened), and no more once _due found no schedule (schedules_none:
     * agent.every is refused from then on), so an empty batch pays no lookup for it. */
    bool agent_opened;
    bool schedules_none;

    /* Time budget. call_seq is odd while a call of user Lua runs; interrupt_seq holds the
     * call_seq value of the call an interrupt is aimed at (0: none). Both are written by any
     * thread (atomics); the rest is Lua-thread only. */
    _Atomic uint64_t call_seq;
    _Atomic uint64_t interrupt_seq;
    _Atomic uint64_t call_generation; /* the state object's number for the running call */
    _Atomic pthread_t thread;         /* the thread running the calls (the signal's target) */
    atomic_bool hook_set;             /* a hook may be installed: the call's end must remove it */
    atomic_bool signal_sent;  /* an interrupt signal may be queued for this state's running call */
    bool timed_out;           /* the running call was stopped by the budget */
    int64_t batch_timeout_us; /* batch_timeout in µs, 0 if none: the deadline of a call that
                                 waits is its stamp (ah_state_call_stamp) + batch_timeout_us */

    /* agent.mongo's connection (not owned; may be NULL: calls fail "not configured"). */
    ah_lua_mongo_t *mongo;
    /* The host's lease keeper for agent.lease / agent.every (not owned; may be NULL). */
    struct ah_leases_s *leases;

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
    /* "file:line: " of the Lua code whose allocation the limit refused last (limited_alloc),
     * for the error message: after the throw the innermost frame's line is gone. */
    char memory_where[256];
    bool memory_armed;
    bool memory_refused; /* the limit refused an allocation during the current call */

    /* The loop every call runs on, and the tasks of the running call. Lua thread only, except
     * wake (uv_async_send from any thread), cancel_seq and parked (atomics). */
    uv_loop_t loop;
    bool loop_open;
    uv_async_t wake;     /* commands (agent.sleep) and interrupts (cancellation) reach the call */
    uv_timer_t deadline; /* the running call's BATCH_TIMEOUT, armed when the call first waits */
    task_t *main_task;   /* the call's function; its coroutine is reused while it ends well */
    int main_pinned;     /* values pinned at the bottom of main_task->co: 0, or CO_SLOT_COUNT */
    task_t *tasks;       /* spawned tasks of the running call, ended or not */
    task_t *ready_head;  /* tasks to resume, in order */
    task_t *ready_tail;
    int live_tasks;          /* spawned tasks that have not ended */
    task_t *current;         /* the task being resumed, NULL in the loop */
    int main_status;         /* lua_resume status with which the main task ended */
    const char *cancel_code; /* ah_lua_code_timeout | ah_lua_code_cancelled once the call's waits
                                are cancelled */
    char cancel_msg[160];
    char *call_err; /* the running call's error buffer (filled when the main task fails) */
    size_t call_errlen;
    int pending_work;            /* ah_lua_queue_work() jobs not finished yet */
    _Atomic uint64_t cancel_seq; /* call_seq of the call ah_lua_interrupt() asked to cancel */
    atomic_bool parked;          /* the running call is in the loop, not in Lua code */
    /* the call (its generation) whose waits the deadline timer cut, and when: the watchdog
     * lets it unwind (ah_lua_unwinding_call) */
    _Atomic uint64_t deadline_generation;
    _Atomic int64_t deadline_fired_us;

    /* Drains (cold: kept after the fields every call touches). drain: the pending command's
     * drain deadline, armed while the running call waits; drain_armed_us: the monotonic deadline
     * it is armed for (0: none); drained: the last call's waits were cancelled by it. */
    uv_timer_t drain;
    int64_t drain_armed_us;
    bool drained;
    /* A scheduled run with a lease (cold too): lease_guard checks, while the run waits, that
     * guard_lease ("" when the running call has none) is still held. */
    uv_timer_t lease_guard;
    char guard_lease[AH_NAME_MAX + 1];
};

/* Values pinned at the bottom of the main Lua stack for the life of the state, so that the hot
 * path (a batch) pushes them with lua_pushvalue instead of registry lookups. */
enum { SLOT_CTX = 1, SLOT_BATCH, SLOT_COUNT = SLOT_BATCH };
/* The same two values pinned at the bottom of the main task's coroutine from its first batch on
 * (lua->main_pinned), so that a batch pushes them onto the coroutine directly; results and other
 * calls' functions sit above them. */
enum { CO_SLOT_BATCH = 1, CO_SLOT_CTX, CO_SLOT_COUNT = CO_SLOT_CTX };

/* Registry key whose value is the ah_lua_t (a light userdata), for the hook and the functions
 * of ah_lua.h that get only a lua_State. */
extern const char ah_lua_registry_key;

/* The ah_lua_t of L (any coroutine of the state). Stack: [-0, +0]. */
static inline ah_lua_t *ah_lua_host_of(lua_State *L)
{
    lua_pushlightuserdata(L, (void *)&ah_lua_registry_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    ah_lua_t *lua = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return lua;
}

/* ---- calls (core/ah_lua_call.c) ----------------------------------------------------------- */

/* The one call wrapper. Calls the function below the nargs arguments on top of the stack as the
 * main task of a call, under the time budget and the memory limit, and runs the loop until the
 * call (with all its tasks) has ended. Stack: [-(nargs + 1), +nresults] on success,
 * [-(nargs + 1), +0] on failure; nresults is 0 or 1. Returns 0, AH_ELUA or AH_ETIMEOUT (err
 * filled with the message and the traceback). */
int ah_lua_call_user(ah_lua_t *lua, int nargs, int nresults, char *err, size_t errlen);
/* Installs the interrupt signal's handler (once per process; any thread). */
void ah_lua_call_install_signal(void);

/* ---- the agent.core module (core/ah_lua_core.c) ------------------------------------------- */

/* package.preload["agent.core"]: the module table. Upvalue 1: the ah_lua_t. */
int ah_lua_core_open(lua_State *L);
/* Creates the task objects' metatable. Stack: [-0, +0]. */
void ah_lua_core_register_task_meta(lua_State *L, ah_lua_t *lua);

/* ---- tasks and waits (core/ah_lua_task.c) ------------------------------------------------- */

/* Queues t to be resumed with the nargs values already pushed on its coroutine. */
void ah_lua_task_ready(ah_lua_t *lua, task_t *t, int nargs);
/* Pushes nil, the cancellation message, its code. Stack: [-0, +3]. */
int ah_lua_task_push_cancelled(lua_State *L, ah_lua_t *lua);
/* True when a wait of task t (may be NULL) must not start: the call's waits are cancelled, or
 * t's own (task:cancel()). */
bool ah_lua_task_wait_cancelled(const ah_lua_t *lua, const task_t *t);
/* Pushes what a cancelled wait of task t returns: nil, msg, code of the call's cancellation
 * first, else task:cancel()'s. Stack: [-0, +3]. */
int ah_lua_task_push_task_cancelled(lua_State *L, ah_lua_t *lua, const task_t *t);
/* task:cancel(): cancels the waits of t alone. Its present wait (sleep, join, an operation)
 * resumes with nil, msg, "cancelled", and every later one returns that at once. */
void ah_lua_task_cancel(ah_lua_t *lua, task_t *t);
/* The task allowed to wait on L, i.e. the running task itself (not a coroutine the script
 * created inside it); raises otherwise (`what` names the caller). */
task_t *ah_lua_task_waiting(lua_State *L, ah_lua_t *lua, const char *what);
/* Pushes the outcome of a finished task for task:join on `to`: true, results... or false, msg.
 * Returns the number of values pushed. */
int ah_lua_task_push_outcome(lua_State *to, task_handle_t *hd);
/* A task's coroutine returned or failed (status of lua_resume). */
void ah_lua_task_end(ah_lua_t *lua, task_t *t, int status);
/* Runs the loop until the main task and every task it spawned have ended. */
void ah_lua_task_run_loop(ah_lua_t *lua);
/* The call has ended: reports failed tasks nobody joined, releases every spawned task. */
void ah_lua_task_finish(ah_lua_t *lua);
/* lua->wake's callback: commands and interrupts reach the running call here. */
void ah_lua_task_on_wake(uv_async_t *handle);
/* Error value of a failed coroutine → "<message>\n<traceback of co>" (luajit.c's traceback).
 * Kept as lua->traceback_ref; arguments: the error value, co (light userdata). */
int ah_lua_traceback_of(lua_State *L);

/* What follows a resume of t that returned status (0, LUA_YIELD or an error): the task ended,
 * or it waits, or it yielded to let the others run (queued again). */
void ah_lua_task_resumed(ah_lua_t *lua, task_t *t, int status);

/* Resumes t with nargs values from its stack, under the memory limit. (The call wrapper resumes
 * the main task itself the first time: ah_lua_call.c, call_main_task.) */
static inline void ah_lua_task_resume(ah_lua_t *lua, task_t *t, int nargs)
{
    lua->current = t;
    lua->memory_armed = lua->memory_limit > 0;
    int status = lua_resume(t->co, nargs);
    lua->memory_armed = false;
    lua->current = NULL;
    ah_lua_task_resumed(lua, t, status);
}

#endif
