/* Unit tests of parked requests (core/ah_http_park.c) on a libmicrohttpd daemon of the test's own,
 * whose only handler parks every request: the first answer of a parked request wins, a second one
 * is refused and changes nothing, and the requests still parked stay linked so that stopping the
 * parking answers each of them 503. Clients are real sockets (one thread each). */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "ah_common.h"
#include "ah_http_park.h"
#include "ah_state.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define CLIENTS 3
#define IO_DEADLINE_S 10 /* per recv: a request never answered fails the test, never hangs it */
#define PARK_TIMEOUT_S 60.0

typedef struct server_s {
    ah_http_parking_t *parking;
    struct MHD_Daemon *daemon;
    int port;
    pthread_mutex_t lock;
    http_park_t *parks[CLIENTS]; /* the caller's reference of each parked request */
} server_t;

/* The access handler: GET /park/<i> is parked (no check: only an answer or the deadline ends
 * it); the resumed request sends its answer. */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **req_cls)
{
    server_t *srv = cls;
    (void)method;
    (void)version;
    (void)upload;
    (void)upload_size;
    http_request_t *req = *req_cls;
    if (req != NULL && req->park != NULL) {
        return ah_http_request_send_answer(conn, req);
    }
    int i = -1;
    if (sscanf(url, "/park/%d", &i) != 1 || i < 0 || i >= CLIENTS) {
        return MHD_NO;
    }
    http_reply_t reply;
    ah_http_reply_init(&reply);
    http_park_t *park =
        ah_http_park(srv->parking, conn, req_cls, &reply, PARK_TIMEOUT_S, NULL, NULL, NULL);
    if (park == NULL) {
        return ah_http_reply_send(conn, &reply);
    }
    pthread_mutex_lock(&srv->lock);
    srv->parks[i] = park;
    pthread_mutex_unlock(&srv->lock);
    return MHD_YES;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)conn;
    (void)toe;
    ah_http_request_done(req_cls);
}

typedef struct client_s {
    int port;
    int index;
    pthread_t thread;
    int status; /* 0: no status line */
    char answer[1024];
} client_t;

/* GET /park/<index> with Connection: close; reads the answer until the server closes. */
static void *client_main(void *arg)
{
    client_t *c = arg;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return NULL;
    }
    struct timeval tv = {.tv_sec = IO_DEADLINE_S};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)c->port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        close(fd);
        return NULL;
    }
    char request[128];
    int n =
        snprintf(request, sizeof(request),
                 "GET /park/%d HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", c->index);
    if (send(fd, request, (size_t)n, MSG_NOSIGNAL) != n) {
        close(fd);
        return NULL;
    }
    size_t len = 0;
    for (;;) {
        ssize_t got = recv(fd, c->answer + len, sizeof(c->answer) - 1 - len, 0);
        if (got < 0 && errno == EINTR) {
            continue;
        }
        if (got <= 0) {
            break;
        }
        len += (size_t)got;
        if (len == sizeof(c->answer) - 1) {
            break;
        }
    }
    close(fd);
    c->answer[len] = '\0';
    sscanf(c->answer, "HTTP/1.%*d %d", &c->status);
    return NULL;
}

static int parked_count(server_t *srv)
{
    int n = 0;
    pthread_mutex_lock(&srv->lock);
    for (int i = 0; i < CLIENTS; i++) {
        n += srv->parks[i] != NULL;
    }
    pthread_mutex_unlock(&srv->lock);
    return n;
}

static void test_second_answer_is_refused_and_the_others_get_503_at_stop(void **unused)
{
    (void)unused;
    server_t srv = {0};
    char err[256] = "";
    pthread_mutex_init(&srv.lock, NULL);
    ah_state_t *state = ah_state_new();
    assert_non_null(state);
    srv.parking = ah_http_park_start(state, err, sizeof(err));
    assert_non_null(srv.parking);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    srv.daemon = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ITC | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_POLL, 0,
        NULL, NULL, on_request, &srv, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, &srv, MHD_OPTION_END);
    assert_non_null(srv.daemon);
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(srv.daemon, MHD_DAEMON_INFO_BIND_PORT);
    assert_non_null(info);
    srv.port = info->port;

    client_t clients[CLIENTS];
    for (int i = 0; i < CLIENTS; i++) {
        clients[i] = (client_t){.port = srv.port, .index = i};
        assert_int_equal(pthread_create(&clients[i].thread, NULL, client_main, &clients[i]), 0);
    }
    int64_t deadline = ah_mono_us() + 20 * 1000000;
    while (parked_count(&srv) < CLIENTS && ah_mono_us() < deadline) {
        ah_sleep(0.01);
    }
    assert_int_equal(parked_count(&srv), CLIENTS);

    /* The middle request (linked between the two others) is answered twice. */
    http_reply_t first;
    ah_http_reply_init(&first);
    ah_json_open(&first.body);
    ah_json_str(&first.body, "answer", "first");
    ah_json_close(&first.body);
    assert_true(ah_http_park_answer(srv.parks[1], &first));
    http_reply_t second;
    ah_http_reply_init(&second);
    ah_http_reply_error(&second, 409, "second");
    assert_false(ah_http_park_answer(srv.parks[1], &second));
    assert_int_equal(pthread_join(clients[1].thread, NULL), 0);
    assert_int_equal(clients[1].status, 200);
    assert_non_null(strstr(clients[1].answer, "{\"answer\":\"first\"}"));
    assert_null(strstr(clients[1].answer, "second"));

    /* The two others are still parked, and the stop answers both. */
    assert_int_equal(ah_http_park_stop(srv.parking, 5.0), AH_OK);
    for (int i = 0; i < CLIENTS; i += 2) {
        assert_int_equal(pthread_join(clients[i].thread, NULL), 0);
        if (clients[i].status != 503 ||
            strstr(clients[i].answer, "the agent is shutting down") == NULL) {
            fail_msg("request %d: expected a 503 at stop, got:\n%s", i, clients[i].answer);
        }
    }
    for (int i = 0; i < CLIENTS; i++) {
        ah_http_park_release(srv.parks[i]);
    }
    MHD_stop_daemon(srv.daemon);
    ah_http_park_free(srv.parking);
    ah_state_free(state);
    pthread_mutex_destroy(&srv.lock);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_second_answer_is_refused_and_the_others_get_503_at_stop),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
