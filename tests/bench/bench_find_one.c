/* Benchmark: the cost of one find_one through agent.mongo (Lua) next to the same query written
 * directly against mongo-c-driver (C), in the same process, against the same server. Both sides
 * do the same work per call: pop a client from a pool, find_with_opts {limit 1, singleBatch},
 * read the document (C: walk it; Lua: decode it into a table), push the client back. Rounds
 * alternate C and Lua so drift (server warm-up, other load) hits both alike; the median round
 * is reported.
 *
 *   bench_find_one URI [calls_per_round=2000] [rounds=7]
 *
 * Prints one line per side and the overhead, e.g.
 *   find_one C:   52.1 us/op
 *   find_one Lua: 55.3 us/op
 *   overhead: +6.1% (target < 20%) */
#include "ah_mongo.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>
#include <mongoc/mongoc.h>

#define DB "agenthost_bench"
#define COLL "find_one"

static const char *const lua_loop = "local n = ...\n"
                                    "local mongo = require 'agent.mongo'\n"
                                    "local coll = mongo.collection('" COLL "', '" DB "')\n"
                                    "local filter = { _id = 42 }\n"
                                    "local sum = 0\n"
                                    "for i = 1, n do\n"
                                    "  local doc = coll:find_one(filter)\n"
                                    "  if doc == nil then error('not found') end\n"
                                    "  sum = sum + doc.n\n"
                                    "end\n"
                                    "return sum\n";

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int seed(mongoc_client_pool_t *pool, char *err, size_t errlen)
{
    mongoc_client_t *client = mongoc_client_pool_pop(pool);
    mongoc_collection_t *coll = mongoc_client_get_collection(client, DB, COLL);
    bson_t *doc =
        BCON_NEW("_id", BCON_INT32(42), "n", BCON_INT32(7), "name", BCON_UTF8("bench"), "tags", "[",
                 BCON_UTF8("a"), BCON_UTF8("b"), "]", "at", BCON_DATE_TIME(1700000000000), "nested",
                 "{", "x", BCON_DOUBLE(1.5), "y", BCON_BOOL(true), "}");
    bson_t *filter = BCON_NEW("_id", BCON_INT32(42));
    bson_t *opts = BCON_NEW("upsert", BCON_BOOL(true));
    bson_error_t error;
    bool ok = mongoc_collection_replace_one(coll, filter, doc, opts, NULL, &error);
    if (!ok) {
        snprintf(err, errlen, "seeding failed: %.400s", error.message);
    }
    bson_destroy(opts);
    bson_destroy(filter);
    bson_destroy(doc);
    mongoc_collection_destroy(coll);
    mongoc_client_pool_push(pool, client);
    return ok ? 0 : -1;
}

/* One round of n find_one calls in C. Seconds, or -1 on failure. */
static double round_c(mongoc_client_pool_t *pool, int n)
{
    bson_t *filter = BCON_NEW("_id", BCON_INT32(42));
    bson_t *opts = BCON_NEW("limit", BCON_INT64(1), "singleBatch", BCON_BOOL(true));
    int64_t sum = 0;
    int64_t t0 = ah_mono_us();
    for (int i = 0; i < n; i++) {
        mongoc_client_t *client = mongoc_client_pool_pop(pool);
        mongoc_collection_t *coll = mongoc_client_get_collection(client, DB, COLL);
        mongoc_cursor_t *cursor = mongoc_collection_find_with_opts(coll, filter, opts, NULL);
        const bson_t *doc;
        if (mongoc_cursor_next(cursor, &doc)) {
            bson_iter_t iter;
            if (bson_iter_init_find(&iter, doc, "n")) {
                sum += bson_iter_as_int64(&iter);
            }
        } else {
            sum = -1;
        }
        mongoc_cursor_destroy(cursor);
        mongoc_collection_destroy(coll);
        mongoc_client_pool_push(pool, client);
        if (sum < 0) {
            break;
        }
    }
    double seconds = (double)(ah_mono_us() - t0) / 1e6;
    bson_destroy(opts);
    bson_destroy(filter);
    return sum == (int64_t)7 * n ? seconds : -1;
}

/* One round of n find_one calls from Lua. Seconds, or -1 on failure. */
static double round_lua(lua_State *L, int loop_ref, int n)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, loop_ref);
    lua_pushinteger(L, n);
    int64_t t0 = ah_mono_us();
    if (lua_pcall(L, 1, 1, 0) != 0) {
        fprintf(stderr, "lua: %s\n", lua_tostring(L, -1));
        lua_pop(L, 1);
        return -1;
    }
    double seconds = (double)(ah_mono_us() - t0) / 1e6;
    lua_Number sum = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return sum == 7.0 * n ? seconds : -1;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s URI [calls_per_round=2000] [rounds=7]\n", argv[0]);
        return 2;
    }
    const char *uri_string = argv[1];
    int n = argc > 2 ? atoi(argv[2]) : 2000;
    int rounds = argc > 3 ? atoi(argv[3]) : 7;
    if (n <= 0 || rounds <= 0 || rounds > 100) {
        fprintf(stderr, "bad calls_per_round or rounds\n");
        return 2;
    }
    int rc = 1;
    char err[AH_ERRLEN];
    /* agent.mongo lives in the MongoDB plugin, built next to agenthost (unless told otherwise). */
    setenv("AGENTHOST_PLUGIN_DIR", AH_BENCH_PLUGIN_DIR, 0);
    mongoc_init();
    mongoc_uri_t *uri = mongoc_uri_new(uri_string);
    mongoc_client_pool_t *pool = uri != NULL ? mongoc_client_pool_new(uri) : NULL;
    ah_lua_mongo_t *m = ah_lua_mongo_new(uri_string, DB, DB, "bench", err, sizeof(err));
    lua_State *L = luaL_newstate();
    double *c_times = calloc((size_t)rounds, sizeof(double));
    double *lua_times = calloc((size_t)rounds, sizeof(double));
    if (pool == NULL || m == NULL || L == NULL || c_times == NULL || lua_times == NULL) {
        fprintf(stderr, "setup failed: %s\n", m == NULL ? err : "bad URI or out of memory");
        goto out;
    }
    mongoc_client_pool_set_error_api(pool, MONGOC_ERROR_API_VERSION_2);
    if (seed(pool, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        goto out;
    }
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushlightuserdata(L, m);
    lua_pushcclosure(L, ah_lua_mongo_open, 1);
    lua_setfield(L, -2, "agent.mongo");
    lua_pop(L, 2);
    if (luaL_loadstring(L, lua_loop) != 0) {
        fprintf(stderr, "lua: %s\n", lua_tostring(L, -1));
        goto out;
    }
    int loop_ref = luaL_ref(L, LUA_REGISTRYINDEX);

    /* Warm-up: connections in both pools, JIT traces, server caches. */
    if (round_c(pool, n / 4 + 1) < 0 || round_lua(L, loop_ref, n / 4 + 1) < 0) {
        fprintf(stderr, "warm-up failed (is the server up at %s?)\n", uri_string);
        goto out;
    }
    for (int r = 0; r < rounds; r++) {
        c_times[r] = round_c(pool, n);
        lua_times[r] = round_lua(L, loop_ref, n);
        if (c_times[r] < 0 || lua_times[r] < 0) {
            fprintf(stderr, "round %d failed\n", r);
            goto out;
        }
    }
    qsort(c_times, (size_t)rounds, sizeof(double), cmp_double);
    qsort(lua_times, (size_t)rounds, sizeof(double), cmp_double);
    double c_us = c_times[rounds / 2] / n * 1e6;
    double lua_us = lua_times[rounds / 2] / n * 1e6;
    printf("find_one C:   %.1f us/op (median of %d rounds of %d)\n", c_us, rounds, n);
    printf("find_one Lua: %.1f us/op\n", lua_us);
    printf("overhead: %+.1f%% (target < 20%%)\n", (lua_us - c_us) / c_us * 100.0);
    rc = 0;
out:
    free(lua_times);
    free(c_times);
    if (L != NULL) {
        lua_close(L);
    }
    ah_lua_mongo_free(m);
    if (pool != NULL) {
        mongoc_client_pool_destroy(pool);
    }
    mongoc_uri_destroy(uri);
    mongoc_cleanup();
    return rc;
}
