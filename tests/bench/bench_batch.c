/* Benchmark: the host's cost per empty batch next to a bare lua_pcall loop, measured in the same
 * process (target: the host path within 2x of the raw call). Both run the script
 * `return {batch=function() return 0 end}`. The raw loop is what any embedder must do at least:
 * lua_rawgeti(ref) + lua_pcall with a traceback handler. The host loop is the Lua worker's
 * per-batch work from worker_main() in core/ah_host.c, with the real ah_state_t and ah_lua_t:
 * ah_state_take_event, ah_state_get, ah_state_take_reload, ah_lua_run_schedule (agent.every),
 * ah_lua_batch, ah_state_count_batch and the items/backoff bookkeeping, without the idle wait the
 * real worker then sleeps (a 0-item batch makes it wait 0.1-1 s on purpose; that wait is not
 * overhead). Each side runs N calls per repetition, raw and host interleaved, and reports the
 * median of the repetitions in ns per call. Breakdown lines time ah_lua_batch alone and the
 * worker's four state calls alone, and a "lean" loop: not the host, a prototype of the same work
 * done as docs/BENCHMARKS.md suggests (functions and the ctx key kept on fixed stack slots, one
 * coarse clock read, relaxed atomics instead of locks).
 *
 * usage: bench_batch [N [REPS]]     (default 2000000 5)
 * output: human lines, then one line "RESULT raw_ns=.. host_ns=.. ratio=.." for scripts. */
#include "ah_common.h"
#include "ah_lua.h"
#include "ah_state.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#define DEFAULT_N 2000000L
#define DEFAULT_REPS 5
#define MAX_REPS 101
#define WARMUP 100000L

/* The worker's backoff constants (core/ah_host.c). */
#define IDLE_BACKOFF_MIN 0.1
#define IDLE_BACKOFF_MAX 1.0
#define ERROR_BACKOFF_MIN 0.5

static const char script_text[] = "return {batch=function() return 0 end}\n";

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a;
    double y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(*v), cmp_double);
    return n % 2 != 0 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2.0;
}

/* ---- raw LuaJIT -------------------------------------------------------------------------- */

typedef struct {
    lua_State *L;
    int fn_ref;
    int traceback_ref;
} raw_t;

/* luajit.c's traceback handler, as the host uses. */
static int raw_traceback(lua_State *L)
{
    if (!lua_isstring(L, 1)) {
        if (lua_isnoneornil(L, 1) || !luaL_callmeta(L, 1, "__tostring") || !lua_isstring(L, -1)) {
            lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
        }
        lua_replace(L, 1);
        lua_settop(L, 1);
    }
    luaL_traceback(L, L, lua_tostring(L, 1), 1);
    return 1;
}

static int raw_open(raw_t *r, const char *path)
{
    r->L = luaL_newstate();
    if (r->L == NULL) {
        return -1;
    }
    luaL_openlibs(r->L);
    if (luaL_loadfile(r->L, path) != 0 || lua_pcall(r->L, 0, 1, 0) != 0 || !lua_istable(r->L, -1)) {
        fprintf(stderr, "raw: cannot load %s: %s\n", path, lua_tostring(r->L, -1));
        return -1;
    }
    lua_getfield(r->L, -1, "batch");
    r->fn_ref = luaL_ref(r->L, LUA_REGISTRYINDEX);
    lua_pop(r->L, 1);
    lua_pushcfunction(r->L, raw_traceback);
    r->traceback_ref = luaL_ref(r->L, LUA_REGISTRYINDEX);
    return 0;
}

/* Calls batch n times; the sum of the returned numbers goes to *sink so nothing is skipped. */
static int raw_loop(raw_t *r, long n, double *sink)
{
    lua_State *L = r->L;
    double sum = 0;
    for (long i = 0; i < n; i++) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, r->traceback_ref);
        lua_rawgeti(L, LUA_REGISTRYINDEX, r->fn_ref);
        if (lua_pcall(L, 0, 1, -2) != 0) {
            fprintf(stderr, "raw: %s\n", lua_tostring(L, -1));
            return -1;
        }
        sum += lua_tonumber(L, -1);
        lua_pop(L, 2);
    }
    *sink += sum;
    return 0;
}

/* ---- the host path ----------------------------------------------------------------------- */

typedef struct {
    ah_state_t *state;
    ah_lua_t *lua;
} host_t;

static int host_open(host_t *h, const char *path)
{
    char err[AH_ERRLEN * 4];
    h->state = ah_state_new();
    if (h->state == NULL) {
        return -1;
    }
    /* Bring the state to running the way the host does without a store (a startup command). */
    ah_state_offer_local(h->state, AH_CMD_RUNNING, AH_SOURCE_STARTUP, "bench", "bench");
    ah_event_t ev;
    ah_run_state_t from;
    ah_run_state_t to;
    ah_hook_t hook;
    if (!ah_state_take_event(h->state, &ev) ||
        ah_state_apply(h->state, &ev, &from, &to, &hook) != AH_OK) {
        fprintf(stderr, "host: cannot reach the running state\n");
        return -1;
    }
    if (ah_state_get(h->state) != AH_STATE_RUNNING) {
        fprintf(stderr, "host: state is %s, not running\n",
                ah_run_state_name(ah_state_get(h->state)));
        return -1;
    }
    ah_lua_options_t opts = {.agent_id = "bench", .state = h->state, .batch_timeout = 30.0};
    h->lua = ah_lua_open(&opts, path, err, sizeof(err));
    if (h->lua == NULL) {
        fprintf(stderr, "host: %s\n", err);
        return -1;
    }
    if (ah_lua_init(h->lua, err, sizeof(err)) != AH_OK) {
        fprintf(stderr, "host: init: %s\n", err);
        return -1;
    }
    return 0;
}

static void host_close(host_t *h)
{
    ah_lua_close(h->lua);
    ah_state_free(h->state);
}

/* worker_main()'s loop body for a running agent, n times (the idle wait left out, see top). */
static int host_loop(host_t *h, long n, double *sink)
{
    char err[AH_ERRLEN * 4];
    double idle_wait = IDLE_BACKOFF_MIN;
    double error_wait = ERROR_BACKOFF_MIN;
    long long total = 0;
    for (long i = 0; i < n; i++) {
        ah_event_t ev;
        if (ah_state_take_event(h->state, &ev)) {
            fprintf(stderr, "host: unexpected event\n");
            return -1;
        }
        ah_run_state_t st = ah_state_get(h->state);
        if (st != AH_STATE_RUNNING || ah_state_take_reload(h->state) != 0) {
            fprintf(stderr, "host: unexpected state %s or reload\n", ah_run_state_name(st));
            return -1;
        }
        double next_schedule = -1;
        if (ah_lua_run_schedule(h->lua, &next_schedule, err, sizeof(err)) != 0) {
            fprintf(stderr, "host: unexpected schedule: %s\n", err);
            return -1;
        }
        long long items = 0;
        int rc = ah_lua_batch(h->lua, &items, err, sizeof(err));
        ah_state_count_batch(h->state, rc == AH_OK);
        if (rc != AH_OK) {
            fprintf(stderr, "host: batch: %s\n", err);
            return -1;
        }
        error_wait = ERROR_BACKOFF_MIN;
        total += items;
        if (items > 0) {
            idle_wait = IDLE_BACKOFF_MIN;
            continue;
        }
        /* The real worker calls ah_state_wait(h->state, idle_wait) here. */
        idle_wait = idle_wait * 2 > IDLE_BACKOFF_MAX ? IDLE_BACKOFF_MAX : idle_wait * 2;
        if (next_schedule >= 0 && next_schedule < idle_wait) {
            idle_wait = next_schedule;
        }
    }
    *sink += (double)total + idle_wait + error_wait;
    return 0;
}

/* Breakdown: ah_lua_batch alone. */
static int lua_only_loop(host_t *h, long n, double *sink)
{
    char err[AH_ERRLEN * 4];
    long long total = 0;
    for (long i = 0; i < n; i++) {
        long long items = 0;
        if (ah_lua_batch(h->lua, &items, err, sizeof(err)) != AH_OK) {
            fprintf(stderr, "host: batch: %s\n", err);
            return -1;
        }
        total += items;
    }
    *sink += (double)total;
    return 0;
}

/* Breakdown: the worker's four state calls alone. */
static int state_only_loop(host_t *h, long n, double *sink)
{
    long total = 0;
    for (long i = 0; i < n; i++) {
        ah_event_t ev;
        total += ah_state_take_event(h->state, &ev);
        total += ah_state_get(h->state);
        total += (long)ah_state_take_reload(h->state);
        ah_state_count_batch(h->state, true);
    }
    *sink += (double)total;
    return 0;
}

/* ---- lean prototype (not the host: what the suggestions in docs/BENCHMARKS.md would cost) -- */

enum { LEAN_CTX = 1, LEAN_KEY, LEAN_TRACEBACK, LEAN_FN, LEAN_TOP = LEAN_FN };

typedef struct {
    lua_State *L;
    long long iteration;
    _Atomic uint64_t call_seq;
    _Atomic int64_t call_started_us;
    _Atomic uint64_t batches;
    atomic_bool has_event;
    atomic_bool hook_set;
    _Atomic int run_state;
} lean_t;

static int lean_open(lean_t *l, const char *path)
{
    raw_t r;
    if (raw_open(&r, path) != 0) {
        return -1;
    }
    l->L = r.L;
    lua_settop(l->L, 0);
    lua_createtable(l->L, 0, 4);                           /* LEAN_CTX */
    lua_pushliteral(l->L, "iteration");                    /* LEAN_KEY */
    lua_rawgeti(l->L, LUA_REGISTRYINDEX, r.traceback_ref); /* LEAN_TRACEBACK */
    lua_rawgeti(l->L, LUA_REGISTRYINDEX, r.fn_ref);        /* LEAN_FN */
    atomic_store(&l->run_state, AH_STATE_RUNNING);
    return 0;
}

static int lean_loop(lean_t *l, long n, double *sink)
{
    lua_State *L = l->L;
    long long total = 0;
    for (long i = 0; i < n; i++) {
        if (atomic_load_explicit(&l->has_event, memory_order_acquire)) {
            return -1; /* the real code would lock and take the event here */
        }
        if (atomic_load_explicit(&l->run_state, memory_order_relaxed) != AH_STATE_RUNNING) {
            return -1;
        }
        l->iteration++;
        lua_pushvalue(L, LEAN_KEY);
        lua_pushnumber(L, (lua_Number)l->iteration);
        lua_rawset(L, LEAN_CTX);
        lua_pushvalue(L, LEAN_TRACEBACK);
        lua_pushvalue(L, LEAN_FN);
        lua_pushvalue(L, LEAN_CTX);
        uint64_t seq = atomic_load_explicit(&l->call_seq, memory_order_relaxed);
        atomic_store_explicit(&l->call_seq, seq + 1, memory_order_release);
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
        atomic_store_explicit(&l->call_started_us, (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000,
                              memory_order_relaxed);
        int status = lua_pcall(L, 1, 1, LEAN_TOP + 1);
        atomic_store_explicit(&l->call_seq, seq + 2, memory_order_release);
        atomic_store_explicit(&l->call_started_us, 0, memory_order_relaxed);
        if (atomic_load_explicit(&l->hook_set, memory_order_relaxed) &&
            atomic_exchange(&l->hook_set, false)) {
            lua_sethook(L, NULL, 0, 0);
        }
        if (status != 0) {
            return -1;
        }
        total += (long long)lua_tonumber(L, -1);
        lua_settop(L, LEAN_TOP);
        atomic_store_explicit(&l->batches,
                              atomic_load_explicit(&l->batches, memory_order_relaxed) + 1,
                              memory_order_relaxed);
    }
    *sink += (double)total;
    return 0;
}

/* ---- driver ------------------------------------------------------------------------------ */

typedef int (*loop_fn)(void *ctx, long n, double *sink);

static int time_loop(loop_fn fn, void *ctx, long n, double *ns_per_call, double *sink)
{
    double t0 = now_ns();
    if (fn(ctx, n, sink) != 0) {
        return -1;
    }
    *ns_per_call = (now_ns() - t0) / (double)n;
    return 0;
}

static int raw_fn(void *ctx, long n, double *sink)
{
    return raw_loop(ctx, n, sink);
}
static int host_fn(void *ctx, long n, double *sink)
{
    return host_loop(ctx, n, sink);
}
static int lua_only_fn(void *ctx, long n, double *sink)
{
    return lua_only_loop(ctx, n, sink);
}
static int state_only_fn(void *ctx, long n, double *sink)
{
    return state_only_loop(ctx, n, sink);
}
static int lean_fn(void *ctx, long n, double *sink)
{
    return lean_loop(ctx, n, sink);
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : DEFAULT_N;
    int reps = argc > 2 ? atoi(argv[2]) : DEFAULT_REPS;
    if (n <= 0 || reps <= 0 || reps > MAX_REPS) {
        fprintf(stderr, "usage: bench_batch [N [REPS]]  (N > 0, 1 <= REPS <= %d)\n", MAX_REPS);
        return 2;
    }
    int exit_code = 1;
    raw_t raw = {0};
    host_t host = {0};
    lean_t lean = {0};
    char path[] = "/tmp/ah-bench-batch-XXXXXX.lua";
    int fd = mkstemps(path, 4);
    if (fd < 0) {
        perror("mkstemps");
        return 1;
    }
    if (write(fd, script_text, sizeof(script_text) - 1) != (ssize_t)(sizeof(script_text) - 1)) {
        perror("write");
        close(fd);
        goto cleanup;
    }
    close(fd);
    if (raw_open(&raw, path) != 0 || host_open(&host, path) != 0 || lean_open(&lean, path) != 0) {
        goto cleanup;
    }

    double sink = 0;
    double raw_ns[MAX_REPS], host_ns[MAX_REPS], lua_ns[MAX_REPS], state_ns[MAX_REPS],
        lean_ns[MAX_REPS];
    double ignored;
    /* Warm-up: JIT, caches, page faults. */
    if (time_loop(raw_fn, &raw, WARMUP, &ignored, &sink) != 0 ||
        time_loop(host_fn, &host, WARMUP, &ignored, &sink) != 0) {
        goto cleanup;
    }
    for (int r = 0; r < reps; r++) {
        if (time_loop(raw_fn, &raw, n, &raw_ns[r], &sink) != 0 ||
            time_loop(host_fn, &host, n, &host_ns[r], &sink) != 0 ||
            time_loop(lua_only_fn, &host, n / 4, &lua_ns[r], &sink) != 0 ||
            time_loop(state_only_fn, &host, n / 4, &state_ns[r], &sink) != 0 ||
            time_loop(lean_fn, &lean, n / 4, &lean_ns[r], &sink) != 0) {
            goto cleanup;
        }
    }
    double raw_med = median(raw_ns, reps);
    double host_med = median(host_ns, reps);
    double lua_med = median(lua_ns, reps);
    double state_med = median(state_ns, reps);
    double lean_med = median(lean_ns, reps);
    printf("calls per repetition: %ld, repetitions: %d (median shown)\n", n, reps);
    printf("raw lua_pcall:             %8.1f ns/call\n", raw_med);
    printf("host batch (worker path):  %8.1f ns/call\n", host_med);
    printf("  ah_lua_batch alone:      %8.1f ns/call\n", lua_med);
    printf("  4 ah_state calls alone:  %8.1f ns/call\n", state_med);
    printf("lean prototype (not host): %8.1f ns/call\n", lean_med);
    printf("RESULT raw_ns=%.1f host_ns=%.1f ratio=%.2f lua_batch_ns=%.1f state_ns=%.1f "
           "lean_ns=%.1f sink=%.0f\n",
           raw_med, host_med, host_med / raw_med, lua_med, state_med, lean_med,
           sink > 0 ? 1.0 : 0.0);
    exit_code = 0;
cleanup:
    host_close(&host);
    if (raw.L != NULL) {
        lua_close(raw.L);
    }
    if (lean.L != NULL) {
        lua_close(lean.L);
    }
    unlink(path);
    return exit_code;
}
