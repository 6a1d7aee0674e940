/* The C half of agent.lease and agent.every (package.preload["agent.lease.core"], shaped into the
 * public API by lua/agent.lua): it names leases to the host's lease keeper (ah_lease.h), waits
 * for an acquisition on the Lua state's loop without any store call on this thread, reads a
 * lease's local view, and checks and evaluates cron expressions (ah_cron.h).
 *
 * An acquire waits as an ah_lua_op_t (ah_lua.h) whose loop timer looks at the keeper's view of
 * the lease every LEASE_WAIT_TICK_MS: an in-memory read under the keeper's lock.
 *
 * Why a 20 ms look rather than a wake-up from the keeper: what the wait waits for is the
 * keeper's next store call, and while another agent holds the lease the keeper tries at most
 * every second (min(ttl/3, 1 s), ah_lease.c), so a look every 20 ms adds at most 2% to that
 * second and is nothing against a ttl. It costs one timer wake-up of the worker's loop per 20 ms,
 * only while a task waits in acquire. A wake-up would need the keeper thread (which outlives
 * every Lua state: a reload replaces the state, the keeper stays) to reach the current state's
 * loop through an async handle swapped on reload and closed with the state, a cross-thread
 * lifetime for a gain of at most 20 ms. Cancellation (the call's deadline, a drain, shutdown)
 * does not wait for the look: it ends the wait at once through cancel_acquire. */
#include "ah_lua_lease.h"

#include "ah_cron.h"
#include "ah_lease.h"
#include "ah_lua.h"

#include <lauxlib.h>
#include <lua.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define LEASE_WAIT_TICK_MS 20
#define LEASE_WAIT_MAX_S (365.0 * 86400.0)

typedef struct acquire_op_s {
    ah_lua_op_t op; /* first member */
    uv_timer_t timer;
    ah_leases_t *leases;
    char name[AH_NAME_MAX + 1];
    uint64_t since;      /* the keeper's store calls for it when the wait began */
    int64_t deadline_us; /* monotonic; 0: none */
} acquire_op_t;

static ah_leases_t *keeper_of(lua_State *L)
{
    return lua_touserdata(L, lua_upvalueindex(1));
}

static void free_acquire(uv_handle_t *handle)
{
    free(handle->data);
}

static void on_acquire_tick(uv_timer_t *timer)
{
    acquire_op_t *a = timer->data;
    ah_lease_view_t view;
    bool known = ah_leases_view(a->leases, a->name, &view);
    bool store_failed =
        known && view.attempts > a->since && view.last_rc != 0 && view.last_rc != AH_ECONFLICT;
    bool late = a->deadline_us != 0 && ah_mono_us() >= a->deadline_us;
    if (!known || view.held || store_failed || late) {
        uv_timer_stop(&a->timer);
        uv_close((uv_handle_t *)&a->timer, free_acquire);
        ah_lua_op_done(&a->op);
    }
}

static void cancel_acquire(ah_lua_op_t *op)
{
    acquire_op_t *a = (acquire_op_t *)op;
    ah_leases_unwant(a->leases, a->name);
    uv_timer_stop(&a->timer);
    uv_close((uv_handle_t *)&a->timer, free_acquire);
}

/* core.declare(name, ttl, keep) -> true | nil, msg */
static int lease_declare(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    lua_Number ttl = luaL_checknumber(L, 2);
    bool keep = lua_toboolean(L, 3);
    ah_leases_t *lk = keeper_of(L);
    char err[AH_ERRLEN];
    int rc = lk != NULL ? ah_leases_declare(lk, name, (double)ttl, keep, err, sizeof(err))
                        : ah_leases_check(name, (double)ttl, err, sizeof(err));
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* core.want(name) -> since: starts acquiring; the number to give wait() and outcome(). */
static int lease_want(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    ah_leases_t *lk = keeper_of(L);
    lua_pushnumber(L, lk != NULL ? (lua_Number)ah_leases_want(lk, name) : 0);
    return 1;
}

/* core.wait(name, since, timeout|nil) -> true, or nil, msg, code when the call's waits are
 * cancelled. Suspends the task until the lease is held, a store call after `since` failed, or
 * the timeout passed. */
static int lease_wait(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    lua_Number since = luaL_checknumber(L, 2);
    lua_Number timeout = luaL_optnumber(L, 3, -1);
    ah_leases_t *lk = keeper_of(L);
    if (lk == NULL) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (!ah_lua_can_wait(L)) {
        return luaL_error(L, "lease:acquire: cannot wait here (not a task of the running call)");
    }
    int cancelled = ah_lua_push_cancelled(L);
    if (cancelled > 0) {
        ah_leases_unwant(lk, name);
        return cancelled;
    }
    acquire_op_t *a = calloc(1, sizeof(*a));
    if (a == NULL) {
        return luaL_error(L, "lease:acquire: out of memory");
    }
    a->op.cancel = cancel_acquire;
    a->leases = lk;
    ah_strlcpy(a->name, name, sizeof(a->name));
    a->since = (uint64_t)since;
    if (timeout >= 0) {
        double t = timeout > LEASE_WAIT_MAX_S ? LEASE_WAIT_MAX_S : (double)timeout;
        a->deadline_us = ah_mono_us() + (int64_t)(t * 1e6);
    }
    uv_loop_t *loop = ah_lua_loop(L);
    uv_timer_init(loop, &a->timer);
    a->timer.data = a;
    uv_update_time(loop);
    uv_timer_start(&a->timer, on_acquire_tick, 0, LEASE_WAIT_TICK_MS);
    return ah_lua_op_wait(L, &a->op, "lease:acquire");
}

/* core.outcome(name, since, timeout|nil) -> true | nil, msg, "store" | "timeout" */
static int lease_outcome(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    lua_Number since = luaL_checknumber(L, 2);
    ah_leases_t *lk = keeper_of(L);
    ah_lease_view_t view;
    if (lk == NULL) {
        lua_pushnil(L);
        lua_pushstring(L, "leases need the control store (this agent runs without one)");
        lua_pushstring(L, "store");
        return 3;
    }
    if (!ah_leases_view(lk, name, &view)) {
        lua_pushnil(L);
        lua_pushfstring(L, "lease %s is not known any more (dropped by a reload)", name);
        lua_pushstring(L, "store");
        return 3;
    }
    if (view.held) {
        lua_pushboolean(L, 1);
        return 1;
    }
    ah_leases_unwant(lk, name);
    lua_pushnil(L);
    if (view.attempts > (uint64_t)since && view.last_rc != 0 && view.last_rc != AH_ECONFLICT) {
        lua_pushfstring(L, "lease %s: %s", name, view.last_error);
        lua_pushstring(L, "store");
    } else {
        lua_pushfstring(L, "lease %s: held by another agent", name);
        lua_pushstring(L, "timeout");
    }
    return 3;
}

/* core.status(name) -> held, token|nil */
static int lease_status(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    ah_leases_t *lk = keeper_of(L);
    ah_lease_view_t view;
    if (lk == NULL || !ah_leases_view(lk, name, &view)) {
        lua_pushboolean(L, 0);
        lua_pushnil(L);
        return 2;
    }
    lua_pushboolean(L, view.held);
    if (view.token > 0) {
        lua_pushnumber(L, (lua_Number)view.token);
    } else {
        lua_pushnil(L);
    }
    return 2;
}

/* core.release(name) */
static int lease_release(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    ah_leases_t *lk = keeper_of(L);
    if (lk != NULL) {
        ah_leases_release(lk, name);
    }
    return 0;
}

/* core.cron_next(spec, after) -> seconds since the epoch of the next match, or nil, msg for a
 * bad expression (-1 when it never matches within 8 years). */
static int lease_cron_next(lua_State *L)
{
    const char *spec = luaL_checkstring(L, 1);
    lua_Number after = luaL_checknumber(L, 2);
    ah_cron_t cron;
    char err[AH_ERRLEN];
    if (ah_cron_parse(spec, &cron, err, sizeof(err)) != 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    lua_pushnumber(L, (lua_Number)ah_cron_next(&cron, (int64_t)floor(after)));
    return 1;
}

static const luaL_Reg lease_functions[] = {
    {"declare", lease_declare},     {"want", lease_want},
    {"wait", lease_wait},           {"outcome", lease_outcome},
    {"status", lease_status},       {"release", lease_release},
    {"cron_next", lease_cron_next}, {NULL, NULL},
};

int ah_lua_lease_open(lua_State *L)
{
    void *keeper = lua_touserdata(L, lua_upvalueindex(1));
    lua_newtable(L);
    for (const luaL_Reg *r = lease_functions; r->name != NULL; r++) {
        lua_pushlightuserdata(L, keeper);
        lua_pushcclosure(L, r->func, 1);
        lua_setfield(L, -2, r->name);
    }
    return 1;
}
