/* Unit tests of the HTTP API (core/ah_http.c): every route's answer and field order, cluster
 * commands through a real embedded store and through a fake one (to provoke an unavailable
 * store), the bearer token, 404/405, parameter validation, URL and body limits, the probes and
 * /metrics. Each test starts a server on 127.0.0.1 port 0 and talks to it with a small blocking
 * HTTP/1.1 client over a socket. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "ah_http.h"

#define IO_DEADLINE_S 5 /* per send/recv: a hung server fails the test instead of hanging it */

/* ---- a tiny blocking HTTP/1.1 client ---------------------------------------------------- */

typedef struct http_resp_s {
    int status; /* 0 if no status line was received */
    char *raw;  /* the whole answer, NUL-terminated */
    size_t raw_len;
    const char *body; /* into raw ("" if none) */
} http_resp_t;

static void resp_free(http_resp_t *r)
{
    free(r->raw);
    memset(r, 0, sizeof(*r));
}

static int connect_local(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct timeval tv = {.tv_sec = IO_DEADLINE_S};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
    return fd;
}

/* Sends `len` bytes of raw request, reads until the server closes, parses the status line.
 * Send errors are tolerated (a server may answer and close before reading everything). */
static http_resp_t http_raw(int port, const char *request, size_t len)
{
    http_resp_t r = {0};
    int fd = connect_local(port);
    size_t sent = 0;
    while (sent < len) {
        ssize_t n = send(fd, request + sent, len - sent, MSG_NOSIGNAL);
        if (n <= 0) {
            break;
        }
        sent += (size_t)n;
    }
    size_t cap = 4096;
    r.raw = malloc(cap);
    assert_non_null(r.raw);
    for (;;) {
        if (cap - r.raw_len < 1024) {
            cap *= 2;
            r.raw = realloc(r.raw, cap);
            assert_non_null(r.raw);
        }
        ssize_t n = recv(fd, r.raw + r.raw_len, cap - r.raw_len - 1, 0);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            assert_true(errno != EAGAIN && errno != EWOULDBLOCK); /* the deadline passed */
            break;                                                /* reset: keep what came */
        }
        if (n == 0) {
            break;
        }
        r.raw_len += (size_t)n;
    }
    close(fd);
    r.raw[r.raw_len] = '\0';
    sscanf(r.raw, "HTTP/1.%*d %d", &r.status);
    const char *end = strstr(r.raw, "\r\n\r\n");
    r.body = end != NULL ? end + 4 : "";
    return r;
}

/* One request with `Connection: close`; extra_headers are complete "Name: value\r\n" lines. */
static http_resp_t http_request(int port, const char *method, const char *target,
                                const char *extra_headers)
{
    size_t cap = strlen(target) + 512 + (extra_headers ? strlen(extra_headers) : 0);
    char *request = malloc(cap);
    assert_non_null(request);
    int n =
        snprintf(request, cap, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s\r\n",
                 method, target, extra_headers ? extra_headers : "");
    http_resp_t r = http_raw(port, request, (size_t)n);
    free(request);
    return r;
}

/* Copies the value of header `name` of r into out; false if absent. */
static bool resp_header(const http_resp_t *r, const char *name, char *out, size_t n)
{
    const char *end = strstr(r->raw, "\r\n\r\n");
    size_t name_len = strlen(name);
    for (const char *line = strstr(r->raw, "\r\n"); line != NULL && line < end;
         line = strstr(line + 2, "\r\n")) {
        const char *h = line + 2;
        if (strncasecmp(h, name, name_len) == 0 && h[name_len] == ':') {
            const char *v = h + name_len + 1;
            while (*v == ' ') {
                v++;
            }
            size_t len = strcspn(v, "\r");
            snprintf(out, n, "%.*s", (int)len, v);
            return true;
        }
    }
    return false;
}

static void assert_header(const http_resp_t *r, const char *name, const char *expected)
{
    char value[256];
    if (!resp_header(r, name, value, sizeof(value))) {
        fail_msg("header %s missing in:\n%s", name, r->raw);
    }
    assert_string_equal(value, expected);
}

/* Asserts that the JSON keys appear in this order (a NULL-terminated list). */
static void assert_key_order(const char *body, const char *const *keys)
{
    const char *at = body;
    for (size_t i = 0; keys[i] != NULL; i++) {
        char quoted[64];
        snprintf(quoted, sizeof(quoted), "\"%s\":", keys[i]);
        const char *found = strstr(at, quoted);
        if (found == NULL) {
            fail_msg("key %s missing or out of order in %s", keys[i], body);
        }
        at = found + strlen(quoted);
    }
}

static void assert_contains(const char *haystack, const char *needle)
{
    if (strstr(haystack, needle) == NULL) {
        fail_msg("expected to find %s in:\n%s", needle, haystack);
    }
}

static void assert_error(const http_resp_t *r, int status, const char *message)
{
    if (r->status != status) {
        fail_msg("expected status %d, got:\n%s", status, r->raw);
    }
    char expected[1024];
    snprintf(expected, sizeof(expected), "{\"status\":\"error\",\"error\":\"%s\"}", message);
    assert_string_equal(r->body, expected);
    assert_header(r, "Content-Type", "application/json");
    assert_header(r, "Cache-Control", "no-store");
}

/* ---- a fake store (to provoke failures) ------------------------------------------------- */

typedef struct fake_store_s {
    ah_store_t base;
    pthread_mutex_t lock;
    int fail_rc; /* 0, or what command/history return */
    int writes;
    ah_control_t doc;
    ah_control_t audit[32];
    int naudit;
} fake_store_t;

static int fake_read(ah_store_t *st, ah_control_t *out, char *err, size_t errlen)
{
    fake_store_t *fs = (fake_store_t *)st;
    pthread_mutex_lock(&fs->lock);
    *out = fs->doc;
    pthread_mutex_unlock(&fs->lock);
    return AH_OK;
}

static int fake_command(ah_store_t *st, const ah_command_req_t *req, ah_control_t *out, char *err,
                        size_t errlen)
{
    fake_store_t *fs = (fake_store_t *)st;
    pthread_mutex_lock(&fs->lock);
    int rc = fs->fail_rc;
    if (rc != AH_OK) {
        snprintf(err, errlen, "connection refused");
    } else if (req->if_version >= 0 && req->if_version != fs->doc.version) {
        snprintf(err, errlen, "version conflict");
        *out = fs->doc;
        rc = AH_ECONFLICT;
    } else {
        fs->doc.command = req->command;
        fs->doc.version++;
        fs->doc.timestamp_us = ah_now_us();
        fs->doc.expires_us = req->expires_us;
        fs->doc.drain_ms = req->drain_ms;
        ah_strlcpy(fs->doc.reason, req->reason, sizeof(fs->doc.reason));
        ah_strlcpy(fs->doc.updated_by, req->updated_by, sizeof(fs->doc.updated_by));
        ah_strlcpy(fs->doc.agent_id, req->agent_id, sizeof(fs->doc.agent_id));
        if (fs->naudit < 32) {
            fs->audit[fs->naudit++] = fs->doc;
        }
        fs->writes++;
        *out = fs->doc;
    }
    pthread_mutex_unlock(&fs->lock);
    return rc;
}

static int fake_history(ah_store_t *st, int limit, ah_control_t *out, int *count, char *err,
                        size_t errlen)
{
    fake_store_t *fs = (fake_store_t *)st;
    pthread_mutex_lock(&fs->lock);
    int rc = fs->fail_rc;
    if (rc != AH_OK) {
        snprintf(err, errlen, "connection refused");
    } else {
        *count = 0;
        for (int i = fs->naudit - 1; i >= 0 && *count < limit; i--) {
            out[(*count)++] = fs->audit[i];
        }
    }
    pthread_mutex_unlock(&fs->lock);
    return rc;
}

static int fake_watch_start(ah_store_t *st, const ah_store_listener_t *listener, char *err,
                            size_t errlen)
{
    return AH_OK;
}

static void fake_close(ah_store_t *st)
{
    fake_store_t *fs = (fake_store_t *)st;
    pthread_mutex_destroy(&fs->lock);
    free(fs);
}

static const ah_store_ops_t fake_ops = {
    .read = fake_read,
    .command = fake_command,
    .history = fake_history,
    .watch_start = fake_watch_start,
    .close = fake_close,
};

static fake_store_t *fake_store_new(void)
{
    fake_store_t *fs = calloc(1, sizeof(*fs));
    assert_non_null(fs);
    fs->base.ops = &fake_ops;
    pthread_mutex_init(&fs->lock, NULL);
    fs->doc.command = AH_CMD_RUNNING;
    return fs;
}

static int fake_writes(fake_store_t *fs)
{
    pthread_mutex_lock(&fs->lock);
    int n = fs->writes;
    pthread_mutex_unlock(&fs->lock);
    return n;
}

/* ---- fixture ---------------------------------------------------------------------------- */

typedef struct fixture_s {
    ah_config_t cfg;
    ah_state_t *state;
    ah_store_t *store; /* closed in teardown; NULL = distributed control disabled */
    fake_store_t *fake;
    ah_http_t *http;
    int port;
    char dir[64];
    char path[128];
} fixture_t;

static void set_config(ah_config_t *cfg, const char *name, const char *value)
{
    char err[AH_ERRLEN] = "";
    if (ah_config_set(cfg, name, value, err, sizeof(err)) != 0) {
        fail_msg("%s: %s", name, err);
    }
}

static int setup(void **state)
{
    fixture_t *fx = calloc(1, sizeof(*fx));
    if (fx == NULL) {
        return -1;
    }
    ah_config_defaults(&fx->cfg);
    set_config(&fx->cfg, "HTTP_BIND", "127.0.0.1");
    set_config(&fx->cfg, "HTTP_PORT", "0");
    set_config(&fx->cfg, "AGENT_ID", "agent-1");
    set_config(&fx->cfg, "AGENTHOST_STATE_POLL", "0.05");
    snprintf(fx->dir, sizeof(fx->dir), "/tmp/ah_http_XXXXXX");
    if (mkdtemp(fx->dir) == NULL) {
        return -1;
    }
    snprintf(fx->path, sizeof(fx->path), "%s/state.db", fx->dir);
    set_config(&fx->cfg, "AGENTHOST_STATE", fx->path);
    fx->state = ah_state_new();
    if (fx->state == NULL) {
        return -1;
    }
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *fx = *state;
    ah_http_stop(fx->http, 5);
    ah_store_close(fx->store);
    ah_state_free(fx->state);
    ah_config_free(&fx->cfg);
    char file[256];
    const char *suffixes[] = {"", "-wal", "-shm", "-journal"};
    for (size_t i = 0; i < sizeof(suffixes) / sizeof(suffixes[0]); i++) {
        snprintf(file, sizeof(file), "%s%s", fx->path, suffixes[i]);
        unlink(file);
    }
    rmdir(fx->dir);
    free(fx);
    return 0;
}

static void start(fixture_t *fx)
{
    char err[AH_ERRLEN] = "";
    fx->http = ah_http_start(&fx->cfg, fx->state, fx->store, NULL, err, sizeof(err));
    if (fx->http == NULL) {
        fail_msg("ah_http_start: %s", err);
    }
    fx->port = ah_http_port(fx->http);
    assert_true(fx->port > 0);
}

static void start_with_fake(fixture_t *fx)
{
    fx->fake = fake_store_new();
    fx->store = &fx->fake->base;
    start(fx);
}

static void start_with_sqlite(fixture_t *fx)
{
    char err[AH_ERRLEN] = "";
    fx->store = ah_store_sqlite_open(fx->path, 0.05, err, sizeof(err));
    if (fx->store == NULL) {
        fail_msg("ah_store_sqlite_open: %s", err);
    }
    start(fx);
}

/* Applies pending events as the Lua worker would (without hooks). */
static void worker_apply(ah_state_t *s)
{
    ah_event_t ev;
    while (ah_state_take_event(s, &ev)) {
        ah_run_state_t from;
        ah_run_state_t to;
        ah_hook_t hook;
        ah_state_apply(s, &ev, &from, &to, &hook);
    }
}

/* Takes the state out of "starting" as the startup sync would (running). */
static void sync_running(ah_state_t *s)
{
    assert_int_equal(ah_state_offer_local(s, AH_CMD_RUNNING, AH_SOURCE_STARTUP, "", "system"),
                     AH_OK);
    worker_apply(s);
}

static void offer_cluster(ah_state_t *s, ah_command_t cmd, int64_t version, int64_t ts,
                          const char *reason, const char *updated_by)
{
    ah_control_t doc = {.command = cmd, .version = version, .timestamp_us = ts};
    ah_strlcpy(doc.reason, reason, sizeof(doc.reason));
    ah_strlcpy(doc.updated_by, updated_by, sizeof(doc.updated_by));
    ah_state_offer_cluster(s, &doc);
}

static void set_watch_mode(ah_state_t *s, const char *backend, const char *mode)
{
    ah_store_status_t st = {.latency_ms = -1, .connected = true};
    ah_strlcpy(st.backend, backend, sizeof(st.backend));
    ah_strlcpy(st.topology, backend, sizeof(st.topology));
    ah_strlcpy(st.watch_mode, mode, sizeof(st.watch_mode));
    ah_state_set_store_status(s, &st);
}

/* ---- tests ------------------------------------------------------------------------------ */

static void test_start_reports_port_and_port_in_use_fails(void **state)
{
    fixture_t *fx = *state;
    start(fx);
    char port[16];
    snprintf(port, sizeof(port), "%d", fx->port);
    ah_config_t cfg;
    ah_config_defaults(&cfg);
    set_config(&cfg, "HTTP_BIND", "127.0.0.1");
    set_config(&cfg, "HTTP_PORT", port);
    char err[AH_ERRLEN] = "";
    ah_http_t *second = ah_http_start(&cfg, fx->state, NULL, NULL, err, sizeof(err));
    assert_null(second);
    char expected[128];
    snprintf(expected, sizeof(expected), "cannot listen on 127.0.0.1:%d: Address already in use",
             fx->port);
    assert_string_equal(err, expected);

    /* stopping releases the port at once */
    ah_http_stop(fx->http, 5);
    fx->http = ah_http_start(&cfg, fx->state, NULL, NULL, err, sizeof(err));
    if (fx->http == NULL) {
        fail_msg("restart on port %d: %s", fx->port, err);
    }
    assert_int_equal(ah_http_port(fx->http), fx->port);

    /* The setting is refused when set; the listener checks what it is given all the same. */
    char set_err[AH_ERRLEN] = "";
    assert_int_equal(ah_config_set(&cfg, "HTTP_BIND", "not-an-address", set_err, sizeof(set_err)),
                     AH_EINVAL);
    assert_non_null(strstr(set_err, "invalid HTTP_BIND=\"not-an-address\": expected an IPv4 or "
                                    "IPv6 address"));
    set_config(&cfg, "HTTP_BIND", "::1");
    set_config(&cfg, "HTTP_BIND", "localhost");
    free(cfg.http_bind);
    cfg.http_bind = strdup("not-an-address");
    assert_null(ah_http_start(&cfg, fx->state, NULL, NULL, err, sizeof(err)));
    assert_string_equal(err, "invalid HTTP_BIND \"not-an-address\" (expected an IP address)");
    ah_config_free(&cfg);
    ah_http_stop(NULL, 0);
}

static void test_cluster_pause_and_resume_through_embedded_store(void **state)
{
    fixture_t *fx = *state;
    start_with_sqlite(fx);

    http_resp_t r = http_request(
        fx->port, "POST", "/api/cluster/pause?reason=Maintenance+window&updated_by=ops_team", NULL);
    assert_int_equal(r.status, 200);
    assert_header(&r, "Content-Type", "application/json");
    assert_header(&r, "Cache-Control", "no-store");
    ah_state_snapshot_t snap;
    ah_state_snapshot(fx->state, &snap);
    assert_true(snap.cluster_known);
    assert_int_equal(snap.cluster.version, 1);
    assert_int_equal(snap.cluster.command, AH_CMD_PAUSE);
    assert_string_equal(snap.cluster.reason, "Maintenance window");
    assert_string_equal(snap.cluster.updated_by, "ops_team");
    char ts[AH_TIMESTAMP_LEN];
    ah_format_timestamp(snap.cluster.timestamp_us, ts);
    char expected[1024];
    snprintf(expected, sizeof(expected),
             "{\"status\":\"success\",\"message\":\"Pause command issued to all agents in the "
             "cluster\",\"command\":\"pause\",\"version\":1,\"timestamp\":\"%s\",\"reason\":"
             "\"Maintenance window\",\"propagation\":\"Agents will pause within 0.05s (polling "
             "every 0.05s)\",\"expires_at\":null,\"drain\":null}",
             ts);
    assert_string_equal(r.body, expected);
    resp_free(&r);

    /* the worker applies it: paused by the cluster */
    worker_apply(fx->state);
    assert_int_equal(ah_state_get(fx->state), AH_STATE_PAUSED);

    r = http_request(fx->port, "POST", "/api/cluster/resume", NULL);
    assert_int_equal(r.status, 200);
    assert_contains(r.body, "\"message\":\"Resume command issued to all agents in the cluster\"");
    assert_contains(r.body, "\"command\":\"running\",\"version\":2,");
    assert_contains(r.body, "\"reason\":\"\",\"propagation\":\"Agents will resume within");
    resp_free(&r);
    ah_state_snapshot(fx->state, &snap);
    assert_int_equal(snap.cluster.version, 2);
    assert_string_equal(snap.cluster.updated_by, "api");

    r = http_request(fx->port, "GET", "/api/cluster/history", NULL);
    assert_int_equal(r.status, 200);
    assert_contains(r.body, "{\"count\":2,\"entries\":[{\"version\":2,\"command\":\"running\",");
    assert_contains(
        r.body, "\"updated_by\":\"api\",\"agent_id\":\"agent-1\",\"drain\":null},{\"version\":1,"
                "\"command\":\"pause\",");
    assert_key_order(r.body, (const char *[]){"count", "entries", "version", "command", "timestamp",
                                              "reason", "updated_by", "agent_id", NULL});
    resp_free(&r);

    r = http_request(fx->port, "GET", "/api/cluster/history?limit=1", NULL);
    assert_int_equal(r.status, 200);
    assert_contains(r.body, "{\"count\":1,\"entries\":[{\"version\":2,");
    resp_free(&r);
}

static void test_cluster_shutdown_propagation_in_change_streams_mode(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    set_watch_mode(fx->state, "mongodb", "change_streams");
    http_resp_t r =
        http_request(fx->port, "POST", "/api/cluster/shutdown?reason=Emergency+stop", NULL);
    assert_int_equal(r.status, 200);
    assert_key_order(r.body, (const char *[]){"status", "message", "command", "version",
                                              "timestamp", "reason", "propagation", NULL});
    assert_contains(r.body, "\"message\":\"Shutdown command issued to all agents in the cluster\"");
    assert_contains(r.body, "\"command\":\"shutdown\",\"version\":1,");
    assert_contains(r.body, "\"reason\":\"Emergency stop\",\"propagation\":\"Agents will shutdown "
                            "gracefully within seconds (event-driven via Change "
                            "Streams)\",\"expires_at\":null,\"drain\":null}");
    resp_free(&r);
    assert_int_equal(fake_writes(fx->fake), 1);
}

static void test_control_state_fields_in_documented_order(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    set_watch_mode(fx->state, "mongodb", "change_streams");
    int64_t ts = 1768127400123456; /* 2026-01-11T10:30:00.123456Z */
    offer_cluster(fx->state, AH_CMD_PAUSE, 42, ts, "Maintenance window", "ops_team");
    http_resp_t r = http_request(fx->port, "GET", "/api/cluster/control-state", NULL);
    assert_int_equal(r.status, 200);
    assert_string_equal(
        r.body,
        "{\"command\":\"pause\",\"version\":42,\"timestamp\":\"2026-01-11T10:30:00.123456Z\","
        "\"reason\":\"Maintenance window\",\"updated_by\":\"ops_team\",\"watch_mode\":"
        "\"change_streams\",\"note\":\"All agents in the cluster are subscribed to this "
        "state\",\"expires_at\":null,\"drain\":null}");
    resp_free(&r);

    r = http_request(fx->port, "GET", "/api/cluster/stats", NULL);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body,
                        "{\"watch_mode\":\"change_streams\",\"polling_interval\":null,"
                        "\"current_command\":\"pause\",\"current_version\":42,"
                        "\"last_updated\":\"2026-01-11T10:30:00.123456Z\",\"updated_by\":"
                        "\"ops_team\",\"reason\":\"Maintenance window\",\"expires_at\":null}");
    resp_free(&r);

    /* HEAD: same headers, no body */
    r = http_request(fx->port, "HEAD", "/api/cluster/control-state", NULL);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "");
    assert_header(&r, "Content-Type", "application/json");
    resp_free(&r);
}

static void test_control_state_unknown_yet_is_503(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    http_resp_t r = http_request(fx->port, "GET", "/api/cluster/control-state", NULL);
    assert_error(&r, 503, "control state not known yet: store not read yet");
    resp_free(&r);

    ah_store_status_t st = {.latency_ms = -1};
    ah_strlcpy(st.last_error, "connection refused", sizeof(st.last_error));
    ah_state_set_store_status(fx->state, &st);
    r = http_request(fx->port, "GET", "/api/cluster/control-state", NULL);
    assert_error(&r, 503, "control state not known yet: connection refused");
    resp_free(&r);

    /* stats still answers, with the configured polling interval and nulls */
    r = http_request(fx->port, "GET", "/api/cluster/stats", NULL);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "{\"watch_mode\":null,\"polling_interval\":0.05,"
                                "\"current_command\":null,\"current_version\":null,"
                                "\"last_updated\":null,\"updated_by\":null,\"reason\":null,"
                                "\"expires_at\":null}");
    resp_free(&r);
}

static void test_history_limit_validation(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    const char *bad[] = {"0", "abc", "1001", "-1", "", "+5", "5x", "99999999999", "%00"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char target[64];
        snprintf(target, sizeof(target), "/api/cluster/history?limit=%s", bad[i]);
        http_resp_t r = http_request(fx->port, "GET", target, NULL);
        assert_error(&r, 400, "limit must be an integer between 1 and 1000");
        resp_free(&r);
    }
    http_resp_t r = http_request(fx->port, "GET", "/api/cluster/history?limit=1000", NULL);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "{\"count\":0,\"entries\":[]}");
    resp_free(&r);
}

static void test_store_unavailable_is_503_and_writes_nothing(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    fx->fake->fail_rc = AH_EUNAVAIL; /* before any request: no concurrent reader yet */
    http_resp_t r = http_request(fx->port, "POST", "/api/cluster/pause?reason=x", NULL);
    assert_error(&r, 503, "control store unavailable: connection refused");
    resp_free(&r);
    assert_int_equal(fake_writes(fx->fake), 0);
    ah_state_snapshot_t snap;
    ah_state_snapshot(fx->state, &snap);
    assert_false(snap.cluster_known);
    assert_false(ah_state_has_event(fx->state));

    r = http_request(fx->port, "GET", "/api/cluster/history", NULL);
    assert_error(&r, 503, "control store unavailable: connection refused");
    resp_free(&r);
}

static void test_distributed_control_disabled_is_503(void **state)
{
    fixture_t *fx = *state;
    start(fx);               /* store NULL */
    sync_running(fx->state); /* local commands are refused while starting */
    const char *message = "distributed control is disabled (ENABLE_DISTRIBUTED_CONTROL=false); "
                          "use /api/agent/* for this pod";
    const char *routes[][2] = {{"POST", "/api/cluster/pause"},
                               {"GET", "/api/cluster/control-state"},
                               {"GET", "/api/cluster/stats"},
                               {"GET", "/api/cluster/history"}};
    for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
        http_resp_t r = http_request(fx->port, routes[i][0], routes[i][1], NULL);
        assert_error(&r, 503, message);
        resp_free(&r);
    }
    http_resp_t r = http_request(fx->port, "GET", "/api/mongo/status", NULL);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body,
                        "{\"status\":\"disabled\",\"backend\":\"none\",\"topology\":\"none\","
                        "\"watch_mode\":null,\"connected\":false,\"database\":null,"
                        "\"last_error\":null,\"last_error_at\":null,\"latency_ms\":null,"
                        "\"reconnects\":0,\"stream_resumes\":0,\"polls\":0}");
    resp_free(&r);
    r = http_request(fx->port, "POST", "/api/agent/pause", NULL);
    assert_int_equal(r.status, 200);
    resp_free(&r);
}

static void test_agent_commands_affect_this_pod(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    offer_cluster(fx->state, AH_CMD_RUNNING, 3, ah_now_us(), "", "api");
    worker_apply(fx->state);
    http_resp_t r =
        http_request(fx->port, "POST", "/api/agent/pause?reason=debugging&updated_by=alice", NULL);
    assert_int_equal(r.status, 200);
    assert_string_equal(
        r.body,
        "{\"status\":\"success\",\"message\":\"Pause requested for this agent\","
        "\"state\":\"running\",\"agent_id\":\"agent-1\",\"command\":\"pause\",\"drain\":null,"
        "\"note\":\"Local command: affects this pod only and is overridden by the "
        "next cluster command\"}");
    resp_free(&r);
    ah_event_t ev;
    assert_true(ah_state_take_event(fx->state, &ev));
    assert_int_equal(ev.command, AH_CMD_PAUSE);
    assert_int_equal(ev.source, AH_SOURCE_LOCAL);
    assert_string_equal(ev.reason, "debugging");
    assert_string_equal(ev.updated_by, "alice");
    assert_int_equal(fake_writes(fx->fake), 0);

    r = http_request(fx->port, "POST", "/api/agent/resume", NULL);
    assert_int_equal(r.status, 200);
    assert_contains(r.body, "\"message\":\"Resume requested for this agent\"");
    assert_contains(r.body, "\"command\":\"running\"");
    resp_free(&r);
    assert_true(ah_state_take_event(fx->state, &ev));
    assert_string_equal(ev.updated_by, "api");

    r = http_request(fx->port, "POST", "/api/agent/explode", NULL);
    assert_error(&r, 400, "unknown command 'explode' (expected pause, resume or shutdown)");
    resp_free(&r);
    r = http_request(fx->port, "POST", "/api/cluster/explode", NULL);
    assert_error(&r, 400, "unknown command 'explode' (expected pause, resume or shutdown)");
    resp_free(&r);
    assert_false(ah_state_has_event(fx->state));
}

static void test_agent_state_fields(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    http_resp_t r = http_request(fx->port, "GET", "/api/agent/state", NULL);
    assert_int_equal(r.status, 200);
    assert_contains(r.body,
                    "{\"agent_id\":\"agent-1\",\"state\":\"starting\",\"applied_version\":0,"
                    "\"cluster_command\":null,\"local_override\":false,\"watch_mode\":null,"
                    "\"batches\":0,\"errors\":0,\"uptime_s\":");
    resp_free(&r);

    set_watch_mode(fx->state, "embedded", "polling");
    offer_cluster(fx->state, AH_CMD_PAUSE, 7, ah_now_us(), "", "api");
    worker_apply(fx->state);
    ah_state_count_batch(fx->state, true);
    ah_state_count_batch(fx->state, false);
    r = http_request(fx->port, "GET", "/api/agent/state", NULL);
    assert_contains(r.body, "{\"agent_id\":\"agent-1\",\"state\":\"paused\",\"applied_version\":7,"
                            "\"cluster_command\":\"pause\",\"local_override\":false,\"watch_mode\":"
                            "\"polling\",\"batches\":2,\"errors\":1,\"uptime_s\":");
    resp_free(&r);
}

static void test_mongo_status_fields(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    ah_store_status_t st = {.connected = false,
                            .last_error_us = 1768127400123456,
                            .latency_ms = 1.25,
                            .reconnects = 3,
                            .stream_resumes = 2,
                            .polls = 9};
    ah_strlcpy(st.backend, "embedded", sizeof(st.backend));
    ah_strlcpy(st.topology, "embedded", sizeof(st.topology));
    ah_strlcpy(st.watch_mode, "polling", sizeof(st.watch_mode));
    ah_strlcpy(st.last_error, "database is locked", sizeof(st.last_error));
    ah_state_set_store_status(fx->state, &st);
    http_resp_t r = http_request(fx->port, "GET", "/api/mongo/status", NULL);
    assert_int_equal(r.status, 200);
    char expected[1024];
    snprintf(expected, sizeof(expected),
             "{\"status\":\"disconnected\",\"backend\":\"embedded\",\"topology\":\"embedded\","
             "\"watch_mode\":\"polling\",\"connected\":false,\"database\":\"%s\",\"last_error\":"
             "\"database is locked\",\"last_error_at\":\"2026-01-11T10:30:00.123456Z\","
             "\"latency_ms\":1.25,\"reconnects\":3,\"stream_resumes\":2,\"polls\":9}",
             fx->path);
    assert_string_equal(r.body, expected);
    resp_free(&r);
}

static void test_bearer_token_guards_posts_only(void **state)
{
    fixture_t *fx = *state;
    set_config(&fx->cfg, "AGENT_API_TOKEN", "s3cret-token");
    start_with_fake(fx);
    const char *wrong[] = {NULL,
                           "Authorization: Bearer nope\r\n",
                           "Authorization: Bearer s3cret-toke\r\n",
                           "Authorization: Bearer s3cret-token2\r\n",
                           "Authorization: Basic s3cret-token\r\n",
                           "Authorization: Bearer\r\n"};
    for (size_t i = 0; i < sizeof(wrong) / sizeof(wrong[0]); i++) {
        http_resp_t r = http_request(fx->port, "POST", "/api/cluster/pause", wrong[i]);
        assert_error(&r, 401, "missing or invalid bearer token");
        assert_header(&r, "WWW-Authenticate", "Bearer");
        resp_free(&r);
        r = http_request(fx->port, "POST", "/api/agent/pause", wrong[i]);
        assert_error(&r, 401, "missing or invalid bearer token");
        resp_free(&r);
    }
    assert_int_equal(fake_writes(fx->fake), 0);
    assert_false(ah_state_has_event(fx->state));

    http_resp_t r = http_request(fx->port, "POST", "/api/cluster/pause",
                                 "Authorization: Bearer s3cret-token\r\n");
    assert_int_equal(r.status, 200);
    resp_free(&r);
    assert_int_equal(fake_writes(fx->fake), 1);

    r = http_request(fx->port, "GET", "/api/cluster/control-state", NULL);
    assert_int_equal(r.status, 200);
    resp_free(&r);
}

static void test_unknown_route_is_404_and_wrong_method_405(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    http_resp_t r = http_request(fx->port, "GET", "/nope", NULL);
    assert_error(&r, 404, "no route for GET /nope");
    resp_free(&r);
    r = http_request(fx->port, "GET", "/api/cluster/frobnicate", NULL);
    assert_error(&r, 404, "no route for GET /api/cluster/frobnicate");
    resp_free(&r);

    r = http_request(fx->port, "GET", "/api/cluster/pause", NULL);
    assert_error(&r, 405, "method GET not allowed on /api/cluster/pause");
    assert_header(&r, "Allow", "POST");
    resp_free(&r);
    r = http_request(fx->port, "POST", "/api/cluster/stats", NULL);
    assert_error(&r, 405, "method POST not allowed on /api/cluster/stats");
    assert_header(&r, "Allow", "GET");
    resp_free(&r);
    r = http_request(fx->port, "DELETE", "/healthz", NULL);
    assert_int_equal(r.status, 405);
    assert_header(&r, "Allow", "GET");
    resp_free(&r);
    assert_int_equal(fake_writes(fx->fake), 0);

    /* a long path is quoted truncated to 200 bytes, a quote in it escaped */
    char path[400];
    memset(path, 'a', sizeof(path));
    path[0] = '/';
    path[1] = '%';
    path[2] = '2';
    path[3] = '2';
    path[sizeof(path) - 1] = '\0';
    r = http_request(fx->port, "GET", path, NULL);
    assert_int_equal(r.status, 404);
    char expected[512];
    snprintf(expected, sizeof(expected),
             "{\"status\":\"error\",\"error\":\"no route for GET /\\\"%.198s\"}", path + 4);
    assert_string_equal(r.body, expected);
    resp_free(&r);
}

static void test_bad_parameters_are_400(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    sync_running(fx->state); /* local commands are refused while starting */
    size_t cap = 6000;
    char *target = malloc(cap);
    assert_non_null(target);

    int n = snprintf(target, cap, "/api/cluster/pause?reason=");
    memset(target + n, 'r', 5120);
    target[n + 5120] = '\0';
    http_resp_t r = http_request(fx->port, "POST", target, NULL);
    assert_error(&r, 400, "reason is too long: 5120 bytes (max 1024)");
    resp_free(&r);

    n = snprintf(target, cap, "/api/agent/pause?reason=");
    memset(target + n, 'r', 1025);
    target[n + 1025] = '\0';
    r = http_request(fx->port, "POST", target, NULL);
    assert_error(&r, 400, "reason is too long: 1025 bytes (max 1024)");
    resp_free(&r);

    target[n + 1024] = '\0'; /* exactly 1024 bytes is fine */
    r = http_request(fx->port, "POST", target, NULL);
    assert_int_equal(r.status, 200);
    resp_free(&r);
    ah_event_t ev;
    assert_true(ah_state_take_event(fx->state, &ev));
    assert_int_equal(strlen(ev.reason), 1024);

    r = http_request(fx->port, "POST", "/api/cluster/pause?reason=%ff", NULL);
    assert_error(&r, 400, "reason must be valid UTF-8 without NUL bytes");
    resp_free(&r);
    r = http_request(fx->port, "POST", "/api/cluster/pause?reason=ab%00cd", NULL);
    assert_error(&r, 400, "reason must be valid UTF-8 without NUL bytes");
    resp_free(&r);
    r = http_request(fx->port, "POST", "/api/cluster/pause?updated_by=%c3%28", NULL);
    assert_error(&r, 400, "updated_by must be valid UTF-8 without NUL bytes");
    resp_free(&r);
    r = http_request(fx->port, "POST", "/api/cluster/pause?updated_by=", NULL);
    assert_error(&r, 400, "updated_by must be 1 to 255 bytes (got 0)");
    resp_free(&r);
    n = snprintf(target, cap, "/api/cluster/pause?updated_by=");
    memset(target + n, 'u', 256);
    target[n + 256] = '\0';
    r = http_request(fx->port, "POST", target, NULL);
    assert_error(&r, 400, "updated_by must be 1 to 255 bytes (got 256)");
    resp_free(&r);
    assert_int_equal(fake_writes(fx->fake), 0);

    /* valid UTF-8 and escapes pass through, JSON-escaped on the way out */
    r = http_request(fx->port, "POST",
                     "/api/cluster/pause?reason=caf%C3%A9+%22q%22&updated_by=%C3%A9", NULL);
    assert_int_equal(r.status, 200);
    assert_contains(r.body, "\"reason\":\"caf\xC3\xA9 \\\"q\\\"\"");
    resp_free(&r);
    free(target);
}

static void test_huge_url_is_413_and_server_keeps_serving(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    const size_t sizes[] = {8193, 16 * 1024, 28 * 1024};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        char *target = malloc(sizes[i] + 1);
        assert_non_null(target);
        int n = snprintf(target, sizes[i], "/api/cluster/pause?reason=");
        memset(target + n, 'x', sizes[i] - (size_t)n);
        target[sizes[i]] = '\0';
        http_resp_t r = http_request(fx->port, "POST", target, NULL);
        assert_error(&r, 413, "request URL too large (max 8192 bytes)");
        resp_free(&r);
        free(target);

        r = http_request(fx->port, "GET", "/healthz", NULL);
        assert_int_equal(r.status, 200);
        resp_free(&r);
    }
    /* exactly at the limit is served */
    size_t size = 8192;
    char *target = malloc(size + 1);
    assert_non_null(target);
    memset(target, 'x', size);
    memcpy(target, "/healthz?x=", 11);
    target[size] = '\0';
    http_resp_t r = http_request(fx->port, "GET", target, NULL);
    assert_int_equal(r.status, 400); /* routed: its parameter is not one of the route's */
    assert_contains(r.body, "unknown query parameter 'x'");
    resp_free(&r);
    free(target);

    /* past the connection's memory pool (32 KiB) libmicrohttpd refuses the line itself (414) */
    const size_t over[] = {40 * 1024, 100 * 1024};
    for (size_t i = 0; i < sizeof(over) / sizeof(over[0]); i++) {
        target = malloc(over[i] + 1);
        assert_non_null(target);
        memset(target, 'x', over[i]);
        memcpy(target, "/healthz?x=", 11);
        target[over[i]] = '\0';
        r = http_request(fx->port, "GET", target, NULL);
        assert_int_equal(r.status, 414);
        resp_free(&r);
        free(target);
        r = http_request(fx->port, "GET", "/healthz", NULL);
        assert_int_equal(r.status, 200);
        resp_free(&r);
    }
    assert_int_equal(fake_writes(fx->fake), 0);
}

static void test_many_query_parameters_are_refused_promptly(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    sync_running(fx->state); /* local commands are refused while starting */
    const size_t sizes[] = {4000, 8000, 16 * 1024, 28 * 1024};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        char *target = malloc(sizes[i] + 1);
        assert_non_null(target);
        memset(target, '&', sizes[i]);
        memcpy(target, "/api/agent/pause?", 17);
        target[sizes[i]] = '\0';
        http_resp_t r = http_request(fx->port, "POST", target, NULL);
        if (sizes[i] > 8192) {
            assert_error(&r, 413, "request URL too large (max 8192 bytes)");
        } else {
            assert_error(&r, 400, "too many query parameters (max 64)");
        }
        resp_free(&r);
        free(target);
    }
    http_resp_t r = http_request(
        fx->port, "POST", "/api/agent/pause?reason&reason&reason&reason&updated_by=ok", NULL);
    assert_int_equal(r.status, 200);
    resp_free(&r);
    assert_false(fake_writes(fx->fake));
}

static void test_keep_alive_serves_pipelined_requests(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    const char *requests =
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        "GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        "HEAD /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        "GET /api/agent/state HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    http_resp_t r = http_raw(fx->port, requests, strlen(requests));
    assert_int_equal(r.status, 200);
    assert_contains(r.raw, "{\"status\":\"ok\",\"state\":\"starting\"}HTTP/1.1 404 Not Found\r\n");
    assert_contains(r.raw, "no route for GET /nope\"}HTTP/1.1 503 Service Unavailable\r\n");
    assert_contains(r.raw, "{\"agent_id\":\"agent-1\",");
    assert_null(strstr(r.raw, "\"not_ready\"")); /* HEAD: no body */
    resp_free(&r);
}

static void test_request_bodies_are_drained_and_bounded(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    sync_running(fx->state); /* local commands are refused while starting */
    char request[16384];
    char body[10000];
    memset(body, 'b', sizeof(body));

    /* a small body is drained and the next pipelined request on the connection is answered */
    int n = snprintf(
        request, sizeof(request),
        "POST /api/agent/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n%.100s"
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        body);
    http_resp_t r = http_raw(fx->port, request, (size_t)n);
    assert_int_equal(r.status, 200);
    assert_contains(r.body, "Pause requested for this agent");
    assert_contains(r.body, "{\"status\":\"ok\",\"state\":\"running\"}");
    resp_free(&r);

    /* announced too large: 413 at once */
    n = snprintf(request, sizeof(request),
                 "POST /api/agent/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 "Content-Length: 5000\r\n\r\n%.5000s",
                 body);
    r = http_raw(fx->port, request, (size_t)n);
    assert_error(&r, 413, "request body too large (max 4096 bytes)");
    resp_free(&r);

    /* chunked: measured while draining */
    n = snprintf(request, sizeof(request),
                 "POST /api/agent/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n1388\r\n%.5000s\r\n0\r\n\r\n",
                 body);
    r = http_raw(fx->port, request, (size_t)n);
    assert_error(&r, 413, "request body too large (max 4096 bytes)");
    resp_free(&r);
    n = snprintf(request, sizeof(request),
                 "POST /api/agent/resume HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n10\r\n%.16s\r\n0\r\n\r\n",
                 body);
    r = http_raw(fx->port, request, (size_t)n);
    assert_int_equal(r.status, 200);
    assert_contains(r.body, "Resume requested for this agent");
    resp_free(&r);

    /* garbage is refused without taking the server down */
    r = http_raw(fx->port, "\x01\x02 garbage\r\n\r\n", 14);
    assert_true(r.status == 0 || r.status >= 400);
    resp_free(&r);
    r = http_request(fx->port, "GET", "/healthz", NULL);
    assert_int_equal(r.status, 200);
    resp_free(&r);
}

static void test_readyz_follows_the_state(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    http_resp_t r = http_request(fx->port, "GET", "/readyz", NULL);
    assert_int_equal(r.status, 503);
    assert_string_equal(r.body, "{\"status\":\"not_ready\",\"state\":\"starting\",\"reason\":"
                                "\"starting (waiting for the control store)\"}");
    resp_free(&r);

    ah_store_status_t st = {.latency_ms = -1};
    ah_strlcpy(st.last_error, "connection refused", sizeof(st.last_error));
    ah_state_set_store_status(fx->state, &st);
    r = http_request(fx->port, "GET", "/readyz", NULL);
    assert_int_equal(r.status, 503);
    assert_contains(r.body, "\"reason\":\"starting (waiting for the control store: connection "
                            "refused)\"}");
    resp_free(&r);

    offer_cluster(fx->state, AH_CMD_PAUSE, 3, ah_now_us(), "maintenance", "ops");
    worker_apply(fx->state);
    r = http_request(fx->port, "GET", "/readyz", NULL);
    assert_int_equal(r.status, 503);
    assert_string_equal(r.body, "{\"status\":\"not_ready\",\"state\":\"paused\",\"reason\":"
                                "\"paused by cluster command v3 (maintenance)\"}");
    resp_free(&r);

    offer_cluster(fx->state, AH_CMD_RUNNING, 4, ah_now_us(), "", "ops");
    worker_apply(fx->state);
    r = http_request(fx->port, "GET", "/readyz", NULL);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "{\"status\":\"ready\",\"state\":\"running\"}");
    assert_header(&r, "Cache-Control", "no-store");
    resp_free(&r);

    ah_state_offer_local(fx->state, AH_CMD_PAUSE, AH_SOURCE_LOCAL, "", "api");
    worker_apply(fx->state);
    r = http_request(fx->port, "GET", "/readyz", NULL);
    assert_int_equal(r.status, 503);
    assert_contains(r.body, "\"reason\":\"paused locally\"}");
    resp_free(&r);

    ah_state_offer_local(fx->state, AH_CMD_SHUTDOWN, AH_SOURCE_SIGNAL, "", "signal");
    worker_apply(fx->state);
    r = http_request(fx->port, "GET", "/readyz", NULL);
    assert_int_equal(r.status, 503);
    assert_string_equal(r.body, "{\"status\":\"not_ready\",\"state\":\"stopping\",\"reason\":"
                                "\"stopping\"}");
    resp_free(&r);
}

static void test_healthz_ok_unless_wedged(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    http_resp_t r = http_request(fx->port, "GET", "/healthz", NULL);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "{\"status\":\"ok\",\"state\":\"starting\"}");
    resp_free(&r);

    ah_state_call_begin_at(fx->state, ah_mono_us());
    ah_state_mark_overrun(fx->state);
    r = http_request(fx->port, "GET", "/healthz", NULL);
    assert_int_equal(r.status, 503);
    assert_contains(r.body, "{\"status\":\"error\",\"error\":\"wedged: a Lua call has been "
                            "running for ");
    assert_contains(r.body, "s, over BATCH_TIMEOUT (300s)\"}");
    resp_free(&r);

    ah_state_call_end(fx->state);
    r = http_request(fx->port, "GET", "/healthz", NULL);
    assert_int_equal(r.status, 200);
    resp_free(&r);
}

static void test_metrics_exposes_every_family(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    offer_cluster(fx->state, AH_CMD_RUNNING, 5, ah_now_us(), "", "api");
    worker_apply(fx->state);
    ah_state_count_batch(fx->state, true);
    http_resp_t r = http_request(fx->port, "GET", "/metrics", NULL);
    assert_int_equal(r.status, 200);
    assert_header(&r, "Content-Type", "text/plain; version=0.0.4");
    assert_header(&r, "Cache-Control", "no-store");
    const char *families[] = {
        "agenthost_batches_total",
        "agenthost_batch_errors_total",
        "agenthost_batch_overruns_total",
        "agenthost_hook_errors_total",
        "agenthost_state",
        "agenthost_control_version",
        "agenthost_applied_version",
        "agenthost_commands_applied_total",
        "agenthost_store_connected",
        "agenthost_store_reconnects_total",
        "agenthost_stream_resumes_total",
        "agenthost_polls_total",
        "agenthost_control_lag_seconds",
        "agenthost_uptime_seconds",
    };
    for (size_t i = 0; i < sizeof(families) / sizeof(families[0]); i++) {
        char line[128];
        snprintf(line, sizeof(line), "# TYPE %s ", families[i]);
        assert_contains(r.body, line);
        snprintf(line, sizeof(line), "# HELP %s ", families[i]);
        assert_contains(r.body, line);
    }
    assert_contains(r.body, "\nagenthost_batches_total 1\n");
    assert_contains(r.body, "\nagenthost_batch_errors_total 0\n");
    assert_contains(r.body, "\nagenthost_hook_errors_total 0\n");
    assert_contains(r.body, "\nagenthost_state{state=\"starting\"} 0\n");
    assert_contains(r.body, "\nagenthost_state{state=\"running\"} 1\n");
    assert_contains(r.body, "\nagenthost_state{state=\"stopped\"} 0\n");
    assert_contains(r.body, "\nagenthost_control_version 5\n");
    assert_contains(r.body, "\nagenthost_applied_version 5\n");
    assert_contains(r.body, "\nagenthost_commands_applied_total 1\n");
    resp_free(&r);
}

typedef struct hammer_s {
    int port;
    int ok;
} hammer_t;

static void *hammer(void *arg)
{
    hammer_t *h = arg;
    const char *targets[] = {"/api/cluster/control-state", "/api/agent/state", "/metrics",
                             "/readyz", "/api/mongo/status"};
    for (int i = 0; i < 100; i++) {
        http_resp_t r = http_request(h->port, "GET", targets[i % 5], NULL);
        if (r.status == 200 || r.status == 503) {
            h->ok++;
        }
        resp_free(&r);
    }
    return NULL;
}

static void test_concurrent_clients_are_all_answered(void **state)
{
    fixture_t *fx = *state;
    start_with_fake(fx);
    offer_cluster(fx->state, AH_CMD_RUNNING, 1, ah_now_us(), "", "api");
    pthread_t threads[4];
    hammer_t h[4];
    for (int i = 0; i < 4; i++) {
        h[i] = (hammer_t){.port = fx->port};
        assert_int_equal(pthread_create(&threads[i], NULL, hammer, &h[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(threads[i], NULL);
        assert_int_equal(h[i].ok, 100);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_start_reports_port_and_port_in_use_fails, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_cluster_pause_and_resume_through_embedded_store, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_cluster_shutdown_propagation_in_change_streams_mode,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_control_state_fields_in_documented_order, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_control_state_unknown_yet_is_503, setup, teardown),
        cmocka_unit_test_setup_teardown(test_history_limit_validation, setup, teardown),
        cmocka_unit_test_setup_teardown(test_store_unavailable_is_503_and_writes_nothing, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_distributed_control_disabled_is_503, setup, teardown),
        cmocka_unit_test_setup_teardown(test_agent_commands_affect_this_pod, setup, teardown),
        cmocka_unit_test_setup_teardown(test_agent_state_fields, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mongo_status_fields, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bearer_token_guards_posts_only, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_route_is_404_and_wrong_method_405, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_bad_parameters_are_400, setup, teardown),
        cmocka_unit_test_setup_teardown(test_huge_url_is_413_and_server_keeps_serving, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_many_query_parameters_are_refused_promptly, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_keep_alive_serves_pipelined_requests, setup, teardown),
        cmocka_unit_test_setup_teardown(test_request_bodies_are_drained_and_bounded, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_readyz_follows_the_state, setup, teardown),
        cmocka_unit_test_setup_teardown(test_healthz_ok_unless_wedged, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metrics_exposes_every_family, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_clients_are_all_answered, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
