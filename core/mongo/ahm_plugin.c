/* The MongoDB plugin's single exported symbol: the function table the core finds with dlsym
 * (ah_mongo_plugin.h). Everything else in agenthost_mongo.so has hidden visibility. */
#include "ahm.h"

#include <mongoc/mongoc.h>

#ifndef AH_VERSION
#error "AH_VERSION must be defined by the build"
#endif

__attribute__((visibility("default"))) const ah_mongo_plugin_t ah_mongo_plugin_v1 = {
    .header = {.abi_version = AH_MONGO_PLUGIN_ABI, .build_version = AH_VERSION},
    .store_open = ahm_store_open,
    .lua_new = ahm_lua_new,
    .lua_detach = ahm_lua_detach,
    .lua_free = ahm_lua_free,
    .lua_open = ahm_lua_open,
    .driver_version = mongoc_get_version,
};
