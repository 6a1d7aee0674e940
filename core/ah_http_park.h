/* The lowest layer of the HTTP module (internal to it, not an API for other modules): a reply
 * under construction and how it is queued on a libmicrohttpd connection, the per-request context,
 * and parked requests (suspended connections answered later, from any thread) with the threads
 * that answer them. The layers call one way: core/ah_http.c (glue, route table) →
 * core/ah_http_handlers.c (one handler per route) → this layer → the state object, the store,
 * JSON. Nothing here knows the server, the routes nor the handlers' types.
 *
 * A handler whose answer is not ready (it needs the store, or waits for the agent to reach some
 * state) parks its request: libmicrohttpd suspends the connection, the handler returns, and the
 * thread goes on serving other requests (probes above all). The answer is queued later, from
 * any thread, and the connection resumes with it. Two ways to park:
 *
 * - ah_http_run_job(): the job (it may block: store calls) runs on one of HTTP_STORE_WORKERS
 *   store-work threads owned by this layer; its reply is the answer. At most
 *   HTTP_STORE_QUEUE_MAX jobs wait for a worker: past that the request is answered 503 with
 *   Retry-After at once.
 * - ah_http_park(): no thread is held while the request waits. A check function is run on the
 *   park thread after every change of the state object (ah_state_set_change_listener) and once at
 *   the deadline; and any thread may answer the request with ah_http_park_answer() (e.g. on a
 *   notification of its own).
 *
 * Whatever happens first answers the request; later answers are dropped. At ah_http_park_stop()
 * every request still parked is answered 503 ("shutting down"). A park is reference counted: the
 * connection holds one reference until libmicrohttpd completes the request, and each holder of
 * an http_park_t * (a caller of ah_http_park, a queued job) holds one. */
#ifndef AH_HTTP_PARK_H
#define AH_HTTP_PARK_H

#include "ah_json.h"
#include "ah_state.h"

#include <microhttpd.h>
#include <stdbool.h>

/* ---- replies ------------------------------------------------------------------------------ */

/* One answer under construction. */
typedef struct http_reply_s {
    unsigned status;
    ah_buf_t body;
    const char *content_type; /* NULL → application/json */
    const char *allow;        /* Allow header (405) or NULL */
    bool www_authenticate;    /* WWW-Authenticate: Bearer (401) */
    unsigned retry_after;     /* Retry-After: <seconds> when > 0 (503 of a full queue) */
    bool parked;              /* the handler parked the request: nothing is sent now */
} http_reply_t;

/* A 200 with an empty body. */
void ah_http_reply_init(http_reply_t *reply);
/* Replaces the reply with {"status": "error", "error": <message>}. */
void ah_http_reply_error(http_reply_t *reply, unsigned status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Queues the reply on conn (taking its body) with the API's headers. MHD_NO closes the
 * connection. libmicrohttpd's threads only (inside its access handler). */
enum MHD_Result ah_http_reply_send(struct MHD_Connection *conn, http_reply_t *reply);

/* ---- request contexts --------------------------------------------------------------------- */

typedef struct http_park_s http_park_t;

/* libmicrohttpd's per-request context (its void **req_cls), when the request needs memory: the
 * body seen so far and the park. *req_cls is NULL or one of these when a handler runs. */
typedef struct http_request_s {
    size_t body_bytes;
    http_park_t *park; /* set once parked; the connection's reference */
} http_request_t;

/* The request context at *req_cls, allocated (and stored there) if it was NULL. NULL: out of
 * memory. */
http_request_t *ah_http_request_context(void **req_cls);
/* At libmicrohttpd's completion of the request: drops the connection's reference to its park
 * (if any), frees the context and sets *req_cls to NULL. */
void ah_http_request_done(void **req_cls);
/* Inside the access handler, for a request that was parked and resumed: queues its answer. */
enum MHD_Result ah_http_request_send_answer(struct MHD_Connection *conn, http_request_t *req);

/* ---- parking ------------------------------------------------------------------------------ */

/* The parked requests of one server, its store workers and its park thread. */
typedef struct ah_http_parking_s ah_http_parking_t;

/* Runs on the park thread with the parking lock held, after every state change and once when
 * the deadline passes (expired true). Fills *reply and returns true to answer the request now;
 * when expired it must answer. Must not block nor call ah_http_park_* functions. */
typedef bool (*http_park_check_t)(void *arg, bool expired, http_reply_t *reply);
/* Runs on a store-work thread and fills *reply (initialised to 200 with an empty body). May
 * block. */
typedef void (*http_job_t)(void *arg, http_reply_t *reply);

/* Listens to the state object's changes; the park thread starts with the first parked request,
 * the store workers with the first jobs. state must outlive the parking. NULL with err set on
 * failure (nothing left running). */
ah_http_parking_t *ah_http_park_start(ah_state_t *state, char *err, size_t errlen);
/* Stops listening, answers every parked request 503 (queued jobs never run), waits up to
 * `seconds` for the jobs running. AH_OK: every thread is joined. AH_ETIMEOUT: a job is still
 * running (inside a store call); it keeps using the parking, which must then not be freed. */
int ah_http_park_stop(ah_http_parking_t *parking, double seconds);
/* Frees what ah_http_park_start() made, after ah_http_park_stop() returned AH_OK and once
 * libmicrohttpd is stopped (its threads may call ah_http_run_job(), answered 503, until then).
 * NULL is accepted. */
void ah_http_park_free(ah_http_parking_t *parking);
/* Appends the agenthost_http_* lines of /metrics. */
void ah_http_park_render_metrics(ah_http_parking_t *parking, ah_buf_t *out);

/* Handler: runs job(arg, reply) on a store worker and answers the request (conn, its context at
 * req_cls) with its reply. Returns 0 (the request is parked: reply->parked is set and the
 * handler returns), or AH_EUNAVAIL when the queue is full or the server is stopping (reply is
 * then a 503 with Retry-After, the job will not run), or AH_ENOMEM (reply is a 500). In every
 * case arg is owned by the call from now on and released with free_arg (may be NULL) after the
 * job or when it is dropped. */
int ah_http_run_job(ah_http_parking_t *parking, struct MHD_Connection *conn, void **req_cls,
                    http_reply_t *reply, http_job_t job, void *arg, void (*free_arg)(void *arg));
/* Handler: parks the request for up to timeout_s seconds (> 0), checked by check(arg, ...)
 * (may be NULL: then only ah_http_park_answer() or the deadline answers — with a 504 if check is
 * NULL). Returns the park with a reference for the caller (release it with
 * ah_http_park_release() from any thread), or NULL when the server is stopping or out of memory
 * (reply is then the 503 / 500 to send, and free_arg(arg) has run). arg is released with
 * free_arg (may be NULL) when the request is answered. */
http_park_t *ah_http_park(ah_http_parking_t *parking, struct MHD_Connection *conn, void **req_cls,
                          http_reply_t *reply, double timeout_s, http_park_check_t check, void *arg,
                          void (*free_arg)(void *arg));
/* Any thread: answers the parked request with *reply (its body is taken; it is freed when the
 * request was already answered). Returns true if this answer is the one sent. */
bool ah_http_park_answer(http_park_t *park, http_reply_t *reply);
/* Any thread: drops the caller's reference. NULL is accepted. */
void ah_http_park_release(http_park_t *park);

#endif
