/* The BSON ⇄ Lua mapping used by agent.mongo (docs/LUA_MONGO.md has the table). Documents are
 * Lua tables, arrays are tables marked with the array metatable, ObjectId/Date/int64/null have
 * their own Lua values, and every other BSON type (Decimal128, binary, regex, timestamp,
 * min/max key, ...) travels as an opaque "raw" userdata that is written back unchanged.
 *
 * Threads: Lua thread only. The encoders never raise (except a Lua out-of-memory error): they
 * return AH_EINVAL with err naming the key and the problem, so the caller can release what it
 * holds and then raise. */
#ifndef AHM_BSON_H
#define AHM_BSON_H

#include "ah_common.h"

#include <bson/bson.h>
#include <lua.h>

/* Nesting deeper than this (documents and arrays) is an error in both directions. */
#define AHM_BSON_MAX_DEPTH 100

/* Creates the metatables and helpers the mapping needs (idempotent). Must run before any other
 * function here. Stack: [-0, +0]; raises on out of memory. */
void ahm_bson_init(lua_State *L);

/* Adds the value constructors to the table on top of the stack: array, document, oid, date,
 * int64, null, decimal128, binary, is_array, type. Stack: [-0, +0]. */
void ahm_bson_register(lua_State *L);

/* Appends the table at idx to out (initialised by the caller) as a document: every key must be a
 * string (a table marked as an array is refused). 0 or AH_EINVAL (err set). */
int ahm_bson_from_lua(lua_State *L, int idx, bson_t *out, char *err, size_t errlen);

/* Like ahm_bson_from_lua, but also accepts an ordered list of pairs {{"a", 1}, {"b", -1}} (for
 * sort, projection and index keys, where the order matters). */
int ahm_bson_from_lua_ordered(lua_State *L, int idx, bson_t *out, char *err, size_t errlen);

/* Appends the sequence at idx (a plain or array-marked table, 1..n) to out as the elements of
 * an array document ("0", "1", ...). 0 or AH_EINVAL. */
int ahm_bson_array_from_lua(lua_State *L, int idx, bson_t *out, char *err, size_t errlen);

/* Appends the single Lua value at idx to out under key. 0 or AH_EINVAL. */
int ahm_bson_append_lua(lua_State *L, int idx, bson_t *out, const char *key, char *err,
                        size_t errlen);

/* Pushes doc as a table (as_array: an array-marked sequence). Stack: [-0, +1]; on a malformed
 * or too deep document pushes nothing and returns AH_EINVAL with err set. */
int ahm_bson_push(lua_State *L, const bson_t *doc, bool as_array, char *err, size_t errlen);

/* Pushes the value under iter (any type). Stack: [-0, +1] or [-0, +0] with AH_EINVAL. */
int ahm_bson_push_value(lua_State *L, const bson_iter_t *iter, char *err, size_t errlen);

#endif
