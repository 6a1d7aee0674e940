/* Inside the MongoDB plugin (agenthost_mongo.so): the functions behind the ah_mongo_plugin_t
 * table (ah_mongo_plugin.h). Each has the contract of the core-side front of the same job:
 * ah_mongo_store_* as ah_store_mongo_* in ah_store.h, ah_mongo_lua_* as ah_lua_mongo_* in
 * ah_lua_mongo.h. Compiled with -fvisibility=hidden: none of these names leave the plugin, and
 * none of them exists in the core, so no name is defined twice in a process. */
#ifndef AH_MONGO_IMPL_H
#define AH_MONGO_IMPL_H

#include "ah_mongo_plugin.h"

/* The MongoDB control store (core/mongo/ah_store_mongo.c). */
ah_store_t *ah_mongo_store_open(const ah_config_t *cfg, char *err, size_t errlen);
struct _mongoc_client_pool_t *ah_mongo_store_pool(ah_store_t *st);

/* agent.mongo (core/mongo/ah_lua_mongo.c). */
ah_mongo_lua_t *ah_mongo_lua_new(const char *own_uri, const char *database,
                                 const char *default_database, const char *agent_id, char *err,
                                 size_t errlen);
void ah_mongo_lua_set_shared_pool(ah_mongo_lua_t *m, struct _mongoc_client_pool_t *pool);
void ah_mongo_lua_detach(ah_mongo_lua_t *m);
void ah_mongo_lua_free(ah_mongo_lua_t *m);
int ah_mongo_lua_open(lua_State *L);

#endif
