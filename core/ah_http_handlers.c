/* The routes of the HTTP API (docs/API.md): one handler per route, each reading its inputs,
 * doing its one thing through the state object or the store, and writing its whole JSON body
 * (the shapes of docs/API.md) into the reply. Routing, authorization and everything
 * libmicrohttpd are in core/ah_http.c. Handlers run on libmicrohttpd's threads and never block:
 * what needs the store (cluster commands, history) is copied into a job that a store worker runs
 * (run_*), and a reload waits parked (check_reload), both through core/ah_http_park.h, the layer
 * below (handlers never call back into core/ah_http.c). */
#include "ah_http_handlers.h"

#include "ah_fleet.h"
#include "ah_json.h"
#include "ah_lease.h"
#include "ah_log.h"

#include <math.h>
#include <microhttpd.h>
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define HTTP_HISTORY_DEFAULT 20
/* wait=: how long past the wait a parked command may take to be written before the park's own
 * deadline answers it (the store's timeouts end a write well before). */
#define HTTP_WAIT_WRITE_ALLOWANCE_S 60
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

/* Writes "key": "<timestamp with milliseconds>" (the precision of a MongoDB Date), or null when
 * ts_us is 0. */
static void json_timestamp_ms(ah_buf_t *b, const char *key, int64_t ts_us)
{
    if (ts_us == 0) {
        ah_json_null(b, key);
        return;
    }
    char text[AH_TIMESTAMP_LEN];
    ah_format_timestamp(ts_us - ts_us % 1000 - (ts_us % 1000 < 0 ? 1000 : 0), text);
    char *dot = strchr(text, '.');
    if (dot != NULL && strlen(dot) == 8) { /* ".123456Z" → ".123Z" */
        dot[4] = 'Z';
        dot[5] = '\0';
    }
    ah_json_str(b, key, text);
}

/* Writes "key": "value", or null when value is "". */
/* "drain": a command's drain deadline in seconds, or null when it names none. */
static void json_drain(ah_buf_t *b, int64_t drain_ms)
{
    if (drain_ms > 0) {
        ah_json_num(b, "drain", (double)drain_ms / 1000.0);
    } else {
        ah_json_null(b, "drain");
    }
}

static void json_str_or_null(ah_buf_t *b, const char *key, const char *value)
{
    ah_json_str(b, key, value[0] != '\0' ? value : NULL);
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

/* Parses at most max_digits plain decimal digits (no sign, no space) into a value from min to
 * max: a history limit, a version. 0 or AH_EINVAL. */
static int parse_decimal(const char *text, size_t max_digits, int64_t min, int64_t max,
                         int64_t *out)
{
    if (text == NULL || text[0] == '\0' || strlen(text) > max_digits) {
        return AH_EINVAL;
    }
    int64_t value = 0;
    for (const char *p = text; *p != '\0'; p++) {
        if (*p < '0' || *p > '9') {
            return AH_EINVAL;
        }
        value = value * 10 + (*p - '0');
    }
    if (value < min || value > max) {
        return AH_EINVAL;
    }
    *out = value;
    return AH_OK;
}

/* Reads the optional integer query parameter `key` (0..2^53) into *out (unchanged when absent;
 * *present says which). On a bad value answers 400 naming it and returns AH_EINVAL. */
static int query_version(const http_call_t *call, const char *key, int64_t *out, bool *present,
                         http_reply_t *reply)
{
    const char *text = NULL;
    size_t len = 0;
    *present = false;
    if (MHD_lookup_connection_value_n(call->conn, MHD_GET_ARGUMENT_KIND, key, strlen(key), &text,
                                      &len) != MHD_YES) {
        return AH_OK;
    }
    if (text == NULL || strlen(text) != len ||
        parse_decimal(text, 16, 0, INT64_C(1) << 53, out) != AH_OK) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST,
                            "%s must be an integer from 0 to 9007199254740992", key);
        return AH_EINVAL;
    }
    *present = true;
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

/* Parses a pause duration (ah_parse_duration: "90s", "15m", "2h", "90"), more than 0 and at
 * most AH_PAUSE_MAX_S. 0 or AH_EINVAL. */
static int parse_duration(const char *text, double *out)
{
    double value;
    if (ah_parse_duration(text, &value) != AH_OK || !(value > 0) || value > AH_PAUSE_MAX_S) {
        return AH_EINVAL;
    }
    *out = value;
    return AH_OK;
}

/* Parses an ISO 8601 UTC time "YYYY-MM-DDTHH:MM:SS[.fraction](Z|+00:00)" into µs since the
 * epoch. 0 or AH_EINVAL. */
static int parse_utc_time(const char *text, int64_t *out)
{
    int year, month, day, hour, minute, second, used = 0;
    if (text == NULL || strlen(text) > 40 ||
        sscanf(text, "%4d-%2d-%2dT%2d:%2d:%2d%n", &year, &month, &day, &hour, &minute, &second,
               &used) != 6 ||
        used != 19) {
        return AH_EINVAL;
    }
    for (int i = 0; i < 19; i++) { /* no signs or spaces that sscanf would skip */
        bool digit = text[i] >= '0' && text[i] <= '9';
        bool sep = (i == 4 || i == 7)     ? text[i] == '-'
                   : i == 10              ? text[i] == 'T'
                   : (i == 13 || i == 16) ? text[i] == ':'
                                          : digit;
        if (!sep) {
            return AH_EINVAL;
        }
    }
    const char *p = text + 19;
    int64_t fraction_us = 0;
    if (*p == '.') {
        p++;
        int digits = 0;
        int64_t scale = 100000;
        while (*p >= '0' && *p <= '9') {
            if (digits < 6) {
                fraction_us += (*p - '0') * scale;
                scale /= 10;
            }
            digits++;
            p++;
        }
        if (digits == 0 || digits > 9) {
            return AH_EINVAL;
        }
    }
    if (strcmp(p, "Z") != 0 && strcmp(p, "+00:00") != 0) {
        return AH_EINVAL;
    }
    if (month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 || second > 59 ||
        year < 1970) {
        return AH_EINVAL;
    }
    struct tm tm = {.tm_year = year - 1900,
                    .tm_mon = month - 1,
                    .tm_mday = day,
                    .tm_hour = hour,
                    .tm_min = minute,
                    .tm_sec = second};
    time_t t = timegm(&tm);
    if (t == (time_t)-1 || tm.tm_mday != day) { /* 2026-02-30 normalised to March */
        return AH_EINVAL;
    }
    *out = (int64_t)t * 1000000 + fraction_us;
    return AH_OK;
}

/* Looks up query parameter key: NULL when absent, "" for "?key" without a value. */
static const char *query_raw(const http_call_t *call, const char *key, size_t *len)
{
    const char *value = NULL;
    *len = 0;
    if (MHD_lookup_connection_value_n(call->conn, MHD_GET_ARGUMENT_KIND, key, strlen(key), &value,
                                      len) != MHD_YES) {
        return NULL;
    }
    return value != NULL ? value : "";
}

/* Reads drain=DURATION (parse_duration's form) for command cmd into *drain_ms (0 when absent):
 * only pause and shutdown accept it. AH_EINVAL with a 400 already set. */
static int query_drain(const http_call_t *call, ah_command_t cmd, int64_t *drain_ms,
                       http_reply_t *reply)
{
    size_t len = 0;
    const char *text = query_raw(call, "drain", &len);
    *drain_ms = 0;
    if (text == NULL) {
        return AH_OK;
    }
    if (cmd != AH_CMD_PAUSE && cmd != AH_CMD_SHUTDOWN) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST,
                            "drain is only accepted by pause and shutdown");
        return AH_EINVAL;
    }
    double seconds = 0;
    if (strlen(text) != len || parse_duration(text, &seconds) != AH_OK) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST,
                            "drain must be a duration such as 90s, 2m or plain seconds, more "
                            "than 0 and at most %ds",
                            AH_PAUSE_MAX_S);
        return AH_EINVAL;
    }
    *drain_ms = (int64_t)llround(seconds * 1000.0);
    if (*drain_ms < 1) {
        *drain_ms = 1; /* milliseconds are the stored precision; a drain is never "none" */
    }
    return AH_OK;
}

/* The options of a cluster command beyond reason and updated_by: if_version, drain (pause and
 * shutdown), and for pause for/until. Fills req; AH_EINVAL with a 400 naming the parameter already
 * set. */
static int cluster_command_options(const http_call_t *call, ah_command_req_t *req,
                                   http_reply_t *reply)
{
    bool present = false;
    req->if_version = -1;
    req->expires_us = 0;
    if (query_version(call, "if_version", &req->if_version, &present, reply) != AH_OK ||
        query_drain(call, req->command, &req->drain_ms, reply) != AH_OK) {
        return AH_EINVAL;
    }
    if (!present) {
        req->if_version = -1;
    }
    size_t for_len = 0, until_len = 0;
    const char *for_text = query_raw(call, "for", &for_len);
    const char *until_text = query_raw(call, "until", &until_len);
    if (for_text == NULL && until_text == NULL) {
        return AH_OK;
    }
    const char *which = for_text != NULL ? "for" : "until";
    if (req->command != AH_CMD_PAUSE) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST, "%s is only accepted by pause", which);
        return AH_EINVAL;
    }
    if (for_text != NULL && until_text != NULL) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST, "give for or until, not both");
        return AH_EINVAL;
    }
    int64_t now_us = ah_now_us();
    if (for_text != NULL) {
        double seconds = 0;
        if (strlen(for_text) != for_len || parse_duration(for_text, &seconds) != AH_OK) {
            ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST,
                                "for must be a duration such as 90s, 15m, 2h or plain seconds, "
                                "more than 0 and at most %ds",
                                AH_PAUSE_MAX_S);
            return AH_EINVAL;
        }
        /* milliseconds: the precision of a MongoDB Date, so both stores say the same */
        req->expires_us = (now_us + (int64_t)(seconds * 1e6)) / 1000 * 1000;
        return AH_OK;
    }
    int64_t until_us = 0;
    if (strlen(until_text) != until_len || parse_utc_time(until_text, &until_us) != AH_OK) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST,
                            "until must be an ISO 8601 UTC time such as 2026-01-11T10:30:00Z");
        return AH_EINVAL;
    }
    if (until_us <= now_us || until_us - now_us > (int64_t)AH_PAUSE_MAX_S * 1000000) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST,
                            "until must be in the future, at most %ds from now", AH_PAUSE_MAX_S);
        return AH_EINVAL;
    }
    req->expires_us = until_us / 1000 * 1000;
    return AH_OK;
}

/* Writes the fields of the control-state body (docs/API.md) into an open object. */
static void write_control_state(ah_buf_t *b, const ah_control_t *doc, const char *watch_mode)
{
    ah_json_str(b, "command", ah_command_name(doc->command));
    ah_json_int(b, "version", doc->version);
    json_timestamp(b, "timestamp", doc->timestamp_us);
    ah_json_str(b, "reason", doc->reason);
    ah_json_str(b, "updated_by", doc->updated_by);
    json_str_or_null(b, "watch_mode", watch_mode);
    ah_json_str(b, "note", "All agents in the cluster are subscribed to this state");
    json_timestamp(b, "expires_at", doc->expires_us);
    json_drain(b, doc->drain_ms);
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

/* What a scoped command's answer says beyond a cluster command's. */
typedef struct scope_answer_s {
    char selector[AH_SELECTOR_MAX + 1]; /* canonical */
    bool held_before; /* the scope was a pause or shutdown before this write (issuer's view) */
    int matched;      /* live agents matching the selector; < 0: unknown */
} scope_answer_t;

/* Reads selector=: "" when absent, else its canonical form into out. A malformed or empty
 * selector is a 400 naming the problem (AH_EINVAL). */
static int query_selector(const http_call_t *call, char *out, size_t outlen, bool *present,
                          http_reply_t *reply)
{
    size_t len = 0;
    const char *text = query_raw(call, "selector", &len);
    char err[AH_ERRLEN];
    out[0] = '\0';
    *present = text != NULL;
    if (text == NULL) {
        return AH_OK;
    }
    if (strlen(text) != len) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST, "selector: contains a NUL byte");
        return AH_EINVAL;
    }
    ah_selector_t *sel = ah_selector_parse(text, err, sizeof(err));
    if (sel == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST, "%s", err);
        return AH_EINVAL;
    }
    int rc = AH_OK;
    if (ah_selector_empty(sel)) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST,
                            "selector: empty (a command for every agent is a cluster command: "
                            "leave selector out)");
        rc = AH_EINVAL;
    } else if (ah_selector_format(sel, out, outlen) != AH_OK) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST,
                            "selector: longer than %d bytes in canonical form", AH_SELECTOR_MAX);
        rc = AH_EINVAL;
    }
    ah_selector_free(sel);
    return rc;
}

/* True when the issuing agent's view has the scope `selector` as a pause or shutdown. */
static bool scope_holds_in_view(ah_http_t *http, const char *selector)
{
    ah_scope_view_t *scopes = malloc(AH_SCOPES_MAX * sizeof(*scopes));
    bool holds = false;
    int count = scopes != NULL ? ah_state_scopes(http->state, scopes, AH_SCOPES_MAX) : 0;
    for (int i = 0; i < count; i++) {
        if (strcmp(scopes[i].doc.selector, selector) == 0) {
            holds = scopes[i].doc.command != AH_CMD_RUNNING;
        }
    }
    free(scopes);
    return holds;
}

/* Live (not stale, not stopped) agents among recs whose labels match the canonical selector. */
static int count_matching(const ah_config_t *cfg, const char *selector,
                          const ah_agent_status_t *recs, int count)
{
    char err[AH_ERRLEN];
    ah_selector_t *sel = ah_selector_parse(selector, err, sizeof(err));
    int64_t now_us = ah_now_us();
    int matched = 0;
    for (int i = 0; sel != NULL && i < count; i++) {
        matched += ah_selector_matches_text(sel, recs[i].labels) &&
                   !ah_fleet_is_stale(&recs[i], now_us, cfg->heartbeat_interval) &&
                   strcmp(recs[i].state, "stopped") != 0;
    }
    ah_selector_free(sel);
    return matched;
}

/* Answers a parked request with reply (taken over) and lets go of the park: any thread. */
static void park_finish(http_park_t *park, http_reply_t *reply)
{
    ah_http_park_answer(park, reply);
    ah_http_park_release(park);
}

/* Answers a parked request 503: the fleet's waiter refused the work (it is stopping). */
static void park_refuse(http_park_t *park)
{
    http_reply_t refused = {.status = MHD_HTTP_OK};
    ah_buf_init(&refused.body);
    ah_http_reply_error(&refused, MHD_HTTP_SERVICE_UNAVAILABLE, "the agent is shutting down");
    park_finish(park, &refused);
}

/* Parks the request for the fleet's waiter thread, which answers it: the park's own deadline
 * (HTTP_WAIT_WRITE_ALLOWANCE_S after timeout_s) is only a safety net. NULL with reply set (503
 * stopping or 500) when it cannot be parked. */
static http_park_t *park_for_fleet(http_call_t *call, http_reply_t *reply, double timeout_s)
{
    return ah_http_park(call->http->parking, call->conn, call->req_cls, reply,
                        timeout_s + HTTP_WAIT_WRITE_ALLOWANCE_S, NULL, NULL, NULL);
}

/* Writes the "wait" object of a cluster command's answer. */
static void write_wait(ah_buf_t *b, const ah_fleet_outcome_t *outcome)
{
    static const struct {
        const char *key;
        ah_fleet_ack_t ack;
    } lists[] = {{"acknowledged", AH_FLEET_ACKNOWLEDGED},
                 {"pending", AH_FLEET_PENDING},
                 {"excluded", AH_FLEET_EXCLUDED}};
    ah_json_open_object(b, "wait");
    ah_json_bool(b, "complete", outcome->complete);
    for (size_t k = 0; k < sizeof(lists) / sizeof(lists[0]); k++) {
        ah_json_open_array(b, lists[k].key);
        for (int i = 0; i < outcome->count; i++) {
            if (outcome->acks[i] == lists[k].ack) {
                ah_json_str(b, NULL, outcome->recs[i].agent_id);
            }
        }
        ah_json_close_array(b);
    }
    ah_json_num(b, "waited_s", round(outcome->waited_s * 1000.0) / 1000.0);
    if (outcome->error != NULL && outcome->error[0] != '\0') {
        ah_json_str(b, "error", outcome->error);
    }
    ah_json_close(b);
}

/* The answer to a cluster command whose write (ah_fleet_issue: logged, and offered to the state)
 * returned rc, err and doc; with wait != NULL the "wait" object is added to the success body.
 * A scoped command (scope->selector not "") says what it matched where a cluster command says
 * what it asked of every agent: the one difference between the two answers. */
static void command_reply(ah_http_t *http, ah_command_t cmd, int rc, const char *err,
                          const ah_control_t *doc, const ah_fleet_outcome_t *wait,
                          const scope_answer_t *scope, http_reply_t *reply)
{
    if (rc == AH_ECONFLICT) {
        ah_state_snapshot_t snap;
        ah_state_snapshot(http->state, &snap);
        reply->status = MHD_HTTP_CONFLICT;
        ah_buf_t *b = &reply->body;
        ah_json_open(b);
        ah_json_str(b, "status", "error");
        ah_json_str(b, "error", err);
        ah_json_open_object(b, "current");
        write_control_state(b, doc, snap.store.watch_mode);
        if (doc->selector[0] != '\0') {
            ah_json_str(b, "selector", doc->selector);
        }
        ah_json_close(b);
        ah_json_close(b);
        return;
    }
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
    ah_format_timestamp(doc->timestamp_us, timestamp);

    ah_buf_t *b = &reply->body;
    ah_json_open(b);
    ah_json_str(b, "status", "success");
    if (scope->selector[0] != '\0') {
        char message[AH_SELECTOR_MAX + 160];
        bool held_nobody = cmd == AH_CMD_RUNNING && (!scope->held_before || scope->matched == 0);
        snprintf(message, sizeof(message), "%s command issued to the agents matching %s%s",
                 cmd == AH_CMD_PAUSE     ? "Pause"
                 : cmd == AH_CMD_RUNNING ? "Resume"
                                         : "Shutdown",
                 scope->selector,
                 held_nobody ? " (the scope held no agent: nothing to resume)" : "");
        ah_json_str(b, "message", message);
        ah_json_str(b, "selector", scope->selector);
        if (scope->matched >= 0) {
            ah_json_int(b, "matched", scope->matched);
        }
        if (cmd == AH_CMD_RUNNING) {
            ah_json_bool(b, "held", !held_nobody);
        }
    } else {
        ah_json_str(b, "message", issued_messages[cmd]);
    }
    ah_json_str(b, "command", ah_command_name(doc->command));
    ah_json_int(b, "version", doc->version);
    ah_json_str(b, "timestamp", timestamp);
    ah_json_str(b, "reason", doc->reason);
    ah_json_str(b, "propagation", propagation);
    json_timestamp(b, "expires_at", doc->expires_us);
    json_drain(b, doc->drain_ms);
    if (wait != NULL) {
        write_wait(b, wait);
    }
    ah_json_close(b);
}

/* Reads wait=SECONDS: a decimal number, more than 0 and at most AH_FLEET_WAIT_MAX_S. */
static int query_wait(const http_call_t *call, double *out, bool *present, http_reply_t *reply)
{
    size_t len = 0;
    const char *text = query_raw(call, "wait", &len);
    *present = text != NULL;
    if (text == NULL) {
        return AH_OK;
    }
    char *end = NULL;
    double value = strlen(text) == len && text[0] >= '0' && text[0] <= '9' && len <= 16
                       ? strtod(text, &end)
                       : NAN;
    if (end == NULL || *end != '\0' || !isfinite(value) || !(value > 0) ||
        value > AH_FLEET_WAIT_MAX_S || strpbrk(text, "eExXpP") != NULL) {
        ah_http_reply_error(reply, MHD_HTTP_BAD_REQUEST,
                            "wait must be a number of seconds, more than 0 and at most %g",
                            AH_FLEET_WAIT_MAX_S);
        return AH_EINVAL;
    }
    *out = value;
    return AH_OK;
}

/* A cluster or scoped command on its way to the store: the request, its strings copied out of
 * the connection, and what its answer says about the scope (scope.selector "": a cluster
 * command). Run by a store worker, or with wait= by the fleet's waiter (park set). */
typedef struct cluster_command_s {
    ah_http_t *http;
    http_park_t *park;    /* wait=: the parked request the waiter answers */
    ah_command_req_t req; /* reason, updated_by and selector point into this object */
    char reason[AH_REASON_MAX + 1];
    char updated_by[AH_NAME_MAX + 1];
    scope_answer_t scope;
} cluster_command_t;

/* Store worker: writes the command (ah_fleet_issue) and answers; a scoped command's answer
 * counts the live agents its selector matches in a fresh read of the records. */
static void run_cluster_command(void *arg, http_reply_t *reply)
{
    cluster_command_t *cc = arg;
    ah_control_t doc;
    char err[AH_ERRLEN] = "";
    int rc = ah_fleet_issue(cc->http->state, cc->http->store, &cc->req, &doc, err, sizeof(err));
    if (cc->scope.selector[0] != '\0' && rc == AH_OK) {
        ah_agent_status_t *recs = NULL;
        int count = 0;
        char list_err[AH_ERRLEN];
        if (ah_store_list_status(cc->http->store, &recs, &count, list_err, sizeof(list_err)) ==
            AH_OK) {
            cc->scope.matched = count_matching(cc->http->cfg, cc->scope.selector, recs, count);
        }
        free(recs);
    }
    command_reply(cc->http, cc->req.command, rc, err, &doc, NULL, &cc->scope, reply);
}

/* The fleet waiter's callback for a command with wait=: answers the parked request; a scoped
 * command's answer counts the live agents its selector matched (the wait's own reads). */
static void cluster_wait_done(void *ud, const ah_fleet_outcome_t *outcome)
{
    cluster_command_t *cc = ud;
    http_reply_t reply = {.status = MHD_HTTP_OK};
    ah_buf_init(&reply.body);
    if (cc->scope.selector[0] != '\0' && outcome->command_rc == AH_OK) {
        cc->scope.matched = 0;
        for (int i = 0; i < outcome->count; i++) {
            cc->scope.matched +=
                outcome->acks[i] == AH_FLEET_ACKNOWLEDGED || outcome->acks[i] == AH_FLEET_PENDING;
        }
    }
    command_reply(cc->http, cc->req.command, outcome->command_rc, outcome->command_error,
                  outcome->doc, outcome->command_rc == AH_OK ? outcome : NULL, &cc->scope, &reply);
    park_finish(cc->park, &reply);
    free(cc);
}

/* POST /api/cluster/{pause,resume,shutdown}[?selector=...]: a cluster command, or with selector=
 * a scoped one; both are written the same way (a store worker, or with wait= the fleet's waiter)
 * and differ only in the document written (req.selector) and in their answer (cc->scope). */
void ah_http_handle_cluster_command(http_call_t *call, http_reply_t *reply)
{
    ah_http_t *http = call->http;
    int64_t started_us = ah_mono_us();
    ah_command_t cmd;
    const char *reason;
    const char *updated_by;
    if (command_inputs(call, &cmd, &reason, &updated_by, reply) != AH_OK) {
        return;
    }
    ah_command_req_t req = {.command = cmd, .agent_id = http->cfg->agent_id};
    double wait_s = 0;
    bool wait = false;
    bool scoped = false;
    char selector[AH_SELECTOR_MAX + 1];
    if (query_selector(call, selector, sizeof(selector), &scoped, reply) != AH_OK ||
        cluster_command_options(call, &req, reply) != AH_OK ||
        query_wait(call, &wait_s, &wait, reply) != AH_OK) {
        return;
    }
    if (http->store == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, DISABLED_MESSAGE);
        return;
    }
    ah_fleet_t *fleet = wait ? atomic_load(&http->fleet) : NULL;
    if (wait && fleet == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE,
                            "cannot wait: the fleet view is not running");
        return;
    }
    cluster_command_t *cc = calloc(1, sizeof(*cc));
    if (cc == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    cc->http = http;
    cc->req = req;
    ah_strlcpy(cc->reason, reason, sizeof(cc->reason));
    ah_strlcpy(cc->updated_by, updated_by, sizeof(cc->updated_by));
    ah_strlcpy(cc->scope.selector, selector, sizeof(cc->scope.selector));
    cc->req.reason = cc->reason;
    cc->req.updated_by = cc->updated_by;
    cc->req.selector = cc->scope.selector;
    cc->scope.matched = -1; /* unknown until counted */
    if (scoped) {
        cc->scope.held_before = scope_holds_in_view(http, selector);
    }
    if (!wait) {
        ah_http_run_job(http->parking, call->conn, call->req_cls, reply, run_cluster_command, cc,
                        free);
        return;
    }
    cc->park = park_for_fleet(call, reply, wait_s);
    if (cc->park == NULL) {
        free(cc);
        return; /* reply: 503 (stopping) or 500 */
    }
    if (ah_fleet_command_wait(fleet, &cc->req, wait_s, started_us, cluster_wait_done, cc) !=
        AH_OK) {
        park_refuse(cc->park);
        free(cc);
    }
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
    ah_json_open(&reply->body);
    write_control_state(&reply->body, &snap.cluster, snap.store.watch_mode);
    ah_json_close(&reply->body);
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
        json_timestamp(b, "expires_at", snap.cluster.expires_us);
    } else {
        ah_json_null(b, "current_command");
        ah_json_null(b, "current_version");
        ah_json_null(b, "last_updated");
        ah_json_null(b, "updated_by");
        ah_json_null(b, "reason");
        ah_json_null(b, "expires_at");
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
        json_drain(b, e->drain_ms);
        if (e->selector[0] != '\0') { /* a scope's entry; a cluster entry keeps its shape */
            ah_json_str(b, "selector", e->selector);
        }
        ah_json_close(b);
    }
    ah_json_close_array(b);
    ah_json_close(b);
cleanup:
    free(entries);
}

/* Writes "key": {label: value, ...} from a canonical labels text. */
static void write_labels(ah_buf_t *b, const char *key, const char *labels_text)
{
    char err[AH_ERRLEN];
    ah_labels_t *labels = ah_labels_parse(labels_text, err, sizeof(err));
    ah_json_open_object(b, key);
    for (size_t i = 0; i < ah_labels_count(labels); i++) {
        ah_json_str(b, ah_labels_key(labels, i), ah_labels_value(labels, i));
    }
    ah_json_close(b);
    ah_labels_free(labels);
}

/* The run states in the order a fleet summary lists them. */
static const char *const summary_states[] = {"starting", "running", "paused",
                                             "stopping", "stopped", "lost"};
/* summary_states' "lost": a stale record of an agent that did not stop cleanly (killed, hung,
 * cut off). It is counted there, never under the state it last wrote. */
#define SUMMARY_LOST 5

/* Writes the body of GET /api/cluster/agents: the fleet of recs (sorted by agent_id) against
 * the cluster's current version; with filtered, only the agents behind `wanted` are listed. */
static void write_agents(ah_buf_t *b, const ah_config_t *cfg, int64_t version,
                         const ah_agent_status_t *recs, int count, bool filtered, int64_t wanted,
                         const ah_selector_t *sel)
{
    int64_t now_us = ah_now_us();
    double interval = cfg->heartbeat_interval;
    int state_counts[sizeof(summary_states) / sizeof(summary_states[0])] = {0};
    int other_states = 0, applied_current = 0, stale = 0, listed = 0, total = 0;
    for (int i = 0; i < count; i++) {
        const ah_agent_status_t *r = &recs[i];
        if (sel != NULL && !ah_selector_matches_text(sel, r->labels)) {
            continue; /* ?selector=: the others are not part of the listing */
        }
        total++;
        bool is_stale = ah_fleet_is_stale(r, now_us, interval);
        size_t k = 0;
        while (k < SUMMARY_LOST && strcmp(r->state, summary_states[k]) != 0) {
            k++;
        }
        if (is_stale && strcmp(r->state, "stopped") != 0) {
            k = SUMMARY_LOST;
        } else if (k == SUMMARY_LOST) {
            k = sizeof(summary_states) / sizeof(summary_states[0]); /* not a state we know */
        }
        if (k < sizeof(summary_states) / sizeof(summary_states[0])) {
            state_counts[k]++;
        } else {
            other_states++;
        }
        applied_current += r->applied_version >= version;
        stale += is_stale;
        listed += !filtered || r->applied_version < wanted;
    }
    ah_json_open(b);
    ah_json_int(b, "count", listed);
    ah_json_int(b, "version", version);
    ah_json_open_object(b, "summary");
    ah_json_int(b, "total", total);
    ah_json_open_object(b, "states");
    for (size_t k = 0; k < sizeof(summary_states) / sizeof(summary_states[0]); k++) {
        if (state_counts[k] > 0) {
            ah_json_int(b, summary_states[k], state_counts[k]);
        }
    }
    if (other_states > 0) {
        ah_json_int(b, "unknown", other_states);
    }
    ah_json_close(b);
    ah_json_int(b, "applied_current", applied_current);
    ah_json_int(b, "stale", stale);
    ah_json_close(b);
    ah_json_open_array(b, "agents");
    for (int i = 0; i < count; i++) {
        const ah_agent_status_t *r = &recs[i];
        if ((filtered && r->applied_version >= wanted) ||
            (sel != NULL && !ah_selector_matches_text(sel, r->labels))) {
            continue;
        }
        ah_json_open_object(b, NULL);
        ah_json_str(b, "agent_id", r->agent_id);
        ah_json_str(b, "state", r->state);
        ah_json_int(b, "applied_version", r->applied_version);
        json_str_or_null(b, "watch_mode", r->watch_mode);
        json_timestamp_ms(b, "last_seen", r->last_seen_us);
        json_timestamp_ms(b, "started_at", r->started_us);
        ah_json_str(b, "host", r->host);
        ah_json_int(b, "pid", r->pid);
        ah_json_str(b, "agenthost_version", r->agenthost_version);
        ah_json_int(b, "batches", r->batches);
        ah_json_int(b, "errors", r->errors);
        ah_json_bool(b, "stale", ah_fleet_is_stale(r, now_us, interval));
        write_labels(b, "labels", r->labels);
        ah_json_open_array(b, "leases");
        for (const char *p = r->leases; *p != '\0';) {
            size_t n = strcspn(p, ",");
            char name[AH_NAME_MAX + 1];
            ah_strlcpy(name, p, n + 1 < sizeof(name) ? n + 1 : sizeof(name));
            ah_json_str(b, NULL, name);
            p += n + (p[n] == ',');
        }
        ah_json_close_array(b);
        ah_json_close(b);
    }
    ah_json_close_array(b);
    ah_json_close(b);
}

/* A parked GET /api/cluster/agents or /api/cluster/scopes, answered by the fleet's waiter
 * thread after its reads of the records: the two routes differ only in the body written. */
typedef struct fleet_read_s {
    ah_http_t *http;
    http_park_t *park;
    void (*write)(ah_buf_t *b, const struct fleet_read_s *fr, const ah_fleet_outcome_t *outcome);
    bool filtered;      /* agents: ?version= */
    int64_t wanted;     /* agents: its version */
    ah_selector_t *sel; /* agents: ?selector=, or NULL */
} fleet_read_t;

static void fleet_read_free(fleet_read_t *fr)
{
    ah_selector_free(fr->sel);
    free(fr);
}

static void fleet_read_done(void *ud, const ah_fleet_outcome_t *outcome)
{
    fleet_read_t *fr = ud;
    http_reply_t reply = {.status = MHD_HTTP_OK};
    ah_buf_init(&reply.body);
    if (outcome->command_rc != AH_OK) {
        ah_http_reply_error(&reply, MHD_HTTP_SERVICE_UNAVAILABLE, "control store unavailable: %s",
                            outcome->command_error);
    } else {
        fr->write(&reply.body, fr, outcome);
    }
    park_finish(fr->park, &reply);
    fleet_read_free(fr);
}

/* Parks the request until the fleet's waiter has read the records and fr->write has answered
 * (fr, malloc'd, is taken over: freed on every path). */
static void park_fleet_read(http_call_t *call, http_reply_t *reply, ah_fleet_t *fleet,
                            fleet_read_t *fr)
{
    fr->park = park_for_fleet(call, reply, 0);
    if (fr->park == NULL) {
        fleet_read_free(fr);
        return; /* reply: 503 (stopping) or 500 */
    }
    if (ah_fleet_read(fleet, fleet_read_done, fr) != AH_OK) {
        park_refuse(fr->park);
        fleet_read_free(fr);
    }
}

static void write_agents_read(ah_buf_t *b, const fleet_read_t *fr,
                              const ah_fleet_outcome_t *outcome)
{
    write_agents(b, fr->http->cfg, outcome->doc->version, outcome->recs, outcome->count,
                 fr->filtered, fr->wanted, fr->sel);
}

/* GET /api/cluster/agents[?version=N]: the status records of the fleet, read from the store by
 * the fleet's waiter thread while the request is parked (directly, without a fleet). */
void ah_http_handle_cluster_agents(http_call_t *call, http_reply_t *reply)
{
    ah_http_t *http = call->http;
    if (http->store == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, DISABLED_MESSAGE);
        return;
    }
    int64_t wanted = 0;
    bool filtered = false;
    bool by_selector = false;
    char selector[AH_SELECTOR_MAX + 1];
    ah_selector_t *sel = NULL;
    if (query_version(call, "version", &wanted, &filtered, reply) != AH_OK ||
        query_selector(call, selector, sizeof(selector), &by_selector, reply) != AH_OK) {
        return;
    }
    char err[AH_ERRLEN] = "";
    if (by_selector && (sel = ah_selector_parse(selector, err, sizeof(err))) == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "%s", err);
        return;
    }
    ah_fleet_t *fleet = atomic_load(&http->fleet);
    if (fleet != NULL) {
        fleet_read_t *fr = calloc(1, sizeof(*fr));
        if (fr == NULL) {
            ah_selector_free(sel);
            ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
            return;
        }
        *fr = (fleet_read_t){.http = http,
                             .write = write_agents_read,
                             .filtered = filtered,
                             .wanted = wanted,
                             .sel = sel};
        park_fleet_read(call, reply, fleet, fr);
        return;
    }
    ah_control_t doc;
    ah_agent_status_t *recs = NULL;
    int count = 0;
    if (ah_store_read(http->store, &doc, err, sizeof(err)) != AH_OK ||
        ah_store_list_status(http->store, &recs, &count, err, sizeof(err)) != AH_OK) {
        ah_selector_free(sel);
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, "control store unavailable: %s",
                            err);
        return;
    }
    write_agents(&reply->body, http->cfg, doc.version, recs, count, filtered, wanted, sel);
    ah_selector_free(sel);
    free(recs);
}

/* Writes the body of GET /api/cluster/scopes: every scope document the agent sees, with the live
 * agents (recs) it matches, how many acknowledged its version and how many it holds. */
static void write_scopes(ah_buf_t *b, ah_http_t *http, const ah_agent_status_t *recs, int count)
{
    ah_scope_view_t *scopes = malloc(AH_SCOPES_MAX * sizeof(*scopes));
    int n = scopes != NULL ? ah_state_scopes(http->state, scopes, AH_SCOPES_MAX) : 0;
    int64_t now_us = ah_now_us();
    int active = 0;
    for (int i = 0; i < n; i++) {
        active += scopes[i].doc.command != AH_CMD_RUNNING;
    }
    ah_json_open(b);
    ah_json_int(b, "count", n);
    ah_json_int(b, "active", active);
    ah_json_open_array(b, "scopes");
    for (int i = 0; i < n; i++) {
        const ah_control_t *d = &scopes[i].doc;
        char err[AH_ERRLEN];
        ah_selector_t *sel = ah_selector_parse(d->selector, err, sizeof(err));
        int matched = 0, acknowledged = 0;
        unsigned long long id = ah_selector_id(d->selector);
        for (int r = 0; sel != NULL && r < count; r++) {
            ah_fleet_ack_t ack = ah_fleet_classify_scope(&recs[r], sel, d->version, now_us,
                                                         http->cfg->heartbeat_interval);
            bool live = !ah_fleet_is_stale(&recs[r], now_us, http->cfg->heartbeat_interval) &&
                        strcmp(recs[r].state, "stopped") != 0;
            if (ack != AH_FLEET_NOT_MATCHED && live) {
                matched++;
                acknowledged += ah_fleet_scope_ack(&recs[r], id) >= d->version;
            }
        }
        ah_selector_free(sel);
        ah_json_open_object(b, NULL);
        ah_json_str(b, "selector", d->selector);
        ah_json_str(b, "command", ah_command_name(d->command));
        ah_json_int(b, "version", d->version);
        json_timestamp(b, "timestamp", d->timestamp_us);
        ah_json_str(b, "reason", d->reason);
        ah_json_str(b, "updated_by", d->updated_by);
        json_timestamp(b, "expires_at", d->expires_us);
        ah_json_int(b, "matched", matched);
        ah_json_int(b, "acknowledged", acknowledged);
        ah_json_int(b, "holds", d->command != AH_CMD_RUNNING ? acknowledged : 0);
        ah_json_close(b);
    }
    ah_json_close_array(b);
    ah_json_close(b);
    free(scopes);
}

static void write_scopes_read(ah_buf_t *b, const fleet_read_t *fr,
                              const ah_fleet_outcome_t *outcome)
{
    write_scopes(b, fr->http, outcome->recs, outcome->count);
}

/* GET /api/cluster/scopes: the scope documents (this agent's view, kept current by its watcher)
 * with the fleet's records read by the fleet's waiter thread while the request is parked. */
void ah_http_handle_cluster_scopes(http_call_t *call, http_reply_t *reply)
{
    ah_http_t *http = call->http;
    ah_fleet_t *fleet = atomic_load(&http->fleet);
    if (http->store == NULL || fleet == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, DISABLED_MESSAGE);
        return;
    }
    fleet_read_t *fr = calloc(1, sizeof(*fr));
    if (fr == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    *fr = (fleet_read_t){.http = http, .write = write_scopes_read};
    park_fleet_read(call, reply, fleet, fr);
}

/* GET /api/cluster/history: checked here, read from the store by a store worker. */
void ah_http_handle_history(http_call_t *call, http_reply_t *reply)
{
    if (call->http->store == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, DISABLED_MESSAGE);
        return;
    }
    int64_t limit = HTTP_HISTORY_DEFAULT;
    const char *text = NULL;
    size_t len = 0;
    if (MHD_lookup_connection_value_n(call->conn, MHD_GET_ARGUMENT_KIND, "limit", 5, &text, &len) ==
        MHD_YES) {
        if (text == NULL || strlen(text) != len ||
            parse_decimal(text, 4, 1, AH_HISTORY_MAX, &limit) != AH_OK) {
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
    job->limit = (int)limit;
    ah_http_run_job(call->http->parking, call->conn, call->req_cls, reply, run_history, job, free);
}

/* Store worker: reads every lease record and answers with them. */
static void run_leases(void *arg, http_reply_t *reply)
{
    ah_store_t *store = arg;
    ah_lease_t *leases = NULL;
    int count = 0;
    char err[AH_ERRLEN] = "";
    if (ah_store_list_leases(store, &leases, &count, err, sizeof(err)) != AH_OK) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, "control store unavailable: %s",
                            err);
        return;
    }
    ah_buf_t *b = &reply->body;
    ah_json_open(b);
    ah_json_int(b, "count", count);
    ah_json_open_array(b, "leases");
    for (int i = 0; i < count; i++) {
        const ah_lease_t *l = &leases[i];
        bool held = l->owner[0] != '\0' && l->expires_in_ms > 0;
        ah_json_open_object(b, NULL);
        ah_json_str(b, "name", l->name);
        ah_json_str(b, "owner", held ? l->owner : "");
        ah_json_int(b, "token", l->token);
        ah_json_num(b, "expires_in", held ? (double)l->expires_in_ms / 1000.0 : 0.0);
        ah_json_str(b, "last_owner", l->owner);
        ah_json_close(b);
    }
    ah_json_close_array(b);
    ah_json_close(b);
    free(leases);
}

void ah_http_handle_leases(http_call_t *call, http_reply_t *reply)
{
    if (call->http->store == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, DISABLED_MESSAGE);
        return;
    }
    ah_http_run_job(call->http->parking, call->conn, call->req_cls, reply, run_leases,
                    call->http->store, NULL);
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
    int64_t drain_ms = 0;
    if (command_inputs(call, &cmd, &reason, &updated_by, reply) != AH_OK ||
        query_drain(call, cmd, &drain_ms, reply) != AH_OK) {
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
    int rc =
        ah_state_offer_local_drain(http->state, cmd, AH_SOURCE_LOCAL, reason, updated_by, drain_ms);
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
    json_drain(b, drain_ms);
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

/* Park check: answers with the reload's outcome once known; 202 at the deadline; 503 when the
 * agent is shutting down without having served it (the worker serves no reload once stopping). */
static bool check_reload(void *arg, bool expired, http_reply_t *reply)
{
    const reload_wait_t *wait = arg;
    ah_http_t *http = wait->http;
    char err[AH_ERRLEN];
    int rc = ah_state_reload_outcome(http->state, wait->ticket, err, sizeof(err));
    ah_state_snapshot_t snap;
    ah_state_snapshot(http->state, &snap);
    bool stopping = snap.state == AH_STATE_STOPPING || snap.state == AH_STATE_STOPPED;
    if (rc == AH_ETIMEOUT && !expired && !stopping) {
        return false;
    }
    if (rc == AH_ETIMEOUT && stopping) {
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE,
                            "the agent is shutting down: the reload was not applied");
        return true;
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

/* POST /api/agent/reload[?wait=S]: loads the script again between batches and answers with the
 * outcome (the request is parked up to S, default RELOAD_WAIT_S, for the current batch to finish;
 * 202 if it is still running). */
void ah_http_handle_agent_reload(http_call_t *call, http_reply_t *reply)
{
    reload_wait_t *wait = calloc(1, sizeof(*wait));
    if (wait == NULL) {
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    double wait_s = RELOAD_WAIT_S;
    bool wait_given = false;
    if (query_wait(call, &wait_s, &wait_given, reply) != AH_OK) {
        free(wait);
        return;
    }
    wait->http = call->http;
    wait->ticket = ah_state_request_reload(call->http->state);
    ah_http_park_release(ah_http_park(call->http->parking, call->conn, call->req_cls, reply,
                                      wait_given ? wait_s : RELOAD_WAIT_S, check_reload, wait,
                                      free));
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
    char labels[AH_LABELS_TEXT_MAX + 1];
    ah_state_labels_text(call->http->state, labels, sizeof(labels));
    write_labels(b, "labels", labels);
    /* the documents that keep this agent from running: the cluster's and every matching
     * scope's that is a pause or a shutdown */
    ah_json_open_array(b, "held_by");
    if (snap.cluster_known && snap.cluster.command != AH_CMD_RUNNING) {
        ah_json_open_object(b, NULL);
        ah_json_null(b, "selector");
        ah_json_str(b, "command", ah_command_name(snap.cluster.command));
        ah_json_int(b, "version", snap.cluster.version);
        ah_json_str(b, "reason", snap.cluster.reason);
        ah_json_close(b);
    }
    ah_scope_view_t *scopes = malloc(AH_SCOPES_MAX * sizeof(*scopes));
    int n = scopes != NULL ? ah_state_scopes(call->http->state, scopes, AH_SCOPES_MAX) : 0;
    for (int i = 0; i < n; i++) {
        if (scopes[i].matches && scopes[i].doc.command != AH_CMD_RUNNING) {
            ah_json_open_object(b, NULL);
            ah_json_str(b, "selector", scopes[i].doc.selector);
            ah_json_str(b, "command", ah_command_name(scopes[i].doc.command));
            ah_json_int(b, "version", scopes[i].doc.version);
            ah_json_str(b, "reason", scopes[i].doc.reason);
            ah_json_close(b);
        }
    }
    free(scopes);
    ah_json_close_array(b);
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
    char labels[AH_LABELS_TEXT_MAX + 1];
    ah_state_labels_text(call->http->state, labels, sizeof(labels));
    ah_metrics_render_labels(labels, &reply->body);
    ah_http_park_render_metrics(call->http->parking, &reply->body);
    ah_leases_t *leases = atomic_load(&call->http->leases);
    if (leases != NULL) {
        ah_lease_view_t *views = NULL;
        int count = 0;
        if (ah_leases_list(leases, &views, &count) == AH_OK) {
            ah_metrics_render_leases(views, count, &reply->body);
            free(views);
        }
    }
    if (call->http->metrics != NULL) {
        ah_metrics_render(call->http->metrics, &reply->body); /* agent.metrics */
    }
}
