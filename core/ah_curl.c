/* Implementation of ah_curl.h: the libcurl plugin is loaded on the first HTTP request of the
 * process (agent.http's require, ctl), so an agent that never makes one never maps libcurl. */
#include "ah_curl.h"

#include "ah_common.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>

#include <lauxlib.h>
#include <lua.h>

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
/* Set once, at the end of the first load (read without the once by ah_curl_loaded). */
static _Atomic(const ah_curl_plugin_t *) loaded_plugin;
static char load_error[AH_ERRLEN * 2];

static void load_plugin(void)
{
    atomic_store(&loaded_plugin, (const ah_curl_plugin_t *)ah_plugin_open(
                                     AH_CURL_PLUGIN_FILE, AH_CURL_PLUGIN_SYMBOL, AH_CURL_PLUGIN_ABI,
                                     load_error, sizeof(load_error)));
}

const ah_curl_plugin_t *ah_curl_load(char *err, size_t errlen)
{
    pthread_once(&load_once, load_plugin);
    const ah_curl_plugin_t *plugin = atomic_load(&loaded_plugin);
    if (plugin == NULL) {
        snprintf(err, errlen, "HTTP client support (libcurl) is not available: %s", load_error);
    }
    return plugin;
}

const ah_curl_plugin_t *ah_curl_loaded(void)
{
    return atomic_load(&loaded_plugin);
}

int ah_lua_http_open(lua_State *L)
{
    char err[AH_ERRLEN * 2];
    const ah_curl_plugin_t *plugin = ah_curl_load(err, sizeof(err));
    if (plugin == NULL) {
        return luaL_error(L, "agent.http: %s", err);
    }
    lua_pushcfunction(L, plugin->lua_http_open);
    lua_pushvalue(L, 1); /* the module name, as require passed it */
    lua_call(L, 1, 1);
    return 1;
}

int ah_curl_request(const ah_curl_request_t *req, char **body, char *err, size_t errlen)
{
    *body = NULL;
    const ah_curl_plugin_t *plugin = ah_curl_load(err, errlen);
    return plugin != NULL ? plugin->request(req, body, err, errlen) : AH_EIO;
}
