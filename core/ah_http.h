/* The HTTP API (docs/API.md) on libmicrohttpd: cluster routes (through the store), agent routes
 * (through the state object), /api/mongo/status, /healthz, /readyz and /metrics.
 *
 * Threads: requests are served on libmicrohttpd's own threads. GET handlers only read the state
 * snapshot; only cluster commands (and history) touch the store. */
#ifndef AH_HTTP_H
#define AH_HTTP_H

#include "ah_config.h"
#include "ah_metrics.h"
#include "ah_state.h"
#include "ah_store.h"

typedef struct ah_http_s ah_http_t;

/* Starts listening on cfg->http_bind:cfg->http_port. store is NULL when distributed control is
 * disabled (cluster routes then answer 503); metrics, the script-defined metrics exported on
 * /metrics, may be NULL. cfg, state, store and metrics must outlive the server. Returns NULL with
 * err set on failure (e.g. port in use). */
ah_http_t *ah_http_start(const ah_config_t *cfg, ah_state_t *state, ah_store_t *store,
                         ah_metrics_t *metrics, char *err, size_t errlen);
/* The port actually bound (useful with HTTP_PORT=0). */
int ah_http_port(const ah_http_t *http);
/* Stops the server and waits for in-flight requests. NULL is accepted. */
void ah_http_stop(ah_http_t *http);

#endif
