/* Implementation of ah_metrics.h: a fixed-capacity array under one mutex. Metrics are few and
 * updated at batch granularity, so a mutex costs nothing measurable. */
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
    metric_t items[AH_METRICS_MAX];
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

void ah_metrics_render(ah_metrics_t *m, ah_buf_t *out)
{
    pthread_mutex_lock(&m->lock);
    for (int i = 0; i < m->count; i++) {
        const metric_t *it = &m->items[i];
        ah_buf_printf(out, "# HELP %s %s\n# TYPE %s %s\n%s %.15g\n", it->name,
                      it->help[0] ? it->help : "Defined by the agent script.", it->name,
                      it->kind == AH_METRIC_COUNTER ? "counter" : "gauge", it->name, it->value);
    }
    pthread_mutex_unlock(&m->lock);
}
