/* The HTTP API (docs/API.md) on libmicrohttpd. One access handler drains any request body, routes
 * the request through one table to a handler of core/ah_http_handlers.c, which builds its whole
 * JSON body in an ah_buf_t before one response is queued, or parks the request (its answer is
 * queued when the connection resumes). GET routes read only a state snapshot (never the store,
 * so they cannot block on MongoDB); cluster commands and history go through the store on the
 * store workers of core/ah_http_park.c. The layers call one way: this file → the handlers →
 * parking (core/ah_http_park.h: replies, request contexts, parked requests) → state, store, JSON.
 * Requests are served on libmicrohttpd's worker threads, which never block; the only shared data
 * are the state object (thread-safe), the store (thread-safe), the parked requests (the parking's
 * lock) and the read-only configuration. */
#include "ah_http.h"

#include "ah_http_handlers.h"

#include "ah_console.h"
#include "ah_json.h"
#include "ah_log.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define HTTP_URL_MAX 8192         /* path + query, bytes */
#define HTTP_QUERY_PARAMS_MAX 64  /* query parameters per request */
#define HTTP_BODY_MAX 4096        /* request bodies are ignored, but bounded */
#define HTTP_BODY_DRAIN_MAX 65536 /* a chunked body past this closes the connection */
/* Per-connection pool, which holds the request line and headers (past it libmicrohttpd answers
 * 414 itself). It takes a pool of up to 32 KiB from malloc but mmaps a larger one at every
 * connection and zeroes the unused part of its read buffer: fresh pages and an munmap per
 * connection, 5x the CPU of a probe or any one-request connection (docs/BENCHMARKS.md). */
#define HTTP_MEMORY_LIMIT 32768
#define HTTP_CONNECTION_TIMEOUT 30 /* seconds of inactivity */
#define HTTP_PATH_IN_ERROR 200     /* bytes of a path quoted in a 404 message */

#define HTTP_DRAIN_MS 2000            /* ah_http_stop(): max wait for requests in flight */
#define HTTP_STOP_SEND_RESERVE_S 0.25 /* ah_http_stop(): budget kept to send the last answers */

/* Request contexts (http_request_t, core/ah_http_park.h) are allocated only for requests that
 * carry a body or are parked. Request contexts that need no memory: an over-long URL (set by the
 * URI log callback) and a request without a body whose headers have been seen. libmicrohttpd
 * 0.9.75 closes the connection after any response queued during the first call of the access
 * handler, so keep-alive requires answering on the second call; these markers make that
 * allocation-free. A marker never reaches a handler: the context is NULL again before routing. */
static char url_too_long_marker;
static char too_many_params_marker;
static char headers_seen_marker;

static bool is_marker(const void *req_cls)
{
    return req_cls == &url_too_long_marker || req_cls == &too_many_params_marker ||
           req_cls == &headers_seen_marker;
}

/* ---- authorization ----------------------------------------------------------------------- */

/* Compares a and b without an early exit on the first differing byte. */
static bool token_equal(const char *a, const char *b)
{
    size_t na = strlen(a);
    size_t nb = strlen(b);
    volatile unsigned char diff = (unsigned char)(na != nb);
    for (size_t i = 0; i < na; i++) {
        diff |= (unsigned char)a[i] ^ (unsigned char)b[nb ? i % nb : 0];
    }
    return diff == 0;
}

/* True when no token is configured or the request carries "Authorization: Bearer <token>". */
static bool authorized(const http_call_t *call)
{
    const char *token = call->http->cfg->api_token;
    if (token == NULL || token[0] == '\0') {
        return true;
    }
    const char *value =
        MHD_lookup_connection_value(call->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (value == NULL || strncasecmp(value, "Bearer ", 7) != 0) {
        return false;
    }
    value += 7;
    while (*value == ' ') {
        value++;
    }
    return token_equal(value, token);
}

/* ---- browsers: cross-site requests and DNS rebinding ------------------------------------ */

/* The host part of a Host header or an origin's authority, without the port: "[::1]:80" →
 * "::1", "Agent-1:8000" → "agent-1" (lower case). False when it does not fit. */
static bool host_name(const char *authority, size_t len, char *out, size_t n)
{
    const char *end = authority + len;
    const char *start = authority;
    const char *stop;
    if (len > 0 && authority[0] == '[') {
        start = authority + 1;
        stop = memchr(start, ']', (size_t)(end - start));
        if (stop == NULL) {
            return false;
        }
    } else {
        stop = memchr(authority, ':', len);
        if (stop == NULL) {
            stop = end;
        }
    }
    size_t hl = (size_t)(stop - start);
    if (hl == 0 || hl >= n) {
        return false;
    }
    for (size_t i = 0; i < hl; i++) {
        out[i] = (char)tolower((unsigned char)start[i]);
    }
    out[hl] = '\0';
    return true;
}

static bool is_loopback_name(const char *host)
{
    struct in_addr v4;
    struct in6_addr v6;
    size_t len = strlen(host);
    if (strcmp(host, "localhost") == 0 ||
        (len > 10 && strcmp(host + len - 10, ".localhost") == 0)) {
        return true;
    }
    if (inet_pton(AF_INET, host, &v4) == 1) {
        return (ntohl(v4.s_addr) >> 24) == 127;
    }
    return inet_pton(AF_INET6, host, &v6) == 1 && IN6_IS_ADDR_LOOPBACK(&v6);
}

/* True when host (lower case, no port) is in the comma-separated list (case-insensitive). */
static bool in_host_list(const char *list, const char *host)
{
    size_t hl = strlen(host);
    for (const char *p = list; p != NULL && *p != '\0';) {
        const char *comma = strchr(p, ',');
        size_t n = comma != NULL ? (size_t)(comma - p) : strlen(p);
        char name[256];
        if (host_name(p, n, name, sizeof(name)) && strlen(name) == hl && strcmp(name, host) == 0) {
            return true;
        }
        p = comma != NULL ? comma + 1 : NULL;
    }
    return false;
}

/* DNS rebinding: a page on evil.example whose name is re-pointed at 127.0.0.1 reaches an API
 * bound to loopback with `Host: evil.example`. When HTTP_BIND is a loopback address or
 * HTTP_ALLOWED_HOSTS is set, only loopback names and the listed names are answered; 421
 * otherwise. A request without Host (HTTP/1.0 tools) is answered: browsers always send it. */
static bool host_refused(const ah_http_t *http, struct MHD_Connection *conn, http_reply_t *reply)
{
    const ah_config_t *cfg = http->cfg;
    bool loopback_bind = cfg->http_bind != NULL && is_loopback_name(cfg->http_bind);
    if (!loopback_bind && cfg->http_allowed_hosts == NULL) {
        return false;
    }
    const char *value = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_HOST);
    if (value == NULL) {
        return false;
    }
    char host[256];
    if (host_name(value, strlen(value), host, sizeof(host)) &&
        (is_loopback_name(host) || in_host_list(cfg->http_allowed_hosts, host))) {
        return false;
    }
    char shown[128];
    ah_http_reply_error(reply, MHD_HTTP_MISDIRECTED_REQUEST,
                        "Host '%s' is not served here: use a loopback name or one of "
                        "HTTP_ALLOWED_HOSTS",
                        ah_log_escape(value, shown, sizeof(shown)));
    return true;
}

/* CSRF: with no token (the default) a page in the operator's browser could otherwise POST a
 * cluster command as a "simple" request. A POST whose Origin is present and names another host
 * than the request's own Host, or whose Sec-Fetch-Site is "cross-site", is refused (403) before
 * anything runs. The console (same origin) and clients that send no Origin (curl, ctl,
 * scripts) are unaffected. The scheme is not compared: behind a TLS-terminating proxy the page is
 * https while the agent sees http. */
static bool cross_site_refused(struct MHD_Connection *conn, http_reply_t *reply)
{
    const char *site = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Sec-Fetch-Site");
    const char *origin = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Origin");
    const char *why = NULL;
    if (site != NULL && strcasecmp(site, "cross-site") == 0) {
        why = "Sec-Fetch-Site: cross-site";
    } else if (origin != NULL) {
        const char *host = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_HOST);
        const char *authority = strstr(origin, "://");
        authority = authority != NULL ? authority + 3 : NULL;
        if (host == NULL || authority == NULL || strcasecmp(authority, host) != 0) {
            why = "its Origin is not this API's";
        }
    }
    if (why == NULL) {
        return false;
    }
    ah_http_reply_error(reply, MHD_HTTP_FORBIDDEN,
                        "cross-site request refused (%s); nothing was done. Use the console at "
                        "this address, or a client that sends no Origin (curl, agenthost ctl)",
                        why);
    return true;
}

/* ---- routing ---------------------------------------------------------------------------- */

/* The query parameters each route reads, NULL-terminated. A request with any other parameter is
 * refused with 400 naming it before its handler runs, so a misspelt `wiat=` or `seletor=`
 * never silently does less than asked. A handler that starts reading a parameter
 * adds it here. */
static const char *const no_params[] = {NULL};
static const char *const history_params[] = {"limit", NULL};
static const char *const agents_params[] = {"version", "selector", NULL};
static const char *const reload_params[] = {"wait", NULL};
static const char *const cluster_command_params[] = {
    "reason", "updated_by", "if_version", "for", "until", "wait", "drain", "selector", NULL};
static const char *const agent_command_params[] = {"reason", "updated_by", "drain", NULL};

typedef struct http_route_s {
    const char *path;   /* exact path, or a prefix ending in '/' when `prefix` */
    const char *method; /* "GET" (HEAD too) or "POST" */
    bool prefix;
    http_handler_t handler;
    const char *const *params; /* the query parameters it knows */
} http_route_t;

static const http_route_t routes[] = {
    {"/api/cluster/control-state", "GET", false, ah_http_handle_control_state, no_params},
    {"/api/cluster/stats", "GET", false, ah_http_handle_stats, no_params},
    {"/api/cluster/history", "GET", false, ah_http_handle_history, history_params},
    {"/api/cluster/agents", "GET", false, ah_http_handle_cluster_agents, agents_params},
    {"/api/cluster/scopes", "GET", false, ah_http_handle_cluster_scopes, no_params},
    {"/api/cluster/leases", "GET", false, ah_http_handle_leases, no_params},
    {"/api/agent/state", "GET", false, ah_http_handle_agent_state, no_params},
    {"/api/agent/reload", "POST", false, ah_http_handle_agent_reload, reload_params},
    {"/api/mongo/status", "GET", false, ah_http_handle_mongo_status, no_params},
    {"/healthz", "GET", false, ah_http_handle_healthz, no_params},
    {"/readyz", "GET", false, ah_http_handle_readyz, no_params},
    {"/metrics", "GET", false, ah_http_handle_metrics, no_params},
    /* after the exact routes, so that POST /api/cluster/stats is a 405, not a command */
    {"/api/cluster/", "POST", true, ah_http_handle_cluster_command, cluster_command_params},
    {"/api/agent/", "POST", true, ah_http_handle_agent_command, agent_command_params},
};

/* The first query parameter of the request that the route does not know (MHD iterator). */
typedef struct unknown_param_s {
    const char *const *known;
    char name[64];
    bool found;
} unknown_param_t;

static enum MHD_Result find_unknown_param(void *cls, enum MHD_ValueKind kind, const char *key,
                                          const char *value)
{
    unknown_param_t *u = cls;
    (void)kind;
    (void)value;
    for (const char *const *k = u->known; *k != NULL; k++) {
        if (strcmp(key, *k) == 0) {
            return MHD_YES;
        }
    }
    ah_strlcpy(u->name, key, sizeof(u->name));
    u->found = true;
    return MHD_NO;
}

/* 400 naming the first parameter the route does not know, with what it meant if that is clear
 * and what the route knows. True when the request was refused. */
static bool refuse_unknown_params(struct MHD_Connection *conn, const http_route_t *route,
                                  const char *method, const char *path, http_reply_t *reply)
{
    unknown_param_t u = {.known = route->params};
    MHD_get_connection_values(conn, MHD_GET_ARGUMENT_KIND, find_unknown_param, &u);
    if (!u.found) {
        return false;
    }
    char known[160] = "none";
    size_t used = 0;
    for (const char *const *k = route->params; *k != NULL; k++) {
        used += (size_t)snprintf(known + used, used < sizeof(known) ? sizeof(known) - used : 0,
                                 "%s%s", k == route->params ? "" : ", ", *k);
    }
    const char *meant = ah_suggest(u.name, route->params, NULL);
    char hint[96] = "";
    if (meant != NULL) {
        snprintf(hint, sizeof(hint), " (did you mean '%s'?)", meant);
    }
    char shown[64];
    ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST,
                        "unknown query parameter '%s'%s: %.8s %.*s knows %s; nothing was done",
                        ah_log_escape(u.name, shown, sizeof(shown)), hint, method,
                        HTTP_PATH_IN_ERROR, path, known);
    return true;
}

static bool method_matches(const char *route_method, const char *method)
{
    return strcmp(route_method, method) == 0 ||
           (strcmp(route_method, "GET") == 0 && strcmp(method, "HEAD") == 0);
}

/* Fills the reply for one complete request. */
static void route_request(ah_http_t *http, struct MHD_Connection *conn, void **req_cls,
                          const char *path, const char *method, http_reply_t *reply)
{
    http_call_t call = {.http = http, .conn = conn, .name = "", .req_cls = req_cls};
    for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
        const http_route_t *route = &routes[i];
        if (route->prefix) {
            size_t n = strlen(route->path);
            if (strncmp(path, route->path, n) != 0) {
                continue;
            }
            call.name = path + n;
            ah_command_t cmd;
            if (!method_matches(route->method, method) &&
                ah_http_parse_command_word(call.name, &cmd) != AH_OK) {
                break; /* GET /api/cluster/unknown: no such resource */
            }
        } else if (strcmp(path, route->path) != 0) {
            continue;
        }
        if (!method_matches(route->method, method)) {
            ah_http_reply_error(reply, MHD_HTTP_METHOD_NOT_ALLOWED,
                                "method %.32s not allowed on %.*s", method, HTTP_PATH_IN_ERROR,
                                path);
            reply->allow = route->method;
            return;
        }
        /* Every mutating route (all POSTs) requires the token when AGENT_API_TOKEN is set. */
        if (strcmp(route->method, "POST") == 0 && !authorized(&call)) {
            ah_http_reply_error(reply, MHD_HTTP_UNAUTHORIZED, "missing or invalid bearer token");
            reply->www_authenticate = true;
            return;
        }
        if (refuse_unknown_params(conn, route, method, path, reply)) {
            return;
        }
        route->handler(&call, reply);
        return;
    }
    ah_http_reply_error(reply, MHD_HTTP_NOT_FOUND, "no route for %.32s %.*s", method,
                        HTTP_PATH_IN_ERROR, path);
}

/* Queues one console file (static data, never copied) with the console's headers. MHD_NO
 * closes the connection. */
static enum MHD_Result send_console_file(struct MHD_Connection *conn,
                                         const ah_console_asset_t *asset)
{
    struct MHD_Response *response =
        MHD_create_response_from_buffer(asset->size, (void *)asset->data, MHD_RESPMEM_PERSISTENT);
    if (response == NULL) {
        return MHD_NO;
    }
    bool ok =
        MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE, asset->content_type) ==
            MHD_YES &&
        MHD_add_response_header(response, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store") == MHD_YES &&
        MHD_add_response_header(response, "X-Content-Type-Options", "nosniff") == MHD_YES;
    for (const ah_console_header_t *h = ah_console_headers(); ok && h->name != NULL; h++) {
        ok = MHD_add_response_header(response, h->name, h->value) == MHD_YES;
    }
    enum MHD_Result result = ok ? MHD_queue_response(conn, MHD_HTTP_OK, response) : MHD_NO;
    MHD_destroy_response(response);
    return result;
}

/* Builds and queues the answer to a complete request (or an error decided before routing);
 * a request the handler parked is answered when it resumes. */
static enum MHD_Result answer(ah_http_t *http, struct MHD_Connection *conn, void **req_cls,
                              const char *path, const char *method, unsigned early_status)
{
    /* The console's files come first: they are not API routes (docs/CONSOLE.md). */
    http_reply_t reply = {.status = MHD_HTTP_OK};
    ah_buf_init(&reply.body);
    const ah_console_asset_t *asset = NULL;
    bool refused_host = host_refused(http, conn, &reply);
    if (!refused_host && early_status == 0 && http->cfg->http_console &&
        method_matches("GET", method) && (asset = ah_console_find(path)) != NULL) {
        ah_buf_free(&reply.body);
        return send_console_file(conn, asset);
    }
    if (refused_host) {
        /* nothing else is looked at */
    } else if (early_status == MHD_HTTP_URI_TOO_LONG) {
        ah_http_reply_error(&reply, MHD_HTTP_CONTENT_TOO_LARGE,
                            "request URL too large (max %d bytes)", HTTP_URL_MAX);
    } else if (early_status == MHD_HTTP_BAD_REQUEST) {
        ah_http_reply_error(&reply, MHD_HTTP_BAD_REQUEST, "too many query parameters (max %d)",
                            HTTP_QUERY_PARAMS_MAX);
    } else if (early_status == MHD_HTTP_CONTENT_TOO_LARGE) {
        ah_http_reply_error(&reply, MHD_HTTP_CONTENT_TOO_LARGE,
                            "request body too large (max %d bytes)", HTTP_BODY_MAX);
    } else if (strcmp(method, "POST") == 0 && cross_site_refused(conn, &reply)) {
        /* refused before routing: no handler runs */
    } else {
        route_request(http, conn, req_cls, path, method, &reply);
        if (reply.parked) {
            ah_buf_free(&reply.body);
            return MHD_YES;
        }
    }
    return ah_http_reply_send(conn, &reply);
}

/* Decides from the headers whether a body follows; *too_large when its announced length
 * already exceeds the limit. */
static bool request_has_body(struct MHD_Connection *conn, bool *too_large)
{
    *too_large = false;
    if (MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING) !=
        NULL) {
        return true;
    }
    const char *length =
        MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (length == NULL) {
        return false;
    }
    errno = 0;
    char *end = NULL;
    unsigned long long n = strtoull(length, &end, 10);
    if (errno != 0 || n > HTTP_BODY_MAX) {
        *too_large = true;
    }
    return n > 0 || errno != 0;
}

/* libmicrohttpd's access handler: called once when the headers are in, then for each piece of
 * body, then once more with *upload_data_size == 0 when the request is complete. */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **req_cls)
{
    ah_http_t *http = cls;
    (void)version;
    (void)upload_data;
    if (*req_cls == &url_too_long_marker) {
        /* answered at once: libmicrohttpd then closes the connection, which is what we want */
        return answer(http, conn, req_cls, url, method, MHD_HTTP_URI_TOO_LONG);
    }
    if (*req_cls == &too_many_params_marker) {
        return answer(http, conn, req_cls, url, method, MHD_HTTP_BAD_REQUEST);
    }
    if (*req_cls == NULL) {
        bool too_large;
        if (!request_has_body(conn, &too_large)) {
            *req_cls = &headers_seen_marker;
            return MHD_YES;
        }
        if (too_large) {
            return answer(http, conn, req_cls, url, method, MHD_HTTP_CONTENT_TOO_LARGE);
        }
        return ah_http_request_context(req_cls) != NULL ? MHD_YES : MHD_NO;
    }
    if (*req_cls == &headers_seen_marker) {
        /* a body despite no Content-Length/Transfer-Encoding cannot happen: refuse it */
        if (*upload_data_size > 0) {
            return MHD_NO;
        }
        *req_cls = NULL; /* the handler may park the request: it then makes a context */
        return answer(http, conn, req_cls, url, method, 0);
    }
    http_request_t *req = *req_cls;
    if (req->park != NULL) {
        /* resumed: the parked request has its answer */
        return ah_http_request_send_answer(conn, req);
    }
    if (*upload_data_size > 0) {
        req->body_bytes += *upload_data_size;
        *upload_data_size = 0;
        return req->body_bytes > HTTP_BODY_DRAIN_MAX ? MHD_NO : MHD_YES;
    }
    return answer(http, conn, req_cls, url, method,
                  req->body_bytes > HTTP_BODY_MAX ? MHD_HTTP_CONTENT_TOO_LARGE : 0);
}

/* Called once per request, first; on_completed() is called once for each of them. Sees the raw
 * request target (path + query) before libmicrohttpd parses its query: marks targets that are
 * too long or carry too many parameters, to be refused by on_request.
 *
 * libmicrohttpd 0.9.75 parses the query into the connection's memory pool right after this
 * callback, in quadratic time, and when the pool runs out (a few thousand "&") it leaves the
 * connection stalled until its timeout. As such a request is refused anyway, its query is cut
 * here: `uri` points into libmicrohttpd's own writable read buffer. */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
    ah_http_t *http = cls;
    (void)conn;
    atomic_fetch_add(&http->in_flight, 1);
    char *query = strchr(uri, '?');
    size_t params = 0;
    if (query != NULL && query[1] != '\0') {
        params = 1;
        for (const char *p = query + 1; *p != '\0' && params <= HTTP_QUERY_PARAMS_MAX; p++) {
            params += *p == '&';
        }
    }
    bool too_long = strnlen(uri, HTTP_URL_MAX + 1) > HTTP_URL_MAX;
    if (!too_long && params <= HTTP_QUERY_PARAMS_MAX) {
        return NULL;
    }
    if (query != NULL) {
        query[1] = '\0';
    }
    return too_long ? (void *)&url_too_long_marker : (void *)&too_many_params_marker;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                         enum MHD_RequestTerminationCode toe)
{
    ah_http_t *http = cls;
    atomic_fetch_sub(&http->in_flight, 1);
    (void)conn;
    (void)toe;
    if (is_marker(*req_cls)) {
        *req_cls = NULL;
    }
    ah_http_request_done(req_cls);
}

/* libmicrohttpd's own diagnostics (malformed requests, resource limits) at debug level. */
static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    if (!ah_log_enabled(AH_LOG_DEBUG)) {
        return;
    }
    char line[512];
    vsnprintf(line, sizeof(line), fmt, ap);
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) {
        line[--n] = '\0';
    }
    ah_log_debug("HTTP: %s", line);
}

/* ---- lifecycle -------------------------------------------------------------------------- */

/* Fills *addr from cfg->http_bind ("localhost" → 127.0.0.1) and port. 0 or AH_EINVAL. */
static int bind_address(const char *host, int port, struct sockaddr_storage *addr,
                        socklen_t *addrlen, bool *ipv6)
{
    memset(addr, 0, sizeof(*addr));
    struct sockaddr_in *in4 = (struct sockaddr_in *)addr;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)addr;
    if (strcmp(host, "localhost") == 0) {
        host = "127.0.0.1";
    }
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        *addrlen = sizeof(*in4);
        *ipv6 = false;
        return AH_OK;
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        *addrlen = sizeof(*in6);
        *ipv6 = true;
        return AH_OK;
    }
    return AH_EINVAL;
}

/* After libmicrohttpd failed to start: binds the address ourselves to learn why. */
static void explain_listen_failure(const struct sockaddr_storage *addr, socklen_t addrlen,
                                   char *why, size_t n)
{
    int fd = socket(addr->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(why, n, "%s", strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)addr, addrlen) != 0 || listen(fd, 1) != 0) {
        snprintf(why, n, "%s", strerror(errno));
    } else {
        snprintf(why, n, "libmicrohttpd could not start (LOG_LEVEL=debug shows why)");
    }
    close(fd);
}

ah_http_t *ah_http_start(const ah_config_t *cfg, ah_state_t *state, ah_store_t *store,
                         ah_metrics_t *metrics, char *err, size_t errlen)
{
    const char *host = cfg->http_bind != NULL ? cfg->http_bind : "0.0.0.0";
    struct sockaddr_storage addr;
    socklen_t addrlen = 0;
    bool ipv6 = false;
    if (cfg->http_port < 0 || cfg->http_port > 65535) {
        snprintf(err, errlen, "invalid HTTP_PORT %d (expected 0..65535)", cfg->http_port);
        return NULL;
    }
    if (bind_address(host, cfg->http_port, &addr, &addrlen, &ipv6) != AH_OK) {
        snprintf(err, errlen, "invalid HTTP_BIND \"%s\" (expected an IP address)", host);
        return NULL;
    }
    ah_http_t *http = calloc(1, sizeof(*http));
    if (http == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    http->cfg = cfg;
    http->state = state;
    http->store = store;
    http->metrics = metrics;
    http->parking = ah_http_park_start(state, err, errlen);
    if (http->parking == NULL) {
        goto fail;
    }

    /* One server thread, libmicrohttpd's internal one (no pool): handlers answer from memory or
     * park, so it serves 44-58k req/s on the reference machine (64k with a pool of 2), and every
     * start creates one thread less (docs/ARCHITECTURE.md, Threads). */
    unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG | MHD_USE_ITC |
                         MHD_ALLOW_SUSPEND_RESUME;
    flags |= MHD_is_feature_supported(MHD_FEATURE_EPOLL) == MHD_YES ? MHD_USE_EPOLL : MHD_USE_POLL;
    if (ipv6) {
        flags |= MHD_USE_IPv6;
    }
    http->daemon = MHD_start_daemon(
        flags, (uint16_t)cfg->http_port, NULL, NULL, on_request, http, MHD_OPTION_SOCK_ADDR,
        (struct sockaddr *)&addr, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned int)HTTP_CONNECTION_TIMEOUT, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
        (size_t)HTTP_MEMORY_LIMIT, MHD_OPTION_URI_LOG_CALLBACK, on_uri, http,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, http, MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log,
        http, MHD_OPTION_END);
    if (http->daemon == NULL) {
        char why[256];
        explain_listen_failure(&addr, addrlen, why, sizeof(why));
        snprintf(err, errlen, "cannot listen on %s:%d: %s", host, cfg->http_port, why);
        goto fail;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(http->daemon, MHD_DAEMON_INFO_BIND_PORT);
    http->port = info != NULL && info->port != 0 ? info->port : cfg->http_port;
    return http;

fail:
    if (http->parking != NULL) {
        ah_http_park_stop(http->parking, 0); /* nothing was parked: nothing to wait for */
        ah_http_park_free(http->parking);
    }
    free(http);
    return NULL;
}

void ah_http_set_fleet(ah_http_t *http, ah_fleet_t *fleet)
{
    if (http != NULL) {
        atomic_store(&http->fleet, fleet);
    }
}

void ah_http_set_leases(ah_http_t *http, struct ah_leases_s *leases)
{
    if (http != NULL) {
        atomic_store(&http->leases, leases);
    }
}

int ah_http_port(const ah_http_t *http)
{
    return http != NULL ? http->port : -1;
}

int ah_http_stop(ah_http_t *http, double seconds)
{
    if (http == NULL) {
        return AH_OK;
    }
    int64_t deadline_us = ah_mono_us() + (int64_t)((seconds > 0 ? seconds : 0) * 1e6);
    /* Stop accepting; answer every parked request (503) and wait for the store workers; then
     * let requests in flight finish (their answers are queued but maybe not yet sent: e.g. the
     * reply to the shutdown command that made the host stop), bounded by HTTP_DRAIN_MS and the
     * caller's budget, before the daemon closes every connection. No handler blocks, so
     * MHD_stop_daemon() returns promptly. */
    MHD_socket listen_fd = MHD_quiesce_daemon(http->daemon);
    if (listen_fd != MHD_INVALID_SOCKET) {
        close(listen_fd); /* a quiesced daemon leaves its listening socket to the caller */
    }
    /* The store workers get the budget but a moment kept for sending the last answers. */
    double budget = (double)(deadline_us - ah_mono_us()) / 1e6;
    double reserve = budget / 2 < HTTP_STOP_SEND_RESERVE_S ? budget / 2 : HTTP_STOP_SEND_RESERVE_S;
    int park_rc = ah_http_park_stop(http->parking, budget - reserve);
    int64_t drain_until = ah_mono_us() + HTTP_DRAIN_MS * 1000;
    if (drain_until > deadline_us) {
        drain_until = deadline_us;
    }
    while (atomic_load(&http->in_flight) > 0 && ah_mono_us() < drain_until) {
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    MHD_stop_daemon(http->daemon);
    if (park_rc != AH_OK) {
        /* A store worker is still inside a store call and uses http: leave it allocated (the
         * process exits next). */
        return AH_ETIMEOUT;
    }
    ah_http_park_free(http->parking);
    free(http);
    return AH_OK;
}
