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
    _Atomic(ah_fleet_t *) fleet; /* the fleet view (wait=); NULL until ah_http_set_fleet */

    /* Parked requests (core/ah_http_park.c), guarded by park_lock. */
    pthread_mutex_t park_lock;
    bool park_stopping; /* ah_http_stop() began: nothing new is parked */
    http_park_t *parks; /* parked and not answered yet (a list through next) */
};

/* One answer under construction. */
typedef struct http_reply_s {
    unsigned status;
    ah_buf_t body;
    const char *content_type; /* NULL → application/json */
    const char *allow;        /* Allow header (405) or NULL */
    bool www_authenticate;    /* WWW-Authenticate: Bearer (401) */
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
 * A handler whose answer is not ready parks its request: libmicrohttpd suspends the
 * connection, the handler returns, and the thread goes on serving other requests (probes above
 * all). Any thread answers it later with ah_http_park_answer(); the connection resumes with
 * that answer. At ah_http_stop() every request still parked is answered 503. A park is
 * reference counted: the connection holds one reference until libmicrohttpd completes the
 * request, the caller of ah_http_park() one until ah_http_park_release(). */

/* Handler: parks the request. check must be NULL and timeout_s is not enforced here: the caller
 * promises an answer (arg/free_arg: released when the park is freed; may be NULL). Returns the
 * park with the caller's reference, or NULL when the server is stopping or out of memory (reply
 * is then the 503 / 500 to send, and free_arg(arg) has run). */
http_park_t *ah_http_park(http_call_t *call, http_reply_t *reply, double timeout_s, void *check,
                          void *arg, void (*free_arg)(void *arg));
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

/* Used by core/ah_http.c: answers every parked request 503 and refuses new parks; the answer of
 * a resumed request; drops the connection's reference. */
void ah_http_park_stop(ah_http_t *http);
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
