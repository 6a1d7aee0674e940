/* The Lua host (see ah_lua.h): one LuaJIT state per agent, with its own libuv loop. This file
 * opens and closes it. Opening runs protected, like luajit.c's pmain: standard libraries,
 * `cjson`, the embedded lua/<name>.lua modules and the C half of the agent module ("agent.core",
 * core/ah_lua_core.c) are registered in package.preload, package.path gets the script's
 * directory first, the script runs (through the one call wrapper, core/ah_lua_call.c) and its
 * contract is checked, and its functions are kept as registry refs. The rest of the host: calls
 * and the time budget in core/ah_lua_call.c, tasks and waits in core/ah_lua_task.c
 * (ah_lua_internal.h shows how the files fit). */
#include "ah_lua_internal.h"

#include "ah_log.h"
#include "ah_curl.h"
#include "ah_lua_lease.h"
#include "ah_mongo.h"
#include "ah_metrics.h"

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
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
    const char *name;          /* the require() name: lua/agent_queue.lua is "agent.queue" */
    const char *file;          /* the file under lua/, for the chunk name */
    const unsigned char *data; /* the source */
    size_t size;
    const unsigned char *bytecode; /* compiled at build time (cmake/lua_bytecode.c); NULL: none */
    size_t bytecode_size;
} ah_lua_module_t;
extern const ah_lua_module_t ah_lua_modules[];

const char *const ah_lua_fn_names[FN_COUNT] = {"init",      "batch",       "on_pause",
                                               "on_resume", "on_shutdown", "on_reload"};

const char ah_lua_registry_key = 'h';

/* The allocator used when LUA_MEMORY_LIMIT is set: counts every byte and, while user Lua runs,
 * refuses growth beyond the limit (Lua then raises "not enough memory"; the state stays usable).
 * Shrinking and freeing always succeed. Only safe with the JIT compiler off
 * (jit_off_for_memory_limit). */
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
        lua->memory_refused = true;
        /* Remember where (lua_getstack/lua_getinfo "Sl" allocate nothing): the running task's
         * innermost Lua frame, while its line is still known. */
        lua->memory_where[0] = '\0';
        lua_State *co = lua->current != NULL ? lua->current->co : NULL;
        lua_Debug ar;
        for (int level = 0; co != NULL && lua_getstack(co, level, &ar); level++) {
            if (lua_getinfo(co, "Sl", &ar) && ar.currentline > 0) {
                snprintf(lua->memory_where, sizeof(lua->memory_where), " at %s:%d", ar.short_src,
                         ar.currentline);
                break;
            }
        }
        return NULL;
    }
    void *p = realloc(ptr, nsize);
    if (p == NULL) {
        return NULL;
    }
    lua->memory_used = lua->memory_used - old + nsize;
    return p;
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

/* package.preload function of an embedded lua/<name>.lua module: loads the module when it is
 * first required (a script that never requires agent.queue never pays for it), from its bytecode
 * or else its source, and runs it with require's argument. Upvalue 1: the ah_lua_module_t. Stack:
 * [-n, +1]; raises the compile error of a broken module (a build bug) and the module's own errors.
 */
static int load_embedded(lua_State *L)
{
    const ah_lua_module_t *m = lua_touserdata(L, lua_upvalueindex(1));
    lua_pushfstring(L, "@lua/%s", m->file);
    int status = LUA_ERRSYNTAX;
    if (m->bytecode != NULL) {
        status =
            luaL_loadbuffer(L, (const char *)m->bytecode, m->bytecode_size, lua_tostring(L, -1));
        if (status != 0) {
            lua_pop(L, 1); /* refused by this LuaJIT (another build of it): the source instead */
        }
    }
    if (status != 0 &&
        luaL_loadbuffer(L, (const char *)m->data, m->size, lua_tostring(L, -1)) != 0) {
        return lua_error(L);
    }
    lua_replace(L, -2); /* the chunk, in place of its name */
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
}

/* Registers cjson, agent.core and every embedded lua/<name>.lua module (compiled when first
 * required) in package.preload. Stack: [-0, +0]. */
static void register_preloads(lua_State *L, ah_lua_t *lua)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");

    lua_pushcfunction(L, luaopen_cjson);
    lua_setfield(L, -2, "cjson");

    lua_pushlightuserdata(L, lua);
    lua_pushcclosure(L, ah_lua_core_open, 1);
    lua_setfield(L, -2, "agent.core");

    lua_pushlightuserdata(L, lua->mongo);
    lua_pushcclosure(L, ah_lua_mongo_open, 1);
    lua_setfield(L, -2, "agent.mongo");

    lua_pushcfunction(L, ah_lua_http_open);
    lua_setfield(L, -2, "agent.http.core");

    lua_pushlightuserdata(L, lua->leases);
    lua_pushcclosure(L, ah_lua_lease_open, 1);
    lua_setfield(L, -2, "agent.lease.core");

    for (const ah_lua_module_t *m = ah_lua_modules; m->name != NULL; m++) {
        lua_pushlightuserdata(L, (void *)m);
        lua_pushcclosure(L, load_embedded, 1);
        lua_setfield(L, -2, m->name);
    }
    lua_pop(L, 2); /* preload, package */
}

/* The contract's names, NULL-terminated, for ah_suggest(). */
static const char *const *contract_names(void)
{
    static const char *names[FN_COUNT + 1];
    for (int i = 0; i < FN_COUNT; i++) {
        names[i] = ah_lua_fn_names[i];
    }
    names[FN_COUNT] = NULL;
    return names;
}

static bool is_contract_name(const char *key)
{
    for (int i = 0; i < FN_COUNT; i++) {
        if (strcmp(key, ah_lua_fn_names[i]) == 0) {
            return true;
        }
    }
    return false;
}

/* Copies into out (size n) a string key of the script's table (at index module) that is not a
 * contract name but most likely meant `wanted` ("Batch", "bacth", "init_"); "" when none.
 * Stack: [-0, +0]. */
static void misspelling_of(lua_State *L, int module, const char *wanted, char *out, size_t n)
{
    const char *const one[] = {wanted, NULL};
    out[0] = '\0';
    lua_pushnil(L);
    while (lua_next(L, module) != 0) {
        lua_pop(L, 1); /* the value */
        if (lua_type(L, -1) == LUA_TSTRING && !is_contract_name(lua_tostring(L, -1)) &&
            ah_suggest(lua_tostring(L, -1), one, NULL) != NULL) {
            ah_strlcpy(out, lua_tostring(L, -1), n);
        }
    }
}

/* Checks the table on top of the stack (the script's return value) and keeps its functions as
 * registry refs. Raises "<path>: ..." on a contract violation. Stack: [-0, +0]. */
static void resolve_functions(lua_State *L, ah_lua_t *lua)
{
    int module = lua_gettop(L);
    for (int i = 0; i < FN_COUNT; i++) {
        lua_getfield(L, module, ah_lua_fn_names[i]);
        if (lua_isfunction(L, -1)) {
            lua->fn_refs[i] = luaL_ref(L, LUA_REGISTRYINDEX);
            continue;
        }
        if (i == FN_BATCH) {
            if (lua_isnil(L, -1)) {
                char typo[64];
                misspelling_of(L, module, "batch", typo, sizeof(typo));
                if (typo[0] != '\0') {
                    luaL_error(L,
                               "%s: script does not define function batch (it defines '%s': did "
                               "you mean 'batch'?)",
                               lua->script, typo);
                }
                luaL_error(L, "%s: script does not define function batch", lua->script);
            }
            luaL_error(L, "%s: batch must be a function (got %s)", lua->script,
                       luaL_typename(L, -1));
        }
        if (!lua_isnil(L, -1)) {
            luaL_error(L, "%s: %s must be a function (got %s)", lua->script, ah_lua_fn_names[i],
                       luaL_typename(L, -1));
        }
        lua_pop(L, 1);
    }
}

/* Warns about every key of the script's table (on top of the stack) that is not a contract name
 * but looks like one: compared case-insensitively, without '_' and by spelling ("onPause",
 * "Init", "init_", "on_puase"), and every other "on_*" key (no hook has that name). */
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
        if (is_contract_name(key)) {
            continue;
        }
        const char *closest = ah_suggest(key, contract_names(), NULL);
        if (closest != NULL) {
            ah_log_warn("%s: the script's table has '%s', which is not %s (did you mean '%s'?)",
                        lua->script, key,
                        strncmp(closest, "on_", 3) == 0 ? "a hook" : "a contract function",
                        closest);
        } else if (strncmp(key, "on_", 3) == 0) {
            ah_log_warn("%s: the script's table has '%s', which is not a hook (hooks: on_pause, "
                        "on_resume, on_shutdown, on_reload)",
                        lua->script, key);
        }
    }
}

long long ah_lua_iteration(const ah_lua_t *lua)
{
    return lua->iteration;
}

void ah_lua_set_iteration(ah_lua_t *lua, long long iteration)
{
    lua->iteration = iteration;
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

/* jit.on() under LUA_MEMORY_LIMIT: the compiler stays off (see jit_off_for_memory_limit). */
static int jit_on_refused(lua_State *L)
{
    (void)L;
    ah_log_warn("jit.on() ignored: the JIT compiler stays off while LUA_MEMORY_LIMIT is set");
    return 0;
}

/* With LUA_MEMORY_LIMIT the JIT compiler is turned off and jit.on() does nothing. The limit
 * works by refusing an allocation (limited_alloc returns NULL, LuaJIT raises "not enough
 * memory"), and LuaJIT 2.1 cannot raise that error from compiled code: lj_err_mem() reads the
 * current frame through L->base, which is stale while a trace runs, so an allocation refused
 * inside a trace (a table or a string a compiled loop creates) dereferenced a bogus function
 * object and crashed the agent (SIGSEGV in lj_err_mem, called from lj_mem_newgco / newtab /
 * lj_tab_new1 on a trace). The interpreter keeps its frames current, so there the error is an
 * ordinary Lua error. Raises on failure (inside open_protected). */
static void jit_off_for_memory_limit(lua_State *L)
{
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
    lua_getglobal(L, "jit");
    if (lua_istable(L, -1)) {
        lua_pushcfunction(L, jit_on_refused);
        lua_setfield(L, -2, "on");
    }
    lua_pop(L, 1);
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
    if (lua->memory_limit > 0) {
        jit_off_for_memory_limit(L);
    }

    lua_pushlightuserdata(L, (void *)&ah_lua_registry_key);
    lua_pushlightuserdata(L, lua);
    lua_rawset(L, LUA_REGISTRYINDEX);

    lua_pushcfunction(L, ah_lua_traceback_of);
    lua->traceback_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    ah_lua_core_register_task_meta(L, lua);
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
    if (ah_lua_call_user(lua, 0, 1, err, sizeof(err)) != AH_OK) {
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
    rc = uv_async_init(&lua->loop, &lua->wake, ah_lua_task_on_wake);
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
    uv_timer_init(&lua->loop, &lua->drain);
    lua->drain.data = lua;
    uv_unref((uv_handle_t *)&lua->drain);
    uv_timer_init(&lua->loop, &lua->lease_guard);
    lua->lease_guard.data = lua;
    uv_unref((uv_handle_t *)&lua->lease_guard);
    task_t *main = lua->main_task;
    main->lua = lua;
    main->co_ref = LUA_NOREF;
    main->handle_ref = LUA_NOREF;
    main->ended = true;
    uv_timer_init(&lua->loop, &main->timer);
    main->timer.data = main;
    return AH_OK;
}

/* Closes the Lua state; the one way any path does it. Work in flight on the thread pool
 * (ah_lua_queue_work: a driver call whose wait was cancelled, or whose call failed) owns
 * memory and a completion callback that reaches into the state: the loop runs until every such
 * job has called back first. Jobs that had not started were cancelled by their op (uv_cancel)
 * and call back at once; a running one is bounded by its own timeouts (the driver's
 * socketTimeoutMS / serverSelectionTimeoutMS) and, at exit, by SHUTDOWN_TIMEOUT. */
static void close_state(ah_lua_t *lua)
{
    if (lua->pending_work > 0) {
        int64_t start = ah_mono_us();
        ah_log_debug("waiting for %d job(s) in flight on the thread pool before closing the "
                     "Lua state",
                     lua->pending_work);
        while (lua->pending_work > 0) {
            uv_run(&lua->loop, UV_RUN_ONCE);
        }
        ah_log_debug("jobs in flight finished after %.3fs", (double)(ah_mono_us() - start) / 1e6);
    }
    lua_close(lua->L);
    lua->L = NULL;
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
    lua->leases = opts->leases;
    lua->batch_timeout = opts->batch_timeout;
    lua->batch_timeout_us = opts->batch_timeout > 0 ? (int64_t)(opts->batch_timeout * 1e6) : 0;
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
    ah_lua_call_install_signal();
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
    if (opts->publish != NULL) {
        opts->publish(opts->publish_ud, lua);
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
    if (opts->publish != NULL) {
        opts->publish(opts->publish_ud, NULL);
    }
    close_state(lua);
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
    close_state(lua); /* then: __gc of modules' objects may close their handles */
    loop_close(lua);
    if (lua->metrics_owned) {
        ah_metrics_free(lua->metrics);
    }
    free(lua->script);
    free(lua);
}
