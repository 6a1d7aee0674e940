/* Implementation of ah_fleet.h: the status writer thread. It is started once the agent has left
 * `starting` (the first change after the startup sync) or by the host's first watchdog tick,
 * whichever comes first, so that neither the thread nor the first write (which creates the status
 * records' file of a new embedded store) competes with the agent's start. It sleeps on its own
 * condition variable until the record is due (the heartbeat, ±10% jitter so that a fleet started
 * together spreads its writes), ah_fleet_changed() marks it dirty, or a timed pause expires; it
 * takes a state snapshot and writes with one store call outside its lock. A failed write is retried
 * with capped exponential backoff; the first failure of a streak is logged. */
#include "ah_fleet.h"

#include "ah_log.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef AH_VERSION
#error "AH_VERSION must be defined by the build"
#endif

#define FLEET_RETRY_MIN 0.5 /* seconds: first retry after a failed write */
/* A fleet that sees a pause expire at once spreads its compare-and-set writes over this long. */
#define FLEET_EXPIRY_SPREAD_S 0.25

struct ah_fleet_s {
    const ah_config_t *cfg;
    ah_state_t *state;
    ah_store_t *store;
    char host[AH_NAME_MAX + 1];
    int64_t pid;

    pthread_mutex_t lock; /* guards the flags below */
    pthread_cond_t cond;  /* on CLOCK_MONOTONIC; wakes the writer */
    bool dirty;           /* something changed since the last write began */
    bool recheck;         /* a newer control document arrived: recompute the expiry */
    bool stopping;
    bool waits_stopping; /* ah_fleet_stop_waits() began: no new waits, the waiter ends */
    bool thread_started;
    pthread_t thread;

    /* Waits (ah_fleet_wait), guarded by lock; wait_cond wakes the waiter thread. */
    pthread_cond_t wait_cond;
    pthread_cond_t drain_cond;  /* wakes ah_fleet_drain_waits() when waits were answered */
    bool waits_draining;        /* ah_fleet_drain_waits() began: no new command waits */
    struct fleet_wait_s *waits; /* a list through next */
    bool waiter_started;
    pthread_t waiter;
};

typedef struct fleet_wait_s {
    struct fleet_wait_s *next;
    /* a scoped command: its canonical selector, parsed, and its id (ah_selector_id); sel NULL:
     * the cluster document */
    char selector[AH_SELECTOR_MAX + 1];
    ah_selector_t *sel;
    unsigned long long scope_id;
    bool need_write; /* the command below is still to be written; version unknown */
    bool read_only;  /* ah_fleet_read(): answered after one fresh read, no command, no wait */
    bool need_read;  /* read_only: the control document is still to be read */
    ah_command_t command;
    int64_t if_version;
    int64_t expires_us;
    int64_t drain_ms;
    char reason[AH_REASON_MAX + 1];
    char updated_by[AH_NAME_MAX + 1];
    int command_rc;
    char command_error[AH_ERRLEN];
    ah_control_t doc;
    double seconds;
    int64_t version;
    int64_t started_mono_us;
    int64_t deadline_mono_us;
    ah_fleet_wait_cb cb;
    void *ud;
} fleet_wait_t;

bool ah_fleet_is_stale(const ah_agent_status_t *rec, int64_t now_us, double heartbeat_interval)
{
    double age_s = (double)(now_us - rec->last_seen_us) / 1e6;
    return age_s > heartbeat_interval * AH_FLEET_STALE_HEARTBEATS;
}

/* Writes the acknowledged versions of the matching scopes into out[n] (ah_agent_status_t
 * scope_acks); what does not fit is left out. */
static void fleet_scope_acks(const ah_fleet_t *f, char *out, size_t n)
{
    ah_scope_view_t *scopes = malloc(AH_SCOPES_MAX * sizeof(*scopes));
    size_t used = 0;
    out[0] = '\0';
    if (scopes == NULL) {
        return;
    }
    int count = ah_state_scopes(f->state, scopes, AH_SCOPES_MAX);
    for (int i = 0; i < count; i++) {
        if (!scopes[i].matches || scopes[i].applied_version <= 0) {
            continue;
        }
        char item[64];
        int len =
            snprintf(item, sizeof(item), "%s%016llx=%lld", used > 0 ? "," : "",
                     ah_selector_id(scopes[i].doc.selector), (long long)scopes[i].applied_version);
        if (len < 0 || used + (size_t)len + 1 > n) {
            break;
        }
        memcpy(out + used, item, (size_t)len + 1);
        used += (size_t)len;
    }
    free(scopes);
}

int64_t ah_fleet_scope_ack(const ah_agent_status_t *rec, unsigned long long scope_id)
{
    char key[24];
    snprintf(key, sizeof(key), "%016llx=", scope_id);
    const char *at = rec->scope_acks;
    while ((at = strstr(at, key)) != NULL) {
        if (at == rec->scope_acks || at[-1] == ',') {
            return strtoll(at + strlen(key), NULL, 10);
        }
        at += strlen(key);
    }
    return 0;
}

/* The record the current state shows. */
static void fleet_record(const ah_fleet_t *f, ah_agent_status_t *rec)
{
    ah_state_snapshot_t snap;
    ah_state_snapshot(f->state, &snap);
    memset(rec, 0, sizeof(*rec));
    ah_strlcpy(rec->agent_id, f->cfg->agent_id, sizeof(rec->agent_id));
    ah_strlcpy(rec->state, ah_run_state_name(snap.state), sizeof(rec->state));
    rec->applied_version = snap.applied_version;
    ah_strlcpy(rec->watch_mode, snap.store.watch_mode, sizeof(rec->watch_mode));
    rec->last_seen_us = ah_now_us();
    rec->started_us = snap.started_us;
    ah_strlcpy(rec->host, f->host, sizeof(rec->host));
    rec->pid = f->pid;
    ah_strlcpy(rec->agenthost_version, AH_VERSION, sizeof(rec->agenthost_version));
    rec->batches = (int64_t)snap.batches;
    rec->errors = (int64_t)snap.batch_errors;
    ah_strlcpy(rec->leases, snap.held_leases, sizeof(rec->leases));
    ah_state_labels_text(f->state, rec->labels, sizeof(rec->labels));
    fleet_scope_acks(f, rec->scope_acks, sizeof(rec->scope_acks));
}

/* One write of the current record. 0 or the store's error (err set). */
static int fleet_write(ah_fleet_t *f, char *err, size_t errlen)
{
    ah_agent_status_t rec;
    fleet_record(f, &rec);
    return ah_store_put_status(f->store, &rec, f->cfg->status_ttl, err, errlen);
}

/* ah_cond_wait_until's condition (lock held). */
static bool fleet_has_work(void *arg)
{
    const ah_fleet_t *f = arg;
    return f->dirty || f->stopping || f->recheck;
}

int ah_fleet_issue(ah_state_t *state, ah_store_t *store, const ah_command_req_t *req,
                   ah_control_t *doc, char *err, size_t errlen)
{
    /* Between begin and end this agent logs no cluster transition: its own "Agent paused"
     * follows the "issued" line even when its watcher sees the write first (change streams). */
    ah_state_issue_begin(state);
    int rc = ah_store_command_req(store, req, doc, err, errlen);
    if (rc == AH_OK) {
        char safe_by[AH_NAME_MAX * 4 + 1];
        char safe_reason[AH_REASON_MAX * 4 + 1];
        if (doc->selector[0] != '\0') {
            ah_log_info("Scoped command %s issued for %s: version %lld by %s (reason: %s)",
                        ah_command_name(doc->command), doc->selector, (long long)doc->version,
                        ah_log_escape(doc->updated_by, safe_by, sizeof(safe_by)),
                        ah_log_escape(doc->reason, safe_reason, sizeof(safe_reason)));
        } else {
            ah_log_info("Cluster command %s issued: version %lld by %s (reason: %s)",
                        ah_command_name(doc->command), (long long)doc->version,
                        ah_log_escape(doc->updated_by, safe_by, sizeof(safe_by)),
                        ah_log_escape(doc->reason, safe_reason, sizeof(safe_reason)));
        }
    }
    if ((rc == AH_OK || rc == AH_ECONFLICT) && doc->selector[0] == '\0') {
        /* the issuing agent applies its own command at once (or catches up with the current
         * document), without waiting for its watcher; a scope document arrives through the
         * watcher with the rest of the set */
        ah_state_offer_cluster(state, doc);
    }
    ah_state_issue_end(state);
    return rc;
}

/* Timed pauses this agent is done with: (selector, version) keys, the latest FLEET_ENDED. */
#define FLEET_ENDED 64
typedef struct {
    unsigned long long keys[FLEET_ENDED];
    unsigned next;
} fleet_ended_t;

static unsigned long long pause_key(const char *selector, int64_t version)
{
    return ah_selector_id(selector) ^ ((unsigned long long)version * 0x9e3779b97f4a7c15ULL);
}

static bool ended_has(const fleet_ended_t *e, unsigned long long key)
{
    for (unsigned i = 0; i < FLEET_ENDED; i++) {
        if (e->keys[i] == key) {
            return true;
        }
    }
    return false;
}

/* The timed pause (the cluster's or a scope's) that ends first among those not in ended: its
 * selector ("" for the cluster), version and end (wall clock); false when there is none. */
static bool fleet_timed_pause(const ah_fleet_t *f, const fleet_ended_t *ended, char *selector,
                              size_t selector_len, int64_t *version, int64_t *expires_us)
{
    ah_state_snapshot_t snap;
    bool found = false;
    ah_state_snapshot(f->state, &snap);
    if (snap.cluster_known && snap.cluster.command == AH_CMD_PAUSE &&
        snap.cluster.expires_us != 0 && !ended_has(ended, pause_key("", snap.cluster.version))) {
        selector[0] = '\0';
        *version = snap.cluster.version;
        *expires_us = snap.cluster.expires_us;
        found = true;
    }
    ah_scope_view_t *scopes = malloc(AH_SCOPES_MAX * sizeof(*scopes));
    int count = scopes != NULL ? ah_state_scopes(f->state, scopes, AH_SCOPES_MAX) : 0;
    for (int i = 0; i < count; i++) {
        const ah_control_t *d = &scopes[i].doc;
        if (d->command == AH_CMD_PAUSE && d->expires_us != 0 &&
            (!found || d->expires_us < *expires_us) &&
            !ended_has(ended, pause_key(d->selector, d->version))) {
            ah_strlcpy(selector, d->selector, selector_len);
            *version = d->version;
            *expires_us = d->expires_us;
            found = true;
        }
    }
    free(scopes);
    return found;
}

/* Ends the timed pause `version` of the cluster (selector "") or of a scope that expired at
 * expires_us: one resume conditioned on that version. Returns true when done with it (written,
 * or someone else wrote a newer version); false to try again later (the store failed). */
static bool fleet_end_pause(ah_fleet_t *f, const char *selector, int64_t version,
                            int64_t expires_us)
{
    char when[AH_TIMESTAMP_LEN];
    char reason[AH_SELECTOR_MAX + 160];
    char err[AH_ERRLEN];
    char what[AH_SELECTOR_MAX + 32];
    ah_format_timestamp(expires_us, when);
    if (selector[0] != '\0') {
        snprintf(what, sizeof(what), "scope %s", selector);
        snprintf(reason, sizeof(reason), "timed pause of scope %s version %lld expired at %s",
                 selector, (long long)version, when);
    } else {
        snprintf(what, sizeof(what), "the cluster");
        snprintf(reason, sizeof(reason), "timed pause version %lld expired at %s",
                 (long long)version, when);
    }
    ah_command_req_t req = {.command = AH_CMD_RUNNING,
                            .reason = reason,
                            .updated_by = "system",
                            .agent_id = f->cfg->agent_id,
                            .if_version = version,
                            .selector = selector};
    ah_control_t doc;
    int rc = ah_fleet_issue(f->state, f->store, &req, &doc, err, sizeof(err));
    if (rc == AH_OK) {
        ah_log_info("Timed pause version %lld expired: resumed %s (version %lld)",
                    (long long)version, what, (long long)doc.version);
    } else if (rc == AH_ECONFLICT) {
        ah_log_debug("Timed pause version %lld of %s expired; another writer was first (version "
                     "%lld)",
                     (long long)version, what, (long long)doc.version);
    } else {
        ah_log_warn("Cannot end the expired timed pause version %lld of %s (retrying): %s",
                    (long long)version, what, err);
        return false;
    }
    return true;
}

static void *fleet_main(void *arg)
{
    ah_fleet_t *f = arg;
    unsigned int seed = (unsigned int)(ah_now_us() ^ (f->pid << 16));
    int failures = 0;
    int64_t due_us = 0;  /* monotonic time of the next heartbeat; 0: now */
    fleet_ended_t ended; /* the timed pauses this agent is done with */
    int64_t expiry_retry_us = 0;
    unsigned long long spread_key = 0; /* the timed pause spread_us was drawn for */
    int64_t spread_us = 0;
    char err[AH_ERRLEN];
    char pause_selector[AH_SELECTOR_MAX + 1];

    memset(&ended, 0, sizeof(ended));
    pthread_mutex_lock(&f->lock);
    for (;;) {
        f->recheck = false;
        pthread_mutex_unlock(&f->lock);
        int64_t pause_version = 0, expires_us = 0;
        int64_t wake_us = due_us; /* monotonic */
        bool timed = fleet_timed_pause(f, &ended, pause_selector, sizeof(pause_selector),
                                       &pause_version, &expires_us);
        if (timed) {
            unsigned long long key = pause_key(pause_selector, pause_version);
            if (spread_key != key) {
                spread_key = key;
                spread_us = (int64_t)(ah_jitter(&seed, 0, FLEET_EXPIRY_SPREAD_S) * 1e6);
            }
            /* saturated: expires_us comes from the store, maybe from a foreign writer */
            int64_t expiry_mono = ah_int64_add_sat(
                ah_int64_add_sat(ah_mono_us(), ah_int64_sub_sat(expires_us, ah_now_us())),
                spread_us);
            if (expiry_mono < expiry_retry_us) {
                expiry_mono = expiry_retry_us;
            }
            if (expiry_mono <= ah_mono_us()) {
                if (fleet_end_pause(f, pause_selector, pause_version, expires_us)) {
                    ended.keys[ended.next++ % FLEET_ENDED] = key;
                } else {
                    expiry_retry_us = ah_mono_us() + (int64_t)(FLEET_RETRY_MIN * 1e6);
                }
                pthread_mutex_lock(&f->lock);
                continue;
            }
            if (expiry_mono < wake_us) {
                wake_us = expiry_mono;
            }
        }
        pthread_mutex_lock(&f->lock);
        double wait_s = (double)(wake_us - ah_mono_us()) / 1e6;
        if (wait_s > 0) {
            ah_cond_wait_until(&f->cond, &f->lock, wait_s, fleet_has_work, f);
        }
        if (f->stopping) {
            break;
        }
        if (!f->dirty && ah_mono_us() < due_us) {
            continue; /* a control change, an expiry or an early wake-up */
        }
        f->dirty = false;
        pthread_mutex_unlock(&f->lock);
        int rc = fleet_write(f, err, sizeof(err));
        double next_s;
        if (rc == AH_OK) {
            if (failures > 0) {
                ah_log_info("Agent status record written again");
            }
            failures = 0;
            next_s = f->cfg->heartbeat_interval * ah_jitter(&seed, 0.9, 1.1);
        } else {
            if (failures == 0) {
                ah_log_warn("Cannot write this agent's status record (retrying with backoff): %s",
                            err);
            }
            next_s = ah_backoff(failures, FLEET_RETRY_MIN, f->cfg->heartbeat_interval);
            failures += failures < 64;
        }
        pthread_mutex_lock(&f->lock);
        due_us = ah_mono_us() + (int64_t)(next_s * 1e6);
        if (rc != AH_OK) {
            f->dirty = false; /* a change during a failing streak waits for the retry */
        }
    }
    pthread_mutex_unlock(&f->lock);
    if (fleet_write(f, err, sizeof(err)) != AH_OK) {
        ah_log_warn("Cannot write this agent's final status record: %s", err);
    }
    return NULL;
}

/* ---- waits ----------------------------------------------------------------------------- */

ah_fleet_ack_t ah_fleet_classify(const ah_agent_status_t *rec, int64_t version, int64_t now_us,
                                 double heartbeat_interval)
{
    if (rec->applied_version >= version) {
        return AH_FLEET_ACKNOWLEDGED;
    }
    if (ah_fleet_is_stale(rec, now_us, heartbeat_interval) || strcmp(rec->state, "stopped") == 0 ||
        strcmp(rec->state, "stopping") == 0) {
        return AH_FLEET_EXCLUDED;
    }
    return AH_FLEET_PENDING;
}

ah_fleet_ack_t ah_fleet_classify_scope(const ah_agent_status_t *rec, const ah_selector_t *sel,
                                       int64_t version, int64_t now_us, double heartbeat_interval)
{
    char canonical[AH_SELECTOR_MAX + 1];
    if (!ah_selector_matches_text(sel, rec->labels)) {
        return AH_FLEET_NOT_MATCHED;
    }
    if (ah_selector_format(sel, canonical, sizeof(canonical)) == AH_OK &&
        ah_fleet_scope_ack(rec, ah_selector_id(canonical)) >= version) {
        return AH_FLEET_ACKNOWLEDGED;
    }
    /* not acknowledged: stale or stopping agents are excluded as for the cluster */
    ah_agent_status_t unacknowledged = *rec;
    unacknowledged.applied_version = INT64_MIN;
    return ah_fleet_classify(&unacknowledged, version, now_us, heartbeat_interval);
}

/* Classifies recs for w into acks; fills *out. Returns true when the wait is complete. */
static bool wait_evaluate(const ah_fleet_t *f, const fleet_wait_t *w, const ah_agent_status_t *recs,
                          int count, ah_fleet_ack_t *acks, int64_t now_us, ah_fleet_outcome_t *out)
{
    bool complete = true;
    for (int i = 0; i < count; i++) {
        acks[i] = w->sel != NULL
                      ? ah_fleet_classify_scope(&recs[i], w->sel, w->version, now_us,
                                                f->cfg->heartbeat_interval)
                      : ah_fleet_classify(&recs[i], w->version, now_us, f->cfg->heartbeat_interval);
        /* a shutdown is applied by an agent that stopped, whether or not it saw this version */
        if (acks[i] == AH_FLEET_EXCLUDED && w->command == AH_CMD_SHUTDOWN && !w->read_only &&
            strcmp(recs[i].state, "stopped") == 0 &&
            !ah_fleet_is_stale(&recs[i], now_us, f->cfg->heartbeat_interval)) {
            acks[i] = AH_FLEET_ACKNOWLEDGED;
        }
        complete = complete && acks[i] != AH_FLEET_PENDING;
    }
    out->command_rc = w->command_rc;
    out->command_error = w->command_error;
    out->doc = &w->doc;
    out->version = w->version;
    out->complete = complete;
    out->waited_s = (double)(ah_mono_us() - w->started_mono_us) / 1e6;
    out->recs = recs;
    out->acks = acks;
    out->count = count;
    return complete;
}

/* Waiter thread: writes w's command; on success the wait for its version starts now. */
static void fleet_write_command(ah_fleet_t *f, fleet_wait_t *w)
{
    ah_command_req_t req = {.command = w->command,
                            .reason = w->reason,
                            .updated_by = w->updated_by,
                            .agent_id = f->cfg->agent_id,
                            .if_version = w->if_version,
                            .expires_us = w->expires_us,
                            .selector = w->selector,
                            .drain_ms = w->drain_ms};
    w->command_rc = ah_fleet_issue(f->state, f->store, &req, &w->doc, w->command_error,
                                   sizeof(w->command_error));
    if (w->command_rc == AH_OK) {
        w->version = w->doc.version;
        /* the wait is measured from the request; its deadline from the write */
        w->deadline_mono_us = ah_mono_us() + (int64_t)(w->seconds * 1e6);
    }
}

/* The waiter thread: while waits are pending, one read of every record per AH_FLEET_WAIT_POLL_S
 * answers all of them. At stop, every wait left is answered with complete false. */
static void *waiter_main(void *arg)
{
    ah_fleet_t *f = arg;
    ah_agent_status_t *recs = NULL;
    ah_fleet_ack_t *acks = NULL;
    int count = 0, acks_cap = 0;
    char err[AH_ERRLEN] = "";

    pthread_mutex_lock(&f->lock);
    for (;;) {
        while (f->waits == NULL && !f->waits_stopping) {
            pthread_cond_wait(&f->wait_cond, &f->lock);
        }
        bool stopping = f->waits_stopping;
        /* Commands to write first (one at a time, without the lock): a failed write ends its
         * wait at once; a written one starts waiting for its version now. */
        while (!f->waits_stopping) {
            fleet_wait_t *w = f->waits;
            while (w != NULL && !w->need_write && !w->need_read) {
                w = w->next;
            }
            if (w == NULL) {
                break;
            }
            bool write = w->need_write;
            w->need_write = false; /* w stays linked; only this thread evaluates it */
            w->need_read = false;
            pthread_mutex_unlock(&f->lock);
            if (write) {
                fleet_write_command(f, w);
            } else {
                w->command_rc =
                    ah_store_read(f->store, &w->doc, w->command_error, sizeof(w->command_error));
                w->version = w->doc.version;
            }
            pthread_mutex_lock(&f->lock);
        }
        stopping = f->waits_stopping;
        bool any = f->waits != NULL;
        pthread_mutex_unlock(&f->lock);
        if (any) { /* also when stopping: the answers say what is known now */
            ah_agent_status_t *fresh = NULL;
            int fresh_count = 0;
            if (ah_store_list_status(f->store, &fresh, &fresh_count, err, sizeof(err)) == AH_OK) {
                free(recs);
                recs = fresh;
                count = fresh_count;
                err[0] = '\0';
            }
            if (count > acks_cap) {
                ah_fleet_ack_t *bigger = realloc(acks, (size_t)count * sizeof(*acks));
                if (bigger == NULL) {
                    count = 0; /* answered as "nothing known" rather than not at all */
                    snprintf(err, sizeof(err), "out of memory reading the status records");
                } else {
                    acks = bigger;
                    acks_cap = count;
                }
            }
        }
        /* Take the waits that are done off the list, then answer them without the lock. */
        int64_t now_us = ah_now_us();
        int64_t now_mono = ah_mono_us();
        fleet_wait_t *done = NULL;
        int64_t next_deadline = now_mono + (int64_t)(AH_FLEET_WAIT_POLL_S * 1e6);
        pthread_mutex_lock(&f->lock);
        stopping = f->waits_stopping;
        for (fleet_wait_t **pp = &f->waits; *pp != NULL;) {
            fleet_wait_t *w = *pp;
            ah_fleet_outcome_t outcome;
            /* A round whose read of the records failed (err set) never completes a wait: the
             * records it would judge are stale or missing, and judged with the current clock
             * every agent would look stale, i.e. excluded, i.e. "complete". */
            bool complete = w->command_rc == AH_OK && !w->need_write && err[0] == '\0' &&
                            wait_evaluate(f, w, recs, count, acks, now_us, &outcome);
            if ((w->need_write || w->need_read) && !stopping) {
                pp = &w->next; /* written / read on the next round */
                next_deadline = now_mono;
                continue;
            }
            if (w->read_only && w->command_rc == AH_OK && err[0] != '\0') {
                w->command_rc = AH_EUNAVAIL; /* this round's read of the records failed */
                ah_strlcpy(w->command_error, err, sizeof(w->command_error));
            }
            if (complete || stopping || w->read_only || w->command_rc != AH_OK ||
                now_mono >= w->deadline_mono_us) {
                *pp = w->next;
                w->next = done;
                done = w;
                continue;
            }
            if (w->deadline_mono_us < next_deadline) {
                next_deadline = w->deadline_mono_us;
            }
            pp = &w->next;
        }
        pthread_mutex_unlock(&f->lock);
        while (done != NULL) {
            fleet_wait_t *w = done;
            done = w->next;
            ah_fleet_outcome_t outcome;
            if (w->need_write || w->need_read) { /* stopping before it was written / read */
                w->command_rc = AH_EUNAVAIL;
                ah_strlcpy(w->command_error, "the agent is shutting down",
                           sizeof(w->command_error));
            }
            wait_evaluate(f, w, w->command_rc == AH_OK ? recs : NULL,
                          w->command_rc == AH_OK ? count : 0, acks, now_us, &outcome);
            outcome.error = err;
            if (err[0] != '\0') {
                outcome.complete = false; /* judged without this round's records */
            }
            w->cb(w->ud, &outcome);
            ah_selector_free(w->sel);
            free(w);
        }
        pthread_mutex_lock(&f->lock);
        pthread_cond_broadcast(&f->drain_cond);
        if (stopping && f->waits == NULL) {
            break;
        }
        if (f->waits != NULL && !f->waits_stopping) {
            double wait_s = (double)(next_deadline - ah_mono_us()) / 1e6;
            if (wait_s > 0) {
                struct timespec ts;
                ah_mono_deadline(wait_s, &ts);
                pthread_cond_timedwait(&f->wait_cond, &f->lock, &ts);
            }
        }
    }
    pthread_mutex_unlock(&f->lock);
    free(recs);
    free(acks);
    return NULL;
}

/* Links w into the waits and wakes the waiter (started by the first wait). AH_EUNAVAIL (w freed)
 * when stopping or when the waiter cannot be started. */
static int fleet_add_wait(ah_fleet_t *f, fleet_wait_t *w)
{
    pthread_mutex_lock(&f->lock);
    if (f->waits_stopping || (f->waits_draining && !w->read_only)) {
        pthread_mutex_unlock(&f->lock);
        free(w);
        return AH_EUNAVAIL;
    }
    if (!f->waiter_started) { /* the first wait starts the waiter: most agents never need it */
        int rc = pthread_create(&f->waiter, NULL, waiter_main, f);
        if (rc != 0) {
            pthread_mutex_unlock(&f->lock);
            free(w);
            ah_log_error("Cannot start the fleet waiter thread: %s", strerror(rc));
            return AH_EUNAVAIL;
        }
        f->waiter_started = true;
    }
    w->next = f->waits;
    f->waits = w;
    pthread_cond_signal(&f->wait_cond);
    pthread_mutex_unlock(&f->lock);
    return AH_OK;
}

int ah_fleet_command_wait(ah_fleet_t *f, const ah_command_req_t *req, double seconds,
                          int64_t started_mono_us, ah_fleet_wait_cb cb, void *ud)
{
    if (!(seconds > 0) || seconds > AH_FLEET_WAIT_MAX_S) {
        return AH_EINVAL;
    }
    fleet_wait_t *w = calloc(1, sizeof(*w));
    if (w == NULL) {
        return AH_ENOMEM;
    }
    if (req->selector != NULL && req->selector[0] != '\0') {
        char err[AH_ERRLEN];
        w->sel = ah_selector_parse(req->selector, err, sizeof(err));
        if (w->sel == NULL) {
            free(w);
            return AH_EINVAL;
        }
        ah_strlcpy(w->selector, req->selector, sizeof(w->selector));
        w->scope_id = ah_selector_id(w->selector);
    }
    w->need_write = true;
    w->command = req->command;
    w->if_version = req->if_version;
    w->expires_us = req->expires_us;
    w->drain_ms = req->drain_ms;
    ah_strlcpy(w->reason, req->reason, sizeof(w->reason));
    ah_strlcpy(w->updated_by, req->updated_by, sizeof(w->updated_by));
    w->seconds = seconds;
    w->started_mono_us = started_mono_us;
    w->deadline_mono_us = INT64_MAX;
    w->cb = cb;
    w->ud = ud;
    return fleet_add_wait(f, w);
}

int ah_fleet_read(ah_fleet_t *f, ah_fleet_wait_cb cb, void *ud)
{
    fleet_wait_t *w = calloc(1, sizeof(*w));
    if (w == NULL) {
        return AH_ENOMEM;
    }
    w->read_only = true;
    w->need_read = true;
    w->started_mono_us = ah_mono_us();
    w->deadline_mono_us = INT64_MAX;
    w->cb = cb;
    w->ud = ud;
    return fleet_add_wait(f, w);
}

int ah_fleet_wait(ah_fleet_t *f, int64_t version, double seconds, int64_t started_mono_us,
                  ah_fleet_wait_cb cb, void *ud)
{
    if (!(seconds > 0) || seconds > AH_FLEET_WAIT_MAX_S) {
        return AH_EINVAL;
    }
    fleet_wait_t *w = calloc(1, sizeof(*w));
    if (w == NULL) {
        return AH_ENOMEM;
    }
    w->version = version;
    w->started_mono_us = started_mono_us;
    w->deadline_mono_us = started_mono_us + (int64_t)(seconds * 1e6);
    w->cb = cb;
    w->ud = ud;
    return fleet_add_wait(f, w);
}

ah_fleet_t *ah_fleet_start(const ah_config_t *cfg, ah_state_t *state, ah_store_t *store, char *err,
                           size_t errlen)
{
    ah_fleet_t *f = calloc(1, sizeof(*f));
    if (f == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    f->cfg = cfg;
    f->state = state;
    f->store = store;
    f->pid = (int64_t)getpid();
    if (gethostname(f->host, sizeof(f->host) - 1) != 0) {
        ah_strlcpy(f->host, "", sizeof(f->host));
    }
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->cond, &attr);
    pthread_cond_init(&f->wait_cond, &attr);
    pthread_cond_init(&f->drain_cond, &attr);
    pthread_condattr_destroy(&attr);
    return f; /* the writer starts with ah_fleet_start_writer(), the waiter with the first wait */
}

/* Starts the writer thread unless it runs or has ended (f->lock held). A failure is logged: the
 * next call tries again. */
static void start_writer_locked(ah_fleet_t *f)
{
    if (f->thread_started || f->stopping) {
        return;
    }
    int rc = pthread_create(&f->thread, NULL, fleet_main, f);
    if (rc != 0) {
        ah_log_warn("Cannot start the status writer thread (retrying): %s", strerror(rc));
        return;
    }
    f->thread_started = true;
}

void ah_fleet_start_writer(ah_fleet_t *f)
{
    if (f == NULL) {
        return;
    }
    pthread_mutex_lock(&f->lock);
    start_writer_locked(f);
    pthread_mutex_unlock(&f->lock);
}

void ah_fleet_changed(ah_fleet_t *f)
{
    if (f == NULL) {
        return;
    }
    /* read before the lock: the state object calls without its own lock held */
    bool synced = ah_state_get(f->state) != AH_STATE_STARTING;
    pthread_mutex_lock(&f->lock);
    f->dirty = true;
    if (synced) {
        start_writer_locked(f);
    }
    pthread_cond_signal(&f->cond);
    pthread_mutex_unlock(&f->lock);
}

void ah_fleet_control_changed(ah_fleet_t *f)
{
    if (f == NULL) {
        return;
    }
    pthread_mutex_lock(&f->lock);
    f->recheck = true;
    pthread_cond_signal(&f->cond);
    pthread_mutex_unlock(&f->lock);
}

static bool no_shutdown_wait(void *arg)
{
    const ah_fleet_t *f = arg;
    for (const fleet_wait_t *w = f->waits; w != NULL; w = w->next) {
        if (w->command == AH_CMD_SHUTDOWN && !w->read_only) {
            return false;
        }
    }
    return true;
}

void ah_fleet_drain_waits(ah_fleet_t *f, double seconds)
{
    if (f == NULL) {
        return;
    }
    pthread_mutex_lock(&f->lock);
    f->waits_draining = true;
    if (f->waiter_started && !f->waits_stopping) {
        ah_cond_wait_until(&f->drain_cond, &f->lock, seconds, no_shutdown_wait, f);
    }
    pthread_mutex_unlock(&f->lock);
}

void ah_fleet_stop_waits(ah_fleet_t *f)
{
    if (f == NULL) {
        return;
    }
    pthread_mutex_lock(&f->lock);
    f->waits_stopping = true;
    bool waiter = f->waiter_started;
    f->waiter_started = false;
    pthread_cond_signal(&f->wait_cond);
    pthread_mutex_unlock(&f->lock);
    if (waiter) {
        pthread_join(f->waiter, NULL); /* answers every wait left */
    }
}

void ah_fleet_stop(ah_fleet_t *f)
{
    if (f == NULL) {
        return;
    }
    ah_fleet_stop_waits(f);
    pthread_mutex_lock(&f->lock);
    f->stopping = true;
    bool started = f->thread_started;
    f->thread_started = false;
    pthread_cond_signal(&f->cond);
    pthread_mutex_unlock(&f->lock);
    if (started) {
        pthread_join(f->thread, NULL);
    }
}

void ah_fleet_free(ah_fleet_t *f)
{
    if (f == NULL) {
        return;
    }
    ah_fleet_stop(f);
    pthread_cond_destroy(&f->drain_cond);
    pthread_cond_destroy(&f->wait_cond);
    pthread_cond_destroy(&f->cond);
    pthread_mutex_destroy(&f->lock);
    free(f);
}
