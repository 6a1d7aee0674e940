/* The HTTP API (docs/API.md) on libmicrohttpd: cluster routes (through the store), agent routes
 * (through the state object), /api/mongo/status, /healthz, /readyz and /metrics.
 *
 * Threads: requests are served on libmicrohttpd's own threads, which never block: GET handlers
 * read the state snapshot; cluster commands and history run on the module's store workers and
 * reload waits hold no thread (the request is parked, core/ah_http_park.c). */
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
typedef struct ah_fleet_s ah_fleet_t;
/* Lends the server the fleet view (core/ah_fleet.h) that answers cluster commands with wait=;
 * until then (and with NULL) such a command answers 503. Any thread; fleet must outlive the
 * server. */
void ah_http_set_fleet(ah_http_t *http, ah_fleet_t *fleet);
/* Gives /metrics this agent's leases (ah_lease.h; must outlive the server). NULL: none. */
struct ah_leases_s;
void ah_http_set_leases(ah_http_t *http, struct ah_leases_s *leases);
/* The port actually bound (useful with HTTP_PORT=0). */
int ah_http_port(const ah_http_t *http);
/* Stops the server within `seconds`: requests still parked (waiting for the store or for a state)
 * are answered 503, the store workers are waited for, requests in flight get a moment to finish.
 * AH_OK: everything is stopped and freed. AH_ETIMEOUT: a store worker is still inside a store
 * call; it keeps using the server and the store, so the caller must neither close the store nor
 * expect a clean exit (the process should exit). NULL is accepted. */
int ah_http_stop(ah_http_t *http, double seconds);

#endif
