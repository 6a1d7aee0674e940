/* The ABI between the core and the libcurl plugin (agenthost_curl.so, built from core/curl/).
 * Everything that links libcurl lives in the plugin, so a process that never makes an HTTP
 * request never maps libcurl and what it pulls in (OpenSSL, Kerberos, LDAP, libssh2, nghttp2,
 * ...; the resident cost is measured in docs/ARCHITECTURE.md). The core loads the plugin with
 * dlopen on first use (ah_curl.h: `require "agent.http"`, `agenthost ctl`) and calls it only
 * through this table; the plugin calls back into the core's ah_* functions (the Lua worker's
 * loop and waits, ah_buf_t), which the agenthost executable and libagenthost.so export.
 *
 * The plugin exports exactly one symbol, AH_CURL_PLUGIN_SYMBOL, a const ah_curl_plugin_t whose
 * header (ah_plugin.h) must carry AH_CURL_PLUGIN_ABI and this agenthost version. Each function
 * has the contract of its front in ah_curl.h; the plugin's own code carries the prefix ahc_
 * (core/curl/ahc.h). */
#ifndef AH_CURL_PLUGIN_H
#define AH_CURL_PLUGIN_H

#include "ah_plugin.h"

#include <stdbool.h>
#include <stddef.h>

#include <lua.h>

/* Bump on any change to this table or to the types it passes. */
#define AH_CURL_PLUGIN_ABI 1
#define AH_CURL_PLUGIN_SYMBOL "ah_curl_plugin_v1"
#define AH_CURL_PLUGIN_FILE "agenthost_curl.so"

/* One blocking request (ah_curl_request in ah_curl.h). */
typedef struct ah_curl_request_s {
    const char *url;         /* http:// or https://, already checked for control characters */
    const char *method;      /* "GET" or "POST" (sent with an empty body) */
    const char *auth_header; /* a whole header line ("Authorization: Bearer ...") or NULL */
    const char *user_agent;
    double timeout_s;    /* the whole request */
    size_t max_body;     /* a longer answer fails the request */
    const char *ca_file; /* CA bundle for https (NULL: the system's) */
    bool tls_verify;     /* false: no certificate or host name check */
} ah_curl_request_t;

typedef struct ah_curl_plugin_s {
    ah_plugin_header_t header; /* AH_CURL_PLUGIN_ABI and AH_VERSION, checked first */
    /* ah_lua_http_open (ah_curl.h): package.preload["agent.http.core"] */
    lua_CFunction lua_http_open;
    /* ah_curl_request (ah_curl.h) */
    int (*request)(const ah_curl_request_t *req, char **body, char *err, size_t errlen);
    /* curl_version_info()->version: the libcurl the plugin runs with. */
    const char *(*curl_version)(void);
} ah_curl_plugin_t;

#endif
