/* Internal to the HTTP module: what core/ah_http.c (libmicrohttpd glue, route table) and
 * core/ah_http_handlers.c (one handler per route, with its JSON shape) share. Not an API for
 * other modules. */
#ifndef AH_HTTP_HANDLERS_H
#define AH_HTTP_HANDLERS_H

#include "ah_http.h"
#include "ah_json.h"

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

typedef struct http_park_s http_park_t;
typedef struct ah_fleet_s ah_fleet_t;

struct ah_http_s {
    struct MHD_Daemon *daemon;
    const ah_config_t *cfg;
    ah_state_t *state;
    ah_store_t *store;     /* NULL: distributed control disabled */
    ah_metrics_t *metrics; /* script-defined metrics; NULL: none */
    int port;
    atomic_int in_flight;        /* requests begun (URI seen) and not yet completed */
    _Atomic(ah_fleet_t *) fleet; /* the fleet view (wait=, agents); NULL until ah_http_set_fleet */

    /* Parked requests and store work (core/ah_http_park.c). park_lock guards everything below;
     * park_cond wakes the park thread (a deadline, a state change, stop), jobs_cond the store
     * workers (a job, stop). Lock order: the state object's listener lock → park_lock → the
     * state object's lock (a park check reads a snapshot). */
    pthread_mutex_t park_lock;
    pthread_cond_t park_cond;
    pthread_cond_t jobs_cond;
    bool park_stopping;     /* ah_http_stop() began: nothing new is parked */
    bool park_dirty;        /* the state changed (or a request was parked): run the checks */
    http_park_t *parks;     /* requests parked and not answered yet (a list through next) */
    http_park_t *jobs_head; /* jobs waiting for a store worker, oldest first */
    http_park_t *jobs_tail;
    int jobs_waiting;            /* length of jobs_head; at most HTTP_STORE_QUEUE_MAX */
    int jobs_running;            /* store workers inside a job */
    atomic_ullong jobs_rejected; /* 503s of a full queue */
    int threads_started;         /* store workers + the park thread that were created */
    pthread_t park_thread;
    pthread_t store_workers[4];
};

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

/* What a route handler receives. `name` is the tail of a prefix route (the command). */
typedef struct http_call_s {
    ah_http_t *http;
    struct MHD_Connection *conn;
    const char *name;
    void **req_cls; /* libmicrohttpd's request context (ah_http_park() keeps the park there) */
} http_call_t;

typedef void (*http_handler_t)(http_call_t *call, http_reply_t *reply);

/* ---- parked requests (core/ah_http_park.c) ------------------------------------------------
 *
 * A handler whose answer is not ready (it needs the store, or waits for the agent to reach some
 * state) parks its request: libmicrohttpd suspends the connection, the handler returns, and the
 * thread goes on serving other requests (probes above all). The answer is queued later, from
 * any thread, and the connection resumes with it. Two ways to park:
 *
 * - ah_http_run_job(): the job (it may block: store calls) runs on one of HTTP_STORE_WORKERS
 *   store-work threads owned by the HTTP module; its reply is the answer. At most
 *   HTTP_STORE_QUEUE_MAX jobs wait for a worker: past that the request is answered 503 with
 *   Retry-After at once.
 * - ah_http_park(): no thread is held while the request waits. A check function is run on the
 *   HTTP module's park thread after every change of the state object
 *   (ah_state_set_change_listener) and once at the deadline; and any thread may answer the
 *   request with ah_http_park_answer() (e.g. on a notification of its own).
 *
 * Whatever happens first answers the request; later answers are dropped. At ah_http_stop()
 * every request still parked is answered 503 ("shutting down"). A park is reference counted: the
 * connection holds one reference until libmicrohttpd completes the request, and each holder of
 * an http_park_t * (a caller of ah_http_park, a queued job) holds one. */

/* Runs on the park thread with park_lock held, after every state change and once when the
 * deadline passes (expired true). Fills *reply and returns true to answer the request now;
 * when expired it must answer. Must not block nor call ah_http_park_* functions. */
typedef bool (*http_park_check_t)(void *arg, bool expired, http_reply_t *reply);
/* Runs on a store-work thread and fills *reply (initialised to 200 with an empty body). May
 * block. */
typedef void (*http_job_t)(void *arg, http_reply_t *reply);

/* Handler: runs job(arg, reply) on a store worker and answers with its reply. Returns 0 (the
 * request is parked: reply->parked is set and the handler returns), or AH_EUNAVAIL when the
 * queue is full or the server is stopping (reply is then a 503 with Retry-After, the job will
 * not run). In both cases arg is owned by the call from now on and released with free_arg
 * (may be NULL) after the job or when it is dropped. */
int ah_http_run_job(http_call_t *call, http_reply_t *reply, http_job_t job, void *arg,
                    void (*free_arg)(void *arg));
/* Handler: parks the request for up to timeout_s seconds (> 0), checked by check(arg, ...)
 * (may be NULL: then only ah_http_park_answer() or the deadline answers — with a 504 if check is
 * NULL). Returns the park with a reference for the caller (release it with
 * ah_http_park_release() from any thread), or NULL when the server is stopping or out of memory
 * (reply is then the 503 / 500 to send, and free_arg(arg) has run). arg is released with
 * free_arg (may be NULL) when the request is answered. */
http_park_t *ah_http_park(http_call_t *call, http_reply_t *reply, double timeout_s,
                          http_park_check_t check, void *arg, void (*free_arg)(void *arg));
/* Any thread: answers the parked request with *reply (its body is taken; it is freed when the
 * request was already answered). Returns true if this answer is the one sent. */
bool ah_http_park_answer(http_park_t *park, http_reply_t *reply);
/* Any thread: drops the caller's reference. NULL is accepted. */
void ah_http_park_release(http_park_t *park);

/* Per-request context of core/ah_http.c (markers aside): the body seen so far and the park. */
typedef struct http_request_s {
    size_t body_bytes;
    http_park_t *park; /* set once parked; the connection's reference */
} http_request_t;
/* The call's request context, allocated if the request had none yet. NULL: out of memory. */
http_request_t *ah_http_request_context(http_call_t *call);

/* Used by core/ah_http.c: starts the park thread and the store workers (0, or AH_EIO with
 * err), stops them (answers every parked request 503, waits up to `seconds` for the workers;
 * AH_ETIMEOUT when a job is still running: then http must not be freed), sends a parked
 * request's answer when libmicrohttpd resumes it, and drops the connection's reference. */
int ah_http_park_start(ah_http_t *http, char *err, size_t errlen);
int ah_http_park_stop(ah_http_t *http, double seconds);
/* Frees what ah_http_park_start() initialised, once libmicrohttpd is stopped (its threads may
 * call ah_http_run_job() — answered 503 — until then). */
void ah_http_park_free(ah_http_t *http);
/* The agenthost_http_* lines of /metrics. */
void ah_http_park_render_metrics(ah_http_t *http, ah_buf_t *out);
/* The answer of a resumed request (taken from the park: called once). */
http_reply_t *ah_http_park_reply(http_park_t *park);
void ah_http_park_connection_done(http_park_t *park);

/* Replaces the reply with {"status": "error", "error": <message>}. */
void ah_http_reply_error(http_reply_t *reply, unsigned status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Maps the command word of /api/{cluster,agent}/<word>. 0 or AH_EINVAL. */
int ah_http_parse_command_word(const char *word, ah_command_t *out);

/* The routes (docs/API.md); each fills the reply for one complete, authorized request. */
void ah_http_handle_cluster_command(http_call_t *call, http_reply_t *reply); /* POST */
void ah_http_handle_control_state(http_call_t *call, http_reply_t *reply);
void ah_http_handle_stats(http_call_t *call, http_reply_t *reply);
void ah_http_handle_history(http_call_t *call, http_reply_t *reply);
void ah_http_handle_cluster_agents(http_call_t *call, http_reply_t *reply);
void ah_http_handle_agent_command(http_call_t *call, http_reply_t *reply); /* POST */
void ah_http_handle_agent_reload(http_call_t *call, http_reply_t *reply);  /* POST */
void ah_http_handle_agent_state(http_call_t *call, http_reply_t *reply);
void ah_http_handle_mongo_status(http_call_t *call, http_reply_t *reply);
void ah_http_handle_healthz(http_call_t *call, http_reply_t *reply);
void ah_http_handle_readyz(http_call_t *call, http_reply_t *reply);
void ah_http_handle_metrics(http_call_t *call, http_reply_t *reply);

#endif
