/* agenthost — the public C API for embedding the agent host in another program (docs/EMBEDDING.md).
 *
 * A host runs one operator Lua script as a pulling agent, exactly like the `agenthost` binary:
 * a Lua worker thread calling batch(), the control store (embedded SQLite file or MongoDB), the
 * HTTP API, and a libuv loop for the watchdog and (only with AGENTHOST_SIGNALS=true) the signals
 * SIGTERM/SIGINT (graceful shutdown), SIGUSR1/SIGUSR2 (pause/resume) and SIGHUP (reload the
 * script). Its defaults are safe for a library: see agenthost_config_new().
 *
 * Life cycle: agenthost_config_new() + agenthost_config_set() → agenthost_new() →
 * agenthost_register() (optional, before starting) → agenthost_run() (blocks) or
 * agenthost_start() + agenthost_wait()/agenthost_stop() → agenthost_free(). A host runs once.
 *
 * Return values: functions returning int return AGENTHOST_OK (0) or a negative AGENTHOST_E*
 * code, except agenthost_run() and agenthost_wait(), which return the process-style exit code
 * (AGENTHOST_EXIT_*). Error text is written to the caller's buffer (err, errlen) or, once a host
 * exists, kept in the host (agenthost_error()).
 *
 * Threads: unless a function says "thread-safe", call it from one thread at a time per object.
 * Registered Lua functions run on the host's Lua worker thread.
 *
 * This header includes LuaJIT's <lua.h> and <lauxlib.h> (lua_State, lua_CFunction and the Lua C
 * API for the functions you register); `pkg-config --cflags agenthost` provides its include path.
 */
#ifndef AGENTHOST_H
#define AGENTHOST_H

#include <stddef.h>
#include <stdint.h>

#include <lauxlib.h>
#include <lua.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes (the values of the internal AH_E* codes). */
#define AGENTHOST_OK 0
#define AGENTHOST_EINVAL (-1)   /* bad argument, unknown setting, or wrong life-cycle step */
#define AGENTHOST_ENOMEM (-2)   /* allocation failed */
#define AGENTHOST_EIO (-3)      /* a system call failed (thread creation) */
#define AGENTHOST_ESCRIPT (-5)  /* the script does not load or breaks the contract */
#define AGENTHOST_ETIMEOUT (-6) /* agenthost_wait_state() ran out of time */

/* Exit codes of agenthost_run() / agenthost_wait() (those of the agenthost binary). */
/* Clean shutdown. */
#define AGENTHOST_EXIT_OK 0
/* Runtime failure (init() failed, HTTP port unavailable...). */
#define AGENTHOST_EXIT_FAILURE 1
/* Configuration or script error (bad store path, bad script). */
#define AGENTHOST_EXIT_CONFIG 2
/* A Lua call ignored shutdown past SHUTDOWN_TIMEOUT: the Lua worker still runs; see
 * agenthost_free(). */
#define AGENTHOST_EXIT_WEDGED 3

/* Run states, in order. AGENTHOST_STATE_NEW: created, not started yet. */
typedef enum {
    AGENTHOST_STATE_NEW = -1,
    AGENTHOST_STATE_STARTING = 0,
    AGENTHOST_STATE_RUNNING,
    AGENTHOST_STATE_PAUSED,
    AGENTHOST_STATE_STOPPING,
    AGENTHOST_STATE_STOPPED,
} agenthost_state_t;

typedef struct agenthost_config_s agenthost_config_t; /* opaque */
typedef struct agenthost_s agenthost_t;               /* opaque */

/* The library version, e.g. "0.1.0". Static string. Thread-safe. */
const char *agenthost_version(void);

/* ---- configuration ----------------------------------------------------------------------- */

/* A configuration holding the embedding defaults (it does NOT read the environment; see
 * agenthost_config_from_env()): the binary's, except HTTP_BIND=127.0.0.1, HTTP_PORT=0 (any free
 * port), AGENTHOST_SIGNALS=false and no control store (local control only, no file created)
 * unless AGENTHOST_STATE, MONGODB_URI or ENABLE_DISTRIBUTED_CONTROL is set. agenthost_new(NULL,
 * ...) uses the same defaults. NULL when out of memory. The caller owns it and releases it with
 * agenthost_config_free(). */
agenthost_config_t *agenthost_config_new(void);
/* Sets one setting by its environment variable name (the names of `agenthost run --help`, e.g.
 * "HTTP_PORT", "AGENTHOST_STATE", "AGENT_ID", "MONGODB_URI", "LOG_LEVEL", "AGENTHOST_SIGNALS").
 * name and value are copied. Every value is validated here (numbers and their bounds, HTTP_BIND
 * an IPv4/IPv6 address, ...), so a bad one never reaches agenthost_start(). Returns 0, or
 * AGENTHOST_EINVAL (unknown name, invalid value) /
 * AGENTHOST_ENOMEM with the reason in err (err may be NULL if errlen is 0). */
int agenthost_config_set(agenthost_config_t *cfg, const char *name, const char *value, char *err,
                         size_t errlen);
/* Applies every setting present in the environment, as the binary does. 0 or a negative code
 * with err naming the variable. Reads the environment: do not race with setenv(). */
int agenthost_config_from_env(agenthost_config_t *cfg, char *err, size_t errlen);
/* Frees the configuration. NULL is accepted. Hosts created from it keep their own copy. */
void agenthost_config_free(agenthost_config_t *cfg);

/* ---- hosts ------------------------------------------------------------------------------- */

/* Creates a host from cfg (copied; NULL means the defaults) and exactly one of script_path (a
 * Lua file; modules next to it are found by require) or script_source (the script's text,
 * copied; its chunk name in error messages is "embedded"). The script is compiled here, so a
 * syntax error fails now; it runs (and its contract is checked) when the host starts. Returns
 * NULL with the reason in err. The caller owns the host (agenthost_free()). */
agenthost_t *agenthost_new(const agenthost_config_t *cfg, const char *script_path,
                           const char *script_source, char *err, size_t errlen);

/* Makes fn callable by the script as agent.ext.<name>(...) (the same table is returned by
 * require "agent.ext"). Call before agenthost_start()/agenthost_run(). name: letters, digits and
 * '_', not starting with a digit, at most 63 bytes, unique per host (copied). fn is an ordinary
 * lua_CFunction that runs on the host's Lua worker thread, during a batch, a hook or the script's
 * top level; ud is handed to it through agenthost_userdata(L) and must stay valid until
 * agenthost_free(). fn may raise errors with luaL_error(): they are Lua errors in the calling
 * script (a failing batch is logged and retried). 0 or AGENTHOST_EINVAL (bad name, duplicate, host
 * already started) / AGENTHOST_ENOMEM; the reason is in agenthost_error(). */
int agenthost_register(agenthost_t *host, const char *name, lua_CFunction fn, void *ud);
/* Inside a function registered with agenthost_register(): its ud. */
void *agenthost_userdata(lua_State *L);

/* Runs the host on the calling thread until it stops (a shutdown command, agenthost_stop() from
 * another thread, SIGTERM/SIGINT if signals are on, or a failing init()). Returns an
 * AGENTHOST_EXIT_* code, with the reason in agenthost_error() when not 0; AGENTHOST_EINVAL if
 * the host was already started. */
int agenthost_run(agenthost_t *host);
/* Starts the host on a new thread and returns once the script has loaded (a load or contract
 * error returns AGENTHOST_ESCRIPT here), with the host in AGENTHOST_STATE_STARTING: the store,
 * the HTTP API, init() and the startup sync follow on the host's threads (a failure there ends
 * the run; agenthost_wait() returns its code). 0 or a negative code; reason in agenthost_error().
 */
int agenthost_start(agenthost_t *host);
/* Waits for a host started with agenthost_start() to stop; returns its AGENTHOST_EXIT_* code
 * (again on later calls). AGENTHOST_EINVAL if it was not started with agenthost_start(). Call
 * from one thread only. */
int agenthost_wait(agenthost_t *host);
/* Requests a graceful shutdown of this host (like SIGTERM: finishes the running batch, runs
 * on_shutdown). If it was started with agenthost_start(), waits and returns its exit code (like
 * agenthost_wait(); do not call both from different threads); otherwise returns 0 at once (the
 * thread inside agenthost_run() returns the exit code). Not started: does nothing, returns 0. */
int agenthost_stop(agenthost_t *host);

/* Local commands for this host only (as `POST /api/agent/...` would), with an optional reason
 * (NULL: none; copied, truncated to 1024 bytes) shown to the script's hook as ev.reason and
 * ev.source == "local". They return at once; the worker applies them after the running batch.
 * Thread-safe. 0, or AGENTHOST_EINVAL with the reason in agenthost_error() when the command would
 * be dropped: before the host was started, once it is stopping or stopped (agenthost_shutdown()
 * then returns 0), a resume while the host is held paused by a cluster shutdown, or a pause or
 * resume while it is still starting (it has not synced to the cluster state yet: wait with
 * agenthost_wait_state()). */
int agenthost_pause(agenthost_t *host, const char *reason);
int agenthost_resume(agenthost_t *host, const char *reason);
int agenthost_shutdown(agenthost_t *host, const char *reason);

/* The current run state. Thread-safe. */
agenthost_state_t agenthost_state(agenthost_t *host);
/* "new" | "starting" | "running" | "paused" | "stopping" | "stopped" (static strings). */
const char *agenthost_state_name(agenthost_state_t state);
/* Waits until the host is in `state` (0) or timeout_seconds pass (AGENTHOST_ETIMEOUT); returns
 * AGENTHOST_EINVAL at once if the host stopped before reaching it or timeout_seconds is NaN.
 * Thread-safe. */
int agenthost_wait_state(agenthost_t *host, agenthost_state_t state, double timeout_seconds);
/* Batches run so far (successful or not). Thread-safe. */
uint64_t agenthost_batches(agenthost_t *host);
/* The port the HTTP API listens on (useful with HTTP_PORT=0), 0 before it listens. Thread-safe.
 */
int agenthost_http_port(agenthost_t *host);
/* The last error message of this host ("" if none): the reason of a failed call, or the outcome
 * of the run once it ended ("" after a clean stop; "init failed: <the Lua error>" when init()
 * failed). Owned by the host; valid until the next call on it from the same thread. */
const char *agenthost_error(const agenthost_t *host);

/* Frees the host. NULL is accepted. A host started with agenthost_start() and still running is
 * stopped and waited for first. Must not race with any other call on the host, and must not be
 * called while agenthost_run() runs. After AGENTHOST_EXIT_WEDGED the Lua worker still runs: the
 * host's memory is then deliberately leaked (the process should exit soon). */
void agenthost_free(agenthost_t *host);

#ifdef __cplusplus
}
#endif

#endif
