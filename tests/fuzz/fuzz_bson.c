/* libFuzzer target: the BSON <-> Lua mapping of agent.mongo (core/mongo/ahm_bson.c).
 *
 * Even first byte — random BSON -> Lua -> BSON. The rest of the input is taken as a BSON
 * document. A malformed one must decode to an error or a table without crashing. A
 * well-formed one must decode (unless nested deeper than AHM_BSON_MAX_DEPTH) and encode back to
 * an equal document, where "equal" is what a Lua table can carry:
 *   - a document is a set of keys: their order is not kept, and of duplicate keys the last wins;
 *   - an array is its elements in order (its keys "0", "1", ... are not kept);
 *   - int32, int64 and double are Lua numbers: equal by value (NaN equals NaN, -0 stays -0), and
 *     the type may change (3.0 comes back as int32); int64 beyond 2^53 must come back exactly;
 *   - a date's milliseconds go through a Lua number: equal after rounding to a double; a date
 *     that rounds past the int64 range cannot be written back and must be refused cleanly;
 *   - a string that is not valid UTF-8 decodes but must be refused cleanly when written back;
 *   - every other type (decimal128, binary, regex, timestamp, ...) is byte for byte the same.
 *
 * Odd first byte — random Lua values: a small stack program builds values (numbers, strings,
 * tables with any keys, cycles, the agent.mongo constructors, forged `__bson` metatables (with
 * an __index that raises), our own metatables put on other values with debug.setmetatable,
 * newproxy userdata, functions, coroutines). Each value is encoded; the encoder must return 0
 * (and the BSON must be valid and decode again) or AH_EINVAL with a message, never raise, and
 * keep the stack balanced. tostring(), mongo.type() and mongo.to_json() of each value may raise,
 * cleanly. */
#include "ahm_bson.h"
#include "fuzz_input.h"

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXACT_LIMIT (INT64_C(1) << 53)
#define TWO_POW_63 9223372036854775808.0

static lua_State *L_fuzz;

/* Every Lua object its own malloc block, so that AddressSanitizer sees a read past a userdata
 * (LuaJIT's own allocator would hide it inside its arenas). */
static void *system_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    (void)ud;
    (void)osize;
    if (nsize == 0) {
        free(ptr);
        return NULL;
    }
    return realloc(ptr, nsize);
}

static void close_state(void)
{
    lua_close(L_fuzz);
}

/* The process's one Lua state, with the mapping set up and its constructors as global `mongo`. */
static lua_State *fuzz_state(void)
{
    if (L_fuzz != NULL) {
        return L_fuzz;
    }
    lua_State *L = L_fuzz = lua_newstate(system_alloc, NULL);
    if (L == NULL) {
        abort();
    }
    atexit(close_state);
    luaL_openlibs(L);
    ahm_bson_init(L);
    lua_newtable(L);
    ahm_bson_register(L);
    lua_setglobal(L, "mongo");
    return L;
}

static void fail(const char *what, const char *detail)
{
    fprintf(stderr, "fuzz_bson: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    abort();
}

/* ---- equality of two documents, as far as Lua carries them --------------------------------- */

static bool is_number(bson_type_t t)
{
    return t == BSON_TYPE_DOUBLE || t == BSON_TYPE_INT32 || t == BSON_TYPE_INT64;
}

static double number_of(const bson_iter_t *it)
{
    switch (bson_iter_type(it)) {
    case BSON_TYPE_DOUBLE:
        return bson_iter_double(it);
    case BSON_TYPE_INT32:
        return bson_iter_int32(it);
    default:
        return (double)bson_iter_int64(it);
    }
}

/* The value under it as the bytes of {"v": value}: equal values give equal bytes. */
static bool same_bytes(const bson_iter_t *a, const bson_iter_t *b)
{
    bson_t da, db;
    bson_init(&da);
    bson_init(&db);
    bson_append_iter(&da, "v", 1, a);
    bson_append_iter(&db, "v", 1, b);
    bool same = da.len == db.len && memcmp(bson_get_data(&da), bson_get_data(&db), da.len) == 0;
    bson_destroy(&da);
    bson_destroy(&db);
    return same;
}

static bool same_container(const bson_iter_t *a0, const bson_iter_t *b0, bool array);

static bool same_value(const bson_iter_t *a, const bson_iter_t *b)
{
    bson_type_t ta = bson_iter_type(a);
    bson_type_t tb = bson_iter_type(b);
    if (is_number(ta)) {
        if (!is_number(tb)) {
            return false;
        }
        if (ta == BSON_TYPE_INT64) {
            int64_t v = bson_iter_int64(a);
            if (v <= -EXACT_LIMIT || v >= EXACT_LIMIT) {
                return tb == BSON_TYPE_INT64 && bson_iter_int64(b) == v;
            }
        }
        double x = number_of(a);
        double y = number_of(b);
        return (isnan(x) && isnan(y)) || (x == y && signbit(x) == signbit(y));
    }
    if (ta != tb) {
        return false;
    }
    switch (ta) {
    case BSON_TYPE_DATE_TIME: {
        double ms = (double)bson_iter_date_time(a);
        return ms < TWO_POW_63 && bson_iter_date_time(b) == (int64_t)ms;
    }
    case BSON_TYPE_UTF8: {
        uint32_t la, lb;
        const char *sa = bson_iter_utf8(a, &la);
        const char *sb = bson_iter_utf8(b, &lb);
        return la == lb && memcmp(sa, sb, la) == 0;
    }
    case BSON_TYPE_DOCUMENT:
    case BSON_TYPE_ARRAY: {
        bson_iter_t ca, cb;
        return bson_iter_recurse(a, &ca) && bson_iter_recurse(b, &cb) &&
               same_container(&ca, &cb, ta == BSON_TYPE_ARRAY);
    }
    case BSON_TYPE_OID:
        return bson_oid_equal(bson_iter_oid(a), bson_iter_oid(b));
    case BSON_TYPE_BOOL:
        return bson_iter_bool(a) == bson_iter_bool(b);
    case BSON_TYPE_NULL:
        return true;
    default:
        return same_bytes(a, b);
    }
}

/* True if a key equal to the one under it follows it. */
static bool later_duplicate(const bson_iter_t *it)
{
    bson_iter_t rest = *it;
    const char *key = bson_iter_key(it);
    while (bson_iter_next(&rest)) {
        if (strcmp(bson_iter_key(&rest), key) == 0) {
            return true;
        }
    }
    return false;
}

/* a0 and b0: fresh iterators over two containers' children. */
static bool same_container(const bson_iter_t *a0, const bson_iter_t *b0, bool array)
{
    bson_iter_t a = *a0, b = *b0;
    if (array) {
        while (bson_iter_next(&a)) {
            if (!bson_iter_next(&b) || !same_value(&a, &b)) {
                return false;
            }
        }
        return !bson_iter_next(&b);
    }
    size_t keys_a = 0, keys_b = 0;
    while (bson_iter_next(&a)) {
        if (later_duplicate(&a)) {
            continue;
        }
        keys_a++;
        bool found = false;
        b = *b0;
        while (!found && bson_iter_next(&b)) {
            found = strcmp(bson_iter_key(&a), bson_iter_key(&b)) == 0;
        }
        if (!found || !same_value(&a, &b)) {
            return false;
        }
    }
    b = *b0;
    while (bson_iter_next(&b)) {
        keys_b++;
    }
    return keys_a == keys_b;
}

/* True if some date in the container under it rounds (as a double) past the int64 range. */
static bool has_unwritable_date(bson_iter_t *it)
{
    while (bson_iter_next(it)) {
        bson_iter_t child;
        if (BSON_ITER_HOLDS_DATE_TIME(it) && (double)bson_iter_date_time(it) >= TWO_POW_63) {
            return true;
        }
        if ((BSON_ITER_HOLDS_DOCUMENT(it) || BSON_ITER_HOLDS_ARRAY(it)) &&
            bson_iter_recurse(it, &child) && has_unwritable_date(&child)) {
            return true;
        }
    }
    return false;
}

/* True if some string value or document key in the container under it is not valid UTF-8
 * (bson_validate does not look at values in libbson 1.23, and misses some nested keys). An
 * array's keys do not count: they are not kept. */
static bool has_invalid_utf8(bson_iter_t *it, bool array)
{
    while (bson_iter_next(it)) {
        bson_iter_t child;
        uint32_t len;
        if (!array && !bson_utf8_validate(bson_iter_key(it), bson_iter_key_len(it), false)) {
            return true;
        }
        if (BSON_ITER_HOLDS_UTF8(it)) {
            const char *s = bson_iter_utf8(it, &len);
            if (!bson_utf8_validate(s, len, true)) {
                return true;
            }
        }
        if ((BSON_ITER_HOLDS_DOCUMENT(it) || BSON_ITER_HOLDS_ARRAY(it)) &&
            bson_iter_recurse(it, &child) && has_invalid_utf8(&child, BSON_ITER_HOLDS_ARRAY(it))) {
            return true;
        }
    }
    return false;
}

/* True if every container under it (recursively) iterates to its end: bson_validate misses a
 * corrupt element nested in some documents (libbson 1.23), bson_iter_next then just stops. */
static bool walks_to_the_end(bson_iter_t *it)
{
    while (bson_iter_next(it)) {
        bson_iter_t child;
        if ((BSON_ITER_HOLDS_DOCUMENT(it) || BSON_ITER_HOLDS_ARRAY(it)) &&
            (!bson_iter_recurse(it, &child) || !walks_to_the_end(&child))) {
            return false;
        }
    }
    return it->err_off == 0;
}

/* ---- random BSON -> Lua -> BSON ----------------------------------------------------------- */

static void check_document(lua_State *L, const bson_t *doc)
{
    size_t offset;
    bson_iter_t walk;
    bool well_formed = bson_validate(doc, BSON_VALIDATE_NONE, &offset) &&
                       bson_iter_init(&walk, doc) && walks_to_the_end(&walk);
    bool walks = bson_iter_init(&walk, doc) && walks_to_the_end(&walk);
    char err[256] = "";
    int top = lua_gettop(L);
    int rc = ahm_bson_push(L, doc, false, err, sizeof(err));
    if (lua_gettop(L) != top + (rc == AH_OK ? 1 : 0)) {
        fail("ahm_bson_push left the stack unbalanced", err);
    }
    if (rc != AH_OK) {
        if (well_formed && strstr(err, "nesting deeper") == NULL) {
            fail("a well-formed document did not decode", err);
        }
        return;
    }
    if (!walks) {
        fail("a corrupt document decoded (its corrupt part dropped)", NULL);
    }
    bson_t out = BSON_INITIALIZER;
    rc = ahm_bson_from_lua(L, -1, &out, err, sizeof(err));
    if (lua_gettop(L) != top + 1) {
        fail("ahm_bson_from_lua left the stack unbalanced", err);
    }
    lua_settop(L, top);
    if (well_formed) {
        bson_iter_t a, b, scan_utf8, scan_dates;
        bson_iter_init(&scan_utf8, doc);
        bson_iter_init(&scan_dates, doc);
        if (rc != AH_OK) {
            bool expected = (has_invalid_utf8(&scan_utf8, false) && strstr(err, "UTF-8") != NULL) ||
                            (has_unwritable_date(&scan_dates) && strstr(err, "date") != NULL);
            if (!expected) {
                fail("a decoded document did not encode", err);
            }
        } else if (!bson_iter_init(&a, doc) || !bson_iter_init(&b, &out) ||
                   !same_container(&a, &b, false)) {
            char *x = bson_as_canonical_extended_json(doc, NULL);
            char *y = bson_as_canonical_extended_json(&out, NULL);
            fprintf(stderr, "fuzz_bson: in  %s\nfuzz_bson: out %s\n", x ? x : "?", y ? y : "?");
            bson_free(x);
            bson_free(y);
            fail("BSON -> Lua -> BSON changed the document", NULL);
        }
    }
    bson_destroy(&out);
}

/* data: a document whose length prefix and trailing NUL are set here (so that mutations reach
 * the elements). */
static void fuzz_document(lua_State *L, const uint8_t *input, size_t size)
{
    if (size < 5 || size > INT32_MAX) {
        return;
    }
    uint8_t *data = malloc(size); /* exactly sized: ASan sees any read past the end */
    if (data == NULL) {
        return;
    }
    memcpy(data, input, size);
    uint32_t len = (uint32_t)size;
    data[0] = (uint8_t)len;
    data[1] = (uint8_t)(len >> 8);
    data[2] = (uint8_t)(len >> 16);
    data[3] = (uint8_t)(len >> 24);
    data[size - 1] = 0;
    bson_t doc;
    if (bson_init_static(&doc, data, size)) {
        check_document(L, &doc);
    }
    free(data);
}

/* ---- random Lua values -------------------------------------------------------------------- */

/* Helpers run in Lua, each under pcall: constructors, forged metatables, tostring, type. */
static const char helpers_source[] =
    "local mongo, ffi = mongo, require 'ffi'\n"
    "local kinds = {'array', 'document', 'date', 'oid', 'raw', 'bogus'}\n"
    "local H = {}\n"
    "function H.construct(which, v)\n"
    "  local names = {'array', 'document', 'date', 'oid', 'int64', 'binary', 'decimal128',\n"
    "                 'is_array', 'type'}\n"
    "  if which == 0 then return ffi.new('uint64_t', v) end\n"
    "  if which == 1 then return ffi.new('int32_t', v) end\n"
    "  return mongo[names[(which - 2) % #names + 1]](v)\n"
    "end\n"
    "local genuine = {getmetatable(mongo.array()), getmetatable(mongo.date(0)),\n"
    "                 getmetatable(mongo.oid()), getmetatable(mongo.binary('x'))}\n"
    "function H.forge(which, v)\n"
    "  if which >= 12 then\n"
    "    if v == nil then v = newproxy(false) end\n"
    "    debug.setmetatable(v, genuine[which - 11])\n"
    "    return v\n"
    "  end\n"
    "  local mt = {__bson = kinds[which % #kinds + 1]}\n"
    "  if which >= 6 then mt.__index = function() error('forged __index') end end\n"
    "  if type(v) == 'userdata' then\n"
    "    local p = newproxy(true)\n"
    "    for k, x in pairs(mt) do getmetatable(p)[k] = x end\n"
    "    return p\n"
    "  end\n"
    "  return setmetatable(type(v) == 'table' and v or {}, mt)\n"
    "end\n"
    "function H.proxy() return newproxy(true) end\n"
    "function H.inspect(v)\n"
    "  pcall(mongo.to_json, v)\n"
    "  return tostring(v), mongo.type(v)\n"
    "end\n"
    "return H\n";

/* Calls helper `name` with the given number of arguments on top, under pcall; leaves its first
 * result (nil on error). Stack: [-nargs, +1]. */
static void call_helper(lua_State *L, const char *name, int nargs)
{
    lua_getfield(L, LUA_REGISTRYINDEX, "fuzz_bson_helpers");
    lua_getfield(L, -1, name);
    lua_remove(L, -2);
    lua_insert(L, -1 - nargs);
    if (lua_pcall(L, nargs, 1, 0) != 0) {
        lua_pop(L, 1);
        lua_pushnil(L);
    }
}

typedef struct {
    bool document;
    int rc;
    char err[256];
    bson_t *out;
} encode_call_t;

/* Called under lua_pcall with (call, value), so that a Lua error raised by the encoder is
 * caught and reported; the value is at index 2 of this function's own stack. */
static int encode_protected(lua_State *L)
{
    encode_call_t *call = lua_touserdata(L, 1);
    int top = lua_gettop(L);
    call->rc = call->document
                   ? ahm_bson_from_lua(L, 2, call->out, call->err, sizeof(call->err))
                   : ahm_bson_append_lua(L, 2, call->out, "v", call->err, sizeof(call->err));
    if (lua_gettop(L) != top) {
        fail("the encoder left the stack unbalanced", call->err);
    }
    return 0;
}

/* Encodes the value at idx (as a document too when it is a table) and checks the outcome. */
static void check_encode(lua_State *L, int idx, bool document)
{
    bson_t out = BSON_INITIALIZER;
    encode_call_t call = {.document = document, .out = &out};
    int top = lua_gettop(L);
    lua_pushcfunction(L, encode_protected);
    lua_pushlightuserdata(L, &call);
    lua_pushvalue(L, idx);
    if (lua_pcall(L, 2, 0, 0) != 0) {
        fail("the encoder raised", lua_tostring(L, -1));
    }
    if (call.rc != AH_OK) {
        if (call.rc != AH_EINVAL || call.err[0] == '\0') {
            fail("the encoder failed without AH_EINVAL and a message", call.err);
        }
        bson_destroy(&out);
        return;
    }
    size_t offset = 0;
    bson_iter_t scan;
    if (!bson_validate(&out, BSON_VALIDATE_NONE, &offset) || !bson_iter_init(&scan, &out) ||
        has_invalid_utf8(&scan, false)) {
        char *json = bson_as_relaxed_extended_json(&out, NULL);
        fprintf(stderr, "fuzz_bson: written: %s (invalid at offset %zu):", json ? json : "?",
                offset);
        for (uint32_t i = 0; i < out.len; i++) {
            fprintf(stderr, " %02x", bson_get_data(&out)[i]);
        }
        fprintf(stderr, "\n");
        bson_free(json);
        fail("the encoder wrote invalid BSON", NULL);
    }
    char err[256] = "";
    int rc = ahm_bson_push(L, &out, false, err, sizeof(err));
    /* a value nested 100 deep under "v" is one level too deep to read back (documented) */
    if (rc != AH_OK && (document || strstr(err, "nesting deeper") == NULL)) {
        fail("an encoded value did not decode", err);
    }
    lua_settop(L, top);
    bson_destroy(&out);
}

static void fuzz_values(lua_State *L, const uint8_t *data, size_t size)
{
    lua_getfield(L, LUA_REGISTRYINDEX, "fuzz_bson_helpers");
    if (lua_isnil(L, -1)) {
        if (luaL_loadstring(L, helpers_source) != 0 || lua_pcall(L, 0, 1, 0) != 0) {
            fail("helpers", lua_tostring(L, -1));
        }
        lua_setfield(L, LUA_REGISTRYINDEX, "fuzz_bson_helpers");
    }
    lua_pop(L, 1);
    static char some_address;
    int base = lua_gettop(L);
    input_t in = {data, size};
    while (in.left > 0 && lua_gettop(L) - base < 64) {
        int n = lua_gettop(L) - base;
        switch (next_byte(&in) % 14) {
        case 0:
            lua_pushnil(L);
            break;
        case 1:
            lua_pushboolean(L, next_byte(&in) & 1);
            break;
        case 2: {
            uint64_t bits = next_u64(&in);
            double d;
            memcpy(&d, &bits, sizeof(d));
            lua_pushnumber(L, d);
            break;
        }
        case 3:
            lua_pushnumber(L, (int8_t)next_byte(&in));
            break;
        case 4: {
            size_t len = next_byte(&in) % 32;
            len = len < in.left ? len : in.left;
            lua_pushlstring(L, (const char *)in.p, len);
            in.p += len;
            in.left -= len;
            break;
        }
        case 5:
            lua_newtable(L);
            break;
        case 6: /* t[k] = v with t, k, v on top (t any earlier value that is a table) */
            if (n >= 3 && lua_istable(L, -3) && !lua_isnil(L, -2) &&
                !(lua_isnumber(L, -2) && isnan(lua_tonumber(L, -2)))) {
                lua_rawset(L, -3);
            } else if (n >= 1) {
                lua_pop(L, 1);
            }
            break;
        case 7: /* a constructor applied to the top value (or to nothing) */
            lua_pushinteger(L, next_byte(&in) % 11);
            if (n >= 1) {
                lua_pushvalue(L, -2);
                call_helper(L, "construct", 2);
                lua_replace(L, -2);
            } else {
                call_helper(L, "construct", 1);
            }
            break;
        case 8: /* an earlier value again: shared references and cycles */
            if (n >= 1) {
                lua_pushvalue(L, base + 1 + (int)(next_byte(&in) % (unsigned)n));
            }
            break;
        case 9:
            lua_pushlightuserdata(L, &some_address);
            break;
        case 10:
            lua_pushcfunction(L, lua_gettop);
            break;
        case 11:
            lua_newthread(L);
            break;
        case 12: /* a forged `__bson` metatable on the top table, or a forged userdata */
            lua_pushinteger(L, next_byte(&in) % 16);
            if (n >= 1) {
                lua_pushvalue(L, -2);
                call_helper(L, "forge", 2);
                lua_replace(L, -2);
            } else {
                call_helper(L, "forge", 1);
            }
            break;
        default:
            call_helper(L, "proxy", 0);
            break;
        }
    }
    int top = lua_gettop(L);
    for (int i = base + 1; i <= top; i++) {
        check_encode(L, i, false);
        if (lua_istable(L, i)) {
            check_encode(L, i, true);
        }
        lua_pushvalue(L, i);
        call_helper(L, "inspect", 1);
        lua_pop(L, 1);
    }
    lua_settop(L, base);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) {
        return 0;
    }
    lua_State *L = fuzz_state();
    if (data[0] % 2 == 0) {
        fuzz_document(L, data + 1, size - 1);
    } else {
        fuzz_values(L, data + 1, size - 1);
    }
    /* Everything this input made is garbage now: collect it, so that no object the input
     * allocated outlives it (LeakSanitizer cannot follow LuaJIT's tagged references). */
    lua_settop(L, 0);
    lua_gc(L, LUA_GCCOLLECT, 0);
    return 0;
}
