/* The MongoDB control store (docs/OPERATIONS.md): the control document `global_control` and its
 * audit entries in <MONGODB_DATABASE>.agent_control, and the agents' status records in
 * <MONGODB_DATABASE>.agent_status, behind the store interface of ah_store.h. Two single-threaded
 * clients, one connection each (a single-threaded client monitors the server on its own socket,
 * so there is no extra monitoring connection): the API client serves read/command/history and
 * the status records from any thread, one call at a time under api_lock; the watcher thread owns
 * the other one. The watcher's change stream waits up to AH_MONGO_MAX_AWAIT_MS per getMore (the
 * server answers a change at once), on a socket timeout longer than that wait; close() does not
 * wait for it: it kills the stream's cursor (its id is learnt from the driver's command
 * monitoring), which ends the getMore at once. The watcher detects
 * the watch mode (a change stream, or polling when the server refuses streams: standalone error
 * 40573), logs the lines of the original distributed-control API, delivers the document at start
 * and after every change, and survives every fault by reconnecting with exponential backoff and
 * jitter: a change stream resumes from its last token, a lost history or an invalidated stream
 * leads to a re-read, and a stream silent for CHANGE_STREAM_VERIFY_INTERVAL seconds is verified by
 * a direct read. Short driver timeouts (set unless the URI has its own) make every failure show
 * within seconds. Part of the MongoDB plugin: the core reaches it through ah_store_mongo_open
 * (core/ah_mongo.h). */
#include "ahm.h"

#include "ah_log.h"

#include <mongoc/mongoc.h>

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define AH_MONGO_COLLECTION "agent_control"
#define AH_MONGO_DOC_ID "global_control"
#define AH_MONGO_AUDIT_KIND "audit"
/* The _id of a scope document: AH_STORE_SCOPE_PREFIX + its canonical selector, which never
 * holds ':' (so its audit entries, "<_id>:v<N>", do not match). */
#define AH_MONGO_SCOPE_ID_REGEX "^scope:[^:]*$"
#define AH_MONGO_STATUS_COLLECTION "agent_status"
#define AH_MONGO_STATUS_TTL_INDEX "last_seen_ttl"
#define AH_MONGO_LEASE_COLLECTION "agent_leases"

/* Driver timeouts applied when the URI does not set them (milliseconds). */
#define AH_MONGO_SERVER_SELECTION_MS 2000
#define AH_MONGO_CONNECT_MS 2000
#define AH_MONGO_SOCKET_MS 5000
/* How long one change stream getMore waits on the server when nothing changes: an idle agent's
 * getMore rate (4 a minute). A change is answered at once; close() kills the cursor. */
#define AH_MONGO_MAX_AWAIT_MS 15000
/* The watcher's socket timeout (unless the URI sets one): the await plus this margin. */
#define AH_MONGO_AWAIT_SOCKET_MARGIN_MS 10000
/* close(): how often it kills the stream's cursor again while the watcher has not exited. */
#define AH_MONGO_CLOSE_KILL_EVERY_S 0.2

/* First reconnect delay, seconds. */
#define AH_MONGO_RETRY_MIN 0.25
/* Reconnect delay cap, seconds. */
#define AH_MONGO_RETRY_MAX 5.0
/* Polling error backoff cap, seconds (unless the polling interval is longer). */
#define AH_MONGO_POLL_RETRY_MAX 30.0
/* Routine status reports: at most one per second. */
#define AH_MONGO_STATUS_GAP_US 1000000
#define AH_MONGO_AUDIT_ATTEMPTS 4

#define AH_MONGO_CODE_UNAUTHORIZED 13
#define AH_MONGO_CODE_COMMAND_NOT_SUPPORTED 115
#define AH_MONGO_CODE_BAD_RESUME_TOKEN 260
#define AH_MONGO_CODE_STREAM_FATAL 280
#define AH_MONGO_CODE_HISTORY_LOST 286
#define AH_MONGO_CODE_DUPLICATE_KEY 11000
#define AH_MONGO_CODE_NO_REPLICA_SET 40573

/* What a failed operation means for the watcher. */
typedef enum {
    AH_MONGO_FAULT_NETWORK = 0, /* unreachable, timed out, no suitable server: retry */
    AH_MONGO_FAULT_RESUMABLE,   /* any other server error: retry, resume from the token */
    AH_MONGO_FAULT_HISTORY,     /* the resume point is gone: re-read and reopen fresh */
    AH_MONGO_FAULT_UNSUPPORTED, /* the server refuses change streams: fall back to polling */
} ah_mongo_fault_t;

typedef enum {
    AH_MONGO_MODE_DETECT = 0,
    AH_MONGO_MODE_STREAMS,
    AH_MONGO_MODE_POLLING,
} ah_mongo_mode_t;

typedef struct ahm_store_s {
    ah_store_t base; /* first member (ah_store.h) */
    const ah_config_t *cfg;
    mongoc_uri_t *uri;
    mongoc_uri_t *watch_uri;       /* uri with the watcher's longer socket timeout */
    pthread_mutex_t api_lock;      /* one API call at a time on api_client */
    mongoc_client_t *api_client;   /* read/command/history/status records */
    _Atomic int64_t stream_cursor; /* the watcher's change stream cursor id, 0: none */
    double verify_interval;        /* seconds; 0 = never verify a silent stream */
    int max_await_ms;

    pthread_mutex_t diag_lock; /* guards server_note */
    /* What the last heartbeat showed that makes the server unusable (a server of another replica
     * set), "" when nothing: completes a server selection error (error_text()). */
    char server_note[512];

    pthread_mutex_t mutex; /* guards everything below */
    pthread_cond_t cond;   /* signalled by close() */
    bool closing;
    bool status_index_done;    /* the TTL index of agent_status was created (or refused) */
    ah_command_t last_command; /* last known command: fallback for foreign writes */

    pthread_t watcher;
    bool watcher_started;
    bool watcher_done; /* the watcher thread is about to return (guarded by mutex) */
    ah_store_listener_t listener;
} ahm_store_t;

/* The watcher thread's private state. */
typedef struct ah_mongo_watch_s {
    ahm_store_t *ms;
    mongoc_client_t *client;
    mongoc_collection_t *coll;
    ah_mongo_mode_t mode;
    ah_store_reporter_t reporter; /* the status and when it was last reported */
    bool delivered;
    int64_t delivered_version;
    ah_control_t *scopes; /* the scope set last delivered (AH_SCOPES_MAX entries) */
    int scope_count;      /* -1: none delivered yet */
    ah_store_warned_t warned;
    int failures; /* consecutive failures: drives the backoff */
    unsigned int seed;
} ah_mongo_watch_t;

static pthread_once_t mongoc_once = PTHREAD_ONCE_INIT;

/* The driver's own log lines go through ah_log: its errors as warnings, its warnings (e.g.
 * "Failed to buffer 4 bytes" on every dropped connection, already reported by the watcher) at
 * debug level, the rest dropped. */
static void mongo_log_handler(mongoc_log_level_t level, const char *domain, const char *message,
                              void *ud)
{
    (void)ud;
    switch (level) {
    case MONGOC_LOG_LEVEL_ERROR:
    case MONGOC_LOG_LEVEL_CRITICAL:
        ah_log_warn("[mongoc] %s: %s", domain, message);
        break;
    case MONGOC_LOG_LEVEL_WARNING:
    case MONGOC_LOG_LEVEL_MESSAGE:
        ah_log_debug("[mongoc] %s: %s", domain, message);
        break;
    default:
        break;
    }
}

/* mongoc_init() is process-global and mongoc_cleanup() cannot be undone, so the driver is set up
 * once and never torn down: its globals stay reachable until exit. The log handler is
 * process-global too. */
static void mongo_global_init(void)
{
    mongoc_init();
    mongoc_log_trace_disable();
    mongoc_log_set_handler(mongo_log_handler, NULL);
}

/* ---- small helpers ------------------------------------------------------------------------ */

static ahm_store_t *mongo_of(ah_store_t *st)
{
    return (ahm_store_t *)st;
}

static bool mongo_closing(ahm_store_t *ms)
{
    pthread_mutex_lock(&ms->mutex);
    bool closing = ms->closing;
    pthread_mutex_unlock(&ms->mutex);
    return closing;
}

/* Waits up to `seconds` or until close(). Returns true if the store is closing. */
static bool mongo_wait(ahm_store_t *ms, double seconds)
{
    return ah_cond_wait_flag(&ms->cond, &ms->mutex, &ms->closing, seconds);
}

/* Exponential backoff (ah_backoff), then scaled by a random 50-100% so a fleet that lost the
 * server together does not come back in lockstep. */
static double backoff_delay(int failures, double min, double max, unsigned int *seed)
{
    return ah_backoff(failures, min, max) * ah_jitter(seed, 0.5, 1.0);
}

static ah_mongo_fault_t classify_error(const bson_error_t *error)
{
    if (error->domain == MONGOC_ERROR_SERVER || error->domain == MONGOC_ERROR_QUERY ||
        error->domain == MONGOC_ERROR_WRITE_CONCERN) {
        switch (error->code) {
        case AH_MONGO_CODE_NO_REPLICA_SET:
            return AH_MONGO_FAULT_UNSUPPORTED;
        case AH_MONGO_CODE_HISTORY_LOST:
        case AH_MONGO_CODE_STREAM_FATAL:
        case AH_MONGO_CODE_BAD_RESUME_TOKEN:
            return AH_MONGO_FAULT_HISTORY;
        default:
            return AH_MONGO_FAULT_RESUMABLE;
        }
    }
    return AH_MONGO_FAULT_NETWORK;
}

/* True when the request may not have reached the server at all (nothing was written). */
static bool error_before_send(const bson_error_t *error)
{
    return error->domain == MONGOC_ERROR_SERVER_SELECTION ||
           (error->domain == MONGOC_ERROR_STREAM && error->code == MONGOC_ERROR_STREAM_CONNECT) ||
           (error->domain == MONGOC_ERROR_STREAM &&
            error->code == MONGOC_ERROR_STREAM_NAME_RESOLUTION);
}

/* The message of a failed operation, naming the real problem and never empty. A server
 * selection failure often says nothing ("", "No servers yet eligible for rescan", or "No suitable
 * servers found" with no server's error after it, when the first attempt of a client found no
 * server description yet): then what the
 * heartbeats saw (a server of another replica set) or a direct connection attempt to the URI's
 * hosts ("connection refused by ...") says it. Returns error->message or buf (size n). May
 * block up to a second per seed host (the probe): for threads that may wait. */
static const char *error_text(ahm_store_t *ms, const bson_error_t *error, char *buf, size_t n)
{
    bool says_nothing = error->message[0] == '\0' ||
                        strstr(error->message, "No servers yet eligible for rescan") != NULL ||
                        (strstr(error->message, "No suitable servers found") != NULL &&
                         strchr(error->message, '[') == NULL);
    if (!says_nothing) {
        return error->message;
    }
    char note[512];
    pthread_mutex_lock(&ms->diag_lock);
    ah_strlcpy(note, ms->server_note, sizeof(note));
    pthread_mutex_unlock(&ms->diag_lock);
    if (note[0] == '\0') {
        ahm_uri_probe(ms->uri, note, sizeof(note));
    }
    if (note[0] != '\0') {
        snprintf(buf, n, "%s", note);
    } else if (error->message[0] != '\0') {
        snprintf(buf, n, "%.300s (the URI's hosts accept connections; see the driver's log)",
                 error->message);
    } else {
        snprintf(buf, n,
                 "the driver reported no message (error domain %" PRIu32 ", code %" PRIu32 ")",
                 error->domain, error->code);
    }
    return buf;
}

/* Maps a failed read-only operation to a return code and message. */
static int read_failure(ahm_store_t *ms, const char *what, const bson_error_t *error, char *err,
                        size_t errlen)
{
    char text[AH_ERRLEN];
    const char *message = error_text(ms, error, text, sizeof(text));
    if (classify_error(error) == AH_MONGO_FAULT_NETWORK) {
        snprintf(err, errlen, "MongoDB unreachable (%s): %s", what, message);
        return AH_EUNAVAIL;
    }
    snprintf(err, errlen, "MongoDB %s failed: %s (code %" PRIu32 ")", what, message, error->code);
    return AH_EIO;
}

/* ---- documents ---------------------------------------------------------------------------- */

static void copy_utf8_field(const bson_t *doc, const char *key, char *out, size_t outlen)
{
    bson_iter_t it;
    out[0] = '\0';
    if (bson_iter_init_find(&it, doc, key) && BSON_ITER_HOLDS_UTF8(&it)) {
        ah_strlcpy(out, bson_iter_utf8(&it, NULL), outlen);
    }
}

/* Parses a control document or audit entry into *out. The version is read as any number type
 * (foreign writers may store int32 or double). A missing or unknown command keeps `fallback`
 * (with a warning). Returns 0, or AH_EIO when the document has no usable version. */
static int parse_control(const bson_t *doc, ah_command_t fallback, ah_control_t *out)
{
    bson_iter_t it;
    memset(out, 0, sizeof(*out));
    if (!bson_iter_init_find(&it, doc, "version") || !BSON_ITER_HOLDS_NUMBER(&it)) {
        return AH_EIO;
    }
    out->version = bson_iter_as_int64(&it);
    char name[32];
    copy_utf8_field(doc, "command", name, sizeof(name));
    if (ah_command_parse(name, &out->command) != AH_OK) {
        out->command = fallback;
        if (fallback != AH_CMD_NONE) {
            ah_log_warn("Control document version %" PRId64 " has %s command '%s': keeping '%s'",
                        out->version, name[0] ? "an unknown" : "no", name,
                        ah_command_name(fallback));
        }
    }
    if (bson_iter_init_find(&it, doc, "timestamp") && BSON_ITER_HOLDS_DATE_TIME(&it)) {
        out->timestamp_us = ah_int64_mul_sat(bson_iter_date_time(&it), 1000); /* any writer */
    }
    copy_utf8_field(doc, "reason", out->reason, sizeof(out->reason));
    copy_utf8_field(doc, "updated_by", out->updated_by, sizeof(out->updated_by));
    copy_utf8_field(doc, "agent_id", out->agent_id, sizeof(out->agent_id));
    if (bson_iter_init_find(&it, doc, "expires_at") && BSON_ITER_HOLDS_DATE_TIME(&it)) {
        out->expires_us = ah_int64_mul_sat(bson_iter_date_time(&it), 1000); /* any writer */
    }
    copy_utf8_field(doc, "selector", out->selector, sizeof(out->selector));
    if (bson_iter_init_find(&it, doc, "drain_ms") && BSON_ITER_HOLDS_NUMBER(&it)) {
        /* any writer: a negative or huge value is clamped to the range drain= accepts */
        int64_t drain_ms = bson_iter_as_int64(&it);
        out->drain_ms = drain_ms < 0                                ? 0
                        : drain_ms > (int64_t)AH_PAUSE_MAX_S * 1000 ? (int64_t)AH_PAUSE_MAX_S * 1000
                                                                    : drain_ms;
    }
    return AH_OK;
}

/* Parses a scope document (doc's _id is id) into *out: AH_OK, or AH_EINVAL with why set when
 * it is malformed (no numeric version, an unknown command, a selector that does not parse or
 * is not the one its _id names). */
static int parse_scope(const bson_t *doc, const char *id, ah_control_t *out, char *why,
                       size_t whylen)
{
    char selector[AH_SELECTOR_MAX * 2];
    if (parse_control(doc, AH_CMD_NONE, out) != AH_OK) {
        snprintf(why, whylen, "no numeric version");
        return AH_EINVAL;
    }
    copy_utf8_field(doc, "selector", selector, sizeof(selector));
    return ah_store_scope_check(id, selector, out, why, whylen);
}

/* Parses the control document and remembers its command as the fallback for the next one. */
static int parse_and_remember(ahm_store_t *ms, const bson_t *doc, ah_control_t *out)
{
    pthread_mutex_lock(&ms->mutex);
    ah_command_t fallback = ms->last_command;
    pthread_mutex_unlock(&ms->mutex);
    int rc = parse_control(doc, fallback, out);
    if (rc == AH_OK) {
        pthread_mutex_lock(&ms->mutex);
        ms->last_command = out->command;
        pthread_mutex_unlock(&ms->mutex);
    }
    return rc;
}

/* Parses the control document a findAndModify reply carries (its "value") into *out and
 * remembers its command. what names the operation in the error. 0, or AH_EIO with err set. */
static int parse_find_and_modify_reply(ahm_store_t *ms, const bson_t *reply, const char *what,
                                       ah_control_t *out, char *err, size_t errlen)
{
    bson_iter_t it;
    const uint8_t *data;
    uint32_t len;
    bson_t value;
    if (!bson_iter_init_find(&it, reply, "value") || !BSON_ITER_HOLDS_DOCUMENT(&it)) {
        snprintf(err, errlen, "MongoDB %s: no document returned", what);
        return AH_EIO;
    }
    bson_iter_document(&it, &len, &data);
    if (!bson_init_static(&value, data, len) || parse_and_remember(ms, &value, out) != AH_OK) {
        snprintf(err, errlen, "MongoDB control document has no numeric version");
        return AH_EIO;
    }
    return AH_OK;
}

static void append_now(bson_t *doc, const char *key, int64_t now_us)
{
    bson_append_date_time(doc, key, -1, now_us / 1000);
}

/* Creates the initial document if it does not exist (an upsert that only sets fields on insert,
 * so it never overwrites a concurrent writer) and returns it in *out. */
static int ensure_control(ahm_store_t *ms, mongoc_collection_t *coll, ah_control_t *out, char *err,
                          size_t errlen)
{
    int rc = AH_EIO;
    bson_t reply = BSON_INITIALIZER;
    bson_error_t error;
    bson_t *query = BCON_NEW("_id", BCON_UTF8(AH_MONGO_DOC_ID));
    bson_t *update = bson_new();
    bson_t set;
    BSON_APPEND_DOCUMENT_BEGIN(update, "$setOnInsert", &set);
    BSON_APPEND_UTF8(&set, "command", ah_command_name(AH_CMD_RUNNING));
    BSON_APPEND_INT64(&set, "version", 0);
    append_now(&set, "timestamp", ah_now_us());
    BSON_APPEND_UTF8(&set, "reason", "initial state");
    BSON_APPEND_UTF8(&set, "updated_by", "system");
    bson_append_document_end(update, &set);
    mongoc_find_and_modify_opts_t *opts = mongoc_find_and_modify_opts_new();
    mongoc_find_and_modify_opts_set_update(opts, update);
    mongoc_find_and_modify_opts_set_flags(opts, MONGOC_FIND_AND_MODIFY_UPSERT |
                                                    MONGOC_FIND_AND_MODIFY_RETURN_NEW);
    for (int attempt = 0; attempt < 2; attempt++) {
        bson_reinit(&reply);
        if (mongoc_collection_find_and_modify_with_opts(coll, query, opts, &reply, &error)) {
            break;
        }
        /* Two agents creating the document at once: one upsert loses with a duplicate key. */
        if (attempt == 0 && error.code == AH_MONGO_CODE_DUPLICATE_KEY) {
            continue;
        }
        rc = read_failure(ms, "create control document", &error, err, errlen);
        goto cleanup;
    }
    rc = parse_find_and_modify_reply(ms, &reply, "create control document", out, err, errlen);
cleanup:
    mongoc_find_and_modify_opts_destroy(opts);
    bson_destroy(update);
    bson_destroy(query);
    bson_destroy(&reply);
    return rc;
}

/* Reads the control document with one light query (a single-batch find with a projection),
 * creating it if it is missing. 0, AH_EUNAVAIL or AH_EIO with err set. */
static int read_control(ahm_store_t *ms, mongoc_collection_t *coll, ah_control_t *out, char *err,
                        size_t errlen)
{
    int rc = AH_EIO;
    bson_error_t error;
    const bson_t *doc;
    bson_t *filter = BCON_NEW("_id", BCON_UTF8(AH_MONGO_DOC_ID));
    bson_t *opts =
        BCON_NEW("projection", "{", "_id", BCON_INT32(0), "command", BCON_INT32(1), "version",
                 BCON_INT32(1), "timestamp", BCON_INT32(1), "reason", BCON_INT32(1), "updated_by",
                 BCON_INT32(1), "expires_at", BCON_INT32(1), "drain_ms", BCON_INT32(1), "}",
                 "limit", BCON_INT64(1), "singleBatch", BCON_BOOL(true));
    mongoc_cursor_t *cursor = mongoc_collection_find_with_opts(coll, filter, opts, NULL);
    if (mongoc_cursor_next(cursor, &doc)) {
        if (parse_and_remember(ms, doc, out) != AH_OK) {
            snprintf(err, errlen, "MongoDB control document has no numeric version");
            goto cleanup;
        }
        rc = AH_OK;
        goto cleanup;
    }
    if (mongoc_cursor_error(cursor, &error)) {
        rc = read_failure(ms, "read control document", &error, err, errlen);
        goto cleanup;
    }
    rc = ensure_control(ms, coll, out, err, errlen);
cleanup:
    mongoc_cursor_destroy(cursor);
    bson_destroy(opts);
    bson_destroy(filter);
    return rc;
}

/* Reads one scope document by _id into *out (version 0, command running when it does not exist;
 * a malformed one reads as that too). 0, AH_EUNAVAIL or AH_EIO with err set. */
static int read_scope(ahm_store_t *ms, mongoc_collection_t *coll, const char *id,
                      const char *selector, ah_control_t *out, char *err, size_t errlen)
{
    int rc = AH_OK;
    bson_error_t error;
    const bson_t *doc;
    char why[AH_ERRLEN];
    bson_t *filter = BCON_NEW("_id", BCON_UTF8(id));
    bson_t *opts = BCON_NEW("limit", BCON_INT64(1), "singleBatch", BCON_BOOL(true));
    mongoc_cursor_t *cursor = mongoc_collection_find_with_opts(coll, filter, opts, NULL);
    memset(out, 0, sizeof(*out));
    out->command = AH_CMD_RUNNING;
    if (mongoc_cursor_next(cursor, &doc)) {
        if (parse_scope(doc, id, out, why, sizeof(why)) != AH_OK) {
            memset(out, 0, sizeof(*out));
            out->command = AH_CMD_RUNNING;
        }
    } else if (mongoc_cursor_error(cursor, &error)) {
        rc = read_failure(ms, "read scope document", &error, err, errlen);
    }
    ah_strlcpy(out->selector, selector, sizeof(out->selector));
    mongoc_cursor_destroy(cursor);
    bson_destroy(opts);
    bson_destroy(filter);
    return rc;
}

/* The watcher's read: the control document and every scope document with one query (sorted by
 * _id, so global_control comes first and the scopes follow by selector). scopes has room for
 * AH_SCOPES_MAX; malformed scope documents are left out with one warning each. Creates the
 * control document if it is missing. 0, AH_EUNAVAIL or AH_EIO with err set. */
static int read_docs(ah_mongo_watch_t *w, ah_control_t *out, ah_control_t *scopes, int *scope_count,
                     char *err, size_t errlen)
{
    ahm_store_t *ms = w->ms;
    int rc = AH_EIO;
    bool have_control = false;
    bson_error_t error;
    const bson_t *doc;
    bson_t *filter = BCON_NEW("$or", "[", "{", "_id", BCON_UTF8(AH_MONGO_DOC_ID), "}", "{", "_id",
                              "{", "$regex", BCON_UTF8(AH_MONGO_SCOPE_ID_REGEX), "}", "}", "]");
    bson_t *opts = BCON_NEW("sort", "{", "_id", BCON_INT32(1), "}", "limit",
                            BCON_INT64(AH_SCOPES_MAX + 2), "singleBatch", BCON_BOOL(true));
    mongoc_cursor_t *cursor = mongoc_collection_find_with_opts(w->coll, filter, opts, NULL);
    *scope_count = 0;
    while (mongoc_cursor_next(cursor, &doc)) {
        bson_iter_t it;
        if (!bson_iter_init_find(&it, doc, "_id") || !BSON_ITER_HOLDS_UTF8(&it)) {
            continue;
        }
        const char *id = bson_iter_utf8(&it, NULL);
        if (strcmp(id, AH_MONGO_DOC_ID) == 0) {
            if (parse_and_remember(ms, doc, out) != AH_OK) {
                snprintf(err, errlen, "MongoDB control document has no numeric version");
                goto cleanup;
            }
            have_control = true;
            continue;
        }
        char why[AH_ERRLEN];
        ah_control_t *d = &scopes[*scope_count];
        if (*scope_count >= AH_SCOPES_MAX) {
            if (ah_store_warn_first(&w->warned, "too many scopes", 0)) {
                ah_log_warn("More than %d scope documents: '%s' and later ones are ignored",
                            AH_SCOPES_MAX, id);
            }
            break;
        }
        if (parse_scope(doc, id, d, why, sizeof(why)) != AH_OK) {
            if (ah_store_warn_first(&w->warned, id, d->version)) {
                ah_log_warn("Ignoring the malformed scope document '%s' (version %" PRId64 "): %s",
                            id, d->version, why);
            }
            continue;
        }
        d->agent_id[0] = '\0';
        (*scope_count)++;
    }
    if (mongoc_cursor_error(cursor, &error)) {
        rc = read_failure(ms, "read control document", &error, err, errlen);
        goto cleanup;
    }
    rc = have_control ? AH_OK : ensure_control(ms, w->coll, out, err, errlen);
cleanup:
    mongoc_cursor_destroy(cursor);
    bson_destroy(opts);
    bson_destroy(filter);
    return rc;
}

/* ---- the store operations (any thread) ---------------------------------------------------- */

/* Takes the API client (api_lock) and returns collection `name` of the control database on it;
 * *client is the API client. Release with push_collection(). */
static mongoc_collection_t *pop_named_collection(ahm_store_t *ms, const char *name,
                                                 mongoc_client_t **client)
{
    pthread_mutex_lock(&ms->api_lock);
    *client = ms->api_client;
    return mongoc_client_get_collection(*client, ms->cfg->mongodb_database, name);
}

static mongoc_collection_t *pop_collection(ahm_store_t *ms, mongoc_client_t **client)
{
    return pop_named_collection(ms, AH_MONGO_COLLECTION, client);
}

static void push_collection(ahm_store_t *ms, mongoc_client_t *client, mongoc_collection_t *coll)
{
    (void)client;
    mongoc_collection_destroy(coll);
    pthread_mutex_unlock(&ms->api_lock);
}

static int mongo_read(ah_store_t *st, ah_control_t *out, char *err, size_t errlen)
{
    ahm_store_t *ms = mongo_of(st);
    mongoc_client_t *client;
    mongoc_collection_t *coll = pop_collection(ms, &client);
    int rc = read_control(ms, coll, out, err, errlen);
    push_collection(ms, client, coll);
    return rc;
}

/* Inserts the audit entry of version doc->version. A duplicate key means it is already there
 * (a retried attempt that had succeeded). Retries a few times; 0 or AH_EIO. */
static int insert_audit(ahm_store_t *ms, mongoc_collection_t *coll, const ah_control_t *doc,
                        char *err, size_t errlen)
{
    char id[AH_SELECTOR_MAX + 64];
    if (doc->selector[0] != '\0') {
        snprintf(id, sizeof(id), AH_STORE_SCOPE_PREFIX "%s:v%" PRId64, doc->selector, doc->version);
    } else {
        snprintf(id, sizeof(id), AH_MONGO_DOC_ID ":v%" PRId64, doc->version);
    }
    bson_t *entry = bson_new();
    BSON_APPEND_UTF8(entry, "_id", id);
    BSON_APPEND_UTF8(entry, "kind", AH_MONGO_AUDIT_KIND);
    if (doc->selector[0] != '\0') {
        BSON_APPEND_UTF8(entry, "selector", doc->selector);
    }
    BSON_APPEND_UTF8(entry, "command", ah_command_name(doc->command));
    BSON_APPEND_INT64(entry, "version", doc->version);
    append_now(entry, "timestamp", doc->timestamp_us);
    BSON_APPEND_UTF8(entry, "reason", doc->reason);
    BSON_APPEND_UTF8(entry, "updated_by", doc->updated_by);
    BSON_APPEND_UTF8(entry, "agent_id", doc->agent_id);
    if (doc->drain_ms != 0) {
        BSON_APPEND_INT64(entry, "drain_ms", doc->drain_ms);
    }
    int rc = AH_EIO;
    unsigned int seed = (unsigned int)ah_mono_us();
    for (int attempt = 0; attempt < AH_MONGO_AUDIT_ATTEMPTS; attempt++) {
        bson_error_t error;
        if (mongoc_collection_insert_one(coll, entry, NULL, NULL, &error) ||
            error.code == AH_MONGO_CODE_DUPLICATE_KEY) {
            rc = AH_OK;
            break;
        }
        char text[AH_ERRLEN];
        snprintf(err, errlen, "%s", error_text(ms, &error, text, sizeof(text)));
        if (mongo_wait(ms, backoff_delay(attempt, 0.1, 1.0, &seed))) {
            break;
        }
    }
    bson_destroy(entry);
    return rc;
}

static int mongo_command(ah_store_t *st, const ah_command_req_t *req, ah_control_t *out, char *err,
                         size_t errlen)
{
    ahm_store_t *ms = mongo_of(st);
    int rc = AH_EIO;
    bson_error_t error;
    bson_t reply = BSON_INITIALIZER;
    int64_t now_us = ah_now_us();
    bool conditional = req->if_version >= 0;
    bool scope = req->selector[0] != '\0';
    char id[AH_SELECTOR_MAX + 16];
    snprintf(id, sizeof(id), "%s", scope ? AH_STORE_SCOPE_PREFIX : AH_MONGO_DOC_ID);
    if (scope) {
        ah_strlcpy(id + strlen(AH_STORE_SCOPE_PREFIX), req->selector,
                   sizeof(id) - strlen(AH_STORE_SCOPE_PREFIX));
    }
    mongoc_client_t *client;
    mongoc_collection_t *coll = pop_collection(ms, &client);
    bson_t *query = BCON_NEW("_id", BCON_UTF8(id));
    if (conditional) {
        BSON_APPEND_INT64(query, "version", req->if_version);
    }
    bson_t *update = bson_new();
    bson_t child;
    BSON_APPEND_DOCUMENT_BEGIN(update, "$inc", &child);
    BSON_APPEND_INT64(&child, "version", 1);
    bson_append_document_end(update, &child);
    BSON_APPEND_DOCUMENT_BEGIN(update, "$set", &child);
    BSON_APPEND_UTF8(&child, "command", ah_command_name(req->command));
    append_now(&child, "timestamp", now_us);
    BSON_APPEND_UTF8(&child, "reason", req->reason);
    BSON_APPEND_UTF8(&child, "updated_by", req->updated_by);
    if (scope) {
        BSON_APPEND_UTF8(&child, "selector", req->selector);
    }
    if (req->expires_us != 0) {
        append_now(&child, "expires_at", req->expires_us);
    }
    if (req->drain_ms != 0) {
        BSON_APPEND_INT64(&child, "drain_ms", req->drain_ms);
    }
    bson_append_document_end(update, &child);
    /* a plain command keeps none of the fields of an earlier timed pause or drain */
    if (req->expires_us == 0 || req->drain_ms == 0) {
        BSON_APPEND_DOCUMENT_BEGIN(update, "$unset", &child);
        if (req->expires_us == 0) {
            BSON_APPEND_UTF8(&child, "expires_at", "");
        }
        if (req->drain_ms == 0) {
            BSON_APPEND_UTF8(&child, "drain_ms", "");
        }
        bson_append_document_end(update, &child);
    }
    mongoc_find_and_modify_opts_t *opts = mongoc_find_and_modify_opts_new();
    mongoc_find_and_modify_opts_set_update(opts, update);
    /* A conditional write never inserts: a missing document is a conflict with version 0.
     * Except a scope's: a missing scope is version 0, so if_version=0 creates it (and meets a
     * duplicate key when another version exists: a conflict too). */
    bool upsert = !conditional || (scope && req->if_version == 0);
    mongoc_find_and_modify_opts_set_flags(opts, upsert ? MONGOC_FIND_AND_MODIFY_UPSERT |
                                                             MONGOC_FIND_AND_MODIFY_RETURN_NEW
                                                       : MONGOC_FIND_AND_MODIFY_RETURN_NEW);

    bool written = mongoc_collection_find_and_modify_with_opts(coll, query, opts, &reply, &error);
    bool conflict = false;
    bson_iter_t it;
    if (!written && conditional && scope && error.code == AH_MONGO_CODE_DUPLICATE_KEY) {
        conflict = true;
    } else if (written && conditional &&
               (!bson_iter_init_find(&it, &reply, "value") || BSON_ITER_HOLDS_NULL(&it))) {
        conflict = true;
    }
    if (conflict) {
        /* Nothing matched: another version is current. Report it. */
        rc = scope ? read_scope(ms, coll, id, req->selector, out, err, errlen)
                   : read_control(ms, coll, out, err, errlen);
        if (rc == AH_OK) {
            snprintf(err, errlen, "version conflict: expected %" PRId64 ", current is %" PRId64,
                     req->if_version, out->version);
            rc = AH_ECONFLICT;
        }
        goto cleanup;
    }
    if (!written) {
        char text[AH_ERRLEN];
        const char *message = error_text(ms, &error, text, sizeof(text));
        if (error_before_send(&error)) {
            snprintf(err, errlen, "MongoDB unreachable, command not written: %s", message);
            rc = AH_EUNAVAIL;
        } else if (classify_error(&error) == AH_MONGO_FAULT_NETWORK) {
            snprintf(err, errlen,
                     "MongoDB connection failed during the write (it may or may not have been "
                     "applied; see /api/cluster/history): %s",
                     message);
            rc = AH_EIO;
        } else {
            snprintf(err, errlen, "MongoDB rejected the command: %s (code %" PRIu32 ")", message,
                     error.code);
            rc = AH_EIO;
        }
        goto cleanup;
    }
    if (scope) {
        const uint8_t *data;
        uint32_t len;
        bson_t value;
        if (!bson_iter_init_find(&it, &reply, "value") || !BSON_ITER_HOLDS_DOCUMENT(&it)) {
            snprintf(err, errlen, "MongoDB command: no document returned");
            rc = AH_EIO;
            goto cleanup;
        }
        bson_iter_document(&it, &len, &data);
        if (!bson_init_static(&value, data, len) ||
            parse_control(&value, AH_CMD_NONE, out) != AH_OK) {
            snprintf(err, errlen, "MongoDB scope document has no numeric version");
            rc = AH_EIO;
            goto cleanup;
        }
    } else {
        rc = parse_find_and_modify_reply(ms, &reply, "command", out, err, errlen);
        if (rc != AH_OK) {
            goto cleanup;
        }
    }
    ah_strlcpy(out->selector, req->selector, sizeof(out->selector));
    /* The returned document is the authority for version and timestamp; the rest is ours. */
    out->command = req->command;
    ah_strlcpy(out->reason, req->reason, sizeof(out->reason));
    ah_strlcpy(out->updated_by, req->updated_by, sizeof(out->updated_by));
    ah_strlcpy(out->agent_id, req->agent_id, sizeof(out->agent_id));
    out->expires_us = req->expires_us;
    out->drain_ms = req->drain_ms;
    char audit_err[AH_ERRLEN];
    if (insert_audit(ms, coll, out, audit_err, sizeof(audit_err)) != AH_OK) {
        /* The command itself is applied and will reach every agent; only its audit entry is
         * missing. Not an error for the caller. */
        ah_log_error("Command '%s' version %" PRId64 " is applied but its audit entry could not "
                     "be written after %d attempts: %s",
                     ah_command_name(req->command), out->version, AH_MONGO_AUDIT_ATTEMPTS,
                     audit_err);
    }
    rc = AH_OK;
cleanup:
    mongoc_find_and_modify_opts_destroy(opts);
    bson_destroy(update);
    bson_destroy(query);
    bson_destroy(&reply);
    push_collection(ms, client, coll);
    return rc;
}

static int mongo_history(ah_store_t *st, int limit, ah_control_t *out, int *count, char *err,
                         size_t errlen)
{
    ahm_store_t *ms = mongo_of(st);
    int rc = AH_OK;
    bson_error_t error;
    const bson_t *doc;
    mongoc_client_t *client;
    mongoc_collection_t *coll = pop_collection(ms, &client);
    ah_control_t *scopes = NULL;
    int nscopes = 0;
    /* the cluster's entries by version, then the scopes' by time, merged by time */
    bson_t *filter = BCON_NEW("kind", BCON_UTF8(AH_MONGO_AUDIT_KIND), "selector", "{", "$exists",
                              BCON_BOOL(false), "}");
    bson_t *opts =
        BCON_NEW("sort", "{", "version", BCON_INT32(-1), "}", "limit", BCON_INT64(limit));
    mongoc_cursor_t *cursor = mongoc_collection_find_with_opts(coll, filter, opts, NULL);
    *count = 0;
    while (*count < limit && mongoc_cursor_next(cursor, &doc)) {
        if (parse_control(doc, AH_CMD_NONE, &out[*count]) == AH_OK) {
            (*count)++;
        }
    }
    if (mongoc_cursor_error(cursor, &error)) {
        *count = 0;
        rc = read_failure(ms, "read history", &error, err, errlen);
        goto cleanup;
    }
    mongoc_cursor_destroy(cursor);
    bson_destroy(opts);
    bson_destroy(filter);
    filter = BCON_NEW("kind", BCON_UTF8(AH_MONGO_AUDIT_KIND), "selector", "{", "$exists",
                      BCON_BOOL(true), "}");
    opts = BCON_NEW("sort", "{", "timestamp", BCON_INT32(-1), "_id", BCON_INT32(-1), "}", "limit",
                    BCON_INT64(limit));
    cursor = mongoc_collection_find_with_opts(coll, filter, opts, NULL);
    scopes = calloc((size_t)limit, sizeof(*scopes));
    while (scopes != NULL && nscopes < limit && mongoc_cursor_next(cursor, &doc)) {
        if (parse_control(doc, AH_CMD_NONE, &scopes[nscopes]) == AH_OK) {
            nscopes++;
        }
    }
    if (scopes == NULL || mongoc_cursor_error(cursor, &error) ||
        ah_store_history_merge(out, count, scopes, nscopes, limit) != AH_OK) {
        *count = 0;
        if (scopes == NULL) {
            snprintf(err, errlen, "out of memory reading history");
            rc = AH_ENOMEM;
        } else {
            rc = read_failure(ms, "read history", &error, err, errlen);
        }
    }
cleanup:
    free(scopes);
    mongoc_cursor_destroy(cursor);
    bson_destroy(opts);
    bson_destroy(filter);
    push_collection(ms, client, coll);
    return rc;
}

/* ---- agent status records (any thread; the fleet writer and the HTTP API) ----------------- */

/* Creates the TTL index on agent_status.last_seen once per process (the first status write).
 * A server or role that refuses it is logged once: records then stay until deleted by hand. */
static void ensure_status_index(ahm_store_t *ms, mongoc_client_t *client, double ttl)
{
    pthread_mutex_lock(&ms->mutex);
    bool done = ms->status_index_done;
    ms->status_index_done = true;
    pthread_mutex_unlock(&ms->mutex);
    if (done) {
        return;
    }
    bson_error_t error;
    mongoc_database_t *db = mongoc_client_get_database(client, ms->cfg->mongodb_database);
    bson_t *cmd =
        BCON_NEW("createIndexes", BCON_UTF8(AH_MONGO_STATUS_COLLECTION), "indexes", "[", "{", "key",
                 "{", "last_seen", BCON_INT32(1), "}", "name", BCON_UTF8(AH_MONGO_STATUS_TTL_INDEX),
                 "expireAfterSeconds", BCON_INT64((int64_t)ceil(ttl)), "}", "]");
    bson_t reply;
    if (!mongoc_database_write_command_with_opts(db, cmd, NULL, &reply, &error)) {
        if (classify_error(&error) == AH_MONGO_FAULT_NETWORK) {
            pthread_mutex_lock(&ms->mutex);
            ms->status_index_done = false; /* try again with the next write */
            pthread_mutex_unlock(&ms->mutex);
        } else {
            ah_log_warn("Cannot create the TTL index of %s.%s (records of vanished agents stay "
                        "until deleted): %s (code %" PRIu32 ")",
                        ms->cfg->mongodb_database, AH_MONGO_STATUS_COLLECTION, error.message,
                        error.code);
        }
    }
    bson_destroy(&reply);
    bson_destroy(cmd);
    mongoc_database_destroy(db);
}

static int mongo_put_status(ah_store_t *st, const ah_agent_status_t *rec, double ttl, char *err,
                            size_t errlen)
{
    ahm_store_t *ms = mongo_of(st);
    int rc = AH_OK;
    bson_error_t error;
    mongoc_client_t *client;
    mongoc_collection_t *coll = pop_named_collection(ms, AH_MONGO_STATUS_COLLECTION, &client);
    if (ttl > 0) {
        ensure_status_index(ms, client, ttl);
    }
    bson_t *query = BCON_NEW("_id", BCON_UTF8(rec->agent_id));
    bson_t *update = bson_new();
    bson_t set;
    BSON_APPEND_DOCUMENT_BEGIN(update, "$set", &set);
    BSON_APPEND_UTF8(&set, "state", rec->state);
    BSON_APPEND_INT64(&set, "applied_version", rec->applied_version);
    BSON_APPEND_UTF8(&set, "watch_mode", rec->watch_mode);
    append_now(&set, "last_seen", rec->last_seen_us);
    append_now(&set, "started_at", rec->started_us);
    BSON_APPEND_UTF8(&set, "host", rec->host);
    BSON_APPEND_INT64(&set, "pid", rec->pid);
    BSON_APPEND_UTF8(&set, "agenthost_version", rec->agenthost_version);
    BSON_APPEND_INT64(&set, "batches", rec->batches);
    BSON_APPEND_INT64(&set, "errors", rec->errors);
    BSON_APPEND_UTF8(&set, "labels", rec->labels);
    BSON_APPEND_UTF8(&set, "scope_acks", rec->scope_acks);
    bson_t leases;
    BSON_APPEND_ARRAY_BEGIN(&set, "leases", &leases);
    int index = 0;
    for (const char *p = rec->leases; *p != '\0';) {
        size_t n = strcspn(p, ",");
        char key[16];
        snprintf(key, sizeof(key), "%d", index++);
        bson_append_utf8(&leases, key, -1, p, (int)n);
        p += n + (p[n] == ',');
    }
    bson_append_array_end(&set, &leases);
    bson_append_document_end(update, &set);
    bson_t *opts = BCON_NEW("upsert", BCON_BOOL(true));
    if (!mongoc_collection_update_one(coll, query, update, opts, NULL, &error)) {
        rc = read_failure(ms, "write agent status", &error, err, errlen);
    }
    bson_destroy(opts);
    bson_destroy(update);
    bson_destroy(query);
    push_collection(ms, client, coll);
    return rc;
}

/* A number field as int64 (any numeric type), else 0. */
static int64_t int64_field(const bson_t *doc, const char *key)
{
    bson_iter_t it;
    if (bson_iter_init_find(&it, doc, key) && BSON_ITER_HOLDS_NUMBER(&it)) {
        return bson_iter_as_int64(&it);
    }
    return 0;
}

/* A Date field in µs since the epoch, else 0. */
static int64_t date_field_us(const bson_t *doc, const char *key)
{
    bson_iter_t it;
    if (bson_iter_init_find(&it, doc, key) && BSON_ITER_HOLDS_DATE_TIME(&it)) {
        return ah_int64_mul_sat(bson_iter_date_time(&it), 1000);
    }
    return 0;
}

static int mongo_list_status(ah_store_t *st, ah_agent_status_t **out, int *count, char *err,
                             size_t errlen)
{
    ahm_store_t *ms = mongo_of(st);
    int rc = AH_OK;
    bson_error_t error;
    const bson_t *doc;
    ah_agent_status_t *recs = NULL;
    int cap = 0, n = 0;
    mongoc_client_t *client;
    mongoc_collection_t *coll = pop_named_collection(ms, AH_MONGO_STATUS_COLLECTION, &client);
    bson_t *filter = bson_new();
    bson_t *opts = BCON_NEW("sort", "{", "_id", BCON_INT32(1), "}", "limit",
                            BCON_INT64(AH_AGENTS_MAX), "batchSize", BCON_INT64(AH_AGENTS_MAX));
    mongoc_cursor_t *cursor = mongoc_collection_find_with_opts(coll, filter, opts, NULL);
    while (mongoc_cursor_next(cursor, &doc)) {
        bson_iter_t it;
        if (!bson_iter_init_find(&it, doc, "_id") || !BSON_ITER_HOLDS_UTF8(&it)) {
            continue; /* not a record of ours */
        }
        ah_agent_status_t *r = ah_store_status_append(&recs, &n, &cap);
        if (r == NULL) {
            snprintf(err, errlen, "out of memory reading agent status");
            rc = AH_ENOMEM;
            goto cleanup;
        }
        ah_strlcpy(r->agent_id, bson_iter_utf8(&it, NULL), sizeof(r->agent_id));
        copy_utf8_field(doc, "state", r->state, sizeof(r->state));
        r->applied_version = int64_field(doc, "applied_version");
        copy_utf8_field(doc, "watch_mode", r->watch_mode, sizeof(r->watch_mode));
        r->last_seen_us = date_field_us(doc, "last_seen");
        r->started_us = date_field_us(doc, "started_at");
        copy_utf8_field(doc, "host", r->host, sizeof(r->host));
        r->pid = int64_field(doc, "pid");
        copy_utf8_field(doc, "agenthost_version", r->agenthost_version,
                        sizeof(r->agenthost_version));
        r->batches = int64_field(doc, "batches");
        r->errors = int64_field(doc, "errors");
        copy_utf8_field(doc, "labels", r->labels, sizeof(r->labels));
        copy_utf8_field(doc, "scope_acks", r->scope_acks, sizeof(r->scope_acks));
        bson_iter_t leases, child;
        size_t used = 0;
        if (bson_iter_init_find(&leases, doc, "leases") && BSON_ITER_HOLDS_ARRAY(&leases) &&
            bson_iter_recurse(&leases, &child)) {
            while (bson_iter_next(&child)) {
                uint32_t n;
                const char *name = BSON_ITER_HOLDS_UTF8(&child) ? bson_iter_utf8(&child, &n) : NULL;
                if (name == NULL || used + n + (used > 0) >= sizeof(r->leases)) {
                    continue;
                }
                if (used > 0) {
                    r->leases[used++] = ',';
                }
                memcpy(r->leases + used, name, n);
                used += n;
                r->leases[used] = '\0';
            }
        }
    }
    if (mongoc_cursor_error(cursor, &error)) {
        rc = read_failure(ms, "read agent status", &error, err, errlen);
        goto cleanup;
    }
    *out = recs;
    *count = n;
    recs = NULL;
cleanup:
    free(recs);
    mongoc_cursor_destroy(cursor);
    bson_destroy(opts);
    bson_destroy(filter);
    push_collection(ms, client, coll);
    return rc;
}

/* ---- leases ------------------------------------------------------------------------------- */

/* Appends {$and: [{$eq: ["$owner", owner]}, {$eq: ["$token", token]}]}: the lease is ours. */
static void append_lease_mine(bson_t *parent, const char *key, const char *owner, int64_t token)
{
    bson_t *mine = BCON_NEW("$and", "[", "{", "$eq", "[", BCON_UTF8("$owner"), "{", "$literal",
                            BCON_UTF8(owner), "}", "]", "}", "{", "$eq", "[", BCON_UTF8("$token"),
                            "{", "$literal", BCON_INT64(token), "}", "]", "}", "]");
    BSON_APPEND_DOCUMENT(parent, key, mine);
    bson_destroy(mine);
}

/* Appends the condition under which an acquire takes the lease: free by the server's clock
 * (no expiry yet, or expiry <= $$NOW) or ours. */
static void append_lease_take(bson_t *parent, const char *key, const char *owner, int64_t token)
{
    bson_t take, or, free_cond, lte, if_null;
    BSON_APPEND_DOCUMENT_BEGIN(parent, key, &take);
    BSON_APPEND_ARRAY_BEGIN(&take, "$or", & or);
    BSON_APPEND_DOCUMENT_BEGIN(& or, "0", &free_cond);
    BSON_APPEND_ARRAY_BEGIN(&free_cond, "$lte", &lte);
    BSON_APPEND_DOCUMENT_BEGIN(&lte, "0", &if_null);
    bson_t args;
    BSON_APPEND_ARRAY_BEGIN(&if_null, "$ifNull", &args);
    BSON_APPEND_UTF8(&args, "0", "$expires");
    BSON_APPEND_DATE_TIME(&args, "1", 0);
    bson_append_array_end(&if_null, &args);
    bson_append_document_end(&lte, &if_null);
    BSON_APPEND_UTF8(&lte, "1", "$$NOW");
    bson_append_array_end(&free_cond, &lte);
    bson_append_document_end(& or, &free_cond);
    append_lease_mine(& or, "1", owner, token);
    bson_append_array_end(&take, & or);
    bson_append_document_end(parent, &take);
}

/* Appends {$add: ["$$NOW", ttl_ms]}: the server's clock plus the ttl. */
static void append_expires(bson_t *parent, const char *key, int64_t ttl_ms)
{
    bson_t *expires =
        BCON_NEW("$add", "[", BCON_UTF8("$$NOW"), "{", "$literal", BCON_INT64(ttl_ms), "}", "]");
    BSON_APPEND_DOCUMENT(parent, key, expires);
    bson_destroy(expires);
}

/* The findAndModify command of one lease operation: an update pipeline, so that the expiry is
 * judged and set by $$NOW, the server's clock. */
static bson_t *lease_command(ah_lease_op_t op, const char *name, const char *owner, int64_t token,
                             int64_t ttl_ms)
{
    bson_t *cmd = BCON_NEW("findAndModify", BCON_UTF8(AH_MONGO_LEASE_COLLECTION));
    bson_t query, update, stage, set;
    BSON_APPEND_DOCUMENT_BEGIN(cmd, "query", &query);
    BSON_APPEND_UTF8(&query, "_id", name);
    if (op != AH_LEASE_ACQUIRE) {
        BSON_APPEND_UTF8(&query, "owner", owner);
        BSON_APPEND_INT64(&query, "token", token);
    }
    bson_append_document_end(cmd, &query);
    BSON_APPEND_ARRAY_BEGIN(cmd, "update", &update);
    BSON_APPEND_DOCUMENT_BEGIN(&update, "0", &stage);
    BSON_APPEND_DOCUMENT_BEGIN(&stage, "$set", &set);
    if (op == AH_LEASE_ACQUIRE) {
        bson_t cond, arr, inner, inner_arr, add, add_arr, if_null, if_null_arr;
        append_lease_take(&set, "took", owner, token);
        /* token: taken → (ours ? token : token + 1); else unchanged */
        BSON_APPEND_DOCUMENT_BEGIN(&set, "token", &cond);
        BSON_APPEND_ARRAY_BEGIN(&cond, "$cond", &arr);
        append_lease_take(&arr, "0", owner, token);
        BSON_APPEND_DOCUMENT_BEGIN(&arr, "1", &inner);
        BSON_APPEND_ARRAY_BEGIN(&inner, "$cond", &inner_arr);
        append_lease_mine(&inner_arr, "0", owner, token);
        BSON_APPEND_UTF8(&inner_arr, "1", "$token");
        BSON_APPEND_DOCUMENT_BEGIN(&inner_arr, "2", &add);
        BSON_APPEND_ARRAY_BEGIN(&add, "$add", &add_arr);
        BSON_APPEND_DOCUMENT_BEGIN(&add_arr, "0", &if_null);
        BSON_APPEND_ARRAY_BEGIN(&if_null, "$ifNull", &if_null_arr);
        BSON_APPEND_UTF8(&if_null_arr, "0", "$token");
        BSON_APPEND_INT64(&if_null_arr, "1", 0);
        bson_append_array_end(&if_null, &if_null_arr);
        bson_append_document_end(&add_arr, &if_null);
        BSON_APPEND_INT64(&add_arr, "1", 1);
        bson_append_array_end(&add, &add_arr);
        bson_append_document_end(&inner_arr, &add);
        bson_append_array_end(&inner, &inner_arr);
        bson_append_document_end(&arr, &inner);
        BSON_APPEND_UTF8(&arr, "2", "$token");
        bson_append_array_end(&cond, &arr);
        bson_append_document_end(&set, &cond);
        /* owner and expires: taken → ours, now + ttl; else unchanged */
        BSON_APPEND_DOCUMENT_BEGIN(&set, "owner", &cond);
        BSON_APPEND_ARRAY_BEGIN(&cond, "$cond", &arr);
        append_lease_take(&arr, "0", owner, token);
        bson_t lit;
        BSON_APPEND_DOCUMENT_BEGIN(&arr, "1", &lit);
        BSON_APPEND_UTF8(&lit, "$literal", owner);
        bson_append_document_end(&arr, &lit);
        BSON_APPEND_UTF8(&arr, "2", "$owner");
        bson_append_array_end(&cond, &arr);
        bson_append_document_end(&set, &cond);
        BSON_APPEND_DOCUMENT_BEGIN(&set, "expires", &cond);
        BSON_APPEND_ARRAY_BEGIN(&cond, "$cond", &arr);
        append_lease_take(&arr, "0", owner, token);
        append_expires(&arr, "1", ttl_ms);
        BSON_APPEND_UTF8(&arr, "2", "$expires");
        bson_append_array_end(&cond, &arr);
        bson_append_document_end(&set, &cond);
    } else if (op == AH_LEASE_RENEW) {
        BSON_APPEND_BOOL(&set, "took", true);
        append_expires(&set, "expires", ttl_ms);
    } else {
        bson_t lit;
        BSON_APPEND_BOOL(&set, "took", true);
        BSON_APPEND_DOCUMENT_BEGIN(&set, "owner", &lit);
        BSON_APPEND_UTF8(&lit, "$literal", "");
        bson_append_document_end(&set, &lit);
        BSON_APPEND_UTF8(&set, "expires", "$$NOW");
    }
    BSON_APPEND_UTF8(&set, "now", "$$NOW");
    bson_append_document_end(&stage, &set);
    bson_append_document_end(&update, &stage);
    bson_append_array_end(cmd, &update);
    BSON_APPEND_BOOL(cmd, "new", true);
    BSON_APPEND_BOOL(cmd, "upsert", op == AH_LEASE_ACQUIRE);
    return cmd;
}

/* A Date field in ms since the epoch, else 0. */
static int64_t date_field_ms(const bson_t *doc, const char *key)
{
    bson_iter_t it;
    if (bson_iter_init_find(&it, doc, key) && BSON_ITER_HOLDS_DATE_TIME(&it)) {
        return bson_iter_date_time(&it);
    }
    return 0;
}

/* Fills owner, token and expires_in_ms from a lease document carrying "now". */
static void lease_from_doc(const bson_t *doc, ah_lease_t *out)
{
    copy_utf8_field(doc, "owner", out->owner, sizeof(out->owner));
    out->token = int64_field(doc, "token");
    out->expires_in_ms = date_field_ms(doc, "expires") - date_field_ms(doc, "now");
}

static int mongo_lease(ah_store_t *st, ah_lease_op_t op, const char *name, const char *owner,
                       int64_t token, int64_t ttl_ms, ah_lease_t *out, char *err, size_t errlen)
{
    ahm_store_t *ms = mongo_of(st);
    int rc = AH_OK;
    bson_error_t error;
    bson_t reply = BSON_INITIALIZER;
    bson_iter_t it;
    mongoc_client_t *client;
    mongoc_collection_t *coll = pop_named_collection(ms, AH_MONGO_LEASE_COLLECTION, &client);
    bson_t *cmd = lease_command(op, name, owner, token, ttl_ms);
    bson_destroy(&reply);
    if (!mongoc_collection_write_command_with_opts(coll, cmd, NULL, &reply, &error)) {
        rc = read_failure(ms, "lease write", &error, err, errlen);
        goto cleanup;
    }
    ah_strlcpy(out->name, name, sizeof(out->name));
    bool took = false;
    if (bson_iter_init_find(&it, &reply, "value") && BSON_ITER_HOLDS_DOCUMENT(&it)) {
        const uint8_t *data;
        uint32_t len;
        bson_t value;
        bson_iter_document(&it, &len, &data);
        if (bson_init_static(&value, data, len)) {
            bson_iter_t took_it;
            took = bson_iter_init_find(&took_it, &value, "took") && bson_iter_as_bool(&took_it);
            if (took || op == AH_LEASE_ACQUIRE) {
                lease_from_doc(&value, out);
            }
        }
    }
    if (!took) {
        snprintf(err, errlen, "lease '%s' is not ours", name);
        rc = AH_ECONFLICT;
    }
cleanup:
    bson_destroy(&reply);
    bson_destroy(cmd);
    push_collection(ms, client, coll);
    return rc;
}

static int mongo_list_leases(ah_store_t *st, ah_lease_t **out, int *count, char *err, size_t errlen)
{
    ahm_store_t *ms = mongo_of(st);
    int rc = AH_OK;
    bson_error_t error;
    const bson_t *doc;
    ah_lease_t *recs = NULL;
    int cap = 0, n = 0;
    mongoc_client_t *client;
    mongoc_collection_t *coll = pop_named_collection(ms, AH_MONGO_LEASE_COLLECTION, &client);
    bson_t *pipeline = BCON_NEW("pipeline", "[", "{", "$sort", "{", "_id", BCON_INT32(1), "}", "}",
                                "{", "$limit", BCON_INT64(AH_LEASES_MAX), "}", "{", "$addFields",
                                "{", "now", BCON_UTF8("$$NOW"), "}", "}", "]");
    mongoc_cursor_t *cursor =
        mongoc_collection_aggregate(coll, MONGOC_QUERY_NONE, pipeline, NULL, NULL);
    while (mongoc_cursor_next(cursor, &doc)) {
        bson_iter_t it;
        if (!bson_iter_init_find(&it, doc, "_id") || !BSON_ITER_HOLDS_UTF8(&it)) {
            continue;
        }
        ah_lease_t *r = ah_store_lease_append(&recs, &n, &cap);
        if (r == NULL) {
            snprintf(err, errlen, "out of memory reading leases");
            rc = AH_ENOMEM;
            goto cleanup;
        }
        ah_strlcpy(r->name, bson_iter_utf8(&it, NULL), sizeof(r->name));
        lease_from_doc(doc, r);
    }
    if (mongoc_cursor_error(cursor, &error)) {
        rc = read_failure(ms, "read leases", &error, err, errlen);
        goto cleanup;
    }
    *out = recs;
    *count = n;
    recs = NULL;
cleanup:
    free(recs);
    mongoc_cursor_destroy(cursor);
    bson_destroy(pipeline);
    push_collection(ms, client, coll);
    return rc;
}

/* ---- the watcher thread ------------------------------------------------------------------- */

/* Fills status.topology from the driver's view of the servers (no extra round trip). */
static void update_topology(ah_mongo_watch_t *w)
{
    size_t n = 0;
    mongoc_server_description_t **sds = mongoc_client_get_server_descriptions(w->client, &n);
    const char *topology = "unknown";
    for (size_t i = 0; i < n; i++) {
        const char *type = mongoc_server_description_type(sds[i]);
        if (strncmp(type, "RS", 2) == 0) {
            topology = "replica_set";
            break;
        }
        if (strcmp(type, "Standalone") == 0) {
            topology = "standalone";
        } else if (strcmp(type, "Mongos") == 0) {
            topology = "sharded";
        }
    }
    mongoc_server_descriptions_destroy_all(sds, n);
    if (strcmp(topology, "unknown") != 0) {
        ah_strlcpy(w->reporter.status.topology, topology, sizeof(w->reporter.status.topology));
    }
}

/* Records a successful round trip. */
static void note_success(ah_mongo_watch_t *w, double latency_ms)
{
    bool connected_now = ah_store_note_connected(&w->reporter, latency_ms);
    if (connected_now) {
        if (w->reporter.status.reconnects > 0) {
            ah_log_info("[Distributed Control] MongoDB connection restored");
        }
        update_topology(w);
    }
    w->failures = 0;
    ah_store_report(&w->reporter, connected_now);
}

/* Records a failure; logs the first one of a streak. */
static void note_failure(ah_mongo_watch_t *w, const char *what, const char *message)
{
    char text[AH_ERRLEN];
    /* A long driver message is cut at AH_ERRLEN - 1 bytes, as last_error would cut it. */
    if (snprintf(text, sizeof(text), "%s: %s", what, message) < 0) {
        ah_strlcpy(text, what, sizeof(text));
    }
    if (w->failures == 0) {
        ah_log_warn("[Distributed Control] %s (retrying with backoff; the agent keeps its "
                    "current state)",
                    text);
    } else {
        ah_log_debug("[Distributed Control] %s (attempt %d)", text, w->failures + 1);
    }
    w->failures++;
    ah_store_note_failure(&w->reporter, text);
}

static bool wait_backoff(ah_mongo_watch_t *w, double min, double max)
{
    return mongo_wait(w->ms, backoff_delay(w->failures - 1, min, max, &w->seed));
}

static void deliver(ah_mongo_watch_t *w, const ah_control_t *doc)
{
    if (w->delivered && doc->version == w->delivered_version) {
        return;
    }
    w->delivered = true;
    w->delivered_version = doc->version;
    const ah_store_listener_t *l = &w->ms->listener;
    if (l->on_control != NULL) {
        l->on_control(l->ud, doc);
    }
}

/* Delivers the scope set scopes[count] if it differs from the last one delivered (taking the
 * array; it frees the one it replaces or the one it does not need). */
static void deliver_scopes(ah_mongo_watch_t *w, ah_control_t *scopes, int count)
{
    if (count == w->scope_count &&
        (count == 0 || memcmp(scopes, w->scopes, (size_t)count * sizeof(*scopes)) == 0)) {
        free(scopes);
        return;
    }
    free(w->scopes);
    w->scopes = scopes;
    w->scope_count = count;
    const ah_store_listener_t *l = &w->ms->listener;
    if (l->on_scopes != NULL) {
        l->on_scopes(l->ud, scopes, count);
    }
}

/* One direct read of the control document and the scope documents, each delivered if it
 * changed (the scopes first, so that the startup sync applies them with the document). Returns
 * 0 or a negative AH_E*. */
static int watch_read(ah_mongo_watch_t *w, const char *what)
{
    char err[AH_ERRLEN];
    ah_control_t doc;
    int scope_count = 0;
    int64_t started = ah_mono_us();
    ah_control_t *scopes = calloc(AH_SCOPES_MAX, sizeof(*scopes));
    if (scopes == NULL) {
        note_failure(w, what, "out of memory");
        return AH_ENOMEM;
    }
    int rc = read_docs(w, &doc, scopes, &scope_count, err, sizeof(err));
    if (rc != AH_OK) {
        free(scopes);
        note_failure(w, what, err);
        return rc;
    }
    note_success(w, (double)(ah_mono_us() - started) / 1000.0);
    deliver_scopes(w, scopes, scope_count);
    deliver(w, &doc);
    return AH_OK;
}

static void set_watch_mode(ah_mongo_watch_t *w, ah_mongo_mode_t mode)
{
    w->mode = mode;
    ah_strlcpy(w->reporter.status.watch_mode,
               mode == AH_MONGO_MODE_POLLING ? "polling" : "change_streams",
               sizeof(w->reporter.status.watch_mode));
    ah_store_report(&w->reporter, true);
}

static void use_polling(ah_mongo_watch_t *w, const char *why)
{
    ah_log_warn("MongoDB Change Streams not available: %s. Using polling fallback.", why);
    ah_log_info("Using polling fallback (interval: %gs)", w->ms->cfg->polling_interval);
    set_watch_mode(w, AH_MONGO_MODE_POLLING);
}

static mongoc_change_stream_t *open_stream(ah_mongo_watch_t *w, const bson_t *resume_token)
{
    bson_t *pipeline =
        BCON_NEW("pipeline", "[", "{", "$match", "{", "$or", "[", "{", "documentKey._id",
                 BCON_UTF8(AH_MONGO_DOC_ID), "}", "{", "documentKey._id", "{", "$regex",
                 BCON_UTF8(AH_MONGO_SCOPE_ID_REGEX), "}", "}", "]", "}", "}", "]");
    bson_t *opts = BCON_NEW("fullDocument", BCON_UTF8("updateLookup"), "maxAwaitTimeMS",
                            BCON_INT64(w->ms->max_await_ms));
    if (resume_token != NULL) {
        BSON_APPEND_DOCUMENT(opts, "resumeAfter", resume_token);
    }
    mongoc_change_stream_t *stream = mongoc_collection_watch(w->coll, pipeline, opts);
    bson_destroy(opts);
    bson_destroy(pipeline);
    return stream;
}

/* Keeps a copy of the stream's latest resume token in *token. */
static void save_token(mongoc_change_stream_t *stream, bson_t **token)
{
    const bson_t *current = mongoc_change_stream_get_resume_token(stream);
    if (current != NULL) {
        bson_destroy(*token);
        *token = bson_copy(current);
    }
}

/* Handles one change event. Returns true when the stream must be reopened from scratch (after a
 * re-read): the stream was invalidated or the document was deleted or replaced oddly. */
static bool handle_event(ah_mongo_watch_t *w, const bson_t *event)
{
    bson_iter_t it;
    char op[32] = "";
    if (bson_iter_init_find(&it, event, "operationType") && BSON_ITER_HOLDS_UTF8(&it)) {
        ah_strlcpy(op, bson_iter_utf8(&it, NULL), sizeof(op));
    }
    if (strcmp(op, "invalidate") == 0) {
        ah_log_warn("[Distributed Control] Change stream invalidated: re-reading the control "
                    "document and reopening");
        return true;
    }
    if (bson_iter_init_find(&it, event, "documentKey") && BSON_ITER_HOLDS_DOCUMENT(&it)) {
        bson_iter_t key;
        if (bson_iter_recurse(&it, &key) && bson_iter_find(&key, "_id") &&
            BSON_ITER_HOLDS_UTF8(&key) &&
            strncmp(bson_iter_utf8(&key, NULL), AH_STORE_SCOPE_PREFIX,
                    strlen(AH_STORE_SCOPE_PREFIX)) == 0) {
            /* a scope document was written or removed: read the set (one find) */
            (void)watch_read(w, "scope read");
            return false;
        }
    }
    if (!bson_iter_init_find(&it, event, "fullDocument") || !BSON_ITER_HOLDS_DOCUMENT(&it)) {
        /* A delete (or an update whose document is already gone): read what is there now. */
        return true;
    }
    const uint8_t *data;
    uint32_t len;
    bson_t full;
    ah_control_t doc;
    bson_iter_document(&it, &len, &data);
    if (!bson_init_static(&full, data, len) || parse_and_remember(w->ms, &full, &doc) != AH_OK) {
        ah_log_warn("[Distributed Control] Ignoring a control document without a numeric "
                    "version");
        return false;
    }
    deliver(w, &doc);
    return false;
}

/* Change streams mode (and detection). Returns when the store closes or after switching to
 * polling. */
static void run_streams(ah_mongo_watch_t *w)
{
    ahm_store_t *ms = w->ms;
    bson_t *token = NULL;
    bool need_read = true;
    char text[AH_ERRLEN];
    while (!mongo_closing(ms)) {
        bson_error_t error;
        const bson_t *reply = NULL;
        mongoc_change_stream_t *stream = open_stream(w, token);
        if (mongoc_change_stream_error_document(stream, &error, &reply)) {
            mongoc_change_stream_destroy(stream);
            ah_mongo_fault_t fault = classify_error(&error);
            bool refused = fault == AH_MONGO_FAULT_UNSUPPORTED ||
                           (w->mode == AH_MONGO_MODE_DETECT && fault == AH_MONGO_FAULT_RESUMABLE &&
                            (error.code == AH_MONGO_CODE_UNAUTHORIZED ||
                             error.code == AH_MONGO_CODE_COMMAND_NOT_SUPPORTED));
            if (refused) {
                note_success(w, -1);
                use_polling(w, error.code == AH_MONGO_CODE_NO_REPLICA_SET ? "Replica set required"
                                                                          : error.message);
                break;
            }
            if (fault == AH_MONGO_FAULT_HISTORY && token != NULL) {
                ah_log_warn("[Distributed Control] Change stream cannot resume (%s): re-reading "
                            "the control document and reopening",
                            error.message);
                bson_destroy(token);
                token = NULL;
                need_read = true;
                continue;
            }
            note_failure(w, "change stream", error_text(ms, &error, text, sizeof(text)));
            if (wait_backoff(w, AH_MONGO_RETRY_MIN, AH_MONGO_RETRY_MAX)) {
                break;
            }
            continue;
        }
        if (w->mode == AH_MONGO_MODE_DETECT) {
            ah_log_info("✓ MongoDB Change Streams are supported");
            ah_log_info("Using MongoDB Change Streams (event-driven, real-time)");
            set_watch_mode(w, AH_MONGO_MODE_STREAMS);
        } else if (token != NULL) {
            w->reporter.status.stream_resumes++;
            ah_log_info("[Distributed Control] Change stream resumed");
        }
        /* The stream is open before the read, so a command written after the read is an event. */
        if (need_read) {
            if (watch_read(w, need_read && !w->delivered ? "startup read" : "re-read") != AH_OK) {
                mongoc_change_stream_destroy(stream);
                if (wait_backoff(w, AH_MONGO_RETRY_MIN, AH_MONGO_RETRY_MAX)) {
                    break;
                }
                continue;
            }
            need_read = false;
        } else {
            note_success(w, -1);
        }
        save_token(stream, &token);
        int64_t quiet_since = ah_mono_us();
        bool reopen_fresh = false;
        while (!mongo_closing(ms)) {
            const bson_t *event;
            if (mongoc_change_stream_next(stream, &event)) {
                reopen_fresh = handle_event(w, event);
                save_token(stream, &token);
                quiet_since = ah_mono_us();
                if (reopen_fresh) {
                    break;
                }
                continue;
            }
            if (mongo_closing(ms)) {
                break; /* close() killed the cursor: not a fault */
            }
            if (mongoc_change_stream_error_document(stream, &error, &reply)) {
                if (classify_error(&error) == AH_MONGO_FAULT_HISTORY) {
                    ah_log_warn("[Distributed Control] Change stream history lost (%s): "
                                "re-reading the control document and reopening",
                                error.message);
                    reopen_fresh = true;
                } else {
                    note_failure(w, "change stream", error_text(ms, &error, text, sizeof(text)));
                }
                break;
            }
            save_token(stream, &token);
            ah_store_report(&w->reporter, false);
            if (ms->verify_interval > 0 &&
                (double)(ah_mono_us() - quiet_since) / 1e6 >= ms->verify_interval) {
                int64_t before = w->delivered_version;
                if (watch_read(w, "change stream verification read") != AH_OK) {
                    break;
                }
                if (w->delivered_version != before) {
                    ah_log_warn("[Distributed Control] The change stream missed version %" PRId64
                                ": reopening it",
                                w->delivered_version);
                    reopen_fresh = true;
                    break;
                }
                quiet_since = ah_mono_us();
            }
        }
        mongoc_change_stream_destroy(stream);
        if (reopen_fresh) {
            bson_destroy(token);
            token = NULL;
            need_read = true;
            continue;
        }
        if (!w->reporter.status.connected &&
            wait_backoff(w, AH_MONGO_RETRY_MIN, AH_MONGO_RETRY_MAX)) {
            break;
        }
    }
    bson_destroy(token);
}

/* Polling mode: one light query per interval (±10% jitter), delivered on a version change. */
static void run_polling(ah_mongo_watch_t *w)
{
    ahm_store_t *ms = w->ms;
    double interval = ms->cfg->polling_interval;
    double retry_max = interval > AH_MONGO_POLL_RETRY_MAX ? interval : AH_MONGO_POLL_RETRY_MAX;
    while (!mongo_closing(ms)) {
        w->reporter.status.polls++;
        double wait;
        if (watch_read(w, "poll") == AH_OK) {
            wait = interval * ah_jitter(&w->seed, 0.9, 1.1);
            ah_store_report(&w->reporter, false);
        } else {
            wait = backoff_delay(w->failures - 1, interval, retry_max, &w->seed);
        }
        if (mongo_wait(ms, wait)) {
            break;
        }
    }
}

/* Command monitoring of the watcher's client: remembers the id of the change stream's cursor
 * (from the aggregate that opens it and every getMore), so that close() can kill it. */
static void watch_command_succeeded(const mongoc_apm_command_succeeded_t *event)
{
    const char *name = mongoc_apm_command_succeeded_get_command_name(event);
    if (strcmp(name, "aggregate") != 0 && strcmp(name, "getMore") != 0) {
        return;
    }
    ahm_store_t *ms = mongoc_apm_command_succeeded_get_context(event);
    bson_iter_t it, id;
    if (bson_iter_init(&it, mongoc_apm_command_succeeded_get_reply(event)) &&
        bson_iter_find_descendant(&it, "cursor.id", &id) && BSON_ITER_HOLDS_NUMBER(&id)) {
        atomic_store(&ms->stream_cursor, bson_iter_as_int64(&id));
    }
}

/* Heartbeats of both clients: a server whose replica set is not the URI's is left out of the
 * topology without an error message; remember what it said for error_text(). */
static void heartbeat_succeeded(const mongoc_apm_server_heartbeat_succeeded_t *event)
{
    ahm_store_t *ms = mongoc_apm_server_heartbeat_succeeded_get_context(event);
    const char *wanted = mongoc_uri_get_replica_set(ms->uri);
    const mongoc_host_list_t *host = mongoc_apm_server_heartbeat_succeeded_get_host(event);
    bson_iter_t it;
    const char *set_name = NULL;
    if (bson_iter_init_find(&it, mongoc_apm_server_heartbeat_succeeded_get_reply(event),
                            "setName") &&
        BSON_ITER_HOLDS_UTF8(&it)) {
        set_name = bson_iter_utf8(&it, NULL);
    }
    char note[512] = "";
    if (wanted != NULL && set_name == NULL) {
        snprintf(note, sizeof(note),
                 "the server at %.100s is not a replica set member, but MONGODB_URI asks for "
                 "replicaSet=%.64s",
                 host->host_and_port, wanted);
    } else if (wanted != NULL && strcmp(set_name, wanted) != 0) {
        snprintf(note, sizeof(note),
                 "the server at %.100s belongs to replica set \"%.64s\", not \"%.64s\" (replicaSet "
                 "in MONGODB_URI)",
                 host->host_and_port, set_name, wanted);
    }
    pthread_mutex_lock(&ms->diag_lock);
    ah_strlcpy(ms->server_note, note, sizeof(ms->server_note));
    pthread_mutex_unlock(&ms->diag_lock);
}

static void watch_heartbeats(mongoc_apm_callbacks_t *callbacks)
{
    mongoc_apm_set_server_heartbeat_succeeded_cb(callbacks, heartbeat_succeeded);
}

/* The watcher's own client: ms->watch_uri, error API 2, the appname, command monitoring. NULL
 * with a log line when the URI cannot make one (it was accepted at open, so this is unlikely). */
static mongoc_client_t *watch_client_new(ahm_store_t *ms)
{
    bson_error_t error;
    mongoc_client_t *client = mongoc_client_new_from_uri_with_error(ms->watch_uri, &error);
    if (client == NULL) {
        ah_log_error("[Distributed Control] cannot create the watcher's MongoDB client: %s",
                     error.message);
        return NULL;
    }
    mongoc_client_set_error_api(client, MONGOC_ERROR_API_VERSION_2);
    char appname[128];
    snprintf(appname, sizeof(appname), "agenthost/%.100s",
             ms->cfg->agent_id ? ms->cfg->agent_id : "");
    mongoc_client_set_appname(client, appname);
    mongoc_apm_callbacks_t *callbacks = mongoc_apm_callbacks_new();
    mongoc_apm_set_command_succeeded_cb(callbacks, watch_command_succeeded);
    watch_heartbeats(callbacks);
    mongoc_client_set_apm_callbacks(client, callbacks, ms);
    mongoc_apm_callbacks_destroy(callbacks);
    return client;
}

static void *watcher_main(void *arg)
{
    ahm_store_t *ms = arg;
    ah_mongo_watch_t w;
    memset(&w, 0, sizeof(w));
    w.ms = ms;
    w.seed = (unsigned int)(ah_now_us() ^ ((int64_t)getpid() << 16));
    w.scope_count = -1;
    w.client = watch_client_new(ms);
    if (w.client == NULL) {
        goto done;
    }
    w.coll = mongoc_client_get_collection(w.client, ms->cfg->mongodb_database, AH_MONGO_COLLECTION);
    ah_store_reporter_init(&w.reporter, &ms->listener, "mongodb", "unknown", "",
                           AH_MONGO_STATUS_GAP_US);
    if (ms->cfg->change_streams) {
        w.mode = AH_MONGO_MODE_DETECT;
        ah_store_report(&w.reporter, true);
        run_streams(&w);
    } else {
        ah_log_info("Using polling fallback (interval: %gs) (ENABLE_CHANGE_STREAMS=false)",
                    ms->cfg->polling_interval);
        set_watch_mode(&w, AH_MONGO_MODE_POLLING);
    }
    if (w.mode == AH_MONGO_MODE_POLLING) {
        run_polling(&w);
    }
    mongoc_collection_destroy(w.coll);
    mongoc_client_destroy(w.client);
done:
    free(w.scopes);
    pthread_mutex_lock(&ms->mutex);
    ms->watcher_done = true;
    pthread_cond_broadcast(&ms->cond);
    pthread_mutex_unlock(&ms->mutex);
    return NULL;
}

/* close(): kills the watcher's change stream cursor, if one is open, through the API client: a
 * getMore waiting on it returns at once (CursorKilled). Users may always kill their own cursors
 * (MongoDB 4.2+), so the role needs nothing for it. */
static void kill_stream_cursor(ahm_store_t *ms)
{
    int64_t id = atomic_load(&ms->stream_cursor);
    if (id == 0 || ms->api_client == NULL) {
        return;
    }
    bson_error_t error;
    bson_t *cmd = BCON_NEW("killCursors", BCON_UTF8(AH_MONGO_COLLECTION), "cursors", "[",
                           BCON_INT64(id), "]");
    pthread_mutex_lock(&ms->api_lock);
    if (!mongoc_client_command_simple(ms->api_client, ms->cfg->mongodb_database, cmd, NULL, NULL,
                                      &error)) {
        ah_log_debug("[Distributed Control] killCursors at close: %s", error.message);
    }
    pthread_mutex_unlock(&ms->api_lock);
    bson_destroy(cmd);
}

/* ah_cond_wait_until's condition (mutex held). */
static bool watcher_is_done(void *arg)
{
    const ahm_store_t *ms = arg;
    return ms->watcher_done;
}

static int mongo_watch_start(ah_store_t *st, const ah_store_listener_t *listener, char *err,
                             size_t errlen)
{
    ahm_store_t *ms = mongo_of(st);
    if (ms->watcher_started) {
        snprintf(err, errlen, "the MongoDB watcher is already running");
        return AH_EINVAL;
    }
    ms->listener = *listener;
    if (pthread_create(&ms->watcher, NULL, watcher_main, ms) != 0) {
        snprintf(err, errlen, "cannot start the MongoDB watcher thread");
        return AH_EIO;
    }
    ms->watcher_started = true;
    return AH_OK;
}

static void mongo_close(ah_store_t *st)
{
    ahm_store_t *ms = mongo_of(st);
    pthread_mutex_lock(&ms->mutex);
    ms->closing = true;
    pthread_cond_broadcast(&ms->cond);
    pthread_mutex_unlock(&ms->mutex);
    if (ms->watcher_started) {
        /* The watcher may be inside a getMore that waits up to AH_MONGO_MAX_AWAIT_MS: end it by
         * killing its cursor, again if the stream was just (re)opened, until the thread is out. */
        for (;;) {
            pthread_mutex_lock(&ms->mutex);
            bool done = ah_cond_wait_until(&ms->cond, &ms->mutex, AH_MONGO_CLOSE_KILL_EVERY_S,
                                           watcher_is_done, ms);
            pthread_mutex_unlock(&ms->mutex);
            if (done) {
                break;
            }
            kill_stream_cursor(ms);
        }
        pthread_join(ms->watcher, NULL);
    }
    mongoc_client_destroy(ms->api_client); /* NULL is a no-op */
    mongoc_uri_destroy(ms->watch_uri);
    mongoc_uri_destroy(ms->uri);
    pthread_mutex_destroy(&ms->api_lock);
    pthread_mutex_destroy(&ms->diag_lock);
    pthread_cond_destroy(&ms->cond);
    pthread_mutex_destroy(&ms->mutex);
    free(ms);
}

static const ah_store_ops_t mongo_ops = {
    .read = mongo_read,
    .command = mongo_command,
    .history = mongo_history,
    .watch_start = mongo_watch_start,
    .close = mongo_close,
    .put_status = mongo_put_status,
    .list_status = mongo_list_status,
    .lease = mongo_lease,
    .list_leases = mongo_list_leases,
};

/* ---- opening ------------------------------------------------------------------------------ */

/* Sets a millisecond option unless the user's URI already has it. */
static void default_timeout(mongoc_uri_t *uri, const char *option, int32_t ms)
{
    if (!mongoc_uri_has_option(uri, option)) {
        mongoc_uri_set_option_as_int32(uri, option, ms);
    }
}

ah_store_t *ahm_store_open(const ah_config_t *cfg, char *err, size_t errlen)
{
    bson_error_t error;
    pthread_once(&mongoc_once, mongo_global_init);
    ahm_store_t *ms = calloc(1, sizeof(*ms));
    if (ms == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    ms->base.ops = &mongo_ops;
    ms->cfg = cfg;
    ms->last_command = AH_CMD_RUNNING;
    pthread_mutex_init(&ms->mutex, NULL);
    pthread_mutex_init(&ms->api_lock, NULL);
    pthread_mutex_init(&ms->diag_lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&ms->cond, &attr);
    pthread_condattr_destroy(&attr);
    ms->verify_interval = cfg->change_stream_verify_interval;
    ms->uri = mongoc_uri_new_with_error(cfg->mongodb_uri, &error);
    if (ms->uri == NULL) {
        snprintf(err, errlen, "MONGODB_URI is invalid: %s", error.message);
        goto fail;
    }
    if (ahm_uri_check(ms->uri, "MONGODB_URI", err, errlen) != AH_OK) {
        goto fail;
    }
    default_timeout(ms->uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS, AH_MONGO_SERVER_SELECTION_MS);
    default_timeout(ms->uri, MONGOC_URI_CONNECTTIMEOUTMS, AH_MONGO_CONNECT_MS);
    bool own_socket_timeout = mongoc_uri_has_option(ms->uri, MONGOC_URI_SOCKETTIMEOUTMS);
    default_timeout(ms->uri, MONGOC_URI_SOCKETTIMEOUTMS, AH_MONGO_SOCKET_MS);
    ms->max_await_ms = AH_MONGO_MAX_AWAIT_MS;
    if (ms->verify_interval > 0 && ms->verify_interval * 1000.0 < ms->max_await_ms) {
        /* a silent stream is verified between two getMores: wait no longer than that */
        ms->max_await_ms =
            ms->verify_interval * 1000.0 >= 1 ? (int)(ms->verify_interval * 1000.0) : 1;
    }
    ms->watch_uri = mongoc_uri_copy(ms->uri);
    if (own_socket_timeout) {
        /* The URI's socket timeout also bounds the stream: a getMore must come back well before
         * it would call the wait a failure. */
        int32_t socket_ms =
            mongoc_uri_get_option_as_int32(ms->uri, MONGOC_URI_SOCKETTIMEOUTMS, AH_MONGO_SOCKET_MS);
        if (socket_ms > 0 && socket_ms < 2 * ms->max_await_ms) {
            ms->max_await_ms = socket_ms / 2 > 1 ? socket_ms / 2 : 1;
        }
    } else {
        mongoc_uri_set_option_as_int32(ms->watch_uri, MONGOC_URI_SOCKETTIMEOUTMS,
                                       AH_MONGO_MAX_AWAIT_MS + AH_MONGO_AWAIT_SOCKET_MARGIN_MS);
    }
    ms->api_client = mongoc_client_new_from_uri_with_error(ms->uri, &error);
    if (ms->api_client == NULL) {
        snprintf(err, errlen, "MONGODB_URI cannot be used: %s", error.message);
        goto fail;
    }
    mongoc_client_set_error_api(ms->api_client, MONGOC_ERROR_API_VERSION_2);
    mongoc_apm_callbacks_t *callbacks = mongoc_apm_callbacks_new();
    watch_heartbeats(callbacks);
    mongoc_client_set_apm_callbacks(ms->api_client, callbacks, ms);
    mongoc_apm_callbacks_destroy(callbacks);
    char appname[128];
    snprintf(appname, sizeof(appname), "agenthost/%.100s", cfg->agent_id ? cfg->agent_id : "");
    mongoc_client_set_appname(ms->api_client, appname);
    return &ms->base;
fail:
    mongo_close(&ms->base);
    return NULL;
}
