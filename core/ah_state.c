/* Implementation of ah_state.h: one mutex guards everything; one condition variable wakes the
 * Lua worker (and agent.sleep) when a command arrives. The few fields the worker touches on every
 * batch (run state, "an event is pending", the call marker, batch counters) are atomics so that
 * an empty batch costs no lock: they are written under the mutex where they must agree with other
 * fields, and read without it. */
#include "ah_state.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RELOAD_OUTCOMES 8 /* reload outcomes kept for requesters that have not looked yet */

struct ah_state_s {
    pthread_mutex_t lock;
    pthread_mutex_t issue_lock; /* serialises the threads issuing cluster commands (see .h) */
    int issuing;                /* under lock: issues between begin and end */
    pthread_cond_t issued;      /* signalled when issuing drops */
    pthread_cond_t wake;        /* signalled when an event becomes pending */
    _Atomic int state;          /* ah_run_state_t; written under lock, read lock-free */
    bool cluster_known;
    ah_control_t cluster;
    int64_t seen_version; /* highest cluster version offered */
    int64_t applied_version;
    char held_leases[AH_HELD_LEASES_MAX + 1];
    bool local_override;
    atomic_bool has_event; /* written under lock; read lock-free as a hint */
    ah_event_t pending;
    bool shutdown_final; /* a local/signal shutdown is pending or applied: nothing replaces it */
    int64_t stop_requested_us; /* monotonic: when the pending or applied shutdown was offered */
    _Atomic bool held;         /* paused because the cluster command was shutdown at startup (the
                                  table's "held" row); written under lock by the worker */
    ah_store_status_t store;
    _Atomic uint64_t batches;      /* written by the worker only (ah_state_count_batch) */
    _Atomic uint64_t batch_errors; /* written by the worker only */
    uint64_t batch_overruns;
    uint64_t commands_applied;
    uint64_t hook_errors;
    int64_t started_us;
    _Atomic int64_t call_started_us;  /* 0: unstamped (ah_state_call_stamp) */
    _Atomic uint64_t call_generation; /* number of the running call, 0 if none (worker only) */
    _Atomic uint64_t calls_begun;     /* calls numbered so far (worker only) */
    atomic_bool call_overrun;
    double last_control_lag_ms;
    /* Script reload: requests are numbered; the worker completes them in order. */
    _Atomic uint64_t reload_requested; /* number of the latest request */
    _Atomic uint64_t reload_done;      /* number of the latest completed request */
    _Atomic uint64_t reload_serving;   /* the request the worker took (its load may be running) */
    /* The outcomes of the latest reloads: entry i answered every request numbered from the
     * previous entry's `upto` + 1 through its own `upto` (requests merged into one load). */
    struct {
        uint64_t upto;
        bool ok;
        char error[AH_ERRLEN];
    } reload_outcomes[RELOAD_OUTCOMES];
    unsigned reload_next; /* slot of reload_outcomes written next */
    uint64_t reloads;
    uint64_t reload_failures;
    /* The fleet listener: told (without the lock) when what a status record shows changes, or a
     * newer control document arrives; set before threads. */
    void (*fleet_listener)(void *ud, bool record_changed);
    void *fleet_listener_ud;
    int64_t pause_drain_us;    /* PAUSE_DRAIN_TIMEOUT (µs; 0: none); set before threads start */
    int64_t shutdown_drain_us; /* bound of a shutdown's drain from its request (µs; 0: none) */
    void (*waker)(void *ud);   /* set once before threads start (ah_state_set_waker) */
    void *waker_ud;
    /* The change listener; listener_lock is taken around every call and every change of it
     * (never while `lock` is held), so removing it waits for a call in progress. */
    pthread_mutex_t listener_lock;
    void (*on_change)(void *ud);
    void *on_change_ud;
    /* Labels and scopes (ah_state_offer_scopes): set before threads / under lock. */
    ah_labels_t *labels;
    char labels_text[AH_LABELS_TEXT_MAX + 1];
    ah_scope_view_t scopes[AH_SCOPES_MAX]; /* sorted by selector */
    unsigned long long scope_ids[AH_SCOPES_MAX];
    int scope_count;
    ah_command_t effective; /* of the last cluster/startup event offered; AH_CMD_NONE before */
};

static const char *const state_names[] = {"starting", "running", "paused", "stopping", "stopped"};

const char *ah_run_state_name(ah_run_state_t st)
{
    if ((unsigned)st > AH_STATE_STOPPED) {
        return "unknown";
    }
    return state_names[st];
}

/* The rows of the transition table: the run states, plus "held", the paused state of an agent
 * that started while the cluster command was shutdown. It is "paused" to everyone else; it
 * differs in what it accepts: only a cluster command releases it (an operator resumes the
 * cluster), a local resume is refused. */
enum { ROW_HELD = AH_STATE_STOPPED + 1, ROW_COUNT };
/* The columns' second index: where a command comes from. */
enum {
    ORIGIN_CLUSTER = 0 /* cluster and startup sync */,
    ORIGIN_LOCAL /* API, signal */,
    ORIGIN_COUNT
};

typedef struct {
    int to; /* a row */
    ah_hook_t hook;
    int rc; /* AH_OK, AH_ENOOP or AH_EREFUSED; a missing entry (stopping, stopped) is AH_EINVAL */
} transition_t;

#define BOTH(to, hook, rc)                                                                         \
    {                                                                                              \
        {to, hook, rc},                                                                            \
        {                                                                                          \
            to, hook, rc                                                                           \
        }                                                                                          \
    }

/* The transition table: target row and hook for each (row, command, origin). */
static const transition_t transitions[ROW_COUNT][AH_CMD_SHUTDOWN + 1][ORIGIN_COUNT] =
    {
        [AH_STATE_STARTING] =
            {
                [AH_CMD_PAUSE] = BOTH(AH_STATE_PAUSED, AH_HOOK_PAUSE, AH_OK),
                [AH_CMD_RUNNING] = BOTH(AH_STATE_RUNNING, AH_HOOK_NONE, AH_OK),
                /* The cluster was shut down before this agent started: hold it paused and
                 * reachable, so that an operator can resume the cluster through any pod. */
                [AH_CMD_SHUTDOWN] = {[ORIGIN_CLUSTER] = {ROW_HELD, AH_HOOK_PAUSE, AH_OK},
                                     [ORIGIN_LOCAL] = {AH_STATE_STOPPING, AH_HOOK_SHUTDOWN, AH_OK}},
            },
        [AH_STATE_RUNNING] =
            {
                [AH_CMD_PAUSE] = BOTH(AH_STATE_PAUSED, AH_HOOK_PAUSE, AH_OK),
                [AH_CMD_RUNNING] = BOTH(AH_STATE_RUNNING, AH_HOOK_NONE, AH_ENOOP),
                [AH_CMD_SHUTDOWN] = BOTH(AH_STATE_STOPPING, AH_HOOK_SHUTDOWN, AH_OK),
            },
        [AH_STATE_PAUSED] =
            {
                [AH_CMD_PAUSE] = BOTH(AH_STATE_PAUSED, AH_HOOK_NONE, AH_ENOOP),
                [AH_CMD_RUNNING] = BOTH(AH_STATE_RUNNING, AH_HOOK_RESUME, AH_OK),
                [AH_CMD_SHUTDOWN] = BOTH(AH_STATE_STOPPING, AH_HOOK_SHUTDOWN, AH_OK),
            },
        [ROW_HELD] =
            {
                /* A cluster pause replaces the shutdown: an ordinary pause from now on. */
                [AH_CMD_PAUSE] = {[ORIGIN_CLUSTER] = {AH_STATE_PAUSED, AH_HOOK_NONE, AH_OK},
                                  [ORIGIN_LOCAL] = {ROW_HELD, AH_HOOK_NONE, AH_ENOOP}},
                [AH_CMD_RUNNING] = {[ORIGIN_CLUSTER] = {AH_STATE_RUNNING, AH_HOOK_RESUME, AH_OK},
                                    [ORIGIN_LOCAL] = {ROW_HELD, AH_HOOK_NONE, AH_EREFUSED}},
                [AH_CMD_SHUTDOWN] = BOTH(AH_STATE_STOPPING, AH_HOOK_SHUTDOWN, AH_OK),
            },
};

/* Looks up (row, cmd, src): 0 (or AH_ENOOP / AH_EREFUSED) with the target row and hook, or
 * AH_EINVAL when the row accepts no commands. */
static int target_row(int row, ah_command_t cmd, ah_source_t src, int *to, ah_hook_t *hook)
{
    if (cmd == AH_CMD_NONE || (unsigned)cmd > AH_CMD_SHUTDOWN || row < 0 || row >= ROW_COUNT ||
        row == AH_STATE_STOPPING || row == AH_STATE_STOPPED) {
        return AH_EINVAL;
    }
    int origin =
        src == AH_SOURCE_CLUSTER || src == AH_SOURCE_STARTUP ? ORIGIN_CLUSTER : ORIGIN_LOCAL;
    const transition_t *t = &transitions[row][cmd][origin];
    *to = t->to;
    *hook = t->hook;
    return t->rc;
}

/* A row as the run state everyone sees: held is paused. */
static ah_run_state_t row_state(int row)
{
    return row == ROW_HELD ? AH_STATE_PAUSED : (ah_run_state_t)row;
}

static int target(int row, ah_command_t cmd, ah_source_t src, ah_run_state_t *to, bool *held,
                  ah_hook_t *hook)
{
    int to_row = row;
    int rc = target_row(row, cmd, src, &to_row, hook);
    if (rc == AH_OK || rc == AH_ENOOP || rc == AH_EREFUSED) {
        *to = row_state(to_row);
        *held = to_row == ROW_HELD;
    }
    return rc;
}

int ah_state_target(ah_run_state_t from, ah_command_t cmd, ah_source_t src, ah_run_state_t *to,
                    ah_hook_t *hook)
{
    bool held;
    if ((unsigned)from > AH_STATE_STOPPED) {
        return AH_EINVAL;
    }
    return target((int)from, cmd, src, to, &held, hook);
}

int ah_state_target_held(ah_command_t cmd, ah_source_t src, ah_run_state_t *to, bool *held,
                         ah_hook_t *hook)
{
    return target(ROW_HELD, cmd, src, to, held, hook);
}

ah_state_t *ah_state_new(void)
{
    ah_state_t *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        return NULL;
    }
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->listener_lock, NULL);
    pthread_mutex_init(&s->issue_lock, NULL);
    pthread_cond_init(&s->wake, &attr);
    pthread_cond_init(&s->issued, &attr);
    pthread_condattr_destroy(&attr);
    s->state = AH_STATE_STARTING;
    s->started_us = ah_now_us();
    s->store.latency_ms = -1;
    s->last_control_lag_ms = -1;
    ah_strlcpy(s->store.backend, "none", sizeof(s->store.backend));
    ah_strlcpy(s->store.topology, "unknown", sizeof(s->store.topology));
    return s;
}

void ah_state_free(ah_state_t *s)
{
    if (s == NULL) {
        return;
    }
    pthread_cond_destroy(&s->wake);
    pthread_cond_destroy(&s->issued);
    pthread_mutex_destroy(&s->issue_lock);
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->listener_lock);
    ah_labels_free(s->labels);
    free(s);
}

void ah_state_set_waker(ah_state_t *s, void (*fn)(void *ud), void *ud)
{
    pthread_mutex_lock(&s->lock);
    s->waker = fn;
    s->waker_ud = ud;
    pthread_mutex_unlock(&s->lock);
}

/* Calls the waker, if any. Lock not held. */
static void call_waker(ah_state_t *s)
{
    if (s->waker != NULL) {
        s->waker(s->waker_ud);
    }
}

/* Tells the change listener, if any. Called without s->lock held. */
static void notify_change(ah_state_t *s)
{
    pthread_mutex_lock(&s->listener_lock);
    if (s->on_change != NULL) {
        s->on_change(s->on_change_ud);
    }
    pthread_mutex_unlock(&s->listener_lock);
}

void ah_state_set_change_listener(ah_state_t *s, void (*fn)(void *ud), void *ud)
{
    pthread_mutex_lock(&s->listener_lock);
    s->on_change = fn;
    s->on_change_ud = fn != NULL ? ud : NULL;
    pthread_mutex_unlock(&s->listener_lock);
}

void ah_state_set_drain_limits(ah_state_t *s, double pause_s, double shutdown_s)
{
    pthread_mutex_lock(&s->lock);
    s->pause_drain_us = pause_s > 0 ? (int64_t)(pause_s * 1e6) : 0;
    s->shutdown_drain_us = shutdown_s > 0 ? (int64_t)(shutdown_s * 1e6) : 0;
    pthread_mutex_unlock(&s->lock);
}

/* The monotonic drain deadline of ev, offered now (lock held). A cluster command's deadline is
 * its timestamp + drain on the wall clock, so every agent cuts its call at the same moment; it is
 * kept within [now, now + drain] so that a skewed clock or a late delivery can neither lengthen a
 * drain nor make it negative. A pause without drain gets PAUSE_DRAIN_TIMEOUT's; a shutdown's is
 * at most its bound from the request. A startup sync has none (it is applied when init
 * returns). */
static int64_t drain_deadline_locked(const ah_state_t *s, const ah_event_t *ev)
{
    if (ev->source == AH_SOURCE_STARTUP ||
        (ev->command != AH_CMD_PAUSE && ev->command != AH_CMD_SHUTDOWN)) {
        return 0;
    }
    int64_t now_mono_us = ah_mono_us();
    int64_t deadline_us = 0;
    int64_t drain_us = ah_int64_mul_sat(ev->drain_ms, 1000);
    if (drain_us > 0) {
        int64_t left_us = drain_us;
        if (ev->source == AH_SOURCE_CLUSTER && ev->timestamp_us > 0) {
            int64_t now_us = ah_now_us();
            int64_t end_us =
                ev->timestamp_us > INT64_MAX - drain_us ? INT64_MAX : ev->timestamp_us + drain_us;
            left_us = end_us <= now_us             ? 0
                      : end_us - now_us > drain_us ? drain_us
                                                   : end_us - now_us;
        }
        deadline_us = now_mono_us + left_us;
    } else if (ev->command == AH_CMD_PAUSE && s->pause_drain_us > 0) {
        deadline_us = now_mono_us + s->pause_drain_us;
    }
    if (ev->command == AH_CMD_SHUTDOWN && s->shutdown_drain_us > 0) {
        int64_t requested_us = s->stop_requested_us != 0 ? s->stop_requested_us : now_mono_us;
        int64_t bound_us = requested_us + s->shutdown_drain_us;
        if (deadline_us == 0 || bound_us < deadline_us) {
            deadline_us = bound_us;
        }
    }
    return deadline_us;
}

static void set_pending(ah_state_t *s, const ah_event_t *ev)
{
    s->pending = *ev;
    s->pending.drain_deadline_us = drain_deadline_locked(s, ev);
    s->has_event = true;
    pthread_cond_broadcast(&s->wake);
}

void ah_state_set_fleet_listener(ah_state_t *s, void (*fn)(void *ud, bool record_changed), void *ud)
{
    s->fleet_listener = fn;
    s->fleet_listener_ud = ud;
}

/* Tells the fleet listener, if any. Called without the lock. */
static void notify_fleet(ah_state_t *s, bool record_changed)
{
    if (s->fleet_listener != NULL) {
        s->fleet_listener(s->fleet_listener_ud, record_changed);
    }
}

void ah_state_set_held_leases(ah_state_t *s, const char *names)
{
    pthread_mutex_lock(&s->lock);
    bool changed = strncmp(s->held_leases, names, sizeof(s->held_leases) - 1) != 0;
    ah_strlcpy(s->held_leases, names, sizeof(s->held_leases));
    pthread_mutex_unlock(&s->lock);
    if (changed) {
        notify_fleet(s, true);
    }
}

/* How restrictive a command is: shutdown > pause > running. */
static int command_rank(ah_command_t cmd)
{
    return cmd == AH_CMD_SHUTDOWN ? 2 : cmd == AH_CMD_PAUSE ? 1 : cmd == AH_CMD_RUNNING ? 0 : -1;
}

/* The effective command (lock held): the most restrictive of the cluster document and every
 * matching scope; *decider is the document that decides it (the cluster's on a tie). */
static ah_command_t effective_locked(const ah_state_t *s, const ah_control_t **decider)
{
    ah_command_t eff = s->cluster.command;
    *decider = &s->cluster;
    for (int i = 0; i < s->scope_count; i++) {
        const ah_scope_view_t *v = &s->scopes[i];
        if (v->matches && command_rank(v->doc.command) > command_rank(eff)) {
            eff = v->doc.command;
            *decider = &v->doc;
        }
    }
    return eff;
}

/* After `trigger` (the cluster document or a matching scope) changed: makes the effective
 * command pending (lock held). See ah_event_t.refresh. */
static void offer_effective_locked(ah_state_t *s, const ah_control_t *trigger)
{
    if (!s->cluster_known || s->shutdown_final) {
        return;
    }
    const ah_control_t *decider;
    ah_command_t eff = effective_locked(s, &decider);
    bool starting = s->state == AH_STATE_STARTING;
    const ah_control_t *from = trigger->command == eff ? trigger : decider;
    ah_event_t ev = {
        .command = eff,
        .version = s->cluster.version,
        .timestamp_us = from->timestamp_us,
        .source = starting ? AH_SOURCE_STARTUP : AH_SOURCE_CLUSTER,
        .refresh = !starting && s->effective == eff && trigger->command != eff,
        .drain_ms = from->drain_ms,
    };
    ah_strlcpy(ev.reason, from->reason, sizeof(ev.reason));
    ah_strlcpy(ev.updated_by, from->updated_by, sizeof(ev.updated_by));
    ah_strlcpy(ev.scope, from->selector, sizeof(ev.scope));
    for (int i = 0; i < s->scope_count; i++) {
        if (s->scopes[i].matches) {
            ev.scope_acks[ev.scope_ack_count].id = s->scope_ids[i];
            ev.scope_acks[ev.scope_ack_count].version = s->scopes[i].doc.version;
            ev.scope_ack_count++;
        }
    }
    s->effective = eff;
    if (ev.refresh && s->has_event && !s->pending.refresh) {
        /* a command is already pending: it stays, and acknowledges these versions too */
        if (s->pending.source == AH_SOURCE_CLUSTER || s->pending.source == AH_SOURCE_STARTUP) {
            s->pending.version = ev.version;
            s->pending.scope_ack_count = ev.scope_ack_count;
            memcpy(s->pending.scope_acks, ev.scope_acks, sizeof(ev.scope_acks));
        }
        return;
    }
    set_pending(s, &ev);
    if (!ev.refresh && ev.source == AH_SOURCE_CLUSTER && s->state != AH_STATE_STOPPING) {
        /* latest wins: a pending cluster shutdown replaced by a resume no longer stops */
        s->stop_requested_us = ev.command != AH_CMD_SHUTDOWN ? 0
                               : s->stop_requested_us != 0   ? s->stop_requested_us
                                                             : ah_mono_us();
    }
}

void ah_state_offer_cluster(ah_state_t *s, const ah_control_t *doc)
{
    pthread_mutex_lock(&s->lock);
    if (s->cluster_known && doc->version <= s->seen_version) {
        pthread_mutex_unlock(&s->lock);
        return;
    }
    s->cluster = *doc;
    s->cluster.selector[0] = '\0';
    s->cluster_known = true;
    s->seen_version = doc->version;
    offer_effective_locked(s, &s->cluster);
    pthread_mutex_unlock(&s->lock);
    notify_fleet(s, false);
    call_waker(s);
    notify_change(s);
}

/* True when the canonical selector text matches labels. */
static bool selector_text_matches(const char *selector, const ah_labels_t *labels)
{
    char err[AH_ERRLEN];
    ah_selector_t *sel = ah_selector_parse(selector, err, sizeof(err));
    bool matches = sel != NULL && !ah_selector_empty(sel) && ah_selector_matches(sel, labels);
    ah_selector_free(sel);
    return matches;
}

void ah_state_offer_scopes(ah_state_t *s, const ah_control_t *scopes, int count)
{
    if (count > AH_SCOPES_MAX) {
        count = AH_SCOPES_MAX;
    }
    if (count < 0) {
        count = 0;
    }
    ah_scope_view_t *fresh = calloc((size_t)(count > 0 ? count : 1), sizeof(*fresh));
    if (fresh == NULL) {
        return; /* the next change delivers the set again */
    }
    /* a matching scope that disappeared lifts what it commanded: a resume from nobody */
    static const ah_control_t removed = {.command = AH_CMD_RUNNING,
                                         .reason = "scope document removed"};
    ah_control_t gone = removed;
    const ah_control_t *changed[AH_SCOPES_MAX + 1];
    int changed_count = 0;
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < count; i++) {
        const ah_scope_view_t *old = NULL;
        for (int j = 0; j < s->scope_count; j++) {
            if (strcmp(s->scopes[j].doc.selector, scopes[i].selector) == 0) {
                old = &s->scopes[j];
                break;
            }
        }
        fresh[i].doc = scopes[i];
        fresh[i].matches = selector_text_matches(scopes[i].selector, s->labels);
        fresh[i].applied_version = old != NULL ? old->applied_version : 0;
        if (fresh[i].matches && (old == NULL || old->doc.version != scopes[i].version ||
                                 old->doc.command != scopes[i].command)) {
            changed[changed_count++] = &fresh[i].doc;
        }
    }
    for (int j = 0; j < s->scope_count; j++) {
        bool kept = false;
        for (int i = 0; i < count && !kept; i++) {
            kept = strcmp(s->scopes[j].doc.selector, scopes[i].selector) == 0;
        }
        if (!kept && s->scopes[j].matches && s->scopes[j].doc.command != AH_CMD_RUNNING &&
            gone.selector[0] == '\0') {
            ah_strlcpy(gone.selector, s->scopes[j].doc.selector, sizeof(gone.selector));
            gone.timestamp_us = ah_now_us();
            changed[changed_count++] = &gone;
        }
    }
    for (int i = 0; i < count; i++) {
        s->scopes[i] = fresh[i];
        s->scope_ids[i] = ah_selector_id(fresh[i].doc.selector);
    }
    s->scope_count = count;
    bool offered = changed_count > 0 && s->cluster_known && !s->shutdown_final;
    if (offered) {
        /* the changed document that speaks for the new effective command, else the first */
        const ah_control_t *decider;
        ah_command_t eff = effective_locked(s, &decider);
        const ah_control_t *trigger = changed[0];
        for (int i = 0; i < changed_count; i++) {
            if (changed[i]->command == eff) {
                trigger = changed[i];
                break;
            }
        }
        /* `changed` points into `fresh`, copied into s->scopes in the same order */
        for (int i = 0; i < count; i++) {
            if (trigger == &fresh[i].doc) {
                trigger = &s->scopes[i].doc;
            }
        }
        offer_effective_locked(s, trigger);
    }
    pthread_mutex_unlock(&s->lock);
    free(fresh);
    notify_fleet(s, false); /* also a non-matching timed scope pause: its expiry is watched */
    if (offered) {
        call_waker(s);
    }
    notify_change(s);
}

int ah_state_scopes(ah_state_t *s, ah_scope_view_t *out, int max)
{
    pthread_mutex_lock(&s->lock);
    int n = s->scope_count < max ? s->scope_count : max;
    for (int i = 0; i < n; i++) {
        out[i] = s->scopes[i];
    }
    pthread_mutex_unlock(&s->lock);
    return n;
}

void ah_state_set_labels(ah_state_t *s, ah_labels_t *labels)
{
    pthread_mutex_lock(&s->lock);
    ah_labels_free(s->labels);
    s->labels = labels;
    if (ah_labels_format(labels, s->labels_text, sizeof(s->labels_text)) != AH_OK) {
        s->labels_text[0] = '\0';
    }
    pthread_mutex_unlock(&s->lock);
}

void ah_state_labels_text(ah_state_t *s, char *out, size_t n)
{
    pthread_mutex_lock(&s->lock);
    ah_strlcpy(out, s->labels_text, n);
    pthread_mutex_unlock(&s->lock);
}

int ah_state_offer_local(ah_state_t *s, ah_command_t cmd, ah_source_t src, const char *reason,
                         const char *updated_by)
{
    return ah_state_offer_local_drain(s, cmd, src, reason, updated_by, 0);
}

int ah_state_offer_local_drain(ah_state_t *s, ah_command_t cmd, ah_source_t src, const char *reason,
                               const char *updated_by, int64_t drain_ms)
{
    int rc = AH_OK;
    pthread_mutex_lock(&s->lock);
    if (s->shutdown_final || s->state == AH_STATE_STOPPING || s->state == AH_STATE_STOPPED) {
        rc = AH_EINVAL;
    } else if (s->state == AH_STATE_STARTING && src != AH_SOURCE_STARTUP &&
               cmd != AH_CMD_SHUTDOWN) {
        /* the startup sync (and a cluster shutdown's hold) must come first */
        rc = AH_EUNAVAIL;
    } else {
        ah_event_t ev = {.command = cmd,
                         .version = 0,
                         .timestamp_us = ah_now_us(),
                         .source = src,
                         .drain_ms = cmd == AH_CMD_RUNNING || drain_ms < 0 ? 0 : drain_ms};
        ah_strlcpy(ev.reason, reason, sizeof(ev.reason));
        ah_strlcpy(ev.updated_by, updated_by, sizeof(ev.updated_by));
        if (cmd == AH_CMD_SHUTDOWN && src != AH_SOURCE_STARTUP) {
            s->shutdown_final = true;
            if (s->stop_requested_us == 0) {
                s->stop_requested_us = ah_mono_us();
            }
        } else if (s->state != AH_STATE_STOPPING) {
            s->stop_requested_us = 0; /* it replaces a pending cluster shutdown */
        }
        set_pending(s, &ev);
    }
    pthread_mutex_unlock(&s->lock);
    if (rc == AH_OK) {
        call_waker(s);
        notify_change(s);
    }
    return rc;
}

/* ah_state_take_event when an event may be pending (out of line: the check before it runs
 * between every two batches and needs no frame). */
static __attribute__((noinline)) bool take_event_locked(ah_state_t *s, ah_event_t *ev)
{
    pthread_mutex_lock(&s->lock);
    bool had = s->has_event;
    if (had) {
        *ev = s->pending;
        s->has_event = false;
    }
    pthread_mutex_unlock(&s->lock);
    return had;
}

bool ah_state_take_event(ah_state_t *s, ah_event_t *ev)
{
    if (!atomic_load_explicit(&s->has_event, memory_order_acquire)) {
        return false; /* only the worker clears it, so "false" cannot go stale to "true" unseen */
    }
    return take_event_locked(s, ev);
}

/* Records ev as applied. Lock held. */
static void note_applied_locked(ah_state_t *s, const ah_event_t *ev)
{
    if (ev->source == AH_SOURCE_CLUSTER || ev->source == AH_SOURCE_STARTUP) {
        if (ev->version > 0 || ev->source == AH_SOURCE_STARTUP) {
            s->applied_version = ev->version;
        }
        if (!ev->refresh) {
            s->local_override = false;
        }
        for (int a = 0; a < ev->scope_ack_count; a++) {
            for (int i = 0; i < s->scope_count; i++) {
                if (s->scope_ids[i] == ev->scope_acks[a].id &&
                    s->scopes[i].applied_version < ev->scope_acks[a].version) {
                    s->scopes[i].applied_version = ev->scope_acks[a].version;
                }
            }
        }
        if (ev->source == AH_SOURCE_CLUSTER && ev->timestamp_us > 0 && !ev->refresh) {
            s->last_control_lag_ms = (double)(ah_now_us() - ev->timestamp_us) / 1000.0;
        }
    } else {
        s->local_override = true;
    }
}

static void state_commit(ah_state_t *s, ah_run_state_t to, bool held, const ah_event_t *ev)
{
    pthread_mutex_lock(&s->lock);
    s->state = to;
    s->held = held;
    s->commands_applied++;
    note_applied_locked(s, ev);
    if (to == AH_STATE_STOPPING) {
        s->shutdown_final = true;
        if (s->stop_requested_us == 0) {
            s->stop_requested_us = ah_mono_us();
        }
    }
    pthread_cond_broadcast(&s->wake);
    pthread_mutex_unlock(&s->lock);
    notify_fleet(s, true);
    notify_change(s);
}

static void state_note_applied(ah_state_t *s, const ah_event_t *ev)
{
    pthread_mutex_lock(&s->lock);
    note_applied_locked(s, ev);
    pthread_mutex_unlock(&s->lock);
    notify_fleet(s, true);
    notify_change(s);
}

int ah_state_apply(ah_state_t *s, const ah_event_t *ev, ah_run_state_t *from, ah_run_state_t *to,
                   ah_hook_t *hook)
{
    *from = ah_state_get(s); /* only the worker changes the state: no lock needed across */
    *to = *from;
    *hook = AH_HOOK_NONE;
    bool held = atomic_load(&s->held);
    if (ev->refresh) {
        state_note_applied(s, ev);
        return AH_ENOOP;
    }
    int rc = target(held ? ROW_HELD : (int)*from, ev->command, ev->source, to, &held, hook);
    if (rc == AH_OK) {
        state_commit(s, *to, held, ev);
    } else if (rc == AH_ENOOP) {
        state_note_applied(s, ev);
    }
    return rc;
}

void ah_state_set_stopped(ah_state_t *s)
{
    pthread_mutex_lock(&s->lock);
    s->state = AH_STATE_STOPPED;
    pthread_cond_broadcast(&s->wake);
    pthread_mutex_unlock(&s->lock);
    notify_fleet(s, true);
    notify_change(s);
}

/* ah_state_wait's condition (lock held): an event, a final shutdown or a reload is pending. */
static bool worker_has_work(void *arg)
{
    const ah_state_t *s = arg;
    return s->has_event || s->shutdown_final || s->reload_requested != s->reload_done;
}

/* ah_state_sleep's condition (lock held): as worker_has_work, except that the startup sync does
 * not count (it is applied after init returns, so it must not cut a sleep in init short). */
static bool sleep_ends(void *arg)
{
    const ah_state_t *s = arg;
    return (s->has_event && s->pending.source != AH_SOURCE_STARTUP) || s->shutdown_final ||
           (s->reload_requested != s->reload_done && s->reload_requested != s->reload_serving);
}

bool ah_state_sleep(ah_state_t *s, double seconds)
{
    pthread_mutex_lock(&s->lock);
    bool woken = seconds > 0 ? ah_cond_wait_until(&s->wake, &s->lock, seconds, sleep_ends, s)
                             : sleep_ends(s);
    pthread_mutex_unlock(&s->lock);
    return woken;
}

bool ah_state_held(ah_state_t *s)
{
    return atomic_load(&s->held);
}

bool ah_state_wait(ah_state_t *s, double seconds)
{
    if (!(seconds > 0)) {
        return ah_state_has_event(s);
    }
    pthread_mutex_lock(&s->lock);
    bool woken = ah_cond_wait_until(&s->wake, &s->lock, seconds, worker_has_work, s);
    pthread_mutex_unlock(&s->lock);
    return woken;
}

bool ah_state_should_stop(ah_state_t *s)
{
    pthread_mutex_lock(&s->lock);
    bool stop = s->shutdown_final || s->state == AH_STATE_STOPPING ||
                s->state == AH_STATE_STOPPED ||
                (s->has_event && s->pending.command == AH_CMD_SHUTDOWN &&
                 s->pending.source != AH_SOURCE_STARTUP);
    pthread_mutex_unlock(&s->lock);
    return stop;
}

bool ah_state_pending(ah_state_t *s, ah_pending_t *out)
{
    if (!atomic_load_explicit(&s->has_event, memory_order_acquire)) {
        return false; /* the common case, lock-free (a loop may ask on every turn) */
    }
    pthread_mutex_lock(&s->lock);
    bool pending = s->has_event && s->pending.source != AH_SOURCE_STARTUP;
    if (pending) {
        out->command = s->pending.command;
        ah_strlcpy(out->reason, s->pending.reason, sizeof(out->reason));
        out->drain_deadline_us = s->pending.drain_deadline_us;
    }
    pthread_mutex_unlock(&s->lock);
    return pending;
}

bool ah_state_has_event(ah_state_t *s)
{
    pthread_mutex_lock(&s->lock);
    bool has = s->has_event;
    pthread_mutex_unlock(&s->lock);
    return has;
}

ah_run_state_t ah_state_get(ah_state_t *s)
{
    return (ah_run_state_t)atomic_load(&s->state);
}

void ah_state_snapshot(ah_state_t *s, ah_state_snapshot_t *out)
{
    pthread_mutex_lock(&s->lock);
    out->state = s->state;
    out->cluster_known = s->cluster_known;
    out->cluster = s->cluster;
    out->applied_version = s->applied_version;
    out->local_override = s->local_override;
    out->held = s->held;
    out->shutdown_requested =
        s->shutdown_final || (s->has_event && s->pending.command == AH_CMD_SHUTDOWN);
    out->store = s->store;
    out->batches = atomic_load_explicit(&s->batches, memory_order_relaxed);
    out->batch_errors = atomic_load_explicit(&s->batch_errors, memory_order_relaxed);
    out->batch_overruns = s->batch_overruns;
    out->commands_applied = s->commands_applied;
    out->hook_errors = s->hook_errors;
    out->started_us = s->started_us;
    /* started time and generation of the same call: begin stores the time, then the
     * generation; a generation that changed while reading means another call began or ended */
    uint64_t generation;
    do {
        generation = atomic_load(&s->call_generation);
        out->batch_started_us = atomic_load(&s->call_started_us);
    } while (generation != atomic_load(&s->call_generation));
    out->call_generation = generation;
    out->last_control_lag_ms = s->last_control_lag_ms;
    out->wedged = atomic_load(&s->call_overrun) && generation != 0;
    out->reloads = s->reloads;
    out->reload_failures = s->reload_failures;
    out->stop_requested_us = s->stop_requested_us;
    memcpy(out->held_leases, s->held_leases, sizeof(out->held_leases));
    pthread_mutex_unlock(&s->lock);
}

uint64_t ah_state_call_begin_at(ah_state_t *s, int64_t now_mono_us)
{
    uint64_t generation = atomic_load_explicit(&s->calls_begun, memory_order_relaxed) + 1;
    atomic_store_explicit(&s->calls_begun, generation, memory_order_relaxed);
    atomic_store_explicit(&s->call_overrun, false, memory_order_relaxed);
    atomic_store_explicit(&s->call_started_us, now_mono_us, memory_order_release);
    atomic_store_explicit(&s->call_generation, generation, memory_order_release);
    return generation;
}

int64_t ah_state_call_stamp(ah_state_t *s, uint64_t generation, int64_t now_mono_us)
{
    if (now_mono_us == 0) {
        now_mono_us = 1; /* 0 means "not stamped" */
    }
    if (generation == 0 || atomic_load(&s->call_generation) != generation) {
        return now_mono_us;
    }
    int64_t stamp = 0;
    if (!atomic_compare_exchange_strong(&s->call_started_us, &stamp, now_mono_us)) {
        return stamp; /* stamped already (by the watchdog or the call's first wait) */
    }
    if (atomic_load(&s->call_generation) != generation) {
        /* The call ended between the check and the stamp, and the stamp may have landed on the
         * next call (whose begin cleared it): take it back; that call gets its own. */
        int64_t mine = now_mono_us;
        atomic_compare_exchange_strong(&s->call_started_us, &mine, 0);
    }
    return now_mono_us;
}

void ah_state_call_end(ah_state_t *s)
{
    atomic_store_explicit(&s->call_generation, 0, memory_order_release);
    atomic_store_explicit(&s->call_started_us, 0, memory_order_release);
    atomic_store_explicit(&s->call_overrun, false, memory_order_relaxed);
}

void ah_state_count_batch(ah_state_t *s, bool ok)
{
    /* The worker is the only writer: a load and a store, not a locked read-modify-write (a
     * `lock xadd` per batch measured at about 5 ns, a tenth of an empty batch). */
    atomic_store_explicit(&s->batches, atomic_load_explicit(&s->batches, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    if (!ok) {
        atomic_store_explicit(&s->batch_errors,
                              atomic_load_explicit(&s->batch_errors, memory_order_relaxed) + 1,
                              memory_order_relaxed);
    }
}

void ah_state_count_hook_error(ah_state_t *s)
{
    pthread_mutex_lock(&s->lock);
    s->hook_errors++;
    pthread_mutex_unlock(&s->lock);
}

void ah_state_mark_overrun(ah_state_t *s)
{
    pthread_mutex_lock(&s->lock);
    bool expected = false;
    if (atomic_load(&s->call_started_us) != 0 &&
        atomic_compare_exchange_strong(&s->call_overrun, &expected, true)) {
        s->batch_overruns++;
    }
    pthread_mutex_unlock(&s->lock);
}

void ah_state_set_store_status(ah_state_t *s, const ah_store_status_t *st)
{
    pthread_mutex_lock(&s->lock);
    bool mode_changed = strcmp(s->store.watch_mode, st->watch_mode) != 0;
    s->store = *st;
    pthread_mutex_unlock(&s->lock);
    if (mode_changed) {
        notify_fleet(s, true);
    }
}

uint64_t ah_state_request_reload(ah_state_t *s)
{
    pthread_mutex_lock(&s->lock);
    uint64_t ticket = ++s->reload_requested;
    pthread_cond_broadcast(&s->wake);
    pthread_mutex_unlock(&s->lock);
    call_waker(s);
    return ticket;
}

uint64_t ah_state_take_reload(ah_state_t *s)
{
    /* Lock-free: called between every two batches. */
    uint64_t requested = atomic_load(&s->reload_requested);
    if (requested == atomic_load(&s->reload_done)) {
        return 0;
    }
    atomic_store(&s->reload_serving, requested);
    return requested;
}

void ah_state_finish_reload(ah_state_t *s, uint64_t ticket, bool ok, const char *error)
{
    pthread_mutex_lock(&s->lock);
    s->reload_done = ticket;
    unsigned slot = s->reload_next++ % RELOAD_OUTCOMES;
    s->reload_outcomes[slot].upto = ticket;
    s->reload_outcomes[slot].ok = ok;
    ah_strlcpy(s->reload_outcomes[slot].error, ok ? "" : error,
               sizeof(s->reload_outcomes[slot].error));
    if (ok) {
        s->reloads++;
    } else {
        s->reload_failures++;
    }
    pthread_cond_broadcast(&s->wake);
    pthread_mutex_unlock(&s->lock);
    notify_change(s);
}

/* ah_state_wait_reload's condition (lock held): the awaited reload is done or the worker has
 * stopped. */
typedef struct {
    const ah_state_t *s;
    uint64_t ticket;
} reload_wait_t;

static bool reload_settled(void *arg)
{
    const reload_wait_t *w = arg;
    return w->s->reload_done >= w->ticket || w->s->state == AH_STATE_STOPPED;
}

/* The outcome of request `ticket` (lock held): AH_OK, AH_ELUA with err, or AH_ETIMEOUT while it
 * is pending. A request merged with others shares the outcome of the one load that served them;
 * a later load does not change it. */
static int reload_outcome_locked(const ah_state_t *s, uint64_t ticket, char *err, size_t errlen)
{
    if (s->reload_done < ticket) {
        snprintf(err, errlen, "the reload is still pending (the current batch has not finished)");
        return AH_ETIMEOUT;
    }
    /* The load that covered the ticket is the kept one with the smallest `upto` >= ticket (the
     * latest load is always kept, and reload_done >= ticket, so there is one). */
    int best = -1;
    for (unsigned i = 0; i < RELOAD_OUTCOMES; i++) {
        uint64_t upto = s->reload_outcomes[i].upto;
        if (upto >= ticket && (best < 0 || upto < s->reload_outcomes[best].upto)) {
            best = (int)i;
        }
    }
    if (best < 0 || s->reload_outcomes[best].ok) {
        return AH_OK;
    }
    snprintf(err, errlen, "%s", s->reload_outcomes[best].error);
    return AH_ELUA;
}

int ah_state_reload_outcome(ah_state_t *s, uint64_t ticket, char *err, size_t errlen)
{
    pthread_mutex_lock(&s->lock);
    int rc = reload_outcome_locked(s, ticket, err, errlen);
    pthread_mutex_unlock(&s->lock);
    return rc;
}

int ah_state_wait_reload(ah_state_t *s, uint64_t ticket, double seconds, char *err, size_t errlen)
{
    reload_wait_t wait = {s, ticket};
    pthread_mutex_lock(&s->lock);
    ah_cond_wait_until(&s->wake, &s->lock, seconds, reload_settled, &wait);
    int rc = reload_outcome_locked(s, ticket, err, errlen);
    pthread_mutex_unlock(&s->lock);
    return rc;
}

void ah_state_issue_begin(ah_state_t *s)
{
    pthread_mutex_lock(&s->issue_lock);
    pthread_mutex_lock(&s->lock);
    s->issuing++;
    pthread_mutex_unlock(&s->lock);
}

void ah_state_issue_end(ah_state_t *s)
{
    pthread_mutex_lock(&s->lock);
    s->issuing--;
    pthread_cond_broadcast(&s->issued);
    pthread_mutex_unlock(&s->lock);
    pthread_mutex_unlock(&s->issue_lock);
}

/* ah_state_issue_barrier's condition (lock held). */
static bool nothing_issuing(void *arg)
{
    const ah_state_t *s = arg;
    return s->issuing == 0;
}

void ah_state_issue_barrier(ah_state_t *s)
{
    pthread_mutex_lock(&s->lock);
    ah_cond_wait_until(&s->issued, &s->lock, AH_STATE_ISSUE_BARRIER_MAX, nothing_issuing, s);
    pthread_mutex_unlock(&s->lock);
}
