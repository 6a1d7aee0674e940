/* Implementation of ahm_bson.h. Lua values that stand for a BSON type carry one of our
 * metatables (its `__bson` field names the type: "array", "document", "date", "oid", "raw");
 * the encoder tells them by the metatable itself, since a script can forge the field. 64-bit
 * integers are LuaJIT int64_t cdata, created and typed through two small FFI helpers kept in the
 * registry; their payload is read and written through lua_topointer(), which LuaJIT resolves to the
 * cdata's data. */
#include "ahm_bson.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#define MT_ARRAY "agent.mongo.array"
#define MT_DOCUMENT "agent.mongo.document"
#define MT_DATE "agent.mongo.date"
#define MT_OID "agent.mongo.oid"
#define MT_RAW "agent.mongo.raw"

/* lua_type() of a LuaJIT FFI cdata value (not in lua.h). */
#define LUA_TCDATA_JIT 10

/* The largest magnitude below which an int64 decodes as a plain number (exact in a double). */
#define INT64_EXACT_LIMIT (INT64_C(1) << 53)

/* Registry keys (light userdata) of the FFI helpers. */
static const char key_int64_new = 'n';  /* function() -> a new int64_t cdata (0) */
static const char key_int64_kind = 'k'; /* function(v) -> 1 int64_t, 2 uint64_t, 0 other */

/* An opaque BSON value: a tiny document {"v": value}, copied byte for byte. */
typedef struct {
    uint32_t len;
    uint8_t data[];
} raw_value_t;

static const char *const ffi_helpers =
    "local ffi = require 'ffi'\n"
    "local istype, new = ffi.istype, ffi.new\n"
    "local i64, u64 = ffi.typeof('int64_t'), ffi.typeof('uint64_t')\n"
    "return function() return new(i64) end,\n"
    "  function(v) if istype(i64, v) then return 1 elseif istype(u64, v) then return 2 end\n"
    "  return 0 end\n";

/* ---- small helpers ------------------------------------------------------------------------- */

static void set_err(char *err, size_t errlen, const char *key, const char *what)
{
    if (key != NULL && key[0] != '\0') {
        snprintf(err, errlen, "key '%s': %s", key, what);
    } else {
        snprintf(err, errlen, "%s", what);
    }
}

/* The kind ("array", "document", "date", "oid", "raw") of the value at idx, decided by its
 * metatable being one of ours (the same table, not a look-alike: a script can forge a `__bson`
 * field on any metatable), or NULL. A userdata of kind oid or raw must still be checked with
 * oid_at/raw_at (debug.setmetatable can put our metatable on any userdata). Stack: [-0, +0]. */
static const char *bson_kind(lua_State *L, int idx)
{
    static const char *const kinds[][2] = {
        {MT_ARRAY, "array"}, {MT_DOCUMENT, "document"}, {MT_DATE, "date"},
        {MT_OID, "oid"},     {MT_RAW, "raw"},
    };
    if (!lua_getmetatable(L, idx)) {
        return NULL;
    }
    const char *kind = NULL;
    for (size_t i = 0; kind == NULL && i < sizeof(kinds) / sizeof(kinds[0]); i++) {
        luaL_getmetatable(L, kinds[i][0]);
        if (lua_rawequal(L, -1, -2)) {
            kind = kinds[i][1];
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return kind;
}

/* The ObjectId in the userdata at idx, or NULL if it is not one of ours of the right size. */
static bson_oid_t *oid_at(lua_State *L, int idx)
{
    const char *kind = lua_type(L, idx) == LUA_TUSERDATA ? bson_kind(L, idx) : NULL;
    if (kind == NULL || strcmp(kind, "oid") != 0 || lua_objlen(L, idx) < sizeof(bson_oid_t)) {
        return NULL;
    }
    return lua_touserdata(L, idx);
}

/* The raw value in the userdata at idx, or NULL if it is not one of ours holding its bytes. */
static raw_value_t *raw_at(lua_State *L, int idx)
{
    const char *kind = lua_type(L, idx) == LUA_TUSERDATA ? bson_kind(L, idx) : NULL;
    size_t size = lua_objlen(L, idx);
    if (kind == NULL || strcmp(kind, "raw") != 0 || size < sizeof(raw_value_t)) {
        return NULL;
    }
    raw_value_t *raw = lua_touserdata(L, idx);
    return raw->len <= size - sizeof(raw_value_t) ? raw : NULL;
}

/* oid_at/raw_at for the metamethods: raises "bad argument" instead of returning NULL. */
static bson_oid_t *check_oid(lua_State *L, int idx)
{
    bson_oid_t *oid = oid_at(L, idx);
    if (oid == NULL) {
        luaL_typerror(L, idx, "ObjectId");
    }
    return oid;
}

static raw_value_t *check_raw(lua_State *L, int idx)
{
    raw_value_t *raw = raw_at(L, idx);
    if (raw == NULL) {
        luaL_typerror(L, idx, "BSON value");
    }
    return raw;
}

static void push_registry(lua_State *L, const void *key)
{
    lua_pushlightuserdata(L, (void *)key);
    lua_rawget(L, LUA_REGISTRYINDEX);
}

/* Pushes a new int64_t cdata holding v. Stack: [-0, +1]. */
static void push_int64(lua_State *L, int64_t v)
{
    push_registry(L, &key_int64_new);
    lua_call(L, 0, 1);
    int64_t *slot = (int64_t *)lua_topointer(L, -1);
    *slot = v;
}

/* Reads the cdata at idx as an int64. 0, or AH_EINVAL when it is not an int64_t/uint64_t or a
 * uint64_t beyond the int64 range. */
static int read_int64(lua_State *L, int idx, int64_t *out, const char **why)
{
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    push_registry(L, &key_int64_kind);
    lua_pushvalue(L, idx);
    if (lua_pcall(L, 1, 1, 0) != 0) {
        lua_pop(L, 1);
        *why = "cannot inspect a cdata value";
        return AH_EINVAL;
    }
    int kind = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    const void *p = lua_topointer(L, idx);
    if (kind == 1) {
        memcpy(out, p, sizeof(*out));
        return AH_OK;
    }
    if (kind == 2) {
        uint64_t u;
        memcpy(&u, p, sizeof(u));
        if (u > (uint64_t)INT64_MAX) {
            *why = "uint64_t value does not fit in a BSON int64";
            return AH_EINVAL;
        }
        *out = (int64_t)u;
        return AH_OK;
    }
    *why = "only int64_t/uint64_t cdata can be stored (use agent.mongo.int64)";
    return AH_EINVAL;
}

static raw_value_t *push_raw_bytes(lua_State *L, const uint8_t *data, uint32_t len)
{
    raw_value_t *raw = lua_newuserdata(L, sizeof(raw_value_t) + len);
    raw->len = len;
    memcpy(raw->data, data, len);
    luaL_getmetatable(L, MT_RAW);
    lua_setmetatable(L, -2);
    return raw;
}

/* Pushes the value under iter as a raw userdata. Stack: [-0, +1]. */
static void push_raw(lua_State *L, const bson_iter_t *iter)
{
    bson_t tmp;
    bson_init(&tmp);
    bson_append_iter(&tmp, "v", 1, iter);
    push_raw_bytes(L, bson_get_data(&tmp), tmp.len);
    bson_destroy(&tmp);
}

/* An iterator positioned on the raw value's "v". */
static bool raw_iter(const raw_value_t *raw, bson_iter_t *iter)
{
    return bson_iter_init_from_data(iter, raw->data, raw->len) && bson_iter_next(iter);
}

/* ---- encoding ------------------------------------------------------------------------------ */

static int append_value(lua_State *L, int idx, bson_t *out, const char *key, int keylen, int depth,
                        char *err, size_t errlen);

/* Table shapes for a plain (unmarked) table. */
typedef enum { SHAPE_EMPTY, SHAPE_SEQUENCE, SHAPE_MAP, SHAPE_BAD_KEY } shape_t;

/* Classifies the plain table at idx: a sequence 1..n (n > 0), a map with string keys, or neither
 * (*bad_key_type names the offending key's type). Stack: [-0, +0]. */
static shape_t table_shape(lua_State *L, int idx, size_t *n_out, const char **bad_key_type)
{
    size_t n = lua_objlen(L, idx);
    size_t count = 0;
    bool has_string = false;
    bool has_other = false;
    bool all_sequence = true;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        count++;
        int kt = lua_type(L, -2);
        if (kt == LUA_TSTRING) {
            has_string = true;
        } else {
            has_other = true;
            lua_Number k = kt == LUA_TNUMBER ? lua_tonumber(L, -2) : 0;
            if (!(kt == LUA_TNUMBER && k >= 1 && k <= (lua_Number)n && k == floor(k))) {
                all_sequence = false;
                *bad_key_type = lua_typename(L, kt);
            }
        }
        lua_pop(L, 1);
    }
    *n_out = n;
    if (count == 0) {
        return SHAPE_EMPTY;
    }
    if (!has_string && all_sequence && count == n) {
        return SHAPE_SEQUENCE;
    }
    if (!has_other) {
        return SHAPE_MAP;
    }
    if (*bad_key_type == NULL) {
        *bad_key_type = "number"; /* sequence keys mixed with string keys */
    }
    return SHAPE_BAD_KEY;
}

/* Appends the fields of the table at idx (string keys only) to out. */
static int append_fields(lua_State *L, int idx, bson_t *out, int depth, char *err, size_t errlen)
{
    if (!lua_checkstack(L, 4)) {
        set_err(err, errlen, NULL, "Lua stack overflow while encoding");
        return AH_EINVAL;
    }
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        if (lua_type(L, -2) != LUA_TSTRING) {
            char what[96];
            snprintf(what, sizeof(what), "document keys must be strings (got a %s key)",
                     luaL_typename(L, -2));
            lua_pop(L, 2);
            set_err(err, errlen, NULL, what);
            return AH_EINVAL;
        }
        size_t keylen;
        const char *key = lua_tolstring(L, -2, &keylen);
        if (memchr(key, '\0', keylen) != NULL || keylen > INT32_MAX) {
            lua_pop(L, 2);
            set_err(err, errlen, NULL, "document keys must not contain NUL bytes");
            return AH_EINVAL;
        }
        if (!bson_utf8_validate(key, keylen, false)) { /* libbson and the server refuse them */
            lua_pop(L, 2);
            set_err(err, errlen, NULL, "document keys must be valid UTF-8");
            return AH_EINVAL;
        }
        int rc = append_value(L, lua_gettop(L), out, key, (int)keylen, depth, err, errlen);
        lua_pop(L, 1);
        if (rc != AH_OK) {
            lua_pop(L, 1);
            return rc;
        }
    }
    return AH_OK;
}

/* Appends t[1..n] of the table at idx to out with keys "0".."n-1". */
static int append_elements(lua_State *L, int idx, size_t n, bson_t *out, int depth, char *err,
                           size_t errlen)
{
    if (!lua_checkstack(L, 4)) {
        set_err(err, errlen, NULL, "Lua stack overflow while encoding");
        return AH_EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        const char *key;
        char buf[16];
        size_t keylen = bson_uint32_to_string((uint32_t)i, &key, buf, sizeof(buf));
        lua_rawgeti(L, idx, (int)(i + 1));
        int rc = append_value(L, lua_gettop(L), out, key, (int)keylen, depth, err, errlen);
        lua_pop(L, 1);
        if (rc != AH_OK) {
            return rc;
        }
    }
    return AH_OK;
}

static int append_table(lua_State *L, int idx, bson_t *out, const char *key, int keylen, int depth,
                        char *err, size_t errlen)
{
    if (depth >= AHM_BSON_MAX_DEPTH) {
        set_err(err, errlen, key, "nesting deeper than 100 levels (a cycle?)");
        return AH_EINVAL;
    }
    const char *kind = bson_kind(L, idx);
    if (kind != NULL && strcmp(kind, "date") == 0) {
        lua_pushliteral(L, "ms");
        lua_rawget(L, idx); /* raw: a metamethod must not raise in here */
        lua_Number ms = lua_tonumber(L, -1);
        bool is_number = lua_type(L, -1) == LUA_TNUMBER;
        lua_pop(L, 1);
        int64_t ms_int;
        if (!is_number || ah_double_to_int64(ms, &ms_int) != AH_OK) {
            set_err(err, errlen, key,
                    "a date needs a field ms: a number of milliseconds in the int64 range");
            return AH_EINVAL;
        }
        bson_append_date_time(out, key, keylen, ms_int);
        return AH_OK;
    }
    size_t n = 0;
    const char *bad_key_type = NULL;
    shape_t shape = table_shape(L, idx, &n, &bad_key_type);
    bool as_array;
    if (kind != NULL && strcmp(kind, "array") == 0) {
        if (shape == SHAPE_MAP || shape == SHAPE_BAD_KEY) {
            set_err(err, errlen, key,
                    "an array must be a sequence 1..n without holes or other keys");
            return AH_EINVAL;
        }
        as_array = true;
    } else if (kind != NULL && strcmp(kind, "document") == 0) {
        if (shape == SHAPE_SEQUENCE || shape == SHAPE_BAD_KEY) {
            set_err(err, errlen, key, "document keys must be strings");
            return AH_EINVAL;
        }
        as_array = false;
    } else {
        if (shape == SHAPE_BAD_KEY) {
            char what[128];
            snprintf(what, sizeof(what),
                     "a table must be a sequence 1..n (array) or have only string keys "
                     "(document); found a %s key",
                     bad_key_type);
            set_err(err, errlen, key, what);
            return AH_EINVAL;
        }
        as_array = shape == SHAPE_SEQUENCE;
    }
    bson_t child;
    int rc;
    if (as_array) {
        bson_append_array_begin(out, key, keylen, &child);
        rc = append_elements(L, idx, n, &child, depth + 1, err, errlen);
        bson_append_array_end(out, &child);
    } else {
        bson_append_document_begin(out, key, keylen, &child);
        rc = append_fields(L, idx, &child, depth + 1, err, errlen);
        bson_append_document_end(out, &child);
    }
    return rc;
}

static void append_number(bson_t *out, const char *key, int keylen, lua_Number n)
{
    if (isfinite(n) && n == floor(n) && !(n == 0 && signbit(n))) {
        if (n >= (lua_Number)INT32_MIN && n <= (lua_Number)INT32_MAX) {
            bson_append_int32(out, key, keylen, (int32_t)n);
            return;
        }
        if (n >= -9223372036854775808.0 && n < 9223372036854775808.0) {
            bson_append_int64(out, key, keylen, (int64_t)n);
            return;
        }
    }
    bson_append_double(out, key, keylen, n);
}

static int append_value(lua_State *L, int idx, bson_t *out, const char *key, int keylen, int depth,
                        char *err, size_t errlen)
{
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        bson_append_null(out, key, keylen);
        return AH_OK;
    case LUA_TBOOLEAN:
        bson_append_bool(out, key, keylen, lua_toboolean(L, idx));
        return AH_OK;
    case LUA_TNUMBER:
        append_number(out, key, keylen, lua_tonumber(L, idx));
        return AH_OK;
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        if (!bson_utf8_validate(s, len, true)) {
            set_err(err, errlen, key, "string is not valid UTF-8 (use agent.mongo.binary)");
            return AH_EINVAL;
        }
        bson_append_utf8(out, key, keylen, s, (int)len);
        return AH_OK;
    }
    case LUA_TTABLE:
        return append_table(L, idx, out, key, keylen, depth, err, errlen);
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) { /* agent.mongo.null, cjson.null */
            bson_append_null(out, key, keylen);
            return AH_OK;
        }
        set_err(err, errlen, key, "cannot store a light userdata");
        return AH_EINVAL;
    case LUA_TUSERDATA: {
        const bson_oid_t *oid = oid_at(L, idx);
        if (oid != NULL) {
            bson_append_oid(out, key, keylen, oid);
            return AH_OK;
        }
        const raw_value_t *raw = raw_at(L, idx);
        if (raw != NULL) {
            bson_iter_t iter;
            if (!raw_iter(raw, &iter)) {
                set_err(err, errlen, key, "corrupt raw BSON value");
                return AH_EINVAL;
            }
            bson_append_iter(out, key, keylen, &iter);
            return AH_OK;
        }
        set_err(err, errlen, key, "cannot store this userdata");
        return AH_EINVAL;
    }
    case LUA_TCDATA_JIT: {
        int64_t v;
        const char *why = NULL;
        if (read_int64(L, idx, &v, &why) != AH_OK) {
            set_err(err, errlen, key, why);
            return AH_EINVAL;
        }
        bson_append_int64(out, key, keylen, v);
        return AH_OK;
    }
    default: {
        char what[64];
        snprintf(what, sizeof(what), "cannot store a %s", luaL_typename(L, idx));
        set_err(err, errlen, key, what);
        return AH_EINVAL;
    }
    }
}

int ahm_bson_append_lua(lua_State *L, int idx, bson_t *out, const char *key, char *err,
                        size_t errlen)
{
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    return append_value(L, idx, out, key, (int)strlen(key), 0, err, errlen);
}

int ahm_bson_from_lua(lua_State *L, int idx, bson_t *out, char *err, size_t errlen)
{
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    if (lua_type(L, idx) != LUA_TTABLE) {
        snprintf(err, errlen, "expected a table (document), got %s", luaL_typename(L, idx));
        return AH_EINVAL;
    }
    const char *kind = bson_kind(L, idx);
    if (kind != NULL && strcmp(kind, "document") != 0) {
        snprintf(err, errlen, "expected a document, got a %s", kind);
        return AH_EINVAL;
    }
    return append_fields(L, idx, out, 1, err, errlen);
}

/* True if the table at idx is a non-empty sequence of {string, value} pairs. */
static bool is_pair_list(lua_State *L, int idx)
{
    size_t n = lua_objlen(L, idx);
    if (n == 0 || bson_kind(L, idx) != NULL) {
        return false;
    }
    lua_rawgeti(L, idx, 1);
    bool pair = lua_type(L, -1) == LUA_TTABLE && lua_objlen(L, -1) == 2;
    if (pair) {
        lua_rawgeti(L, -1, 1);
        pair = lua_type(L, -1) == LUA_TSTRING;
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return pair;
}

int ahm_bson_from_lua_ordered(lua_State *L, int idx, bson_t *out, char *err, size_t errlen)
{
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    if (lua_type(L, idx) != LUA_TTABLE || !is_pair_list(L, idx)) {
        return ahm_bson_from_lua(L, idx, out, err, errlen);
    }
    size_t n = lua_objlen(L, idx);
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, (int)i);
        int pair = lua_gettop(L);
        bool ok = lua_type(L, pair) == LUA_TTABLE && lua_objlen(L, pair) == 2;
        if (ok) {
            lua_rawgeti(L, pair, 1);
            ok = lua_type(L, -1) == LUA_TSTRING;
        } else {
            lua_pushnil(L);
        }
        if (!ok) {
            lua_pop(L, 2);
            snprintf(err, errlen, "element %d of an ordered list must be a pair {name, value}",
                     (int)i);
            return AH_EINVAL;
        }
        size_t keylen;
        const char *key = lua_tolstring(L, -1, &keylen);
        if (memchr(key, '\0', keylen) != NULL) {
            lua_pop(L, 2);
            snprintf(err, errlen, "keys must not contain NUL bytes");
            return AH_EINVAL;
        }
        if (!bson_utf8_validate(key, keylen, false)) {
            lua_pop(L, 2);
            snprintf(err, errlen, "keys must be valid UTF-8");
            return AH_EINVAL;
        }
        lua_rawgeti(L, pair, 2);
        int rc = append_value(L, lua_gettop(L), out, key, (int)keylen, 1, err, errlen);
        lua_pop(L, 3);
        if (rc != AH_OK) {
            return rc;
        }
    }
    return AH_OK;
}

int ahm_bson_array_from_lua(lua_State *L, int idx, bson_t *out, char *err, size_t errlen)
{
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    if (lua_type(L, idx) != LUA_TTABLE) {
        snprintf(err, errlen, "expected a table (array), got %s", luaL_typename(L, idx));
        return AH_EINVAL;
    }
    size_t n = 0;
    const char *bad = NULL;
    shape_t shape = table_shape(L, idx, &n, &bad);
    if (shape != SHAPE_SEQUENCE && shape != SHAPE_EMPTY) {
        snprintf(err, errlen, "expected a sequence 1..n (array)");
        return AH_EINVAL;
    }
    return append_elements(L, idx, n, out, 1, err, errlen);
}

/* ---- decoding ------------------------------------------------------------------------------ */

static int push_iter_value(lua_State *L, const bson_iter_t *iter, int depth, char *err,
                           size_t errlen);

/* Pushes the document or array that iter (already initialised on it) walks. */
static int push_container(lua_State *L, bson_iter_t *iter, bool as_array, int depth, char *err,
                          size_t errlen)
{
    if (depth >= AHM_BSON_MAX_DEPTH) {
        snprintf(err, errlen, "document nesting deeper than %d levels", AHM_BSON_MAX_DEPTH);
        return AH_EINVAL;
    }
    if (!lua_checkstack(L, 4)) {
        snprintf(err, errlen, "Lua stack overflow while decoding");
        return AH_EINVAL;
    }
    lua_newtable(L);
    int table = lua_gettop(L);
    int index = 0;
    while (bson_iter_next(iter)) {
        if (as_array) {
            lua_pushinteger(L, ++index);
        } else {
            lua_pushlstring(L, bson_iter_key(iter), bson_iter_key_len(iter));
        }
        if (push_iter_value(L, iter, depth, err, errlen) != AH_OK) {
            lua_settop(L, table - 1);
            return AH_EINVAL;
        }
        lua_rawset(L, table);
    }
    if (iter->err_off != 0) { /* the walk stopped at a corrupt element, not at the end */
        lua_settop(L, table - 1);
        snprintf(err, errlen, "malformed BSON document");
        return AH_EINVAL;
    }
    if (as_array) {
        luaL_getmetatable(L, MT_ARRAY);
        lua_setmetatable(L, table);
    }
    return AH_OK;
}

static int push_iter_value(lua_State *L, const bson_iter_t *iter, int depth, char *err,
                           size_t errlen)
{
    switch (bson_iter_type(iter)) {
    case BSON_TYPE_DOUBLE:
        lua_pushnumber(L, bson_iter_double(iter));
        return AH_OK;
    case BSON_TYPE_UTF8: {
        uint32_t len;
        const char *s = bson_iter_utf8(iter, &len);
        lua_pushlstring(L, s, len);
        return AH_OK;
    }
    case BSON_TYPE_DOCUMENT:
    case BSON_TYPE_ARRAY: {
        bson_iter_t child;
        if (!bson_iter_recurse(iter, &child)) {
            snprintf(err, errlen, "malformed BSON document");
            return AH_EINVAL;
        }
        return push_container(L, &child, bson_iter_type(iter) == BSON_TYPE_ARRAY, depth + 1, err,
                              errlen);
    }
    case BSON_TYPE_OID: {
        bson_oid_t *oid = lua_newuserdata(L, sizeof(bson_oid_t));
        bson_oid_copy(bson_iter_oid(iter), oid);
        luaL_getmetatable(L, MT_OID);
        lua_setmetatable(L, -2);
        return AH_OK;
    }
    case BSON_TYPE_BOOL:
        lua_pushboolean(L, bson_iter_bool(iter));
        return AH_OK;
    case BSON_TYPE_DATE_TIME:
        lua_createtable(L, 0, 1);
        lua_pushnumber(L, (lua_Number)bson_iter_date_time(iter));
        lua_setfield(L, -2, "ms");
        luaL_getmetatable(L, MT_DATE);
        lua_setmetatable(L, -2);
        return AH_OK;
    case BSON_TYPE_NULL:
        lua_pushlightuserdata(L, NULL);
        return AH_OK;
    case BSON_TYPE_INT32:
        lua_pushnumber(L, (lua_Number)bson_iter_int32(iter));
        return AH_OK;
    case BSON_TYPE_INT64: {
        int64_t v = bson_iter_int64(iter);
        if (v > -INT64_EXACT_LIMIT && v < INT64_EXACT_LIMIT) {
            lua_pushnumber(L, (lua_Number)v);
        } else {
            push_int64(L, v);
        }
        return AH_OK;
    }
    default: /* decimal128, binary, regex, timestamp, min/max key, code, symbol, ... */
        push_raw(L, iter);
        return AH_OK;
    }
}

int ahm_bson_push(lua_State *L, const bson_t *doc, bool as_array, char *err, size_t errlen)
{
    bson_iter_t iter;
    if (!bson_iter_init(&iter, doc)) {
        snprintf(err, errlen, "malformed BSON document");
        return AH_EINVAL;
    }
    return push_container(L, &iter, as_array, 0, err, errlen);
}

int ahm_bson_push_value(lua_State *L, const bson_iter_t *iter, char *err, size_t errlen)
{
    return push_iter_value(L, iter, 0, err, errlen);
}

/* ---- value constructors and metamethods -------------------------------------------------- */

static const char *raw_type_name(bson_type_t t)
{
    switch (t) {
    case BSON_TYPE_DECIMAL128:
        return "decimal128";
    case BSON_TYPE_BINARY:
        return "binary";
    case BSON_TYPE_REGEX:
        return "regex";
    case BSON_TYPE_TIMESTAMP:
        return "timestamp";
    case BSON_TYPE_MINKEY:
        return "minkey";
    case BSON_TYPE_MAXKEY:
        return "maxkey";
    case BSON_TYPE_CODE:
        return "javascript";
    case BSON_TYPE_CODEWSCOPE:
        return "javascript_with_scope";
    case BSON_TYPE_SYMBOL:
        return "symbol";
    case BSON_TYPE_UNDEFINED:
        return "undefined";
    case BSON_TYPE_DBPOINTER:
        return "dbpointer";
    default:
        return "unknown";
    }
}

/* mongo.array([t]) / mongo.document([t]): marks t (or a new table) and returns it. */
static int mark_table(lua_State *L, const char *mt)
{
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 0);
        lua_newtable(L);
    } else {
        luaL_checktype(L, 1, LUA_TTABLE);
        lua_settop(L, 1);
        const char *kind = bson_kind(L, 1);
        if (kind == NULL && lua_getmetatable(L, 1)) {
            luaL_argerror(L, 1, "table already has a metatable");
        }
    }
    luaL_getmetatable(L, mt);
    lua_setmetatable(L, 1);
    return 1;
}

static int l_array(lua_State *L)
{
    return mark_table(L, MT_ARRAY);
}

static int l_document(lua_State *L)
{
    return mark_table(L, MT_DOCUMENT);
}

static int l_is_array(lua_State *L)
{
    const char *kind = lua_type(L, 1) == LUA_TTABLE ? bson_kind(L, 1) : NULL;
    lua_pushboolean(L, kind != NULL && strcmp(kind, "array") == 0);
    return 1;
}

/* mongo.oid([hex]): the ObjectId written as 24 hex digits, or a new one. */
static int l_oid(lua_State *L)
{
    const char *hex = luaL_optstring(L, 1, NULL);
    if (hex != NULL && !bson_oid_is_valid(hex, strlen(hex))) {
        return luaL_argerror(L, 1, "expected 24 hexadecimal digits");
    }
    bson_oid_t *oid = lua_newuserdata(L, sizeof(bson_oid_t));
    if (hex != NULL) {
        bson_oid_init_from_string(oid, hex);
    } else {
        bson_oid_init(oid, NULL);
    }
    luaL_getmetatable(L, MT_OID);
    lua_setmetatable(L, -2);
    return 1;
}

static int oid_tostring(lua_State *L)
{
    char hex[25];
    bson_oid_to_string(check_oid(L, 1), hex);
    lua_pushstring(L, hex);
    return 1;
}

static int oid_eq(lua_State *L)
{
    bson_oid_t *a = check_oid(L, 1);
    bson_oid_t *b = check_oid(L, 2);
    lua_pushboolean(L, bson_oid_equal(a, b));
    return 1;
}

/* oid:time() -> the creation time embedded in the ObjectId, seconds since the epoch. */
static int oid_time(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)bson_oid_get_time_t(check_oid(L, 1)));
    return 1;
}

/* mongo.date([ms]): a BSON date, ms since the epoch (default: now). */
static int l_date(lua_State *L)
{
    lua_Number ms =
        lua_isnoneornil(L, 1) ? (lua_Number)(ah_now_us() / 1000) : luaL_checknumber(L, 1);
    luaL_argcheck(L, isfinite(ms), 1, "must be a finite number of milliseconds");
    lua_createtable(L, 0, 1);
    lua_pushnumber(L, floor(ms));
    lua_setfield(L, -2, "ms");
    luaL_getmetatable(L, MT_DATE);
    lua_setmetatable(L, -2);
    return 1;
}

static lua_Number date_ms(lua_State *L, int idx)
{
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_getfield(L, idx, "ms");
    lua_Number ms = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return ms;
}

static int date_tostring(lua_State *L)
{
    lua_Number ms = date_ms(L, 1);
    int64_t ms_int;
    /* ISO 8601 for years 0-9999; otherwise (or for a NaN) the number itself. */
    if (ah_double_to_int64(ms, &ms_int) != AH_OK || ms_int < AH_TIMESTAMP_MIN_US / 1000 ||
        ms_int > AH_TIMESTAMP_MAX_US / 1000) {
        char text[64];
        snprintf(text, sizeof(text), "date(%.17g ms, out of range)", (double)ms);
        lua_pushstring(L, text);
        return 1;
    }
    char ts[AH_TIMESTAMP_LEN];
    ah_format_timestamp(ms_int * 1000, ts);
    lua_pushstring(L, ts);
    return 1;
}

static int date_eq(lua_State *L)
{
    lua_pushboolean(L, date_ms(L, 1) == date_ms(L, 2));
    return 1;
}

static int date_lt(lua_State *L)
{
    lua_pushboolean(L, date_ms(L, 1) < date_ms(L, 2));
    return 1;
}

static int date_le(lua_State *L)
{
    lua_pushboolean(L, date_ms(L, 1) <= date_ms(L, 2));
    return 1;
}

/* mongo.int64(x): x a number (integral), a decimal string or an int64_t/uint64_t cdata. */
static int l_int64(lua_State *L)
{
    int64_t v = 0;
    switch (lua_type(L, 1)) {
    case LUA_TNUMBER: {
        lua_Number n = lua_tonumber(L, 1);
        luaL_argcheck(L, n == floor(n) && n >= -9223372036854775808.0 && n < 9223372036854775808.0,
                      1, "must be an integer in the int64 range");
        v = (int64_t)n;
        break;
    }
    case LUA_TSTRING: {
        const char *s = lua_tostring(L, 1);
        char *end = NULL;
        errno = 0;
        long long parsed = strtoll(s, &end, 10);
        luaL_argcheck(L, errno == 0 && end != s && *end == '\0', 1,
                      "must be a decimal integer in the int64 range");
        v = (int64_t)parsed;
        break;
    }
    case LUA_TCDATA_JIT: {
        const char *why = NULL;
        if (read_int64(L, 1, &v, &why) != AH_OK) {
            return luaL_argerror(L, 1, why);
        }
        break;
    }
    default:
        return luaL_typerror(L, 1, "number, string or int64 cdata");
    }
    push_int64(L, v);
    return 1;
}

/* mongo.decimal128("1.25"): a Decimal128 value (opaque; tostring gives the decimal string). */
static int l_decimal128(lua_State *L)
{
    const char *s = luaL_checkstring(L, 1);
    bson_decimal128_t dec;
    if (!bson_decimal128_from_string(s, &dec) ||
        (dec.high == 0x7c00000000000000ULL && strcmp(s, "NaN") != 0)) {
        return luaL_argerror(L, 1, "not a decimal number");
    }
    bson_t tmp;
    bson_init(&tmp);
    bson_append_decimal128(&tmp, "v", 1, &dec);
    push_raw_bytes(L, bson_get_data(&tmp), tmp.len);
    bson_destroy(&tmp);
    return 1;
}

/* mongo.to_json(t) -> string: the document (or array) t as relaxed Extended JSON, the way libbson
 * writes it (ObjectId {"$oid": ...}, Date {"$date": "<ISO 8601>"}, int64 as a plain number,
 * Decimal128 {"$numberDecimal": ...}, ...). t is any table agent.mongo accepts as a document or
 * an array (a sequence without a mark is an array); anything else is misuse and raises. */
static int l_to_json(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *kind = bson_kind(L, 1);
    bool as_array =
        (kind != NULL && strcmp(kind, "array") == 0) || (kind == NULL && lua_objlen(L, 1) > 0);
    char err[AH_ERRLEN];
    bson_t doc;
    bson_init(&doc);
    int rc = as_array ? ahm_bson_append_lua(L, 1, &doc, "", err, sizeof(err))
                      : ahm_bson_from_lua(L, 1, &doc, err, sizeof(err));
    if (rc != AH_OK) {
        bson_destroy(&doc);
        return luaL_argerror(L, 1, err);
    }
    size_t len = 0;
    char *json = bson_as_relaxed_extended_json(&doc, &len);
    bson_destroy(&doc);
    if (json == NULL) {
        return luaL_argerror(L, 1, "cannot be written as JSON (invalid UTF-8?)");
    }
    const char *text = json;
    if (as_array) {
        /* The array was written as the one field of {"": [...]}: keep the [...] only. libbson
         * writes that document as '{ "" : ' + the array + ' }'. */
        static const char prefix[] = "{ \"\" : ";
        if (len >= sizeof(prefix) + 1 && strncmp(json, prefix, sizeof(prefix) - 1) == 0) {
            text = json + sizeof(prefix) - 1;
            len -= (sizeof(prefix) - 1) + 2;
        }
    }
    lua_pushlstring(L, text, len);
    bson_free(json);
    return 1;
}

/* mongo.binary(data [, subtype]): a BSON binary value (subtype 0 by default). */
static int l_binary(lua_State *L)
{
    size_t len;
    const char *data = luaL_checklstring(L, 1, &len);
    lua_Integer subtype = luaL_optinteger(L, 2, 0);
    luaL_argcheck(L, subtype >= 0 && subtype <= 255 && subtype != BSON_SUBTYPE_BINARY_DEPRECATED, 2,
                  "must be a binary subtype 0-255 other than 2");
    luaL_argcheck(L, len <= INT32_MAX - 64, 1, "too large");
    bson_t tmp;
    bson_init(&tmp);
    bson_append_binary(&tmp, "v", 1, (bson_subtype_t)subtype, (const uint8_t *)data, (uint32_t)len);
    push_raw_bytes(L, bson_get_data(&tmp), tmp.len);
    bson_destroy(&tmp);
    return 1;
}

static int raw_tostring(lua_State *L)
{
    raw_value_t *raw = check_raw(L, 1);
    bson_iter_t iter;
    if (!raw_iter(raw, &iter)) {
        lua_pushliteral(L, "raw(corrupt)");
        return 1;
    }
    switch (bson_iter_type(&iter)) {
    case BSON_TYPE_DECIMAL128: {
        bson_decimal128_t dec;
        char s[BSON_DECIMAL128_STRING];
        bson_iter_decimal128(&iter, &dec);
        bson_decimal128_to_string(&dec, s);
        lua_pushstring(L, s);
        return 1;
    }
    default: {
        /* The canonical extended JSON of {"v": value}, without the wrapper. */
        bson_t doc;
        bson_init_static(&doc, raw->data, raw->len);
        size_t len;
        char *json = bson_as_canonical_extended_json(&doc, &len);
        if (json == NULL) {
            lua_pushstring(L, raw_type_name(bson_iter_type(&iter)));
            return 1;
        }
        const char *colon = strchr(json, ':');
        const char *start = colon != NULL ? colon + 2 : json;
        size_t n = strlen(start);
        lua_pushlstring(L, start, n >= 2 ? n - 2 : n); /* drop the closing " }" */
        bson_free(json);
        return 1;
    }
    }
}

static int raw_eq(lua_State *L)
{
    raw_value_t *a = check_raw(L, 1);
    raw_value_t *b = check_raw(L, 2);
    lua_pushboolean(L, a->len == b->len && memcmp(a->data, b->data, a->len) == 0);
    return 1;
}

/* raw.type -> the BSON type name; raw.data / raw.subtype for binary values. */
static int raw_index(lua_State *L)
{
    raw_value_t *raw = check_raw(L, 1);
    const char *field = luaL_checkstring(L, 2);
    bson_iter_t iter;
    if (!raw_iter(raw, &iter)) {
        return 0;
    }
    bson_type_t type = bson_iter_type(&iter);
    if (strcmp(field, "type") == 0) {
        lua_pushstring(L, raw_type_name(type));
        return 1;
    }
    if (type == BSON_TYPE_BINARY && (strcmp(field, "data") == 0 || strcmp(field, "subtype") == 0)) {
        bson_subtype_t subtype;
        uint32_t len;
        const uint8_t *data;
        bson_iter_binary(&iter, &subtype, &len, &data);
        if (field[0] == 'd') {
            lua_pushlstring(L, (const char *)data, len);
        } else {
            lua_pushinteger(L, (lua_Integer)subtype);
        }
        return 1;
    }
    return 0;
}

/* mongo.type(v) -> the BSON type v is stored as: "double", "int32", "int64", "string", "bool",
 * "null", "document", "array", "objectid", "date", or a raw value's type. */
static int l_type(lua_State *L)
{
    luaL_checkany(L, 1);
    const char *name = NULL;
    switch (lua_type(L, 1)) {
    case LUA_TNIL:
        name = "null";
        break;
    case LUA_TBOOLEAN:
        name = "bool";
        break;
    case LUA_TNUMBER: {
        bson_t tmp;
        bson_init(&tmp);
        append_number(&tmp, "v", 1, lua_tonumber(L, 1));
        bson_iter_t iter;
        bson_iter_init_find(&iter, &tmp, "v");
        bson_type_t t = bson_iter_type(&iter);
        name = t == BSON_TYPE_INT32 ? "int32" : t == BSON_TYPE_INT64 ? "int64" : "double";
        bson_destroy(&tmp);
        break;
    }
    case LUA_TSTRING:
        name = "string";
        break;
    case LUA_TLIGHTUSERDATA:
        name = lua_touserdata(L, 1) == NULL ? "null" : NULL;
        break;
    case LUA_TCDATA_JIT:
        name = "int64";
        break;
    case LUA_TTABLE: {
        const char *kind = bson_kind(L, 1);
        if (kind != NULL && strcmp(kind, "date") == 0) {
            name = "date";
        } else if (kind != NULL && strcmp(kind, "array") == 0) {
            name = "array";
        } else if (kind != NULL && strcmp(kind, "document") == 0) {
            name = "document";
        } else {
            size_t n;
            const char *bad = NULL;
            shape_t shape = table_shape(L, 1, &n, &bad);
            name = shape == SHAPE_SEQUENCE ? "array" : shape == SHAPE_BAD_KEY ? NULL : "document";
        }
        break;
    }
    case LUA_TUSERDATA: {
        if (oid_at(L, 1) != NULL) {
            name = "objectid";
        } else if (raw_at(L, 1) != NULL) {
            lua_getfield(L, 1, "type");
            return 1;
        }
        break;
    }
    default:
        break;
    }
    if (name == NULL) {
        lua_pushnil(L);
    } else {
        lua_pushstring(L, name);
    }
    return 1;
}

/* ---- setup --------------------------------------------------------------------------------- */

/* Creates metatable `name` with `__bson = kind` and the given metamethods. Stack: [-0, +0]. */
static void new_metatable(lua_State *L, const char *name, const char *kind, const luaL_Reg *fns)
{
    luaL_newmetatable(L, name);
    lua_pushstring(L, kind);
    lua_setfield(L, -2, "__bson");
    lua_pushliteral(L, "agent.mongo");
    lua_setfield(L, -2, "__metatable_owner");
    if (fns != NULL) {
        luaL_register(L, NULL, fns);
    }
    lua_pop(L, 1);
}

void ahm_bson_init(lua_State *L)
{
    push_registry(L, &key_int64_new);
    bool done = !lua_isnil(L, -1);
    lua_pop(L, 1);
    if (done) {
        return;
    }
    new_metatable(L, MT_ARRAY, "array", NULL);
    new_metatable(L, MT_DOCUMENT, "document", NULL);
    static const luaL_Reg date_fns[] = {{"__tostring", date_tostring},
                                        {"__eq", date_eq},
                                        {"__lt", date_lt},
                                        {"__le", date_le},
                                        {NULL, NULL}};
    new_metatable(L, MT_DATE, "date", date_fns);
    static const luaL_Reg oid_fns[] = {
        {"__tostring", oid_tostring}, {"__eq", oid_eq}, {NULL, NULL}};
    new_metatable(L, MT_OID, "oid", oid_fns);
    luaL_getmetatable(L, MT_OID);
    lua_newtable(L);
    lua_pushcfunction(L, oid_tostring);
    lua_setfield(L, -2, "hex");
    lua_pushcfunction(L, oid_time);
    lua_setfield(L, -2, "time");
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    static const luaL_Reg raw_fns[] = {
        {"__tostring", raw_tostring}, {"__eq", raw_eq}, {"__index", raw_index}, {NULL, NULL}};
    new_metatable(L, MT_RAW, "raw", raw_fns);

    if (luaL_loadstring(L, ffi_helpers) != 0) {
        lua_error(L);
    }
    lua_call(L, 0, 2);
    lua_pushlightuserdata(L, (void *)&key_int64_kind);
    lua_insert(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_pushlightuserdata(L, (void *)&key_int64_new);
    lua_insert(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

void ahm_bson_register(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"array", l_array},
        {"document", l_document},
        {"is_array", l_is_array},
        {"oid", l_oid},
        {"date", l_date},
        {"int64", l_int64},
        {"binary", l_binary},
        {"decimal128", l_decimal128},
        {"type", l_type},
        {"to_json", l_to_json},
        {NULL, NULL},
    };
    luaL_register(L, NULL, fns);
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "null");
}
