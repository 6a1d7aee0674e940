/* Internal to the HTTP module: what core/ah_http.c (libmicrohttpd glue, route table) and
 * core/ah_http_handlers.c (one handler per route, with its JSON shape) share. Not an API for
 * other modules. */
#ifndef AH_HTTP_HANDLERS_H
#define AH_HTTP_HANDLERS_H

#include "ah_http.h"
#include "ah_json.h"

#include <microhttpd.h>
#include <stdatomic.h>
#include <stdbool.h>

struct ah_http_s {
    struct MHD_Daemon *daemon;
    const ah_config_t *cfg;
    ah_state_t *state;
    ah_store_t *store;     /* NULL: distributed control disabled */
    ah_metrics_t *metrics; /* script-defined metrics; NULL: none */
    int port;
    atomic_int in_flight; /* requests begun (URI seen) and not yet completed */
};

/* One answer under construction. */
typedef struct http_reply_s {
    unsigned status;
    ah_buf_t body;
    const char *content_type; /* NULL → application/json */
    const char *allow;        /* Allow header (405) or NULL */
    bool www_authenticate;    /* WWW-Authenticate: Bearer (401) */
} http_reply_t;

/* What a route handler receives. `name` is the tail of a prefix route (the command). */
typedef struct http_call_s {
    ah_http_t *http;
    struct MHD_Connection *conn;
    const char *name;
} http_call_t;

typedef void (*http_handler_t)(http_call_t *call, http_reply_t *reply);

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
void ah_http_handle_agent_command(http_call_t *call, http_reply_t *reply); /* POST */
void ah_http_handle_agent_reload(http_call_t *call, http_reply_t *reply);  /* POST */
void ah_http_handle_agent_state(http_call_t *call, http_reply_t *reply);
void ah_http_handle_mongo_status(http_call_t *call, http_reply_t *reply);
void ah_http_handle_healthz(http_call_t *call, http_reply_t *reply);
void ah_http_handle_readyz(http_call_t *call, http_reply_t *reply);
void ah_http_handle_metrics(http_call_t *call, http_reply_t *reply);

#endif
