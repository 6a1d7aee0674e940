/* libFuzzer target: HTTP request handling through the real server. Once per process it starts
 * the API exactly as the host wires it (core/ah_http.c on libmicrohttpd, the handlers of
 * core/ah_http_handlers.c, a state object, an embedded SQLite store in a temporary directory,
 * a metrics registry, a bearer token) on 127.0.0.1, port 0, plus a stand-in for the Lua worker
 * that applies commands and answers reloads. Each input is written as raw bytes (method, path,
 * query, headers, body: whatever the fuzzer makes of them) on a new connection, whose write
 * side is then shut down.
 *
 * Checked for each input: a complete request is answered (or its connection closed) within
 * IO_DEADLINE_S (no hang); an answer starts with a status line; no 500; a JSON answer to a non-HEAD
 * request carries a body of exactly Content-Length bytes that is valid JSON
 * (tests/fuzz/fuzz_json_check.h). Memory errors and leaks are AddressSanitizer's to find, in the
 * server's threads too. */
#define _GNU_SOURCE
#include "ah_http.h"
#include "ah_log.h"
#include "ah_metrics.h"
#include "ah_state.h"
#include "ah_store.h"
#include "fuzz_json_check.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define IO_DEADLINE_S 5       /* the whole exchange; reloads are answered within ~50 ms */
#define INCOMPLETE_WAIT_S 0.1 /* how long an incomplete request is given to draw an answer */
#define RESPONSE_MAX (1 << 20)

typedef struct {
    ah_config_t cfg;
    char dir[64];
    char path[128];
    ah_state_t *state;
    ah_store_t *store;
    ah_metrics_t *metrics;
    ah_http_t *http;
    int port;
    pthread_t worker;
    atomic_bool stop;
} server_t;

static server_t server;

/* The Lua worker's part, without Lua: applies pending commands; a reload succeeds or fails
 * (every third) at once. */
static void *worker_main(void *arg)
{
    (void)arg;
    unsigned reloads = 0;
    while (!atomic_load(&server.stop)) {
        ah_state_wait(server.state, 0.02);
        ah_event_t ev;
        while (ah_state_take_event(server.state, &ev)) {
            ah_run_state_t from, to;
            ah_hook_t hook;
            ah_state_apply(server.state, &ev, &from, &to, &hook);
        }
        uint64_t ticket = ah_state_take_reload(server.state);
        if (ticket != 0) {
            bool ok = ++reloads % 3 != 0;
            ah_state_finish_reload(server.state, ticket, ok, ok ? NULL : "script.lua:1: boom");
        }
    }
    return NULL;
}

static void remove_files(void)
{
    const char *suffixes[] = {"", "-wal", "-shm", "-journal"};
    char file[160];
    for (size_t i = 0; i < sizeof(suffixes) / sizeof(suffixes[0]); i++) {
        snprintf(file, sizeof(file), "%s%s", server.path, suffixes[i]);
        unlink(file);
    }
    rmdir(server.dir);
}

/* At exit: everything stopped and freed in reverse order (so LeakSanitizer sees no leak). */
static void stop_server(void)
{
    atomic_store(&server.stop, true);
    pthread_join(server.worker, NULL);
    ah_http_stop(server.http, 5);
    ah_store_close(server.store);
    ah_metrics_free(server.metrics);
    ah_state_free(server.state);
    ah_config_free(&server.cfg);
    remove_files();
}

static void set(const char *name, const char *value)
{
    char err[AH_ERRLEN];
    if (ah_config_set(&server.cfg, name, value, err, sizeof(err)) != AH_OK) {
        fprintf(stderr, "fuzz_http: %s\n", err);
        abort();
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    ah_log_setup(AH_LOG_ERROR, false,
                 "fuzz-agent"); /* the handlers' INFO lines would drown the fuzzer's */
    ah_config_defaults(&server.cfg);
    set("HTTP_BIND", "127.0.0.1");
    set("HTTP_PORT", "0");
    set("AGENT_ID", "fuzz-agent");
    set("AGENT_API_TOKEN", "fuzz-token");
    snprintf(server.dir, sizeof(server.dir), "/tmp/ah_fuzz_http_XXXXXX");
    char err[AH_ERRLEN] = "";
    if (mkdtemp(server.dir) == NULL) {
        perror("fuzz_http: mkdtemp");
        abort();
    }
    snprintf(server.path, sizeof(server.path), "%s/state.db", server.dir);
    set("AGENTHOST_STATE", server.path);
    server.state = ah_state_new();
    server.metrics = ah_metrics_new();
    server.store = ah_store_sqlite_open(server.path, 0.05, err, sizeof(err));
    if (server.state == NULL || server.metrics == NULL || server.store == NULL) {
        fprintf(stderr, "fuzz_http: setup: %s\n", err);
        abort();
    }
    ah_control_t doc;
    if (ah_store_read(server.store, &doc, err, sizeof(err)) == AH_OK) {
        ah_state_offer_cluster(server.state, &doc); /* the agent leaves "starting" */
    }
    server.http =
        ah_http_start(&server.cfg, server.state, server.store, server.metrics, err, sizeof(err));
    if (server.http == NULL || pthread_create(&server.worker, NULL, worker_main, NULL) != 0) {
        fprintf(stderr, "fuzz_http: start: %s\n", err);
        abort();
    }
    server.port = ah_http_port(server.http);
    atexit(stop_server);
    return 0;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void fail(const char *what, const char *response, size_t len)
{
    fprintf(stderr, "fuzz_http: %s\n--- response (%zu bytes) ---\n%.*s\n", what, len,
            (int)(len < 2000 ? len : 2000), response);
    abort();
}

/* True once buf[0..len) holds the first final (non-1xx) answer whole: its headers and, unless
 * it answers a HEAD, Content-Length bytes of body. *start is set to it. */
static bool answer_complete(const char *buf, size_t len, bool head, const char **start)
{
    const char *p = buf;
    for (;;) {
        const char *end = memmem(p, len - (size_t)(p - buf), "\r\n\r\n", 4);
        if (end == NULL) {
            return false;
        }
        if (len - (size_t)(p - buf) >= 10 && strncmp(p, "HTTP/1.", 7) == 0 && p[9] == '1') {
            p = end + 4; /* 100 Continue: the answer follows */
            continue;
        }
        *start = p;
        if (head) {
            return true;
        }
        const char *length = strcasestr(p, "\r\nContent-Length:");
        size_t body = length != NULL && length < end ? strtoul(length + 17, NULL, 10) : 0;
        return (size_t)(buf + len - (end + 4)) >= body;
    }
}

/* True if data holds a whole first request (after any empty lines, which a server skips): its
 * head ends with an empty line (CRLF) and, when
 * it announces a Content-Length, that many bytes follow. Such a request must be answered (or its
 * connection closed) in time. For anything else the server may rightly wait for the rest (up to
 * its 30 s connection timeout: libmicrohttpd does not notice every half-close). */
static bool request_complete(const uint8_t *data, size_t size)
{
    const char *text = (const char *)data;
    while (size > 0 && (*text == '\r' || *text == '\n')) { /* empty lines before a request */
        text++;
        size--;
    }
    const char *end = memmem(text, size, "\r\n\r\n", 4);
    if (end == NULL) {
        return false;
    }
    size_t head = (size_t)(end - text) + 4;
    char *copy = strndup(text, head); /* the head as a C string (stops at a NUL: then "no") */
    if (copy == NULL || strlen(copy) != head) {
        free(copy);
        return false;
    }
    bool complete = strcasestr(copy, "\nTransfer-Encoding:") == NULL;
    const char *length = strcasestr(copy, "\nContent-Length:");
    if (complete && length != NULL) {
        char *rest = NULL;
        unsigned long long n = strtoull(length + 16, &rest, 10);
        complete = rest != length + 16 && n <= size - head;
    }
    free(copy);
    return complete;
}

/* Sends the request and shuts down the write side, then reads until the first answer is
 * complete or the server closes (libmicrohttpd keeps a half-closed keep-alive connection open).
 * Returns the response bytes (malloc'd, NUL-terminated) and their count; aborts past the
 * deadline. */
static char *exchange(const uint8_t *data, size_t size, size_t *len)
{
    bool head = size >= 5 && memcmp(data, "HEAD ", 5) == 0;
    bool must_answer = request_complete(data, size);
    const char *start = NULL;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        perror("fuzz_http: socket");
        abort();
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)server.port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0 && errno != EINPROGRESS) {
        perror("fuzz_http: connect");
        abort();
    }
    size_t cap = 4096;
    char *buf = malloc(cap);
    size_t got = 0;
    size_t sent = 0;
    bool write_open = true;
    double deadline = now_s() + (must_answer ? IO_DEADLINE_S : INCOMPLETE_WAIT_S);
    for (;;) {
        if (write_open && sent == size) {
            shutdown(fd, SHUT_WR);
            write_open = false;
        }
        struct pollfd pfd = {.fd = fd, .events = POLLIN | (write_open ? POLLOUT : 0)};
        double left = deadline - now_s();
        if (left <= 0) {
            buf[got] = '\0';
            if (must_answer) {
                fail("no answer and no close within the deadline (hang)", buf, got);
            }
            break; /* an incomplete request: the server waits for the rest */
        }
        if (poll(&pfd, 1, (int)(left * 1000) + 1) < 0 && errno != EINTR) {
            perror("fuzz_http: poll");
            abort();
        }
        if (write_open && (pfd.revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t n = send(fd, data + sent, size - sent, MSG_NOSIGNAL);
            if (n > 0) {
                sent += (size_t)n;
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                write_open = false; /* the server answered and closed before reading it all */
            }
        }
        if (pfd.revents & (POLLIN | POLLERR | POLLHUP)) {
            if (cap - got < 2048) {
                if (cap >= RESPONSE_MAX) {
                    fail("answer larger than 1 MiB", buf, got);
                }
                cap *= 2;
                buf = realloc(buf, cap);
            }
            ssize_t n = recv(fd, buf + got, cap - got - 1, 0);
            if (n > 0) {
                got += (size_t)n;
                buf[got] = '\0';
                if (answer_complete(buf, got, head, &start)) {
                    break;
                }
            } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
                break; /* closed (or reset: keep what came) */
            }
        }
    }
    close(fd);
    buf[got] = '\0';
    *len = got;
    return buf;
}

/* Checks the first answer in response. */
static void check_answer(const uint8_t *request, size_t request_len, const char *response,
                         size_t len)
{
    if (len == 0) {
        return; /* closed without an answer: libmicrohttpd's choice for garbage */
    }
    const char *first = strstr(response, "\r\n\r\n");
    while (len >= 10 && strncmp(response, "HTTP/1.", 7) == 0 && response[9] == '1' &&
           first != NULL) { /* skip 100 Continue */
        len -= (size_t)(first + 4 - response);
        response = first + 4;
        first = strstr(response, "\r\n\r\n");
    }
    if (len == 0) {
        return;
    }
    int status = 0;
    if (len < 12 || strncmp(response, "HTTP/1.", 7) != 0 ||
        sscanf(response + 9, "%3d", &status) != 1 || status < 100 || status > 599) {
        fail("no status line", response, len);
    }
    if (status >= 500 && status != 503 && status != 505) {
        fail("server error", response, len);
    }
    const char *end = strstr(response, "\r\n\r\n");
    if (end == NULL) {
        fail("headers not terminated", response, len);
    }
    bool head = request_len >= 5 && memcmp(request, "HEAD ", 5) == 0;
    const char *type = strcasestr(response, "\r\nContent-Type: application/json");
    if (head || type == NULL || type > end) {
        return;
    }
    const char *length = strcasestr(response, "\r\nContent-Length:");
    if (length == NULL || length > end) {
        fail("JSON answer without Content-Length", response, len);
    }
    size_t body_len = strtoul(length + 17, NULL, 10);
    const char *body = end + 4;
    if ((size_t)(response + len - body) < body_len) {
        fail("JSON body shorter than its Content-Length", response, len);
    }
    if (!valid_json(body, body_len)) {
        fail("JSON body is not valid JSON", response, len);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t len = 0;
    char *response = exchange(data, size, &len);
    check_answer(data, size, response, len);
    free(response);
    return 0;
}
