/* The HTTP API (docs/API.md) on libmicrohttpd. One access handler drains any request body, routes
 * the request through one table, and each route builds its whole JSON body in an ah_buf_t before
 * one response is queued. GET routes read only a state snapshot (never the store, so they cannot
 * block on MongoDB); cluster commands and history go through the store. Requests are served on
 * libmicrohttpd's worker threads; the only shared data are the state object (thread-safe), the
 * store (thread-safe) and the read-only configuration. */
#include "ah_http.h"

#include "ah_console.h"
#include "ah_json.h"
#include "ah_log.h"

#include <arpa/inet.h>
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

#define HTTP_URL_MAX 8192          /* path + query, bytes */
#define HTTP_QUERY_PARAMS_MAX 64   /* query parameters per request */
#define HTTP_BODY_MAX 4096         /* request bodies are ignored, but bounded */
#define HTTP_BODY_DRAIN_MAX 65536  /* a chunked body past this closes the connection */
#define HTTP_MEMORY_LIMIT 65536    /* per-connection pool: still holds a 60 KiB request line */
#define HTTP_CONNECTION_TIMEOUT 30 /* seconds of inactivity */
#define HTTP_THREADS 2
#define HTTP_HISTORY_DEFAULT 20
#define HTTP_HISTORY_MAX 1000
#define HTTP_PATH_IN_ERROR 200 /* bytes of a path quoted in a 404 message */

#define JSON_TYPE "application/json"
#define RELOAD_WAIT_S 10   /* POST /api/agent/reload waits this long for the outcome */
#define HTTP_DRAIN_MS 2000 /* ah_http_stop(): max wait for requests in flight */
#define METRICS_TYPE "text/plain; version=0.0.4"
#define DISABLED_MESSAGE                                                                           \
    "distributed control is disabled (ENABLE_DISTRIBUTED_CONTROL=false); use /api/agent/* for "    \
    "this pod"

struct ah_http_s {
    struct MHD_Daemon *daemon;
    const ah_config_t *cfg;
    ah_state_t *state;
    ah_store_t *store;     /* NULL: distributed control disabled */
    ah_metrics_t *metrics; /* script-defined metrics; NULL: none */
    int port;
    atomic_int in_flight; /* requests begun (URI seen) and not yet completed */
};

/* Per-request context, allocated only for requests that carry a body. */
typedef struct http_request_s {
    size_t body_bytes;
} http_request_t;

/* Request contexts that need no memory: an over-long URL (set by the URI log callback) and a
 * request without a body whose headers have been seen. libmicrohttpd 0.9.75 closes the
 * connection after any response queued during the first call of the access handler, so keep-alive
 * requires answering on the second call; these markers make that allocation-free. */
static char url_too_long_marker;
static char too_many_params_marker;
static char headers_seen_marker;

/* One answer under construction. */
typedef struct http_reply_s {
    unsigned status;
    ah_buf_t body;
    const char *content_type;        /* NULL → application/json */
    const char *allow;               /* Allow header (405) or NULL */
    bool www_authenticate;           /* WWW-Authenticate: Bearer (401) */
    const ah_console_asset_t *asset; /* a console file to send instead of body, or NULL */
} http_reply_t;

/* What a route handler receives. `name` is the tail of a prefix route (the command). */
typedef struct http_call_s {
    ah_http_t *http;
    struct MHD_Connection *conn;
    const char *name;
} http_call_t;

typedef void (*http_handler_t)(http_call_t *call, http_reply_t *reply);

/* ---- small writers ---------------------------------------------------------------------- */

/* Writes "key": v using the shortest of %.15g / %.17g that reads back as v (ah_json_num always
 * uses %.17g, which shows 0.1 as 0.10000000000000001). Non-finite → null. */
static void json_number(ah_buf_t *b, const char *key, double v)
{
    if (!isfinite(v)) {
        ah_json_null(b, key);
        return;
    }
    char text[40];
    snprintf(text, sizeof(text), "%.15g", v);
    if (strtod(text, NULL) != v) {
        snprintf(text, sizeof(text), "%.17g", v);
    }
    if (b->need_comma) {
        ah_buf_append(b, ",", 1);
    }
    ah_json_escape(b, key, strlen(key));
    ah_buf_append(b, ":", 1);
    ah_buf_puts(b, text);
    b->need_comma = true;
}

/* Writes "key": "<timestamp>", or null when ts_us is 0. */
static void json_timestamp(ah_buf_t *b, const char *key, int64_t ts_us)
{
    if (ts_us == 0) {
        ah_json_null(b, key);
        return;
    }
    char text[AH_TIMESTAMP_LEN];
    ah_format_timestamp(ts_us, text);
    ah_json_str(b, key, text);
}

/* Writes "key": "value", or null when value is "". */
static void json_str_or_null(ah_buf_t *b, const char *key, const char *value)
{
    ah_json_str(b, key, value[0] != '\0' ? value : NULL);
}

/* Replaces the reply with {"status": "error", "error": <message>}. */
static void reply_error(http_reply_t *reply, unsigned status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void reply_error(http_reply_t *reply, unsigned status, const char *fmt, ...)
{
    char message[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof(message), fmt, ap);
    va_end(ap);
    ah_buf_free(&reply->body);
    reply->status = status;
    reply->content_type = NULL;
    ah_json_open(&reply->body);
    ah_json_str(&reply->body, "status", "error");
    ah_json_str(&reply->body, "error", message);
    ah_json_close(&reply->body);
}

/* Copies s into out (size n) with control characters replaced by spaces, so that a client's
 * text cannot forge log lines. */
static const char *log_safe(const char *s, char *out, size_t n)
{
    ah_strlcpy(out, s, n);
    for (char *p = out; *p != '\0'; p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7F) {
            *p = ' ';
        }
    }
    return out;
}

/* ---- request inputs --------------------------------------------------------------------- */

/* Seconds between control checks in polling mode for the configured backend. */
static double polling_interval(const ah_config_t *cfg)
{
    return cfg->mongodb_uri != NULL ? cfg->polling_interval : cfg->embedded_poll_interval;
}

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

/* Reads query parameter `key` (already percent-decoded by libmicrohttpd) into *out: `fallback`
 * when absent, else a value of min..max bytes of valid UTF-8 without NUL bytes. On a bad value
 * answers 400 naming the parameter and returns AH_EINVAL. *out points into the connection. */
static int query_text(const http_call_t *call, const char *key, const char *fallback, size_t min,
                      size_t max, const char **out, http_reply_t *reply)
{
    const char *value = NULL;
    size_t len = 0;
    if (MHD_lookup_connection_value_n(call->conn, MHD_GET_ARGUMENT_KIND, key, strlen(key), &value,
                                      &len) != MHD_YES) {
        *out = fallback;
        return AH_OK;
    }
    if (value == NULL) { /* "?key" without "=" */
        value = "";
        len = 0;
    }
    if (len > max || len < min) {
        if (min > 0) {
            reply_error(reply, MHD_HTTP_BAD_REQUEST, "%s must be %zu to %zu bytes (got %zu)", key,
                        min, max, len);
        } else {
            reply_error(reply, MHD_HTTP_BAD_REQUEST, "%s is too long: %zu bytes (max %zu)", key,
                        len, max);
        }
        return AH_EINVAL;
    }
    if (strlen(value) != len || !ah_utf8_valid(value, len)) {
        reply_error(reply, MHD_HTTP_BAD_REQUEST, "%s must be valid UTF-8 without NUL bytes", key);
        return AH_EINVAL;
    }
    *out = value;
    return AH_OK;
}

/* Parses "1".."1000" (plain decimal digits only). 0 or AH_EINVAL. */
static int parse_limit(const char *text, int *out)
{
    if (text == NULL || text[0] == '\0' || strlen(text) > 4) {
        return AH_EINVAL;
    }
    int value = 0;
    for (const char *p = text; *p != '\0'; p++) {
        if (*p < '0' || *p > '9') {
            return AH_EINVAL;
        }
        value = value * 10 + (*p - '0');
    }
    if (value < 1 || value > HTTP_HISTORY_MAX) {
        return AH_EINVAL;
    }
    *out = value;
    return AH_OK;
}

/* Maps the command word of /api/{cluster,agent}/<word>. 0 or AH_EINVAL. */
static int parse_command_word(const char *word, ah_command_t *out)
{
    if (strcmp(word, "pause") == 0) {
        *out = AH_CMD_PAUSE;
    } else if (strcmp(word, "resume") == 0) {
        *out = AH_CMD_RUNNING;
    } else if (strcmp(word, "shutdown") == 0) {
        *out = AH_CMD_SHUTDOWN;
    } else {
        return AH_EINVAL;
    }
    return AH_OK;
}

/* The checks shared by both command routes: command word, reason and updated_by.
 * Returns AH_OK or AH_EINVAL with the reply already set. */
static int command_inputs(const http_call_t *call, ah_command_t *cmd, const char **reason,
                          const char **updated_by, http_reply_t *reply)
{
    if (parse_command_word(call->name, cmd) != AH_OK) {
        reply_error(reply, MHD_HTTP_BAD_REQUEST,
                    "unknown command '%.64s' (expected pause, resume or shutdown)", call->name);
        return AH_EINVAL;
    }
    if (query_text(call, "reason", "", 0, AH_REASON_MAX, reason, reply) != AH_OK ||
        query_text(call, "updated_by", "api", 1, AH_NAME_MAX, updated_by, reply) != AH_OK) {
        return AH_EINVAL;
    }
    return AH_OK;
}

/* ---- cluster routes --------------------------------------------------------------------- */

static const char *const issued_messages[] = {
    [AH_CMD_PAUSE] = "Pause command issued to all agents in the cluster",
    [AH_CMD_RUNNING] = "Resume command issued to all agents in the cluster",
    [AH_CMD_SHUTDOWN] = "Shutdown command issued to all agents in the cluster",
};

static const char *const propagation_verbs[] = {
    [AH_CMD_PAUSE] = "pause",
    [AH_CMD_RUNNING] = "resume",
    [AH_CMD_SHUTDOWN] = "shutdown gracefully",
};

static void handle_cluster_command(http_call_t *call, http_reply_t *reply)
{
    ah_http_t *http = call->http;
    ah_command_t cmd;
    const char *reason;
    const char *updated_by;
    if (command_inputs(call, &cmd, &reason, &updated_by, reply) != AH_OK) {
        return;
    }
    if (http->store == NULL) {
        reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, DISABLED_MESSAGE);
        return;
    }
    ah_control_t doc;
    char err[AH_ERRLEN] = "";
    int rc = ah_store_command(http->store, cmd, reason, updated_by, http->cfg->agent_id, &doc, err,
                              sizeof(err));
    if (rc == AH_EUNAVAIL || rc == AH_EIO) {
        ah_log_warn("Cluster command %s refused: control store unavailable: %s",
                    ah_command_name(cmd), err);
        reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, "control store unavailable: %s", err);
        return;
    }
    if (rc == AH_EINVAL) {
        reply_error(reply, MHD_HTTP_BAD_REQUEST, "%s", err);
        return;
    }
    if (rc != AH_OK) {
        reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "cluster command failed: %s", err);
        return;
    }
    /* The issuing agent applies its own command at once, without waiting for its watcher. */
    ah_state_offer_cluster(http->state, &doc);
    char safe_by[AH_NAME_MAX + 1];
    char safe_reason[AH_REASON_MAX + 1];
    ah_log_info("Cluster command %s issued: version %lld by %s (reason: %s)", ah_command_name(cmd),
                (long long)doc.version, log_safe(doc.updated_by, safe_by, sizeof(safe_by)),
                log_safe(doc.reason, safe_reason, sizeof(safe_reason)));

    ah_state_snapshot_t snap;
    ah_state_snapshot(http->state, &snap);
    char propagation[160];
    if (strcmp(snap.store.watch_mode, "change_streams") == 0) {
        snprintf(propagation, sizeof(propagation),
                 "Agents will %s within seconds (event-driven via Change Streams)",
                 propagation_verbs[cmd]);
    } else {
        double interval = polling_interval(http->cfg);
        snprintf(propagation, sizeof(propagation), "Agents will %s within %gs (polling every %gs)",
                 propagation_verbs[cmd], interval, interval);
    }
    char timestamp[AH_TIMESTAMP_LEN];
    ah_format_timestamp(doc.timestamp_us, timestamp);

    ah_buf_t *b = &reply->body;
    ah_json_open(b);
    ah_json_str(b, "status", "success");
    ah_json_str(b, "message", issued_messages[cmd]);
    ah_json_str(b, "command", ah_command_name(doc.command));
    ah_json_int(b, "version", doc.version);
    ah_json_str(b, "timestamp", timestamp);
    ah_json_str(b, "reason", doc.reason);
    ah_json_str(b, "propagation", propagation);
    ah_json_close(b);
}

static void handle_control_state(http_call_t *call, http_reply_t *reply)
{
    if (call->http->store == NULL) {
        reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, DISABLED_MESSAGE);
        return;
    }
    ah_state_snapshot_t snap;
    ah_state_snapshot(call->http->state, &snap);
    if (!snap.cluster_known) {
        reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, "control state not known yet: %s",
                    snap.store.last_error[0] != '\0' ? snap.store.last_error
                                                     : "store not read yet");
        return;
    }
    ah_buf_t *b = &reply->body;
    ah_json_open(b);
    ah_json_str(b, "command", ah_command_name(snap.cluster.command));
    ah_json_int(b, "version", snap.cluster.version);
    json_timestamp(b, "timestamp", snap.cluster.timestamp_us);
    ah_json_str(b, "reason", snap.cluster.reason);
    ah_json_str(b, "updated_by", snap.cluster.updated_by);
    json_str_or_null(b, "watch_mode", snap.store.watch_mode);
    ah_json_str(b, "note", "All agents in the cluster are subscribed to this state");
    ah_json_close(b);
}

static void handle_stats(http_call_t *call, http_reply_t *reply)
{
    if (call->http->store == NULL) {
        reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, DISABLED_MESSAGE);
        return;
    }
    ah_state_snapshot_t snap;
    ah_state_snapshot(call->http->state, &snap);
    ah_buf_t *b = &reply->body;
    ah_json_open(b);
    json_str_or_null(b, "watch_mode", snap.store.watch_mode);
    if (strcmp(snap.store.watch_mode, "change_streams") == 0) {
        ah_json_null(b, "polling_interval");
    } else {
        json_number(b, "polling_interval", polling_interval(call->http->cfg));
    }
    if (snap.cluster_known) {
        ah_json_str(b, "current_command", ah_command_name(snap.cluster.command));
        ah_json_int(b, "current_version", snap.cluster.version);
        json_timestamp(b, "last_updated", snap.cluster.timestamp_us);
        ah_json_str(b, "updated_by", snap.cluster.updated_by);
        ah_json_str(b, "reason", snap.cluster.reason);
    } else {
        ah_json_null(b, "current_command");
        ah_json_null(b, "current_version");
        ah_json_null(b, "last_updated");
        ah_json_null(b, "updated_by");
        ah_json_null(b, "reason");
    }
    ah_json_close(b);
}

static void handle_history(http_call_t *call, http_reply_t *reply)
{
    if (call->http->store == NULL) {
        reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, DISABLED_MESSAGE);
        return;
    }
    int limit = HTTP_HISTORY_DEFAULT;
    const char *text = NULL;
    size_t len = 0;
    if (MHD_lookup_connection_value_n(call->conn, MHD_GET_ARGUMENT_KIND, "limit", 5, &text, &len) ==
        MHD_YES) {
        if (text == NULL || strlen(text) != len || parse_limit(text, &limit) != AH_OK) {
            reply_error(reply, MHD_HTTP_BAD_REQUEST, "limit must be an integer between 1 and %d",
                        HTTP_HISTORY_MAX);
            return;
        }
    }
    ah_control_t *entries = calloc((size_t)limit, sizeof(*entries));
    if (entries == NULL) {
        reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    int count = 0;
    char err[AH_ERRLEN] = "";
    int rc = ah_store_history(call->http->store, limit, entries, &count, err, sizeof(err));
    if (rc != AH_OK) {
        reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, "control store unavailable: %s", err);
        goto cleanup;
    }
    ah_buf_t *b = &reply->body;
    ah_json_open(b);
    ah_json_int(b, "count", count);
    ah_json_open_array(b, "entries");
    for (int i = 0; i < count && i < limit; i++) {
        const ah_control_t *e = &entries[i];
        ah_json_open_object(b, NULL);
        ah_json_int(b, "version", e->version);
        ah_json_str(b, "command", ah_command_name(e->command));
        json_timestamp(b, "timestamp", e->timestamp_us);
        ah_json_str(b, "reason", e->reason);
        ah_json_str(b, "updated_by", e->updated_by);
        ah_json_str(b, "agent_id", e->agent_id);
        ah_json_close(b);
    }
    ah_json_close_array(b);
    ah_json_close(b);
cleanup:
    free(entries);
}

/* ---- agent routes ----------------------------------------------------------------------- */

static const char *const requested_messages[] = {
    [AH_CMD_PAUSE] = "Pause requested for this agent",
    [AH_CMD_RUNNING] = "Resume requested for this agent",
    [AH_CMD_SHUTDOWN] = "Shutdown requested for this agent",
};

static void handle_agent_command(http_call_t *call, http_reply_t *reply)
{
    ah_http_t *http = call->http;
    ah_command_t cmd;
    const char *reason;
    const char *updated_by;
    if (command_inputs(call, &cmd, &reason, &updated_by, reply) != AH_OK) {
        return;
    }
    ah_state_offer_local(http->state, cmd, AH_SOURCE_LOCAL, reason, updated_by);
    char safe_by[AH_NAME_MAX + 1];
    ah_log_info("Local command %s requested through the API by %s", ah_command_name(cmd),
                log_safe(updated_by, safe_by, sizeof(safe_by)));
    ah_state_snapshot_t snap;
    ah_state_snapshot(http->state, &snap);
    ah_buf_t *b = &reply->body;
    ah_json_open(b);
    ah_json_str(b, "status", "success");
    ah_json_str(b, "message", requested_messages[cmd]);
    /* the state now; the command takes effect between batches (watch /api/agent/state) */
    ah_json_str(b, "state", ah_run_state_name(snap.state));
    ah_json_str(b, "agent_id", http->cfg->agent_id);
    ah_json_str(b, "command", ah_command_name(cmd));
    ah_json_str(b, "note",
                cmd == AH_CMD_SHUTDOWN
                    ? "Local command: affects this pod only; a local shutdown is final"
                    : "Local command: affects this pod only and is overridden by the next "
                      "cluster command");
    ah_json_close(b);
}

/* POST /api/agent/reload: loads the script again between batches and answers with the outcome
 * (waiting up to RELOAD_WAIT_S for the current batch to finish; 202 if it is still running). */
static void handle_agent_reload(http_call_t *call, http_reply_t *reply)
{
    ah_http_t *http = call->http;
    uint64_t ticket = ah_state_request_reload(http->state);
    char err[AH_ERRLEN];
    int rc = ah_state_wait_reload(http->state, ticket, RELOAD_WAIT_S, err, sizeof(err));
    if (rc == AH_ELUA) {
        reply_error(reply, MHD_HTTP_UNPROCESSABLE_CONTENT,
                    "reload failed, the previous script keeps running: %s", err);
        return;
    }
    ah_state_snapshot_t snap;
    ah_state_snapshot(http->state, &snap);
    ah_buf_t *b = &reply->body;
    if (rc == AH_ETIMEOUT) {
        reply->status = MHD_HTTP_ACCEPTED;
    }
    ah_json_open(b);
    ah_json_str(b, "status", rc == AH_OK ? "success" : "accepted");
    ah_json_str(b, "message",
                rc == AH_OK ? "Script reloaded"
                            : "Reload pending: it runs after the current batch");
    ah_json_str(b, "agent_id", http->cfg->agent_id);
    ah_json_str(b, "state", ah_run_state_name(snap.state));
    ah_json_int(b, "reloads", (int64_t)snap.reloads);
    ah_json_close(b);
}

/* Seconds since started_us, rounded to milliseconds. */
static double uptime_seconds(const ah_state_snapshot_t *snap)
{
    double seconds = (double)(ah_now_us() - snap->started_us) / 1e6;
    return seconds > 0 ? round(seconds * 1000.0) / 1000.0 : 0.0;
}

static void handle_agent_state(http_call_t *call, http_reply_t *reply)
{
    ah_state_snapshot_t snap;
    ah_state_snapshot(call->http->state, &snap);
    ah_buf_t *b = &reply->body;
    ah_json_open(b);
    ah_json_str(b, "agent_id", call->http->cfg->agent_id);
    ah_json_str(b, "state", ah_run_state_name(snap.state));
    ah_json_int(b, "applied_version", snap.applied_version);
    ah_json_str(b, "cluster_command",
                snap.cluster_known ? ah_command_name(snap.cluster.command) : NULL);
    ah_json_bool(b, "local_override", snap.local_override);
    json_str_or_null(b, "watch_mode", snap.store.watch_mode);
    ah_json_int(b, "batches", (int64_t)snap.batches);
    ah_json_int(b, "errors", (int64_t)snap.batch_errors);
    json_number(b, "uptime_s", uptime_seconds(&snap));
    ah_json_close(b);
}

static void handle_mongo_status(http_call_t *call, http_reply_t *reply)
{
    const ah_config_t *cfg = call->http->cfg;
    bool enabled = call->http->store != NULL;
    ah_state_snapshot_t snap;
    ah_state_snapshot(call->http->state, &snap);
    const ah_store_status_t *st = &snap.store;
    const char *backend = "none";
    const char *database = NULL;
    if (enabled) {
        backend = cfg->mongodb_uri != NULL ? "mongodb" : "embedded";
        database = cfg->mongodb_uri != NULL ? cfg->mongodb_database : cfg->state_path;
    }
    ah_buf_t *b = &reply->body;
    ah_json_open(b);
    ah_json_str(b, "status", !enabled ? "disabled" : st->connected ? "connected" : "disconnected");
    ah_json_str(b, "backend", backend);
    ah_json_str(b, "topology", enabled ? st->topology : "none");
    json_str_or_null(b, "watch_mode", st->watch_mode);
    ah_json_bool(b, "connected", enabled && st->connected);
    ah_json_str(b, "database", database);
    json_str_or_null(b, "last_error", st->last_error);
    json_timestamp(b, "last_error_at", st->last_error_us);
    if (st->latency_ms < 0) {
        ah_json_null(b, "latency_ms");
    } else {
        json_number(b, "latency_ms", round(st->latency_ms * 1000.0) / 1000.0);
    }
    ah_json_int(b, "reconnects", (int64_t)st->reconnects);
    ah_json_int(b, "stream_resumes", (int64_t)st->stream_resumes);
    ah_json_int(b, "polls", (int64_t)st->polls);
    ah_json_close(b);
}

/* ---- probes and metrics ----------------------------------------------------------------- */

static void handle_healthz(http_call_t *call, http_reply_t *reply)
{
    ah_state_snapshot_t snap;
    ah_state_snapshot(call->http->state, &snap);
    if (snap.wedged) {
        double running = 0;
        if (snap.batch_started_us != 0) {
            running = (double)(ah_mono_us() - snap.batch_started_us) / 1e6;
        }
        reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE,
                    "wedged: a Lua call has been running for %.0fs, over BATCH_TIMEOUT (%gs)",
                    running, call->http->cfg->batch_timeout);
        return;
    }
    ah_buf_t *b = &reply->body;
    ah_json_open(b);
    ah_json_str(b, "status", "ok");
    ah_json_str(b, "state", ah_run_state_name(snap.state));
    ah_json_close(b);
}

static void handle_readyz(http_call_t *call, http_reply_t *reply)
{
    ah_state_snapshot_t snap;
    ah_state_snapshot(call->http->state, &snap);
    ah_buf_t *b = &reply->body;
    if (snap.state == AH_STATE_RUNNING) {
        ah_json_open(b);
        ah_json_str(b, "status", "ready");
        ah_json_str(b, "state", "running");
        ah_json_close(b);
        return;
    }
    char why[AH_ERRLEN + AH_REASON_MAX + 96];
    if (snap.state == AH_STATE_STARTING) {
        if (snap.store.last_error[0] != '\0') {
            snprintf(why, sizeof(why), "starting (waiting for the control store: %s)",
                     snap.store.last_error);
        } else if (call->http->store != NULL) {
            snprintf(why, sizeof(why), "starting (waiting for the control store)");
        } else {
            snprintf(why, sizeof(why), "starting");
        }
    } else if (snap.state == AH_STATE_PAUSED && snap.local_override) {
        snprintf(why, sizeof(why), "paused locally");
    } else if (snap.state == AH_STATE_PAUSED) {
        bool has_reason =
            snap.cluster.version == snap.applied_version && snap.cluster.reason[0] != '\0';
        snprintf(why, sizeof(why), "paused by cluster command v%lld%s%s%s",
                 (long long)snap.applied_version, has_reason ? " (" : "",
                 has_reason ? snap.cluster.reason : "", has_reason ? ")" : "");
    } else {
        snprintf(why, sizeof(why), "%s", ah_run_state_name(snap.state));
    }
    reply->status = MHD_HTTP_SERVICE_UNAVAILABLE;
    ah_json_open(b);
    ah_json_str(b, "status", "not_ready");
    ah_json_str(b, "state", ah_run_state_name(snap.state));
    ah_json_str(b, "reason", why);
    ah_json_close(b);
}

static void metric_header(ah_buf_t *b, const char *name, const char *type, const char *help)
{
    ah_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void metric_u64(ah_buf_t *b, const char *name, const char *type, const char *help,
                       uint64_t value)
{
    metric_header(b, name, type, help);
    ah_buf_printf(b, "%s %llu\n", name, (unsigned long long)value);
}

static void metric_double(ah_buf_t *b, const char *name, const char *type, const char *help,
                          double value)
{
    metric_header(b, name, type, help);
    if (isfinite(value)) {
        ah_buf_printf(b, "%s %.15g\n", name, value);
    } else {
        ah_buf_printf(b, "%s NaN\n", name);
    }
}

/* Script-defined metrics (agent.metrics), from the host's thread-safe registry. */
static void metrics_from_script(ah_http_t *http, ah_buf_t *b)
{
    if (http->metrics != NULL) {
        ah_metrics_render(http->metrics, b);
    }
}

static void handle_metrics(http_call_t *call, http_reply_t *reply)
{
    ah_state_snapshot_t snap;
    ah_state_snapshot(call->http->state, &snap);
    ah_buf_t *b = &reply->body;
    reply->content_type = METRICS_TYPE;
    metric_u64(b, "agenthost_batches_total", "counter", "Batches run by the Lua worker.",
               snap.batches);
    metric_u64(b, "agenthost_batch_errors_total", "counter", "Batches that raised a Lua error.",
               snap.batch_errors);
    metric_u64(b, "agenthost_batch_overruns_total", "counter",
               "Batches or hooks that overran BATCH_TIMEOUT.", snap.batch_overruns);
    metric_u64(b, "agenthost_hook_errors_total", "counter", "Hooks that raised a Lua error.",
               snap.hook_errors);
    metric_header(b, "agenthost_state", "gauge", "Current run state (1 for the current one).");
    for (int st = AH_STATE_STARTING; st <= AH_STATE_STOPPED; st++) {
        ah_buf_printf(b, "agenthost_state{state=\"%s\"} %d\n", ah_run_state_name(st),
                      snap.state == (ah_run_state_t)st ? 1 : 0);
    }
    metric_u64(b, "agenthost_control_version", "gauge", "Latest cluster control version seen.",
               snap.cluster_known && snap.cluster.version > 0 ? (uint64_t)snap.cluster.version : 0);
    metric_u64(b, "agenthost_applied_version", "gauge", "Cluster control version applied.",
               snap.applied_version > 0 ? (uint64_t)snap.applied_version : 0);
    metric_u64(b, "agenthost_commands_applied_total", "counter", "State transitions applied.",
               snap.commands_applied);
    metric_u64(b, "agenthost_store_connected", "gauge", "1 if the control store is reachable.",
               snap.store.connected ? 1 : 0);
    metric_u64(b, "agenthost_store_reconnects_total", "counter",
               "Reconnections to the control store.", snap.store.reconnects);
    metric_u64(b, "agenthost_stream_resumes_total", "counter", "Change stream resumptions.",
               snap.store.stream_resumes);
    metric_u64(b, "agenthost_polls_total", "counter", "Control store polls.", snap.store.polls);
    metric_double(b, "agenthost_control_lag_seconds", "gauge",
                  "Delay from the last cluster command's timestamp to its application.",
                  snap.last_control_lag_ms >= 0 ? snap.last_control_lag_ms / 1000.0 : NAN);
    metric_double(b, "agenthost_uptime_seconds", "gauge", "Seconds since the agent started.",
                  uptime_seconds(&snap));
    metric_u64(b, "agenthost_reloads_total", "counter", "Successful script reloads.", snap.reloads);
    metric_u64(b, "agenthost_reload_failures_total", "counter",
               "Script reloads rejected (the previous script kept running).", snap.reload_failures);
    metrics_from_script(call->http, b);
}

/* ---- routing ---------------------------------------------------------------------------- */

typedef struct http_route_s {
    const char *path;   /* exact path, or a prefix ending in '/' when `prefix` */
    const char *method; /* "GET" (HEAD too) or "POST" */
    bool prefix;
    http_handler_t handler;
} http_route_t;

static const http_route_t routes[] = {
    {"/api/cluster/control-state", "GET", false, handle_control_state},
    {"/api/cluster/stats", "GET", false, handle_stats},
    {"/api/cluster/history", "GET", false, handle_history},
    {"/api/agent/state", "GET", false, handle_agent_state},
    {"/api/agent/reload", "POST", false, handle_agent_reload},
    {"/api/mongo/status", "GET", false, handle_mongo_status},
    {"/healthz", "GET", false, handle_healthz},
    {"/readyz", "GET", false, handle_readyz},
    {"/metrics", "GET", false, handle_metrics},
    /* after the exact routes, so that POST /api/cluster/stats is a 405, not a command */
    {"/api/cluster/", "POST", true, handle_cluster_command},
    {"/api/agent/", "POST", true, handle_agent_command},
};

static bool method_matches(const char *route_method, const char *method)
{
    return strcmp(route_method, method) == 0 ||
           (strcmp(route_method, "GET") == 0 && strcmp(method, "HEAD") == 0);
}

/* Fills the reply for one complete request. */
static void route_request(ah_http_t *http, struct MHD_Connection *conn, const char *path,
                          const char *method, http_reply_t *reply)
{
    http_call_t call = {.http = http, .conn = conn, .name = ""};
    if (http->cfg->http_console && method_matches("GET", method)) {
        reply->asset = ah_console_find(path);
        if (reply->asset != NULL) {
            return;
        }
    }
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
                parse_command_word(call.name, &cmd) != AH_OK) {
                break; /* GET /api/cluster/unknown: no such resource */
            }
        } else if (strcmp(path, route->path) != 0) {
            continue;
        }
        if (!method_matches(route->method, method)) {
            reply_error(reply, MHD_HTTP_METHOD_NOT_ALLOWED, "method %.32s not allowed on %.*s",
                        method, HTTP_PATH_IN_ERROR, path);
            reply->allow = route->method;
            return;
        }
        /* Every mutating route (all POSTs) requires the token when AGENT_API_TOKEN is set. */
        if (strcmp(route->method, "POST") == 0 && !authorized(&call)) {
            reply_error(reply, MHD_HTTP_UNAUTHORIZED, "missing or invalid bearer token");
            reply->www_authenticate = true;
            return;
        }
        route->handler(&call, reply);
        return;
    }
    reply_error(reply, MHD_HTTP_NOT_FOUND, "no route for %.32s %.*s", method, HTTP_PATH_IN_ERROR,
                path);
}

/* Queues the reply (taking its body). MHD_NO closes the connection. */
static enum MHD_Result send_reply(struct MHD_Connection *conn, http_reply_t *reply)
{
    static const char out_of_memory[] = "{\"status\":\"error\",\"error\":\"out of memory\"}";
    size_t len = 0;
    char *data = ah_buf_take(&reply->body, &len);
    struct MHD_Response *response;
    unsigned status = reply->status;
    if (reply->asset != NULL) {
        free(data);
        reply->content_type = reply->asset->content_type;
        response = MHD_create_response_from_buffer(reply->asset->size, (void *)reply->asset->data,
                                                   MHD_RESPMEM_PERSISTENT);
    } else if (data == NULL) {
        status = MHD_HTTP_INTERNAL_SERVER_ERROR;
        reply->content_type = NULL;
        response = MHD_create_response_from_buffer(sizeof(out_of_memory) - 1, (void *)out_of_memory,
                                                   MHD_RESPMEM_PERSISTENT);
    } else {
        response = MHD_create_response_from_buffer(len, data, MHD_RESPMEM_MUST_FREE);
        if (response == NULL) {
            free(data);
        }
    }
    if (response == NULL) {
        return MHD_NO;
    }
    bool ok =
        MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE,
                                reply->content_type ? reply->content_type : JSON_TYPE) == MHD_YES &&
        MHD_add_response_header(response, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store") == MHD_YES &&
        MHD_add_response_header(response, "X-Content-Type-Options", "nosniff") == MHD_YES;
    for (const ah_console_header_t *h = ah_console_headers(); ok && reply->asset != NULL && h->name;
         h++) {
        ok = MHD_add_response_header(response, h->name, h->value) == MHD_YES;
    }
    if (ok && reply->allow != NULL) {
        ok = MHD_add_response_header(response, MHD_HTTP_HEADER_ALLOW, reply->allow) == MHD_YES;
    }
    if (ok && reply->www_authenticate) {
        ok = MHD_add_response_header(response, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer") ==
             MHD_YES;
    }
    enum MHD_Result result = ok ? MHD_queue_response(conn, status, response) : MHD_NO;
    MHD_destroy_response(response);
    return result;
}

/* Builds and queues the answer to a complete request (or an error decided before routing). */
static enum MHD_Result answer(ah_http_t *http, struct MHD_Connection *conn, const char *path,
                              const char *method, unsigned early_status)
{
    http_reply_t reply = {.status = MHD_HTTP_OK};
    ah_buf_init(&reply.body);
    if (early_status == MHD_HTTP_URI_TOO_LONG) {
        reply_error(&reply, MHD_HTTP_CONTENT_TOO_LARGE, "request URL too large (max %d bytes)",
                    HTTP_URL_MAX);
    } else if (early_status == MHD_HTTP_BAD_REQUEST) {
        reply_error(&reply, MHD_HTTP_BAD_REQUEST, "too many query parameters (max %d)",
                    HTTP_QUERY_PARAMS_MAX);
    } else if (early_status == MHD_HTTP_CONTENT_TOO_LARGE) {
        reply_error(&reply, MHD_HTTP_CONTENT_TOO_LARGE, "request body too large (max %d bytes)",
                    HTTP_BODY_MAX);
    } else {
        route_request(http, conn, path, method, &reply);
    }
    return send_reply(conn, &reply);
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
        return answer(http, conn, url, method, MHD_HTTP_URI_TOO_LONG);
    }
    if (*req_cls == &too_many_params_marker) {
        return answer(http, conn, url, method, MHD_HTTP_BAD_REQUEST);
    }
    if (*req_cls == NULL) {
        bool too_large;
        if (!request_has_body(conn, &too_large)) {
            *req_cls = &headers_seen_marker;
            return MHD_YES;
        }
        if (too_large) {
            return answer(http, conn, url, method, MHD_HTTP_CONTENT_TOO_LARGE);
        }
        http_request_t *req = calloc(1, sizeof(*req));
        if (req == NULL) {
            return MHD_NO;
        }
        *req_cls = req;
        return MHD_YES;
    }
    if (*req_cls == &headers_seen_marker) {
        /* a body despite no Content-Length/Transfer-Encoding cannot happen: refuse it */
        return *upload_data_size > 0 ? MHD_NO : answer(http, conn, url, method, 0);
    }
    http_request_t *req = *req_cls;
    if (*upload_data_size > 0) {
        req->body_bytes += *upload_data_size;
        *upload_data_size = 0;
        return req->body_bytes > HTTP_BODY_DRAIN_MAX ? MHD_NO : MHD_YES;
    }
    return answer(http, conn, url, method,
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
    if (*req_cls != NULL && *req_cls != &url_too_long_marker &&
        *req_cls != &too_many_params_marker && *req_cls != &headers_seen_marker) {
        free(*req_cls);
    }
    *req_cls = NULL;
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

ah_http_t *ah_http_start(const ah_config_t *cfg, ah_state_t *state, ah_store_t *store, char *err,
                         size_t errlen)
{
    return ah_http_start_with(cfg, state, store, NULL, err, errlen);
}

ah_http_t *ah_http_start_with(const ah_config_t *cfg, ah_state_t *state, ah_store_t *store,
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

    unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG | MHD_USE_ITC;
    flags |= MHD_is_feature_supported(MHD_FEATURE_EPOLL) == MHD_YES ? MHD_USE_EPOLL : MHD_USE_POLL;
    if (ipv6) {
        flags |= MHD_USE_IPv6;
    }
    http->daemon = MHD_start_daemon(
        flags, (uint16_t)cfg->http_port, NULL, NULL, on_request, http, MHD_OPTION_SOCK_ADDR,
        (struct sockaddr *)&addr, MHD_OPTION_THREAD_POOL_SIZE, (unsigned int)HTTP_THREADS,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)HTTP_CONNECTION_TIMEOUT,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)HTTP_MEMORY_LIMIT, MHD_OPTION_URI_LOG_CALLBACK,
        on_uri, http, MHD_OPTION_NOTIFY_COMPLETED, on_completed, http, MHD_OPTION_EXTERNAL_LOGGER,
        on_mhd_log, http, MHD_OPTION_END);
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
    free(http);
    return NULL;
}

int ah_http_port(const ah_http_t *http)
{
    return http != NULL ? http->port : -1;
}

void ah_http_stop(ah_http_t *http)
{
    if (http == NULL) {
        return;
    }
    /* Stop accepting, then let requests in flight finish (their answers are queued but maybe
     * not yet sent: e.g. the reply to the shutdown command that made the host stop), bounded by
     * HTTP_DRAIN_MS, before the daemon closes every connection. */
    MHD_socket listen_fd = MHD_quiesce_daemon(http->daemon);
    if (listen_fd != MHD_INVALID_SOCKET) {
        close(listen_fd); /* a quiesced daemon leaves its listening socket to the caller */
    }
    for (int waited = 0; atomic_load(&http->in_flight) > 0 && waited < HTTP_DRAIN_MS; waited += 5) {
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    MHD_stop_daemon(http->daemon);
    free(http);
}
