/* libFuzzer target: the JSON writer (core/ah_json.c). The input is a small program of writer
 * calls (open/close objects and arrays, strings, integers, doubles, booleans, nulls) whose keys
 * and strings are arbitrary bytes. The output must be valid JSON (RFC 8259, checked by a strict
 * validator here, UTF-8 included) and lua-cjson must decode it to exactly what was written:
 * every string equal to its input with each byte that is not part of valid UTF-8 replaced by
 * U+FFFD (after the redaction of credentials every string value goes through), every double equal
 * (non-finite ones as null), every integer equal as a Lua number. Keys carry a unique prefix
 * ("k<n>:") so that decoding into Lua tables loses nothing. */
#include "ah_json.h"
#include "ah_redact.h"
#include "fuzz_json_check.h"
#include "fuzz_input.h"

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "lua-cjson.h" /* after lua.h: it uses lua_State without including it */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 200 /* far below lua-cjson's decode limit (1000) */

/* Pushes what a JSON decoder must read back for the n bytes at s. Stack: [-0, +1]. */
static void push_sanitized(lua_State *L, const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (size_t i = 0; i < n;) {
        size_t len = utf8_decode(s + i, n - i);
        if (len == 0) {
            luaL_addlstring(&b, "\xEF\xBF\xBD", 3);
            i++;
        } else {
            luaL_addlstring(&b, str + i, len);
            i += len;
        }
    }
    luaL_pushresult(&b);
}

/* ---- the Lua side: cjson and a deep comparison ------------------------------------------- */

static const char compare_source[] =
    "local cjson = require 'cjson'\n"
    "local function same(a, b)\n"
    "  if type(a) ~= type(b) then return false end\n"
    "  if type(a) ~= 'table' then return a == b or (a ~= a and b ~= b) end\n"
    "  for k, v in pairs(a) do if not same(v, b[k]) then return false end end\n"
    "  for k in pairs(b) do if a[k] == nil then return false end end\n"
    "  return true\n"
    "end\n"
    "return function(text, expected)\n"
    "  local ok, decoded = pcall(cjson.decode, text)\n"
    "  if not ok then return false, decoded end\n"
    "  return same(decoded, expected), 'decoded value differs'\n"
    "end\n";

static lua_State *L_checker;

static void close_checker(void)
{
    lua_close(L_checker);
}

/* The process's one Lua state (closed at exit, so that LeakSanitizer sees cjson's buffers freed).
 */
static lua_State *lua_checker(void)
{
    if (L_checker != NULL) {
        return L_checker;
    }
    lua_State *L = L_checker = luaL_newstate();
    atexit(close_checker);
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_cjson);
    lua_setfield(L, -2, "cjson");
    lua_pop(L, 2);
    if (luaL_loadstring(L, compare_source) != 0 || lua_pcall(L, 0, 1, 0) != 0) {
        fprintf(stderr, "fuzz_json: %s\n", lua_tostring(L, -1));
        abort();
    }
    lua_setfield(L, LUA_REGISTRYINDEX, "fuzz_json_check");
    return L;
}

/* Decodes text with lua-cjson and compares it with the value on top of the stack (popped);
 * aborts on a difference. */
static void check_decodes_to(lua_State *L, const char *text, size_t len)
{
    if (!valid_json(text, len)) {
        fprintf(stderr, "fuzz_json: invalid JSON written: %.*s\n", (int)len, text);
        abort();
    }
    int expected = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, "fuzz_json_check");
    lua_pushlstring(L, text, len);
    lua_pushvalue(L, expected);
    lua_call(L, 2, 2);
    if (!lua_toboolean(L, -2)) {
        fprintf(stderr, "fuzz_json: %s: %.*s\n", lua_tostring(L, -1), (int)len, text);
        abort();
    }
    lua_settop(L, expected - 1);
}

/* ---- the input program ------------------------------------------------------------------- */

/* The next length-prefixed byte string (not NUL-terminated). */
static const char *next_bytes(input_t *in, size_t *len)
{
    size_t n = next_byte(in);
    if (n > in->left) {
        n = in->left;
    }
    const char *s = (const char *)in->p;
    in->p += n;
    in->left -= n;
    *len = n;
    return s;
}

typedef struct {
    int is_array;
    int count;
} level_t;

/* Builds the key of the next member: "k<n>:" + the input's bytes up to a NUL (the writers take C
 * strings). Pushes the key the decoder must see. Stack: [-0, +1]. */
static const char *next_key(lua_State *L, input_t *in, int serial, char *key, size_t cap)
{
    size_t n;
    const char *bytes = next_bytes(in, &n);
    int prefix = snprintf(key, cap, "k%d:", serial);
    size_t room = cap - (size_t)prefix - 1;
    n = strnlen(bytes, n < room ? n : room);
    memcpy(key + prefix, bytes, n);
    key[prefix + n] = '\0';
    push_sanitized(L, key, (size_t)prefix + n);
    return key;
}

/* Runs the program: a top-level object holding whatever the input writes. */
static void fuzz_writer(lua_State *L, input_t *in)
{
    level_t levels[MAX_DEPTH + 1];
    int depth = 0;
    int serial = 0;
    ah_buf_t b;
    ah_buf_init(&b);
    ah_json_open(&b);
    lua_newtable(L);
    levels[0] = (level_t){0, 0};
    char key_buf[300];
    char value_buf[300];
    while (in->left > 0) {
        unsigned op = next_byte(in) % 9;
        level_t *lv = &levels[depth];
        if (op == 8) { /* close the current container */
            if (depth == 0) {
                continue;
            }
            if (lv->is_array) {
                ah_json_close_array(&b);
            } else {
                ah_json_close(&b);
            }
            lua_settable(L, -3); /* parent[key] = this */
            depth--;
            continue;
        }
        const char *key = NULL;
        if (lv->is_array) {
            lua_pushinteger(L, ++lv->count);
        } else {
            key = next_key(L, in, serial++, key_buf, sizeof(key_buf));
        }
        switch (op) {
        case 0:
        case 1:
            if (depth == MAX_DEPTH) {
                ah_json_null(&b, key);
                lua_pushlightuserdata(L, NULL);
                break;
            }
            if (op == 0) {
                ah_json_open_object(&b, key);
            } else {
                ah_json_open_array(&b, key);
            }
            lua_newtable(L);
            levels[++depth] = (level_t){op == 1, 0};
            continue; /* the table is set into its parent when it closes */
        case 2: {
            size_t n;
            const char *bytes = next_bytes(in, &n);
            n = strnlen(bytes, n);
            memcpy(value_buf, bytes, n);
            value_buf[n] = '\0';
            ah_json_str(&b, key, value_buf);
            /* string values pass through the redaction of credentials (core/ah_redact.c):
             * what reads back is the redacted text */
            char *shown = ah_redact_dup(value_buf);
            if (shown == NULL) {
                abort(); /* no allocation failure is expected at these sizes */
            }
            push_sanitized(L, shown, strlen(shown));
            free(shown);
            break;
        }
        case 3: {
            uint64_t bits = next_u64(in);
            double d;
            memcpy(&d, &bits, sizeof(d));
            ah_json_num(&b, key, d);
            if (isfinite(d)) {
                lua_pushnumber(L, d);
            } else {
                lua_pushlightuserdata(L, NULL);
            }
            break;
        }
        case 4: {
            int64_t v = (int64_t)next_u64(in);
            ah_json_int(&b, key, v);
            lua_pushnumber(L, (lua_Number)v);
            break;
        }
        case 5:
        case 6: {
            int v = op == 5;
            ah_json_bool(&b, key, v);
            lua_pushboolean(L, v);
            break;
        }
        default:
            ah_json_null(&b, key);
            lua_pushlightuserdata(L, NULL);
            break;
        }
        lua_settable(L, -3);
    }
    while (depth > 0) {
        if (levels[depth].is_array) {
            ah_json_close_array(&b);
        } else {
            ah_json_close(&b);
        }
        lua_settable(L, -3);
        depth--;
    }
    ah_json_close(&b);
    if (!ah_buf_ok(&b)) {
        abort(); /* no allocation failure is expected at these sizes */
    }
    check_decodes_to(L, b.data, b.len);
    ah_buf_free(&b);
}

/* ah_json_escape on the whole input (NUL bytes included), as the only element of an array. */
static void fuzz_escape(lua_State *L, const uint8_t *data, size_t size)
{
    ah_buf_t b;
    ah_buf_init(&b);
    ah_buf_append(&b, "[", 1);
    ah_json_escape(&b, (const char *)data, size);
    ah_buf_append(&b, "]", 1);
    if (!ah_buf_ok(&b)) {
        abort();
    }
    lua_createtable(L, 1, 0);
    push_sanitized(L, (const char *)data, size);
    lua_rawseti(L, -2, 1);
    check_decodes_to(L, b.data, b.len);
    ah_buf_free(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    lua_State *L = lua_checker();
    fuzz_escape(L, data, size);
    input_t in = {data, size};
    fuzz_writer(L, &in);
    lua_settop(L, 0);
    return 0;
}
