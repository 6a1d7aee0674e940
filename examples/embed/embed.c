/* Embedding agenthost (docs/EMBEDDING.md): starts a host on its own thread with an inline Lua
 * script on the embedded control store (a temporary state file, HTTP API on a free port),
 * registers a C function the script calls in every batch, then pauses the agent through the API,
 * checks that it is paused and that no batch runs while paused, resumes it, checks that batches
 * run again, and stops it. Exits 0 when all of that held, 1 otherwise.
 *
 * Build: make (cc embed.c $(pkg-config --cflags --libs agenthost)). */
#include <agenthost.h>

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* What the host's Lua worker thread shares with main(). */
typedef struct {
    atomic_long calls;        /* agent.ext.tick() calls */
    atomic_long calls_paused; /* calls seen while the host said it was paused (must stay 0) */
    agenthost_t *host;
} counter_t;

static const char script[] =
    "local agent = require 'agent'\n"
    "local M = {}\n"
    "function M.init(ctx) agent.log.info('embedded script started as %s', ctx.agent_id) end\n"
    "function M.batch(ctx)\n"
    "  local n = agent.ext.tick(ctx.iteration)\n"
    "  if n % 50 == 0 then agent.log.info('tick %d', n) end\n"
    "  agent.sleep(0.01)\n"
    "  return 1\n"
    "end\n"
    "function M.on_pause(ev) agent.log.info('paused: %s (%s)', ev.reason, ev.source) end\n"
    "function M.on_resume(ev) agent.log.info('resumed: %s', ev.reason) end\n"
    "function M.on_shutdown(ev) agent.log.info('shutting down: %s', ev.reason) end\n"
    "return M\n";

/* agent.ext.tick(iteration) -> the number of calls so far. Runs on the Lua worker thread. */
static int tick(lua_State *L)
{
    counter_t *c = agenthost_userdata(L);
    (void)luaL_checkinteger(L, 1);
    if (agenthost_state(c->host) == AGENTHOST_STATE_PAUSED) {
        atomic_fetch_add(&c->calls_paused, 1);
    }
    lua_pushinteger(L, (lua_Integer)(atomic_fetch_add(&c->calls, 1) + 1));
    return 1;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Waits until the counter exceeds `above` (0) or `timeout` seconds pass (-1). */
static int wait_calls_above(counter_t *c, long above, double timeout)
{
    double deadline = now_s() + timeout;
    while (atomic_load(&c->calls) <= above) {
        if (now_s() > deadline) {
            return -1;
        }
        usleep(5000);
    }
    return 0;
}

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "embed: FAILED: " __VA_ARGS__);                                        \
            fprintf(stderr, " (%s)\n", host ? agenthost_error(host) : "");                         \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)

int main(void)
{
    int status = 1;
    char err[512];
    agenthost_t *host = NULL;
    counter_t counter = {.host = NULL};
    char dir[] = "/tmp/agenthost-embed-XXXXXX";
    char state_path[sizeof(dir) + 32];
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(state_path, sizeof(state_path), "%s/state.db", dir);
    printf("agenthost %s, state file %s\n", agenthost_version(), state_path);

    agenthost_config_t *cfg = agenthost_config_new();
    CHECK(cfg != NULL, "agenthost_config_new");
    const char *settings[][2] = {
        {"AGENTHOST_STATE", state_path}, {"HTTP_PORT", "0"},
        {"HTTP_BIND", "127.0.0.1"},      {"AGENT_ID", "embedded-1"},
        {"AGENTHOST_SIGNALS", "false"},  {"SHUTDOWN_TIMEOUT", "10"},
    };
    for (size_t i = 0; i < sizeof(settings) / sizeof(settings[0]); i++) {
        CHECK(agenthost_config_set(cfg, settings[i][0], settings[i][1], err, sizeof(err)) == 0,
              "config %s: %s", settings[i][0], err);
    }
    /* A rejected setting names the variable. */
    CHECK(agenthost_config_set(cfg, "HTTP_PORT", "eighty", err, sizeof(err)) != 0 &&
              strstr(err, "HTTP_PORT") != NULL,
          "an invalid HTTP_PORT was accepted");

    host = agenthost_new(cfg, NULL, script, err, sizeof(err));
    agenthost_config_free(cfg); /* the host keeps its own copy */
    CHECK(host != NULL, "agenthost_new: %s", err);
    counter.host = host;
    CHECK(agenthost_register(host, "tick", tick, &counter) == 0, "agenthost_register");
    CHECK(agenthost_state(host) == AGENTHOST_STATE_NEW, "state before start");

    CHECK(agenthost_start(host) == 0, "agenthost_start");
    CHECK(agenthost_wait_state(host, AGENTHOST_STATE_RUNNING, 10) == 0, "never running (%s)",
          agenthost_state_name(agenthost_state(host)));
    CHECK(wait_calls_above(&counter, 5, 10) == 0, "the script did not call agent.ext.tick");
    printf("running: HTTP API on 127.0.0.1:%d, %ld ticks, %llu batches\n",
           agenthost_http_port(host), atomic_load(&counter.calls),
           (unsigned long long)agenthost_batches(host));
    CHECK(agenthost_http_port(host) > 0, "no HTTP port");

    CHECK(agenthost_pause(host, "paused by embed.c") == 0, "agenthost_pause");
    CHECK(agenthost_wait_state(host, AGENTHOST_STATE_PAUSED, 10) == 0, "never paused (%s)",
          agenthost_state_name(agenthost_state(host)));
    /* Once the state reads paused, the worker has finished its batch and runs no other until
     * resumed: the counter must not move. Watch it for a while. */
    long at_pause = atomic_load(&counter.calls);
    unsigned long long batches_at_pause = (unsigned long long)agenthost_batches(host);
    usleep(300 * 1000);
    long after = atomic_load(&counter.calls);
    printf("paused: state=%s, ticks %ld -> %ld over 0.3 s, batches %llu\n",
           agenthost_state_name(agenthost_state(host)), at_pause, after,
           (unsigned long long)agenthost_batches(host));
    CHECK(after == at_pause, "ticks grew while paused (%ld -> %ld)", at_pause, after);
    CHECK(agenthost_batches(host) == batches_at_pause, "batches grew while paused");
    CHECK(agenthost_state(host) == AGENTHOST_STATE_PAUSED, "no longer paused");

    CHECK(agenthost_resume(host, "resumed by embed.c") == 0, "agenthost_resume");
    CHECK(agenthost_wait_state(host, AGENTHOST_STATE_RUNNING, 10) == 0, "never resumed");
    CHECK(wait_calls_above(&counter, after + 5, 10) == 0, "no ticks after resuming");
    printf("resumed: state=%s, ticks %ld\n", agenthost_state_name(agenthost_state(host)),
           atomic_load(&counter.calls));

    int code = agenthost_stop(host);
    printf("stopped: state=%s, exit code %d, %ld ticks in all\n",
           agenthost_state_name(agenthost_state(host)), code, atomic_load(&counter.calls));
    CHECK(code == AGENTHOST_EXIT_OK, "exit code %d", code);
    CHECK(agenthost_state(host) == AGENTHOST_STATE_STOPPED, "not stopped");
    CHECK(atomic_load(&counter.calls_paused) == 0, "%ld ticks ran while paused",
          atomic_load(&counter.calls_paused));
    printf("embed: OK\n");
    status = 0;
out:
    agenthost_free(host);
    unlink(state_path);
    char wal[sizeof(state_path) + 8];
    snprintf(wal, sizeof(wal), "%s-wal", state_path);
    unlink(wal);
    snprintf(wal, sizeof(wal), "%s-shm", state_path);
    unlink(wal);
    rmdir(dir);
    return status;
}
