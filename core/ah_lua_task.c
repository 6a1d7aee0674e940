/* Tasks and waits of the Lua host (ah_lua_internal.h): the coroutines of a call on the state's
 * libuv loop, the scheduler that resumes them, cancellation, and the waiting primitives that
 * C functions use (ah_lua.h). A C function that waits registers what it waits for on the
 * running task and yields (lua_yield); a loop callback pushes the results onto the task's
 * coroutine and queues it; only the scheduler (ah_lua_task_run_loop) resumes tasks, never a
 * libuv or curl callback. At the call's deadline (BATCH_TIMEOUT, a timer on the loop) every
 * wait is cancelled and resumes with nil, msg, "timeout"; ah_lua_interrupt() does the same with
 * "cancelled" through the async handle (ah_lua_task_on_wake). Lua thread only. */
#include "ah_lua_internal.h"

#include "ah_lease.h"
#include "ah_log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* How often a scheduled run with a lease checks, while it waits, that the lease is still held. */
#define AH_LUA_LEASE_GUARD_MS 100

const char ah_lua_code_timeout[] = "timeout";
const char ah_lua_code_cancelled[] = "cancelled";
static const char code_unknown[] = "unknown";

/* ---- tasks: coroutines on the loop ------------------------------------------------------- */

/* Queues t to be resumed with the nargs values already pushed on its coroutine. Called from a
 * loop callback (the call is parked in uv_run), it also stops the loop: a callback that runs
 * before libuv polls (a timer's: curl may finish a transfer inline from its timeout) would
 * otherwise leave UV_RUN_ONCE blocking in epoll_wait before the scheduler resumes the task. */
void ah_lua_task_ready(ah_lua_t *lua, task_t *t, int nargs)
{
    t->wait = WAIT_NONE;
    t->resume_nargs = nargs;
    if (t->queued) {
        return;
    }
    if (atomic_load_explicit(&lua->parked, memory_order_relaxed)) {
        uv_stop(&lua->loop);
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
int ah_lua_task_push_cancelled(lua_State *L, ah_lua_t *lua)
{
    lua_pushnil(L);
    lua_pushstring(L, lua->cancel_msg);
    lua_pushstring(L, lua->cancel_code);
    return 3;
}

static const char task_cancel_msg[] = "cancelled: task:cancel()";

bool ah_lua_task_wait_cancelled(const ah_lua_t *lua, const task_t *t)
{
    return lua->cancel_code != NULL || (t != NULL && t->cancelled);
}

/* The message of a cancelled wait of t: the call's cancellation first, else task:cancel()'s. */
static const char *cancel_msg_of(const ah_lua_t *lua, const task_t *t)
{
    return lua->cancel_code != NULL || t == NULL || !t->cancelled ? lua->cancel_msg
                                                                  : task_cancel_msg;
}

int ah_lua_task_push_task_cancelled(lua_State *L, ah_lua_t *lua, const task_t *t)
{
    if (lua->cancel_code != NULL || t == NULL || !t->cancelled) {
        return ah_lua_task_push_cancelled(L, lua);
    }
    lua_pushnil(L);
    lua_pushstring(L, task_cancel_msg);
    lua_pushstring(L, ah_lua_code_cancelled);
    return 3;
}

/* Pushes nil, the cancellation message of t's wait, "unknown": the wait was cancelled after its
 * work had started, so it may have taken effect. Stack: [-0, +3]. */
static int push_unknown(lua_State *L, ah_lua_t *lua, const task_t *t)
{
    lua_pushnil(L);
    lua_pushfstring(L, "%s; the operation had already started and may have been applied",
                    cancel_msg_of(lua, t));
    lua_pushstring(L, code_unknown);
    return 3;
}

/* Stops what t waits for, without resuming it. Returns true when the work waited for had
 * started and may still take effect (ah_lua_op_t.outcome_unknown). */
static bool task_stop_wait(task_t *t)
{
    bool unknown = false;
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
            op->outcome_unknown = false;
            op->cancel(op);
            unknown = op->outcome_unknown;
        }
        break;
    }
    default:
        break;
    }
    t->wait = WAIT_NONE;
    return unknown;
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
        bool unknown = task_stop_wait(t);
        lua_checkstack(t->co, 3);
        ah_lua_task_ready(
            lua, t, unknown ? push_unknown(t->co, lua, t) : ah_lua_task_push_cancelled(t->co, lua));
    }
}

void ah_lua_task_cancel(ah_lua_t *lua, task_t *t)
{
    t->cancelled = true;
    if (t->ended || t->wait == WAIT_NONE) {
        return;
    }
    bool unknown = task_stop_wait(t);
    lua_checkstack(t->co, 3);
    ah_lua_task_ready(lua, t,
                      unknown ? push_unknown(t->co, lua, t)
                              : ah_lua_task_push_task_cancelled(t->co, lua, t));
}

/* The task allowed to wait on L, i.e. the running task itself (not a coroutine the script
 * created inside it); raises otherwise. */
task_t *ah_lua_task_waiting(lua_State *L, ah_lua_t *lua, const char *what)
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
int ah_lua_traceback_of(lua_State *L)
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
    if (status == LUA_ERRMEM && lua->memory_refused) {
        /* Lua's "not enough memory" has no position: name the limit and the script line where
         * the allocation was refused (noted by limited_alloc()), then the traceback as for any
         * error. The limit is not enforced here (only around lua_resume), so this cannot fail.
         * %f: LuaJIT writes a lua_Number with %.14g, exact for any limit (%d stops at 2 GiB). */
        lua_pop(co, 1);
        lua_pushfstring(co, "not enough memory: the script exceeded LUA_MEMORY_LIMIT (%f bytes)%s",
                        (lua_Number)lua->memory_limit, lua->memory_where);
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
int ah_lua_task_push_outcome(lua_State *to, task_handle_t *hd)
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

void ah_lua_task_resumed(ah_lua_t *lua, task_t *t, int status)
{
    if (status != LUA_YIELD) {
        ah_lua_task_end(lua, t, status);
    } else if (t->wait == WAIT_NONE) {
        /* coroutine.yield() in the task itself: the others run first */
        lua_settop(t->co, 0);
        ah_lua_task_ready(lua, t, 0);
    }
}

/* A task's coroutine returned or failed (status of lua_resume). */
__attribute__((noinline)) void ah_lua_task_end(ah_lua_t *lua, task_t *t, int status)
{
    lua_State *L = lua->L;
    t->ended = true;
    if (t == lua->main_task) {
        lua->main_status = status;
        if (status != 0) {
            push_task_error(lua, t->co, status);
            snprintf(lua->call_err, lua->call_errlen, "%s", lua_tostring(L, -1));
            lua_pop(L, 1);
            cancel_waits(lua, ah_lua_code_cancelled,
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
        ah_lua_task_ready(lua, joiner, ah_lua_task_push_outcome(joiner->co, hd));
    }
}

static void on_deadline(uv_timer_t *timer)
{
    ah_lua_t *lua = timer->data;
    char msg[sizeof(lua->cancel_msg)];
    snprintf(msg, sizeof(msg), "batch timeout: call exceeded BATCH_TIMEOUT (%gs)",
             lua->batch_timeout);
    /* the script now unwinds through its own code: the watchdog, whose tick may fall at this
     * very instant (both count from the call's stamp), leaves it AH_LUA_UNWIND_US to do so */
    atomic_store(&lua->deadline_fired_us, ah_mono_us());
    atomic_store(&lua->deadline_generation, atomic_load(&lua->call_generation));
    cancel_waits(lua, ah_lua_code_timeout, msg, false);
}

static void drain_arm(ah_lua_t *lua);

/* The pending command's drain deadline passed: the running call's waits are cancelled, joins
 * included, so that the call ends and the command applies. A command that replaced it since
 * (latest wins) brings its own deadline, or none. */
static void on_drain(uv_timer_t *timer)
{
    ah_lua_t *lua = timer->data;
    ah_pending_t pending;
    lua->drain_armed_us = 0;
    if (lua->state == NULL || !ah_state_pending(lua->state, &pending) ||
        pending.drain_deadline_us == 0) {
        return;
    }
    if (pending.drain_deadline_us > ah_mono_us() + 1000) {
        drain_arm(lua); /* a later deadline replaced the one this timer was armed for */
        return;
    }
    char msg[sizeof(lua->cancel_msg)];
    snprintf(msg, sizeof(msg), "cancelled: the drain deadline of the pending %s passed",
             pending.command == AH_CMD_RUNNING ? "resume" : ah_command_name(pending.command));
    if (lua->cancel_code == NULL) {
        lua->drained = true;
    }
    cancel_waits(lua, ah_lua_code_cancelled, msg, true);
}

/* Arms (or moves, or stops) the drain timer for the pending command's deadline. Called when the
 * running call first waits and on every wake-up (a command was offered). */
static void drain_arm(ah_lua_t *lua)
{
    ah_pending_t pending;
    int64_t deadline_us = 0;
    if (lua->state != NULL && lua->cancel_code == NULL && ah_state_pending(lua->state, &pending)) {
        deadline_us = pending.drain_deadline_us;
    }
    if (deadline_us == lua->drain_armed_us) {
        return;
    }
    lua->drain_armed_us = deadline_us;
    if (deadline_us == 0) {
        uv_timer_stop(&lua->drain);
        return;
    }
    int64_t left_us = deadline_us - ah_mono_us();
    uv_update_time(&lua->loop);
    uv_timer_start(&lua->drain, on_drain, left_us > 0 ? (uint64_t)(left_us + 999) / 1000 : 0, 0);
}

/* Commands (a wait that ends on a pending command) and interrupts reach the running call here. */
void ah_lua_task_on_wake(uv_async_t *handle)
{
    ah_lua_t *lua = handle->data;
    uint64_t seq = atomic_load(&lua->call_seq);
    if ((seq & 1) == 0) {
        return; /* between calls: the next call looks at the state itself */
    }
    if (atomic_load(&lua->cancel_seq) == seq) {
        cancel_waits(lua, ah_lua_code_cancelled, "cancelled: the host stopped this call (shutdown)",
                     false);
    }
    drain_arm(lua);
    if (lua->state == NULL || !ah_state_sleep(lua->state, 0)) {
        return;
    }
    task_t *main = lua->main_task;
    for (task_t *t = main; t != NULL; t = t == main ? lua->tasks : t->next) {
        if (!t->ended && t->wait == WAIT_SLEEP) {
            uv_timer_stop(&t->timer);
            lua_pushboolean(t->co, 1);
            ah_lua_task_ready(lua, t, 1);
        }
    }
}

/* A scheduled run's lease is no longer held (lost to another agent, expired locally, released
 * by a pause): its waits are cancelled, joins included, so that the job ends. */
static void on_lease_guard(uv_timer_t *timer)
{
    ah_lua_t *lua = timer->data;
    ah_lease_view_t view;
    if (lua->leases == NULL || lua->guard_lease[0] == '\0' ||
        (ah_leases_view(lua->leases, lua->guard_lease, &view) && view.held)) {
        return;
    }
    uv_timer_stop(timer);
    char msg[sizeof(lua->cancel_msg)];
    snprintf(msg, sizeof(msg), "cancelled: lease %.100s is no longer held by this agent",
             lua->guard_lease);
    cancel_waits(lua, ah_lua_code_cancelled, msg, true);
}

/* Runs the loop until the main task and every task it spawned have ended. */
__attribute__((noinline)) void ah_lua_task_run_loop(ah_lua_t *lua)
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
            ah_lua_task_resume(lua, t, t->resume_nargs);
        }
        if (lua->main_task->ended && lua->live_tasks == 0) {
            break;
        }
        if (!deadline_armed) {
            deadline_armed = true;
            if (lua->batch_timeout_us > 0) {
                /* the call's start as stamped (by the watchdog's tick if it saw the call run),
                 * else now: the first wait stamps it (no clock is read per call) */
                int64_t now = ah_mono_us();
                int64_t started =
                    lua->state != NULL
                        ? ah_state_call_stamp(lua->state, atomic_load(&lua->call_generation), now)
                        : now;
                int64_t left_us = started + lua->batch_timeout_us - now;
                uint64_t ms = left_us > 0 ? (uint64_t)(left_us + 999) / 1000 : 0;
                uv_update_time(&lua->loop);
                uv_timer_start(&lua->deadline, on_deadline, ms, 0);
            }
            drain_arm(lua); /* a command may have been pending before the call waited */
            if (lua->guard_lease[0] != '\0') {
                uv_update_time(&lua->loop);
                uv_timer_start(&lua->lease_guard, on_lease_guard, 0, AH_LUA_LEASE_GUARD_MS);
            }
        }
        atomic_store(&lua->parked, true);
        int alive = uv_run(&lua->loop, lua->ready_head != NULL ? UV_RUN_NOWAIT : UV_RUN_ONCE);
        atomic_store(&lua->parked, false);
        if (alive == 0 && lua->ready_head == NULL) {
            /* Nothing left that could wake a task (the deadline timer does not count): tasks
             * wait for each other. */
            cancel_waits(lua, ah_lua_code_cancelled,
                         "cancelled: every task of the call waits for another task", true);
        }
    }
    if (deadline_armed) {
        uv_timer_stop(&lua->deadline);
        uv_timer_stop(&lua->drain);
        lua->drain_armed_us = 0;
        uv_timer_stop(&lua->lease_guard);
    }
}

static void free_task(uv_handle_t *handle)
{
    free(handle->data);
}

/* The call has ended: reports failed tasks nobody joined, releases every spawned task. */
__attribute__((noinline)) void ah_lua_task_finish(ah_lua_t *lua)
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

/* ---- waiting, for C functions (ah_lua.h) ------------------------------------------------- */

uv_loop_t *ah_lua_loop(lua_State *L)
{
    return &ah_lua_host_of(L)->loop;
}

bool ah_lua_can_wait(lua_State *L)
{
    ah_lua_t *lua = ah_lua_host_of(L);
    return lua != NULL && lua->current != NULL && lua->current->co == L;
}

int ah_lua_push_cancelled(lua_State *L)
{
    ah_lua_t *lua = ah_lua_host_of(L);
    task_t *t = lua->current != NULL && lua->current->co == L ? lua->current : NULL;
    return ah_lua_task_wait_cancelled(lua, t) ? ah_lua_task_push_task_cancelled(L, lua, t) : 0;
}

int ah_lua_op_wait(lua_State *L, ah_lua_op_t *op, const char *what)
{
    ah_lua_t *lua = ah_lua_host_of(L);
    task_t *t = ah_lua_task_waiting(L, lua, what);
    if (ah_lua_task_wait_cancelled(lua, t)) {
        op->task = NULL;
        op->cancel(op);
        return ah_lua_task_push_task_cancelled(L, lua, t);
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
    ah_lua_task_ready(t->lua, t, 1);
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
    ah_lua_task_ready(t->lua, t, 2);
}

lua_State *ah_lua_main(lua_State *L)
{
    return ah_lua_host_of(L)->L;
}

int ah_lua_queue_work(lua_State *L, uv_work_t *req, uv_work_cb work, uv_after_work_cb after)
{
    ah_lua_t *lua = ah_lua_host_of(L);
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
