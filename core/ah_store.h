/* The control store interface: where the cluster's control document and its audit trail live.
 * Two implementations share it: the embedded SQLite store (ah_store_sqlite.c) and the MongoDB
 * store (core/mongo/ahm_store.c, in the MongoDB plugin; opened by ah_store_mongo_open in
 * ah_mongo.h). The host only ever talks to this interface.
 *
 * Threads: read/command/history may be called from any thread (HTTP handlers, the host) and
 * are internally serialised as needed. watch_start starts one watcher thread owned by the store;
 * it reports through the listener (callbacks run on the watcher thread and must not block).
 * close stops the watcher and frees everything. */
#ifndef AH_STORE_H
#define AH_STORE_H

#include "ah_common.h"
#include "ah_config.h"
#include "ah_state.h"

typedef struct ah_store_s ah_store_t;

typedef struct ah_store_listener_s {
    /* A control document was read: at start (initial sync) and after every change. */
    void (*on_control)(void *ud, const ah_control_t *doc);
    /* The store's status changed (mode detected, connection lost/restored, counters). */
    void (*on_status)(void *ud, const ah_store_status_t *status);
    void *ud;
} ah_store_listener_t;

typedef struct ah_store_ops_s {
    int (*read)(ah_store_t *st, ah_control_t *out, char *err, size_t errlen);
    int (*command)(ah_store_t *st, ah_command_t cmd, const char *reason, const char *updated_by,
                   const char *agent_id, ah_control_t *out, char *err, size_t errlen);
    int (*history)(ah_store_t *st, int limit, ah_control_t *out, int *count, char *err,
                   size_t errlen);
    int (*watch_start)(ah_store_t *st, const ah_store_listener_t *listener, char *err,
                       size_t errlen);
    void (*close)(ah_store_t *st);
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
/* Newest-first audit entries, at most `limit` (1..1000), into out[limit]; *count set. */
int ah_store_history(ah_store_t *st, int limit, ah_control_t *out, int *count, char *err,
                     size_t errlen);
/* Starts watching: the watcher thread first reads the document (retrying with backoff until it
 * succeeds or the store closes), reports it, then reports every later change. The listener is
 * copied. Call at most once. */
int ah_store_watch_start(ah_store_t *st, const ah_store_listener_t *listener, char *err,
                         size_t errlen);
/* Stops the watcher (joins its thread) and frees the store. NULL is accepted. */
void ah_store_close(ah_store_t *st);

/* The embedded store: a SQLite file shared by all local agents that point at it.
 * poll_interval: seconds between cheap change checks (PRAGMA data_version). */
ah_store_t *ah_store_sqlite_open(const char *path, double poll_interval, char *err, size_t errlen);

#endif
