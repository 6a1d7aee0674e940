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

#include <mongoc/mongoc.h>

/* The MongoDB control store (core/mongo/ahm_store.c). */
ah_store_t *ahm_store_open(const ah_config_t *cfg, char *err, size_t errlen);

/* URIs (core/mongo/ahm_uri.c). ahm_uri_check: 0, or AH_EINVAL with err naming setting and the
 * option the driver accepted without checking (an unknown authMechanism). ahm_uri_probe: tries
 * to connect to each seed host of uri (at most 1 s per address) and writes the first problem
 * ("connection refused by HOST:PORT", "cannot resolve HOST: ...") into out, or "" when every
 * host accepts a connection. Blocks: for error paths of threads that may wait. */
int ahm_uri_check(const mongoc_uri_t *uri, const char *setting, char *err, size_t errlen);
void ahm_uri_probe(const mongoc_uri_t *uri, char *out, size_t n);

/* agent.mongo (core/mongo/ahm_lua.c). */
ahm_lua_t *ahm_lua_new(const char *own_uri, const char *database, const char *default_database,
                       const char *agent_id, char *err, size_t errlen);
void ahm_lua_detach(ahm_lua_t *m);
void ahm_lua_free(ahm_lua_t *m);
int ahm_lua_open(lua_State *L);

#endif
