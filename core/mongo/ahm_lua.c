/* agent.mongo inside the MongoDB plugin: the binding behind the core's front in ah_mongo.h
 * (core/ah_mongo.c forwards to the ahm_lua_* functions here). Every collection method follows
 * one shape (STYLE rule 9): check and encode all arguments first (a misuse raises with nothing
 * acquired), then pop a client, run one driver call, push the client back, and turn the reply into
 * Lua values; a runtime failure comes back as nil, message, code. Values are mapped by
 * ahm_bson.c. */
#include "ahm.h"

#include "ahm_bson.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <mongoc/mongoc.h>

#define MT_COLLECTION "agent.mongo.collection"
#define MT_ITERATOR "agent.mongo.iterator"

#define NOT_CONFIGURED "agent.mongo: no MongoDB configured (set AGENT_MONGODB_URI or MONGODB_URI)"
#define DB_NAME_MAX 63
#define COLLECTION_NAME_MAX 255
#define OWN_POOL_TIMEOUT_MS 2000 /* serverSelectionTimeoutMS / connectTimeoutMS defaults */

typedef struct ah_lua_iterator_s ah_lua_iterator_t;

struct ahm_lua_s {
    mongoc_client_pool_t *own_pool;    /* owned, or NULL */
    mongoc_client_pool_t *shared_pool; /* borrowed from the control store, or NULL */
    char database[DB_NAME_MAX + 1];
    ah_lua_iterator_t *iterators; /* open find_iter() iterators (Lua thread only) */
};

/* A collection object: a name, not a connection (clients are popped per call). */
typedef struct {
    ahm_lua_t *m; /* may be NULL: not configured */
    char db[DB_NAME_MAX + 1];
    char name[COLLECTION_NAME_MAX + 1];
} collection_t;

/* An open find_iter() cursor; holds a pool client until it ends or is closed. */
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
        const char *timeouts[] = {MONGOC_URI_SERVERSELECTIONTIMEOUTMS, MONGOC_URI_CONNECTTIMEOUTMS};
        for (size_t i = 0; i < 2; i++) {
            if (!mongoc_uri_has_option(uri, timeouts[i])) {
                mongoc_uri_set_option_as_int32(uri, timeouts[i], OWN_POOL_TIMEOUT_MS);
            }
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

void ahm_lua_set_shared_pool(ahm_lua_t *m, struct _mongoc_client_pool_t *pool)
{
    if (m != NULL && m->own_pool == NULL) {
        m->shared_pool = pool;
    }
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
    m->shared_pool = NULL;
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
    return m->own_pool != NULL ? m->own_pool : m->shared_pool;
}

/* ---- argument helpers (may raise; call before acquiring anything) ------------------------ */

typedef struct {
    bson_t docs[4];
    int count;
} bson_set_t;

static bson_t *bson_set_new(bson_set_t *set)
{
    bson_t *b = &set->docs[set->count++];
    bson_init(b);
    return b;
}

static void bson_set_destroy(bson_set_t *set)
{
    for (int i = 0; i < set->count; i++) {
        bson_destroy(&set->docs[i]);
    }
    set->count = 0;
}

/* Raises "bad argument #arg to 'fn' (what)" after releasing the set. */
static int raise_arg(lua_State *L, bson_set_t *set, int arg, const char *what)
{
    char msg[AH_ERRLEN];
    ah_strlcpy(msg, what, sizeof(msg));
    bson_set_destroy(set);
    return luaL_argerror(L, arg, msg);
}

/* Encodes the document argument `name` (a table, or nil when optional → {}). Errors read
 * "bad argument #n to 'fn' (<name>: <problem>)". */
static bson_t *doc_arg(lua_State *L, bson_set_t *set, int arg, bool optional, const char *name)
{
    int t = lua_type(L, arg);
    char what[AH_ERRLEN + 64];
    if (!(t == LUA_TTABLE || (optional && t <= LUA_TNIL))) {
        snprintf(what, sizeof(what), "%s: table expected, got %s", name, luaL_typename(L, arg));
        raise_arg(L, set, arg, what);
    }
    bson_t *b = bson_set_new(set);
    char err[AH_ERRLEN];
    if (t == LUA_TTABLE && ahm_bson_from_lua(L, arg, b, err, sizeof(err)) != AH_OK) {
        snprintf(what, sizeof(what), "%s: %s", name, err);
        raise_arg(L, set, arg, what);
    }
    return b;
}

/* Checks that the options argument is nil or a table whose keys are all in allowed. */
static void check_opts(lua_State *L, bson_set_t *set, int arg, const char *const *allowed)
{
    int t = lua_type(L, arg);
    if (t <= LUA_TNIL) {
        return;
    }
    if (t != LUA_TTABLE) {
        char what[64];
        snprintf(what, sizeof(what), "options table expected, got %s", luaL_typename(L, arg));
        raise_arg(L, set, arg, what);
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
            char what[128];
            snprintf(what, sizeof(what), "unknown option '%s'",
                     lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "(not a string)");
            lua_pop(L, 1);
            raise_arg(L, set, arg, what);
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

static bool opt_bool(lua_State *L, bson_set_t *set, int arg, const char *name, bool dflt)
{
    int t = opt_field(L, arg, name);
    bool v = t == LUA_TNIL ? dflt : lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (t != LUA_TNIL && t != LUA_TBOOLEAN) {
        char what[96];
        snprintf(what, sizeof(what), "option '%s' must be a boolean", name);
        raise_arg(L, set, arg, what);
    }
    return v;
}

/* A non-negative integer option; -1 when absent. */
static int64_t opt_count(lua_State *L, bson_set_t *set, int arg, const char *name)
{
    int t = opt_field(L, arg, name);
    lua_Number n = lua_tonumber(L, -1);
    lua_pop(L, 1);
    if (t == LUA_TNIL) {
        return -1;
    }
    if (t != LUA_TNUMBER || !(n >= 0 && n < 9007199254740992.0) || n != (lua_Number)(int64_t)n) {
        char what[96];
        snprintf(what, sizeof(what), "option '%s' must be a non-negative integer", name);
        raise_arg(L, set, arg, what);
    }
    return (int64_t)n;
}

/* Appends opts[name] (a table; ordered pairs allowed) to out under key. */
static void opt_doc(lua_State *L, bson_set_t *set, int arg, const char *name, bson_t *out,
                    const char *key)
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
        raise_arg(L, set, arg, what);
    }
}

static collection_t *check_collection(lua_State *L)
{
    return luaL_checkudata(L, 1, MT_COLLECTION);
}

/* ---- acquiring and results ----------------------------------------------------------------- */

/* Pops a client and opens the collection. false (and pushes nil, NOT_CONFIGURED) when there is
 * no pool. */
static bool acquire(lua_State *L, collection_t *c, mongoc_client_pool_t **pool,
                    mongoc_client_t **client, mongoc_collection_t **coll)
{
    *pool = pool_of(c->m);
    if (*pool == NULL) {
        return false;
    }
    *client = mongoc_client_pool_pop(*pool);
    *coll = mongoc_client_get_collection(*client, c->db, c->name);
    return true;
}

static void release(mongoc_client_pool_t *pool, mongoc_client_t *client, mongoc_collection_t *coll)
{
    mongoc_collection_destroy(coll);
    mongoc_client_pool_push(pool, client);
}

static int push_not_configured(lua_State *L)
{
    lua_pushnil(L);
    lua_pushliteral(L, NOT_CONFIGURED);
    return 2;
}

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
    if (bson_iter_init_find(&iter, reply, key) && BSON_ITER_HOLDS_NUMBER(&iter)) {
        return bson_iter_as_int64(&iter);
    }
    return 0;
}

/* Sets t[field] = the value of reply[key] if present. Stack: [-0, +0]. */
static void set_reply_value(lua_State *L, const bson_t *reply, const char *key, const char *field)
{
    bson_iter_t iter;
    char err[AH_ERRLEN];
    if (bson_iter_init_find(&iter, reply, key) &&
        ahm_bson_push_value(L, &iter, err, sizeof(err)) == AH_OK) {
        lua_setfield(L, -2, field);
    }
}

/* Drains cursor into an array of documents. Stack: [-0, +1] on success; on failure pushes the
 * failure triple and returns its size as a negative number. */
static int drain_cursor(lua_State *L, collection_t *c, const char *op, mongoc_cursor_t *cursor)
{
    lua_newtable(L);
    int table = lua_gettop(L);
    const bson_t *doc;
    int n = 0;
    char err[AH_ERRLEN];
    while (mongoc_cursor_next(cursor, &doc)) {
        if (ahm_bson_push(L, doc, false, err, sizeof(err)) != AH_OK) {
            lua_settop(L, table - 1);
            return -push_decode_failure(L, op, err);
        }
        lua_rawseti(L, table, ++n);
    }
    bson_error_t error;
    if (mongoc_cursor_error(cursor, &error)) {
        lua_settop(L, table - 1);
        return -push_failure(L, c, op, &error);
    }
    luaL_getmetatable(L, "agent.mongo.array");
    lua_setmetatable(L, table);
    return 1;
}

/* ---- find --------------------------------------------------------------------------------- */

static const char *const find_options[] = {"projection", "sort",       "limit", "skip",
                                           "iterator",   "batch_size", NULL};

/* Encodes (filter, opts) of find/find_one/find_iter into set: returns the filter; *opts gets
 * the driver options. */
static bson_t *find_args(lua_State *L, bson_set_t *set, bool one, bson_t **opts, bool *iterator)
{
    bson_t *filter = doc_arg(L, set, 2, true, "filter");
    check_opts(L, set, 3, find_options);
    *opts = bson_set_new(set);
    opt_doc(L, set, 3, "projection", *opts, "projection");
    opt_doc(L, set, 3, "sort", *opts, "sort");
    int64_t skip = opt_count(L, set, 3, "skip");
    int64_t limit = opt_count(L, set, 3, "limit");
    int64_t batch = opt_count(L, set, 3, "batch_size");
    if (skip >= 0) {
        BSON_APPEND_INT64(*opts, "skip", skip);
    }
    if (one) {
        BSON_APPEND_INT64(*opts, "limit", 1);
        BSON_APPEND_BOOL(*opts, "singleBatch", true);
    } else if (limit > 0) {
        BSON_APPEND_INT64(*opts, "limit", limit);
    }
    if (batch > 0 && batch <= INT32_MAX) {
        BSON_APPEND_INT32(*opts, "batchSize", (int32_t)batch);
    }
    *iterator = opt_bool(L, set, 3, "iterator", false);
    return filter;
}

static int push_iterator(lua_State *L, collection_t *c, mongoc_client_pool_t *pool,
                         mongoc_client_t *client, mongoc_collection_t *coll,
                         mongoc_cursor_t *cursor)
{
    ah_lua_iterator_t *it = lua_newuserdata(L, sizeof(*it));
    memset(it, 0, sizeof(*it));
    it->m = c->m;
    it->pool = pool;
    it->client = client;
    it->coll = coll;
    it->cursor = cursor;
    it->next = c->m->iterators;
    if (it->next != NULL) {
        it->next->prev = it;
    }
    c->m->iterators = it;
    luaL_getmetatable(L, MT_ITERATOR);
    lua_setmetatable(L, -2);
    return 1;
}

static int find_common(lua_State *L, bool force_iterator)
{
    collection_t *c = check_collection(L);
    bson_set_t set = {.count = 0};
    bson_t *opts;
    bool iterator;
    bson_t *filter = find_args(L, &set, false, &opts, &iterator);
    iterator = iterator || force_iterator;
    mongoc_client_pool_t *pool;
    mongoc_client_t *client;
    mongoc_collection_t *coll;
    if (!acquire(L, c, &pool, &client, &coll)) {
        bson_set_destroy(&set);
        return push_not_configured(L);
    }
    mongoc_cursor_t *cursor = mongoc_collection_find_with_opts(coll, filter, opts, NULL);
    bson_set_destroy(&set);
    if (iterator) {
        return push_iterator(L, c, pool, client, coll, cursor); /* owns the client now */
    }
    int rc = drain_cursor(L, c, "find", cursor);
    mongoc_cursor_destroy(cursor);
    release(pool, client, coll);
    return rc < 0 ? -rc : rc;
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

/* coll:find_one([filter [, opts]]) -> document | nil (none) | nil, msg, code */
static int coll_find_one(lua_State *L)
{
    collection_t *c = check_collection(L);
    bson_set_t set = {.count = 0};
    bson_t *opts;
    bool iterator;
    bson_t *filter = find_args(L, &set, true, &opts, &iterator);
    mongoc_client_pool_t *pool;
    mongoc_client_t *client;
    mongoc_collection_t *coll;
    if (!acquire(L, c, &pool, &client, &coll)) {
        bson_set_destroy(&set);
        return push_not_configured(L);
    }
    mongoc_cursor_t *cursor = mongoc_collection_find_with_opts(coll, filter, opts, NULL);
    const bson_t *doc;
    int nret = 1;
    char err[AH_ERRLEN];
    bson_error_t error;
    if (mongoc_cursor_next(cursor, &doc)) {
        if (ahm_bson_push(L, doc, false, err, sizeof(err)) != AH_OK) {
            nret = push_decode_failure(L, "find_one", err);
        }
    } else if (mongoc_cursor_error(cursor, &error)) {
        nret = push_failure(L, c, "find_one", &error);
    } else {
        lua_pushnil(L);
    }
    mongoc_cursor_destroy(cursor);
    release(pool, client, coll);
    bson_set_destroy(&set);
    return nret;
}

/* ---- iterators ----------------------------------------------------------------------------- */

/* Pushes the next document, or nil at the end, or nil, msg, code on failure; the iterator is
 * closed at the end and on failure. */
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

/* Encodes a document to insert into out (an empty member of set), with an _id first (a new
 * ObjectId when the table has none). */
static bson_t *insert_doc_arg(lua_State *L, bson_set_t *set, int arg, bson_t *out)
{
    if (lua_type(L, arg) != LUA_TTABLE) {
        char what[64];
        snprintf(what, sizeof(what), "document: table expected, got %s", luaL_typename(L, arg));
        raise_arg(L, set, arg, what);
    }
    lua_getfield(L, arg, "_id");
    bool has_id = !lua_isnil(L, -1);
    lua_pop(L, 1);
    if (!has_id) {
        bson_oid_t oid;
        bson_oid_init(&oid, NULL);
        BSON_APPEND_OID(out, "_id", &oid);
    }
    char err[AH_ERRLEN];
    if (ahm_bson_from_lua(L, arg, out, err, sizeof(err)) != AH_OK) {
        char what[AH_ERRLEN + 16];
        snprintf(what, sizeof(what), "document: %s", err);
        raise_arg(L, set, arg, what); /* destroys out, a member of set */
    }
    return out;
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

/* coll:insert_one(doc) -> {inserted_id = id} | nil, msg, code */
static int coll_insert_one(lua_State *L)
{
    collection_t *c = check_collection(L);
    bson_set_t set = {.count = 0};
    bson_t *doc = insert_doc_arg(L, &set, 2, bson_set_new(&set));
    mongoc_client_pool_t *pool;
    mongoc_client_t *client;
    mongoc_collection_t *coll;
    if (!acquire(L, c, &pool, &client, &coll)) {
        bson_set_destroy(&set);
        return push_not_configured(L);
    }
    bson_error_t error;
    bool ok = mongoc_collection_insert_one(coll, doc, NULL, NULL, &error);
    release(pool, client, coll);
    int nret = 1;
    if (ok) {
        lua_createtable(L, 0, 1);
        push_id_of(L, doc);
        lua_setfield(L, -2, "inserted_id");
    } else {
        nret = push_failure(L, c, "insert_one", &error);
    }
    bson_set_destroy(&set);
    return nret;
}

/* coll:insert_many(docs [, {ordered = true}]) -> {inserted = n, inserted_ids = {...}} */
static int coll_insert_many(lua_State *L)
{
    static const char *const allowed[] = {"ordered", NULL};
    collection_t *c = check_collection(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    bson_set_t set = {.count = 0};
    check_opts(L, &set, 3, allowed);
    bool ordered = opt_bool(L, &set, 3, "ordered", true);
    size_t n = lua_objlen(L, 2);
    luaL_argcheck(L, n > 0, 2, "expected a non-empty array of documents");
    luaL_argcheck(L, n <= 100000, 2, "at most 100000 documents per call");
    bson_t *docs = malloc(n * sizeof(bson_t));
    const bson_t **ptrs = malloc(n * sizeof(bson_t *));
    if (docs == NULL || ptrs == NULL) {
        free(docs);
        free(ptrs);
        return luaL_error(L, "agent.mongo: insert_many: out of memory");
    }
    char err[AH_ERRLEN] = "";
    size_t done = 0;
    for (; done < n; done++) {
        lua_rawgeti(L, 2, (int)(done + 1));
        bson_init(&docs[done]);
        ptrs[done] = &docs[done];
        bool ok = lua_type(L, -1) == LUA_TTABLE;
        if (ok) {
            lua_getfield(L, -1, "_id");
            if (lua_isnil(L, -1)) {
                bson_oid_t oid;
                bson_oid_init(&oid, NULL);
                BSON_APPEND_OID(&docs[done], "_id", &oid);
            }
            lua_pop(L, 1);
            ok = ahm_bson_from_lua(L, -1, &docs[done], err, sizeof(err)) == AH_OK;
        } else {
            snprintf(err, sizeof(err), "not a table");
        }
        lua_pop(L, 1);
        if (!ok) {
            char what[AH_ERRLEN + 64];
            snprintf(what, sizeof(what), "document %d: %s", (int)done + 1, err);
            for (size_t i = 0; i <= done; i++) {
                bson_destroy(&docs[i]);
            }
            free(docs);
            free(ptrs);
            return luaL_argerror(L, 2, what);
        }
    }
    bson_t *opts = bson_set_new(&set);
    BSON_APPEND_BOOL(opts, "ordered", ordered);
    mongoc_client_pool_t *pool;
    mongoc_client_t *client;
    mongoc_collection_t *coll;
    int nret = 1;
    if (!acquire(L, c, &pool, &client, &coll)) {
        nret = push_not_configured(L);
    } else {
        bson_t reply;
        bson_error_t error;
        bool ok = mongoc_collection_insert_many(coll, ptrs, n, opts, &reply, &error);
        release(pool, client, coll);
        if (ok) {
            lua_createtable(L, 0, 2);
            lua_pushnumber(L, (lua_Number)reply_int(&reply, "insertedCount"));
            lua_setfield(L, -2, "inserted");
            lua_createtable(L, (int)n, 0);
            for (size_t i = 0; i < n; i++) {
                push_id_of(L, &docs[i]);
                lua_rawseti(L, -2, (int)i + 1);
            }
            lua_setfield(L, -2, "inserted_ids");
        } else {
            nret = push_failure(L, c, "insert_many", &error);
        }
        bson_destroy(&reply);
    }
    for (size_t i = 0; i < n; i++) {
        bson_destroy(&docs[i]);
    }
    free(docs);
    free(ptrs);
    bson_set_destroy(&set);
    return nret;
}

typedef enum { UPDATE_ONE, UPDATE_MANY, REPLACE_ONE } update_kind_t;

/* update_one/update_many/replace_one(filter, update [, {upsert = bool}])
 * -> {matched = n, modified = n, upserted_id = id|nil} | nil, msg, code */
static int update_common(lua_State *L, update_kind_t kind)
{
    static const char *const allowed[] = {"upsert", NULL};
    static const char *const names[] = {"update_one", "update_many", "replace_one"};
    collection_t *c = check_collection(L);
    bson_set_t set = {.count = 0};
    bson_t *filter = doc_arg(L, &set, 2, false, "filter");
    bson_t *update = doc_arg(L, &set, 3, false, "update");
    check_opts(L, &set, 4, allowed);
    bson_t *opts = bson_set_new(&set);
    if (opt_bool(L, &set, 4, "upsert", false)) {
        BSON_APPEND_BOOL(opts, "upsert", true);
    }
    mongoc_client_pool_t *pool;
    mongoc_client_t *client;
    mongoc_collection_t *coll;
    if (!acquire(L, c, &pool, &client, &coll)) {
        bson_set_destroy(&set);
        return push_not_configured(L);
    }
    bson_t reply;
    bson_error_t error;
    bool ok;
    if (kind == UPDATE_ONE) {
        ok = mongoc_collection_update_one(coll, filter, update, opts, &reply, &error);
    } else if (kind == UPDATE_MANY) {
        ok = mongoc_collection_update_many(coll, filter, update, opts, &reply, &error);
    } else {
        ok = mongoc_collection_replace_one(coll, filter, update, opts, &reply, &error);
    }
    release(pool, client, coll);
    int nret = 1;
    if (ok) {
        lua_createtable(L, 0, 3);
        lua_pushnumber(L, (lua_Number)reply_int(&reply, "matchedCount"));
        lua_setfield(L, -2, "matched");
        lua_pushnumber(L, (lua_Number)reply_int(&reply, "modifiedCount"));
        lua_setfield(L, -2, "modified");
        set_reply_value(L, &reply, "upsertedId", "upserted_id");
    } else {
        nret = push_failure(L, c, names[kind], &error);
    }
    bson_destroy(&reply);
    bson_set_destroy(&set);
    return nret;
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

/* delete_one/delete_many(filter) -> {deleted = n} | nil, msg, code */
static int delete_common(lua_State *L, bool many)
{
    collection_t *c = check_collection(L);
    bson_set_t set = {.count = 0};
    bson_t *filter = doc_arg(L, &set, 2, false, "filter");
    mongoc_client_pool_t *pool;
    mongoc_client_t *client;
    mongoc_collection_t *coll;
    if (!acquire(L, c, &pool, &client, &coll)) {
        bson_set_destroy(&set);
        return push_not_configured(L);
    }
    bson_t reply;
    bson_error_t error;
    bool ok = many ? mongoc_collection_delete_many(coll, filter, NULL, &reply, &error)
                   : mongoc_collection_delete_one(coll, filter, NULL, &reply, &error);
    release(pool, client, coll);
    int nret = 1;
    if (ok) {
        lua_createtable(L, 0, 1);
        lua_pushnumber(L, (lua_Number)reply_int(&reply, "deletedCount"));
        lua_setfield(L, -2, "deleted");
    } else {
        nret = push_failure(L, c, many ? "delete_many" : "delete_one", &error);
    }
    bson_destroy(&reply);
    bson_set_destroy(&set);
    return nret;
}

static int coll_delete_one(lua_State *L)
{
    return delete_common(L, false);
}

static int coll_delete_many(lua_State *L)
{
    return delete_common(L, true);
}

/* coll:find_one_and_update(filter, update [, {sort, upsert, new, projection}])
 * -> the document (old one unless new = true) | nil (no match) | nil, msg, code */
static int coll_find_one_and_update(lua_State *L)
{
    static const char *const allowed[] = {"sort", "upsert", "new", "projection", NULL};
    collection_t *c = check_collection(L);
    bson_set_t set = {.count = 0};
    bson_t *filter = doc_arg(L, &set, 2, false, "filter");
    bson_t *update = doc_arg(L, &set, 3, false, "update");
    check_opts(L, &set, 4, allowed);
    bson_t *extra = bson_set_new(&set); /* holds the sort and projection documents */
    opt_doc(L, &set, 4, "sort", extra, "sort");
    opt_doc(L, &set, 4, "projection", extra, "projection");
    int flags = MONGOC_FIND_AND_MODIFY_NONE;
    if (opt_bool(L, &set, 4, "upsert", false)) {
        flags |= MONGOC_FIND_AND_MODIFY_UPSERT;
    }
    if (opt_bool(L, &set, 4, "new", false)) {
        flags |= MONGOC_FIND_AND_MODIFY_RETURN_NEW;
    }
    mongoc_client_pool_t *pool;
    mongoc_client_t *client;
    mongoc_collection_t *coll;
    if (!acquire(L, c, &pool, &client, &coll)) {
        bson_set_destroy(&set);
        return push_not_configured(L);
    }
    mongoc_find_and_modify_opts_t *fam = mongoc_find_and_modify_opts_new();
    mongoc_find_and_modify_opts_set_update(fam, update);
    mongoc_find_and_modify_opts_set_flags(fam, (mongoc_find_and_modify_flags_t)flags);
    bson_iter_t iter;
    bson_t sub;
    if (bson_iter_init_find(&iter, extra, "sort")) {
        uint32_t len;
        const uint8_t *data;
        bson_iter_document(&iter, &len, &data);
        bson_init_static(&sub, data, len);
        mongoc_find_and_modify_opts_set_sort(fam, &sub);
    }
    if (bson_iter_init_find(&iter, extra, "projection")) {
        uint32_t len;
        const uint8_t *data;
        bson_iter_document(&iter, &len, &data);
        bson_init_static(&sub, data, len);
        mongoc_find_and_modify_opts_set_fields(fam, &sub);
    }
    bson_t reply;
    bson_error_t error;
    bool ok = mongoc_collection_find_and_modify_with_opts(coll, filter, fam, &reply, &error);
    mongoc_find_and_modify_opts_destroy(fam);
    release(pool, client, coll);
    int nret = 1;
    char err[AH_ERRLEN];
    if (!ok) {
        nret = push_failure(L, c, "find_one_and_update", &error);
    } else if (bson_iter_init_find(&iter, &reply, "value") && BSON_ITER_HOLDS_DOCUMENT(&iter)) {
        if (ahm_bson_push_value(L, &iter, err, sizeof(err)) != AH_OK) {
            nret = push_decode_failure(L, "find_one_and_update", err);
        }
    } else {
        lua_pushnil(L);
    }
    bson_destroy(&reply);
    bson_set_destroy(&set);
    return nret;
}

/* coll:count([filter [, {limit, skip}]]) -> n | nil, msg, code */
static int coll_count(lua_State *L)
{
    static const char *const allowed[] = {"limit", "skip", NULL};
    collection_t *c = check_collection(L);
    bson_set_t set = {.count = 0};
    bson_t *filter = doc_arg(L, &set, 2, true, "filter");
    check_opts(L, &set, 3, allowed);
    bson_t *opts = bson_set_new(&set);
    int64_t limit = opt_count(L, &set, 3, "limit");
    int64_t skip = opt_count(L, &set, 3, "skip");
    if (limit > 0) {
        BSON_APPEND_INT64(opts, "limit", limit);
    }
    if (skip > 0) {
        BSON_APPEND_INT64(opts, "skip", skip);
    }
    mongoc_client_pool_t *pool;
    mongoc_client_t *client;
    mongoc_collection_t *coll;
    if (!acquire(L, c, &pool, &client, &coll)) {
        bson_set_destroy(&set);
        return push_not_configured(L);
    }
    bson_error_t error;
    int64_t n = mongoc_collection_count_documents(coll, filter, opts, NULL, NULL, &error);
    release(pool, client, coll);
    bson_set_destroy(&set);
    if (n < 0) {
        return push_failure(L, c, "count", &error);
    }
    lua_pushnumber(L, (lua_Number)n);
    return 1;
}

/* coll:aggregate(pipeline [, {batch_size}]) -> array of documents | nil, msg, code */
static int coll_aggregate(lua_State *L)
{
    static const char *const allowed[] = {"batch_size", NULL};
    collection_t *c = check_collection(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    bson_set_t set = {.count = 0};
    bson_t *pipeline = bson_set_new(&set);
    char err[AH_ERRLEN];
    if (ahm_bson_array_from_lua(L, 2, pipeline, err, sizeof(err)) != AH_OK) {
        raise_arg(L, &set, 2, err);
    }
    check_opts(L, &set, 3, allowed);
    bson_t *opts = bson_set_new(&set);
    int64_t batch = opt_count(L, &set, 3, "batch_size");
    if (batch > 0 && batch <= INT32_MAX) {
        BSON_APPEND_INT32(opts, "batchSize", (int32_t)batch);
    }
    mongoc_client_pool_t *pool;
    mongoc_client_t *client;
    mongoc_collection_t *coll;
    if (!acquire(L, c, &pool, &client, &coll)) {
        bson_set_destroy(&set);
        return push_not_configured(L);
    }
    mongoc_cursor_t *cursor =
        mongoc_collection_aggregate(coll, MONGOC_QUERY_NONE, pipeline, opts, NULL);
    int rc = drain_cursor(L, c, "aggregate", cursor);
    mongoc_cursor_destroy(cursor);
    release(pool, client, coll);
    bson_set_destroy(&set);
    return rc < 0 ? -rc : rc;
}

/* coll:create_index(keys [, opts]) -> index name | nil, msg, code. keys: a table or ordered
 * pairs; opts: index options under their MongoDB names (name, unique, sparse,
 * expireAfterSeconds, partialFilterExpression, ...). */
static int coll_create_index(lua_State *L)
{
    collection_t *c = check_collection(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    bson_set_t set = {.count = 0};
    bson_t *keys = bson_set_new(&set);
    char err[AH_ERRLEN];
    if (ahm_bson_from_lua_ordered(L, 2, keys, err, sizeof(err)) != AH_OK) {
        raise_arg(L, &set, 2, err);
    }
    if (bson_count_keys(keys) == 0) {
        raise_arg(L, &set, 2, "at least one key expected");
    }
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
    }
    char *auto_name = NULL;
    const char *name = NULL;
    if (lua_istable(L, 3)) {
        lua_getfield(L, 3, "name");
        if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING) {
            raise_arg(L, &set, 3, "option 'name' must be a string");
        }
        name = lua_tostring(L, -1); /* kept alive by the options table */
        lua_pop(L, 1);
    }
    bson_t *cmd = bson_set_new(&set);
    BSON_APPEND_UTF8(cmd, "createIndexes", c->name);
    bson_t indexes, index;
    BSON_APPEND_ARRAY_BEGIN(cmd, "indexes", &indexes);
    BSON_APPEND_DOCUMENT_BEGIN(&indexes, "0", &index);
    BSON_APPEND_DOCUMENT(&index, "key", keys);
    if (name == NULL) {
        auto_name = mongoc_collection_keys_to_index_string(keys);
        BSON_APPEND_UTF8(&index, "name", auto_name != NULL ? auto_name : "index");
    }
    int rc = lua_istable(L, 3) ? ahm_bson_from_lua(L, 3, &index, err, sizeof(err)) : AH_OK;
    bson_append_document_end(&indexes, &index);
    bson_append_array_end(cmd, &indexes);
    if (rc != AH_OK) {
        bson_free(auto_name);
        raise_arg(L, &set, 3, err);
    }
    lua_pushstring(L, name != NULL ? name : (auto_name != NULL ? auto_name : "index"));
    bson_free(auto_name);
    mongoc_client_pool_t *pool;
    mongoc_client_t *client;
    mongoc_collection_t *coll;
    if (!acquire(L, c, &pool, &client, &coll)) {
        bson_set_destroy(&set);
        return push_not_configured(L);
    }
    bson_t reply;
    bson_error_t error;
    bool ok = mongoc_collection_write_command_with_opts(coll, cmd, NULL, &reply, &error);
    release(pool, client, coll);
    bson_destroy(&reply);
    bson_set_destroy(&set);
    if (!ok) {
        return push_failure(L, c, "create_index", &error);
    }
    return 1; /* the name pushed above */
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
