/* agent.http's C half: HTTP requests on libcurl's multi interface, driven by the Lua worker's
 * libuv loop (curl's socket and timer callbacks: a uv_poll_t per socket, one uv_timer_t). One
 * multi handle per Lua state keeps connections alive between requests. lua/agent_http.lua shapes
 * the public functions (request, get, post); see docs/LUA.md.
 *
 * Threads: the Lua worker thread only. */
#ifndef AH_LUA_HTTP_H
#define AH_LUA_HTTP_H

struct lua_State;

/* package.preload["agent.http.core"]: pushes the module table {start, wait, result}.
 * Stack: [-0, +1]. */
int ah_lua_http_open(struct lua_State *L);

/* curl_global_init, once per process (thread-safe). 0 or AH_EIO. */
int ah_curl_init(void);

#endif
