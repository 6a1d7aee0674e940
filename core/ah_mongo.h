/* Loading the MongoDB plugin (agenthost_mongo.so, ah_mongo_plugin.h) on first use. The core's
 * MongoDB entry points (ah_store_mongo_open in ah_store.h, the ah_lua_mongo_* front in
 * ah_lua_mongo.h, both implemented in ah_mongo.c) call ah_mongo_load() only when MongoDB is
 * actually used, so an agent on the embedded store never maps libmongoc.
 *
 * Where the plugin is looked for: only $AGENTHOST_PLUGIN_DIR when it is set; otherwise the
 * directory of the object holding the core (the agenthost executable or libagenthost.so), then
 * <that directory>/../lib/agenthost, then the install directory (<prefix>/lib/agenthost). The
 * first agenthost_mongo.so that exists is loaded (dlopen RTLD_NOW | RTLD_LOCAL) and never
 * unloaded.
 *
 * Threads: any thread; the first call loads, every later call returns the same outcome. */
#ifndef AH_MONGO_H
#define AH_MONGO_H

#include "ah_mongo_plugin.h"

/* Loads the plugin (once per process) and returns its table, or NULL with err set to a message
 * naming the file(s) searched and the loader's error, e.g. "MongoDB support is not available:
 * cannot load /usr/lib/agenthost/agenthost_mongo.so: libmongoc-1.0.so.0: cannot open shared
 * object file ...". */
const ah_mongo_plugin_t *ah_mongo_load(char *err, size_t errlen);

/* The table if the plugin has already been loaded, else NULL. Never loads. */
const ah_mongo_plugin_t *ah_mongo_loaded(void);

#endif
