/* agent.mongo inside the MongoDB plugin: the binding behind the core's front in ah_mongo.h
 * (core/ah_mongo.c forwards to the ahm_lua_* functions here). Every collection method follows
 * one shape (STYLE rule 9): check and encode all arguments into a call object (a userdata whose
 * __gc frees them, so a misuse raises with nothing lost), then take a client, run one driver
 * call that copies the reply out (work_*: no Lua), give the client back, and only then turn the
 * copy into Lua values; a runtime failure comes back as nil, message, code. No client is ever
 * out while something can raise, except the one a find_iter iterator owns (a userdata with
 * __gc). The binding has a pool of its own, never the control store's. Values are mapped by
 * ahm_bson.c.
 *
 * Inside a task of the worker's loop (core/ah_lua_task.c) the driver call does not block the Lua
 * thread: run_then() hands the call object to libuv's thread pool (ah_lua_queue_work), where the
 * work takes a client, runs and copies the reply out as BSON, and the task waits
 * (ah_lua_op_wait), then resumes with (true, call). Every method is called through a Lua
 * wrapper, `return finish(method(...))` (wrap_methods): a Lua frame survives the yield, and
 * finish() builds the Lua values from the copy inside the task, so a Lua error while building
 * (the memory limit) is raised in the script as before. Argument errors are worded as if the
 * script had called the C method itself (method_argerror). A cancelled wait (BATCH_TIMEOUT,
 * shutdown) leaves the driver call to finish on its thread; the call object stays referenced
 * until then. Outside a
 * task (a coroutine the script created itself) the call runs inline, as before. find_iter iterators
 * stay inline (each step may read the next batch). */
#include "ahm.h"

#include "ahm_bson.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <mongoc/mongoc.h>
#include <uv.h>

#include "ah_lua.h"

#define MT_COLLECTION "agent.mongo.collection"
#define MT_ITERATOR "agent.mongo.iterator"
#define MT_CALL "agent.mongo.call"

#define NOT_CONFIGURED "agent.mongo: no MongoDB configured (set AGENT_MONGODB_URI or MONGODB_URI)"
#define DB_NAME_MAX 63
#define COLLECTION_NAME_MAX 255
#define OWN_POOL_TIMEOUT_MS 2000 /* serverSelectionTimeoutMS / connectTimeoutMS defaults */
#define POOL_WAIT_MS 1000       /* waitQueueTimeoutMS default: the longest wait for a free client */
#define AHM_CODE_NO_CLIENT (-1) /* the code of "no free connection in the pool" */

typedef struct ah_lua_iterator_s ah_lua_iterator_t;

struct ahm_lua_s {
    mongoc_client_pool_t *own_pool; /* owned, or NULL: not configured */
    int32_t pool_wait_ms;           /* its waitQueueTimeoutMS */
    char database[DB_NAME_MAX + 1];
    ah_lua_iterator_t *iterators; /* open find_iter() iterators (Lua thread only) */
};

/* A collection object: a name, not a connection (clients are popped per call). */
typedef struct {
    ahm_lua_t *m; /* may be NULL: not configured */
    char db[DB_NAME_MAX + 1];
    char name[COLLECTION_NAME_MAX + 1];
} collection_t;

/* A find_iter() cursor; holds a pool client from its opening until it ends, is closed or is
 * collected (cursor NULL: not opened yet, or closed). */
struct ah_lua_iterator_s {
    ahm_lua_t *m;
    mongoc_client_pool_t *pool;
    mongoc_client_t *client;
    mongoc_collection_t *coll;
    mongoc_cursor_t *cursor; /* NULL once closed */
    ah_lua_iterator_t *prev, *next;
};

/* ---- the connection object ------------------------------------------------------------------ */

ahm_lua_t *ahm_lua_new(const char *own_uri, const char *database, const char *default_database,
                       const char *agent_id, char *err, size_t errlen)
{
    ahm_lua_t *m = calloc(1, sizeof(*m));
    mongoc_uri_t *uri = NULL;
    if (m == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    const char *db = database;
    if (own_uri != NULL) {
        mongoc_init(); /* idempotent */
        bson_error_t error;
        uri = mongoc_uri_new_with_error(own_uri, &error);
        if (uri == NULL) {
            snprintf(err, errlen, "AGENT_MONGODB_URI is invalid: %s", error.message);
            goto fail;
        }
        if (ahm_uri_check(uri, "AGENT_MONGODB_URI", err, errlen) != AH_OK) {
            goto fail;
        }
        const char *timeouts[] = {MONGOC_URI_SERVERSELECTIONTIMEOUTMS, MONGOC_URI_CONNECTTIMEOUTMS};
        for (size_t i = 0; i < 2; i++) {
            if (!mongoc_uri_has_option(uri, timeouts[i])) {
                mongoc_uri_set_option_as_int32(uri, timeouts[i], OWN_POOL_TIMEOUT_MS);
            }
        }
        /* A call never waits for a client without a bound (0 would mean forever). */
        m->pool_wait_ms = mongoc_uri_get_option_as_int32(uri, MONGOC_URI_WAITQUEUETIMEOUTMS, 0);
        if (m->pool_wait_ms <= 0) {
            m->pool_wait_ms = POOL_WAIT_MS;
            mongoc_uri_set_option_as_int32(uri, MONGOC_URI_WAITQUEUETIMEOUTMS, POOL_WAIT_MS);
        }
        m->own_pool = mongoc_client_pool_new_with_error(uri, &error);
        if (m->own_pool == NULL) {
            snprintf(err, errlen, "AGENT_MONGODB_URI cannot be used: %s", error.message);
            goto fail;
        }
        mongoc_client_pool_set_error_api(m->own_pool, MONGOC_ERROR_API_VERSION_2);
        char appname[128];
        snprintf(appname, sizeof(appname), "agenthost-lua/%.100s", agent_id ? agent_id : "");
        mongoc_client_pool_set_appname(m->own_pool, appname);
        if (db == NULL) {
            db = mongoc_uri_get_database(uri);
        }
    }
    if (db == NULL) {
        db = default_database != NULL ? default_database : "agenthost";
    }
    if (strlen(db) > DB_NAME_MAX) {
        snprintf(err, errlen, "database name '%s' is too long", db);
        goto fail;
    }
    ah_strlcpy(m->database, db, sizeof(m->database));
    mongoc_uri_destroy(uri);
    return m;
fail:
    mongoc_uri_destroy(uri);
    ahm_lua_free(m);
    return NULL;
}

static void iterator_close(ah_lua_iterator_t *it)
{
    if (it->cursor == NULL) {
        return;
    }
    mongoc_cursor_destroy(it->cursor);
    mongoc_collection_destroy(it->coll);
    mongoc_client_pool_push(it->pool, it->client);
    it->cursor = NULL;
    it->coll = NULL;
    it->client = NULL;
    if (it->prev != NULL) {
        it->prev->next = it->next;
    } else {
        it->m->iterators = it->next;
    }
    if (it->next != NULL) {
        it->next->prev = it->prev;
    }
    it->prev = it->next = NULL;
}

void ahm_lua_detach(ahm_lua_t *m)
{
    if (m == NULL) {
        return;
    }
    while (m->iterators != NULL) {
        iterator_close(m->iterators);
    }
}

void ahm_lua_free(ahm_lua_t *m)
{
    if (m == NULL) {
        return;
    }
    while (m->iterators != NULL) {
        iterator_close(m->iterators);
    }
    if (m->own_pool != NULL) {
        mongoc_client_pool_destroy(m->own_pool);
    }
    free(m);
}

static mongoc_client_pool_t *pool_of(ahm_lua_t *m)
{
    if (m == NULL) {
        return NULL;
    }
    return m->own_pool;
}

/* ---- one call's C-owned data ---------------------------------------------------------------- */

#define CALL_ARGS 4

/* What one collection call owns, in C memory (never the Lua state's), reference counted: the
 * method's userdata (MT_CALL, a box holding the pointer, pushed first) holds one reference, a job
 * on the thread pool another. A Lua error anywhere (an argument that cannot be encoded, the
 * memory limit or the timeout hook while the result is built) leaves nothing behind, since the
 * box's __gc drops its reference; a job whose task stopped waiting (BATCH_TIMEOUT, shutdown, the
 * call failed) or whose Lua state is being closed keeps writing into memory it co-owns, and
 * the last of the two frees it. Both run on the Lua thread (work_done is a loop callback), so
 * the count needs no lock. The argument checks fill args (Lua thread); the driver work (work_*:
 * no Lua, so it may run on any thread) fills ok/error/reply/docs/count from a client it takes
 * and gives back; the result builders (build_*: Lua thread) read them once the client is back
 * in the pool. */
typedef struct call_s {
    int refs;      /* the box's (until its __gc) + the job's (until work_done) */
    bool box_gone; /* the box was collected (its Lua state closes): no Lua from work_done */
    int given;     /* how many arguments the method was called with */
    bson_t *args[CALL_ARGS]; /* encoded arguments (bson_new) */
    int nargs;
    bson_t **docs; /* insert_many: the documents to insert; cursors: the documents read */
    size_t ndocs, cap;
    bson_t *reply; /* a write's or command's reply (a copy), or NULL */
    int64_t count;
    int flags; /* per method (update kind, delete_many, find_one_and_update flags) */
    bool ok;
    bson_error_t error;
    /* Run on the thread pool (run_then): what to do, and the wait of the task. */
    collection_t *c;     /* &target while run_then() runs it */
    collection_t target; /* a copy: the collection object may be gone when the work ends */
    const char *op;      /* method name, for messages */
    void (*work)(mongoc_collection_t *, struct call_s *);
    int (*build)(lua_State *L, collection_t *c, struct call_s *call);
    mongoc_client_pool_t *pool;
    mongoc_client_t *client; /* taken on the Lua thread when one was free, else on the pool */
    bool no_client;          /* none came free in time */
    ah_lua_op_t wait;
    uv_work_t req;
    lua_State *main; /* the state's main thread, for self_ref */
    int self_ref;    /* keeps this object alive while the thread pool uses it */
    int index;       /* its stack index in the method */
} call_t;

static void call_clear(call_t *call)
{
    for (int i = 0; i < call->nargs; i++) {
        bson_destroy(call->args[i]);
    }
    call->nargs = 0;
    for (size_t i = 0; i < call->ndocs; i++) {
        bson_destroy(call->docs[i]);
    }
    free(call->docs);
    call->docs = NULL;
    call->ndocs = call->cap = 0;
    if (call->reply != NULL) {
        bson_destroy(call->reply);
        call->reply = NULL;
    }
}

/* Drops one reference; the last one frees the call and what it holds. Lua thread. */
static void call_unref(call_t *call)
{
    if (call != NULL && --call->refs == 0) {
        call_clear(call);
        free(call);
    }
}

/* The box's __gc: the Lua side lets go (a job in flight keeps the call alive). */
static int call_gc(lua_State *L)
{
    call_t **box = lua_touserdata(L, 1);
    call_t *call = *box;
    *box = NULL;
    if (call != NULL) {
        call->box_gone = true;
        call_unref(call);
    }
    return 0;
}

/* Sets the stack to the method's nparams arguments (missing ones nil, so argument indexes stay
 * valid) and pushes a new, empty call object above them (its box). Raises on out of memory,
 * with nothing acquired. */
static call_t *call_new(lua_State *L, int nparams)
{
    int given = lua_gettop(L);
    lua_settop(L, nparams);
    call_t **box = lua_newuserdata(L, sizeof(*box));
    *box = NULL;
    luaL_getmetatable(L, MT_CALL);
    lua_setmetatable(L, -2);
    call_t *call = calloc(1, sizeof(*call));
    if (call == NULL) {
        luaL_error(L, "agent.mongo: out of memory");
    }
    *box = call;
    call->refs = 1;
    call->given = given;
    call->self_ref = LUA_NOREF;
    call->index = lua_gettop(L);
    return call;
}

/* Frees the call's data now (not at the next collection) and returns nret: the last step of a
 * method. */
static int call_finish(call_t *call, int nret)
{
    call_clear(call);
    return nret;
}

/* A new empty argument document owned by call. Raises on out of memory (nothing acquired). */
static bson_t *call_arg_new(lua_State *L, call_t *call)
{
    bson_t *b = call->nargs < CALL_ARGS ? bson_new() : NULL;
    if (b == NULL) {
        luaL_error(L, "agent.mongo: out of memory");
    }
    call->args[call->nargs++] = b;
    return b;
}

/* Appends a document (taking ownership) to call->docs; false when out of memory (doc freed).
 * No Lua: driver work may call it. */
static bool call_add_doc(call_t *call, bson_t *doc)
{
    if (doc == NULL) {
        return false;
    }
    if (call->ndocs == call->cap) {
        size_t cap = call->cap ? call->cap * 2 : 16;
        bson_t **grown = realloc(call->docs, cap * sizeof(*grown));
        if (grown == NULL) {
            bson_destroy(doc);
            return false;
        }
        call->docs = grown;
        call->cap = cap;
    }
    call->docs[call->ndocs++] = doc;
    return true;
}

/* ---- argument helpers (may raise; call before acquiring anything) ------------------------ */

/* Raises "bad argument #arg to 'fn' (what)"; what the call holds is freed by its __gc. */
/* luaL_argerror for a collection method called through its wrapper: the message names the
 * method (the wrapper's upvalue carries its name) and the argument as the script counts it
 * (self is not counted), at the script's line. */
static int method_argerror(lua_State *L, int arg, const char *what)
{
    char msg[AH_ERRLEN];
    ah_strlcpy(msg, what, sizeof(msg));
    lua_Debug ar;
    const char *name = "?";
    if (lua_getstack(L, 0, &ar) && lua_getinfo(L, "n", &ar) && ar.name != NULL) {
        name = ar.name;
    }
    luaL_where(L, 2); /* level 1 is the wrapper */
    if (arg == 1) {
        lua_pushfstring(L, "calling '%s' on bad self (%s)", name, msg);
    } else {
        lua_pushfstring(L, "bad argument #%d to '%s' (%s)", arg - 1, name, msg);
    }
    lua_concat(L, 2);
    return lua_error(L);
}

static int raise_arg(lua_State *L, int arg, const char *what)
{
    return method_argerror(L, arg, what);
}

/* luaL_checktype(L, arg, LUA_TTABLE) for a collection method. */
static void check_table(lua_State *L, int arg)
{
    if (lua_type(L, arg) != LUA_TTABLE) {
        char what[64];
        snprintf(what, sizeof(what), "table expected, got %s", luaL_typename(L, arg));
        method_argerror(L, arg, what);
    }
}

/* luaL_typename of argument arg as the caller passed it ("no value" past the last one). */
static const char *arg_typename(lua_State *L, call_t *call, int arg)
{
    return arg > call->given ? "no value" : luaL_typename(L, arg);
}

/* Encodes the document argument `name` (a table, or nil when optional → {}). Errors read
 * "bad argument #n to 'fn' (<name>: <problem>)". */
static bson_t *doc_arg(lua_State *L, call_t *call, int arg, bool optional, const char *name)
{
    int t = lua_type(L, arg);
    char what[AH_ERRLEN + 64];
    if (!(t == LUA_TTABLE || (optional && t <= LUA_TNIL))) {
        snprintf(what, sizeof(what), "%s: table expected, got %s", name,
                 arg_typename(L, call, arg));
        raise_arg(L, arg, what);
    }
    bson_t *b = call_arg_new(L, call);
    char err[AH_ERRLEN];
    if (t == LUA_TTABLE && ahm_bson_from_lua(L, arg, b, err, sizeof(err)) != AH_OK) {
        snprintf(what, sizeof(what), "%s: %s", name, err);
        raise_arg(L, arg, what);
    }
    return b;
}

/* Checks that the options argument is nil or a table whose keys are all in allowed. */
static void check_opts(lua_State *L, int arg, const char *const *allowed)
{
    int t = lua_type(L, arg);
    if (t <= LUA_TNIL) {
        return;
    }
    if (t != LUA_TTABLE) {
        char what[64];
        snprintf(what, sizeof(what), "options table expected, got %s", luaL_typename(L, arg));
        raise_arg(L, arg, what);
    }
    lua_pushnil(L);
    while (lua_next(L, arg) != 0) {
        lua_pop(L, 1);
        bool known = false;
        if (lua_type(L, -1) == LUA_TSTRING) {
            for (const char *const *a = allowed; *a != NULL && !known; a++) {
                known = strcmp(lua_tostring(L, -1), *a) == 0;
            }
        }
        if (!known) {
            char what[160];
            const char *meant = lua_type(L, -1) == LUA_TSTRING
                                    ? ah_suggest(lua_tostring(L, -1), allowed, NULL)
                                    : NULL;
            snprintf(what, sizeof(what), "unknown option '%.64s'%s%.32s%s",
                     lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "(not a string)",
                     meant != NULL ? "; did you mean '" : "", meant != NULL ? meant : "",
                     meant != NULL ? "'?" : "");
            lua_pop(L, 1);
            raise_arg(L, arg, what);
        }
    }
}

/* Pushes opts[name] (nil when opts is not a table). Stack: [-0, +1]. */
static int opt_field(lua_State *L, int arg, const char *name)
{
    if (lua_type(L, arg) != LUA_TTABLE) {
        lua_pushnil(L);
        return LUA_TNIL;
    }
    lua_getfield(L, arg, name);
    return lua_type(L, -1);
}

static bool opt_bool(lua_State *L, int arg, const char *name, bool dflt)
{
    int t = opt_field(L, arg, name);
    bool v = t == LUA_TNIL ? dflt : lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (t != LUA_TNIL && t != LUA_TBOOLEAN) {
        char what[96];
        snprintf(what, sizeof(what), "option '%s' must be a boolean", name);
        raise_arg(L, arg, what);
    }
    return v;
}

/* A non-negative integer option; -1 when absent. */
static int64_t opt_count(lua_State *L, int arg, const char *name)
{
    int t = opt_field(L, arg, name);
    lua_Number n = lua_tonumber(L, -1);
    lua_pop(L, 1);
    if (t == LUA_TNIL) {
        return -1;
    }
    int64_t v;
    if (t != LUA_TNUMBER || !(n >= 0 && n < 9007199254740992.0) ||
        ah_double_to_int64(n, &v) != AH_OK || (lua_Number)v != n) {
        char what[96];
        snprintf(what, sizeof(what), "option '%s' must be a non-negative integer", name);
        raise_arg(L, arg, what);
    }
    return v;
}

/* Appends opts[name] (a table; ordered pairs allowed) to out under key. */
static void opt_doc(lua_State *L, int arg, const char *name, bson_t *out, const char *key)
{
    int t = opt_field(L, arg, name);
    if (t == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    char err[AH_ERRLEN];
    bson_t child;
    bson_append_document_begin(out, key, (int)strlen(key), &child);
    int rc =
        t == LUA_TTABLE ? ahm_bson_from_lua_ordered(L, -1, &child, err, sizeof(err)) : AH_EINVAL;
    bson_append_document_end(out, &child);
    lua_pop(L, 1);
    if (rc != AH_OK) {
        char what[AH_ERRLEN + 64];
        snprintf(what, sizeof(what), "option '%s': %s", name,
                 t == LUA_TTABLE ? err : "must be a table");
        raise_arg(L, arg, what);
    }
}

static collection_t *check_collection(lua_State *L)
{
    collection_t *c = lua_touserdata(L, 1);
    bool ok = c != NULL && lua_getmetatable(L, 1);
    if (ok) {
        luaL_getmetatable(L, MT_COLLECTION);
        ok = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
    }
    if (!ok) {
        char what[64];
        snprintf(what, sizeof(what), "%s expected, got %s", MT_COLLECTION, luaL_typename(L, 1));
        method_argerror(L, 1, what);
    }
    return c;
}

/* ---- taking a client ----------------------------------------------------------------------- */

/* A client from pool, or NULL when none came free in time. First without waiting; when all
 * maxPoolSize clients are out, collects garbage (unreachable iterators give theirs back) and
 * then waits at most the pool's waitQueueTimeoutMS. Lua thread, nothing acquired yet: the
 * collection may run finalizers that raise. */
static mongoc_client_t *pop_client(lua_State *L, mongoc_client_pool_t *pool)
{
    mongoc_client_t *client = mongoc_client_pool_try_pop(pool);
    if (client == NULL) {
        lua_gc(L, LUA_GCCOLLECT, 0);
        client = mongoc_client_pool_pop(pool); /* bounded: waitQueueTimeoutMS > 0 */
    }
    return client;
}

static int push_not_configured(lua_State *L)
{
    lua_pushnil(L);
    lua_pushliteral(L, NOT_CONFIGURED);
    return 2;
}

static int push_no_client(lua_State *L, collection_t *c, const char *op)
{
    lua_pushnil(L);
    lua_pushfstring(L,
                    "agent.mongo: %s on %s.%s failed: no free connection in the pool after %d ms "
                    "(all maxPoolSize clients are in use, e.g. by open find_iter iterators)",
                    op, c->db, c->name, (int)c->m->pool_wait_ms);
    lua_pushinteger(L, AHM_CODE_NO_CLIENT);
    return 3;
}

typedef void (*work_fn)(mongoc_collection_t *coll, call_t *call);

/* Runs work with a client of c's pool and gives the client back before returning: no Lua
 * value is built while a client is out. Returns 0, or pushes the failure (not configured, no
 * free client) and returns its count. */
static int run(lua_State *L, collection_t *c, call_t *call, const char *op, work_fn work)
{
    mongoc_client_pool_t *pool = pool_of(c->m);
    if (pool == NULL) {
        return push_not_configured(L);
    }
    mongoc_client_t *client = pop_client(L, pool);
    if (client == NULL) {
        return push_no_client(L, c, op);
    }
    mongoc_collection_t *coll = mongoc_client_get_collection(client, c->db, c->name);
    work(coll, call);
    mongoc_collection_destroy(coll);
    mongoc_client_pool_push(pool, client);
    return 0;
}

typedef int (*build_fn)(lua_State *L, collection_t *c, call_t *call);

/* Thread pool: takes a client unless the Lua thread got one (waiting at most the pool's
 * waitQueueTimeoutMS), runs the work, gives the client back. No Lua. */
static void work_on_pool(uv_work_t *req)
{
    call_t *call = req->data;
    if (call->client == NULL) {
        call->client = mongoc_client_pool_pop(call->pool);
        if (call->client == NULL) {
            call->no_client = true;
            return;
        }
    }
    mongoc_collection_t *coll =
        mongoc_client_get_collection(call->client, call->c->db, call->c->name);
    call->work(coll, call);
    mongoc_collection_destroy(coll);
    mongoc_client_pool_push(call->pool, call->client);
    call->client = NULL;
}

/* Loop thread: the job is over (ran, or was cancelled before it started: status UV_ECANCELED).
 * The task, if it still waits, resumes with (true, call) and its method's wrapper builds the
 * result (l_finish); then the job's reference goes. */
static void work_done(uv_work_t *req, int status)
{
    call_t *call = req->data;
    ah_lua_work_finished(req);
    if (status != 0 && call->client != NULL) { /* never ran (cancelled before it started) */
        mongoc_client_pool_push(call->pool, call->client);
        call->client = NULL;
    }
    if (!call->box_gone) {
        ah_lua_op_done_ref(&call->wait, call->self_ref);
        luaL_unref(call->main, LUA_REGISTRYINDEX, call->self_ref);
        call->self_ref = LUA_NOREF;
    }
    call_unref(call);
}

/* True for the methods that only read: a read cancelled while it runs is reported with the
 * wait's own code, since running it again is harmless. */
static bool work_reads_only(const call_t *call);

/* ah_lua_op_t.cancel (Lua thread): the task stopped waiting. A job still queued is taken off
 * the queue (uv_cancel) and never runs: the operation did not happen. One that started cannot be
 * stopped: it finishes on its thread (work_done drops its reference), and for a write the wait
 * reports "unknown", since the write may land after the script was told it timed out. */
static void work_cancel(ah_lua_op_t *op)
{
    call_t *call = (call_t *)((char *)op - offsetof(call_t, wait));
    if (uv_cancel((uv_req_t *)&call->req) == 0) {
        return;
    }
    op->outcome_unknown = !work_reads_only(call);
}

/* Runs work for call and builds its result: inside a task, on the thread pool while the task
 * waits (the task resumes with the result); otherwise inline. Returns what the method returns
 * (or yields). */
static int run_then(lua_State *L, collection_t *c, call_t *call, const char *op,
                    void (*work)(mongoc_collection_t *, call_t *), build_fn build)
{
    call->target = *c;
    c = &call->target;
    call->c = c;
    call->op = op;
    call->work = work;
    call->build = build;
    if (!ah_lua_can_wait(L)) {
        int nret = run(L, c, call, op, work);
        if (nret == 0) {
            nret = build(L, c, call);
        }
        return call_finish(call, nret);
    }
    int cancelled = ah_lua_push_cancelled(L);
    if (cancelled != 0) {
        return call_finish(call, cancelled); /* nobody would wait for the work */
    }
    call->pool = pool_of(c->m);
    if (call->pool == NULL) {
        return call_finish(call, push_not_configured(L));
    }
    call->client = mongoc_client_pool_try_pop(call->pool);
    if (call->client == NULL) {
        lua_gc(L, LUA_GCCOLLECT, 0); /* unreachable iterators give theirs back */
        call->client = mongoc_client_pool_try_pop(call->pool);
    }
    /* Nothing below raises while the client is out: the reference is taken first. */
    lua_pushvalue(L, call->index);
    call->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    call->main = ah_lua_main(L);
    call->wait.cancel = work_cancel;
    call->req.data = call;
    call->refs++; /* the job's */
    if (ah_lua_queue_work(L, &call->req, work_on_pool, work_done) != 0) {
        call->refs--;
        if (call->client != NULL) {
            mongoc_client_pool_push(call->pool, call->client);
            call->client = NULL;
        }
        luaL_unref(L, LUA_REGISTRYINDEX, call->self_ref);
        call->self_ref = LUA_NOREF;
        int nret = run(L, c, call, op, work);
        if (nret == 0) {
            nret = build(L, c, call);
        }
        return call_finish(call, nret);
    }
    return ah_lua_op_wait(L, &call->wait, "agent.mongo");
}

/* finish(...): the second half of every method's wrapper. (true, call) from a call that ran on
 * the thread pool becomes the method's result, built here inside the task; anything else (an
 * inline result, the nil, msg, code of a cancelled wait) is returned as is. */
static int l_finish(lua_State *L)
{
    int n = lua_gettop(L);
    if (n == 2 && lua_type(L, 1) == LUA_TBOOLEAN && lua_toboolean(L, 1) &&
        lua_type(L, 2) == LUA_TUSERDATA && lua_getmetatable(L, 2)) {
        luaL_getmetatable(L, MT_CALL);
        bool is_call = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
        if (is_call) {
            call_t *call = *(call_t **)lua_touserdata(L, 2);
            if (call->no_client) {
                return call_finish(call, push_no_client(L, call->c, call->op));
            }
            return call_finish(call, call->build(L, call->c, call));
        }
    }
    return n;
}

/* ---- results -------------------------------------------------------------------------------- */

/* Pushes nil, "agent.mongo: <op> on db.coll: <message>", code. */
static int push_failure(lua_State *L, collection_t *c, const char *op, const bson_error_t *error)
{
    lua_pushnil(L);
    lua_pushfstring(L, "agent.mongo: %s on %s.%s failed: %s", op, c->db, c->name, error->message);
    lua_pushinteger(L, (lua_Integer)error->code);
    return 3;
}

static int push_decode_failure(lua_State *L, const char *op, const char *err)
{
    lua_pushnil(L);
    lua_pushfstring(L, "agent.mongo: %s: cannot decode the reply: %s", op, err);
    return 2;
}

static int64_t reply_int(const bson_t *reply, const char *key)
{
    bson_iter_t iter;
    if (reply != NULL && bson_iter_init_find(&iter, reply, key) && BSON_ITER_HOLDS_NUMBER(&iter)) {
        return bson_iter_as_int64(&iter);
    }
    return 0;
}

/* Sets t[field] = the value of reply[key] if present. Stack: [-0, +0]. */
static void set_reply_value(lua_State *L, const bson_t *reply, const char *key, const char *field)
{
    bson_iter_t iter;
    char err[AH_ERRLEN];
    if (reply != NULL && bson_iter_init_find(&iter, reply, key) &&
        ahm_bson_push_value(L, &iter, err, sizeof(err)) == AH_OK) {
        lua_setfield(L, -2, field);
    }
}

/* Copies every document of cursor into call->docs, then destroys the cursor. No Lua. */
static void drain_cursor(mongoc_cursor_t *cursor, call_t *call)
{
    const bson_t *doc;
    call->ok = true;
    while (call->ok && mongoc_cursor_next(cursor, &doc)) {
        if (!call_add_doc(call, bson_copy(doc))) {
            call->ok = false;
            bson_set_error(&call->error, MONGOC_ERROR_BSON, MONGOC_ERROR_BSON_INVALID,
                           "out of memory copying the reply");
        }
    }
    if (call->ok && mongoc_cursor_error(cursor, &call->error)) {
        call->ok = false;
    }
    mongoc_cursor_destroy(cursor);
}

/* Pushes call->docs as an array of documents, or the failure. Returns the number pushed. */
static int build_docs(lua_State *L, collection_t *c, const char *op, call_t *call)
{
    if (!call->ok) {
        return push_failure(L, c, op, &call->error);
    }
    lua_createtable(L, (int)(call->ndocs < INT32_MAX ? call->ndocs : 0), 0);
    int table = lua_gettop(L);
    char err[AH_ERRLEN];
    for (size_t i = 0; i < call->ndocs; i++) {
        if (ahm_bson_push(L, call->docs[i], false, err, sizeof(err)) != AH_OK) {
            lua_settop(L, table - 1);
            return push_decode_failure(L, op, err);
        }
        lua_rawseti(L, table, (int)i + 1);
    }
    luaL_getmetatable(L, "agent.mongo.array");
    lua_setmetatable(L, table);
    return 1;
}

/* ---- find --------------------------------------------------------------------------------- */

static const char *const find_options[] = {"projection", "sort",       "limit", "skip",
                                           "iterator",   "batch_size", NULL};

/* Encodes (filter, opts) of find/find_one/find_iter into call->args[0] and [1]. */
static void find_args(lua_State *L, call_t *call, bool one, bool *iterator)
{
    doc_arg(L, call, 2, true, "filter");
    check_opts(L, 3, find_options);
    bson_t *opts = call_arg_new(L, call);
    opt_doc(L, 3, "projection", opts, "projection");
    opt_doc(L, 3, "sort", opts, "sort");
    int64_t skip = opt_count(L, 3, "skip");
    int64_t limit = opt_count(L, 3, "limit");
    int64_t batch = opt_count(L, 3, "batch_size");
    if (skip >= 0) {
        BSON_APPEND_INT64(opts, "skip", skip);
    }
    if (one) {
        BSON_APPEND_INT64(opts, "limit", 1);
        BSON_APPEND_BOOL(opts, "singleBatch", true);
    } else if (limit > 0) {
        BSON_APPEND_INT64(opts, "limit", limit);
    }
    if (batch > 0 && batch <= INT32_MAX) {
        BSON_APPEND_INT32(opts, "batchSize", (int32_t)batch);
    }
    *iterator = opt_bool(L, 3, "iterator", false);
}

static void work_find(mongoc_collection_t *coll, call_t *call)
{
    drain_cursor(mongoc_collection_find_with_opts(coll, call->args[0], call->args[1], NULL), call);
}

/* Pushes a new iterator that holds nothing yet (created before a client is taken, so that
 * pushing it cannot fail while a client is out). Stack: [-0, +1]. */
static ah_lua_iterator_t *iterator_new(lua_State *L, collection_t *c)
{
    ah_lua_iterator_t *it = lua_newuserdata(L, sizeof(*it));
    memset(it, 0, sizeof(*it));
    it->m = c->m;
    luaL_getmetatable(L, MT_ITERATOR);
    lua_setmetatable(L, -2);
    return it;
}

/* find_iter: takes a client for the iterator at the top of the stack and opens its cursor.
 * Returns 1 (the iterator), or pushes the failure and returns its count. */
static int iterator_open(lua_State *L, collection_t *c, call_t *call, ah_lua_iterator_t *it)
{
    mongoc_client_pool_t *pool = pool_of(c->m);
    if (pool == NULL) {
        return push_not_configured(L);
    }
    mongoc_client_t *client = pop_client(L, pool);
    if (client == NULL) {
        return push_no_client(L, c, "find_iter");
    }
    /* From here to the return nothing can raise: the iterator owns the client. */
    it->pool = pool;
    it->client = client;
    it->coll = mongoc_client_get_collection(client, c->db, c->name);
    it->cursor = mongoc_collection_find_with_opts(it->coll, call->args[0], call->args[1], NULL);
    it->next = c->m->iterators;
    if (it->next != NULL) {
        it->next->prev = it;
    }
    c->m->iterators = it;
    return 1;
}

static int build_find(lua_State *L, collection_t *c, call_t *call)
{
    return build_docs(L, c, "find", call);
}

static int find_common(lua_State *L, bool force_iterator)
{
    collection_t *c = check_collection(L);
    call_t *call = call_new(L, 3);
    bool iterator;
    find_args(L, call, false, &iterator);
    if (iterator || force_iterator) {
        ah_lua_iterator_t *it = iterator_new(L, c);
        int nret = iterator_open(L, c, call, it);
        return call_finish(call, nret); /* the cursor keeps its own copies of the arguments */
    }
    return run_then(L, c, call, "find", work_find, build_find);
}

/* coll:find([filter [, opts]]) -> array of documents | iterator (opts.iterator) | nil, msg, code */
static int coll_find(lua_State *L)
{
    return find_common(L, false);
}

/* coll:find_iter([filter [, opts]]) -> iterator | nil, msg */
static int coll_find_iter(lua_State *L)
{
    return find_common(L, true);
}

static int build_find_one(lua_State *L, collection_t *c, call_t *call)
{
    char err[AH_ERRLEN];
    if (!call->ok) {
        return push_failure(L, c, "find_one", &call->error);
    }
    if (call->ndocs == 0) {
        lua_pushnil(L);
    } else if (ahm_bson_push(L, call->docs[0], false, err, sizeof(err)) != AH_OK) {
        return push_decode_failure(L, "find_one", err);
    }
    return 1;
}

/* coll:find_one([filter [, opts]]) -> document | nil (none) | nil, msg, code */
static int coll_find_one(lua_State *L)
{
    collection_t *c = check_collection(L);
    call_t *call = call_new(L, 3);
    bool iterator;
    find_args(L, call, true, &iterator);
    return run_then(L, c, call, "find_one", work_find, build_find_one);
}

/* ---- iterators ----------------------------------------------------------------------------- */

/* Pushes the next document, or nil at the end, or nil, msg, code on failure; the iterator is
 * closed at the end and on failure. The iterator (a userdata with __gc) owns its client, so a
 * Lua error while the document is pushed loses nothing. */
static int iterator_step(lua_State *L, ah_lua_iterator_t *it)
{
    if (it->cursor == NULL) {
        lua_pushnil(L);
        return 1;
    }
    const bson_t *doc;
    char err[AH_ERRLEN];
    if (mongoc_cursor_next(it->cursor, &doc)) {
        if (ahm_bson_push(L, doc, false, err, sizeof(err)) == AH_OK) {
            return 1;
        }
        iterator_close(it);
        return push_decode_failure(L, "find_iter", err);
    }
    bson_error_t error;
    bool failed = mongoc_cursor_error(it->cursor, &error);
    iterator_close(it);
    if (failed) {
        lua_pushnil(L);
        lua_pushfstring(L, "agent.mongo: find_iter failed: %s", error.message);
        lua_pushinteger(L, (lua_Integer)error.code);
        return 3;
    }
    lua_pushnil(L);
    return 1;
}

/* it:next() -> document | nil (end) | nil, msg, code */
static int iterator_next(lua_State *L)
{
    return iterator_step(L, luaL_checkudata(L, 1, MT_ITERATOR));
}

/* it() (a generic for calls this): like next(), but a failure raises so a loop cannot end
 * silently on a lost connection. */
static int iterator_call(lua_State *L)
{
    int n = iterator_step(L, luaL_checkudata(L, 1, MT_ITERATOR));
    if (n > 1) {
        lua_pop(L, n - 2); /* the code: the message is raised */
        return lua_error(L);
    }
    return n;
}

static int iterator_close_l(lua_State *L)
{
    iterator_close(luaL_checkudata(L, 1, MT_ITERATOR));
    return 0;
}

/* ---- writes -------------------------------------------------------------------------------- */

/* Encodes a document to insert into out, with an _id first (a new ObjectId when the table has
 * none). */
static void insert_doc_encode(lua_State *L, int arg, bson_t *out, char *err, size_t errlen,
                              bool *ok)
{
    lua_getfield(L, arg, "_id");
    bool has_id = !lua_isnil(L, -1);
    lua_pop(L, 1);
    if (!has_id) {
        bson_oid_t oid;
        bson_oid_init(&oid, NULL);
        BSON_APPEND_OID(out, "_id", &oid);
    }
    *ok = ahm_bson_from_lua(L, arg, out, err, errlen) == AH_OK;
}

static void push_id_of(lua_State *L, const bson_t *doc)
{
    bson_iter_t iter;
    char err[AH_ERRLEN];
    if (!bson_iter_init_find(&iter, doc, "_id") ||
        ahm_bson_push_value(L, &iter, err, sizeof(err)) != AH_OK) {
        lua_pushnil(L);
    }
}

static void work_insert_one(mongoc_collection_t *coll, call_t *call)
{
    call->ok = mongoc_collection_insert_one(coll, call->args[0], NULL, NULL, &call->error);
}

static int build_insert_one(lua_State *L, collection_t *c, call_t *call)
{
    if (!call->ok) {
        return push_failure(L, c, "insert_one", &call->error);
    }
    lua_createtable(L, 0, 1);
    push_id_of(L, call->args[0]);
    lua_setfield(L, -2, "inserted_id");
    return 1;
}

/* coll:insert_one(doc) -> {inserted_id = id} | nil, msg, code */
static int coll_insert_one(lua_State *L)
{
    collection_t *c = check_collection(L);
    call_t *call = call_new(L, 2);
    if (lua_type(L, 2) != LUA_TTABLE) {
        char what[64];
        snprintf(what, sizeof(what), "document: table expected, got %s", arg_typename(L, call, 2));
        raise_arg(L, 2, what);
    }
    bson_t *doc = call_arg_new(L, call);
    char err[AH_ERRLEN];
    bool ok;
    insert_doc_encode(L, 2, doc, err, sizeof(err), &ok);
    if (!ok) {
        char what[AH_ERRLEN + 16];
        snprintf(what, sizeof(what), "document: %s", err);
        raise_arg(L, 2, what);
    }
    return run_then(L, c, call, "insert_one", work_insert_one, build_insert_one);
}

static void work_insert_many(mongoc_collection_t *coll, call_t *call)
{
    bson_t reply;
    call->ok = mongoc_collection_insert_many(coll, (const bson_t **)call->docs, call->ndocs,
                                             call->args[0], &reply, &call->error);
    call->reply = bson_copy(&reply);
    bson_destroy(&reply);
}

static int build_insert_many(lua_State *L, collection_t *c, call_t *call)
{
    if (!call->ok) {
        return push_failure(L, c, "insert_many", &call->error);
    }
    lua_createtable(L, 0, 2);
    lua_pushnumber(L, (lua_Number)reply_int(call->reply, "insertedCount"));
    lua_setfield(L, -2, "inserted");
    lua_createtable(L, (int)call->ndocs, 0);
    for (size_t i = 0; i < call->ndocs; i++) {
        push_id_of(L, call->docs[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "inserted_ids");
    return 1;
}

/* coll:insert_many(docs [, {ordered = true}]) -> {inserted = n, inserted_ids = {...}} */
static int coll_insert_many(lua_State *L)
{
    static const char *const allowed[] = {"ordered", NULL};
    collection_t *c = check_collection(L);
    check_table(L, 2);
    call_t *call = call_new(L, 3);
    check_opts(L, 3, allowed);
    bool ordered = opt_bool(L, 3, "ordered", true);
    size_t n = lua_objlen(L, 2);
    if (n == 0) {
        method_argerror(L, 2, "expected a non-empty array of documents");
    }
    if (n > 100000) {
        method_argerror(L, 2, "at most 100000 documents per call");
    }
    char err[AH_ERRLEN] = "";
    for (size_t i = 0; i < n; i++) {
        bson_t *doc = bson_new();
        if (!call_add_doc(call, doc)) {
            return luaL_error(L, "agent.mongo: insert_many: out of memory");
        }
        lua_rawgeti(L, 2, (int)(i + 1));
        bool ok = lua_type(L, -1) == LUA_TTABLE;
        if (ok) {
            insert_doc_encode(L, lua_gettop(L), doc, err, sizeof(err), &ok);
        } else {
            snprintf(err, sizeof(err), "not a table");
        }
        lua_pop(L, 1);
        if (!ok) {
            char what[AH_ERRLEN + 64];
            snprintf(what, sizeof(what), "document %d: %s", (int)i + 1, err);
            return method_argerror(L, 2, what);
        }
    }
    bson_t *opts = call_arg_new(L, call);
    BSON_APPEND_BOOL(opts, "ordered", ordered);
    return run_then(L, c, call, "insert_many", work_insert_many, build_insert_many);
}

typedef enum { UPDATE_ONE, UPDATE_MANY, REPLACE_ONE } update_kind_t;

static void work_update(mongoc_collection_t *coll, call_t *call)
{
    bson_t reply;
    const bson_t *filter = call->args[0], *update = call->args[1], *opts = call->args[2];
    if (call->flags == UPDATE_ONE) {
        call->ok = mongoc_collection_update_one(coll, filter, update, opts, &reply, &call->error);
    } else if (call->flags == UPDATE_MANY) {
        call->ok = mongoc_collection_update_many(coll, filter, update, opts, &reply, &call->error);
    } else {
        call->ok = mongoc_collection_replace_one(coll, filter, update, opts, &reply, &call->error);
    }
    call->reply = bson_copy(&reply);
    bson_destroy(&reply);
}

static int build_update(lua_State *L, collection_t *c, call_t *call)
{
    if (!call->ok) {
        return push_failure(L, c, call->op, &call->error);
    }
    lua_createtable(L, 0, 3);
    lua_pushnumber(L, (lua_Number)reply_int(call->reply, "matchedCount"));
    lua_setfield(L, -2, "matched");
    lua_pushnumber(L, (lua_Number)reply_int(call->reply, "modifiedCount"));
    lua_setfield(L, -2, "modified");
    set_reply_value(L, call->reply, "upsertedId", "upserted_id");
    return 1;
}

/* update_one/update_many/replace_one(filter, update [, {upsert = bool}])
 * -> {matched = n, modified = n, upserted_id = id|nil} | nil, msg, code */
static int update_common(lua_State *L, update_kind_t kind)
{
    static const char *const allowed[] = {"upsert", NULL};
    static const char *const names[] = {"update_one", "update_many", "replace_one"};
    collection_t *c = check_collection(L);
    call_t *call = call_new(L, 4);
    call->flags = (int)kind;
    doc_arg(L, call, 2, false, "filter");
    doc_arg(L, call, 3, false, "update");
    check_opts(L, 4, allowed);
    bson_t *opts = call_arg_new(L, call);
    if (opt_bool(L, 4, "upsert", false)) {
        BSON_APPEND_BOOL(opts, "upsert", true);
    }
    return run_then(L, c, call, names[kind], work_update, build_update);
}

static int coll_update_one(lua_State *L)
{
    return update_common(L, UPDATE_ONE);
}

static int coll_update_many(lua_State *L)
{
    return update_common(L, UPDATE_MANY);
}

static int coll_replace_one(lua_State *L)
{
    return update_common(L, REPLACE_ONE);
}

static void work_delete(mongoc_collection_t *coll, call_t *call)
{
    bson_t reply;
    call->ok = call->flags
                   ? mongoc_collection_delete_many(coll, call->args[0], NULL, &reply, &call->error)
                   : mongoc_collection_delete_one(coll, call->args[0], NULL, &reply, &call->error);
    call->reply = bson_copy(&reply);
    bson_destroy(&reply);
}

static int build_delete(lua_State *L, collection_t *c, call_t *call)
{
    if (!call->ok) {
        return push_failure(L, c, call->op, &call->error);
    }
    lua_createtable(L, 0, 1);
    lua_pushnumber(L, (lua_Number)reply_int(call->reply, "deletedCount"));
    lua_setfield(L, -2, "deleted");
    return 1;
}

/* delete_one/delete_many(filter) -> {deleted = n} | nil, msg, code */
static int delete_common(lua_State *L, bool many)
{
    const char *op = many ? "delete_many" : "delete_one";
    collection_t *c = check_collection(L);
    call_t *call = call_new(L, 2);
    call->flags = many;
    doc_arg(L, call, 2, false, "filter");
    return run_then(L, c, call, op, work_delete, build_delete);
}

static int coll_delete_one(lua_State *L)
{
    return delete_common(L, false);
}

static int coll_delete_many(lua_State *L)
{
    return delete_common(L, true);
}

/* Sets the sub-document extra[key] with set() on fam, if present. */
static void fam_set_sub(mongoc_find_and_modify_opts_t *fam, const bson_t *extra, const char *key,
                        bool (*set)(mongoc_find_and_modify_opts_t *, const bson_t *))
{
    bson_iter_t iter;
    if (bson_iter_init_find(&iter, extra, key) && BSON_ITER_HOLDS_DOCUMENT(&iter)) {
        uint32_t len;
        const uint8_t *data;
        bson_t sub;
        bson_iter_document(&iter, &len, &data);
        if (bson_init_static(&sub, data, len)) {
            set(fam, &sub);
        }
    }
}

static void work_find_one_and_update(mongoc_collection_t *coll, call_t *call)
{
    mongoc_find_and_modify_opts_t *fam = mongoc_find_and_modify_opts_new();
    mongoc_find_and_modify_opts_set_update(fam, call->args[1]);
    mongoc_find_and_modify_opts_set_flags(fam, (mongoc_find_and_modify_flags_t)call->flags);
    fam_set_sub(fam, call->args[2], "sort", mongoc_find_and_modify_opts_set_sort);
    fam_set_sub(fam, call->args[2], "projection", mongoc_find_and_modify_opts_set_fields);
    bson_t reply;
    call->ok =
        mongoc_collection_find_and_modify_with_opts(coll, call->args[0], fam, &reply, &call->error);
    mongoc_find_and_modify_opts_destroy(fam);
    call->reply = bson_copy(&reply);
    bson_destroy(&reply);
}

static int build_find_one_and_update(lua_State *L, collection_t *c, call_t *call)
{
    bson_iter_t iter;
    char err[AH_ERRLEN];
    if (!call->ok) {
        return push_failure(L, c, "find_one_and_update", &call->error);
    }
    if (call->reply != NULL && bson_iter_init_find(&iter, call->reply, "value") &&
        BSON_ITER_HOLDS_DOCUMENT(&iter)) {
        if (ahm_bson_push_value(L, &iter, err, sizeof(err)) != AH_OK) {
            return push_decode_failure(L, "find_one_and_update", err);
        }
    } else {
        lua_pushnil(L);
    }
    return 1;
}

/* coll:find_one_and_update(filter, update [, {sort, upsert, new, projection}])
 * -> the document (old one unless new = true) | nil (no match) | nil, msg, code */
static int coll_find_one_and_update(lua_State *L)
{
    static const char *const allowed[] = {"sort", "upsert", "new", "projection", NULL};
    collection_t *c = check_collection(L);
    call_t *call = call_new(L, 4);
    doc_arg(L, call, 2, false, "filter");
    doc_arg(L, call, 3, false, "update");
    check_opts(L, 4, allowed);
    bson_t *extra = call_arg_new(L, call); /* holds the sort and projection documents */
    opt_doc(L, 4, "sort", extra, "sort");
    opt_doc(L, 4, "projection", extra, "projection");
    int flags = MONGOC_FIND_AND_MODIFY_NONE;
    if (opt_bool(L, 4, "upsert", false)) {
        flags |= MONGOC_FIND_AND_MODIFY_UPSERT;
    }
    if (opt_bool(L, 4, "new", false)) {
        flags |= MONGOC_FIND_AND_MODIFY_RETURN_NEW;
    }
    call->flags = flags;
    return run_then(L, c, call, "find_one_and_update", work_find_one_and_update,
                    build_find_one_and_update);
}

static void work_count(mongoc_collection_t *coll, call_t *call)
{
    call->count = mongoc_collection_count_documents(coll, call->args[0], call->args[1], NULL, NULL,
                                                    &call->error);
    call->ok = call->count >= 0;
}

static bool work_reads_only(const call_t *call)
{
    return call->work == work_find || call->work == work_count;
}

static int build_count(lua_State *L, collection_t *c, call_t *call)
{
    if (!call->ok) {
        return push_failure(L, c, "count", &call->error);
    }
    lua_pushnumber(L, (lua_Number)call->count);
    return 1;
}

/* coll:count([filter [, {limit, skip}]]) -> n | nil, msg, code */
static int coll_count(lua_State *L)
{
    static const char *const allowed[] = {"limit", "skip", NULL};
    collection_t *c = check_collection(L);
    call_t *call = call_new(L, 3);
    doc_arg(L, call, 2, true, "filter");
    check_opts(L, 3, allowed);
    bson_t *opts = call_arg_new(L, call);
    int64_t limit = opt_count(L, 3, "limit");
    int64_t skip = opt_count(L, 3, "skip");
    if (limit > 0) {
        BSON_APPEND_INT64(opts, "limit", limit);
    }
    if (skip > 0) {
        BSON_APPEND_INT64(opts, "skip", skip);
    }
    return run_then(L, c, call, "count", work_count, build_count);
}

static void work_aggregate(mongoc_collection_t *coll, call_t *call)
{
    drain_cursor(
        mongoc_collection_aggregate(coll, MONGOC_QUERY_NONE, call->args[0], call->args[1], NULL),
        call);
}

static int build_aggregate(lua_State *L, collection_t *c, call_t *call)
{
    return build_docs(L, c, "aggregate", call);
}

/* coll:aggregate(pipeline [, {batch_size}]) -> array of documents | nil, msg, code */
static int coll_aggregate(lua_State *L)
{
    static const char *const allowed[] = {"batch_size", NULL};
    collection_t *c = check_collection(L);
    check_table(L, 2);
    call_t *call = call_new(L, 3);
    bson_t *pipeline = call_arg_new(L, call);
    char err[AH_ERRLEN];
    if (ahm_bson_array_from_lua(L, 2, pipeline, err, sizeof(err)) != AH_OK) {
        raise_arg(L, 2, err);
    }
    check_opts(L, 3, allowed);
    bson_t *opts = call_arg_new(L, call);
    int64_t batch = opt_count(L, 3, "batch_size");
    if (batch > 0 && batch <= INT32_MAX) {
        BSON_APPEND_INT32(opts, "batchSize", (int32_t)batch);
    }
    return run_then(L, c, call, "aggregate", work_aggregate, build_aggregate);
}

static void work_write_command(mongoc_collection_t *coll, call_t *call)
{
    bson_t reply;
    call->ok =
        mongoc_collection_write_command_with_opts(coll, call->args[1], NULL, &reply, &call->error);
    bson_destroy(&reply);
}

/* The index name, read back from the command (call->args[1]). */
static int build_create_index(lua_State *L, collection_t *c, call_t *call)
{
    if (!call->ok) {
        return push_failure(L, c, "create_index", &call->error);
    }
    bson_iter_t iter;
    if (bson_iter_init(&iter, call->args[1]) &&
        bson_iter_find_descendant(&iter, "indexes.0.name", &iter) && BSON_ITER_HOLDS_UTF8(&iter)) {
        lua_pushstring(L, bson_iter_utf8(&iter, NULL));
    } else {
        lua_pushliteral(L, "index");
    }
    return 1;
}

/* coll:create_index(keys [, opts]) -> index name | nil, msg, code. keys: a table or ordered
 * pairs; opts: index options under their MongoDB names (name, unique, sparse,
 * expireAfterSeconds, partialFilterExpression, ...). */
static int coll_create_index(lua_State *L)
{
    collection_t *c = check_collection(L);
    check_table(L, 2);
    call_t *call = call_new(L, 3);
    bson_t *keys = call_arg_new(L, call);
    char err[AH_ERRLEN];
    if (ahm_bson_from_lua_ordered(L, 2, keys, err, sizeof(err)) != AH_OK) {
        raise_arg(L, 2, err);
    }
    if (bson_count_keys(keys) == 0) {
        raise_arg(L, 2, "at least one key expected");
    }
    if (!lua_isnoneornil(L, 3)) {
        check_table(L, 3);
    }
    const char *name = NULL;
    if (lua_istable(L, 3)) {
        lua_getfield(L, 3, "name");
        if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING) {
            raise_arg(L, 3, "option 'name' must be a string");
        }
        name = lua_tostring(L, -1); /* kept alive by the options table */
        lua_pop(L, 1);
    }
    bson_t *cmd = call_arg_new(L, call);
    BSON_APPEND_UTF8(cmd, "createIndexes", c->name);
    bson_t indexes, index;
    BSON_APPEND_ARRAY_BEGIN(cmd, "indexes", &indexes);
    BSON_APPEND_DOCUMENT_BEGIN(&indexes, "0", &index);
    BSON_APPEND_DOCUMENT(&index, "key", keys);
    if (name == NULL) {
        char *auto_name = mongoc_collection_keys_to_index_string(keys);
        BSON_APPEND_UTF8(&index, "name", auto_name != NULL ? auto_name : "index");
        bson_free(auto_name);
    }
    int rc = lua_istable(L, 3) ? ahm_bson_from_lua(L, 3, &index, err, sizeof(err)) : AH_OK;
    bson_append_document_end(&indexes, &index);
    bson_append_array_end(cmd, &indexes);
    if (rc != AH_OK) {
        raise_arg(L, 3, err);
    }
    return run_then(L, c, call, "create_index", work_write_command, build_create_index);
}

static int coll_tostring(lua_State *L)
{
    collection_t *c = check_collection(L);
    lua_pushfstring(L, "agent.mongo.collection(%s.%s)", c->db, c->name);
    return 1;
}

/* ---- the module ---------------------------------------------------------------------------- */

static bool valid_name(const char *s, size_t len, size_t max, const char *forbidden)
{
    return len > 0 && len <= max && memchr(s, '\0', len) == NULL && strpbrk(s, forbidden) == NULL;
}

/* mongo.collection(name [, db]) -> collection object (no I/O). */
static int l_collection(lua_State *L)
{
    ahm_lua_t *m = lua_touserdata(L, lua_upvalueindex(1));
    size_t len;
    const char *name = luaL_checklstring(L, 1, &len);
    luaL_argcheck(L, valid_name(name, len, COLLECTION_NAME_MAX, "$"), 1,
                  "expected a collection name (1-255 bytes, no '$' or NUL)");
    size_t dblen = 0;
    const char *db = luaL_optlstring(L, 2, NULL, &dblen);
    luaL_argcheck(L, db == NULL || valid_name(db, dblen, DB_NAME_MAX, "/\\. \"$"), 2,
                  "expected a database name (1-63 characters, none of /\\. \"$)");
    collection_t *c = lua_newuserdata(L, sizeof(*c));
    c->m = m;
    ah_strlcpy(c->db, db != NULL ? db : (m != NULL ? m->database : "agenthost"), sizeof(c->db));
    ah_strlcpy(c->name, name, sizeof(c->name));
    luaL_getmetatable(L, MT_COLLECTION);
    lua_setmetatable(L, -2);
    return 1;
}

/* mongo.configured() -> true when a deployment is configured (no I/O). */
static int l_configured(lua_State *L)
{
    lua_pushboolean(L, pool_of(lua_touserdata(L, lua_upvalueindex(1))) != NULL);
    return 1;
}

static int iterator_gc(lua_State *L)
{
    ah_lua_iterator_t *it = lua_touserdata(L, 1);
    if (it != NULL) {
        iterator_close(it);
    }
    return 0;
}

/* Replaces every method in the table at idx by `return finish(<name>(...))` with the C method
 * as the upvalue <name> (so that method_argerror finds the method's name): a Lua frame, which
 * survives the method's yield. Stack: [-0, +0]. */
static void wrap_methods(lua_State *L, int idx)
{
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        const char *name = lua_tostring(L, -2);
        lua_pushfstring(L,
                        "local finish, %s = ...\nreturn function(...) return finish(%s(...)) end",
                        name, name);
        if (luaL_loadbuffer(L, lua_tostring(L, -1), lua_objlen(L, -1), "=agent.mongo") != 0) {
            lua_error(L);
        }
        lua_remove(L, -2);              /* the source */
        lua_pushcfunction(L, l_finish); /* finish */
        lua_pushvalue(L, -3);           /* the C method */
        lua_call(L, 2, 1);
        lua_pushvalue(L, -3); /* the key */
        lua_insert(L, -2);
        lua_rawset(L, idx);
        lua_pop(L, 1); /* the C method; the key stays for lua_next */
    }
}

int ahm_lua_open(lua_State *L)
{
    ahm_lua_t *m = lua_touserdata(L, lua_upvalueindex(1));
    ahm_bson_init(L);

    static const luaL_Reg methods[] = {
        {"find", coll_find},
        {"find_iter", coll_find_iter},
        {"find_one", coll_find_one},
        {"insert_one", coll_insert_one},
        {"insert_many", coll_insert_many},
        {"update_one", coll_update_one},
        {"update_many", coll_update_many},
        {"replace_one", coll_replace_one},
        {"delete_one", coll_delete_one},
        {"delete_many", coll_delete_many},
        {"find_one_and_update", coll_find_one_and_update},
        {"count", coll_count},
        {"aggregate", coll_aggregate},
        {"create_index", coll_create_index},
        {NULL, NULL},
    };
    if (luaL_newmetatable(L, MT_COLLECTION)) {
        lua_newtable(L);
        luaL_register(L, NULL, methods);
        wrap_methods(L, lua_gettop(L));
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, coll_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, MT_ITERATOR)) {
        static const luaL_Reg it_methods[] = {
            {"next", iterator_next}, {"close", iterator_close_l}, {NULL, NULL}};
        lua_newtable(L);
        luaL_register(L, NULL, it_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, iterator_call);
        lua_setfield(L, -2, "__call");
        lua_pushcfunction(L, iterator_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, MT_CALL)) {
        lua_pushcfunction(L, call_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);

    lua_newtable(L);
    ahm_bson_register(L);
    lua_pushlightuserdata(L, m);
    lua_pushcclosure(L, l_collection, 1);
    lua_setfield(L, -2, "collection");
    lua_pushlightuserdata(L, m);
    lua_pushcclosure(L, l_configured, 1);
    lua_setfield(L, -2, "configured");
    lua_pushstring(L, m != NULL ? m->database : "agenthost");
    lua_setfield(L, -2, "database");
    return 1;
}
