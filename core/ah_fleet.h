/* Fleet awareness (docs/API.md, GET /api/cluster/agents): this agent's status record in the
 * control store and the rules for reading everyone's. A writer thread of its own writes the
 * record after every change of what it shows (the write that carries a new applied_version is
 * the agent's acknowledgement of that command) and every AGENT_HEARTBEAT_INTERVAL; changes that
 * arrive while a write is under way are coalesced into the next one (only the latest status
 * matters). Neither the Lua worker nor an HTTP thread ever waits for the store because of it.
 *
 * The same thread ends timed pauses: when the control document is a pause whose expires_at has
 * passed, it writes one resume conditioned on that version (compare-and-set, updated_by
 * "system"), so that however many agents see the expiry at once, exactly one resume is written;
 * the others find the new version and do nothing.
 *
 * The writer thread does not start with the fleet: the first change once the agent has left
 * `starting` (its startup sync, or a shutdown before it) starts it, or the host's watchdog
 * (ah_fleet_start_writer) when the sync takes longer; the first record is written then. An agent
 * that stops before either wrote no record and writes none.
 *
 * Threads: ah_fleet_start/stop/free from the host's thread; ah_fleet_changed and
 * ah_fleet_start_writer from any thread (a flag under a private lock, at most one thread
 * creation). */
#ifndef AH_FLEET_H
#define AH_FLEET_H

#include "ah_config.h"
#include "ah_state.h"
#include "ah_store.h"

/* How many missed heartbeats make a record stale. */
#define AH_FLEET_STALE_HEARTBEATS 3

typedef struct ah_fleet_s ah_fleet_t;

/* Creates the fleet; no thread runs yet (see above). state and store are borrowed and must
 * outlive ah_fleet_stop(). NULL with err set on failure. */
ah_fleet_t *ah_fleet_start(const ah_config_t *cfg, ah_state_t *state, ah_store_t *store, char *err,
                           size_t errlen);
/* Starts the writer thread, which writes the first record at once, unless it runs already or
 * ah_fleet_stop() ran. A failure to create it is logged (the next call tries again). NULL is
 * accepted. */
void ah_fleet_start_writer(ah_fleet_t *f);
/* Something the record shows changed: the writer writes again as soon as it can; once the agent
 * has left `starting`, a writer not started yet is started. Never blocks on the store. NULL is
 * accepted. */
void ah_fleet_changed(ah_fleet_t *f);
/* A newer control document arrived: the writer re-checks when a timed pause expires (no write
 * of its own). NULL is accepted. */
void ah_fleet_control_changed(ah_fleet_t *f);
/* Ends every wait (answered with what is known, complete false unless it is) and joins the
 * waiter thread; later waits are refused. Call it before the server whose requests the
 * callbacks answer stops. NULL is accepted. */
void ah_fleet_stop_waits(ah_fleet_t *f);
/* At shutdown, before ah_fleet_stop_waits(): refuses new command waits and lets the waits of a
 * shutdown command go on (the waiter keeps reading the records, where a stopped agent counts as
 * having applied it) until none is left or `seconds` have passed. NULL is accepted. */
void ah_fleet_drain_waits(ah_fleet_t *f, double seconds);
/* Stops the waits (ah_fleet_stop_waits), then the writer, if it started, after one last write of
 * the current status (after a clean shutdown: "stopped") and joins it; bounded by the store's own
 * timeouts. Later ah_fleet_changed() / ah_fleet_start_writer() calls are harmless (no writer
 * starts any more). NULL is accepted. */
void ah_fleet_stop(ah_fleet_t *f);
/* Frees the fleet once no thread can call ah_fleet_changed() any more. NULL is accepted. */
void ah_fleet_free(ah_fleet_t *f);

/* ---- waiting for the fleet to acknowledge a version ----
 *
 * A wait is answered when every agent that counts has applied the version, or at its deadline.
 * It holds no thread: one waiter thread of the fleet reads the status records every
 * AH_FLEET_WAIT_POLL_S while any wait is pending (one store read for all of them) and calls
 * each wait's callback once. */

/* How a record counts for a wait on version N. */
typedef enum {
    AH_FLEET_ACKNOWLEDGED = 0, /* applied_version >= N */
    AH_FLEET_PENDING,          /* alive and not there yet */
    AH_FLEET_EXCLUDED,         /* stale, or stopping/stopped before applying N: not waited for */
    AH_FLEET_NOT_MATCHED,      /* a scoped wait: the agent's labels do not match (not listed) */
} ah_fleet_ack_t;

#define AH_FLEET_WAIT_POLL_S 0.1
#define AH_FLEET_WAIT_MAX_S 300.0

typedef struct ah_fleet_outcome_s {
    /* ah_fleet_command_wait() only: how the command's write went. AH_OK: doc is the written
     * document and the fields below describe the wait; else (AH_ECONFLICT with doc the current
     * document, AH_EUNAVAIL, AH_EIO, AH_EINVAL) command_error says why and nothing was waited
     * for. ah_fleet_wait(): AH_OK. */
    int command_rc;
    const char *command_error;
    const ah_control_t *doc;
    int64_t version;
    bool complete; /* no record pending */
    double waited_s;
    const ah_agent_status_t *recs; /* the last records read, sorted by agent_id; may be 0 */
    const ah_fleet_ack_t *acks;    /* acks[i] classifies recs[i] */
    int count;
    const char *error; /* "" or why the last read failed (then recs may be older or none) */
} ah_fleet_outcome_t;

/* Called exactly once per wait, on the fleet's waiter thread, without any fleet lock: when
 * complete, at the deadline, or when the fleet stops (complete false). The outcome is valid
 * during the call only. Must not block for long. */
typedef void (*ah_fleet_wait_cb)(void *ud, const ah_fleet_outcome_t *outcome);

/* Starts waiting up to `seconds` (0 < s <= AH_FLEET_WAIT_MAX_S) for every agent to apply
 * `version`; started_mono_us: when the wait began (monotonic µs; waited_s counts from it).
 * 0, or AH_EUNAVAIL when the fleet is stopping / AH_ENOMEM (cb is then never called). */
int ah_fleet_wait(ah_fleet_t *f, int64_t version, double seconds, int64_t started_mono_us,
                  ah_fleet_wait_cb cb, void *ud);

/* Writes the cluster command req (as ah_store_command_req; the strings are copied) on the
 * fleet's waiter thread, hands the written document to the state object (the issuing agent
 * applies it at once), then waits up to `seconds` as ah_fleet_wait() for that version.
 * started_mono_us: when the request began. cb is called exactly once with the write's outcome
 * and, if it succeeded, the wait's. 0, or AH_EUNAVAIL / AH_EINVAL / AH_ENOMEM (cb never
 * called). No HTTP or Lua thread is held meanwhile. */
int ah_fleet_command_wait(ah_fleet_t *f, const ah_command_req_t *req, double seconds,
                          int64_t started_mono_us, ah_fleet_wait_cb cb, void *ud);

/* Reads the control document and every status record on the waiter thread (no HTTP thread
 * waits for the store) and calls cb once: command_rc AH_OK with doc the control document and
 * recs/acks for its version (complete, waited_s as for a wait), or AH_EUNAVAIL/AH_EIO with
 * command_error when a read failed. 0, or AH_EUNAVAIL/AH_ENOMEM (cb never called). */
int ah_fleet_read(ah_fleet_t *f, ah_fleet_wait_cb cb, void *ud);

/* Issues a cluster command as this agent (any thread; blocks on the store): holds the state's
 * issue lock (ah_state_issue_begin) around the write, logs "Cluster command <cmd> issued:
 * version N by <who> (reason: <why>)" and hands the written document to the state object, so
 * this agent applies it at once; on AH_ECONFLICT hands it the current document instead. Returns
 * ah_store_command_req()'s result. */
int ah_fleet_issue(ah_state_t *state, ah_store_t *store, const ah_command_req_t *req,
                   ah_control_t *doc, char *err, size_t errlen);

/* How rec counts for a wait on version (now_us: wall clock). */
ah_fleet_ack_t ah_fleet_classify(const ah_agent_status_t *rec, int64_t version, int64_t now_us,
                                 double heartbeat_interval);

/* How rec counts for a wait on version of the scope sel: AH_FLEET_NOT_MATCHED when its labels
 * do not match, else as ah_fleet_classify with the scope's acknowledged version. */
ah_fleet_ack_t ah_fleet_classify_scope(const ah_agent_status_t *rec, const ah_selector_t *sel,
                                       int64_t version, int64_t now_us, double heartbeat_interval);
/* The version of the scope scope_id (ah_selector_id) that rec acknowledged, 0 if none. */
int64_t ah_fleet_scope_ack(const ah_agent_status_t *rec, unsigned long long scope_id);

/* True when rec was last written more than AH_FLEET_STALE_HEARTBEATS heartbeat intervals before
 * now_us (wall clock, µs). */
bool ah_fleet_is_stale(const ah_agent_status_t *rec, int64_t now_us, double heartbeat_interval);

#endif
