/* Implementation of ah_metrics.h: the script metrics are an array (grown as they are declared, up
 * to AH_METRICS_MAX; addressed by index) under one mutex (few, updated at batch granularity, so
 * the mutex costs nothing measurable); the Prometheus text format of /metrics, for the host's own
 * metrics and the script's, is written here. */
#include "ah_metrics.h"

#include "ah_common.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME_MAX_LEN 128
#define HELP_MAX_LEN 256

typedef struct metric_s {
    char name[NAME_MAX_LEN + 1];
    char help[HELP_MAX_LEN + 1];
    ah_metric_kind_t kind;
    double value;
} metric_t;

struct ah_metrics_s {
    pthread_mutex_t lock;
    int count;
    int cap;
    metric_t *items; /* cap entries, count used: allocated as declared, not at start (at the
                        full capacity of 100 KiB, zeroing it touched 25 pages of every start) */
};

ah_metrics_t *ah_metrics_new(void)
{
    ah_metrics_t *m = calloc(1, sizeof(*m));
    if (m != NULL) {
        pthread_mutex_init(&m->lock, NULL);
    }
    return m;
}

void ah_metrics_free(ah_metrics_t *m)
{
    if (m == NULL) {
        return;
    }
    pthread_mutex_destroy(&m->lock);
    free(m->items);
    free(m);
}

static bool valid_name(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > NAME_MAX_LEN || strncmp(name, "agenthost_", 10) == 0) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
        if (!alpha && !(i > 0 && c >= '0' && c <= '9')) {
            return false;
        }
    }
    return true;
}

int ah_metrics_declare(ah_metrics_t *m, ah_metric_kind_t kind, const char *name, const char *help,
                       char *err, size_t errlen)
{
    if (!valid_name(name)) {
        snprintf(err, errlen,
                 "invalid metric name '%.140s' (expected [a-zA-Z_:][a-zA-Z0-9_:]*, at most %d "
                 "bytes, not starting with agenthost_)",
                 name, NAME_MAX_LEN);
        return AH_EINVAL;
    }
    int rc = AH_EINVAL;
    pthread_mutex_lock(&m->lock);
    for (int i = 0; i < m->count; i++) {
        if (strcmp(m->items[i].name, name) == 0) {
            if (m->items[i].kind == kind) {
                rc = i;
            } else {
                snprintf(err, errlen, "metric '%s' already exists as a %s", name,
                         m->items[i].kind == AH_METRIC_COUNTER ? "counter" : "gauge");
            }
            goto out;
        }
    }
    if (m->count >= AH_METRICS_MAX) {
        snprintf(err, errlen, "too many metrics (at most %d)", AH_METRICS_MAX);
        goto out;
    }
    if (m->count == m->cap) {
        int cap = m->cap == 0 ? 8 : m->cap * 2;
        cap = cap > AH_METRICS_MAX ? AH_METRICS_MAX : cap;
        metric_t *items = realloc(m->items, (size_t)cap * sizeof(*items));
        if (items == NULL) {
            snprintf(err, errlen, "out of memory");
            goto out;
        }
        m->items = items;
        m->cap = cap;
    }
    metric_t *it = &m->items[m->count];
    ah_strlcpy(it->name, name, sizeof(it->name));
    ah_strlcpy(it->help, help ? help : "", sizeof(it->help));
    for (char *p = it->help; *p; p++) {
        if (*p == '\n' || *p == '\r' || *p == '\\') {
            *p = ' ';
        }
    }
    it->kind = kind;
    it->value = 0;
    rc = m->count++;
out:
    pthread_mutex_unlock(&m->lock);
    return rc;
}

void ah_metrics_add(ah_metrics_t *m, int index, double delta)
{
    pthread_mutex_lock(&m->lock);
    if (index >= 0 && index < m->count) {
        m->items[index].value += delta;
    }
    pthread_mutex_unlock(&m->lock);
}

void ah_metrics_set(ah_metrics_t *m, int index, double value)
{
    pthread_mutex_lock(&m->lock);
    if (index >= 0 && index < m->count) {
        m->items[index].value = value;
    }
    pthread_mutex_unlock(&m->lock);
}

double ah_metrics_get(ah_metrics_t *m, int index)
{
    double v = NAN;
    pthread_mutex_lock(&m->lock);
    if (index >= 0 && index < m->count) {
        v = m->items[index].value;
    }
    pthread_mutex_unlock(&m->lock);
    return v;
}

/* ---- Prometheus text format ------------------------------------------------------------- */

static void metric_header(ah_buf_t *b, const char *name, const char *type, const char *help)
{
    ah_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void metric_u64(ah_buf_t *b, const char *name, const char *type, const char *help,
                       uint64_t value)
{
    metric_header(b, name, type, help);
    ah_buf_printf(b, "%s %llu\n", name, (unsigned long long)value);
}

static void metric_double(ah_buf_t *b, const char *name, const char *type, const char *help,
                          double value)
{
    metric_header(b, name, type, help);
    if (isfinite(value)) {
        ah_buf_printf(b, "%s %.15g\n", name, value);
    } else {
        ah_buf_printf(b, "%s NaN\n", name);
    }
}

void ah_metrics_render(ah_metrics_t *m, ah_buf_t *out)
{
    pthread_mutex_lock(&m->lock);
    for (int i = 0; i < m->count; i++) {
        const metric_t *it = &m->items[i];
        metric_header(out, it->name, it->kind == AH_METRIC_COUNTER ? "counter" : "gauge",
                      it->help[0] ? it->help : "Defined by the agent script.");
        ah_buf_printf(out, "%s %.15g\n", it->name, it->value);
    }
    pthread_mutex_unlock(&m->lock);
}

void ah_metrics_render_agent(const ah_state_snapshot_t *snap, double uptime_s, ah_buf_t *b)
{
    metric_u64(b, "agenthost_batches_total", "counter", "Batches run by the Lua worker.",
               snap->batches);
    metric_u64(b, "agenthost_batch_errors_total", "counter", "Batches that raised a Lua error.",
               snap->batch_errors);
    metric_u64(b, "agenthost_batch_overruns_total", "counter",
               "Batches or hooks that overran BATCH_TIMEOUT.", snap->batch_overruns);
    metric_u64(b, "agenthost_hook_errors_total", "counter", "Hooks that raised a Lua error.",
               snap->hook_errors);
    metric_header(b, "agenthost_state", "gauge", "Current run state (1 for the current one).");
    for (int st = AH_STATE_STARTING; st <= AH_STATE_STOPPED; st++) {
        ah_buf_printf(b, "agenthost_state{state=\"%s\"} %d\n", ah_run_state_name(st),
                      snap->state == (ah_run_state_t)st ? 1 : 0);
    }
    metric_u64(b, "agenthost_control_version", "gauge", "Latest cluster control version seen.",
               snap->cluster_known && snap->cluster.version > 0 ? (uint64_t)snap->cluster.version
                                                                : 0);
    metric_u64(b, "agenthost_applied_version", "gauge", "Cluster control version applied.",
               snap->applied_version > 0 ? (uint64_t)snap->applied_version : 0);
    metric_u64(b, "agenthost_commands_applied_total", "counter", "State transitions applied.",
               snap->commands_applied);
    metric_u64(b, "agenthost_store_connected", "gauge", "1 if the control store is reachable.",
               snap->store.connected ? 1 : 0);
    metric_u64(b, "agenthost_store_reconnects_total", "counter",
               "Reconnections to the control store.", snap->store.reconnects);
    metric_u64(b, "agenthost_stream_resumes_total", "counter", "Change stream resumptions.",
               snap->store.stream_resumes);
    metric_u64(b, "agenthost_polls_total", "counter", "Control store polls.", snap->store.polls);
    metric_double(b, "agenthost_control_lag_seconds", "gauge",
                  "Delay from the last cluster command's timestamp to its application.",
                  snap->last_control_lag_ms >= 0 ? snap->last_control_lag_ms / 1000.0 : NAN);
    metric_double(b, "agenthost_uptime_seconds", "gauge", "Seconds since the agent started.",
                  uptime_s);
    metric_u64(b, "agenthost_reloads_total", "counter", "Successful script reloads.",
               snap->reloads);
    metric_u64(b, "agenthost_reload_failures_total", "counter",
               "Script reloads rejected (the previous script kept running).",
               snap->reload_failures);
}

void ah_metrics_render_labels(const char *labels_text, ah_buf_t *b)
{
    char err[AH_ERRLEN];
    ah_labels_t *labels = ah_labels_parse(labels_text, err, sizeof(err));
    metric_header(b, "agenthost_agent_labels", "gauge",
                  "This agent's labels (AGENT_LABELS, AGENT_LABELS_FILE, agent=<AGENT_ID>), as "
                  "label_<key> (characters outside [a-zA-Z0-9_] become _); always 1.");
    ah_buf_puts(b, "agenthost_agent_labels{");
    char written[AH_LABELS_MAX][AH_LABEL_PREFIX_MAX + AH_LABEL_NAME_MAX + 8];
    size_t names = 0;
    for (size_t i = 0; i < ah_labels_count(labels) && i < AH_LABELS_MAX; i++) {
        char name[sizeof(written[0])];
        size_t n = 0;
        for (const char *k = ah_labels_key(labels, i); *k != '\0' && n + 1 < sizeof(name); k++) {
            char c = *k;
            bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      c == '_';
            name[n++] = ok ? c : '_';
        }
        name[n] = '\0';
        bool seen = false; /* "a.b" and "a_b" meet as one name: the first one is shown */
        for (size_t j = 0; j < names && !seen; j++) {
            seen = strcmp(written[j], name) == 0;
        }
        if (seen) {
            continue;
        }
        ah_strlcpy(written[names++], name, sizeof(written[0]));
        /* label values are [A-Za-z0-9._-]: nothing to escape */
        ah_buf_printf(b, "%slabel_%s=\"%s\"", names > 1 ? "," : "", name,
                      ah_labels_value(labels, i));
    }
    ah_buf_puts(b, "} 1\n");
    ah_labels_free(labels);
}

/* Writes a lease name as a Prometheus label value (\\, \" and \n escaped). */
static void label_value(ah_buf_t *b, const char *v)
{
    for (; *v != '\0'; v++) {
        if (*v == '\\' || *v == '"') {
            ah_buf_printf(b, "\\%c", *v);
        } else if (*v == '\n') {
            ah_buf_printf(b, "\\n");
        } else {
            ah_buf_printf(b, "%c", *v);
        }
    }
}

void ah_metrics_render_leases(const ah_lease_view_t *views, int count, ah_buf_t *b)
{
    metric_header(b, "agenthost_lease_held", "gauge",
                  "1 while this agent holds the lease (within its local deadline).");
    for (int i = 0; i < count; i++) {
        ah_buf_printf(b, "agenthost_lease_held{name=\"");
        label_value(b, views[i].name);
        ah_buf_printf(b, "\"} %d\n", views[i].held ? 1 : 0);
    }
    metric_header(b, "agenthost_lease_changes_total", "counter",
                  "Times this agent acquired or lost (or released) the lease.");
    for (int i = 0; i < count; i++) {
        ah_buf_printf(b, "agenthost_lease_changes_total{name=\"");
        label_value(b, views[i].name);
        ah_buf_printf(b, "\"} %llu\n", (unsigned long long)views[i].changes);
    }
}
