/* The agent's shared state: the one small, lock-protected object where the threads meet
 * (docs/ARCHITECTURE.md). It holds the run state and its transition table, the latest pending
 * command ("latest wins"), the agent's view of the cluster control document, the store's status
 * and the counters shown by the API and /metrics.
 *
 * Threads: any thread may offer commands and read snapshots; only the Lua worker takes events,
 * commits transitions and waits. Every function is thread-safe unless stated otherwise. */
#ifndef AH_STATE_H
#define AH_STATE_H

#include "ah_common.h"
#include "ah_selector.h"

typedef enum {
    AH_STATE_STARTING = 0,
    AH_STATE_RUNNING,
    AH_STATE_PAUSED,
    AH_STATE_STOPPING,
    AH_STATE_STOPPED,
} ah_run_state_t;

/* Hook run after a transition is committed. */
typedef enum {
    AH_HOOK_NONE = 0,
    AH_HOOK_PAUSE,
    AH_HOOK_RESUME,
    AH_HOOK_SHUTDOWN,
} ah_hook_t;

/* A scope version an event acknowledges once applied (ah_selector_id of the selector). */
typedef struct ah_scope_ack_s {
    unsigned long long id;
    int64_t version;
} ah_scope_ack_t;

/* A command on its way to the Lua worker; becomes the `ev` table of a hook. A cluster or
 * startup event carries the agent's effective command: the most restrictive of the cluster
 * document and every scope document matching its labels (shutdown > pause > running). */
typedef struct ah_event_s {
    ah_command_t command;
    int64_t version; /* cluster version; 0 for local and signal commands */
    int64_t timestamp_us;
    char reason[AH_REASON_MAX + 1];
    char updated_by[AH_NAME_MAX + 1];
    ah_source_t source;
    int64_t drain_ms;                /* the command's drain= (ms), 0 if it named none */
    int64_t drain_deadline_us;       /* monotonic µs at which the call running while this event is
                                        pending has its waits cancelled; 0: none (computed when offered:
                                        drain_ms, else PAUSE_DRAIN_TIMEOUT for a pause; a shutdown's is
                                        at most its bound, ah_state_set_drain_limits) */
    char scope[AH_SELECTOR_MAX + 1]; /* the scope document that decided it; "": the cluster's */
    /* A document changed without changing the effective command (a cluster resume while a
     * scope still pauses this agent): applying it only records the versions, never a
     * transition, so a scoped pause is not lifted by a cluster resume (nor the reverse). */
    bool refresh;
    int scope_ack_count; /* the matching scopes' versions this event acknowledges */
    ah_scope_ack_t scope_acks[AH_SCOPES_MAX];
} ah_event_t;

/* The command waiting to be applied (agent.pending()). */
typedef struct ah_pending_s {
    ah_command_t command;
    char reason[AH_REASON_MAX + 1];
    int64_t drain_deadline_us; /* monotonic µs; 0: no deadline */
} ah_pending_t;

/* A scope document as this agent sees it. */
typedef struct ah_scope_view_s {
    ah_control_t doc;        /* doc.selector: the canonical selector */
    bool matches;            /* this agent's labels match the selector */
    int64_t applied_version; /* the version of it this agent applied (0: none) */
} ah_scope_view_t;

/* What the store reports about itself (pushed by its watcher; read by the API). */
typedef struct ah_store_status_s {
    char backend[16];    /* "embedded" | "mongodb" | "none" */
    char topology[32];   /* "embedded" | "replica_set" | "standalone" | "unknown" */
    char watch_mode[32]; /* "polling" | "change_streams" | "" (not started yet) */
    bool connected;
    char last_error[AH_ERRLEN]; /* "" if none */
    int64_t last_error_us;      /* wall clock of last_error, 0 if none */
    double latency_ms;          /* last round trip, < 0 if unknown */
    uint64_t reconnects;
    uint64_t stream_resumes;
    uint64_t polls;
} ah_store_status_t;

/* Longest comma-separated list of held lease names a status record carries (longer lists are
 * cut at a name). */
#define AH_HELD_LEASES_MAX 511

/* A consistent copy of everything the API shows. */
typedef struct ah_state_snapshot_s {
    ah_run_state_t state;
    bool cluster_known;   /* a control document has been read */
    ah_control_t cluster; /* the latest control document seen */
    int64_t applied_version;
    bool local_override; /* the last applied command was local (API or signal) */
    bool held; /* paused because the cluster command was shutdown when the agent started: only a
                  cluster command releases it */
    bool shutdown_requested;
    ah_store_status_t store;
    uint64_t batches;
    uint64_t batch_errors;
    uint64_t batch_overruns;
    uint64_t commands_applied;
    uint64_t hook_errors;
    int64_t started_us;         /* wall clock at creation */
    int64_t batch_started_us;   /* monotonic start of the running batch/hook as stamped (when
                                   first seen running: ah_state_call_stamp), 0 if none or not
                                   stamped yet */
    uint64_t call_generation;   /* number of that call (ah_lua_interrupt_call), 0 if none */
    double last_control_lag_ms; /* command timestamp → applied, last cluster command */
    bool wedged;                /* a Lua call overran BATCH_TIMEOUT and is still running */
    uint64_t reloads;           /* successful script reloads */
    uint64_t reload_failures;   /* reloads that kept the old script */
    int64_t stop_requested_us;  /* monotonic time the shutdown now under way was requested; 0:
                                   none (SHUTDOWN_TIMEOUT counts from here) */
    char held_leases[AH_HELD_LEASES_MAX + 1]; /* the leases this agent holds, by name, comma-
                                                 separated (status records) */
} ah_state_snapshot_t;

typedef struct ah_state_s ah_state_t;

const char *ah_run_state_name(ah_run_state_t st); /* "starting" | "running" | ... */

/* The transition table. Given the current state, a command and its source, returns 0 and fills
 * *to and *hook; AH_ENOOP when the command does not change the state (e.g. pause while paused);
 * AH_EINVAL when the state accepts no commands (stopping, stopped). A startup sync to
 * "shutdown" holds the agent paused (it must stay reachable so an operator can resume): *to is
 * paused, and the agent is then in the table's "held" row (ah_state_target_held). */
int ah_state_target(ah_run_state_t from, ah_command_t cmd, ah_source_t src, ah_run_state_t *to,
                    ah_hook_t *hook);
/* The same for an agent held paused by a cluster shutdown: a cluster command releases it (resume
 * runs it, pause makes it ordinarily paused, shutdown stops it), a local shutdown stops it, a
 * local pause is AH_ENOOP and a local resume AH_EREFUSED. *held tells whether it stays held. */
int ah_state_target_held(ah_command_t cmd, ah_source_t src, ah_run_state_t *to, bool *held,
                         ah_hook_t *hook);

/* Creates the state object in AH_STATE_STARTING. NULL on allocation failure. */
ah_state_t *ah_state_new(void);
/* Frees it. NULL is accepted. No other thread may use it any more. */
void ah_state_free(ah_state_t *s);

/* A control document read by the watcher (or written by this agent). Ignored unless its
 * version is higher than any seen before; otherwise it becomes the cluster view and the
 * pending event (source "startup" if the agent is still starting, else "cluster"). */
void ah_state_offer_cluster(ah_state_t *s, const ah_control_t *doc);
/* The complete set of scope documents read by the watcher (sorted by selector; at most
 * AH_SCOPES_MAX): replaces the agent's view. A matching scope that is new, changed or gone
 * makes the effective command pending (as ah_state_offer_cluster); while the cluster document
 * has not been read yet it is only kept, so the startup sync applies every scope at once. */
void ah_state_offer_scopes(ah_state_t *s, const ah_control_t *scopes, int count);
/* Copies the scope documents (sorted by selector) into out[max]; returns how many. */
int ah_state_scopes(ah_state_t *s, ah_scope_view_t *out, int max);
/* Sets this agent's labels (ownership passes to the state; NULL: none). Call before other
 * threads use the state. */
void ah_state_set_labels(ah_state_t *s, ah_labels_t *labels);
/* The canonical text of this agent's labels ("" if none) into out[n]. */
void ah_state_labels_text(ah_state_t *s, char *out, size_t n);

/* A command for this pod only (API or signal; source "startup" for the host's own startup
 * command). A local shutdown is final: nothing replaces it. Returns AH_OK (pending), AH_EINVAL
 * when the agent is already shutting down (a final shutdown is pending or applied), or
 * AH_EUNAVAIL for a pause/resume while the agent is starting (it has not synced to the cluster
 * state yet; a local shutdown is accepted). A refused command changes nothing. */
int ah_state_offer_local(ah_state_t *s, ah_command_t cmd, ah_source_t src, const char *reason,
                         const char *updated_by);
/* The same with a drain deadline: drain_ms (> 0, pause or shutdown only) after now the waits of
 * the call running meanwhile are cancelled; 0: none of its own (a pause then gets
 * PAUSE_DRAIN_TIMEOUT's, if set). */
int ah_state_offer_local_drain(ah_state_t *s, ah_command_t cmd, ah_source_t src, const char *reason,
                               const char *updated_by, int64_t drain_ms);
/* Sets the drain deadlines the agent applies by itself: pause_s for a pause that names none
 * (PAUSE_DRAIN_TIMEOUT; 0: none) and shutdown_s after a shutdown was requested, the bound of any
 * shutdown (80% of SHUTDOWN_TIMEOUT; 0: none). Call before other threads use the state. */
void ah_state_set_drain_limits(ah_state_t *s, double pause_s, double shutdown_s);
/* The command waiting to be applied, if any: true and *out filled for a pending pause, resume or
 * shutdown (a startup sync does not count: it is applied when init returns). Any thread. */
bool ah_state_pending(ah_state_t *s, ah_pending_t *out);

/* Lua worker: takes the pending event, if any. Returns true and fills *ev. */
bool ah_state_take_event(ah_state_t *s, ah_event_t *ev);
/* Lua worker: applies ev through the transition table (ah_state_target, or ah_state_target_held
 * while held) from the current state, reported in *from. AH_OK: the new state *to is committed
 * and *hook is to be run next; AH_ENOOP: the state stays, ev counts as applied (applied_version,
 * local_override); AH_EREFUSED: a local resume of a held agent, ev is dropped; AH_EINVAL: the
 * state accepts no commands (stopping, stopped), ev is dropped. */
int ah_state_apply(ah_state_t *s, const ah_event_t *ev, ah_run_state_t *from, ah_run_state_t *to,
                   ah_hook_t *hook);
/* Sets the final state (stopped) when the worker exits. */
void ah_state_set_stopped(ah_state_t *s);

/* Waits up to `seconds` until an event is pending or a wake-up. Returns true if woken early.
 * Any thread may wait (agent.sleep runs on the Lua worker). */
bool ah_state_wait(ah_state_t *s, double seconds);
/* agent.sleep's wait: like ah_state_wait, but a pending startup sync does not end it (the sync
 * is applied only after init returns). seconds <= 0: whether a sleep would end now. */
bool ah_state_sleep(ah_state_t *s, double seconds);
/* True while the agent is held paused by a cluster shutdown seen at startup. */
bool ah_state_held(ah_state_t *s);
/* True once a pending or applied command asks this agent to shut down. */
bool ah_state_should_stop(ah_state_t *s);
/* True while an event is pending. */
bool ah_state_has_event(ah_state_t *s);
/* Sets the function called (on the offering thread, after the lock is released) whenever
 * ah_state_sleep(s, 0) may have become true: the Lua worker's loop uses it to wake
 * agent.sleep. Call before other threads use the state; fn must not call back into the state
 * with the expectation of blocking. NULL: none. */
void ah_state_set_waker(ah_state_t *s, void (*fn)(void *ud), void *ud);

ah_run_state_t ah_state_get(ah_state_t *s);
void ah_state_snapshot(ah_state_t *s, ah_state_snapshot_t *out);

/* Counters and markers kept by the Lua worker. */
/* A batch or hook starts (Lua worker). Returns its number (the call generation, > 0, unique for
 * the state object's life). now_mono_us (monotonic µs) stamps its start; 0 leaves it unstamped:
 * the worker reads no clock per call (a clock read is a fifth of an empty batch), and a call is
 * stamped when first seen running instead, by the watchdog's tick or at its first wait
 * (ah_state_call_stamp), so the stamp is at most one watchdog interval late. */
uint64_t ah_state_call_begin_at(ah_state_t *s, int64_t now_mono_us);
/* Stamps the running call numbered generation with now_mono_us unless it has a stamp already.
 * Returns the call's stamp, or now_mono_us when that call is not running. Any thread. */
int64_t ah_state_call_stamp(ah_state_t *s, uint64_t generation, int64_t now_mono_us);
void ah_state_call_end(ah_state_t *s);
void ah_state_count_batch(ah_state_t *s, bool ok);
void ah_state_count_hook_error(ah_state_t *s);
/* Called by the watchdog when the running call exceeded its budget (once per call). */
void ah_state_mark_overrun(ah_state_t *s);

/* Script reload (SIGHUP, POST /api/agent/reload). Any thread requests one and gets a ticket;
 * the Lua worker takes it between batches, loads the script into a fresh state and reports the
 * outcome; a requester may wait for that outcome. Requests made before the worker gets to them
 * are merged into one. */
uint64_t ah_state_request_reload(ah_state_t *s);
/* Lua worker: the ticket of the pending reload request, or 0 if none. */
uint64_t ah_state_take_reload(ah_state_t *s);
/* Lua worker: the outcome of the reload up to ticket (error: why the old script was kept). */
void ah_state_finish_reload(ah_state_t *s, uint64_t ticket, bool ok, const char *error);
/* Waits up to `seconds` for the outcome of ticket. 0 if the new script runs, AH_ELUA with err
 * when it was rejected (the old script keeps running), AH_ETIMEOUT if still pending. */
int ah_state_wait_reload(ah_state_t *s, uint64_t ticket, double seconds, char *err, size_t errlen);
/* The outcome of ticket now, without waiting: as ah_state_wait_reload with 0 seconds, except
 * that a stopped worker is not waited for. */
int ah_state_reload_outcome(ah_state_t *s, uint64_t ticket, char *err, size_t errlen);

/* Registers fn(ud), called after every change a waiting request may be looking for: a
 * committed transition, a finished reload, the worker's stop, a new cluster document. One
 * listener (the HTTP module's parked requests); fn NULL removes it, and once this returns fn is
 * not running and will not be called again. fn runs on the thread that made the change, without
 * the state lock, and must only wake someone (it must not block or call back into the state
 * object). */
void ah_state_set_change_listener(ah_state_t *s, void (*fn)(void *ud), void *ud);

/* Sets the function told (without the state lock, on the thread that made the change) after
 * every change an agent's status record shows — a committed transition, an applied command, the
 * final stop, a new watch mode (record_changed true) — and when a newer control document is
 * accepted (record_changed false). fn must not block. Call before other threads use the state;
 * NULL removes it. */
/* The lease keeper's list of held leases (comma-separated names, cut at AH_HELD_LEASES_MAX);
 * a change tells the fleet listener (the status record shows it). Any thread. */
void ah_state_set_held_leases(ah_state_t *s, const char *names);
void ah_state_set_fleet_listener(ah_state_t *s, void (*fn)(void *ud, bool record_changed),
                                 void *ud);

/* Log order on the issuing agent. A thread issuing a cluster command (a store worker, the fleet
 * waiter, the status writer) is between begin and end from before the store write until it has
 * logged "issued" and offered the document (issuers are serialised by a lock of their own); the
 * worker passes the barrier before it logs a cluster transition, so this agent's "Agent paused"
 * follows its own "Cluster command pause issued" (its watcher may deliver the write first). The
 * worker takes no lock held across the store write: the barrier waits for the issue to end, at
 * most AH_STATE_ISSUE_BARRIER_MAX seconds (a write that takes longer is blocked in the store,
 * e.g. by another process's write lock, so it cannot be the write being applied), then the
 * transition's hook runs anyway. */
#define AH_STATE_ISSUE_BARRIER_MAX 0.25
void ah_state_issue_begin(ah_state_t *s);
void ah_state_issue_end(ah_state_t *s);
void ah_state_issue_barrier(ah_state_t *s);

/* Store watcher: publishes the store's status (copied). */
void ah_state_set_store_status(ah_state_t *s, const ah_store_status_t *st);

#endif
