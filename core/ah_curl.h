/* The core's libcurl front (implemented in ah_curl.c): loading the libcurl plugin
 * (agenthost_curl.so, ah_curl_plugin.h) on first use, and the entry points that forward to it:
 * agent.http's C half (ah_lua_http_open, reached by `require "agent.http"`) and the one
 * blocking request of `agenthost ctl` (ah_curl_request). An agent whose script never requires
 * agent.http never maps libcurl. The plugin is found like the MongoDB plugin (ah_plugin.h).
 *
 * Threads: ah_curl_load/ah_curl_request on any thread (the first call loads, every later call
 * returns the same outcome); ah_lua_http_open on the Lua worker thread. */
#ifndef AH_CURL_H
#define AH_CURL_H

#include "ah_curl_plugin.h"

#include <stddef.h>

struct lua_State;

/* Loads the plugin (once per process) and returns its table, or NULL with err set, e.g. "HTTP
 * client support (libcurl) is not available: agenthost_curl.so not found in ...". */
const ah_curl_plugin_t *ah_curl_load(char *err, size_t errlen);

/* The table if the plugin has already been loaded, else NULL. Never loads. */
const ah_curl_plugin_t *ah_curl_loaded(void);

/* package.preload["agent.http.core"]: loads the plugin and pushes the module table {start, wait,
 * result, release} (core/curl/ahc_lua_http.c; lua/agent_http.lua shapes the public functions,
 * docs/LUA.md). Raises "agent.http: HTTP client support (libcurl) is not available: ..." when the
 * plugin cannot be loaded. Stack: [-0, +1]. */
int ah_lua_http_open(struct lua_State *L);

/* Performs one blocking request (every resolved address tried). Returns the status code (> 0)
 * and the malloc'd body in *body (caller frees), or a negative AH_E* with err set (AH_ETIMEOUT
 * when the request took longer than req->timeout_s; AH_EIO for anything else, including a plugin
 * that cannot be loaded). */
int ah_curl_request(const ah_curl_request_t *req, char **body, char *err, size_t errlen);

#endif
