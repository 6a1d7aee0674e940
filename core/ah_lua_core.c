/* The `agent.core` module of the Lua host (ah_lua_internal.h): the C half of the `agent` module
 * (lua/agent.lua is the other): the agent's id and state, logging, agent.sleep, agent.spawn and
 * the task objects (task:join), shutdown and stop requests, the environment, clocks, the
 * script's metrics and memory use. Each function takes its ah_lua_t as upvalue 1, checks its
 * arguments before acquiring anything, and waits only through the tasks of core/ah_lua_task.c.
 * Lua thread only. */
#include "ah_lua_internal.h"

#include "ah_log.h"
#include "ah_metrics.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* agent.sleep() never waits longer than this (a year); math.huge means "until woken". */
#define SLEEP_MAX_SECONDS (365.0 * 86400.0)

/* Metatable name of the script's task objects (agent.spawn). */
#define TASK_META "agent.task"

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
    ah_lua_task_ready(t->lua, t, 1);
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
    task_t *t = ah_lua_task_waiting(L, lua, "agent.sleep");
    if (ah_lua_task_wait_cancelled(lua, t)) {
        return ah_lua_task_push_task_cancelled(L, lua, t);
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
    ah_lua_task_ready(lua, t, nargs);
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
    lua_pushstring(t->co, ah_lua_code_timeout);
    ah_lua_task_ready(t->lua, t, 3);
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
        return ah_lua_task_push_outcome(L, hd);
    }
    task_t *self = ah_lua_task_waiting(L, lua, "task:join");
    if (self->cancelled) { /* task:cancel(); the call's own cancellation lets joins wait (below) */
        return ah_lua_task_push_task_cancelled(L, lua, self);
    }
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

/* task:cancel() -> true when the task was still running: its present wait resumes with nil, msg,
 * "cancelled" and its later waits return that at once (the task unwinds through its own code);
 * false when it had ended. Upvalue 1: the ah_lua_t. */
static int task_cancel(lua_State *L)
{
    ah_lua_t *lua = host_upvalue(L);
    task_handle_t *hd = luaL_checkudata(L, 1, TASK_META);
    task_t *t = hd->task;
    bool running = hd->status == TASK_RUNNING && t != NULL && !t->ended;
    if (running) {
        ah_lua_task_cancel(lua, t);
    }
    lua_pushboolean(L, running);
    return 1;
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
void ah_lua_core_register_task_meta(lua_State *L, ah_lua_t *lua)
{
    luaL_newmetatable(L, TASK_META);
    lua_createtable(L, 0, 2);
    lua_pushlightuserdata(L, lua);
    lua_pushcclosure(L, task_join, 1);
    lua_setfield(L, -2, "join");
    lua_pushlightuserdata(L, lua);
    lua_pushcclosure(L, task_cancel, 1);
    lua_setfield(L, -2, "cancel");
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

/* core.pending() -> {command =, reason =, deadline = seconds left or nil} for the command waiting
 * to be applied, or nil. command is ev.command's word ("pause", "running", "shutdown"). */
static int core_pending(lua_State *L)
{
    ah_lua_t *lua = host_upvalue(L);
    ah_pending_t pending;
    if (lua->state == NULL || !ah_state_pending(lua->state, &pending)) {
        lua_pushnil(L);
        return 1;
    }
    lua_createtable(L, 0, 3);
    lua_pushstring(L, ah_command_name(pending.command));
    lua_setfield(L, -2, "command");
    lua_pushstring(L, pending.reason);
    lua_setfield(L, -2, "reason");
    if (pending.drain_deadline_us != 0) {
        int64_t left_us = pending.drain_deadline_us - ah_mono_us();
        lua_pushnumber(L, left_us > 0 ? (lua_Number)left_us / 1e6 : 0);
        lua_setfield(L, -2, "deadline");
    }
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

/* agent.core.suggest(word, {candidates...}) -> the candidate word most likely meant, or nil
 * (ah_suggest: case, '_' and spelling). For "did you mean" in the Lua half's errors. */
static int core_suggest(lua_State *L)
{
    const char *word = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    const char *names[64];
    int n = 0;
    for (int i = 1; n < 63; i++) {
        lua_rawgeti(L, 2, i);
        if (lua_type(L, -1) != LUA_TSTRING) {
            lua_pop(L, 1);
            break;
        }
        names[n++] = lua_tostring(L, -1); /* kept alive by the table */
        lua_pop(L, 1);
    }
    names[n] = NULL;
    const char *meant = ah_suggest(word, names, NULL);
    if (meant == NULL) {
        return 0;
    }
    lua_pushstring(L, meant);
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
    {"pending", core_pending},
    {"shutdown", core_shutdown},
    {"env", core_env},
    {"suggest", core_suggest},
    {"now", core_now},
    {"monotonic", core_monotonic},
    {NULL, NULL},
};

/* package.preload["agent.core"]; upvalue 1 is the ah_lua_t. Stack: [-0, +1]. */
int ah_lua_core_open(lua_State *L)
{
    host_upvalue(L)->agent_opened = true; /* from now on agent._due may exist (schedules) */
    lua_newtable(L);
    lua_pushvalue(L, lua_upvalueindex(1));
    luaL_setfuncs(L, core_functions, 1);
    return 1;
}
