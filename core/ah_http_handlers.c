/* The routes of the HTTP API (docs/API.md): one handler per route, each reading its inputs,
 * doing its one thing through the state object or the store, and writing its whole JSON body
 * (the shapes of docs/API.md) into the reply. Routing, authorization and everything
 * libmicrohttpd are in core/ah_http.c. Handlers run on libmicrohttpd's threads and never block:
 * what needs the store (cluster commands, history) is copied into a job that a store worker runs
 * (run_*), and a reload waits parked (check_reload); see core/ah_http_park.c. */
#include "ah_http_handlers.h"

#include "ah_json.h"
#include "ah_log.h"

#include <math.h>
#include <microhttpd.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define HTTP_HISTORY_DEFAULT 20
/* POST /api/agent/reload waits this long for the outcome. */
#define RELOAD_WAIT_S 10
#define METRICS_TYPE "text/plain; version=0.0.4"
#define DISABLED_MESSAGE                                                                           \
    "distributed control is disabled (ENABLE_DISTRIBUTED_CONTROL=false); use /api/agent/* for "    \
    "this pod"

/* ---- small writers ---------------------------------------------------------------------- */

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

void ah_http_reply_error(http_reply_t *reply, unsigned status, const char *fmt, ...)
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

/* ---- request inputs --------------------------------------------------------------------- */

/* Seconds between control checks in polling mode for the configured backend. */
static double polling_interval(const ah_config_t *cfg)
{
    return cfg->mongodb_uri != NULL ? cfg->polling_interval : cfg->embedded_poll_interval;
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
            ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST,
                                "%s must be %zu to %zu bytes (got %zu)", key, min, max, len);
        } else {
            ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST, "%s is too long: %zu bytes (max %zu)",
                                key, len, max);
        }
        return AH_EINVAL;
    }
    if (strlen(value) != len || !ah_utf8_valid(value, len)) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST, "%s must be valid UTF-8 without NUL bytes",
                            key);
        return AH_EINVAL;
    }
    *out = value;
    return AH_OK;
}

/* Parses "1"..AH_HISTORY_MAX (at most 4 plain decimal digits). 0 or AH_EINVAL. */
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
    if (value < 1 || value > AH_HISTORY_MAX) {
        return AH_EINVAL;
    }
    *out = value;
    return AH_OK;
}

int ah_http_parse_command_word(const char *word, ah_command_t *out)
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
    if (ah_http_parse_command_word(call->name, cmd) != AH_OK) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST,
                            "unknown command '%.64s' (expected pause, resume or shutdown)",
                            call->name);
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

/* A cluster command on its way to a store worker: the inputs, copied out of the connection. */
typedef struct cluster_command_job_s {
    ah_http_t *http;
    ah_command_t cmd;
    char reason[AH_REASON_MAX + 1];
    char updated_by[AH_NAME_MAX + 1];
} cluster_command_job_t;

/* Store worker: writes the command and answers with the new document. */
static void run_cluster_command(void *arg, http_reply_t *reply)
{
    const cluster_command_job_t *job = arg;
    ah_http_t *http = job->http;
    ah_command_t cmd = job->cmd;
    ah_control_t doc;
    char err[AH_ERRLEN] = "";
    /* Between begin and end this agent logs no cluster transition: its own "Agent paused"
     * follows the "issued" line even when its watcher sees the write first (change streams). */
    ah_state_issue_begin(http->state);
    int rc = ah_store_command(http->store, cmd, job->reason, job->updated_by, http->cfg->agent_id,
                              &doc, err, sizeof(err));
    if (rc == AH_OK) {
        char safe_by[AH_NAME_MAX * 4 + 1];
        char safe_reason[AH_REASON_MAX * 4 + 1];
        ah_log_info("Cluster command %s issued: version %lld by %s (reason: %s)",
                    ah_command_name(cmd), (long long)doc.version,
                    ah_log_escape(doc.updated_by, safe_by, sizeof(safe_by)),
                    ah_log_escape(doc.reason, safe_reason, sizeof(safe_reason)));
        /* The issuing agent applies its own command at once, without waiting for its watcher. */
        ah_state_offer_cluster(http->state, &doc);
    }
    ah_state_issue_end(http->state);
    if (rc == AH_EUNAVAIL || rc == AH_EIO) {
        ah_log_warn("Cluster command %s refused: control store unavailable: %s",
                    ah_command_name(cmd), err);
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, "control store unavailable: %s",
                            err);
        return;
    }
    if (rc == AH_EINVAL) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST, "%s", err);
        return;
    }
    if (rc != AH_OK) {
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "cluster command failed: %s",
                            err);
        return;
    }

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

/* POST /api/cluster/<command>: checked here, written to the store by a store worker. */
void ah_http_handle_cluster_command(http_call_t *call, http_reply_t *reply)
{
    ah_http_t *http = call->http;
    ah_command_t cmd;
    const char *reason;
    const char *updated_by;
    if (command_inputs(call, &cmd, &reason, &updated_by, reply) != AH_OK) {
        return;
    }
    if (http->store == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, DISABLED_MESSAGE);
        return;
    }
    cluster_command_job_t *job = calloc(1, sizeof(*job));
    if (job == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    job->http = http;
    job->cmd = cmd;
    ah_strlcpy(job->reason, reason, sizeof(job->reason));
    ah_strlcpy(job->updated_by, updated_by, sizeof(job->updated_by));
    ah_http_run_job(call, reply, run_cluster_command, job, free);
}

void ah_http_handle_control_state(http_call_t *call, http_reply_t *reply)
{
    if (call->http->store == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, DISABLED_MESSAGE);
        return;
    }
    ah_state_snapshot_t snap;
    ah_state_snapshot(call->http->state, &snap);
    if (!snap.cluster_known) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, "control state not known yet: %s",
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

void ah_http_handle_stats(http_call_t *call, http_reply_t *reply)
{
    if (call->http->store == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, DISABLED_MESSAGE);
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
        ah_json_num(b, "polling_interval", polling_interval(call->http->cfg));
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

/* History on its way to a store worker. */
typedef struct history_job_s {
    ah_store_t *store;
    int limit;
} history_job_t;

/* Store worker: reads the audit entries and answers with them. */
static void run_history(void *arg, http_reply_t *reply)
{
    const history_job_t *job = arg;
    int limit = job->limit;
    ah_control_t *entries = calloc((size_t)limit, sizeof(*entries));
    if (entries == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    int count = 0;
    char err[AH_ERRLEN] = "";
    int rc = ah_store_history(job->store, limit, entries, &count, err, sizeof(err));
    if (rc != AH_OK) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, "control store unavailable: %s",
                            err);
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

/* GET /api/cluster/history: checked here, read from the store by a store worker. */
void ah_http_handle_history(http_call_t *call, http_reply_t *reply)
{
    if (call->http->store == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, DISABLED_MESSAGE);
        return;
    }
    int limit = HTTP_HISTORY_DEFAULT;
    const char *text = NULL;
    size_t len = 0;
    if (MHD_lookup_connection_value_n(call->conn, MHD_GET_ARGUMENT_KIND, "limit", 5, &text, &len) ==
        MHD_YES) {
        if (text == NULL || strlen(text) != len || parse_limit(text, &limit) != AH_OK) {
            ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST,
                                "limit must be an integer between 1 and %d", AH_HISTORY_MAX);
            return;
        }
    }
    history_job_t *job = calloc(1, sizeof(*job));
    if (job == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    job->store = call->http->store;
    job->limit = limit;
    ah_http_run_job(call, reply, run_history, job, free);
}

/* ---- agent routes ----------------------------------------------------------------------- */

static const char *const requested_messages[] = {
    [AH_CMD_PAUSE] = "Pause requested for this agent",
    [AH_CMD_RUNNING] = "Resume requested for this agent",
    [AH_CMD_SHUTDOWN] = "Shutdown requested for this agent",
};

void ah_http_handle_agent_command(http_call_t *call, http_reply_t *reply)
{
    ah_http_t *http = call->http;
    ah_command_t cmd;
    const char *reason;
    const char *updated_by;
    if (command_inputs(call, &cmd, &reason, &updated_by, reply) != AH_OK) {
        return;
    }
    if (cmd == AH_CMD_RUNNING && ah_state_held(http->state)) {
        /* The state machine refuses it too (a race with the hold is settled there); this only
         * tells the caller at once. */
        ah_http_reply_error(
            reply, MHD_HTTP_CONFLICT,
            "this agent is held paused because the cluster command is 'shutdown': only a "
            "cluster command releases it (POST /api/cluster/resume, agenthost ctl resume)");
        return;
    }
    /* Logged first, so that the agent's own "Agent paused" line follows it. */
    char safe_by[AH_NAME_MAX * 4 + 1];
    ah_log_info("Local command %s requested through the API by %s", ah_command_name(cmd),
                ah_log_escape(updated_by, safe_by, sizeof(safe_by)));
    int rc = ah_state_offer_local(http->state, cmd, AH_SOURCE_LOCAL, reason, updated_by);
    if (rc == AH_EINVAL) {
        ah_log_warn("Local command %s refused: the agent is shutting down", ah_command_name(cmd));
        ah_http_reply_error(reply, MHD_HTTP_CONFLICT,
                            "the agent is shutting down (a shutdown is final): %s not applied",
                            call->name);
        return;
    }
    if (rc == AH_EUNAVAIL) {
        ah_log_warn("Local command %s refused: the agent is starting (not synced yet)",
                    ah_command_name(cmd));
        ah_http_reply_error(reply, MHD_HTTP_CONFLICT,
                            "the agent is starting: it has not synced to the cluster state yet; "
                            "local pause and resume are accepted once it has (see /readyz)");
        return;
    }
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

/* A reload request waiting for its outcome (parked: no thread waits). */
typedef struct reload_wait_s {
    ah_http_t *http;
    uint64_t ticket;
} reload_wait_t;

/* Park check: answers with the reload's outcome once known; 202 at the deadline or when the
 * worker has stopped without getting to it. */
static bool check_reload(void *arg, bool expired, http_reply_t *reply)
{
    const reload_wait_t *wait = arg;
    ah_http_t *http = wait->http;
    char err[AH_ERRLEN];
    int rc = ah_state_reload_outcome(http->state, wait->ticket, err, sizeof(err));
    ah_state_snapshot_t snap;
    ah_state_snapshot(http->state, &snap);
    if (rc == AH_ETIMEOUT && !expired && snap.state != AH_STATE_STOPPED) {
        return false;
    }
    if (rc == AH_ELUA) {
        ah_http_reply_error(reply, MHD_HTTP_UNPROCESSABLE_CONTENT,
                            "reload failed, the previous script keeps running: %s", err);
        return true;
    }
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
    return true;
}

/* POST /api/agent/reload: loads the script again between batches and answers with the outcome
 * (the request is parked up to RELOAD_WAIT_S for the current batch to finish; 202 if it is still
 * running). */
void ah_http_handle_agent_reload(http_call_t *call, http_reply_t *reply)
{
    reload_wait_t *wait = calloc(1, sizeof(*wait));
    if (wait == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    wait->http = call->http;
    wait->ticket = ah_state_request_reload(call->http->state);
    ah_http_park_release(ah_http_park(call, reply, RELOAD_WAIT_S, check_reload, wait, free));
}

/* Seconds since started_us, rounded to milliseconds. */
static double uptime_seconds(const ah_state_snapshot_t *snap)
{
    double seconds = (double)(ah_now_us() - snap->started_us) / 1e6;
    return seconds > 0 ? round(seconds * 1000.0) / 1000.0 : 0.0;
}

void ah_http_handle_agent_state(http_call_t *call, http_reply_t *reply)
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
    ah_json_num(b, "uptime_s", uptime_seconds(&snap));
    ah_json_close(b);
}

void ah_http_handle_mongo_status(http_call_t *call, http_reply_t *reply)
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
        ah_json_num(b, "latency_ms", round(st->latency_ms * 1000.0) / 1000.0);
    }
    ah_json_int(b, "reconnects", (int64_t)st->reconnects);
    ah_json_int(b, "stream_resumes", (int64_t)st->stream_resumes);
    ah_json_int(b, "polls", (int64_t)st->polls);
    ah_json_close(b);
}

/* ---- probes and metrics ----------------------------------------------------------------- */

void ah_http_handle_healthz(http_call_t *call, http_reply_t *reply)
{
    ah_state_snapshot_t snap;
    ah_state_snapshot(call->http->state, &snap);
    if (snap.wedged) {
        double running = 0;
        if (snap.batch_started_us != 0) {
            running = (double)(ah_mono_us() - snap.batch_started_us) / 1e6;
        }
        ah_http_reply_error(
            reply, MHD_HTTP_SERVICE_UNAVAILABLE,
            "wedged: a Lua call has been running for %.0fs, over BATCH_TIMEOUT (%gs)", running,
            call->http->cfg->batch_timeout);
        return;
    }
    ah_buf_t *b = &reply->body;
    ah_json_open(b);
    ah_json_str(b, "status", "ok");
    ah_json_str(b, "state", ah_run_state_name(snap.state));
    ah_json_close(b);
}

void ah_http_handle_readyz(http_call_t *call, http_reply_t *reply)
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

void ah_http_handle_metrics(http_call_t *call, http_reply_t *reply)
{
    ah_state_snapshot_t snap;
    ah_state_snapshot(call->http->state, &snap);
    reply->content_type = METRICS_TYPE;
    ah_metrics_render_agent(&snap, uptime_seconds(&snap), &reply->body);
    ah_http_park_render_metrics(call->http, &reply->body);
    if (call->http->metrics != NULL) {
        ah_metrics_render(call->http->metrics, &reply->body); /* agent.metrics */
    }
}
