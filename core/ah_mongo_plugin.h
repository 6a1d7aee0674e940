/* The ABI between the core and the MongoDB plugin (agenthost_mongo.so, built from core/mongo/).
 * Everything that links mongo-c-driver lives in the plugin, so a process that never uses MongoDB
 * never maps libmongoc and what it pulls in (libcrypto, ICU, SASL, libmongocrypt; the resident cost
 * is measured in docs/ARCHITECTURE.md). The core loads the plugin with dlopen on first use
 * (ah_mongo.h) and calls it only through this table; the plugin calls back into the core's ah_*
 * functions, which the agenthost executable and libagenthost.so export for it (docs/EMBEDDING.md).
 *
 * The plugin exports exactly one symbol, AH_MONGO_PLUGIN_SYMBOL, a const ah_mongo_plugin_t. The
 * table also relies on the layout of ah_config_t and ah_store_t, so a plugin is accepted only when
 * header.abi_version matches and it was built from the same agenthost version (ah_plugin.h). Each
 * function has the contract of its front in ah_mongo.h; the plugin's own code carries the prefix
 * ahm_ (core/mongo/ahm.h). */
#ifndef AH_MONGO_PLUGIN_H
#define AH_MONGO_PLUGIN_H

#include "ah_config.h"
#include "ah_plugin.h"
#include "ah_store.h"

#include <lua.h>

/* Bump on any change to this table or to the types it passes. */
#define AH_MONGO_PLUGIN_ABI 2
#define AH_MONGO_PLUGIN_SYMBOL "ah_mongo_plugin_v1"
#define AH_MONGO_PLUGIN_FILE "agenthost_mongo.so"

/* agent.mongo's connection object inside the plugin (the core holds it opaquely). */
typedef struct ahm_lua_s ahm_lua_t;

typedef struct ah_mongo_plugin_s {
    ah_plugin_header_t header; /* AH_MONGO_PLUGIN_ABI and AH_VERSION, checked first */
    /* ah_store_mongo_open (ah_mongo.h) */
    ah_store_t *(*store_open)(const ah_config_t *cfg, char *err, size_t errlen);
    /* ah_lua_mongo_new / _detach / _free / _open (ah_mongo.h) */
    ahm_lua_t *(*lua_new)(const char *own_uri, const char *database, const char *default_database,
                          const char *agent_id, char *err, size_t errlen);
    void (*lua_detach)(ahm_lua_t *m);
    void (*lua_free)(ahm_lua_t *m);
    lua_CFunction lua_open; /* upvalue 1: the ahm_lua_t (NULL: not configured) */
    /* mongoc_get_version(): the driver the plugin runs with. */
    const char *(*driver_version)(void);
} ah_mongo_plugin_t;

#endif
