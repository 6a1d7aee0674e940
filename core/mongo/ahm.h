/* Inside the MongoDB plugin (agenthost_mongo.so, built from core/mongo/): the functions behind
 * the ah_mongo_plugin_t table (ah_mongo_plugin.h). Everything defined in the plugin carries the
 * prefix ahm_ (files core/mongo/ahm_*.[ch], functions and types ahm_*), the core's MongoDB
 * front the prefix ah_ (core/ah_mongo.[ch]), so a name always says on which side of the dlopen
 * boundary it lives and grepping it finds one definition. Each function here has the contract
 * of its front in ah_mongo.h: ahm_store_* as ah_store_mongo_*, ahm_lua_* as ah_lua_mongo_*.
 * Compiled with -fvisibility=hidden: none of these names leave the plugin. */
#ifndef AHM_H
#define AHM_H

#include "ah_mongo_plugin.h"

/* The MongoDB control store (core/mongo/ahm_store.c). */
ah_store_t *ahm_store_open(const ah_config_t *cfg, char *err, size_t errlen);

/* agent.mongo (core/mongo/ahm_lua.c). */
ahm_lua_t *ahm_lua_new(const char *own_uri, const char *database, const char *default_database,
                       const char *agent_id, char *err, size_t errlen);
void ahm_lua_detach(ahm_lua_t *m);
void ahm_lua_free(ahm_lua_t *m);
int ahm_lua_open(lua_State *L);

#endif
