/* Implementation of ah_mongo.h, the core-side front of everything MongoDB: the
 * ah_store_mongo_* and ah_lua_mongo_* functions load the plugin on first real use and forward to
 * its table. The agent.mongo connection object here only records its arguments until a script
 * requires the module (or a URI of its own is given), so an agent that never touches MongoDB never
 * maps libmongoc. */
#define _GNU_SOURCE /* dladdr1, RTLD_DL_LINKMAP */
#include "ah_mongo.h"

#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>

#ifndef AH_VERSION
#error "AH_VERSION must be defined by the build"
#endif

#define SEARCH_DIRS_MAX 4

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
/* Set once, at the end of the first load (read without the once by ah_mongo_loaded). */
static _Atomic(const ah_mongo_plugin_t *) loaded_plugin;
static char load_error[AH_ERRLEN * 2];

/* ---- finding and loading the plugin -------------------------------------------------------- */

/* The directory of the object this function is linked into: the agenthost executable, a program
 * that linked libagenthost.a, or libagenthost.so. False if it cannot be told. */
static bool core_dir(char *out, size_t outlen)
{
    Dl_info info;
    struct link_map *map = NULL;
    char path[PATH_MAX];
    if (dladdr1((void *)core_dir, &info, (void **)&map, RTLD_DL_LINKMAP) == 0 || map == NULL) {
        return false;
    }
    if (map->l_name != NULL && map->l_name[0] != '\0') {
        ah_strlcpy(path, map->l_name, sizeof(path));
    } else {
        /* The main program: its link map has no name (dli_fname would be argv[0]). */
        ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
        if (n <= 0) {
            return false;
        }
        path[n] = '\0';
    }
    char *slash = strrchr(path, '/');
    if (slash == NULL) {
        return false;
    }
    *slash = '\0';
    ah_strlcpy(out, path[0] != '\0' ? path : "/", outlen);
    return true;
}

/* Adds dir to the search list unless it is already there. */
static void add_dir(char dirs[][PATH_MAX], int *count, const char *dir)
{
    for (int i = 0; i < *count; i++) {
        if (strcmp(dirs[i], dir) == 0) {
            return;
        }
    }
    if (*count < SEARCH_DIRS_MAX && strlen(dir) < PATH_MAX) {
        ah_strlcpy(dirs[(*count)++], dir, PATH_MAX);
    }
}

/* Opens the plugin at path and checks its table. NULL with load_error set on failure. */
static const ah_mongo_plugin_t *open_plugin(const char *path)
{
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        const char *why = dlerror();
        if (strncmp(why, path, strlen(path)) == 0) { /* glibc's message starts with the path */
            snprintf(load_error, sizeof(load_error), "cannot load %.800s", why);
        } else {
            snprintf(load_error, sizeof(load_error), "cannot load %.400s: %.400s", path, why);
        }
        return NULL;
    }
    const ah_mongo_plugin_t *plugin = dlsym(handle, AH_MONGO_PLUGIN_SYMBOL);
    if (plugin == NULL) {
        snprintf(load_error, sizeof(load_error),
                 "%.400s is not an agenthost MongoDB plugin: %.400s", path, dlerror());
    } else if (plugin->abi_version != AH_MONGO_PLUGIN_ABI) {
        snprintf(load_error, sizeof(load_error), "%.400s has plugin ABI %d, expected %d", path,
                 plugin->abi_version, AH_MONGO_PLUGIN_ABI);
    } else if (plugin->build_version == NULL || strcmp(plugin->build_version, AH_VERSION) != 0) {
        snprintf(load_error, sizeof(load_error), "%.400s belongs to agenthost %.40s, this is %s",
                 path, plugin->build_version ? plugin->build_version : "?", AH_VERSION);
    } else {
        return plugin;
    }
    dlclose(handle);
    return NULL;
}

/* Finds and opens the plugin: its table, or NULL with load_error set. */
static const ah_mongo_plugin_t *find_plugin(void)
{
    char dirs[SEARCH_DIRS_MAX][PATH_MAX];
    int count = 0;
    const char *override = getenv("AGENTHOST_PLUGIN_DIR");
    if (override != NULL && override[0] != '\0') {
        add_dir(dirs, &count, override);
    } else {
        char dir[PATH_MAX];
        if (core_dir(dir, sizeof(dir))) {
            add_dir(dirs, &count, dir);
            char up[PATH_MAX];
            if (snprintf(up, sizeof(up), "%s/../lib/agenthost", dir) < (int)sizeof(up)) {
                add_dir(dirs, &count, up);
            }
        }
#ifdef AH_PLUGIN_INSTALL_DIR
        add_dir(dirs, &count, AH_PLUGIN_INSTALL_DIR);
#endif
    }
    char searched[AH_ERRLEN] = "";
    for (int i = 0; i < count; i++) {
        char path[PATH_MAX];
        if (snprintf(path, sizeof(path), "%s/%s", dirs[i], AH_MONGO_PLUGIN_FILE) >=
            (int)sizeof(path)) {
            continue;
        }
        if (access(path, F_OK) == 0) {
            return open_plugin(path); /* the first one found decides */
        }
        size_t used = strlen(searched);
        snprintf(searched + used, sizeof(searched) - used, "%s%.200s", used ? ", " : "", dirs[i]);
    }
    snprintf(load_error, sizeof(load_error), "%s not found in %s%s", AH_MONGO_PLUGIN_FILE,
             searched[0] ? searched : "(no directory to search)",
             override != NULL && override[0] != '\0' ? " (AGENTHOST_PLUGIN_DIR)"
                                                     : " (set AGENTHOST_PLUGIN_DIR)");
    return NULL;
}

static void load_plugin(void)
{
    atomic_store(&loaded_plugin, find_plugin());
}

const ah_mongo_plugin_t *ah_mongo_load(char *err, size_t errlen)
{
    pthread_once(&load_once, load_plugin);
    const ah_mongo_plugin_t *plugin = atomic_load(&loaded_plugin);
    if (plugin == NULL) {
        snprintf(err, errlen, "MongoDB support is not available: %s", load_error);
    }
    return plugin;
}

const ah_mongo_plugin_t *ah_mongo_loaded(void)
{
    return atomic_load(&loaded_plugin);
}

/* ---- the control store (ah_store.h) --------------------------------------------------------- */

ah_store_t *ah_store_mongo_open(const ah_config_t *cfg, char *err, size_t errlen)
{
    const ah_mongo_plugin_t *plugin = ah_mongo_load(err, errlen);
    return plugin != NULL ? plugin->store_open(cfg, err, errlen) : NULL;
}

/* ---- agent.mongo (ah_mongo.h) --------------------------------------------------------------- */

struct ah_lua_mongo_s {
    pthread_mutex_t mutex; /* guards impl */
    char *database;        /* the arguments of ah_lua_mongo_new, for a later lua_new */
    char *default_database;
    char *agent_id;
    char *store_uri; /* the control store's URI (ah_lua_mongo_set_store_uri), or NULL */
    const ah_mongo_plugin_t *plugin; /* set with impl */
    ahm_lua_t *impl;                 /* the plugin's object, once created */
};

static char *dup_or_null(const char *s)
{
    return s != NULL ? strdup(s) : NULL;
}

ah_lua_mongo_t *ah_lua_mongo_new(const char *own_uri, const char *database,
                                 const char *default_database, const char *agent_id, char *err,
                                 size_t errlen)
{
    ah_lua_mongo_t *m = calloc(1, sizeof(*m));
    if (m == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&m->mutex, NULL);
    m->database = dup_or_null(database);
    m->default_database = dup_or_null(default_database);
    m->agent_id = dup_or_null(agent_id);
    if ((database != NULL && m->database == NULL) ||
        (default_database != NULL && m->default_database == NULL) ||
        (agent_id != NULL && m->agent_id == NULL)) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if (own_uri != NULL) {
        /* A deployment of its own: load now, so a bad URI or a missing plugin fails at start. */
        m->plugin = ah_mongo_load(err, errlen);
        if (m->plugin == NULL) {
            goto fail;
        }
        m->impl = m->plugin->lua_new(own_uri, database, default_database, agent_id, err, errlen);
        if (m->impl == NULL) {
            goto fail;
        }
    }
    return m;
fail:
    ah_lua_mongo_free(m);
    return NULL;
}

void ah_lua_mongo_set_store_uri(ah_lua_mongo_t *m, const char *uri)
{
    if (m == NULL) {
        return;
    }
    pthread_mutex_lock(&m->mutex);
    free(m->store_uri);
    m->store_uri = dup_or_null(uri);
    pthread_mutex_unlock(&m->mutex);
}

void ah_lua_mongo_detach(ah_lua_mongo_t *m)
{
    if (m == NULL) {
        return;
    }
    pthread_mutex_lock(&m->mutex);
    if (m->impl != NULL) {
        m->plugin->lua_detach(m->impl);
    }
    pthread_mutex_unlock(&m->mutex);
}

void ah_lua_mongo_free(ah_lua_mongo_t *m)
{
    if (m == NULL) {
        return;
    }
    if (m->impl != NULL) {
        m->plugin->lua_free(m->impl);
    }
    free(m->store_uri);
    free(m->agent_id);
    free(m->default_database);
    free(m->database);
    pthread_mutex_destroy(&m->mutex);
    free(m);
}

/* The plugin's object for m, created on first use from the recorded arguments. NULL with err
 * set if the plugin cannot be loaded or the object not created. */
static ahm_lua_t *impl_of(ah_lua_mongo_t *m, const ah_mongo_plugin_t *plugin, char *err,
                          size_t errlen)
{
    pthread_mutex_lock(&m->mutex);
    if (m->impl == NULL) {
        m->impl = plugin->lua_new(m->store_uri, m->database, m->default_database, m->agent_id, err,
                                  errlen);
        if (m->impl != NULL) {
            m->plugin = plugin;
        }
    }
    ahm_lua_t *impl = m->impl;
    pthread_mutex_unlock(&m->mutex);
    return impl;
}

int ah_lua_mongo_open(lua_State *L)
{
    ah_lua_mongo_t *m = lua_touserdata(L, lua_upvalueindex(1));
    char err[AH_ERRLEN * 2];
    const ah_mongo_plugin_t *plugin = ah_mongo_load(err, sizeof(err));
    ahm_lua_t *impl = NULL;
    if (plugin != NULL && m != NULL) {
        impl = impl_of(m, plugin, err, sizeof(err));
    }
    if (plugin == NULL || (m != NULL && impl == NULL)) {
        return luaL_error(L, "agent.mongo: %s", err);
    }
    lua_pushlightuserdata(L, impl);
    lua_pushcclosure(L, plugin->lua_open, 1);
    lua_pushvalue(L, 1); /* the module name, as require passed it */
    lua_call(L, 1, 1);
    return 1;
}
