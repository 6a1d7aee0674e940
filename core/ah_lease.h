/* The lease keeper: the leases this agent asks for (agent.lease, agent.every with a lease) and
 * holds, kept in the control store by a thread of its own, so that a long batch never delays a
 * renewal and no store call runs on the Lua thread (docs/LUA.md, "Work that runs once per
 * fleet"). It acquires what is wanted while the agent runs, renews what it holds every ttl/3,
 * and releases everything on pause, on shutdown and what a reload's new script no longer names.
 * A lease counts as held only until a local monotonic deadline, a safety margin (a fifth of the
 * ttl) before the store's expiry counted from when the last successful write was sent, so an
 * agent that cannot reach the store, or was frozen, stops before anyone else may start.
 *
 * Threads: every function may be called from any thread; the keeper's thread does the store
 * calls. */
#ifndef AH_LEASE_H
#define AH_LEASE_H

#include "ah_common.h"
#include "ah_state.h"
#include "ah_store.h"

typedef struct ah_leases_s ah_leases_t;

/* At most this many lease names per agent. */
#define AH_LEASES_PER_AGENT 64

/* One lease as this agent sees it (for /metrics, status records and agent.lease). */
typedef struct ah_lease_view_s {
    char name[AH_NAME_MAX + 1];
    bool held;         /* held now (before the local deadline) */
    int64_t token;     /* the token of the last acquisition (0: never held) */
    double ttl;        /* seconds */
    uint64_t changes;  /* times this agent gained or lost it */
    int last_rc;       /* the last store call's result (0, AH_ECONFLICT, AH_EUNAVAIL, ...) */
    uint64_t attempts; /* store calls made for it so far (acquire, renew, release) */
    char last_error[AH_ERRLEN];
} ah_lease_view_t;

/* Creates the keeper of agent `owner`, reading the run state from `state`; no thread yet. NULL
 * when out of memory. */
ah_leases_t *ah_leases_new(ah_state_t *state, const char *owner);
/* Lets the keeper work on `store` (not owned, must outlive ah_leases_stop; NULL: no control
 * store, every acquire fails with AH_EUNAVAIL): its thread starts now if a lease is named already,
 * else with the first one (ah_leases_declare). 0, or AH_EIO with err set. */
int ah_leases_start(ah_leases_t *lk, ah_store_t *store, char *err, size_t errlen);
/* Stops the thread, then releases every held lease (one store write each). The keeper stays
 * readable (held() is false for all) until freed. NULL is accepted; idempotent. */
void ah_leases_stop(ah_leases_t *lk);
/* Frees (after ah_leases_stop). NULL is accepted. */
void ah_leases_free(ah_leases_t *lk);

/* Checks a lease's name (1 to 128 of letters, digits and _-.:/) and ttl (1 to 3600 s). 0, or
 * AH_EINVAL with err set. */
int ah_leases_check(const char *name, double ttl, char *err, size_t errlen);
/* A script names lease `name` (agent.lease, agent.every): creates its entry or updates its ttl,
 * and marks it as named by the current script (ah_leases_reload_begin). keep: the host itself
 * acquires it whenever the agent runs (agent.every). The first lease named starts the keeper's
 * thread (once ah_leases_start ran). 0, or AH_EINVAL (bad name or ttl, too many leases) or
 * AH_EIO (the thread cannot be started) with err set. */
int ah_leases_declare(ah_leases_t *lk, const char *name, double ttl, bool keep, char *err,
                      size_t errlen);
/* Starts acquiring `name` (declared before) unless held; returns the number of store calls made
 * for it so far (compare with view.attempts to see a result that came after this call). */
uint64_t ah_leases_want(ah_leases_t *lk, const char *name);
/* Stops wanting `name` unless a schedule keeps it (an acquire that gave up). */
void ah_leases_unwant(ah_leases_t *lk, const char *name);
/* Lets `name` go: held() is false from now on, the store write follows on the keeper thread. */
void ah_leases_release(ah_leases_t *lk, const char *name);
/* Fills *view for `name`. false when it was never declared. */
bool ah_leases_view(ah_leases_t *lk, const char *name, ah_lease_view_t *view);
/* Copies every lease into a new array *out (free() it), *count set. 0 or AH_ENOMEM. */
int ah_leases_list(ah_leases_t *lk, ah_lease_view_t **out, int *count);

/* A reload: begin before the new script loads (what it declares is marked as its own); end
 * after it replaced the old one (ok) — leases the new script did not name are released — or
 * failed (!ok: nothing is dropped). */
void ah_leases_reload_begin(ah_leases_t *lk);
void ah_leases_reload_end(ah_leases_t *lk, bool ok);

#endif
