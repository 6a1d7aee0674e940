/* Finding and loading the core's plugins (implemented in ah_plugin.c): the shared objects that
 * hold whatever links a large library only some agents use (agenthost_mongo.so: mongo-c-driver,
 * ah_mongo.h; agenthost_curl.so: libcurl, ah_curl.h). A plugin exports one symbol, a const table
 * that starts with an ah_plugin_header_t; the core checks that header before it calls anything.
 *
 * Where a plugin is looked for: only $AGENTHOST_PLUGIN_DIR when it is set; otherwise the
 * directory of the object holding the core (the agenthost executable or libagenthost.so), then
 * <that directory>/../lib/agenthost, then the install directory (<prefix>/lib/agenthost). The
 * first file of that name that exists is loaded (dlopen RTLD_NOW | RTLD_LOCAL) and never
 * unloaded.
 *
 * Threads: any; each front calls ah_plugin_open once per process (pthread_once) and keeps the
 * outcome. */
#ifndef AH_PLUGIN_H
#define AH_PLUGIN_H

#include <stddef.h>

/* The first member of every plugin table. */
typedef struct ah_plugin_header_s {
    int abi_version;           /* the plugin's ABI number: checked first */
    const char *build_version; /* AH_VERSION of the build: must equal the core's */
} ah_plugin_header_t;

/* Finds `file` in the plugin directories, loads it and returns its table `symbol`, once its
 * header says ABI `abi` and this agenthost version. NULL with err set otherwise, naming the
 * directories searched ("agenthost_curl.so not found in /a, /b (set AGENTHOST_PLUGIN_DIR)") or the
 * file and the loader's message ("cannot load /a/agenthost_curl.so: ..."). */
const void *ah_plugin_open(const char *file, const char *symbol, int abi, char *err, size_t errlen);

#endif
