/* The Lua host: one LuaJIT state running the operator's script (docs/LUA.md). It loads the script,
 * checks the contract (a returned table with a `batch` function), keeps the script's functions as
 * registry refs, and calls them through one wrapper with a traceback, a time budget and the memory
 * limit. Each call runs as a coroutine on the state's own libuv loop (the worker's loop): functions
 * that wait (agent.sleep, task:join, agent.http) suspend the calling task and the loop runs the
 * others; agent.spawn starts more tasks, and a call ends when its function and all its tasks have
 * ended. It also provides the `agent` module to the script.
 *
 * Threads: everything here runs on the Lua worker thread that opened the state, except
 * ah_lua_interrupt(), ah_lua_interrupt_call(), ah_lua_waiting(), ah_lua_waiting_call() and
 * ah_lua_wake(), which any thread may call. */
#ifndef AH_LUA_H
#define AH_LUA_H

#include "ah_common.h"
#include "ah_state.h"

typedef struct ah_lua_s ah_lua_t;
struct ah_lua_mongo_s;
struct ah_metrics_s;
struct lua_State;
struct uv_loop_s;

/* An extra C function offered to the script as agent.ext.<name> (and in require "agent.ext").
 * fn is a lua_CFunction; it runs on the Lua worker thread as a closure whose upvalue 1 is ud (a
 * light userdata). */
typedef struct ah_lua_function_s {
    const char *name;
    int (*fn)(struct lua_State *L);
    void *ud;
} ah_lua_function_t;

typedef struct ah_lua_options_s {
    const char *agent_id; /* agent.id (copied) */
    ah_state_t *state;    /* for agent.state(), agent.sleep(), agent.should_stop(); may be NULL
                             (agenthost check): those functions then act as if running */
    double batch_timeout; /* seconds a call may run before it is interrupted */
    struct ah_lua_mongo_s *mongo; /* agent.mongo's connection (ah_mongo.h), not owned; must
                                     outlive the state; NULL: every call fails "not configured" */
    const char *script_source; /* the script's text; NULL: load script_path (else it may be NULL) */
    const char *script_name;   /* chunk name and ctx.script for script_source; NULL: "script" */
    const ah_lua_function_t *functions; /* agent.ext entries (copied into the state), or NULL */
    size_t function_count;
    struct ah_metrics_s *metrics; /* agent.metrics registry, not owned (must outlive the state);
                                     NULL: the state keeps a private one */
    size_t memory_limit;          /* bytes the script may allocate (LUA_MEMORY_LIMIT); 0: none */
    struct ah_leases_s *leases;   /* the host's lease keeper (ah_lease.h), not owned (must outlive
                                     the state); NULL: lease:acquire fails with "store" */
    /* Optional: called on the opening thread with the new state just before its main chunk
     * runs (so a watchdog can interrupt that call: ah_lua_interrupt_call), and with NULL before
     * a state whose load failed is freed. */
    void (*publish)(void *ud, struct ah_lua_s *lua);
    void *publish_ud;
} ah_lua_options_t;

/* Creates a state, opens the standard libraries, cjson and the agent module, sets package.path so
 * that modules next to the script are found first, loads (from script_path, or from
 * opts->script_source when set) and runs the script and checks that it
 * returned a table with a `batch` function (optional: init, on_pause, on_resume, on_shutdown,
 * on_reload, each a function if present; other "on_*" keys are logged as warnings). On failure
 * returns NULL with err naming file:line and the problem.
 */
ah_lua_t *ah_lua_open(const ah_lua_options_t *opts, const char *script_path, char *err,
                      size_t errlen);
/* Closes the state. NULL is accepted. */
void ah_lua_close(ah_lua_t *lua);
/* ctx.iteration: the batches started so far by this agent (the running one included). A reload
 * carries it over to the fresh state (before its init), so it counts across script versions like
 * /api/agent/state's `batches`. Lua thread (or before the state is shared). */
long long ah_lua_iteration(const ah_lua_t *lua);
void ah_lua_set_iteration(ah_lua_t *lua, long long iteration);

/* Calls M.init(ctx) if the script defines it. 0, or AH_ELUA with the message and traceback. */
int ah_lua_init(ah_lua_t *lua, char *err, size_t errlen);
/* Calls M.batch(ctx). *items = the number returned (0 for nil/false/non-numbers). 0 or AH_ELUA
 * (AH_ETIMEOUT if it was interrupted for overrunning its budget). */
int ah_lua_batch(ah_lua_t *lua, long long *items, char *err, size_t errlen);
/* The script function a hook calls: "on_pause" | "on_resume" | "on_shutdown" | "none". */
const char *ah_lua_hook_name(ah_hook_t hook);
/* Calls the hook (on_pause / on_resume / on_shutdown) with ev, if defined. 0, AH_ELUA or
 * AH_ETIMEOUT. */
int ah_lua_hook(ah_lua_t *lua, ah_hook_t hook, const ah_event_t *ev, char *err, size_t errlen);
/* Calls M.on_reload(ctx) if the script defines it: the old script's chance to let go of what it
 * holds once its replacement has loaded, before the host closes it. 0, AH_ELUA or AH_ETIMEOUT. */
int ah_lua_on_reload(ah_lua_t *lua, char *err, size_t errlen);
/* Runs one agent.every schedule that is due now, if any, as its own call through the call
 * wrapper (time budget, memory limit, traceback) with fn(ctx). Returns 0 when none was due and
 * *next_in = seconds until the next one (< 0: no schedules); 1 when one ran and succeeded;
 * AH_ELUA / AH_ETIMEOUT when it failed (err: "agent.every(<spec>): <message>"). The first call
 * closes agent.every to the script (only the main chunk and init may schedule). */
int ah_lua_run_schedule(ah_lua_t *lua, double *next_in, char *err, size_t errlen);
/* Before the state closes (reload, shutdown): lets the agent module give back what it holds for
 * the script (agent.queue's claims) by calling its internal release function, if the script
 * loaded the module. 0, AH_ELUA or AH_ETIMEOUT. */
int ah_lua_release(ah_lua_t *lua, char *err, size_t errlen);
/* True when the waits of the last call (batch or hook) were cancelled by the drain deadline of a
 * pending command (drain=, PAUSE_DRAIN_TIMEOUT, a shutdown's bound): the host then releases what
 * the script holds (ah_lua_release) after the command's hook, as on shutdown. */
bool ah_lua_drained(const ah_lua_t *lua);
/* Asks the running call to stop: every wait of the call is cancelled (it resumes with nil, msg,
 * "cancelled") by the call's loop, and, when Lua code is running, the call is stopped with an
 * error at its next instruction check. Safe from any thread and from signal handlers, as long as
 * the thread that runs the calls has not been joined: the request reaches it as the real-time
 * signal SIGRTMIN+5, whose handler (installed by the first ah_lua_open) installs the hook on that
 * thread itself, and only while the call is not parked in its loop. Code running inside a
 * JIT-compiled trace does not see the request until it leaves the trace (LuaJIT does not run
 * hooks in compiled code). */
void ah_lua_interrupt(ah_lua_t *lua);
/* As ah_lua_interrupt, but only if the running call is the one the state object numbered
 * `generation` (ah_state_snapshot_t.call_generation): a decision taken on a snapshot never
 * stops a later call, nor a call of another state. */
void ah_lua_interrupt_call(ah_lua_t *lua, uint64_t generation);
/* True while a call runs and every one of its tasks is suspended in a wait (the thread is in the
 * loop, not in Lua code). Any thread; a hint that may be stale by the time it is read. The
 * running call's own timer cancels its waits at BATCH_TIMEOUT, so a waiting call is not
 * wedged. */
bool ah_lua_waiting(ah_lua_t *lua);
/* As ah_lua_waiting, for the call the state object numbered `generation` only. */
bool ah_lua_waiting_call(ah_lua_t *lua, uint64_t generation);
/* True when the call numbered `generation` had its waits cut by its own deadline timer less than
 * AH_LUA_UNWIND_US before now_us (monotonic): its script is unwinding through its own code after
 * the "timeout" its waits returned, which the watchdog does not interrupt that long (two of its
 * 250 ms intervals: its tick and the deadline count from the same stamp, so a tick can fall at
 * the very instant the waits end). Any thread. */
#define AH_LUA_UNWIND_US 500000
bool ah_lua_unwinding_call(ah_lua_t *lua, uint64_t generation, int64_t now_us);
/* Wakes the state's loop so that waits that end on a pending command (agent.sleep) see it. Any
 * thread (uv_async_send); lua must stay open meanwhile. */
void ah_lua_wake(ah_lua_t *lua);

/* ---- waiting, for C functions offered to the script (agent.http, agent.mongo) ----------- */

/* Something a task waits for: started by a C function, completed by a loop callback. */
typedef struct ah_lua_op_s ah_lua_op_t;
struct ah_lua_op_s {
    /* Called on the Lua thread when the wait is cancelled (BATCH_TIMEOUT, shutdown, a pending
     * command's drain deadline, task:cancel(), the call's function failed, the state closes):
     * stop the work now; ah_lua_op_done() must not be called for it afterwards. */
    void (*cancel)(ah_lua_op_t *op);
    /* Set by cancel() when the work had already started and may take effect anyway (a write on
     * the thread pool): the wait then resumes with nil, msg, "unknown" instead of the
     * cancellation's own code, so the script does not take "timeout" for "not applied". */
    bool outcome_unknown;
    void *task; /* internal: the waiting task, NULL when nobody waits */
};
/* The loop of the state L belongs to: handles of C functions live on it (closed before the state
 * closes its loop, i.e. from __gc or when done). */
struct uv_loop_s *ah_lua_loop(struct lua_State *L);
/* Suspends the running task until ah_lua_op_done(op), then it resumes with `true`; when the wait
 * is cancelled first, op->cancel(op) is called and it resumes with nil, msg, code ("timeout" or
 * "cancelled"). If the call is already cancelled, op->cancel(op) is called at once and nil, msg,
 * code returned without suspending. Raises (API misuse) when L is not a task of the running call,
 * e.g. a coroutine the script created itself; the op is then not started by the caller yet, or
 * the caller cancels it. Use as `return ah_lua_op_wait(L, op, "agent.http");`. */
int ah_lua_op_wait(struct lua_State *L, ah_lua_op_t *op, const char *what);
/* True when the running task of L may wait (ah_lua_op_wait would not raise). False for a
 * coroutine the script created and for a lua_State that no ah_lua_t opened (an embedder's own,
 * a benchmark's). */
bool ah_lua_can_wait(struct lua_State *L);
/* When the running call's waits are cancelled (BATCH_TIMEOUT, shutdown, a drain deadline), or
 * those of the task running on L (task:cancel()), pushes nil, msg, code on L and returns 3: a C
 * function should return that before starting work nobody will wait for. Otherwise returns 0
 * and pushes nothing. */
int ah_lua_push_cancelled(struct lua_State *L);
/* Completes op: its task resumes with `true` at the next turn of the loop. Lua thread only
 * (loop callbacks). A no-op when nobody waits for op any more. */
void ah_lua_op_done(ah_lua_op_t *op);
/* The same, and the task resumes with `true` and the registry value ref (the ref stays the
 * caller's). */
void ah_lua_op_done_ref(ah_lua_op_t *op, int ref);
/* The state's main thread (for registry refs released from loop callbacks). */
struct lua_State *ah_lua_main(struct lua_State *L);
/* uv_queue_work on the state's loop, counted: every path that closes the state (ah_lua_close(),
 * and ah_lua_open() when the script fails to load) first runs the loop until every such work has
 * called back, so `after` always runs while the state is open. The caller cancels what has not
 * started (uv_cancel, from its op's cancel) and owns what the work touches (see "Work in flight"
 * in docs/ARCHITECTURE.md). after must call ah_lua_work_finished(req) first. 0 or a libuv
 * error. */
struct uv_work_s;
int ah_lua_queue_work(struct lua_State *L, struct uv_work_s *req, void (*work)(struct uv_work_s *),
                      void (*after)(struct uv_work_s *, int status));
void ah_lua_work_finished(struct uv_work_s *req);

#endif
