/* The control store interface: where the cluster's control document, its audit trail and the
 * agents' status records live.
 * Two implementations share it: the embedded SQLite store (ah_store_sqlite.c) and the MongoDB
 * store (core/mongo/ahm_store.c, in the MongoDB plugin; opened by ah_store_mongo_open in
 * ah_mongo.h). The host only ever talks to this interface.
 *
 * Threads: read/command/history and the status records (put_status/list_status) may be called
 * from any thread (HTTP handlers, the fleet's threads, the host) and are internally serialised
 * as needed. watch_start starts one watcher thread owned by the store;
 * it reports through the listener (callbacks run on the watcher thread and must not block).
 * close stops the watcher and frees everything. */
#ifndef AH_STORE_H
#define AH_STORE_H

#include "ah_common.h"
#include "ah_config.h"
#include "ah_selector.h"
#include "ah_state.h"

typedef struct ah_store_s ah_store_t;

/* At most this many lease records are listed. */
#define AH_LEASES_MAX 1000

/* Longest agenthost version string a status record carries. */
#define AH_VERSION_TEXT_MAX 31
/* Longest scope_acks text of a status record ("<16 hex>=<version>,..."; ~26 scopes). */
#define AH_SCOPE_ACKS_TEXT_MAX 1023
/* A scope document's _id: this prefix, then its canonical selector. */
#define AH_STORE_SCOPE_PREFIX "scope:"

/* One agent's status record (docs/API.md, GET /api/cluster/agents): written by the agent itself
 * on every state change and every AGENT_HEARTBEAT_INTERVAL. */
typedef struct ah_agent_status_s {
    char agent_id[AH_NAME_MAX + 1];
    char state[16];          /* ah_run_state_name() */
    int64_t applied_version; /* the last cluster version this agent applied */
    char watch_mode[32];     /* "polling" | "change_streams" | "" (not known yet) */
    int64_t last_seen_us;    /* wall clock of the write, µs since the epoch */
    int64_t started_us;      /* wall clock of the agent's start */
    char host[AH_NAME_MAX + 1];
    int64_t pid;
    char agenthost_version[AH_VERSION_TEXT_MAX + 1];
    int64_t batches;
    int64_t errors;
    char leases[AH_HELD_LEASES_MAX + 1]; /* the leases it holds: names, comma-separated */
    char labels[AH_LABELS_TEXT_MAX + 1]; /* canonical "k=v,k=v" (agent=<id> included) */
    /* The scope versions this agent applied, for the scopes its labels match:
     * "<ah_selector_id as 16 hex digits>=<version>" joined by ','. */
    char scope_acks[AH_SCOPE_ACKS_TEXT_MAX + 1];
} ah_agent_status_t;

/* One lease (docs/LUA.md, "Work that runs once per fleet"): a named right to do work that must
 * run on one agent at a time. The store keeps one record per name. */
typedef struct ah_lease_s {
    char name[AH_NAME_MAX + 1];
    char owner[AH_NAME_MAX + 1]; /* the holder's agent id; "" once released */
    int64_t token;         /* fencing token: grows by one every time the lease changes hands */
    int64_t expires_in_ms; /* by the store's clock when it was read or written; <= 0: free */
} ah_lease_t;

/* What ah_store_lease does. Every one is a single conditional write judged by the store's clock
 * (embedded: the file's time in one statement; MongoDB: $$NOW in an update pipeline). */
typedef enum {
    /* Take the lease when it is free (no record, or expired) or already ours (owner and token
     * as given): owner = us, expiry = now + ttl; the token grows by one unless it was ours. */
    AH_LEASE_ACQUIRE = 0,
    /* Extend our hold (owner and token as given, expired or not): expiry = now + ttl. */
    AH_LEASE_RENEW,
    /* Give it up (owner and token as given): owner = "", expiry = now; the token stays. */
    AH_LEASE_RELEASE,
} ah_lease_op_t;

typedef struct ah_store_listener_s {
    /* A control document was read: at start (initial sync) and after every change. */
    void (*on_control)(void *ud, const ah_control_t *doc);
    /* The store's status changed (mode detected, connection lost/restored, counters). */
    void (*on_status)(void *ud, const ah_store_status_t *status);
    void *ud;
    /* The complete set of scope documents (sorted by selector), read with the control
     * document: before on_control on the first read, then whenever the set changed. May be
     * NULL. A malformed scope document is left out (with one warning). */
    void (*on_scopes)(void *ud, const ah_control_t *scopes, int count);
} ah_store_listener_t;

/* A cluster command to write (ah_store_command_req). The strings are never NULL. */
typedef struct ah_command_req_s {
    ah_command_t command;
    const char *reason;
    const char *updated_by;
    const char *agent_id; /* the writing agent, for the audit entry */
    int64_t if_version;   /* >= 0: write only if the current version is this one; < 0: always */
    int64_t expires_us;   /* pause only: when the pause ends (µs since the epoch); 0: never */
    int64_t drain_ms;     /* pause or shutdown: drain deadline, ms after the command's timestamp
                             (0..AH_PAUSE_MAX_S * 1000); 0: none */
    /* A scope: the canonical selector (ah_selector_format) of the scope document to write
     * (created at version 0 when missing, so its first command is version 1); NULL or "": the
     * cluster document. if_version then applies to the scope's own version. */
    const char *selector;
} ah_command_req_t;

typedef struct ah_store_ops_s {
    int (*read)(ah_store_t *st, ah_control_t *out, char *err, size_t errlen);
    int (*command)(ah_store_t *st, const ah_command_req_t *req, ah_control_t *out, char *err,
                   size_t errlen);
    int (*history)(ah_store_t *st, int limit, ah_control_t *out, int *count, char *err,
                   size_t errlen);
    int (*watch_start)(ah_store_t *st, const ah_store_listener_t *listener, char *err,
                       size_t errlen);
    void (*close)(ah_store_t *st);
    int (*put_status)(ah_store_t *st, const ah_agent_status_t *rec, double ttl, char *err,
                      size_t errlen);
    int (*list_status)(ah_store_t *st, ah_agent_status_t **out, int *count, char *err,
                       size_t errlen);
    int (*lease)(ah_store_t *st, ah_lease_op_t op, const char *name, const char *owner,
                 int64_t token, int64_t ttl_ms, ah_lease_t *out, char *err, size_t errlen);
    int (*list_leases)(ah_store_t *st, ah_lease_t **out, int *count, char *err, size_t errlen);
} ah_store_ops_t;

/* Implementations embed this as their first member. */
struct ah_store_s {
    const ah_store_ops_t *ops;
};

/* Reads the control document (creating the initial one, command "running" version 0, if it
 * does not exist). 0, or AH_EUNAVAIL/AH_EIO with err set. */
int ah_store_read(ah_store_t *st, ah_control_t *out, char *err, size_t errlen);
/* Issues a cluster command: one atomic update that increments version by exactly one and writes
 * the audit entry {version, command, timestamp, reason, updated_by, agent_id}. Fills *out with
 * the new document. 0, or AH_EUNAVAIL (nothing written) / AH_EIO with err set. */
int ah_store_command(ah_store_t *st, ah_command_t cmd, const char *reason, const char *updated_by,
                     const char *agent_id, ah_control_t *out, char *err, size_t errlen);
/* The same with a condition and an expiry (req->reason etc. may be NULL → ""): with
 * if_version >= 0 the write is one atomic conditional update (embedded: `UPDATE ... WHERE
 * version = N`; MongoDB: a findAndModify filtered on the version); when the version differs
 * nothing is written and AH_ECONFLICT is returned with *out set to the current document (err
 * says both versions). The written document carries expires_us (pause only, else 0) and
 * drain_ms (pause and shutdown only, else 0; the audit entry carries it too). */
int ah_store_command_req(ah_store_t *st, const ah_command_req_t *req, ah_control_t *out, char *err,
                         size_t errlen);
/* Newest-first audit entries, at most `limit` (1..AH_HISTORY_MAX), into out[limit]; *count set.
 * Scope entries (selector set) are merged with the cluster's by timestamp; the cluster's stay in
 * version order. */
int ah_store_history(ah_store_t *st, int limit, ah_control_t *out, int *count, char *err,
                     size_t errlen);
/* Starts watching: the watcher thread first reads the document (retrying with backoff until it
 * succeeds or the store closes), reports it, then reports every later change. The listener is
 * copied. Call at most once. */
int ah_store_watch_start(ah_store_t *st, const ah_store_listener_t *listener, char *err,
                         size_t errlen);
/* Writes (inserts or replaces) the status record rec->agent_id. ttl: seconds after which a
 * record that is not written again is removed (MongoDB: a TTL index on last_seen, created on
 * the first write; embedded: a sweep at most once a minute). One round trip; may block up to the
 * store's timeouts, so it is called from a thread of its own (ah_fleet.c). 0, or
 * AH_EUNAVAIL/AH_EIO with err set. */
int ah_store_put_status(ah_store_t *st, const ah_agent_status_t *rec, double ttl, char *err,
                        size_t errlen);
/* Reads every status record, sorted by agent_id, into a new array *out (free() it; NULL when
 * *count is 0). At most AH_AGENTS_MAX records. 0, or AH_EUNAVAIL/AH_EIO/AH_ENOMEM with err set. */
int ah_store_list_status(ah_store_t *st, ah_agent_status_t **out, int *count, char *err,
                         size_t errlen);
/* One lease operation (ah_lease_op_t) on lease `name` for agent `owner` (both non-empty, at most
 * AH_NAME_MAX bytes); token: the token we hold (0: none, acquire only); ttl_ms > 0 (acquire,
 * renew). One round trip; may block up to the store's timeouts, so never on the Lua thread.
 * Returns 0 when the write took effect, *out the record after it; AH_ECONFLICT when its
 * condition failed (nothing written): for acquire *out is the current holder, for renew and
 * release *out is zeroed (the lease is not ours). Else AH_EUNAVAIL/AH_EIO/AH_EINVAL with err. */
int ah_store_lease(ah_store_t *st, ah_lease_op_t op, const char *name, const char *owner,
                   int64_t token, int64_t ttl_ms, ah_lease_t *out, char *err, size_t errlen);
/* Reads every lease record, sorted by name, into a new array *out (free() it; NULL when *count
 * is 0), at most AH_LEASES_MAX, expires_in_ms by the store's clock at the read. */
int ah_store_list_leases(ah_store_t *st, ah_lease_t **out, int *count, char *err, size_t errlen);
/* Appends one zeroed lease to *recs (as ah_store_status_append). */
ah_lease_t *ah_store_lease_append(ah_lease_t **recs, int *count, int *cap);

/* Stops the watcher (joins its thread) and frees the store. NULL is accepted. */
void ah_store_close(ah_store_t *st);

/* For list_status implementations: appends one zeroed record to the array *recs (*count used,
 * *cap allocated), growing it by doubling. Returns the new record, or NULL when out of memory
 * (*recs, *count and *cap unchanged). */
ah_agent_status_t *ah_store_status_append(ah_agent_status_t **recs, int *count, int *cap);

/* ---- for implementations: the watcher's status reporter ----
 *
 * Both watchers keep their ah_store_status_t in one of these and change the connection fields
 * only through it, so their connected / reconnect / error bookkeeping reads alike. Watcher
 * thread only. */
typedef struct ah_store_reporter_s {
    ah_store_status_t status;
    const ah_store_listener_t *listener; /* not owned; its on_status may be NULL */
    int64_t min_gap_us;                  /* routine reports: at most one per this interval */
    bool ever_connected;
    int64_t last_report_us; /* monotonic time of the last report */
    uint64_t reported_polls;
} ah_store_reporter_t;

/* Starts disconnected, latency unknown, with the given names (watch_mode may be ""). */
void ah_store_reporter_init(ah_store_reporter_t *r, const ah_store_listener_t *listener,
                            const char *backend, const char *topology, const char *watch_mode,
                            int64_t min_gap_us);
/* Reports the status: now when force, else only if polls moved since the last report and
 * min_gap_us has passed (the routine counters). */
void ah_store_report(ah_store_reporter_t *r, bool force);
/* Records a successful round trip: the latency (< 0: unknown, kept) and, when disconnected, the
 * (re)connection (counted in reconnects after the first). Returns true if it just (re)connected:
 * the caller then reports with force. Does not report itself. */
bool ah_store_note_connected(ah_store_reporter_t *r, double latency_ms);
/* Records a failure: disconnected, last_error = message at the current wall-clock time, and
 * reports at once. */
void ah_store_note_failure(ah_store_reporter_t *r, const char *message);

/* For implementations: checks a scope document read from the store. Its _id must be
 * AH_STORE_SCOPE_PREFIX followed by the canonical form of its selector field, and its command
 * known. 0 with doc->selector set, or AH_EINVAL with why set. */
int ah_store_scope_check(const char *id, const char *selector, ah_control_t *doc, char *why,
                         size_t whylen);

/* For watchers: remembers which malformed documents were warned about (by _id and version), so
 * each is warned about once. */
typedef struct ah_store_warned_s {
    unsigned long long seen[32];
    unsigned next;
} ah_store_warned_t;
/* True the first time (id, version) is seen (it is then remembered). */
bool ah_store_warn_first(ah_store_warned_t *w, const char *id, int64_t version);

/* For history implementations: merges the newest-first scope entries scopes[nscopes] into the
 * newest-first cluster entries out[*count], newest first by timestamp (each list keeps its own
 * order), keeping at most limit; *count updated. AH_ENOMEM leaves out unchanged. */
int ah_store_history_merge(ah_control_t *out, int *count, const ah_control_t *scopes, int nscopes,
                           int limit);

/* The embedded store: a SQLite file shared by all local agents that point at it.
 * poll_interval: seconds between cheap change checks (PRAGMA data_version). */
ah_store_t *ah_store_sqlite_open(const char *path, double poll_interval, char *err, size_t errlen);

#endif
