/* The public embedding API (core/include/agenthost.h) over the internal modules. A configuration
 * is a validated ah_config_t plus the list of (name, value) settings applied to it, so a host
 * rebuilds its own copy by replaying them (no field-by-field copy to keep in sync with
 * ah_config.h). A host keeps the script and the registered functions until it starts; the
 * internal ah_host_t is created when it starts (so the script's top level already sees
 * agent.ext), on the caller's thread, and then runs on the caller's thread (agenthost_run) or
 * on a thread of its own (agenthost_start). Commands and state reads go to the internal host's
 * state object, which is thread-safe; `mu` only guards the pointer to it and the phase. */
#include "agenthost.h"

#include "ah_config.h"
#include "ah_host.h"
#include "ah_log.h"
#include "ah_lua.h"
#include "ah_state.h"

#include <lauxlib.h>
#include <lua.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef AH_VERSION
#define AH_VERSION "unknown"
#endif

#define EXT_NAME_MAX 63
#define SOURCE_CHUNK_NAME "embedded"
#define WAIT_STEP_NS (5 * 1000 * 1000) /* agenthost_wait_state() re-checks every 5 ms */

typedef struct setting_s {
    char *name;
    char *value;
} setting_t;

struct agenthost_config_s {
    ah_config_t cfg; /* validates each setting as it is set */
    setting_t *settings;
    size_t count;
    size_t cap;
};

typedef enum {
    PHASE_NEW = 0, /* not started */
    PHASE_RUNNING, /* agenthost_run or the thread of agenthost_start is running the host */
    PHASE_DONE,    /* finished, or failed to start */
} phase_t;

struct agenthost_s {
    ah_config_t cfg;
    char *script_source; /* owned; NULL when cfg.script_path is used */
    ah_lua_function_t *functions;
    size_t function_count;
    size_t function_cap;

    pthread_mutex_t mu;
    ah_host_t *host; /* set once under mu when starting; freed by agenthost_free */
    phase_t phase;   /* under mu */

    pthread_t thread;
    bool threaded; /* started with agenthost_start */
    bool joined;
    atomic_int exit_code;
    bool wedged;
    char err[AH_ERRLEN * 4];
};

static void set_err(char *err, size_t errlen, const char *msg)
{
    if (err != NULL && errlen > 0) {
        ah_strlcpy(err, msg, errlen);
    }
}

const char *agenthost_version(void)
{
    return AH_VERSION;
}

/* ---- configuration ----------------------------------------------------------------------- */

/* Where an embedded host's defaults differ from the binary's: a library must not open the
 * program's API to the network, take a fixed port or the process's signals (agenthost.h). */
static const char *const embed_defaults[][2] = {
    {"HTTP_BIND", "127.0.0.1"},
    {"HTTP_PORT", "0"},
    {"AGENTHOST_SIGNALS", "false"},
};

/* The binary's defaults, then embed_defaults. */
static void embed_config_defaults(ah_config_t *cfg)
{
    ah_config_defaults(cfg);
    char unused[AH_ERRLEN];
    for (size_t i = 0; i < sizeof(embed_defaults) / sizeof(embed_defaults[0]); i++) {
        /* valid values (checked by the embedding test); only AH_ENOMEM could fail */
        (void)ah_config_set(cfg, embed_defaults[i][0], embed_defaults[i][1], unused,
                            sizeof(unused));
    }
}

/* True if the settings list names `name`. */
static bool was_set(const agenthost_config_t *c, const char *name)
{
    for (size_t i = 0; c != NULL && i < c->count; i++) {
        if (strcmp(c->settings[i].name, name) == 0) {
            return true;
        }
    }
    return false;
}

agenthost_config_t *agenthost_config_new(void)
{
    agenthost_config_t *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        return NULL;
    }
    embed_config_defaults(&c->cfg);
    if (c->cfg.state_path == NULL || c->cfg.agent_id == NULL) {
        agenthost_config_free(c);
        return NULL;
    }
    return c;
}

/* Appends or replaces (name, value) in the replay list. 0 or AH_ENOMEM. */
static int remember_setting(agenthost_config_t *c, const char *name, const char *value)
{
    char *v = strdup(value);
    if (v == NULL) {
        return AH_ENOMEM;
    }
    for (size_t i = 0; i < c->count; i++) {
        if (strcmp(c->settings[i].name, name) == 0) {
            free(c->settings[i].value);
            c->settings[i].value = v;
            return AH_OK;
        }
    }
    if (c->count == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 8;
        setting_t *grown = realloc(c->settings, cap * sizeof(*grown));
        if (grown == NULL) {
            free(v);
            return AH_ENOMEM;
        }
        c->settings = grown;
        c->cap = cap;
    }
    char *n = strdup(name);
    if (n == NULL) {
        free(v);
        return AH_ENOMEM;
    }
    c->settings[c->count].name = n;
    c->settings[c->count].value = v;
    c->count++;
    return AH_OK;
}

int agenthost_config_set(agenthost_config_t *cfg, const char *name, const char *value, char *err,
                         size_t errlen)
{
    char msg[AH_ERRLEN];
    if (cfg == NULL || name == NULL || value == NULL) {
        set_err(err, errlen, "agenthost_config_set: NULL argument");
        return AGENTHOST_EINVAL;
    }
    int rc = ah_config_set(&cfg->cfg, name, value, msg, sizeof(msg));
    if (rc != AH_OK) {
        set_err(err, errlen, msg);
        return rc;
    }
    if (remember_setting(cfg, name, value) != AH_OK) {
        set_err(err, errlen, "out of memory");
        return AGENTHOST_ENOMEM;
    }
    return AGENTHOST_OK;
}

int agenthost_config_from_env(agenthost_config_t *cfg, char *err, size_t errlen)
{
    if (cfg == NULL) {
        set_err(err, errlen, "agenthost_config_from_env: NULL configuration");
        return AGENTHOST_EINVAL;
    }
    for (const ah_config_var_t *v = ah_config_vars(); v->name != NULL; v++) {
        const char *value = getenv(v->name);
        if (value == NULL) {
            continue;
        }
        int rc = agenthost_config_set(cfg, v->name, value, err, errlen);
        if (rc != AGENTHOST_OK) {
            return rc;
        }
    }
    return AGENTHOST_OK;
}

void agenthost_config_free(agenthost_config_t *cfg)
{
    if (cfg == NULL) {
        return;
    }
    for (size_t i = 0; i < cfg->count; i++) {
        free(cfg->settings[i].name);
        free(cfg->settings[i].value);
    }
    free(cfg->settings);
    ah_config_free(&cfg->cfg);
    free(cfg);
}

/* ---- hosts ------------------------------------------------------------------------------- */

/* Compiles the script without running it (a scratch state), so a syntax error or a missing
 * file is reported by agenthost_new(). 0 or AH_ELUA with err set. */
static int compile_script(const char *path, const char *source, char *err, size_t errlen)
{
    lua_State *L = luaL_newstate();
    if (L == NULL) {
        set_err(err, errlen, "cannot create a Lua state: out of memory");
        return AH_ENOMEM;
    }
    errno = 0;
    int status = source != NULL ? luaL_loadbuffer(L, source, strlen(source), "@" SOURCE_CHUNK_NAME)
                                : luaL_loadfile(L, path);
    int rc = AH_OK;
    if (status != 0) {
        const char *msg = lua_tostring(L, -1);
        if (status == LUA_ERRFILE && errno != 0) {
            snprintf(err, errlen, "%s: %s", msg ? msg : path, strerror(errno));
        } else {
            set_err(err, errlen, msg ? msg : "cannot load the script");
        }
        rc = AH_ELUA;
    }
    lua_close(L);
    return rc;
}

static void host_release(agenthost_t *h)
{
    for (size_t i = 0; i < h->function_count; i++) {
        free((char *)h->functions[i].name);
    }
    free(h->functions);
    free(h->script_source);
    ah_config_free(&h->cfg);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

agenthost_t *agenthost_new(const agenthost_config_t *cfg, const char *script_path,
                           const char *script_source, char *err, size_t errlen)
{
    if ((script_path == NULL) == (script_source == NULL)) {
        set_err(err, errlen, "agenthost_new: give exactly one of script_path and script_source");
        return NULL;
    }
    agenthost_t *h = calloc(1, sizeof(*h));
    if (h == NULL) {
        set_err(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&h->mu, NULL);
    atomic_init(&h->exit_code, AGENTHOST_EXIT_OK);
    embed_config_defaults(&h->cfg);
    char msg[AH_ERRLEN];
    for (size_t i = 0; cfg != NULL && i < cfg->count; i++) {
        if (ah_config_set(&h->cfg, cfg->settings[i].name, cfg->settings[i].value, msg,
                          sizeof(msg)) != AH_OK) {
            set_err(err, errlen, msg);
            goto fail;
        }
    }
    /* No store named: local control only, rather than a state file in the working directory. */
    if (!was_set(cfg, "ENABLE_DISTRIBUTED_CONTROL") && !was_set(cfg, "AGENTHOST_STATE") &&
        !was_set(cfg, "MONGODB_URI")) {
        h->cfg.distributed_control = false;
    }
    if (script_path != NULL) {
        h->cfg.script_path = strdup(script_path);
        if (h->cfg.script_path == NULL) {
            set_err(err, errlen, "out of memory");
            goto fail;
        }
    } else {
        h->script_source = strdup(script_source);
        if (h->script_source == NULL) {
            set_err(err, errlen, "out of memory");
            goto fail;
        }
    }
    char lerr[AH_ERRLEN];
    if (compile_script(script_path, script_source, lerr, sizeof(lerr)) != AH_OK) {
        set_err(err, errlen, lerr);
        goto fail;
    }
    return h;
fail:
    host_release(h);
    return NULL;
}

static bool valid_ext_name(const char *name)
{
    size_t n = name != NULL ? strlen(name) : 0;
    if (n == 0 || n > EXT_NAME_MAX || (name[0] >= '0' && name[0] <= '9')) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_')) {
            return false;
        }
    }
    return true;
}

int agenthost_register(agenthost_t *h, const char *name, lua_CFunction fn, void *ud)
{
    if (fn == NULL || !valid_ext_name(name)) {
        snprintf(h->err, sizeof(h->err),
                 "agenthost_register: invalid name \"%.64s\" or NULL function (names: letters, "
                 "digits and _, at most %d bytes)",
                 name ? name : "(null)", EXT_NAME_MAX);
        return AGENTHOST_EINVAL;
    }
    pthread_mutex_lock(&h->mu);
    phase_t phase = h->phase;
    pthread_mutex_unlock(&h->mu);
    if (phase != PHASE_NEW) {
        snprintf(h->err, sizeof(h->err), "agenthost_register(%s): the host has already started",
                 name);
        return AGENTHOST_EINVAL;
    }
    for (size_t i = 0; i < h->function_count; i++) {
        if (strcmp(h->functions[i].name, name) == 0) {
            snprintf(h->err, sizeof(h->err), "agenthost_register: %s is already registered", name);
            return AGENTHOST_EINVAL;
        }
    }
    if (h->function_count == h->function_cap) {
        size_t cap = h->function_cap ? h->function_cap * 2 : 8;
        ah_lua_function_t *grown = realloc(h->functions, cap * sizeof(*grown));
        if (grown == NULL) {
            snprintf(h->err, sizeof(h->err), "out of memory");
            return AGENTHOST_ENOMEM;
        }
        h->functions = grown;
        h->function_cap = cap;
    }
    char *copy = strdup(name);
    if (copy == NULL) {
        snprintf(h->err, sizeof(h->err), "out of memory");
        return AGENTHOST_ENOMEM;
    }
    h->functions[h->function_count++] = (ah_lua_function_t){.name = copy, .fn = fn, .ud = ud};
    return AGENTHOST_OK;
}

void *agenthost_userdata(lua_State *L)
{
    return lua_touserdata(L, lua_upvalueindex(1));
}

/* Creates the internal host (loads and runs the script's top level) and moves to
 * PHASE_RUNNING. 0, AGENTHOST_EINVAL (already started) or AGENTHOST_ESCRIPT (h->err set). */
static int host_create(agenthost_t *h)
{
    pthread_mutex_lock(&h->mu);
    phase_t phase = h->phase;
    pthread_mutex_unlock(&h->mu);
    if (phase != PHASE_NEW) {
        snprintf(h->err, sizeof(h->err), "the host has already been started (it runs once)");
        return AGENTHOST_EINVAL;
    }
    /* Log settings are process-wide: the last host started sets them. */
    ah_log_setup(h->cfg.log_level, h->cfg.log_json, h->cfg.agent_id);
    ah_host_options_t opts = {.script_source = h->script_source,
                              .script_name = SOURCE_CHUNK_NAME,
                              .functions = h->functions,
                              .function_count = h->function_count};
    ah_host_t *host = ah_host_new(&h->cfg, &opts, h->err, sizeof(h->err));
    pthread_mutex_lock(&h->mu);
    h->host = host;
    h->phase = host != NULL ? PHASE_RUNNING : PHASE_DONE;
    pthread_mutex_unlock(&h->mu);
    if (host == NULL) {
        atomic_store(&h->exit_code, AGENTHOST_EXIT_CONFIG);
        return AGENTHOST_ESCRIPT;
    }
    h->err[0] = '\0';
    return AGENTHOST_OK;
}

/* Runs the created host on this thread and records the outcome. */
static int host_run(agenthost_t *h)
{
    char err[AH_ERRLEN * 4] = "";
    int code = ah_host_run(h->host, err, sizeof(err));
    pthread_mutex_lock(&h->mu);
    /* The outcome of this run replaces any earlier error: "" after a clean stop. */
    ah_strlcpy(h->err, code != AGENTHOST_EXIT_OK ? err : "", sizeof(h->err));
    pthread_mutex_unlock(&h->mu);
    if (code == AH_HOST_WEDGED) {
        h->wedged = true;
        if (h->err[0] == '\0') {
            ah_strlcpy(h->err, "a Lua call did not finish within SHUTDOWN_TIMEOUT", sizeof(h->err));
        }
    }
    atomic_store(&h->exit_code, code);
    pthread_mutex_lock(&h->mu);
    h->phase = PHASE_DONE;
    pthread_mutex_unlock(&h->mu);
    return code;
}

int agenthost_run(agenthost_t *h)
{
    int rc = host_create(h);
    if (rc == AGENTHOST_ESCRIPT) {
        return AGENTHOST_EXIT_CONFIG;
    }
    if (rc != AGENTHOST_OK) {
        return rc;
    }
    return host_run(h);
}

static void *host_thread(void *arg)
{
    host_run(arg);
    return NULL;
}

int agenthost_start(agenthost_t *h)
{
    int rc = host_create(h);
    if (rc != AGENTHOST_OK) {
        return rc;
    }
    int prc = pthread_create(&h->thread, NULL, host_thread, h);
    if (prc != 0) {
        snprintf(h->err, sizeof(h->err), "cannot start the host thread: %s", strerror(prc));
        atomic_store(&h->exit_code, AGENTHOST_EXIT_FAILURE);
        pthread_mutex_lock(&h->mu);
        h->phase = PHASE_DONE;
        pthread_mutex_unlock(&h->mu);
        return AGENTHOST_EIO;
    }
    h->threaded = true;
    return AGENTHOST_OK;
}

int agenthost_wait(agenthost_t *h)
{
    if (!h->threaded) {
        snprintf(h->err, sizeof(h->err),
                 "agenthost_wait: the host was not started with "
                 "agenthost_start()");
        return AGENTHOST_EINVAL;
    }
    if (!h->joined) {
        pthread_join(h->thread, NULL);
        h->joined = true;
    }
    return atomic_load(&h->exit_code);
}

/* The internal host if it was created (it then lives until agenthost_free), else NULL. */
static ah_host_t *created_host(agenthost_t *h)
{
    pthread_mutex_lock(&h->mu);
    ah_host_t *host = h->host;
    pthread_mutex_unlock(&h->mu);
    return host;
}

int agenthost_stop(agenthost_t *h)
{
    ah_host_t *host = created_host(h);
    if (host == NULL) {
        return AGENTHOST_OK;
    }
    ah_host_request_stop(host);
    return h->threaded ? agenthost_wait(h) : AGENTHOST_OK;
}

/* Sets h->err under mu (commands may come from any thread). */
static void set_host_err(agenthost_t *h, const char *what, const char *problem)
{
    pthread_mutex_lock(&h->mu);
    snprintf(h->err, sizeof(h->err), "%s: %s", what, problem);
    pthread_mutex_unlock(&h->mu);
}

/* A local command, refused (AGENTHOST_EINVAL, with the reason in h->err) when the host would
 * drop it: not started, stopped or stopping, or a resume while held paused by a cluster
 * shutdown. A shutdown of a host that is already stopping or stopped is not an error. */
static int command(agenthost_t *h, ah_command_t cmd, const char *reason, const char *what)
{
    pthread_mutex_lock(&h->mu);
    ah_host_t *host = h->host;
    phase_t phase = h->phase;
    pthread_mutex_unlock(&h->mu);
    if (host == NULL && phase == PHASE_NEW) {
        set_host_err(h, what, "the host has not been started (agenthost_start/agenthost_run)");
        return AGENTHOST_EINVAL;
    }
    ah_state_t *state = host != NULL ? ah_host_state(host) : NULL;
    bool stopping = host == NULL || phase == PHASE_DONE || ah_state_should_stop(state);
    if (stopping) {
        if (cmd == AH_CMD_SHUTDOWN) {
            return AGENTHOST_OK;
        }
        set_host_err(h, what, "the host is stopping or has stopped; the command was not applied");
        return AGENTHOST_EINVAL;
    }
    if (cmd == AH_CMD_RUNNING && ah_state_held(state)) {
        set_host_err(h, what,
                     "the host is held paused because the cluster command is 'shutdown'; only a "
                     "cluster resume releases it");
        return AGENTHOST_EINVAL;
    }
    int rc = ah_host_command(host, cmd, reason != NULL ? reason : "");
    if (rc == AH_EUNAVAIL) {
        set_host_err(h, what,
                     "the host is starting: pause and resume are accepted once it has synced to "
                     "the cluster state (agenthost_wait_state)");
        return AGENTHOST_EINVAL;
    }
    if (rc != AH_OK && cmd != AH_CMD_SHUTDOWN) { /* a shutdown raced with the check above */
        set_host_err(h, what, "the host is stopping or has stopped; the command was not applied");
        return AGENTHOST_EINVAL;
    }
    return AGENTHOST_OK;
}

int agenthost_pause(agenthost_t *h, const char *reason)
{
    return command(h, AH_CMD_PAUSE, reason, "agenthost_pause");
}

int agenthost_resume(agenthost_t *h, const char *reason)
{
    return command(h, AH_CMD_RUNNING, reason, "agenthost_resume");
}

int agenthost_shutdown(agenthost_t *h, const char *reason)
{
    return command(h, AH_CMD_SHUTDOWN, reason, "agenthost_shutdown");
}

static agenthost_state_t public_state(ah_run_state_t st)
{
    switch (st) {
    case AH_STATE_STARTING:
        return AGENTHOST_STATE_STARTING;
    case AH_STATE_RUNNING:
        return AGENTHOST_STATE_RUNNING;
    case AH_STATE_PAUSED:
        return AGENTHOST_STATE_PAUSED;
    case AH_STATE_STOPPING:
        return AGENTHOST_STATE_STOPPING;
    case AH_STATE_STOPPED:
    default:
        return AGENTHOST_STATE_STOPPED;
    }
}

agenthost_state_t agenthost_state(agenthost_t *h)
{
    pthread_mutex_lock(&h->mu);
    ah_host_t *host = h->host;
    phase_t phase = h->phase;
    pthread_mutex_unlock(&h->mu);
    if (host == NULL) {
        return phase == PHASE_NEW ? AGENTHOST_STATE_NEW : AGENTHOST_STATE_STOPPED;
    }
    if (phase == PHASE_DONE) {
        return AGENTHOST_STATE_STOPPED; /* also after a failure before the worker ran */
    }
    return public_state(ah_state_get(ah_host_state(host)));
}

const char *agenthost_state_name(agenthost_state_t state)
{
    switch (state) {
    case AGENTHOST_STATE_NEW:
        return "new";
    case AGENTHOST_STATE_STARTING:
        return "starting";
    case AGENTHOST_STATE_RUNNING:
        return "running";
    case AGENTHOST_STATE_PAUSED:
        return "paused";
    case AGENTHOST_STATE_STOPPING:
        return "stopping";
    case AGENTHOST_STATE_STOPPED:
        return "stopped";
    }
    return "unknown";
}

int agenthost_wait_state(agenthost_t *h, agenthost_state_t state, double timeout_seconds)
{
    if (isnan(timeout_seconds)) {
        return AGENTHOST_EINVAL;
    }
    int64_t timeout_us; /* saturated: a huge timeout waits "forever" */
    (void)ah_double_to_int64(timeout_seconds * 1e6, &timeout_us);
    int64_t now = ah_mono_us();
    int64_t deadline = timeout_us > INT64_MAX - now ? INT64_MAX : now + timeout_us;
    for (;;) {
        agenthost_state_t now = agenthost_state(h);
        if (now == state) {
            return AGENTHOST_OK;
        }
        if (now == AGENTHOST_STATE_STOPPED) {
            return AGENTHOST_EINVAL;
        }
        if (ah_mono_us() >= deadline) {
            return AGENTHOST_ETIMEOUT;
        }
        struct timespec step = {.tv_sec = 0, .tv_nsec = WAIT_STEP_NS};
        nanosleep(&step, NULL);
    }
}

uint64_t agenthost_batches(agenthost_t *h)
{
    ah_host_t *host = created_host(h);
    if (host == NULL) {
        return 0;
    }
    ah_state_snapshot_t snap;
    ah_state_snapshot(ah_host_state(host), &snap);
    return snap.batches;
}

int agenthost_http_port(agenthost_t *h)
{
    ah_host_t *host = created_host(h);
    return host != NULL ? ah_host_http_port(host) : 0;
}

const char *agenthost_error(const agenthost_t *h)
{
    return h->err;
}

void agenthost_free(agenthost_t *h)
{
    if (h == NULL) {
        return;
    }
    if (h->threaded && !h->joined) {
        agenthost_stop(h);
    }
    if (h->wedged) {
        return; /* the Lua worker still runs inside h->host: leak it all (see agenthost.h) */
    }
    ah_host_free(h->host);
    host_release(h);
}
