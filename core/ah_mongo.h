/* The core's MongoDB front (implemented in ah_mongo.c): loading the MongoDB plugin
 * (agenthost_mongo.so, ah_mongo_plugin.h) on first use, and the entry points that forward to it:
 * the control store (ah_store_mongo_*) and agent.mongo (ah_lua_mongo_*). They call
 * ah_mongo_load() only when MongoDB is actually used, so an agent on the embedded store never
 * maps libmongoc. The plugin's own code carries the prefix ahm_ (core/mongo/ahm.h).
 *
 * Where the plugin is looked for: only $AGENTHOST_PLUGIN_DIR when it is set; otherwise the
 * directory of the object holding the core (the agenthost executable or libagenthost.so), then
 * <that directory>/../lib/agenthost, then the install directory (<prefix>/lib/agenthost). The
 * first agenthost_mongo.so that exists is loaded (dlopen RTLD_NOW | RTLD_LOCAL) and never
 * unloaded.
 *
 * Threads: ah_mongo_load/ah_mongo_loaded on any thread; the first call loads, every later call
 * returns the same outcome. */
#ifndef AH_MONGO_H
#define AH_MONGO_H

#include "ah_common.h"
#include "ah_mongo_plugin.h"

#include <lua.h>

/* Loads the plugin (once per process) and returns its table, or NULL with err set to a message
 * naming the file(s) searched and the loader's error, e.g. "MongoDB support is not available:
 * cannot load /usr/lib/agenthost/agenthost_mongo.so: libmongoc-1.0.so.0: cannot open shared
 * object file ...". */
const ah_mongo_plugin_t *ah_mongo_load(char *err, size_t errlen);

/* The table if the plugin has already been loaded, else NULL. Never loads. */
const ah_mongo_plugin_t *ah_mongo_loaded(void);

/* ---- the control store ---- */

/* The MongoDB store (cfg->mongodb_uri, cfg->mongodb_database, cfg->change_streams,
 * cfg->polling_interval, cfg->agent_id). Creating it does not contact the server: connection
 * problems show up in the watcher's status and as AH_EUNAVAIL from read/command/history. Returns
 * NULL with err set only for a bad configuration (e.g. an unparsable URI). cfg must outlive it. */
ah_store_t *ah_store_mongo_open(const ah_config_t *cfg, char *err, size_t errlen);

/* ---- agent.mongo ----
 *
 * agent.mongo: MongoDB access for scripts, a Lua binding over mongo-c-driver. The binding lives in
 * the MongoDB plugin (core/mongo/ahm_lua.c); these functions are its front in the core
 * (core/ah_mongo.c), which loads the plugin only when it is needed: for a URI of the binding's
 * own, or when a script requires "agent.mongo". The connection
 * object (ah_lua_mongo_t) is created by the host and outlives the Lua state: it owns a client pool
 * (AGENT_MONGODB_URI; else MONGODB_URI, opened on first use), never the control store's, so no
 * script can take the connections cluster commands need. Without a URI, every call returns
 * nil, "agent.mongo: no MongoDB configured (set AGENT_MONGODB_URI or MONGODB_URI)".
 * docs/LUA_MONGO.md is the script-facing reference.
 *
 * Threads: new/free on the host's thread; detach after the Lua worker has stopped; the Lua
 * functions on the Lua worker thread. Each Lua call takes a client from the pool and gives it
 * back before it builds any Lua value; only an open find_iter() iterator keeps one across calls
 * (released at its end, by it:close(), by the GC or by detach). With every client taken, a call
 * collects garbage, waits at most the pool's waitQueueTimeoutMS and returns nil, msg, -1. */

typedef struct ah_lua_mongo_s ah_lua_mongo_t;

/* Creates the connection object. own_uri: the URI the binding opens its own pool for (NULL: not
 * configured). database: the default database for
 * agent.mongo.collection(name); NULL → the database named in own_uri, else default_database.
 * Does not contact the server. Without own_uri it only records its arguments (no plugin load).
 * NULL with err set on a bad URI, a plugin that cannot be loaded (own_uri given) or out of
 * memory. */
ah_lua_mongo_t *ah_lua_mongo_new(const char *own_uri, const char *database,
                                 const char *default_database, const char *agent_id, char *err,
                                 size_t errlen);
/* Records the control store's URI: without an own_uri, the binding opens a pool of its own for
 * it when a script first requires "agent.mongo" (never the store's pool). Call before the script
 * is loaded. NULL is accepted for m. */
void ah_lua_mongo_set_store_uri(ah_lua_mongo_t *m, const char *uri);
/* Closes every open iterator (returning its client to the pool): call after the Lua worker
 * stopped. NULL is accepted. */
void ah_lua_mongo_detach(ah_lua_mongo_t *m);
/* Frees the object (and its own pool). Call after the Lua state that used it is closed. NULL is
 * accepted. */
void ah_lua_mongo_free(ah_lua_mongo_t *m);

/* The lua_CFunction for package.preload["agent.mongo"]; upvalue 1 is the ah_lua_mongo_t as a
 * light userdata (NULL allowed: not configured). Loads the plugin; raises "agent.mongo: MongoDB
 * support is not available: ..." if it cannot. Stack: [-0, +1] (the module table). */
int ah_lua_mongo_open(lua_State *L);

#endif
