/* The lease keeper (ah_lease.h): a table of entries under one mutex, and one thread that picks
 * the entry whose store call is due, makes it without the lock, and applies the result. */
#define _GNU_SOURCE
#include "ah_lease.h"

#include "ah_log.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The local deadline: held() turns false this fraction of the ttl before the store's expiry. */
#define LEASE_SAFETY_MARGIN 0.2
/* A free lease is tried again at most this often (seconds); less for short ttls (ttl/3). */
#define LEASE_RETRY_MAX_S 1.0
/* A failed renewal is retried after this (seconds; less for short ttls: ttl/10). */
#define LEASE_RENEW_RETRY_MAX_S 0.5
/* The thread looks at the run state at least this often (seconds). */
#define LEASE_TICK_S 0.1

typedef struct lease_entry_s {
    char name[AH_NAME_MAX + 1];
    double ttl;
    uint64_t epoch; /* the script generation that last named it */
    bool keep;      /* a schedule wants it while the agent runs */
    bool wanted;    /* an acquire() waits for it */
    bool held;      /* the store's last answer: ours */
    bool release;   /* let it go at the next turn */
    int64_t token;
    int64_t deadline_us; /* monotonic: held() is true before this */
    int64_t next_us;     /* monotonic: the next store call is due */
    uint64_t changes;
    uint64_t attempts;
    int last_rc;
    char last_error[AH_ERRLEN];
    char holder[AH_NAME_MAX + 1]; /* the other holder, when the last acquire found one */
} lease_entry_t;

struct ah_leases_s {
    ah_store_t *store;
    ah_state_t *state;
    char owner[AH_NAME_MAX + 1];
    pthread_mutex_t lock;
    pthread_cond_t cond; /* CLOCK_MONOTONIC; signalled on every request and at stop */
    bool stopping;
    uint64_t epoch;
    uint64_t reload_epoch;  /* 0: no reload in progress */
    lease_entry_t *entries; /* cap entries, count used, grown as leases are named (at the full
                               capacity, 69 KiB zeroed at every start); only addressed under
                               lock, and found again by name after a store call */
    int count;
    int cap;
    pthread_t thread;
    bool armed;   /* ah_leases_start() ran: the thread may start (with the first lease named) */
    bool started; /* the thread was created and not joined yet */
    char published[AH_HELD_LEASES_MAX + 1]; /* the last list given to the state object */
};

static lease_entry_t *find_locked(ah_leases_t *lk, const char *name)
{
    for (int i = 0; i < lk->count; i++) {
        if (strcmp(lk->entries[i].name, name) == 0) {
            return &lk->entries[i];
        }
    }
    return NULL;
}

static bool held_now(const lease_entry_t *e, int64_t now_us)
{
    return e->held && !e->release && now_us < e->deadline_us;
}

/* What the thread does next for e, or -1: nothing is due. */
static int due_op(const lease_entry_t *e, bool running, int64_t now_us)
{
    if (e->next_us > now_us) {
        return -1;
    }
    if (e->held && (e->release || !running)) {
        return AH_LEASE_RELEASE;
    }
    if (e->held) {
        return AH_LEASE_RENEW;
    }
    if (running && (e->wanted || e->keep) && !e->release) {
        return AH_LEASE_ACQUIRE;
    }
    return -1;
}

static void apply_result(ah_leases_t *lk, lease_entry_t *e, int op, int rc, const ah_lease_t *got,
                         const char *err, int64_t sent_us)
{
    int64_t now = ah_mono_us();
    int64_t ttl_us = (int64_t)(e->ttl * 1e6);
    bool was_held = e->held;
    e->attempts++;
    e->last_rc = rc;
    ah_strlcpy(e->last_error, rc == 0 ? "" : err, sizeof(e->last_error));
    if (op == AH_LEASE_RELEASE) {
        e->held = false;
        e->release = false;
        e->next_us = now;
        if (was_held) {
            e->changes++;
            ah_log_info("Lease %s released (token %" PRId64 ")", e->name, e->token);
        }
        return;
    }
    if (rc == 0) {
        e->held = true;
        e->token = got->token;
        e->deadline_us = sent_us + (int64_t)((double)ttl_us * (1.0 - LEASE_SAFETY_MARGIN));
        e->next_us = sent_us + ttl_us / 3;
        e->holder[0] = '\0';
        if (op == AH_LEASE_ACQUIRE) {
            e->wanted = false;
            e->changes++;
            ah_log_info("Lease %s acquired (token %" PRId64 ", ttl %gs)", e->name, e->token,
                        e->ttl);
        }
        return;
    }
    if (rc == AH_ECONFLICT) {
        if (op == AH_LEASE_RENEW) {
            e->held = false;
            e->changes++;
            ah_log_warn("Lease %s lost: another agent holds it now (our token was %" PRId64 ")",
                        e->name, e->token);
            e->next_us = now;
        } else {
            ah_strlcpy(e->holder, got->owner, sizeof(e->holder));
            double retry = e->ttl / 3 < LEASE_RETRY_MAX_S ? e->ttl / 3 : LEASE_RETRY_MAX_S;
            e->next_us = now + (int64_t)(retry * 1e6);
        }
        return;
    }
    /* the store failed: keep trying; held() ends at the local deadline meanwhile */
    double retry = e->ttl / 10 < LEASE_RENEW_RETRY_MAX_S ? e->ttl / 10 : LEASE_RENEW_RETRY_MAX_S;
    e->next_us = now + (int64_t)(retry * 1e6);
    ah_log_warn("Lease %s: %s failed: %s", e->name, op == AH_LEASE_ACQUIRE ? "acquire" : "renewal",
                err);
}

/* The entry after a release that nobody names any more is dropped. Lock held. */
static void drop_unnamed_locked(ah_leases_t *lk)
{
    for (int i = 0; i < lk->count;) {
        lease_entry_t *e = &lk->entries[i];
        if (e->epoch < lk->epoch && !e->held && !e->release) {
            lk->entries[i] = lk->entries[--lk->count];
            continue;
        }
        i++;
    }
}

/* Tells the state object which leases are held now (the status record lists them), when that
 * changed. Lock held; the state's lock is taken inside it (keeper → state, never the reverse). */
static void publish_held_locked(ah_leases_t *lk)
{
    char names[AH_HELD_LEASES_MAX + 1] = "";
    size_t used = 0;
    for (int i = 0; i < lk->count; i++) {
        const lease_entry_t *e = &lk->entries[i];
        size_t n = strlen(e->name);
        if (!e->held || e->release || used + n + (used > 0) > AH_HELD_LEASES_MAX) {
            continue;
        }
        if (used > 0) {
            names[used++] = ',';
        }
        memcpy(names + used, e->name, n);
        used += n;
        names[used] = '\0';
    }
    if (lk->state != NULL && strcmp(names, lk->published) != 0) {
        ah_strlcpy(lk->published, names, sizeof(lk->published));
        ah_state_set_held_leases(lk->state, names);
    }
}

static void *keeper_main(void *arg)
{
    ah_leases_t *lk = arg;
    pthread_mutex_lock(&lk->lock);
    while (!lk->stopping) {
        bool running = lk->state == NULL || ah_state_get(lk->state) == AH_STATE_RUNNING;
        int64_t now = ah_mono_us();
        lease_entry_t *pick = NULL;
        int op = -1;
        int64_t next = now + (int64_t)(LEASE_TICK_S * 1e6);
        for (int i = 0; i < lk->count && pick == NULL; i++) {
            lease_entry_t *e = &lk->entries[i];
            op = due_op(e, running, now);
            if (op >= 0) {
                pick = e;
            } else if (e->next_us > now && e->next_us < next) {
                next = e->next_us;
            }
        }
        if (pick == NULL) {
            drop_unnamed_locked(lk);
            struct timespec deadline;
            ah_mono_deadline((double)(next - now) / 1e6, &deadline);
            pthread_cond_timedwait(&lk->cond, &lk->lock, &deadline);
            continue;
        }
        char name[AH_NAME_MAX + 1];
        ah_strlcpy(name, pick->name, sizeof(name));
        int64_t token = pick->held ? pick->token : 0;
        if (op == AH_LEASE_ACQUIRE && pick->token > 0) {
            token = pick->token; /* still ours in the store (renewals failed): keep it */
        }
        int64_t ttl_ms = (int64_t)(pick->ttl * 1000.0);
        pick->next_us = INT64_MAX; /* in flight */
        pthread_mutex_unlock(&lk->lock);

        ah_lease_t got;
        char err[AH_ERRLEN] = "";
        int64_t sent = ah_mono_us();
        int rc = lk->store != NULL ? ah_store_lease(lk->store, (ah_lease_op_t)op, name, lk->owner,
                                                    token, ttl_ms, &got, err, sizeof(err))
                                   : AH_EUNAVAIL;
        if (lk->store == NULL) {
            memset(&got, 0, sizeof(got));
            snprintf(err, sizeof(err),
                     "leases need the control store (distributed control is "
                     "disabled)");
        }
        pthread_mutex_lock(&lk->lock);
        lease_entry_t *e = find_locked(lk, name);
        if (e != NULL) {
            apply_result(lk, e, op, rc, &got, err, sent);
        }
        publish_held_locked(lk);
    }
    pthread_mutex_unlock(&lk->lock);
    return NULL;
}

ah_leases_t *ah_leases_new(ah_state_t *state, const char *owner)
{
    ah_leases_t *lk = calloc(1, sizeof(*lk));
    if (lk == NULL) {
        return NULL;
    }
    lk->state = state;
    lk->epoch = 1;
    ah_strlcpy(lk->owner, owner != NULL ? owner : "", sizeof(lk->owner));
    pthread_mutex_init(&lk->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&lk->cond, &attr);
    pthread_condattr_destroy(&attr);
    return lk;
}

/* Starts the thread once armed and a lease is named (an agent that names none has no thread).
 * Lock held. 0, or the error of pthread_create(). */
static int start_keeper_locked(ah_leases_t *lk)
{
    if (lk->started || !lk->armed || lk->stopping || lk->count == 0) {
        return 0;
    }
    int rc = pthread_create(&lk->thread, NULL, keeper_main, lk);
    if (rc == 0) {
        lk->started = true;
    }
    return rc;
}

int ah_leases_start(ah_leases_t *lk, ah_store_t *store, char *err, size_t errlen)
{
    pthread_mutex_lock(&lk->lock);
    lk->store = store;
    lk->armed = true;
    int rc = start_keeper_locked(lk); /* leases named by the main chunk or init before this */
    pthread_mutex_unlock(&lk->lock);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start the lease keeper thread: %s", strerror(rc));
        return AH_EIO;
    }
    return 0;
}

void ah_leases_stop(ah_leases_t *lk)
{
    if (lk == NULL) {
        return;
    }
    pthread_mutex_lock(&lk->lock);
    lk->stopping = true;
    bool started = lk->started;
    pthread_cond_broadcast(&lk->cond);
    pthread_mutex_unlock(&lk->lock);
    if (!started) {
        return;
    }
    pthread_join(lk->thread, NULL);
    lk->started = false;
    if (lk->state != NULL) {
        ah_state_set_held_leases(lk->state, "");
    }
    /* the thread has exited: give back what is still held, one write each */
    for (int i = 0; i < lk->count; i++) {
        pthread_mutex_lock(&lk->lock);
        lease_entry_t copy = lk->entries[i];
        lk->entries[i].held = false;
        pthread_mutex_unlock(&lk->lock);
        if (!copy.held || lk->store == NULL) {
            continue;
        }
        ah_lease_t got;
        char err[AH_ERRLEN] = "";
        int rc = ah_store_lease(lk->store, AH_LEASE_RELEASE, copy.name, lk->owner, copy.token, 0,
                                &got, err, sizeof(err));
        if (rc == 0) {
            ah_log_info("Lease %s released (token %" PRId64 ")", copy.name, copy.token);
        } else {
            ah_log_warn("Lease %s not released (it expires in at most %gs): %s", copy.name,
                        copy.ttl, err);
        }
    }
}

void ah_leases_free(ah_leases_t *lk)
{
    if (lk == NULL) {
        return;
    }
    ah_leases_stop(lk);
    pthread_cond_destroy(&lk->cond);
    pthread_mutex_destroy(&lk->lock);
    free(lk->entries);
    free(lk);
}

static bool lease_name_ok(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > 128) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.' || c == ':' || c == '/')) {
            return false;
        }
    }
    return true;
}

int ah_leases_check(const char *name, double ttl, char *err, size_t errlen)
{
    if (!lease_name_ok(name)) {
        snprintf(err, errlen,
                 "lease name must be 1 to 128 characters of letters, digits and _-.:/");
        return AH_EINVAL;
    }
    if (!(ttl >= 1.0 && ttl <= 3600.0)) {
        snprintf(err, errlen, "lease ttl must be between 1 and 3600 seconds");
        return AH_EINVAL;
    }
    return 0;
}

int ah_leases_declare(ah_leases_t *lk, const char *name, double ttl, bool keep, char *err,
                      size_t errlen)
{
    if (ah_leases_check(name, ttl, err, errlen) != 0) {
        return AH_EINVAL;
    }
    pthread_mutex_lock(&lk->lock);
    lease_entry_t *e = find_locked(lk, name);
    if (e == NULL) {
        if (lk->count == AH_LEASES_PER_AGENT) {
            pthread_mutex_unlock(&lk->lock);
            snprintf(err, errlen, "at most %d leases per agent", AH_LEASES_PER_AGENT);
            return AH_EINVAL;
        }
        if (lk->count == lk->cap) {
            int cap = lk->cap == 0 ? 4 : lk->cap * 2;
            cap = cap > AH_LEASES_PER_AGENT ? AH_LEASES_PER_AGENT : cap;
            lease_entry_t *entries = realloc(lk->entries, (size_t)cap * sizeof(*entries));
            if (entries == NULL) {
                pthread_mutex_unlock(&lk->lock);
                snprintf(err, errlen, "out of memory");
                return AH_EINVAL;
            }
            lk->entries = entries;
            lk->cap = cap;
        }
        e = &lk->entries[lk->count++];
        memset(e, 0, sizeof(*e));
        ah_strlcpy(e->name, name, sizeof(e->name));
    }
    e->ttl = ttl;
    e->epoch = lk->reload_epoch != 0 ? lk->reload_epoch : lk->epoch;
    e->keep = e->keep || keep;
    e->release = false;
    int rc = start_keeper_locked(lk);
    pthread_cond_broadcast(&lk->cond);
    pthread_mutex_unlock(&lk->lock);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start the lease keeper thread: %s", strerror(rc));
        return AH_EIO;
    }
    return 0;
}

uint64_t ah_leases_want(ah_leases_t *lk, const char *name)
{
    uint64_t attempts = 0;
    pthread_mutex_lock(&lk->lock);
    lease_entry_t *e = find_locked(lk, name);
    if (e != NULL) {
        attempts = e->attempts;
        if (!held_now(e, ah_mono_us())) {
            e->wanted = true;
            e->release = false;
            if (e->next_us != INT64_MAX) {
                e->next_us = 0; /* now */
            }
            pthread_cond_broadcast(&lk->cond);
        }
    }
    pthread_mutex_unlock(&lk->lock);
    return attempts;
}

void ah_leases_unwant(ah_leases_t *lk, const char *name)
{
    pthread_mutex_lock(&lk->lock);
    lease_entry_t *e = find_locked(lk, name);
    if (e != NULL) {
        e->wanted = false;
    }
    pthread_mutex_unlock(&lk->lock);
}

/* Lets e go: no longer wanted nor kept and, when held, released by the keeper thread at its next
 * turn. Lock held. True when there is a release to make (the caller wakes the thread). */
static bool let_go_locked(lease_entry_t *e)
{
    e->wanted = false;
    e->keep = false;
    if (!e->held) {
        return false;
    }
    e->release = true;
    if (e->next_us != INT64_MAX) {
        e->next_us = 0;
    }
    return true;
}

void ah_leases_release(ah_leases_t *lk, const char *name)
{
    pthread_mutex_lock(&lk->lock);
    lease_entry_t *e = find_locked(lk, name);
    if (e != NULL && let_go_locked(e)) {
        pthread_cond_broadcast(&lk->cond);
    }
    pthread_mutex_unlock(&lk->lock);
}

static void view_of(const lease_entry_t *e, int64_t now, ah_lease_view_t *v)
{
    memset(v, 0, sizeof(*v));
    ah_strlcpy(v->name, e->name, sizeof(v->name));
    v->held = held_now(e, now);
    v->token = e->token;
    v->ttl = e->ttl;
    v->changes = e->changes;
    v->last_rc = e->last_rc;
    v->attempts = e->attempts;
    ah_strlcpy(v->last_error, e->last_error, sizeof(v->last_error));
}

bool ah_leases_view(ah_leases_t *lk, const char *name, ah_lease_view_t *view)
{
    pthread_mutex_lock(&lk->lock);
    lease_entry_t *e = find_locked(lk, name);
    if (e != NULL) {
        view_of(e, ah_mono_us(), view);
    }
    pthread_mutex_unlock(&lk->lock);
    return e != NULL;
}

int ah_leases_list(ah_leases_t *lk, ah_lease_view_t **out, int *count)
{
    *out = NULL;
    *count = 0;
    pthread_mutex_lock(&lk->lock);
    int n = lk->count;
    ah_lease_view_t *views = n > 0 ? calloc((size_t)n, sizeof(*views)) : NULL;
    if (n > 0 && views == NULL) {
        pthread_mutex_unlock(&lk->lock);
        return AH_ENOMEM;
    }
    int64_t now = ah_mono_us();
    for (int i = 0; i < n; i++) {
        view_of(&lk->entries[i], now, &views[i]);
    }
    pthread_mutex_unlock(&lk->lock);
    *out = views;
    *count = n;
    return 0;
}

void ah_leases_reload_begin(ah_leases_t *lk)
{
    pthread_mutex_lock(&lk->lock);
    lk->reload_epoch = lk->epoch + 1;
    pthread_mutex_unlock(&lk->lock);
}

void ah_leases_reload_end(ah_leases_t *lk, bool ok)
{
    pthread_mutex_lock(&lk->lock);
    if (ok && lk->reload_epoch != 0) {
        lk->epoch = lk->reload_epoch;
        for (int i = 0; i < lk->count; i++) {
            lease_entry_t *e = &lk->entries[i];
            if (e->epoch < lk->epoch) {
                let_go_locked(e); /* the new script does not name it */
            }
        }
        pthread_cond_broadcast(&lk->cond);
    }
    lk->reload_epoch = 0;
    pthread_mutex_unlock(&lk->lock);
}
