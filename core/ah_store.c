/* Dispatch of the store interface (ah_store.h) to its implementation, and the status reporter
 * both watchers share. */
#include "ah_store.h"

#include "ah_redact.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int ah_store_read(ah_store_t *st, ah_control_t *out, char *err, size_t errlen)
{
    return st->ops->read(st, out, err, errlen);
}

int ah_store_command(ah_store_t *st, ah_command_t cmd, const char *reason, const char *updated_by,
                     const char *agent_id, ah_control_t *out, char *err, size_t errlen)
{
    ah_command_req_t req = {.command = cmd,
                            .reason = reason,
                            .updated_by = updated_by,
                            .agent_id = agent_id,
                            .if_version = -1};
    return ah_store_command_req(st, &req, out, err, errlen);
}

int ah_store_command_req(ah_store_t *st, const ah_command_req_t *req, ah_control_t *out, char *err,
                         size_t errlen)
{
    if (req->command != AH_CMD_PAUSE && req->command != AH_CMD_RUNNING &&
        req->command != AH_CMD_SHUTDOWN) {
        snprintf(err, errlen, "unknown command");
        return AH_EINVAL;
    }
    if (req->selector != NULL && strlen(req->selector) > AH_SELECTOR_MAX) {
        snprintf(err, errlen, "the selector is longer than %d bytes", AH_SELECTOR_MAX);
        return AH_EINVAL;
    }
    if (req->expires_us != 0 && req->command != AH_CMD_PAUSE) {
        snprintf(err, errlen, "only a pause can expire");
        return AH_EINVAL;
    }
    if (req->drain_ms != 0 && req->command == AH_CMD_RUNNING) {
        snprintf(err, errlen, "only a pause or a shutdown can have a drain deadline");
        return AH_EINVAL;
    }
    if (req->drain_ms < 0 || req->drain_ms > (int64_t)AH_PAUSE_MAX_S * 1000) {
        snprintf(err, errlen, "drain must be from 0 to %ds", AH_PAUSE_MAX_S);
        return AH_EINVAL;
    }
    ah_command_req_t full = *req;
    full.reason = req->reason ? req->reason : "";
    full.updated_by = req->updated_by ? req->updated_by : "";
    full.agent_id = req->agent_id ? req->agent_id : "";
    full.selector = req->selector ? req->selector : "";
    ah_control_t ignored;
    return st->ops->command(st, &full, out != NULL ? out : &ignored, err, errlen);
}

int ah_store_history(ah_store_t *st, int limit, ah_control_t *out, int *count, char *err,
                     size_t errlen)
{
    if (limit < 1 || limit > AH_HISTORY_MAX) {
        snprintf(err, errlen, "limit must be between 1 and %d", AH_HISTORY_MAX);
        return AH_EINVAL;
    }
    return st->ops->history(st, limit, out, count, err, errlen);
}

int ah_store_watch_start(ah_store_t *st, const ah_store_listener_t *listener, char *err,
                         size_t errlen)
{
    return st->ops->watch_start(st, listener, err, errlen);
}

int ah_store_put_status(ah_store_t *st, const ah_agent_status_t *rec, double ttl, char *err,
                        size_t errlen)
{
    if (rec == NULL || rec->agent_id[0] == '\0') {
        snprintf(err, errlen, "a status record needs an agent id");
        return AH_EINVAL;
    }
    if (st->ops->put_status == NULL) {
        snprintf(err, errlen, "this store keeps no status records");
        return AH_EUNAVAIL;
    }
    return st->ops->put_status(st, rec, ttl, err, errlen);
}

int ah_store_list_status(ah_store_t *st, ah_agent_status_t **out, int *count, char *err,
                         size_t errlen)
{
    *out = NULL;
    *count = 0;
    if (st->ops->list_status == NULL) {
        snprintf(err, errlen, "this store keeps no status records");
        return AH_EUNAVAIL;
    }
    return st->ops->list_status(st, out, count, err, errlen);
}

int ah_store_lease(ah_store_t *st, ah_lease_op_t op, const char *name, const char *owner,
                   int64_t token, int64_t ttl_ms, ah_lease_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    if (name == NULL || name[0] == '\0' || strlen(name) > AH_NAME_MAX || owner == NULL ||
        owner[0] == '\0' || strlen(owner) > AH_NAME_MAX) {
        snprintf(err, errlen, "a lease needs a name and an owner of 1 to %d bytes", AH_NAME_MAX);
        return AH_EINVAL;
    }
    if (op != AH_LEASE_RELEASE && ttl_ms <= 0) {
        snprintf(err, errlen, "a lease's ttl must be positive");
        return AH_EINVAL;
    }
    if (op != AH_LEASE_ACQUIRE && token <= 0) {
        snprintf(err, errlen, "renewing or releasing a lease needs its token");
        return AH_EINVAL;
    }
    if (st->ops->lease == NULL) {
        snprintf(err, errlen, "this store keeps no leases");
        return AH_EUNAVAIL;
    }
    return st->ops->lease(st, op, name, owner, token, ttl_ms, out, err, errlen);
}

int ah_store_list_leases(ah_store_t *st, ah_lease_t **out, int *count, char *err, size_t errlen)
{
    *out = NULL;
    *count = 0;
    if (st->ops->list_leases == NULL) {
        snprintf(err, errlen, "this store keeps no leases");
        return AH_EUNAVAIL;
    }
    return st->ops->list_leases(st, out, count, err, errlen);
}

ah_lease_t *ah_store_lease_append(ah_lease_t **recs, int *count, int *cap)
{
    if (*count == *cap) {
        int grown = *cap == 0 ? 16 : *cap * 2;
        ah_lease_t *bigger = realloc(*recs, (size_t)grown * sizeof(**recs));
        if (bigger == NULL) {
            return NULL;
        }
        *recs = bigger;
        *cap = grown;
    }
    ah_lease_t *r = &(*recs)[(*count)++];
    memset(r, 0, sizeof(*r));
    return r;
}

void ah_store_close(ah_store_t *st)
{
    if (st != NULL) {
        st->ops->close(st);
    }
}

void ah_store_reporter_init(ah_store_reporter_t *r, const ah_store_listener_t *listener,
                            const char *backend, const char *topology, const char *watch_mode,
                            int64_t min_gap_us)
{
    memset(r, 0, sizeof(*r));
    ah_strlcpy(r->status.backend, backend, sizeof(r->status.backend));
    ah_strlcpy(r->status.topology, topology, sizeof(r->status.topology));
    ah_strlcpy(r->status.watch_mode, watch_mode, sizeof(r->status.watch_mode));
    r->status.latency_ms = -1.0;
    r->listener = listener;
    r->min_gap_us = min_gap_us;
}

void ah_store_report(ah_store_reporter_t *r, bool force)
{
    int64_t now = ah_mono_us();
    if (!force &&
        (r->status.polls == r->reported_polls || now - r->last_report_us < r->min_gap_us)) {
        return;
    }
    if (r->listener->on_status != NULL) {
        r->listener->on_status(r->listener->ud, &r->status);
    }
    r->last_report_us = now;
    r->reported_polls = r->status.polls;
}

bool ah_store_note_connected(ah_store_reporter_t *r, double latency_ms)
{
    if (latency_ms >= 0) {
        r->status.latency_ms = latency_ms;
    }
    if (r->status.connected) {
        return false;
    }
    if (r->ever_connected) {
        r->status.reconnects++;
    }
    r->ever_connected = true;
    r->status.connected = true;
    return true;
}

void ah_store_note_failure(ah_store_reporter_t *r, const char *message)
{
    r->status.connected = false;
    ah_redact_text(message, r->status.last_error, sizeof(r->status.last_error));
    r->status.last_error_us = ah_now_us();
    ah_store_report(r, true);
}

ah_agent_status_t *ah_store_status_append(ah_agent_status_t **recs, int *count, int *cap)
{
    if (*count == *cap) {
        int grown = *cap == 0 ? 16 : *cap * 2;
        ah_agent_status_t *bigger = realloc(*recs, (size_t)grown * sizeof(**recs));
        if (bigger == NULL) {
            return NULL;
        }
        *recs = bigger;
        *cap = grown;
    }
    ah_agent_status_t *r = &(*recs)[(*count)++];
    memset(r, 0, sizeof(*r));
    return r;
}

int ah_store_scope_check(const char *id, const char *selector, ah_control_t *doc, char *why,
                         size_t whylen)
{
    char err[AH_ERRLEN];
    char canonical[AH_SELECTOR_MAX + 1];
    size_t prefix = strlen(AH_STORE_SCOPE_PREFIX);
    if (doc->command == AH_CMD_NONE) {
        snprintf(why, whylen, "unknown command");
        return AH_EINVAL;
    }
    ah_selector_t *sel = ah_selector_parse(selector, err, sizeof(err));
    if (sel == NULL) {
        snprintf(why, whylen, "%s", err);
        return AH_EINVAL;
    }
    int rc =
        ah_selector_empty(sel) ? AH_EINVAL : ah_selector_format(sel, canonical, sizeof(canonical));
    ah_selector_free(sel);
    if (rc != AH_OK) {
        snprintf(why, whylen, "the selector is empty or too long");
        return AH_EINVAL;
    }
    if (strncmp(id, AH_STORE_SCOPE_PREFIX, prefix) != 0 || strcmp(id + prefix, canonical) != 0) {
        snprintf(why, whylen,
                 "_id must be \"" AH_STORE_SCOPE_PREFIX "%s\" (the canonical selector)", canonical);
        return AH_EINVAL;
    }
    ah_strlcpy(doc->selector, canonical, sizeof(doc->selector));
    return AH_OK;
}

bool ah_store_warn_first(ah_store_warned_t *w, const char *id, int64_t version)
{
    unsigned long long key =
        ah_selector_id(id) ^ ((unsigned long long)version * 0x9e3779b97f4a7c15ULL);
    for (size_t i = 0; i < sizeof(w->seen) / sizeof(w->seen[0]); i++) {
        if (w->seen[i] == key) {
            return false;
        }
    }
    w->seen[w->next++ % (sizeof(w->seen) / sizeof(w->seen[0]))] = key;
    return true;
}

int ah_store_history_merge(ah_control_t *out, int *count, const ah_control_t *scopes, int nscopes,
                           int limit)
{
    if (nscopes <= 0) {
        return AH_OK;
    }
    ah_control_t *cluster = malloc((size_t)(*count > 0 ? *count : 1) * sizeof(*cluster));
    if (cluster == NULL) {
        return AH_ENOMEM;
    }
    memcpy(cluster, out, (size_t)*count * sizeof(*cluster));
    int nc = *count, i = 0, j = 0, n = 0;
    while (n < limit && (i < nc || j < nscopes)) {
        bool take_cluster =
            j >= nscopes || (i < nc && cluster[i].timestamp_us >= scopes[j].timestamp_us);
        out[n++] = take_cluster ? cluster[i++] : scopes[j++];
    }
    *count = n;
    free(cluster);
    return AH_OK;
}
