/* Inside the libcurl plugin (agenthost_curl.so, built from core/curl/): the functions behind the
 * ah_curl_plugin_t table (ah_curl_plugin.h). Everything defined in the plugin carries the prefix
 * ahc_ (files core/curl/ahc_*.[ch], functions ahc_*), the core's front the prefix ah_
 * (core/ah_curl.[ch]), so a name says on which side of the dlopen boundary it lives. Each
 * function has the contract of its front in ah_curl.h. Compiled with -fvisibility=hidden: none
 * of these names leave the plugin. */
#ifndef AHC_H
#define AHC_H

#include "ah_curl_plugin.h"

#include <stdbool.h>

/* curl_global_init, once per process (thread-safe). 0 or AH_EIO. */
int ahc_global_init(void);

/* agent.http's C half (core/curl/ahc_lua_http.c): pushes the module table {start, wait, result,
 * release}. Stack: [-0, +1]. */
int ahc_lua_http_open(lua_State *L);

/* Makes libcurl's own calls of poll() call fn instead of libc's poll (core/curl/ahc_poll_hook.c):
 * false, and libcurl untouched, when its poll entry cannot be found or rewritten. Call once. */
struct pollfd;
bool ahc_poll_hook_install(int (*fn)(struct pollfd *, unsigned long, int));

/* ctl's blocking request (core/curl/ahc_request.c). */
int ahc_request(const ah_curl_request_t *req, char **body, char *err, size_t errlen);

#endif
