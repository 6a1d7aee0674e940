/* Metrics: the Prometheus text of /metrics (the host's agenthost_* metrics from a state snapshot)
 * and script-defined metrics: a small thread-safe registry of named counters and gauges that Lua
 * scripts create through agent.metrics and /metrics exports in Prometheus text format. The
 * registry belongs to the host (not to a Lua state), so metrics survive a script reload.
 *
 * Threads: every function may be called from any thread. */
#ifndef AH_METRICS_H
#define AH_METRICS_H

#include "ah_json.h"
#include "ah_lease.h"
#include "ah_state.h"

#include <stddef.h>

typedef struct ah_metrics_s ah_metrics_t;

typedef enum {
    AH_METRIC_COUNTER = 0,
    AH_METRIC_GAUGE,
} ah_metric_kind_t;

#define AH_METRICS_MAX 256 /* at most this many script metrics per agent */

ah_metrics_t *ah_metrics_new(void);
void ah_metrics_free(ah_metrics_t *m); /* NULL is accepted */

/* Finds or creates the metric `name` (Prometheus syntax [a-zA-Z_:][a-zA-Z0-9_:]*, at most 128
 * bytes, not starting with "agenthost_", which the host uses). Returns its index (>= 0), or
 * AH_EINVAL with err set for a bad name, a name already used with the other kind, or a full
 * registry. help is copied on creation (newlines replaced). */
int ah_metrics_declare(ah_metrics_t *m, ah_metric_kind_t kind, const char *name, const char *help,
                       char *err, size_t errlen);
/* Adds delta (counters: delta must be >= 0, checked by the caller) / sets a gauge. */
void ah_metrics_add(ah_metrics_t *m, int index, double delta);
void ah_metrics_set(ah_metrics_t *m, int index, double value);
double ah_metrics_get(ah_metrics_t *m, int index);
/* Appends every metric in Prometheus text format (HELP, TYPE, value). */
void ah_metrics_render(ah_metrics_t *m, ah_buf_t *out);
/* Appends agenthost_lease_held{name} and agenthost_lease_changes_total{name} for this agent's
 * leases (ah_leases_list). */
void ah_metrics_render_leases(const ah_lease_view_t *views, int count, ah_buf_t *b);
/* Appends the host's own agenthost_* metrics (docs/API.md) for one state snapshot, in Prometheus
 * text format. uptime_s: seconds since the agent started. */
void ah_metrics_render_agent(const ah_state_snapshot_t *snap, double uptime_s, ah_buf_t *out);
/* Appends the info metric agenthost_agent_labels{label_<key>="<value>",...} 1 for the
 * canonical labels text (two keys that differ only in characters Prometheus does not allow
 * in a label name would collide; label_ keeps them apart from Prometheus' own). */
void ah_metrics_render_labels(const char *labels_text, ah_buf_t *out);

#endif
