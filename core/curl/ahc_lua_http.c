/* agent.http's C half (ahc_lua_http_open, behind ah_lua_http_open in ah_curl.h): HTTP requests on
 * libcurl's multi interface, driven by the Lua worker's libuv loop (curl's socket and timer
 * callbacks: a uv_poll_t per socket, one uv_timer_t). lua/agent_http.lua shapes the public
 * functions (request, get, post); see docs/LUA.md. Threads: the Lua worker thread only.
 *
 * One client per Lua state (a full userdata kept in the
 * registry): a curl multi handle whose sockets are watched by uv_poll_t handles and whose timeout
 * is one uv_timer_t, all on the state's loop (ah_lua_loop). A request is a transfer (a full
 * userdata "agent.http.transfer" owning the easy handle and the buffers): core.start() validates
 * the options (misuse raises before anything is allocated) and adds it to the multi handle,
 * core.wait() suspends the task until curl reports it done (ah_lua_op_wait), core.result() builds
 * the response table inside the task, under the script's memory limit. A cancelled wait removes
 * the easy handle from the multi handle at once.
 *
 * Lifetimes: everything is released by __gc, in any order when the state closes: a transfer
 * removes itself from its client; a client detaches its remaining transfers, cleans up the multi
 * handle and closes its handles (their memory is freed in the close callbacks, which the state's
 * loop runs before it closes). */
#include "ahc.h"

#include "ah_common.h"
#include "ah_json.h"
#include "ah_lua.h"

#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <curl/curl.h>
#include <lauxlib.h>
#include <lua.h>
#include <uv.h>

#define TRANSFER_META "agent.http.transfer"
#define CLIENT_META "agent.http.client"
#define DEFAULT_TIMEOUT 30.0
#define DEFAULT_CONNECT_TIMEOUT 10.0
#define DEFAULT_MAX_BODY (16.0 * 1024 * 1024)
#define MAX_REDIRECTS 10
#define MAX_HEADER_BYTES (256 * 1024)
#define MAX_IDLE_CONNECTIONS 256

/* Registry key of this state's client. */
static const char registry_key_client = 'c';

typedef struct client_s client_t;
typedef struct transfer_s transfer_t;

/* What the loop watches for when curl wants to read: readable, and the peer's end of stream
 * (EPOLLRDHUP), so that a report of a socket readable also says whether the server had closed its
 * side by then. */
#define READ_WATCH (UV_READABLE | UV_DISCONNECT)

/* How old (ms, the loop's clock) the loop's last look at the sockets may be for curl_poll to
 * answer a liveness check from it. */
#define LOOP_VIEW_MAX_AGE_MS 5

/* A socket curl asked us to watch. It stays while curl keeps the connection idle in its cache,
 * so a reused connection costs no new handle; it is closed when curl closes the socket
 * (CURLOPT_CLOSESOCKETFUNCTION) or the client goes. Freed in its close callback.
 *
 * An idle connection keeps its read watch armed: the next request on it asks for CURL_POLL_IN
 * again, and an unchanged watch costs no epoll_ctl (libuv re-registers the fd on every
 * uv_poll_start after a stop); it is unreferenced meanwhile, so it keeps no loop alive. If an idle
 * socket turns readable (the server closed it, or sent
 * something unasked), the watch is stopped then; curl finds the connection dead when it checks
 * it before a reuse (libc's poll: curl_poll), and closes it. */
typedef struct socket_watch_s {
    uv_poll_t poll;
    curl_socket_t fd;
    client_t *client;
    int events;          /* READ_WATCH | UV_WRITABLE being polled, 0 when stopped */
    bool idle;           /* curl removed it (CURL_POLL_REMOVE): not curl's to hear of */
    uint64_t checked_in; /* client->actions when its liveness was last answered "not readable" */
    /* The loop's last report of this socket readable carried no UV_DISCONNECT: the server had
     * not closed its side at that epoll_wait, and the watch (READ_WATCH) has stayed registered
     * since, so every later epoll_wait would have reported a close. Cleared by any other report,
     * a change of the watch, and curl taking the idle connection again (its next response may
     * be read without the loop). */
    bool seen_open;
    struct socket_watch_s *next; /* client->sockets */
} socket_watch_t;

/* Transfers kept for the next requests, each with its easy handle as the last request left it. */
#define IDLE_TRANSFERS_MAX 128
/* A pooled transfer keeps its response buffers up to this size (a large body is not kept). */
#define KEPT_BUFFER_BYTES (64 * 1024)

struct client_s {
    CURLM *multi;
    uv_loop_t *loop;        /* the Lua state's (ah_lua_loop) */
    uv_timer_t timer;       /* curl's timeout; the client is freed in its close callback */
    uint64_t actions;       /* curl_multi_socket_action calls made so far (curl_poll) */
    uint64_t looked_ms;     /* uv_now when the loop last reported a socket (its epoll_wait had
                               just returned: libuv updates its clock then) */
    bool from_timer;        /* curl acts from the timer: no epoll batch is being dispatched */
    socket_watch_t **by_fd; /* the watch of each socket, indexed by descriptor (curl_poll) */
    int by_fd_len;
    transfer_t *transfers;   /* the transfers scripts hold (started, not yet released) */
    socket_watch_t *sockets; /* watched sockets, active or idle */
    transfer_t *idle[IDLE_TRANSFERS_MAX];
    int idle_count;
    /* The request header list of a request that gives no headers: "Expect:" only (shared by
     * every transfer, so such a request builds no list). */
    struct curl_slist *default_headers;
    /* The proxy variables, read once when the client is created (curl would read five of them
     * per request). NULL: curl reads the environment itself (see proxy_for). */
    char *proxy_http;  /* http_proxy, else all_proxy/ALL_PROXY; "" for none */
    char *proxy_https; /* https_proxy/HTTPS_PROXY, else all_proxy/ALL_PROXY; "" for none */
    char *no_proxy;    /* no_proxy/NO_PROXY; "" for none */
};

/* The options a transfer's easy handle was last given (see apply_options): a request on a pooled
 * transfer sets only the ones that differ, and resets the handle (curl_easy_reset) when its
 * "shape" differs (method, body or not, ca_file, proxy choice), since those cannot all be set
 * back to curl's defaults one by one, and after a request that sent more than one request (a
 * retry or a redirect: curl counts an easy handle's retries until it is reset). */
typedef struct {
    bool shaped;  /* false: the next request starts from curl's defaults (a reset if used) */
    bool used;    /* the handle has been given a request's options */
    char *method; /* "GET", "HEAD", "POST", or a custom method (owned) */
    bool has_body;
    char *ca_file;     /* owned; NULL: the system's CA store */
    const char *proxy; /* client->proxy_http / proxy_https, or NULL: curl reads the environment */
    char *url;         /* the URL t->url_handle holds and the handle uses (owned); NULL: none */
    const struct curl_slist *headers;
    long timeout_ms;
    long connect_timeout_ms;
    curl_off_t max_filesize;
    bool follow;
    bool verify;
} applied_t;

/* One request. Owned by its Lua userdata ("agent.http.transfer") while the script holds it, then
 * kept by its client for the next request (idle), or freed. */
struct transfer_s {
    ah_lua_op_t op; /* the task's wait */
    client_t *client;
    CURL *easy;
    CURLU *url_handle;              /* the parsed URL given to the easy handle (CURLOPT_CURLU) */
    struct curl_slist *own_headers; /* this request's header list, or NULL (default_headers) */
    transfer_t *prev, *next;        /* client->transfers while a script holds it */
    bool in_multi;
    bool done;
    CURLcode result;
    bool too_large;
    size_t max_body;
    ah_buf_t body;
    ah_buf_t headers; /* header lines of the last response ("HTTP/..." starts a new one) */
    applied_t applied;
    int requests_sent; /* by this transfer: more than one after a redirect or a retry */
    char error[CURL_ERROR_SIZE];
};

/* ---- process-wide ------------------------------------------------------------------------ */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_result;

static void curl_init_once(void)
{
    curl_init_result = curl_global_init(CURL_GLOBAL_DEFAULT);
}

int ahc_global_init(void)
{
    pthread_once(&curl_once, curl_init_once);
    return curl_init_result == CURLE_OK ? AH_OK : AH_EIO;
}

/* ---- transfers --------------------------------------------------------------------------- */

/* Takes t out of the multi handle (curl stops it) if it is there. */
static void transfer_unlink(transfer_t *t)
{
    if (!t->in_multi) {
        return;
    }
    curl_multi_remove_handle(t->client->multi, t->easy);
    t->in_multi = false;
}

/* Takes t off its client's list of the transfers scripts hold. */
static void transfer_detach(transfer_t *t)
{
    client_t *c = t->client;
    if (t->prev != NULL) {
        t->prev->next = t->next;
    } else if (c != NULL && c->transfers == t) {
        c->transfers = t->next;
    }
    if (t->next != NULL) {
        t->next->prev = t->prev;
    }
    t->prev = t->next = NULL;
}

/* ah_lua_op_t.cancel: the task stopped waiting (BATCH_TIMEOUT, shutdown): stop the transfer. */
static void transfer_cancel(ah_lua_op_t *op)
{
    transfer_t *t = (transfer_t *)op;
    transfer_unlink(t);
}

/* Frees a transfer and its easy handle (not in the multi handle any more). */
static void transfer_destroy(transfer_t *t)
{
    if (t->easy != NULL) {
        curl_easy_cleanup(t->easy);
    }
    curl_url_cleanup(t->url_handle); /* after the easy handle that used it */
    curl_slist_free_all(t->own_headers);
    free(t->applied.method);
    free(t->applied.ca_file);
    free(t->applied.url);
    ah_buf_free(&t->body);
    ah_buf_free(&t->headers);
    free(t);
}

/* Empties a buffer for the next request: small ones keep their memory. */
static void buf_clear(ah_buf_t *b)
{
    if (b->cap > KEPT_BUFFER_BYTES || b->failed) {
        ah_buf_free(b);
    } else {
        b->len = 0;
    }
}

/* The script is done with t: it goes back to its client's idle transfers, or is freed (its
 * client is gone or has enough). */
static void transfer_free(transfer_t *t)
{
    transfer_unlink(t);
    transfer_detach(t);
    client_t *c = t->client;
    if (c == NULL || c->idle_count >= IDLE_TRANSFERS_MAX || t->easy == NULL) {
        transfer_destroy(t);
        return;
    }
    if (t->own_headers != NULL) {
        /* the handle must not keep a pointer to a freed list */
        curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, c->default_headers);
        t->applied.headers = c->default_headers;
        curl_slist_free_all(t->own_headers);
        t->own_headers = NULL;
    }
    if (t->requests_sent > 1) {
        /* curl counts the retries of an easy handle ("Connection died, retrying a fresh
         * connect", at most 5) until curl_easy_reset: after a retry (or a redirect) the next
         * request resets the handle, so that every request has curl's 5 retries, as when each
         * request had a new handle */
        t->applied.shaped = false;
    }
    buf_clear(&t->body);
    buf_clear(&t->headers);
    c->idle[c->idle_count++] = t;
}

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    transfer_t *t = userdata;
    size_t n = size * nmemb;
    if (t->body.len + n > t->max_body) {
        t->too_large = true;
        return 0; /* curl stops with CURLE_WRITE_ERROR */
    }
    ah_buf_append(&t->body, ptr, n);
    return ah_buf_ok(&t->body) ? n : 0;
}

static size_t on_header(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    transfer_t *t = userdata;
    size_t n = size * nmemb;
    if (n >= 5 && memcmp(ptr, "HTTP/", 5) == 0) {
        t->headers.len = 0; /* a new response (after a redirect or 100 Continue) */
    }
    if (t->headers.len + n > MAX_HEADER_BYTES) {
        t->too_large = true;
        return 0;
    }
    ah_buf_append(&t->headers, ptr, n);
    return ah_buf_ok(&t->headers) ? n : 0;
}

/* ---- the client: curl's event-loop callbacks --------------------------------------------- */

/* Hands every finished transfer to its task. */
static void check_done(client_t *c)
{
    CURLMsg *msg;
    int pending;
    while ((msg = curl_multi_info_read(c->multi, &pending)) != NULL) {
        if (msg->msg != CURLMSG_DONE) {
            continue;
        }
        transfer_t *t = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&t);
        CURLcode result = msg->data.result;
        transfer_unlink(t); /* msg is invalid from here */
        t->result = result;
        t->done = true;
        ah_lua_op_done(&t->op);
    }
}

/* The client whose curl_multi_socket_action runs on this thread (curl_poll), or NULL. */
static __thread client_t *acting_client;

/* Whether the loop's view of the idle socket w answers a liveness check: the loop last saw the
 * server's side open (seen_open) at most LOOP_VIEW_MAX_AGE_MS ago, and curl asks from the timer,
 * so no report of an epoll batch waits to be dispatched (a report of w later in the batch being
 * dispatched would not have been seen yet). */
static bool loop_saw_open(const client_t *c, const socket_watch_t *w)
{
    return c->from_timer && w->seen_open && uv_now(c->loop) - c->looked_ms <= LOOP_VIEW_MAX_AGE_MS;
}

/* libcurl's poll (ahc_poll_hook_install). curl 7.88 asks poll() whether an idle connection's
 * socket is readable before it reuses it (extract_if_dead: readable with an end of stream, the
 * server closed it), sends the request, and asks again at once (Curl_readwrite, zero timeout)
 * whether the answer is there. For a socket the loop watches while curl keeps it idle:
 * - the first question is answered "not readable" without a syscall when the loop's view
 *   answers it (loop_saw_open), else by libc's poll;
 * - the second, in the same curl_multi_socket_action call, is answered "not readable": the
 *   request was sent microseconds ago, and the loop's epoll watch (armed, on_socket) reports the
 *   answer when it comes, as it would after a real "not readable".
 * A server that closes the connection after the loop's last look is not seen, as libc's poll
 * does not see one that closes right after it: curl sends the request on it, reads the end of
 * stream or the reset, and sends the request again on a new connection (its retry, which the
 * loop's report makes happen inside on_poll, where every check goes to libc's poll). Anything
 * else goes to libc's poll. */
static int curl_poll(struct pollfd *fds, unsigned long n, int timeout)
{
    client_t *c = acting_client;
    socket_watch_t *w = NULL;
    if (c != NULL && n == 1 && timeout == 0 && fds[0].fd >= 0 && fds[0].fd < c->by_fd_len &&
        (fds[0].events & ~(POLLIN | POLLPRI | POLLRDNORM | POLLRDBAND)) == 0) {
        w = c->by_fd[fds[0].fd];
        if (w != NULL && !(w->idle && w->events == READ_WATCH)) {
            w = NULL;
        }
    }
    if (w != NULL && (w->checked_in == c->actions || loop_saw_open(c, w))) {
        /* the second question is asked once: the next one is a new first one */
        w->checked_in = w->checked_in == c->actions ? 0 : c->actions;
        fds[0].revents = 0;
        return 0;
    }
    int r = poll(fds, (nfds_t)n, timeout);
    if (w != NULL && r == 0) {
        w->checked_in = c->actions;
    }
    return r;
}

/* curl_multi_socket_action with curl_poll told which client acts. */
static void socket_action(client_t *c, curl_socket_t s, int flags)
{
    int running;
    c->actions++;
    acting_client = c;
    curl_multi_socket_action(c->multi, s, flags, &running);
    acting_client = NULL;
}

static void on_poll(uv_poll_t *handle, int status, int events)
{
    socket_watch_t *w = handle->data;
    client_t *c = w->client;
    c->looked_ms = uv_now(c->loop);
    w->seen_open = false;
    if (w->idle) {
        /* An idle connection in curl's cache: closed by the peer, most likely. Stop hearing of
         * it (epoll is level-triggered); curl checks it (libc's poll) before it reuses it. */
        uv_poll_stop(&w->poll);
        w->events = 0;
        return;
    }
    int flags = 0;
    if (status < 0) {
        /* POLLERR (a reset, mostly): libuv has stopped the watch. curl learns what happened
         * from its own read or write, as it would from poll(): a reused connection the server
         * reset before any answer is then retried on a new one (curl does that for a read error
         * or an end of file, not for CURL_CSELECT_ERR). */
        w->events = 0;
        flags = CURL_CSELECT_IN | CURL_CSELECT_OUT;
    } else {
        flags |= (events & UV_READABLE) ? CURL_CSELECT_IN : 0;
        flags |= (events & UV_WRITABLE) ? CURL_CSELECT_OUT : 0;
        w->seen_open =
            (events & (UV_READABLE | UV_DISCONNECT)) == UV_READABLE && w->events == READ_WATCH;
    }
    socket_action(c, w->fd, flags);
    check_done(c);
}

static void on_timeout(uv_timer_t *timer)
{
    client_t *c = timer->data;
    c->from_timer = true;
    socket_action(c, CURL_SOCKET_TIMEOUT, 0);
    c->from_timer = false;
    check_done(c);
}

static void free_watch(uv_handle_t *handle)
{
    free(handle->data);
}

static void watch_close(client_t *c, socket_watch_t *w)
{
    for (socket_watch_t **p = &c->sockets; *p != NULL; p = &(*p)->next) {
        if (*p == w) {
            *p = w->next;
            break;
        }
    }
    if (w->fd >= 0 && w->fd < c->by_fd_len && c->by_fd[w->fd] == w) {
        c->by_fd[w->fd] = NULL;
    }
    uv_poll_stop(&w->poll);
    uv_close((uv_handle_t *)&w->poll, free_watch);
}

/* CURLMOPT_SOCKETFUNCTION: watch s for what curl wants, or stop watching it. */
static int on_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    client_t *c = userp;
    socket_watch_t *w = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (w != NULL) {
            curl_multi_assign(c->multi, s, NULL);
            w->idle = true; /* kept for a reuse of the connection */
            /* An idle watch does not keep the loop alive: run_loop tells from uv_run's result
             * that every task waits for another one. */
            uv_unref((uv_handle_t *)&w->poll);
            if (w->events != READ_WATCH) {
                /* Only the read watch stays armed (a write watch would fire at once). */
                if (w->events != 0) {
                    uv_poll_stop(&w->poll);
                }
                w->events = 0;
                w->seen_open = false;
            }
        }
        return 0;
    }
    if (w == NULL) {
        for (w = c->sockets; w != NULL && w->fd != s; w = w->next) {
        }
    }
    if (w != NULL) {
        curl_multi_assign(c->multi, s, w);
        if (w->idle) {
            w->idle = false;
            w->checked_in = 0;
            w->seen_open = false;
            uv_ref((uv_handle_t *)&w->poll);
        }
    } else {
        w = calloc(1, sizeof(*w));
        if (w == NULL) {
            return -1;
        }
        if (uv_poll_init_socket(c->loop, &w->poll, s) != 0) {
            free(w);
            return -1;
        }
        w->poll.data = w;
        if (s >= c->by_fd_len) {
            int len = s + 64;
            socket_watch_t **grown = realloc(c->by_fd, (size_t)len * sizeof(*grown));
            if (grown == NULL) {
                uv_close((uv_handle_t *)&w->poll, free_watch);
                return -1;
            }
            memset(grown + c->by_fd_len, 0, (size_t)(len - c->by_fd_len) * sizeof(*grown));
            c->by_fd = grown;
            c->by_fd_len = len;
        }
        c->by_fd[s] = w;
        w->fd = s;
        w->client = c;
        w->poll.data = w;
        w->next = c->sockets;
        c->sockets = w;
        curl_multi_assign(c->multi, s, w);
    }
    int events = 0;
    events |= (what & CURL_POLL_IN) ? READ_WATCH : 0;
    events |= (what & CURL_POLL_OUT) ? UV_WRITABLE : 0;
    if (events != w->events) { /* uv_poll_start re-registers the fd with epoll every time */
        uv_poll_start(&w->poll, events, on_poll);
        w->events = events;
        w->seen_open = false;
    }
    return 0;
}

/* CURLOPT_CLOSESOCKETFUNCTION: curl closes a socket; its watch goes first. */
static int on_close_socket(void *clientp, curl_socket_t s)
{
    client_t *c = clientp;
    for (socket_watch_t *w = c->sockets; w != NULL; w = w->next) {
        if (w->fd == s) {
            watch_close(c, w);
            break;
        }
    }
    return close(s);
}

/* CURLMOPT_TIMERFUNCTION: (re)arm or stop the one timer. */
static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
    client_t *c = userp;
    if (timeout_ms < 0) {
        uv_timer_stop(&c->timer);
    } else {
        /* The worker's loop does not run between calls: refresh its clock first. */
        uv_update_time(c->loop);
        uv_timer_start(&c->timer, on_timeout, (uint64_t)timeout_ms, 0);
    }
    return 0;
}

static void free_client(uv_handle_t *handle)
{
    client_t *c = handle->data;
    free(c->by_fd);
    free(c->proxy_http);
    free(c->proxy_https);
    free(c->no_proxy);
    free(c);
}

/* The first of the variables that is set (even to ""), as curl 7.88 looks them up. */
static const char *first_env(const char *a, const char *b, const char *c)
{
    const char *v = getenv(a);
    if (v == NULL && b != NULL) {
        v = getenv(b);
    }
    if (v == NULL && c != NULL) {
        v = getenv(c);
    }
    return v;
}

/* Reads the proxy variables the way libcurl does for each request (lower-case http_proxy only,
 * for the CGI "Proxy:" header reason; https_proxy/HTTPS_PROXY; all_proxy/ALL_PROXY as the
 * fallback; no_proxy/NO_PROXY). False when out of memory. */
static bool read_proxy_env(client_t *c)
{
    const char *all = first_env("all_proxy", "ALL_PROXY", NULL);
    const char *http = first_env("http_proxy", NULL, NULL);
    const char *https = first_env("https_proxy", "HTTPS_PROXY", NULL);
    const char *no = first_env("no_proxy", "NO_PROXY", NULL);
    c->proxy_http = strdup(http != NULL ? http : all != NULL ? all : "");
    c->proxy_https = strdup(https != NULL ? https : all != NULL ? all : "");
    c->no_proxy = strdup(no != NULL ? no : "");
    return c->proxy_http != NULL && c->proxy_https != NULL && c->no_proxy != NULL;
}

/* The proxy of a request to url, from the variables read once (set with CURLOPT_PROXY and
 * CURLOPT_NOPROXY, curl then reads no environment); NULL when http and https would use different
 * proxies and the request follows redirects (which may change the scheme): curl is left to
 * choose per connection then. */
static const char *proxy_for(const client_t *c, const char *url, bool follow)
{
    if (follow && strcmp(c->proxy_http, c->proxy_https) != 0) {
        return NULL;
    }
    return strncmp(url, "https://", 8) == 0 ? c->proxy_https : c->proxy_http;
}

/* __gc of the client userdata (the state closes). */
static int client_gc(lua_State *L)
{
    client_t **slot = luaL_checkudata(L, 1, CLIENT_META);
    client_t *c = *slot;
    if (c == NULL) {
        return 0;
    }
    *slot = NULL;
    while (c->transfers != NULL) { /* their userdata free them later */
        transfer_t *t = c->transfers;
        transfer_unlink(t);
        transfer_detach(t);
        t->client = NULL;
    }
    curl_multi_cleanup(c->multi);
    while (c->idle_count > 0) {
        transfer_destroy(c->idle[--c->idle_count]);
    }
    curl_slist_free_all(c->default_headers);
    while (c->sockets != NULL) {
        watch_close(c, c->sockets);
    }
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, free_client);
    return 0;
}

static pthread_once_t poll_hook_once = PTHREAD_ONCE_INIT;

static void install_poll_hook(void)
{
    ahc_poll_hook_install(curl_poll);
}

/* The state's client, created on first use. Raises on failure. */
static client_t *get_client(lua_State *L)
{
    lua_pushlightuserdata(L, (void *)&registry_key_client);
    lua_rawget(L, LUA_REGISTRYINDEX);
    client_t **slot = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (slot != NULL && *slot != NULL) {
        return *slot;
    }
    if (ahc_global_init() != AH_OK) {
        luaL_error(L, "agent.http: curl_global_init failed");
    }
    lua_pushlightuserdata(L, (void *)&registry_key_client);
    slot = lua_newuserdata(L, sizeof(*slot));
    *slot = NULL;
    luaL_newmetatable(L, CLIENT_META);
    lua_pushcfunction(L, client_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
    client_t *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        luaL_error(L, "agent.http: out of memory");
    }
    if (!read_proxy_env(c)) {
        free(c->proxy_http);
        free(c->proxy_https);
        free(c->no_proxy);
        free(c);
        luaL_error(L, "agent.http: out of memory");
    }
    c->multi = curl_multi_init();
    c->default_headers = curl_slist_append(NULL, "Expect:"); /* no 100-continue round trip */
    if (c->multi == NULL || c->default_headers == NULL) {
        curl_multi_cleanup(c->multi);
        curl_slist_free_all(c->default_headers);
        free(c->proxy_http);
        free(c->proxy_https);
        free(c->no_proxy);
        free(c);
        luaL_error(L, "agent.http: curl_multi_init failed");
    }
    c->loop = ah_lua_loop(L);
    uv_timer_init(c->loop, &c->timer);
    c->timer.data = c;
    pthread_once(&poll_hook_once, install_poll_hook);
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c);
    /* Idle connections kept for reuse. curl's default (4x the transfers running at the moment)
     * shrinks between bursts of requests and closes connections that tasks reuse a moment
     * later. */
    curl_multi_setopt(c->multi, CURLMOPT_MAXCONNECTS, (long)MAX_IDLE_CONNECTIONS);
    *slot = c;
    return c;
}

/* ---- Lua functions ----------------------------------------------------------------------- */

/* The upvalues of every C function of the module: the field names core.start reads and
 * core.result writes (KEY_*), then the transfers' metatable (UPVALUE_TRANSFER_META).
 * lua_getfield / lua_setfield / luaL_checkudata would hash and look up a C string in the string
 * table at every call (10 reads, 3 writes and 3 metatable look-ups a request). */
enum {
    KEY_URL = 1,
    KEY_METHOD,
    KEY_QUERY,
    KEY_TIMEOUT,
    KEY_CONNECT_TIMEOUT,
    KEY_MAX_BODY,
    KEY_FOLLOW_REDIRECTS,
    KEY_TLS_VERIFY,
    KEY_CA_FILE,
    KEY_STATUS,
    KEY_HEADERS,
    KEY_BODY,
    KEY_COUNT = KEY_BODY,
    UPVALUE_TRANSFER_META,
    UPVALUE_COUNT = UPVALUE_TRANSFER_META
};

static const char *const key_names[KEY_COUNT + 1] = {
    NULL,         "url",
    "method",     "query",
    "timeout",    "connect_timeout",
    "max_body",   "follow_redirects",
    "tls_verify", "ca_file",
    "status",     "headers",
    "body",
};

/* Pushes the field `key` of the options table at index 1, as lua_getfield does (a metatable's
 * __index is honoured). Stack: [-0, +1]. */
static void get_option(lua_State *L, int key)
{
    lua_pushvalue(L, lua_upvalueindex(key));
    lua_gettable(L, 1);
}

/* Sets the field `key` of the table below the value on top to that value, and pops it (the
 * table is one the module made: no metatable). Stack: [-1, +0]. */
static void set_field(lua_State *L, int key)
{
    lua_pushvalue(L, lua_upvalueindex(key));
    lua_insert(L, -2);
    lua_rawset(L, -3);
}

/* Field `key` of the options table at index 1 as a number of seconds >= 0, or def. */
static double opt_seconds(lua_State *L, int key, double def)
{
    get_option(L, key);
    double v = def;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) >= 0)) {
            luaL_error(L, "agent.http: %s must be a number of seconds >= 0", key_names[key]);
        }
        v = lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

static bool opt_bool(lua_State *L, int key, bool def)
{
    get_option(L, key);
    bool v = def;
    if (!lua_isnil(L, -1)) {
        if (!lua_isboolean(L, -1)) {
            luaL_error(L, "agent.http: %s must be a boolean", key_names[key]);
        }
        v = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

/* A header name: an HTTP token. */
static bool is_token(const char *s, size_t n)
{
    if (n == 0) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch <= 32 || ch >= 127 || strchr("()<>@,;:\\\"/[]?={}", ch) != NULL) {
            return false;
        }
    }
    return true;
}

/* A header value: no CR, LF or NUL (no header injection). */
static bool is_header_value(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0') {
            return false;
        }
    }
    return true;
}

/* Checks the headers table at index idx (nil accepted): string keys that are tokens, string or
 * number values without CR/LF. Raises on misuse. */
static void check_headers(lua_State *L, int idx)
{
    if (lua_isnil(L, idx)) {
        return;
    }
    if (!lua_istable(L, idx)) {
        luaL_error(L, "agent.http: headers must be a table of name = value");
    }
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        size_t kn, vn;
        if (lua_type(L, -2) != LUA_TSTRING) {
            luaL_error(L, "agent.http: header names must be strings");
        }
        const char *k = lua_tolstring(L, -2, &kn);
        if (!is_token(k, kn)) {
            luaL_error(L, "agent.http: invalid header name '%s'", k);
        }
        int vt = lua_type(L, -1);
        if (vt != LUA_TSTRING && vt != LUA_TNUMBER) {
            luaL_error(L, "agent.http: header %s must be a string or a number", k);
        }
        const char *v = lua_tolstring(L, -1, &vn); /* a number becomes a string: keys untouched */
        if (!is_header_value(v, vn)) {
            luaL_error(L, "agent.http: header %s contains CR, LF or NUL", k);
        }
        lua_pop(L, 1);
    }
}

/* Appends s percent-encoded (RFC 3986 unreserved characters kept). */
static void add_escaped(luaL_Buffer *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (isalnum(ch) || ch == '-' || ch == '.' || ch == '_' || ch == '~') {
            luaL_addchar(b, (char)ch);
        } else {
            luaL_addchar(b, '%');
            luaL_addchar(b, hex[ch >> 4]);
            luaL_addchar(b, hex[ch & 15]);
        }
    }
}

/* Pushes url with the query table at index qidx appended (keys sorted, so a request is
 * reproducible). Raises on a bad query table. Stack: [-0, +1]. */
static void push_url(lua_State *L, const char *url, int qidx)
{
    if (lua_isnil(L, qidx)) {
        lua_pushstring(L, url);
        return;
    }
    if (!lua_istable(L, qidx)) {
        luaL_error(L, "agent.http: query must be a table of name = value");
    }
    lua_newtable(L); /* the sorted keys */
    int keys = lua_gettop(L);
    int n = 0;
    lua_pushnil(L);
    while (lua_next(L, qidx) != 0) {
        int vt = lua_type(L, -1);
        if (lua_type(L, -2) != LUA_TSTRING ||
            (vt != LUA_TSTRING && vt != LUA_TNUMBER && vt != LUA_TBOOLEAN)) {
            luaL_error(L, "agent.http: query must map strings to strings, numbers or booleans");
        }
        lua_pop(L, 1);
        lua_pushvalue(L, -1);
        lua_rawseti(L, keys, ++n);
    }
    lua_getglobal(L, "table");
    lua_getfield(L, -1, "sort");
    lua_pushvalue(L, keys);
    lua_call(L, 1, 0);
    lua_pop(L, 1);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    const char *hash = strchr(url, '#');
    size_t url_len = hash != NULL ? (size_t)(hash - url) : strlen(url);
    luaL_addlstring(&b, url, url_len);
    char sep = memchr(url, '?', url_len) != NULL ? '&' : '?';
    for (int i = 1; i <= n; i++) {
        luaL_addchar(&b, sep);
        sep = '&';
        lua_rawgeti(L, keys, i);
        size_t kn;
        const char *k = lua_tolstring(L, -1, &kn);
        lua_pop(L, 1); /* the key stays referenced by the keys table */
        add_escaped(&b, k, kn);
        luaL_addchar(&b, '=');
        lua_getfield(L, qidx, k);
        const char *v;
        size_t vn;
        if (lua_isboolean(L, -1)) {
            v = lua_toboolean(L, -1) ? "true" : "false";
            vn = strlen(v);
        } else {
            v = lua_tolstring(L, -1, &vn);
        }
        lua_pop(L, 1);
        add_escaped(&b, v, vn);
    }
    luaL_pushresult(&b);
    lua_remove(L, keys);
}

/* Builds the request header list from the headers table at idx (checked): "Expect:" and the
 * table's headers; NULL with *ok true when there is no table (the client's default list). *ok is
 * false on OOM. */
static struct curl_slist *build_headers(lua_State *L, int idx, bool *ok)
{
    *ok = true;
    if (lua_isnil(L, idx)) {
        return NULL;
    }
    struct curl_slist *list = curl_slist_append(NULL, "Expect:"); /* no 100-continue round trip */
    *ok = list != NULL;
    if (!*ok) {
        return list;
    }
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        const char *k = lua_tostring(L, -2);
        const char *v = lua_tostring(L, -1);
        size_t n = strlen(k) + strlen(v) + 3;
        char *line = malloc(n);
        struct curl_slist *grown = NULL;
        if (line != NULL) {
            /* "Name;" sends an empty value; "Name: v" a value */
            if (v[0] == '\0') {
                snprintf(line, n, "%s;", k);
            } else {
                snprintf(line, n, "%s: %s", k, v);
            }
            grown = curl_slist_append(list, line);
            free(line);
        }
        if (grown == NULL) {
            *ok = false;
            lua_pop(L, 2);
            return list;
        }
        list = grown;
        lua_pop(L, 1);
    }
    return list;
}

/* One request's options, checked (see http_start). */
typedef struct {
    const char *url;
    const char *method;
    const char *body; /* NULL: none */
    size_t body_len;
    const char *ca_file; /* NULL: the system's CA store */
    const char *proxy;   /* see proxy_for */
    const struct curl_slist *headers;
    long timeout_ms;
    long connect_timeout_ms;
    curl_off_t max_filesize;
    bool follow;
    bool verify;
} request_t;

static bool same_string(const char *a, const char *b)
{
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* Replaces *owned with a copy of s (NULL allowed). False on OOM (*owned is then NULL). */
static bool set_owned(char **owned, const char *s)
{
    free(*owned);
    *owned = s != NULL ? strdup(s) : NULL;
    return s == NULL || *owned != NULL;
}

/* CURLOPT_PREREQFUNCTION: curl sends a request of t (the first, a redirect's, a retry's). */
static int on_request_sent(void *clientp, char *primary_ip, char *local_ip, int primary_port,
                           int local_port)
{
    (void)primary_ip;
    (void)local_ip;
    (void)primary_port;
    (void)local_port;
    transfer_t *t = clientp;
    t->requests_sent++;
    return CURL_PREREQFUNC_OK;
}

/* The options every request of a transfer shares (a new or reset easy handle). */
static void apply_fixed_options(transfer_t *t)
{
    CURL *e = t->easy;
    curl_easy_setopt(e, CURLOPT_PRIVATE, t);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, on_close_socket);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETDATA, t->client);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, t->error);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, t);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, t);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "agenthost/" AH_VERSION);
    curl_easy_setopt(e, CURLOPT_MAXREDIRS, (long)MAX_REDIRECTS);
    curl_easy_setopt(e, CURLOPT_PREREQFUNCTION, on_request_sent);
    curl_easy_setopt(e, CURLOPT_PREREQDATA, t);
}

/* A transfer for a new request: an idle one of the client, else a new one. NULL on OOM. */
static transfer_t *transfer_take(client_t *c)
{
    transfer_t *t;
    if (c->idle_count > 0) {
        t = c->idle[--c->idle_count];
    } else {
        t = calloc(1, sizeof(*t));
        if (t == NULL) {
            return NULL;
        }
        t->client = c;
        t->easy = curl_easy_init();
        if (t->easy == NULL) {
            free(t);
            return NULL;
        }
        apply_fixed_options(t);
    }
    memset(&t->op, 0, sizeof(t->op));
    t->op.cancel = transfer_cancel;
    t->in_multi = false;
    t->done = false;
    t->result = CURLE_OK;
    t->too_large = false;
    t->requests_sent = 0;
    t->error[0] = '\0';
    return t;
}

/* Gives the easy handle the request's URL: parsed once into the transfer's CURLU handle, which
 * curl copies for each request instead of parsing the URL string again and rebuilding it
 * (as curl itself would parse it: CURLU_GUESS_SCHEME | CURLU_NON_SUPPORT_SCHEME). A URL that
 * does not parse is given as a string, so that curl reports it as it always did. False on OOM. */
static bool apply_url(transfer_t *t, const char *url)
{
    applied_t *a = &t->applied;
    if (a->url != NULL && strcmp(a->url, url) == 0) {
        return true;
    }
    free(a->url);
    a->url = NULL;
    if (t->url_handle == NULL) {
        t->url_handle = curl_url();
    }
    if (t->url_handle != NULL &&
        curl_url_set(t->url_handle, CURLUPART_URL, url,
                     CURLU_GUESS_SCHEME | CURLU_NON_SUPPORT_SCHEME) == CURLUE_OK) {
        /* no URL string: curl takes the normalized URL from the handle, once */
        curl_easy_setopt(t->easy, CURLOPT_URL, NULL);
        curl_easy_setopt(t->easy, CURLOPT_CURLU, t->url_handle);
        return set_owned(&a->url, url);
    }
    curl_easy_setopt(t->easy, CURLOPT_CURLU, NULL);
    return curl_easy_setopt(t->easy, CURLOPT_URL, url) == CURLE_OK;
}

/* Gives t's easy handle the options of req. A pooled handle keeps what the last request set: when
 * its shape (method, body or not, ca_file, proxy) is the same only the options that differ are
 * set, else it is reset first (curl_easy_reset), since a CA file or a method cannot be set back
 * to curl's default one by one. False on OOM (the handle is then reset on its next use). */
static bool apply_options(transfer_t *t, const request_t *req)
{
    CURL *e = t->easy;
    applied_t *a = &t->applied;
    bool has_body = req->body != NULL;
    if (a->shaped && (strcmp(a->method, req->method) != 0 || a->has_body != has_body ||
                      !same_string(a->ca_file, req->ca_file) || a->proxy != req->proxy)) {
        a->shaped = false;
    }
    if (!a->shaped) {
        if (a->used) {
            curl_easy_reset(e);
            apply_fixed_options(t);
        }
        a->used = true;
        /* a new or reset handle: curl's defaults, nothing of a previous request */
        free(a->url);
        a->url = NULL;
        if (!set_owned(&a->method, req->method) || !set_owned(&a->ca_file, req->ca_file)) {
            return false;
        }
        a->has_body = has_body;
        a->proxy = req->proxy;
        if (strcmp(req->method, "HEAD") == 0) {
            curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
        } else if (has_body ? strcmp(req->method, "POST") != 0 : strcmp(req->method, "GET") != 0) {
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, req->method);
        }
        if (req->ca_file != NULL) {
            curl_easy_setopt(e, CURLOPT_CAINFO, req->ca_file);
        }
        if (req->proxy != NULL) {
            curl_easy_setopt(e, CURLOPT_PROXY, req->proxy);
            curl_easy_setopt(e, CURLOPT_NOPROXY, t->client->no_proxy);
        }
        a->headers = NULL;
        a->timeout_ms = -1;
        a->connect_timeout_ms = -1;
        a->max_filesize = -1;
        /* curl's defaults are the opposite: the first request sets them */
        a->follow = !req->follow;
        a->verify = !req->verify;
        a->shaped = true;
    }
    if (has_body) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)req->body_len);
        if (curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, req->body) != CURLE_OK) {
            a->shaped = false;
            return false;
        }
    }
    if (!apply_url(t, req->url)) {
        a->shaped = false;
        return false;
    }
    if (a->headers != req->headers || req->headers != t->client->default_headers) {
        curl_easy_setopt(e, CURLOPT_HTTPHEADER, req->headers);
        a->headers = req->headers;
    }
    if (a->timeout_ms != req->timeout_ms) {
        curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, req->timeout_ms);
        a->timeout_ms = req->timeout_ms;
    }
    if (a->connect_timeout_ms != req->connect_timeout_ms) {
        curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, req->connect_timeout_ms);
        a->connect_timeout_ms = req->connect_timeout_ms;
    }
    if (a->max_filesize != req->max_filesize) {
        curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, req->max_filesize);
        a->max_filesize = req->max_filesize;
    }
    if (a->follow != req->follow) {
        curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, req->follow ? 1L : 0L);
        a->follow = req->follow;
    }
    if (a->verify != req->verify) {
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, req->verify ? 1L : 0L);
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, req->verify ? 2L : 0L);
        a->verify = req->verify;
    }
    return true;
}

/* core.start(opts, body, headers) -> transfer | nil, msg, code (the call's waits are already
 * cancelled). opts: the table given to agent.http.request; body (string or nil) and headers
 * (table or nil) as prepared by the Lua half. Raises on misuse (bad options, not inside a task);
 * the request starts on the loop at once. */
static int http_start(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    size_t body_len = 0;
    const char *body = luaL_optlstring(L, 2, NULL, &body_len);
    lua_settop(L, 3);
    if (!ah_lua_can_wait(L)) {
        return luaL_error(L, "agent.http: cannot wait here: only the script's functions and tasks "
                             "started by agent.spawn can wait (not a coroutine the script created "
                             "itself)");
    }
    get_option(L, KEY_URL);
    const char *url = lua_tostring(L, -1);
    if (lua_type(L, -1) != LUA_TSTRING ||
        (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0)) {
        return luaL_error(L, "agent.http: url must be a string starting with http:// or https://");
    }
    int url_idx = lua_gettop(L);
    get_option(L, KEY_METHOD);
    const char *method = lua_isnil(L, -1) ? (body != NULL ? "POST" : "GET") : lua_tostring(L, -1);
    if (method == NULL || lua_type(L, -1) == LUA_TNUMBER || !is_token(method, strlen(method))) {
        return luaL_error(L, "agent.http: method must be an HTTP method name such as \"GET\"");
    }
    int method_idx = lua_gettop(L);
    check_headers(L, 3);
    get_option(L, KEY_QUERY);
    push_url(L, url, lua_gettop(L));
    int full_url_idx = lua_gettop(L);
    double timeout = opt_seconds(L, KEY_TIMEOUT, DEFAULT_TIMEOUT);
    double connect_timeout = opt_seconds(L, KEY_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT);
    double max_body = DEFAULT_MAX_BODY;
    get_option(L, KEY_MAX_BODY);
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) >= 0)) {
            return luaL_error(L, "agent.http: max_body must be a number of bytes >= 0");
        }
        max_body = lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    bool follow = opt_bool(L, KEY_FOLLOW_REDIRECTS, true);
    bool verify = opt_bool(L, KEY_TLS_VERIFY, true);
    get_option(L, KEY_CA_FILE);
    if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING) {
        return luaL_error(L, "agent.http: ca_file must be a path");
    }
    const char *ca_file = lua_tostring(L, -1);
    int cancelled = ah_lua_push_cancelled(L);
    if (cancelled != 0) {
        return cancelled; /* the call's waits are cancelled: no request is started */
    }
    client_t *client = get_client(L);

    /* Nothing below raises until the transfer is owned by its userdata. */
    transfer_t **slot = lua_newuserdata(L, sizeof(*slot));
    *slot = NULL;
    lua_pushvalue(L, lua_upvalueindex(UPVALUE_TRANSFER_META));
    lua_setmetatable(L, -2);
    transfer_t *t = transfer_take(client);
    if (t == NULL) {
        return luaL_error(L, "agent.http: out of memory");
    }
    *slot = t;
    /* on the script's list from here, so that client_gc finds it */
    t->next = client->transfers;
    if (t->next != NULL) {
        t->next->prev = t;
    }
    client->transfers = t;
    t->max_body = max_body >= (double)SIZE_MAX ? SIZE_MAX : (size_t)max_body;
    bool headers_ok = false;
    t->own_headers = build_headers(L, 3, &headers_ok);
    if (!headers_ok) {
        return luaL_error(L, "agent.http: out of memory");
    }
    const char *full_url = lua_tostring(L, full_url_idx);
    method = lua_tostring(L, method_idx) != NULL ? lua_tostring(L, method_idx) : method;
    request_t req = {
        .url = full_url,
        .method = method,
        .body = strcmp(method, "HEAD") == 0 ? NULL : body, /* HEAD sends none */
        .body_len = body_len,
        .ca_file = ca_file,
        .proxy = proxy_for(client, full_url, follow),
        .headers = t->own_headers != NULL ? t->own_headers : client->default_headers,
        .timeout_ms = (long)ceil(fmin(timeout, 86400.0 * 24) * 1000.0),
        .connect_timeout_ms = (long)ceil(fmin(connect_timeout, 86400.0 * 24) * 1000.0),
        .max_filesize = (curl_off_t)fmin(max_body, 9e18),
        .follow = follow,
        .verify = verify,
    };
    if (!apply_options(t, &req) || curl_multi_add_handle(client->multi, t->easy) != CURLM_OK) {
        return luaL_error(L, "agent.http: cannot start the request");
    }
    t->in_multi = true;
    (void)url_idx;
    return 1;
}

static int push_response(lua_State *L, transfer_t *t);

static transfer_t *check_transfer(lua_State *L)
{
    /* luaL_checkudata(L, 1, TRANSFER_META), with the metatable from the upvalue */
    transfer_t **slot = lua_touserdata(L, 1);
    if (slot == NULL || !lua_getmetatable(L, 1)) {
        luaL_typerror(L, 1, TRANSFER_META);
    }
    if (!lua_rawequal(L, -1, lua_upvalueindex(UPVALUE_TRANSFER_META))) {
        luaL_typerror(L, 1, TRANSFER_META);
    }
    lua_pop(L, 1);
    if (*slot == NULL) {
        luaL_error(L, "agent.http: the request was released");
    }
    return *slot;
}

/* core.wait(transfer) -> true when done; nil, msg, code when the wait was cancelled. */
static int http_wait(lua_State *L)
{
    transfer_t *t = check_transfer(L);
    if (t->done) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (!t->in_multi) {
        lua_pushnil(L);
        lua_pushliteral(L, "agent.http: the request was cancelled");
        lua_pushliteral(L, "cancelled");
        return 3;
    }
    return ah_lua_op_wait(L, &t->op, "agent.http");
}

/* The error code a script sees for a failed transfer. */
static const char *error_code(const transfer_t *t)
{
    switch (t->result) {
    case CURLE_OPERATION_TIMEDOUT:
        return "timeout";
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        return "resolve";
    case CURLE_COULDNT_CONNECT:
        return "connect";
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_SHUTDOWN_FAILED:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_ENGINE_INITFAILED:
    case CURLE_USE_SSL_FAILED:
        return "tls";
    case CURLE_FILESIZE_EXCEEDED:
        return "too_large";
    case CURLE_WRITE_ERROR:
        return t->too_large ? "too_large" : "io";
    case CURLE_TOO_MANY_REDIRECTS:
        return "redirects";
    case CURLE_OUT_OF_MEMORY:
        return "memory";
    default:
        return "io";
    }
}

/* The names a response's first headers had (push_headers): a name not among them is not in the
 * table yet, so its value is set without reading the table first. */
#define NAMES_SEEN_MAX 32

/* Whether the name p[0..n) equals one of seen[0..count) but for case. */
static bool name_seen(const char *const *seen, const size_t *seen_len, int count, const char *p,
                      size_t n)
{
    for (int i = 0; i < count; i++) {
        if (seen_len[i] == n && strncasecmp(seen[i], p, n) == 0) {
            return true;
        }
    }
    return false;
}

/* Pushes the response headers as a table of lower-case name = value (repeated headers joined
 * with ", "). Stack: [-0, +1]. */
static void push_headers(lua_State *L, const transfer_t *t)
{
    lua_createtable(L, 0, 8);
    char lower[128]; /* most names fit: lower-cased here instead of a luaL_Buffer per byte */
    const char *seen[NAMES_SEEN_MAX];
    size_t seen_len[NAMES_SEEN_MAX];
    int seen_count = 0;
    const char *p = t->headers.data;
    const char *end = p + t->headers.len;
    while (p != NULL && p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        const char *line_end = eol != NULL ? eol : end;
        const char *colon = memchr(p, ':', (size_t)(line_end - p));
        if (colon != NULL && colon > p && !(line_end - p >= 5 && memcmp(p, "HTTP/", 5) == 0)) {
            size_t name_len = (size_t)(colon - p);
            if (name_len <= sizeof(lower)) {
                for (size_t i = 0; i < name_len; i++) {
                    char ch = p[i];
                    lower[i] = (ch >= 'A' && ch <= 'Z') ? (char)(ch - 'A' + 'a') : ch;
                }
                lua_pushlstring(L, lower, name_len);
            } else {
                luaL_Buffer name;
                luaL_buffinit(L, &name);
                for (const char *c = p; c < colon; c++) {
                    luaL_addchar(&name, (char)tolower((unsigned char)*c));
                }
                luaL_pushresult(&name);
            }
            const char *v = colon + 1;
            const char *ve = line_end;
            while (v < ve && (*v == ' ' || *v == '\t')) {
                v++;
            }
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t')) {
                ve--;
            }
            bool known = seen_count < NAMES_SEEN_MAX;
            if (known && !name_seen(seen, seen_len, seen_count, p, name_len)) {
                seen[seen_count] = p;
                seen_len[seen_count++] = name_len;
                lua_pushlstring(L, v, (size_t)(ve - v)); /* the first of its name */
                lua_rawset(L, -3);
                p = eol != NULL ? eol + 1 : NULL;
                continue;
            }
            lua_pushvalue(L, -1);
            lua_rawget(L, -3);
            if (lua_isstring(L, -1)) {
                lua_pushliteral(L, ", ");
                lua_pushlstring(L, v, (size_t)(ve - v));
                lua_concat(L, 3);
            } else {
                lua_pop(L, 1);
                lua_pushlstring(L, v, (size_t)(ve - v));
            }
            lua_rawset(L, -3);
        }
        p = eol != NULL ? eol + 1 : NULL;
    }
}

/* Frees the transfer of the userdata at index 1 now (its easy handle and buffers are not left
 * to the garbage collector, which does not see their size). */
static void release_transfer(lua_State *L)
{
    transfer_t **slot = lua_touserdata(L, 1);
    transfer_free(*slot);
    *slot = NULL;
}

/* core.result(transfer) -> {status, headers, body} | nil, msg, code. Releases the transfer. */
static int http_result(lua_State *L)
{
    transfer_t *t = check_transfer(L);
    if (!t->done) {
        return luaL_error(L, "agent.http: the request has not finished");
    }
    int n = push_response(L, t);
    release_transfer(L);
    return n;
}

/* core.release(transfer): frees a transfer whose wait was cancelled. */
static int http_release(lua_State *L)
{
    check_transfer(L);
    release_transfer(L);
    return 0;
}

/* Pushes the response table or nil, msg, code; returns the count. Allocates (may raise): the
 * transfer stays owned by its userdata meanwhile. */
static int push_response(lua_State *L, transfer_t *t)
{
    if (t->result != CURLE_OK) {
        const char *code = error_code(t);
        lua_pushnil(L);
        if (strcmp(code, "too_large") == 0) {
            lua_pushfstring(L, "agent.http: the response is larger than max_body (%d bytes)",
                            (int)(t->max_body > INT_MAX ? INT_MAX : t->max_body));
        } else {
            lua_pushfstring(L, "agent.http: %s",
                            t->error[0] ? t->error : curl_easy_strerror(t->result));
        }
        lua_pushstring(L, code);
        return 3;
    }
    long status = 0;
    curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, status);
    set_field(L, KEY_STATUS);
    push_headers(L, t);
    set_field(L, KEY_HEADERS);
    lua_pushlstring(L, t->body.data != NULL ? t->body.data : "", t->body.len);
    set_field(L, KEY_BODY);
    return 1;
}

/* __gc of a transfer: stops it if it still runs, frees it. */
static int transfer_gc(lua_State *L)
{
    transfer_t **slot = luaL_checkudata(L, 1, TRANSFER_META);
    transfer_t *t = *slot;
    *slot = NULL;
    if (t != NULL) {
        if (t->client == NULL) {
            t->in_multi = false; /* the client went first and detached it */
        }
        transfer_free(t);
    }
    return 0;
}

int ahc_lua_http_open(lua_State *L)
{
    luaL_newmetatable(L, TRANSFER_META);
    lua_pushcfunction(L, transfer_gc);
    lua_setfield(L, -2, "__gc");
    int meta = lua_gettop(L);
    static const luaL_Reg functions[] = {
        {"start", http_start},     {"wait", http_wait}, {"result", http_result},
        {"release", http_release}, {NULL, NULL},
    };
    lua_createtable(L, 0, 4);
    for (const luaL_Reg *f = functions; f->name != NULL; f++) {
        for (int key = 1; key <= KEY_COUNT; key++) {
            lua_pushstring(L, key_names[key]);
        }
        lua_pushvalue(L, meta);
        lua_pushcclosure(L, f->func, UPVALUE_COUNT);
        lua_setfield(L, -2, f->name);
    }
    lua_remove(L, meta);
    return 1;
}
