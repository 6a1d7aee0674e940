/* Internal to the HTTP module: what core/ah_http.c (libmicrohttpd glue, route table) uses of
 * core/ah_http_handlers.c (one handler per route, with its JSON shape): the server's fields, a
 * handler's call and the handlers. Handlers park requests and build replies with
 * core/ah_http_park.h, the layer below; nothing here calls back into core/ah_http.c. Not an API
 * for other modules. */
#ifndef AH_HTTP_HANDLERS_H
#define AH_HTTP_HANDLERS_H

#include "ah_http.h"
#include "ah_http_park.h"
#include "ah_json.h"

#include <microhttpd.h>
#include <stdatomic.h>
#include <stdbool.h>

typedef struct ah_fleet_s ah_fleet_t;

/* The server (made by core/ah_http.c, read by the handlers). */
struct ah_http_s {
    struct MHD_Daemon *daemon;
    const ah_config_t *cfg;
    ah_state_t *state;
    ah_store_t *store;     /* NULL: distributed control disabled */
    ah_metrics_t *metrics; /* script-defined metrics; NULL: none */
    int port;
    atomic_int in_flight;        /* requests begun (URI seen) and not yet completed */
    _Atomic(ah_fleet_t *) fleet; /* the fleet view (wait=, agents); NULL until ah_http_set_fleet */
    ah_http_parking_t *parking;  /* parked requests and store work (core/ah_http_park.c) */
    _Atomic(struct ah_leases_s *) leases; /* this agent's leases (/metrics); NULL until set */
};

/* What a route handler receives. `name` is the tail of a prefix route (the command). conn and
 * req_cls are what ah_http_run_job() and ah_http_park() need to park the request. */
typedef struct http_call_s {
    ah_http_t *http;
    struct MHD_Connection *conn;
    const char *name;
    void **req_cls; /* libmicrohttpd's request context: NULL or an http_request_t */
} http_call_t;

typedef void (*http_handler_t)(http_call_t *call, http_reply_t *reply);

/* Maps the command word of /api/{cluster,agent}/<word>. 0 or AH_EINVAL. */
int ah_http_parse_command_word(const char *word, ah_command_t *out);

/* The routes (docs/API.md); each fills the reply for one complete, authorized request. */
void ah_http_handle_cluster_command(http_call_t *call, http_reply_t *reply); /* POST */
void ah_http_handle_control_state(http_call_t *call, http_reply_t *reply);
void ah_http_handle_stats(http_call_t *call, http_reply_t *reply);
void ah_http_handle_history(http_call_t *call, http_reply_t *reply);
/* GET /api/cluster/scopes: every scope document with the live agents it matches and holds. */
void ah_http_handle_cluster_scopes(http_call_t *call, http_reply_t *reply);
void ah_http_handle_leases(http_call_t *call, http_reply_t *reply);
void ah_http_handle_cluster_agents(http_call_t *call, http_reply_t *reply);
void ah_http_handle_agent_command(http_call_t *call, http_reply_t *reply); /* POST */
void ah_http_handle_agent_reload(http_call_t *call, http_reply_t *reply);  /* POST */
void ah_http_handle_agent_state(http_call_t *call, http_reply_t *reply);
void ah_http_handle_mongo_status(http_call_t *call, http_reply_t *reply);
void ah_http_handle_healthz(http_call_t *call, http_reply_t *reply);
void ah_http_handle_readyz(http_call_t *call, http_reply_t *reply);
void ah_http_handle_metrics(http_call_t *call, http_reply_t *reply);

#endif
