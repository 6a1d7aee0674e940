/* Implementation of ah_mongo.h, the core-side front of everything MongoDB: the
 * ah_store_mongo_* and ah_lua_mongo_* functions load the plugin on first real use and forward to
 * its table. The agent.mongo connection object here only records its arguments until a script
 * requires the module (or a URI of its own is given), so an agent that never touches MongoDB never
 * maps libmongoc. */
#include "ah_mongo.h"

#include "ah_plugin.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
/* Set once, at the end of the first load (read without the once by ah_mongo_loaded). */
static _Atomic(const ah_mongo_plugin_t *) loaded_plugin;
static char load_error[AH_ERRLEN * 2];

/* ---- loading the plugin (ah_plugin.h) ------------------------------------------------------- */

static void load_plugin(void)
{
    atomic_store(&loaded_plugin, (const ah_mongo_plugin_t *)ah_plugin_open(
                                     AH_MONGO_PLUGIN_FILE, AH_MONGO_PLUGIN_SYMBOL,
                                     AH_MONGO_PLUGIN_ABI, load_error, sizeof(load_error)));
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
