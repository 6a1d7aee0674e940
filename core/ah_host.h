/* The host: owns and wires every part of a running agent — the state object, the Lua worker
 * thread, the control store and its watcher, the HTTP API, and a libuv loop for signals, the
 * watchdog timer and the worker's exit notification.
 *
 * Threads: ah_host_run() runs the libuv loop on the calling thread and starts the Lua worker
 * thread; ah_host_request_stop() and ah_host_command() may be called from any thread. */
#ifndef AH_HOST_H
#define AH_HOST_H

#include "ah_config.h"
#include "ah_lua.h"
#include "ah_state.h"

typedef struct ah_host_s ah_host_t;

/* What ah_host_new() may add to the config: the script as text instead of cfg->script_path,
 * and extra C functions for agent.ext (ah_lua.h). Borrowed: they must outlive the host (a
 * reload opens the script again with them). */
typedef struct ah_host_options_s {
    const char *script_source; /* NULL: load cfg->script_path */
    const char *script_name;   /* chunk name for script_source (NULL: "script") */
    const ah_lua_function_t *functions;
    size_t function_count;
    /* Once a shutdown is requested, _exit(1) the process if ah_host_run() has not returned
     * within SHUTDOWN_TIMEOUT (whatever it waits on). For programs whose process is the agent
     * (the agenthost binary); an embedder gets AH_HOST_WEDGED back instead, and a teardown step
     * that blocks (e.g. closing a store that hangs) then delays that return. */
    bool exit_on_shutdown_timeout;
    /* Leave the script's load to ah_host_run(), which runs it on the Lua worker thread while it
     * opens the store and the HTTP API (a shorter start); a load or contract error is then
     * ah_host_run()'s AH_HOST_LOAD_FAILED. For the agenthost binary; an embedder's start must
     * report a bad script itself. */
    bool load_on_worker;
} ah_host_options_t;
/* Loads the script unless opts->load_on_worker (a load or contract error returns NULL with err
 * naming file:line; the caller exits 2). opts may be NULL (the script at cfg->script_path, no
 * extra functions). cfg is borrowed and must outlive the host. */
ah_host_t *ah_host_new(const ah_config_t *cfg, const ah_host_options_t *opts, char *err,
                       size_t errlen);
/* Runs the agent until it stops. Returns the process exit code: 0 after a clean shutdown, 1 on
 * a runtime failure (err set), 2 when the store cannot be opened (bad AGENTHOST_STATE or
 * MONGODB_URI), AH_HOST_LOAD_FAILED when the script loaded here (load_on_worker) did not load
 * (err names file:line; it wins over a failure of the store or the HTTP API; the caller exits 2),
 * or AH_HOST_WEDGED when the Lua worker did not finish within SHUTDOWN_TIMEOUT (a shutdown, or a
 * failed start whose script was still loading): the worker thread still runs, so the caller must
 * exit the process (_exit) without ah_host_free(). */
int ah_host_run(ah_host_t *host, char *err, size_t errlen);
#define AH_HOST_WEDGED 3
#define AH_HOST_LOAD_FAILED 4
/* Requests a graceful local shutdown (like SIGTERM). Thread-safe. */
void ah_host_request_stop(ah_host_t *host);
/* Issues a local command (pause / running / shutdown) to this agent only. Thread-safe. Returns
 * as ah_state_offer_local(): AH_OK, AH_EINVAL (shutting down) or AH_EUNAVAIL (still starting). */
int ah_host_command(ah_host_t *host, ah_command_t cmd, const char *reason);
/* The state object (valid until ah_host_free), for reading snapshots. */
ah_state_t *ah_host_state(ah_host_t *host);
/* The HTTP port bound by the last ah_host_run() (0 before it listens). Thread-safe. */
int ah_host_http_port(ah_host_t *host);
/* Frees the host. NULL is accepted. Must not be called while ah_host_run() runs. */
void ah_host_free(ah_host_t *host);

#endif
