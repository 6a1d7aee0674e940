/* The Lua host (see ah_lua.h): one LuaJIT state per agent. Opening runs protected, like
 * luajit.c's pmain: standard libraries, `cjson`, the embedded lua/<name>.lua modules and the C half
 * of the agent module ("agent.core") are registered in package.preload, package.path gets the
 * script's directory first, the script runs and its contract is checked, and its functions are
 * kept as registry refs. Every later call of user Lua goes through call_user(), the one wrapper
 * that installs the traceback handler, arms and disarms the time budget, marks the call in the
 * shared state and turns errors into "<error>\n<traceback>". The budget is enforced the way
 * luajit.c handles SIGINT: ah_lua_interrupt() signals the Lua thread, whose handler installs a
 * hook, and the hook raises the timeout error inside the Lua thread; a call sequence number
 * makes a late interrupt harmless. */
#include "ah_lua.h"

#include "ah_log.h"
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

struct ah_lua_s {
    lua_State *L;
    ah_state_t *state; /* not owned; may be NULL */
    char agent_id[AH_NAME_MAX + 1];
    char *script; /* owned copy of the script path */
    double batch_timeout;
    int fn_refs[FN_COUNT]; /* LUA_NOREF for an undefined optional function */
    int ctx_ref;           /* the ctx table passed to init and batch */
    int traceback_ref;     /* traceback_handler, created once (pushing a C function allocates) */
    long long iteration;   /* batch calls so far, including the running one */

    /* Time budget. call_seq is odd while a call of user Lua runs; interrupt_seq holds the
     * call_seq value of the call an interrupt is aimed at (0: none). Both are written by any
     * thread (atomics); the rest is Lua-thread only. */
    _Atomic uint64_t call_seq;
    _Atomic uint64_t interrupt_seq;
    _Atomic uint64_t call_generation; /* the state object's number for the running call */
    _Atomic pthread_t thread;         /* the thread running the calls (the signal's target) */
    atomic_bool hook_set;             /* a hook may be installed: the call's end must remove it */
    bool timed_out;                   /* the running call was stopped by the budget */
    int64_t deadline_us;              /* monotonic deadline of the running call, 0 if none */

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
};

/* Values pinned at the bottom of the main Lua stack for the life of the state, so that the hot
 * path (a batch) pushes them with lua_pushvalue instead of registry lookups. */
enum { SLOT_TRACEBACK = 1, SLOT_CTX, SLOT_BATCH, SLOT_COUNT = SLOT_BATCH };

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
    if (lua != NULL && atomic_load(&lua->interrupt_seq) != 0) {
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

/* Aims an interrupt at the call numbered seq (odd) and signals its thread. */
static void interrupt_call_seq(ah_lua_t *lua, uint64_t seq)
{
    atomic_store(&lua->interrupt_seq, seq);
    pthread_kill(atomic_load(&lua->thread), AH_LUA_INTERRUPT_SIGNAL);
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

/* ---- the one call wrapper ---------------------------------------------------------------- */

/* Error handler: turns the error value into "<error>\n<traceback>" (luajit.c's traceback). */
static int traceback_handler(lua_State *L)
{
    if (!lua_isstring(L, 1)) { /* non-string error object */
        if (lua_isnoneornil(L, 1) || !luaL_callmeta(L, 1, "__tostring") || !lua_isstring(L, -1)) {
            lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
        }
        lua_replace(L, 1);
        lua_settop(L, 1);
    }
    luaL_traceback(L, L, lua_tostring(L, 1), 1);
    return 1;
}

/* Calls the function below the nargs arguments on top of the stack, protected, under the time
 * budget, with the traceback handler at stack index `handler` (SLOT_TRACEBACK once the state is
 * open). Stack: [-(nargs + 1), +nresults] on success, [-(nargs + 1), +0] on failure. Returns 0,
 * AH_ELUA or AH_ETIMEOUT (err filled). Lua thread only. */
static int call_user_with(ah_lua_t *lua, int handler, int nargs, int nresults, char *err,
                          size_t errlen)
{
    lua_State *L = lua->L;
    budget_arm(lua);
    lua->memory_armed = lua->memory_limit > 0;
    int status = lua_pcall(L, nargs, nresults, handler);
    lua->memory_armed = false;
    bool timed_out = lua->timed_out;
    budget_disarm(lua);
    if (status == 0) {
        return AH_OK;
    }
    if (status == LUA_ERRMEM && lua->memory_limit > 0) {
        snprintf(err, errlen,
                 "not enough memory: the script exceeded LUA_MEMORY_LIMIT (%zu bytes; %zu in use)",
                 lua->memory_limit, lua->memory_used);
        lua_pop(L, 1);
        lua_gc(L, LUA_GCCOLLECT, 0); /* give the garbage of the failed call back at once */
        return AH_ELUA;
    }
    const char *msg = lua_tostring(L, -1);
    snprintf(err, errlen, "%s", msg != NULL ? msg : "(error object is not a string)");
    lua_pop(L, 1);
    return timed_out ? AH_ETIMEOUT : AH_ELUA;
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

static int call_user(ah_lua_t *lua, int nargs, int nresults, char *err, size_t errlen)
{
    return call_user_with(lua, SLOT_TRACEBACK, nargs, nresults, err, errlen);
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

/* core.sleep(seconds) -> true if woken early (a command arrived or shutdown was requested),
 * false if the full time passed. Never sleeps past the running call's budget: at the deadline it
 * raises the timeout error instead. */
static int core_sleep(lua_State *L)
{
    ah_lua_t *lua = host_upvalue(L);
    lua_Number seconds = luaL_checknumber(L, 1);
    luaL_argcheck(L, seconds >= 0, 1, "must be a non-negative number of seconds"); /* NaN too */
    if (seconds > SLEEP_MAX_SECONDS) {
        seconds = SLEEP_MAX_SECONDS;
    }
    bool past_deadline = false;
    if (lua->deadline_us > 0) {
        double left = (double)(lua->deadline_us - ah_mono_us()) / 1e6;
        if (left < 0) {
            left = 0;
        }
        if (seconds >= left) {
            seconds = left;
            past_deadline = true;
        }
    }
    bool woken = false;
    if (lua->state != NULL) {
        woken = ah_state_sleep(lua->state, seconds);
    } else if (seconds > 0) {
        ah_sleep(seconds);
    }
    if (past_deadline && !woken) {
        return raise_timeout(L, lua);
    }
    lua_pushboolean(L, woken);
    return 1;
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

    lua_pushcfunction(L, traceback_handler);
    lua->traceback_ref = luaL_ref(L, LUA_REGISTRYINDEX);
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
    lua_rawgeti(L, LUA_REGISTRYINDEX, lua->traceback_ref);
    lua_insert(L, 1);
    if (call_user_with(lua, 1, 0, 1, err, sizeof(err)) != AH_OK) {
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

    lua->script = strdup(script_path);
    if (lua->script == NULL) {
        snprintf(err, errlen, "out of memory");
        goto fail_free;
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
    /* Pin the hot values (see SLOT_*); pushing a short string cannot fail for lack of memory
     * in practice, and these three pushes need no protection otherwise. */
    lua_rawgeti(lua->L, LUA_REGISTRYINDEX, lua->traceback_ref);
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
    lua_close(lua->L);
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

/* Pushes the ev table for a hook. Stack: [-0, +1]. */
static void push_event(lua_State *L, const ah_event_t *ev)
{
    char timestamp[AH_TIMESTAMP_LEN];
    ah_format_timestamp(ev->timestamp_us, timestamp);
    lua_createtable(L, 0, 6);
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
