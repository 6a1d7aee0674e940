/* mongo_c_driver_check URI MODE
 *
 * Checks mongo_test_server.py with mongo-c-driver, the way agenthost uses it:
 * a mongoc_client_pool_t, findAndModify with $inc, and (replset) a change
 * stream with fullDocument: "updateLookup" and a $match on documentKey._id that
 * receives an update made through a second pooled client and survives a
 * server-side hangup ({testControl: "hangup"}).  MODE "standalone" expects the
 * change stream to fail with code 40573.  Exit status 0 = all checks passed.
 */
#define _DEFAULT_SOURCE 1
#include <mongoc/mongoc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DB "cdrivercheck"
#define COLL "agents"

static int failures = 0;
static int aggregates_started = 0; /* counted by an APM callback */

static void on_command_started(const mongoc_apm_command_started_t *event)
{
    if (strcmp(mongoc_apm_command_started_get_command_name(event), "aggregate") == 0)
        __atomic_add_fetch(&aggregates_started, 1, __ATOMIC_SEQ_CST);
}

static int aggregates(void)
{
    return __atomic_load_n(&aggregates_started, __ATOMIC_SEQ_CST);
}

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            failures++;                                                                            \
            return 0;                                                                              \
        }                                                                                          \
    } while (0)

/* keep stdout for the verdict: driver log lines go to stderr */
static void log_to_stderr(mongoc_log_level_t level, const char *domain, const char *message,
                          void *data)
{
    if (level <= MONGOC_LOG_LEVEL_INFO)
        fprintf(stderr, "%s %s: %s\n", mongoc_log_level_str(level), domain, message);
}

static int64_t now_ms(void)
{
    return bson_get_monotonic_time() / 1000;
}

/* findAndModify {_id: id} {$inc: {n: 1}} upsert, new; returns the new n or -1.
 * Retries for a few seconds (connections may have just been hung up). */
static int64_t inc_counter(mongoc_client_t *client, const char *id)
{
    mongoc_collection_t *coll = mongoc_client_get_collection(client, DB, COLL);
    bson_t *query = BCON_NEW("_id", BCON_UTF8(id));
    bson_t *update = BCON_NEW("$inc", "{", "n", BCON_INT32(1), "}");
    mongoc_find_and_modify_opts_t *opts = mongoc_find_and_modify_opts_new();
    mongoc_find_and_modify_opts_set_update(opts, update);
    mongoc_find_and_modify_opts_set_flags(opts, MONGOC_FIND_AND_MODIFY_UPSERT |
                                                    MONGOC_FIND_AND_MODIFY_RETURN_NEW);
    int64_t result = -1;
    int64_t deadline = now_ms() + 10000;
    for (;;) {
        bson_t reply;
        bson_error_t error;
        if (mongoc_collection_find_and_modify_with_opts(coll, query, opts, &reply, &error)) {
            bson_iter_t it;
            if (bson_iter_init(&it, &reply) && bson_iter_find_descendant(&it, "value.n", &it))
                result = bson_iter_as_int64(&it);
            bson_destroy(&reply);
            break;
        }
        bson_destroy(&reply);
        fprintf(stderr, "findAndModify failed (%u.%u): %s\n", error.domain, error.code,
                error.message);
        if (now_ms() > deadline)
            break;
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    mongoc_find_and_modify_opts_destroy(opts);
    bson_destroy(update);
    bson_destroy(query);
    mongoc_collection_destroy(coll);
    return result;
}

static int test_control(mongoc_client_t *client, const char *what, int delay_ms)
{
    bson_t *cmd = BCON_NEW("testControl", BCON_UTF8(what), "delayMS", BCON_INT32(delay_ms));
    bson_error_t error;
    bool ok = mongoc_client_command_simple(client, "admin", cmd, NULL, NULL, &error);
    bson_destroy(cmd);
    CHECK(ok, "testControl %s: %s", what, error.message);
    return 1;
}

/* Next event from the stream within timeout_ms; copies it into *out. */
static int next_event(mongoc_change_stream_t *stream, bson_t *out, int64_t timeout_ms)
{
    int64_t deadline = now_ms() + timeout_ms;
    const bson_t *doc;
    bson_error_t error;
    const bson_t *err_doc;
    while (now_ms() < deadline) {
        if (mongoc_change_stream_next(stream, &doc)) {
            bson_destroy(out);
            bson_copy_to(doc, out);
            return 1;
        }
        if (mongoc_change_stream_error_document(stream, &error, &err_doc)) {
            char *s = err_doc ? bson_as_relaxed_extended_json(err_doc, NULL) : NULL;
            fprintf(stderr, "change stream error %u.%u: %s %s\n", error.domain, error.code,
                    error.message, s ? s : "");
            bson_free(s);
            return 0;
        }
    }
    fprintf(stderr, "no change event within %lld ms\n", (long long)timeout_ms);
    return 0;
}

static int check_update_event(const bson_t *ev, const char *id, int64_t n)
{
    bson_iter_t it;
    char *json = bson_as_relaxed_extended_json(ev, NULL);
    fprintf(stderr, "event: %s\n", json);
    bson_free(json);
    CHECK(bson_iter_init_find(&it, ev, "operationType") && BSON_ITER_HOLDS_UTF8(&it) &&
              strcmp(bson_iter_utf8(&it, NULL), "update") == 0,
          "operationType");
    CHECK(bson_iter_init(&it, ev) && bson_iter_find_descendant(&it, "documentKey._id", &it) &&
              BSON_ITER_HOLDS_UTF8(&it) && strcmp(bson_iter_utf8(&it, NULL), id) == 0,
          "documentKey._id");
    CHECK(bson_iter_init(&it, ev) && bson_iter_find_descendant(&it, "fullDocument.n", &it) &&
              bson_iter_as_int64(&it) == n,
          "fullDocument.n == %lld", (long long)n);
    CHECK(bson_iter_init(&it, ev) &&
              bson_iter_find_descendant(&it, "updateDescription.updatedFields.n", &it) &&
              bson_iter_as_int64(&it) == n,
          "updateDescription.updatedFields.n == %lld", (long long)n);
    CHECK(bson_iter_init_find(&it, ev, "_id") && BSON_ITER_HOLDS_DOCUMENT(&it), "resume token");
    return 1;
}

static int run(mongoc_client_pool_t *pool, int replset)
{
    mongoc_client_t *c1 = mongoc_client_pool_pop(pool);
    mongoc_client_t *c2 = mongoc_client_pool_pop(pool);
    int ok = 0;
    mongoc_change_stream_t *stream = NULL;
    bson_t *pipeline = NULL, *opts = NULL;
    bson_t ev = BSON_INITIALIZER;

    /* fresh collection (a missing one answers NamespaceNotFound: ignore) */
    mongoc_collection_t *coll = mongoc_client_get_collection(c1, DB, COLL);
    bson_error_t error;
    mongoc_collection_drop(coll, &error);

    int64_t n = inc_counter(c1, "agent-1");
    if (n != 1) {
        fprintf(stderr, "FAIL: first $inc gave n=%lld\n", (long long)n);
        goto done;
    }
    if (inc_counter(c1, "agent-2") != 1) {
        fprintf(stderr, "FAIL: agent-2 upsert\n");
        goto done;
    }

    pipeline = BCON_NEW("pipeline", "[", "{", "$match", "{", "documentKey._id",
                        BCON_UTF8("agent-1"), "}", "}", "]");
    opts = BCON_NEW("fullDocument", BCON_UTF8("updateLookup"), "maxAwaitTimeMS", BCON_INT64(1000));
    stream = mongoc_collection_watch(coll, pipeline, opts);
    const bson_t *err_doc;
    if (!replset) {
        const bson_t *doc;
        bool got = mongoc_change_stream_next(stream, &doc);
        if (got) {
            fprintf(stderr, "FAIL: standalone stream returned an event\n");
            goto done;
        }
        if (!mongoc_change_stream_error_document(stream, &error, &err_doc) || error.code != 40573) {
            fprintf(stderr, "FAIL: expected error 40573 in standalone mode, got %u: %s\n",
                    error.code, error.message);
            goto done;
        }
        fprintf(stderr, "standalone: change stream refused with 40573 as expected\n");
        ok = 1;
        goto done;
    }
    if (mongoc_change_stream_error_document(stream, &error, &err_doc)) {
        fprintf(stderr, "FAIL: watch: %s\n", error.message);
        goto done;
    }

    /* an update made through a second pooled client reaches the stream;
     * the agent-2 update must be filtered out by the $match */
    if (inc_counter(c2, "agent-2") != 2 || inc_counter(c2, "agent-1") != 2) {
        fprintf(stderr, "FAIL: $inc through second client\n");
        goto done;
    }
    if (!next_event(stream, &ev, 10000) || !check_update_event(&ev, "agent-1", 2))
        goto done;

    /* The server hangs up every connection while the stream's getMore is waiting
     * (maxAwaitTimeMS 1000, hangup after 300 ms): the driver must resume the
     * stream (a second aggregate) and then deliver the next event only. */
    if (aggregates() != 1) {
        fprintf(stderr, "FAIL: %d aggregates before hangup\n", aggregates());
        goto done;
    }
    if (!test_control(c2, "hangup", 300))
        goto done;
    {
        int64_t deadline = now_ms() + 10000;
        const bson_t *doc;
        while (aggregates() < 2 && now_ms() < deadline) {
            if (mongoc_change_stream_next(stream, &doc)) {
                fprintf(stderr, "FAIL: unexpected event after hangup\n");
                goto done;
            }
            if (mongoc_change_stream_error_document(stream, &error, &err_doc)) {
                fprintf(stderr, "FAIL: stream did not survive the hangup: %s\n", error.message);
                goto done;
            }
        }
        if (aggregates() < 2) {
            fprintf(stderr, "FAIL: the stream never resumed\n");
            goto done;
        }
        fprintf(stderr, "stream resumed after hangup (%d aggregates)\n", aggregates());
    }
    if (inc_counter(c2, "agent-2") != 3 || inc_counter(c2, "agent-1") != 3) {
        fprintf(stderr, "FAIL: $inc after hangup\n");
        goto done;
    }
    if (!next_event(stream, &ev, 15000) || !check_update_event(&ev, "agent-1", 3))
        goto done;
    /* Step down for 1 s: the waiting getMore fails with a resumable error, the
     * driver waits for a primary, resumes (third aggregate) and gets the next event. */
    {
        bson_t *cmd = BCON_NEW("testControl", BCON_UTF8("stepDown"), "seconds", BCON_DOUBLE(1.0));
        bool sd = mongoc_client_command_simple(c2, "admin", cmd, NULL, NULL, &error);
        bson_destroy(cmd);
        if (!sd) {
            fprintf(stderr, "FAIL: stepDown: %s\n", error.message);
            goto done;
        }
    }
    {
        int64_t deadline = now_ms() + 10000;
        const bson_t *doc;
        while (aggregates() < 3 && now_ms() < deadline) {
            if (mongoc_change_stream_next(stream, &doc)) {
                fprintf(stderr, "FAIL: unexpected event after stepdown\n");
                goto done;
            }
            if (mongoc_change_stream_error_document(stream, &error, &err_doc)) {
                fprintf(stderr, "FAIL: stream did not survive the stepdown: %s\n", error.message);
                goto done;
            }
        }
        if (aggregates() < 3) {
            fprintf(stderr, "FAIL: no resume after the stepdown (%d aggregates)\n", aggregates());
            goto done;
        }
        fprintf(stderr, "stream resumed after stepdown (%d aggregates)\n", aggregates());
    }
    if (inc_counter(c2, "agent-1") != 4) {
        fprintf(stderr, "FAIL: $inc after stepdown\n");
        goto done;
    }
    if (!next_event(stream, &ev, 15000) || !check_update_event(&ev, "agent-1", 4))
        goto done;
    fprintf(stderr,
            "replset: change stream received the update and resumed after hangup and stepdown\n");
    ok = 1;

done:
    bson_destroy(&ev);
    if (stream)
        mongoc_change_stream_destroy(stream);
    if (pipeline)
        bson_destroy(pipeline);
    if (opts)
        bson_destroy(opts);
    mongoc_collection_destroy(coll);
    mongoc_client_pool_push(pool, c2);
    mongoc_client_pool_push(pool, c1);
    return ok && failures == 0;
}

int main(int argc, char **argv)
{
    if (argc != 3 || (strcmp(argv[2], "replset") != 0 && strcmp(argv[2], "standalone") != 0)) {
        fprintf(stderr, "usage: %s URI replset|standalone\n", argv[0]);
        return 2;
    }
    mongoc_log_set_handler(log_to_stderr, NULL);
    mongoc_init();
    bson_error_t error;
    mongoc_uri_t *uri = mongoc_uri_new_with_error(argv[1], &error);
    if (!uri) {
        fprintf(stderr, "bad URI: %s\n", error.message);
        return 2;
    }
    mongoc_uri_set_option_as_int32(uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS, 10000);
    mongoc_client_pool_t *pool = mongoc_client_pool_new(uri);
    mongoc_client_pool_set_error_api(pool, MONGOC_ERROR_API_VERSION_2);
    mongoc_apm_callbacks_t *cbs = mongoc_apm_callbacks_new();
    mongoc_apm_set_command_started_cb(cbs, on_command_started);
    mongoc_client_pool_set_apm_callbacks(pool, cbs, NULL);
    mongoc_apm_callbacks_destroy(cbs);
    int ok = run(pool, strcmp(argv[2], "replset") == 0);
    mongoc_client_pool_destroy(pool);
    mongoc_uri_destroy(uri);
    mongoc_cleanup();
    printf("%s\n", ok ? "OK" : "FAILED");
    return ok ? 0 : 1;
}
