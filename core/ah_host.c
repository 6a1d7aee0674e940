/* Implementation of ah_host.h. The main thread runs a libuv loop (signals, a watchdog timer and
 * an async handle the worker uses to announce its exit); the Lua worker thread runs batches and
 * hooks; the store's watcher thread and libmicrohttpd's threads only talk to the state object.
 * A command therefore flows: HTTP thread → store write → ah_state_offer_cluster() (and every
 * other agent's watcher → ah_state_offer_cluster()) → the worker wakes, finishes its batch,
 * commits the transition, then runs the hook. */
#include "ah_host.h"

#include "ah_fleet.h"
#include "ah_http.h"
#include "ah_lease.h"
#include "ah_log.h"
#include "ah_lua.h"
#include "ah_mongo.h"
#include "ah_metrics.h"
#include "ah_store.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define WATCHDOG_INTERVAL_MS 250
#define IDLE_BACKOFF_MIN 0.1
#define IDLE_BACKOFF_MAX 1.0
#define ERROR_BACKOFF_MIN 0.5
#define ERROR_BACKOFF_MAX 30.0
/* Share of SHUTDOWN_TIMEOUT after which a Lua call a shutdown waits for is interrupted (its waits
 * cancelled); the rest is left for on_shutdown and the teardown. */
#define SHUTDOWN_INTERRUPT_SHARE 0.8

struct ah_host_s {
    const ah_config_t *cfg;
    ah_state_t *state;
    ah_lua_t *lua;             /* owned by the worker thread once it starts; replaced on reload */
    ah_lua_t *loading;         /* the fresh state of a reload while its init runs, else NULL */
    ah_lua_options_t lua_opts; /* how lua was opened, to open it again on reload */
    pthread_mutex_t lua_lock;  /* held to swap h->lua / h->loading (worker) and to interrupt or
                                  wake them (other threads) */
    ah_metrics_t *metrics;     /* agent.metrics; outlives every Lua state */
    ah_lua_mongo_t *mongo;     /* agent.mongo's connection; outlives lua */
    ah_store_t *store;
    ah_leases_t *leases; /* this agent's leases (agent.lease, agent.every); outlives lua */
    ah_fleet_t *fleet;   /* this agent's status record; NULL without a store */
    ah_http_t *http;
    atomic_int http_port; /* read by any thread (ah_host_http_port) */

    uv_loop_t loop;
    uv_signal_t sig_term;
    uv_signal_t sig_int;
    uv_signal_t sig_usr1;
    uv_signal_t sig_usr2;
    uv_signal_t sig_hup;
    uv_timer_t watchdog;
    uv_async_t worker_done;
    bool loop_open;    /* uv_loop_init() succeeded and uv_loop_close() has not run */
    bool handles_open; /* close_handles() has not run since the loop was opened */
    char script_label[AH_NAME_MAX + 1]; /* cfg->script_path or the source's name, for logs */

    pthread_t worker;
    bool worker_started;
    atomic_int worker_rc; /* 0, 1 when init failed, AH_HOST_LOAD_FAILED (load_err) */
    char worker_err[AH_ERRLEN];

    /* The worker's start (worker_start): it loads the script when ah_host_new() left that to it
     * (ah_host_options_t.load_on_worker) while ah_host_run() opens the store and the HTTP API,
     * then waits at the gate until ah_host_run() lets it go on or calls the run off. */
    bool load_on_worker;
    pthread_mutex_t gate_lock;
    pthread_cond_t gate_cond;
    enum { GATE_WAIT, GATE_GO, GATE_ABORT } gate; /* under gate_lock */
    bool load_done;                               /* under gate_lock */
    bool load_failed;                             /* under gate_lock, with load_err */
    char load_err[AH_ERRLEN * 4];

    bool interrupted_for_stop;
    bool wedged;

    /* The hard-exit timer (ah_host_options_t.exit_on_shutdown_timeout): a thread armed by the
     * watchdog when it first sees a shutdown request; it _exit()s the process at the
     * SHUTDOWN_TIMEOUT deadline unless ah_host_run() disarms it first. */
    bool exit_on_timeout;
    pthread_mutex_t exit_lock;
    pthread_cond_t exit_cond; /* on CLOCK_MONOTONIC */
    bool exit_disarmed;       /* under exit_lock */
    bool exit_armed;          /* the thread was started (main thread only) */
    int64_t exit_deadline_us; /* monotonic; set before the thread starts */
    pthread_t exit_timer;
};

/* The state's waker (any thread): a command reaches the running call's loop, so that agent.sleep
 * returns early. */
static void host_wake_lua(void *ud)
{
    ah_host_t *h = ud;
    pthread_mutex_lock(&h->lua_lock);
    ah_lua_wake(h->lua);
    ah_lua_wake(h->loading);
    pthread_mutex_unlock(&h->lua_lock);
}

/* This agent's labels: AGENT_LABELS_FILE (a Downward API file), then AGENT_LABELS (which wins
 * on a key both give), then the implicit agent=<AGENT_ID>. NULL with err naming the bad label
 * (or the file) on error. */
static ah_labels_t *host_labels(const ah_config_t *cfg, char *err, size_t errlen)
{
    char inner[AH_ERRLEN];
    ah_labels_t *labels = NULL;
    ah_labels_t *given = NULL;
    char *content = NULL;
    if (cfg->agent_labels_file != NULL) {
        FILE *f = fopen(cfg->agent_labels_file, "r");
        size_t cap = 65536, n = 0;
        content = f != NULL ? malloc(cap + 1) : NULL;
        if (f == NULL || content == NULL) {
            snprintf(err, errlen, "AGENT_LABELS_FILE '%s': %s", cfg->agent_labels_file,
                     f == NULL ? strerror(errno) : "out of memory");
            if (f != NULL) {
                fclose(f);
            }
            goto fail;
        }
        n = fread(content, 1, cap, f);
        content[n] = '\0';
        fclose(f);
        labels = ah_labels_parse_downward(content, inner, sizeof(inner));
        if (labels == NULL) {
            snprintf(err, errlen, "AGENT_LABELS_FILE '%s': %s", cfg->agent_labels_file, inner);
            goto fail;
        }
    } else if ((labels = ah_labels_new()) == NULL) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    given = ah_labels_parse(cfg->agent_labels, inner, sizeof(inner));
    if (given == NULL) {
        snprintf(err, errlen, "AGENT_LABELS: %s", inner);
        goto fail;
    }
    if (ah_labels_get(given, "agent") != NULL) {
        snprintf(err, errlen, "AGENT_LABELS: the label 'agent' is implicit (agent=<AGENT_ID>)");
        goto fail;
    }
    for (size_t i = 0; i < ah_labels_count(given); i++) {
        if (ah_labels_set(labels, ah_labels_key(given, i), ah_labels_value(given, i), inner,
                          sizeof(inner)) != AH_OK) {
            snprintf(err, errlen, "AGENT_LABELS: %s", inner);
            goto fail;
        }
    }
    if (ah_label_value_check(cfg->agent_id, strlen(cfg->agent_id), inner, sizeof(inner)) == AH_OK) {
        if (ah_labels_set(labels, "agent", cfg->agent_id, inner, sizeof(inner)) != AH_OK) {
            snprintf(err, errlen, "%s", inner);
            goto fail;
        }
    } else {
        ah_log_warn("AGENT_ID '%s' is not a valid label value: this agent has no agent= label "
                    "(selectors cannot name it)",
                    cfg->agent_id);
    }
    char text[AH_LABELS_TEXT_MAX + 1];
    if (ah_labels_format(labels, text, sizeof(text)) != AH_OK) {
        snprintf(err, errlen, "AGENT_LABELS: the labels are longer than %d bytes",
                 AH_LABELS_TEXT_MAX);
        goto fail;
    }
    ah_labels_free(given);
    free(content);
    return labels;
fail:
    ah_labels_free(given);
    ah_labels_free(labels);
    free(content);
    return NULL;
}

ah_host_t *ah_host_new(const ah_config_t *cfg, const ah_host_options_t *hopts, char *err,
                       size_t errlen)
{
    ah_host_t *h = calloc(1, sizeof(*h));
    if (h == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    h->cfg = cfg;
    pthread_mutex_init(&h->lua_lock, NULL);
    pthread_mutex_init(&h->gate_lock, NULL);
    pthread_mutex_init(&h->exit_lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&h->gate_cond, &attr);
    pthread_cond_init(&h->exit_cond, &attr);
    pthread_condattr_destroy(&attr);
    h->state = ah_state_new();
    h->metrics = ah_metrics_new();
    h->leases = h->state != NULL ? ah_leases_new(h->state, cfg->agent_id) : NULL;
    if (h->state == NULL || h->metrics == NULL || h->leases == NULL) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    ah_labels_t *labels = host_labels(cfg, err, errlen);
    if (labels == NULL) {
        goto fail;
    }
    ah_state_set_labels(h->state, labels);
    /* agent.mongo: its own pool for AGENT_MONGODB_URI (or MONGODB_URI without a MongoDB control
     * store); otherwise the store's URI for a pool of its own, opened on first use (never the
     * store's pool: no script can take the connections cluster commands need). */
    const char *own_uri = cfg->agent_mongodb_uri;
    if (own_uri == NULL && !cfg->distributed_control) {
        own_uri = cfg->mongodb_uri;
    }
    h->mongo = ah_lua_mongo_new(own_uri, cfg->agent_mongodb_db, cfg->mongodb_database,
                                cfg->agent_id, err, errlen);
    if (h->mongo == NULL) {
        goto fail;
    }
    if (own_uri == NULL && cfg->mongodb_uri != NULL) {
        ah_lua_mongo_set_store_uri(h->mongo, cfg->mongodb_uri);
    }
    ah_lua_options_t opts = {.agent_id = cfg->agent_id,
                             .state = h->state,
                             .batch_timeout = cfg->batch_timeout,
                             .mongo = h->mongo,
                             .metrics = h->metrics,
                             .memory_limit = cfg->lua_memory_limit,
                             .leases = h->leases};
    if (hopts != NULL) {
        h->exit_on_timeout = hopts->exit_on_shutdown_timeout;
        opts.script_source = hopts->script_source;
        opts.script_name = hopts->script_name;
        opts.functions = hopts->functions;
        opts.function_count = hopts->function_count;
    }
    if (opts.script_source != NULL) {
        ah_strlcpy(h->script_label, opts.script_name ? opts.script_name : "script",
                   sizeof(h->script_label));
    } else {
        ah_strlcpy(h->script_label, cfg->script_path, sizeof(h->script_label));
    }
    h->lua_opts = opts;
    h->load_on_worker = hopts != NULL && hopts->load_on_worker;
    if (!h->load_on_worker) {
        h->lua = ah_lua_open(&opts, cfg->script_path, err, errlen);
        if (h->lua == NULL) {
            goto fail;
        }
    }
    ah_state_set_waker(h->state, host_wake_lua, h);
    /* a shutdown's drain is bounded where the watchdog interrupts the call (on_watchdog) */
    ah_state_set_drain_limits(h->state, h->cfg->pause_drain_timeout,
                              h->cfg->shutdown_timeout * SHUTDOWN_INTERRUPT_SHARE);
    return h;
fail:
    ah_host_free(h);
    return NULL;
}

void ah_host_free(ah_host_t *h)
{
    if (h == NULL) {
        return;
    }
    ah_lua_close(h->lua);
    ah_leases_free(h->leases); /* after the state that named them */
    ah_lua_mongo_free(h->mongo);
    ah_metrics_free(h->metrics);
    ah_state_free(h->state);
    pthread_mutex_destroy(&h->lua_lock);
    pthread_cond_destroy(&h->gate_cond);
    pthread_mutex_destroy(&h->gate_lock);
    pthread_cond_destroy(&h->exit_cond);
    pthread_mutex_destroy(&h->exit_lock);
    free(h);
}

ah_state_t *ah_host_state(ah_host_t *h)
{
    return h->state;
}

int ah_host_http_port(ah_host_t *h)
{
    return atomic_load(&h->http_port);
}

void ah_host_request_stop(ah_host_t *h)
{
    ah_state_offer_local(h->state, AH_CMD_SHUTDOWN, AH_SOURCE_LOCAL, "stop requested", "host");
}

int ah_host_command(ah_host_t *h, ah_command_t cmd, const char *reason)
{
    return ah_state_offer_local(h->state, cmd, AH_SOURCE_LOCAL, reason, "host");
}

/* ---- the Lua worker ---------------------------------------------------------------------- */

static void log_transition(ah_run_state_t to, const ah_event_t *ev)
{
    const char *what = to == AH_STATE_PAUSED     ? "paused"
                       : to == AH_STATE_RUNNING  ? "running"
                       : to == AH_STATE_STOPPING ? "shutting down"
                                                 : ah_run_state_name(to);
    /* reason and updated_by come from a client (maybe through the store): escaped */
    char by[AH_NAME_MAX * 4 + 1];
    char reason[AH_REASON_MAX * 4 + 1];
    ah_log_escape(ev->updated_by[0] ? ev->updated_by : "unknown", by, sizeof(by));
    ah_log_escape(ev->reason[0] ? ev->reason : "no reason given", reason, sizeof(reason));
    if (ev->source == AH_SOURCE_CLUSTER || ev->source == AH_SOURCE_STARTUP) {
        ah_log_info("Agent %s (%s command '%s', version %lld, by %s: %s)", what,
                    ah_source_name(ev->source), ah_command_name(ev->command),
                    (long long)ev->version, by, reason);
    } else {
        ah_log_info("Agent %s (%s command '%s' by %s: %s)", what, ah_source_name(ev->source),
                    ah_command_name(ev->command), by, reason);
    }
}

/* Applies one event: the transition is committed first, then its hook runs (a failing hook does not
 * undo the transition). */
static void release_script(ah_host_t *h, ah_lua_t *lua, bool reloading);

static void worker_apply(ah_host_t *h, const ah_event_t *ev)
{
    ah_run_state_t from;
    ah_run_state_t to;
    ah_hook_t hook;
    /* the batch a drain deadline cut short abandoned its work: what it held goes back after the
     * hook, as on shutdown (a shutdown releases at the worker's exit anyway) */
    bool drained = ah_lua_drained(h->lua);
    int rc = ah_state_apply(h->state, ev, &from, &to, &hook);
    if (rc == AH_ENOOP) {
        ah_log_debug("Command '%s' (version %lld) leaves the agent %s",
                     ah_command_name(ev->command), (long long)ev->version, ah_run_state_name(from));
        return;
    }
    if (rc == AH_EREFUSED) {
        /* a signal's event carries the signal's name as its reason (on_signal) */
        bool by_signal = ev->source == AH_SOURCE_SIGNAL;
        ah_log_warn("Local resume by %s%s refused: this agent is held paused because the "
                    "cluster command is 'shutdown'; only a cluster command releases it "
                    "(POST /api/cluster/resume, agenthost ctl resume)",
                    by_signal ? "signal " : "",
                    by_signal           ? ev->reason
                    : ev->updated_by[0] ? ev->updated_by
                                        : "unknown");
        return;
    }
    if (rc != AH_OK) {
        return;
    }
    if (from == AH_STATE_STARTING && ev->source == AH_SOURCE_STARTUP &&
        h->cfg->distributed_control) {
        ah_log_info("Synced to cluster state: '%s' (version %lld)", ah_command_name(ev->command),
                    (long long)ev->version);
        if (ev->command == AH_CMD_SHUTDOWN) {
            ah_log_warn(
                "The cluster command is 'shutdown': this agent stays paused until "
                "POST /api/cluster/resume (agenthost ctl resume); a local resume is refused");
        }
    }
    if (ev->source == AH_SOURCE_CLUSTER) {
        ah_state_issue_barrier(h->state); /* after this agent's own "issued" line, if it is one */
    }
    log_transition(to, ev);
    if (drained) {
        ah_log_warn("The running call was cut short at the drain deadline of '%s': its waits "
                    "were cancelled",
                    ah_command_name(ev->command));
    }
    char err[AH_ERRLEN * 4];
    if (hook != AH_HOOK_NONE) {
        rc = ah_lua_hook(h->lua, hook, ev, err, sizeof(err));
        if (rc != AH_OK) {
            ah_state_count_hook_error(h->state);
            ah_log_error("Lua error in %s (the transition to %s still holds): %s",
                         ah_lua_hook_name(hook), ah_run_state_name(to), err);
        }
    }
    if (drained && to == AH_STATE_PAUSED) {
        release_script(h, h->lua, false);
    }
}

/* Before a Lua state is closed: runs the script's on_reload (when it is being replaced), then
 * lets the agent module release what it holds (agent.queue's claims). Failures are logged; the
 * state is closed anyway. */
static void release_script(ah_host_t *h, ah_lua_t *lua, bool reloading)
{
    char err[AH_ERRLEN * 4];
    if (reloading && ah_lua_on_reload(lua, err, sizeof(err)) != AH_OK) {
        ah_state_count_hook_error(h->state);
        ah_log_error("Lua error in on_reload (the new script replaces it anyway): %s", err);
    }
    if (ah_lua_release(lua, err, sizeof(err)) != AH_OK) {
        ah_log_error("Lua error while releasing the script's claims: %s", err);
    }
}

/* ah_lua_options_t.publish for a reload: the fresh state is h->loading while it loads. */
static void publish_loading(void *ud, ah_lua_t *lua)
{
    ah_host_t *h = ud;
    pthread_mutex_lock(&h->lua_lock);
    h->loading = lua;
    pthread_mutex_unlock(&h->lua_lock);
}

/* Loads the script again into a fresh Lua state and runs its init; only then replaces the old
 * state. On any failure the old script keeps running and the reason is reported. The run state
 * does not change (a paused agent stays paused; hooks are not replayed). */
static void worker_reload(ah_host_t *h, uint64_t ticket)
{
    char err[AH_ERRLEN * 4];
    ah_log_info("Reloading script %s", h->script_label);
    ah_leases_reload_begin(h->leases); /* the leases the new script names are its own */
    /* The fresh state is published as loading before its main chunk runs, so the watchdog
     * stops a main chunk that overruns BATCH_TIMEOUT as it stops init and batches. */
    ah_lua_options_t opts = h->lua_opts;
    opts.publish = publish_loading;
    opts.publish_ud = h;
    ah_lua_t *fresh = ah_lua_open(&opts, h->cfg->script_path, err, sizeof(err));
    if (fresh == NULL) {
        ah_leases_reload_end(h->leases, false);
        ah_log_error("Reload failed, the previous script keeps running: %s", err);
        ah_state_finish_reload(h->state, ticket, false, err);
        return;
    }
    /* ctx.iteration counts this agent's batches, not this script version's (docs/LUA.md). */
    ah_lua_set_iteration(fresh, ah_lua_iteration(h->lua));
    pthread_mutex_lock(&h->lua_lock);
    h->loading = fresh; /* its init is the running call: the watchdog must reach it */
    pthread_mutex_unlock(&h->lua_lock);
    int rc = ah_lua_init(fresh, err, sizeof(err));
    pthread_mutex_lock(&h->lua_lock);
    h->loading = NULL;
    pthread_mutex_unlock(&h->lua_lock);
    if (rc != AH_OK) {
        ah_log_error("Reload failed in init, the previous script keeps running: %s", err);
        ah_lua_close(fresh);
        ah_leases_reload_end(h->leases, false);
        ah_state_finish_reload(h->state, ticket, false, err);
        return;
    }
    /* The old script lets go (its on_reload, then agent.queue's claims) before it is closed. */
    release_script(h, h->lua, true);
    pthread_mutex_lock(&h->lua_lock);
    ah_lua_t *old = h->lua;
    h->lua = fresh;
    pthread_mutex_unlock(&h->lua_lock);
    ah_lua_close(old);
    ah_leases_reload_end(h->leases, true); /* what the new script does not name is released */
    ah_log_info("Reloaded script %s (state: %s)", h->script_label,
                ah_run_state_name(ah_state_get(h->state)));
    ah_state_finish_reload(h->state, ticket, true, "");
}

/* The worker's first step: loads the script if ah_host_new() left that to this thread (so that it
 * overlaps the store's open and the HTTP API's start), then waits at the gate unless
 * ah_host_run() has opened it already. Its main chunk is published as loading, like a reload's,
 * so the watchdog bounds it by BATCH_TIMEOUT once the loop runs. False: nothing more may run (the
 * run was called off, or the script did not load: then the worker ends the run, see
 * host_go). */
static bool worker_start(ah_host_t *h)
{
    char err[AH_ERRLEN * 4] = "";
    ah_lua_t *lua = h->lua;
    if (h->load_on_worker) {
        ah_lua_options_t opts = h->lua_opts;
        opts.publish = publish_loading;
        opts.publish_ud = h;
        lua = ah_lua_open(&opts, h->cfg->script_path, err, sizeof(err));
        pthread_mutex_lock(&h->lua_lock);
        h->loading = NULL;
        h->lua = lua;
        pthread_mutex_unlock(&h->lua_lock);
    }
    pthread_mutex_lock(&h->gate_lock);
    h->load_done = true;
    h->load_failed = lua == NULL;
    ah_strlcpy(h->load_err, lua == NULL ? err : "", sizeof(h->load_err));
    pthread_cond_broadcast(&h->gate_cond);
    while (h->gate == GATE_WAIT) {
        pthread_cond_wait(&h->gate_cond, &h->gate_lock);
    }
    bool go = h->gate == GATE_GO;
    pthread_mutex_unlock(&h->gate_lock);
    if (go && lua == NULL) { /* the loop runs: end it, ah_host_run() reports load_err */
        atomic_store(&h->worker_rc, AH_HOST_LOAD_FAILED);
        ah_state_set_stopped(h->state);
        uv_async_send(&h->worker_done);
    }
    return go && lua != NULL;
}

static bool load_done(void *arg)
{
    const ah_host_t *h = arg;
    return h->load_done;
}

/* Lets the worker go on (init, the startup sync, the batches) once the store and the HTTP API
 * are up, without waiting for its load: false if that load has failed already (host_call_off
 * reports it). */
static bool host_go(ah_host_t *h)
{
    pthread_mutex_lock(&h->gate_lock);
    bool failed = h->load_done && h->load_failed;
    if (!failed) {
        h->gate = GATE_GO;
        pthread_cond_broadcast(&h->gate_cond);
    }
    pthread_mutex_unlock(&h->gate_lock);
    return !failed;
}

/* Calls the run off before the worker was let go (the store or the HTTP API failed, or the load
 * did): the script's own load error wins, as the first problem to fix. No loop runs yet to bound
 * the main chunk, so its load gets SHUTDOWN_TIMEOUT to end; past that the worker cannot be joined
 * and AH_HOST_WEDGED is returned (the binary exits 1). */
static int host_call_off(ah_host_t *h, int exit_code, char *err, size_t errlen)
{
    pthread_mutex_lock(&h->gate_lock);
    bool done =
        ah_cond_wait_until(&h->gate_cond, &h->gate_lock, h->cfg->shutdown_timeout, load_done, h);
    if (done && h->load_failed) {
        ah_strlcpy(err, h->load_err, errlen);
        exit_code = AH_HOST_LOAD_FAILED;
    }
    h->gate = GATE_ABORT;
    pthread_cond_broadcast(&h->gate_cond);
    pthread_mutex_unlock(&h->gate_lock);
    if (!done) {
        ah_log_error("agenthost: %s (the script's main chunk was still running %gs later "
                     "(SHUTDOWN_TIMEOUT): exiting without it)",
                     err, h->cfg->shutdown_timeout);
        return AH_HOST_WEDGED;
    }
    return exit_code;
}

static void *worker_main(void *arg)
{
    ah_host_t *h = arg;
    char err[AH_ERRLEN * 4];
    if (!worker_start(h)) {
        return NULL;
    }
    if (ah_lua_init(h->lua, err, sizeof(err)) != AH_OK) {
        ah_log_error("Lua error in init: %s", err);
        /* The error's first line (the traceback is in the log line above). */
        static const char prefix[] = "init failed: ";
        ah_strlcpy(h->worker_err, prefix, sizeof(h->worker_err));
        size_t line = strcspn(err, "\n");
        size_t room = sizeof(h->worker_err) - (sizeof(prefix) - 1);
        if (line < room) {
            err[line] = '\0';
        }
        ah_strlcpy(h->worker_err + sizeof(prefix) - 1, err, room);
        atomic_store(&h->worker_rc, 1);
        ah_state_offer_local(h->state, AH_CMD_SHUTDOWN, AH_SOURCE_LOCAL, "init failed", "host");
    }
    int rc;
    int batch_errors = 0; /* consecutive failed batches: drive the error backoff */
    int idle_batches = 0; /* consecutive batches without items: drive the idle backoff */
    for (;;) {
        ah_event_t ev;
        if (ah_state_take_event(h->state, &ev)) {
            if (atomic_load(&h->worker_rc) != 0 && ev.command != AH_CMD_SHUTDOWN) {
                continue;
            }
            worker_apply(h, &ev);
            continue;
        }
        ah_run_state_t st = ah_state_get(h->state);
        if (st == AH_STATE_STOPPING || st == AH_STATE_STOPPED) {
            break; /* a reload requested now is refused (503), never served */
        }
        uint64_t reload_ticket = ah_state_take_reload(h->state);
        if (reload_ticket != 0) {
            worker_reload(h, reload_ticket);
            continue;
        }
        if (st != AH_STATE_RUNNING) {
            ah_state_wait(h->state, 3600);
            continue;
        }
        /* agent.every: a due schedule runs as its own call between batches */
        double next_schedule = -1;
        rc = ah_lua_run_schedule(h->lua, &next_schedule, err, sizeof(err));
        if (rc != 0) {
            if (rc < 0) {
                ah_state_count_hook_error(h->state);
                ah_log_error("Lua error in %s", err);
            }
            continue; /* commands first, then the next schedule or batch */
        }
        long long items = 0;
        rc = ah_lua_batch(h->lua, &items, err, sizeof(err));
        ah_state_count_batch(h->state, rc == AH_OK);
        if (rc != AH_OK) {
            double error_wait = ah_backoff(batch_errors, ERROR_BACKOFF_MIN, ERROR_BACKOFF_MAX);
            ah_log_error("Lua error in batch (retrying in %.1fs): %s", error_wait, err);
            ah_state_wait(h->state, error_wait);
            batch_errors += batch_errors < 64;
            continue;
        }
        batch_errors = 0;
        if (items > 0) {
            idle_batches = 0;
            continue;
        }
        double idle_wait = ah_backoff(idle_batches, IDLE_BACKOFF_MIN, IDLE_BACKOFF_MAX);
        if (next_schedule >= 0 && next_schedule < idle_wait) {
            idle_wait = next_schedule;
        }
        ah_state_wait(h->state, idle_wait);
        idle_batches += idle_batches < 64;
    }
    release_script(h, h->lua, false);
    ah_state_set_stopped(h->state);
    uv_async_send(&h->worker_done);
    return NULL;
}

/* ---- the libuv loop ---------------------------------------------------------------------- */

/* Logs why a signal's local command was refused (rc from ah_state_offer_local), if it was. */
static void log_refused_signal(const char *name, int rc)
{
    if (rc == AH_EUNAVAIL) {
        ah_log_warn("%s ignored: the agent is starting and has not synced to the cluster state "
                    "yet",
                    name);
    } else if (rc != AH_OK) {
        ah_log_warn("%s ignored: the agent is shutting down", name);
    }
}

static void on_signal(uv_signal_t *handle, int signum)
{
    ah_host_t *h = handle->data;
    switch (signum) {
    case SIGTERM:
    case SIGINT:
        ah_log_info("Received %s: shutting down gracefully",
                    signum == SIGTERM ? "SIGTERM" : "SIGINT");
        ah_state_offer_local(h->state, AH_CMD_SHUTDOWN, AH_SOURCE_SIGNAL,
                             signum == SIGTERM ? "SIGTERM" : "SIGINT", "signal");
        break;
    case SIGUSR1:
        ah_log_info("Received SIGUSR1: pausing this agent");
        log_refused_signal("SIGUSR1", ah_state_offer_local(h->state, AH_CMD_PAUSE, AH_SOURCE_SIGNAL,
                                                           "SIGUSR1", "signal"));
        break;
    case SIGHUP:
        ah_log_info("Received SIGHUP: reloading the script between batches");
        ah_state_request_reload(h->state);
        break;
    case SIGUSR2:
        ah_log_info("Received SIGUSR2: resuming this agent");
        log_refused_signal("SIGUSR2", ah_state_offer_local(h->state, AH_CMD_RUNNING,
                                                           AH_SOURCE_SIGNAL, "SIGUSR2", "signal"));
        break;
    default:
        break;
    }
}

static void close_one_handle(uv_handle_t *handle, void *arg)
{
    (void)arg;
    if (!uv_is_closing(handle)) {
        uv_close(handle, NULL);
    }
}

/* Closes every handle of the loop, whichever were initialised; the next uv_run() completes the
 * closes so that uv_loop_close() can succeed. Idempotent. */
static void close_handles(ah_host_t *h)
{
    if (h->handles_open) {
        h->handles_open = false;
        uv_walk(&h->loop, close_one_handle, NULL);
    }
}

static void on_worker_done(uv_async_t *handle)
{
    ah_host_t *h = handle->data;
    if (ah_state_get(h->state) == AH_STATE_STOPPED) {
        close_handles(h);
    }
}

/* Interrupts the call numbered `generation` (from the watchdog's snapshot), whichever state
 * runs it (the script's, or a reload's fresh one during its init), and no later call. */
static void host_interrupt_lua(ah_host_t *h, uint64_t generation)
{
    pthread_mutex_lock(&h->lua_lock);
    ah_lua_interrupt_call(h->lua, generation);
    ah_lua_interrupt_call(h->loading, generation);
    pthread_mutex_unlock(&h->lua_lock);
}

/* True while the call numbered `generation` (from the watchdog's snapshot) only waits, whichever
 * state runs it: the worker's loop cancels its waits at BATCH_TIMEOUT itself, so such a call is
 * not wedged; and for AH_LUA_UNWIND_US after that cut, while its script unwinds. */
static bool host_lua_waiting(ah_host_t *h, uint64_t generation)
{
    int64_t now = ah_mono_us();
    pthread_mutex_lock(&h->lua_lock);
    bool waiting = ah_lua_waiting_call(h->lua, generation) ||
                   ah_lua_waiting_call(h->loading, generation) ||
                   ah_lua_unwinding_call(h->lua, generation, now) ||
                   ah_lua_unwinding_call(h->loading, generation, now);
    pthread_mutex_unlock(&h->lua_lock);
    return waiting;
}

/* ---- bounded shutdown --------------------------------------------------------------------- */

/* The monotonic time by which the shutdown under way must be over (SHUTDOWN_TIMEOUT after it
 * was requested; from now if no request is recorded, e.g. the worker failed). */
static int64_t shutdown_deadline_us(ah_host_t *h)
{
    ah_state_snapshot_t snap;
    ah_state_snapshot(h->state, &snap);
    int64_t from = snap.stop_requested_us != 0 ? snap.stop_requested_us : ah_mono_us();
    return from + (int64_t)(h->cfg->shutdown_timeout * 1e6);
}

static bool exit_disarmed(void *arg)
{
    const ah_host_t *h = arg;
    return h->exit_disarmed;
}

/* The hard-exit timer: nothing in the teardown may outlive SHUTDOWN_TIMEOUT, whatever it waits
 * on (a store call, a store close, a connection). */
static void *exit_timer_main(void *arg)
{
    ah_host_t *h = arg;
    pthread_mutex_lock(&h->exit_lock);
    double seconds = (double)(h->exit_deadline_us - ah_mono_us()) / 1e6;
    bool disarmed = ah_cond_wait_until(&h->exit_cond, &h->exit_lock, seconds, exit_disarmed, h);
    pthread_mutex_unlock(&h->exit_lock);
    if (!disarmed) {
        ah_log_error("Shutdown did not finish within SHUTDOWN_TIMEOUT (%gs): exiting now",
                     h->cfg->shutdown_timeout);
        _exit(1);
    }
    return NULL;
}

/* Main thread: starts the hard-exit timer once (when enabled). */
static void arm_exit_timer(ah_host_t *h, int64_t deadline_us)
{
    if (!h->exit_on_timeout || h->exit_armed) {
        return;
    }
    h->exit_deadline_us = deadline_us;
    if (pthread_create(&h->exit_timer, NULL, exit_timer_main, h) != 0) {
        ah_log_warn("cannot start the shutdown timer thread: SHUTDOWN_TIMEOUT bounds only the "
                    "Lua worker");
        return;
    }
    h->exit_armed = true;
}

/* Main thread: stops the hard-exit timer, if it runs. */
static void disarm_exit_timer(ah_host_t *h)
{
    if (!h->exit_armed) {
        return;
    }
    pthread_mutex_lock(&h->exit_lock);
    h->exit_disarmed = true;
    pthread_cond_broadcast(&h->exit_cond);
    pthread_mutex_unlock(&h->exit_lock);
    pthread_join(h->exit_timer, NULL);
    h->exit_armed = false;
}

/* Every WATCHDOG_INTERVAL_MS: reports a Lua call that overran BATCH_TIMEOUT (and asks it to
 * stop), and bounds shutdown by SHUTDOWN_TIMEOUT. Its first tick starts the status writer if the
 * startup sync has not (an agent still waiting for its store is listed as starting). */
static void on_watchdog(uv_timer_t *timer)
{
    ah_host_t *h = timer->data;
    ah_fleet_start_writer(h->fleet); /* a no-op once it runs */
    ah_state_snapshot_t snap;
    ah_state_snapshot(h->state, &snap);
    int64_t now = ah_mono_us();
    if (snap.call_generation != 0 && snap.batch_started_us == 0) {
        /* a call not seen running before: it started within the last interval (no clock is
         * read per call), so its budget counts from now, at most one interval late */
        snap.batch_started_us = ah_state_call_stamp(h->state, snap.call_generation, now);
    }
    if (snap.batch_started_us != 0 && !snap.wedged &&
        (double)(now - snap.batch_started_us) / 1e6 > h->cfg->batch_timeout &&
        !host_lua_waiting(h, snap.call_generation)) {
        ah_state_mark_overrun(h->state);
        ah_log_error("A Lua call has run for more than BATCH_TIMEOUT (%gs): interrupting it; "
                     "/healthz reports the agent wedged until it returns",
                     h->cfg->batch_timeout);
        host_interrupt_lua(h, snap.call_generation);
    }
    if (snap.stop_requested_us == 0 || snap.state == AH_STATE_STOPPED) {
        return;
    }
    arm_exit_timer(h, snap.stop_requested_us + (int64_t)(h->cfg->shutdown_timeout * 1e6));
    double waited = (double)(now - snap.stop_requested_us) / 1e6;
    if (!h->interrupted_for_stop && waited > h->cfg->shutdown_timeout * SHUTDOWN_INTERRUPT_SHARE &&
        snap.call_generation != 0) {
        h->interrupted_for_stop = true;
        ah_log_warn("Shutdown is waiting for a Lua call for %.1fs: interrupting it", waited);
        host_interrupt_lua(h, snap.call_generation);
    }
    if (waited > h->cfg->shutdown_timeout) {
        ah_log_error("Shutdown did not finish within SHUTDOWN_TIMEOUT (%gs): a Lua call is "
                     "still running (a JIT-compiled loop does not see interrupts); exiting",
                     h->cfg->shutdown_timeout);
        h->wedged = true;
        close_handles(h);
    }
}

/* Initialises the loop and its handles (signals, watchdog, worker notification). On failure err
 * names the call; the handles already initialised are closed by close_handles(). */
static int open_handles(ah_host_t *h, char *err, size_t errlen)
{
    int rc = uv_loop_init(&h->loop);
    if (rc != 0) {
        snprintf(err, errlen, "uv_loop_init: %s", uv_strerror(rc));
        return AH_EIO;
    }
    h->loop_open = true;
    h->handles_open = true;
    struct {
        uv_signal_t *handle;
        int signum;
    } sigs[] = {{&h->sig_term, SIGTERM},
                {&h->sig_int, SIGINT},
                {&h->sig_usr1, SIGUSR1},
                {&h->sig_usr2, SIGUSR2},
                {&h->sig_hup, SIGHUP}};
    const char *call = NULL;
    for (size_t i = 0; h->cfg->signals && i < sizeof(sigs) / sizeof(sigs[0]); i++) {
        if ((rc = uv_signal_init(&h->loop, sigs[i].handle)) != 0) {
            call = "uv_signal_init";
            goto err;
        }
        sigs[i].handle->data = h;
        if ((rc = uv_signal_start(sigs[i].handle, on_signal, sigs[i].signum)) != 0) {
            call = "uv_signal_start";
            goto err;
        }
    }
    if ((rc = uv_timer_init(&h->loop, &h->watchdog)) != 0) {
        call = "uv_timer_init";
        goto err;
    }
    h->watchdog.data = h;
    if ((rc = uv_timer_start(&h->watchdog, on_watchdog, WATCHDOG_INTERVAL_MS,
                             WATCHDOG_INTERVAL_MS)) != 0) {
        call = "uv_timer_start";
        goto err;
    }
    if ((rc = uv_async_init(&h->loop, &h->worker_done, on_worker_done)) != 0) {
        call = "uv_async_init";
        goto err;
    }
    h->worker_done.data = h;
    return AH_OK;
err:
    snprintf(err, errlen, "%s: %s", call, uv_strerror(rc));
    return AH_EIO;
}

/* ---- store listener ---------------------------------------------------------------------- */

static void on_store_control(void *ud, const ah_control_t *doc)
{
    ah_state_offer_cluster(ud, doc);
}

static void on_store_scopes(void *ud, const ah_control_t *scopes, int count)
{
    ah_state_offer_scopes(ud, scopes, count);
}

static void on_store_status(void *ud, const ah_store_status_t *status)
{
    ah_state_set_store_status(ud, status);
}

static void on_state_change(void *ud, bool record_changed)
{
    if (record_changed) {
        ah_fleet_changed(ud);
    } else {
        ah_fleet_control_changed(ud);
    }
}

static int open_store(ah_host_t *h, char *err, size_t errlen)
{
    const ah_config_t *cfg = h->cfg;
    if (!cfg->distributed_control) {
        ah_log_info("[Distributed Control] Disabled (ENABLE_DISTRIBUTED_CONTROL=false): "
                    "local control only");
        ah_state_offer_local(h->state, AH_CMD_RUNNING, AH_SOURCE_STARTUP,
                             "distributed control disabled", "system");
        return ah_leases_start(h->leases, NULL, err, errlen);
    }
    ah_log_info("[Distributed Control] Initializing cluster coordination");
    if (cfg->mongodb_uri != NULL) {
        h->store = ah_store_mongo_open(cfg, err, errlen);
    } else {
        h->store = ah_store_sqlite_open(cfg->state_path, cfg->embedded_poll_interval, err, errlen);
        if (h->store != NULL) {
            ah_log_info("Using embedded control store %s (polling every %gs)", cfg->state_path,
                        cfg->embedded_poll_interval);
        }
    }
    if (h->store == NULL) {
        /* A store that cannot even be opened is a configuration problem (bad AGENTHOST_STATE
         * path, unparsable MONGODB_URI): fail fast with exit 2 instead of retrying forever. */
        char detail[AH_ERRLEN];
        ah_strlcpy(detail, err, sizeof(detail));
        const char *setting = cfg->mongodb_uri ? "MONGODB_URI" : "AGENTHOST_STATE";
        if (strncmp(detail, setting, strlen(setting)) == 0) { /* it names the setting already */
            ah_strlcpy(err, detail, errlen);
        } else {
            snprintf(err, errlen, "%s: %s", setting, detail);
        }
        return AH_EINVAL;
    }
    h->fleet = ah_fleet_start(cfg, h->state, h->store, err, errlen);
    if (h->fleet == NULL) {
        return AH_EIO;
    }
    if (ah_leases_start(h->leases, h->store, err, errlen) != AH_OK) {
        return AH_EIO;
    }
    ah_state_set_fleet_listener(h->state, on_state_change, h->fleet);
    ah_store_listener_t listener = {.on_control = on_store_control,
                                    .on_status = on_store_status,
                                    .ud = h->state,
                                    .on_scopes = on_store_scopes};
    return ah_store_watch_start(h->store, &listener, err, errlen);
}

int ah_host_run(ah_host_t *h, char *err, size_t errlen)
{
    int exit_code = 1;
    ah_log_info("Starting agent %s with script %s", h->cfg->agent_id, h->script_label);
    int rc = open_handles(h, err, errlen);
    if (rc != AH_OK) {
        goto out;
    }
    /* The worker starts first: it loads the script (load_on_worker) while this thread opens the
     * store and the HTTP API, then waits until both are up (host_go). */
    if (pthread_create(&h->worker, NULL, worker_main, h) != 0) {
        snprintf(err, errlen, "cannot start the Lua worker thread");
        goto out;
    }
    h->worker_started = true;
    rc = open_store(h, err, errlen);
    if (rc != AH_OK) {
        exit_code = rc == AH_EINVAL ? 2 : 1;
        goto out;
    }
    h->http = ah_http_start(h->cfg, h->state, h->store, h->metrics, err, errlen);
    if (h->http == NULL) {
        goto out;
    }
    ah_http_set_fleet(h->http, h->fleet);
    ah_http_set_leases(h->http, h->leases);
    atomic_store(&h->http_port, ah_http_port(h->http));
    /* An IPv6 address is written in brackets, as in a URL: [::1]:8000. */
    bool ipv6 = strchr(h->cfg->http_bind, ':') != NULL;
    ah_log_info("HTTP API listening on %s%s%s:%d", ipv6 ? "[" : "", h->cfg->http_bind,
                ipv6 ? "]" : "", atomic_load(&h->http_port));
    if (!host_go(h)) {
        goto out; /* the load failed: host_call_off reports it */
    }
    uv_run(&h->loop, UV_RUN_DEFAULT);
    if (h->wedged) {
        return AH_HOST_WEDGED; /* nothing more may wait: the caller exits the process */
    }
    pthread_join(h->worker, NULL);
    h->worker_started = false;
    exit_code = atomic_load(&h->worker_rc);
    if (exit_code == AH_HOST_LOAD_FAILED) {
        ah_strlcpy(err, h->load_err, errlen); /* the worker wrote it before the loop ended */
    } else if (exit_code != 0) {
        snprintf(err, errlen, "%s", h->worker_err);
    }
out:
    if (h->worker_started) {
        /* Only reached on a failure while the worker waits at the gate (or still loads). */
        exit_code = host_call_off(h, exit_code, err, errlen);
        if (exit_code == AH_HOST_WEDGED) {
            return AH_HOST_WEDGED; /* its load still runs: nothing may be joined or closed */
        }
        pthread_join(h->worker, NULL);
        h->worker_started = false;
    }
    int64_t deadline_us = shutdown_deadline_us(h);
    arm_exit_timer(h, deadline_us);
    /* a shutdown issued here is answered from the fleet's records while the others stop, up to
     * the share of SHUTDOWN_TIMEOUT the Lua call gets; then with what is known */
    ah_fleet_drain_waits(h->fleet, (double)(deadline_us - ah_mono_us()) / 1e6 -
                                       h->cfg->shutdown_timeout * (1 - SHUTDOWN_INTERRUPT_SHARE));
    ah_fleet_stop_waits(h->fleet); /* its callbacks answer parked requests of h->http */
    if (ah_http_stop(h->http, (double)(deadline_us - ah_mono_us()) / 1e6) != AH_OK) {
        h->http = NULL;
        snprintf(err, errlen,
                 "shutdown did not finish within SHUTDOWN_TIMEOUT (%gs): a control store call "
                 "is still running",
                 h->cfg->shutdown_timeout);
        ah_log_error("Shutdown did not finish within SHUTDOWN_TIMEOUT (%gs): a control store "
                     "call is still running; exiting without closing the store",
                     h->cfg->shutdown_timeout);
        return AH_HOST_WEDGED;
    }
    h->http = NULL;
    ah_lua_mongo_detach(h->mongo); /* the Lua worker has stopped: no client may outlive the pool */
    ah_leases_stop(h->leases);     /* gives back what it holds while the store is still open */
    ah_fleet_stop(h->fleet);       /* the last record: "stopped" after a clean shutdown */
    ah_store_close(h->store);
    h->store = NULL;
    ah_fleet_free(h->fleet); /* the watcher, which reports changes to it, has stopped */
    h->fleet = NULL;
    ah_state_set_fleet_listener(h->state, NULL, NULL);
    if (h->loop_open) {
        close_handles(h);
        uv_run(&h->loop, UV_RUN_DEFAULT);
        if (uv_loop_close(&h->loop) != 0) {
            ah_log_error("internal: libuv loop still had open handles at exit");
        }
        h->loop_open = false;
    }
    disarm_exit_timer(h);
    if (exit_code == 0) {
        ah_log_info("Agent stopped");
    }
    return exit_code;
}
