/* Implementation of ah_plugin.h: the search path of the plugins and the checks a table passes
 * before the core uses it. */
#define _GNU_SOURCE /* dladdr1, RTLD_DL_LINKMAP */
#include "ah_plugin.h"

#include "ah_common.h"

#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef AH_VERSION
#error "AH_VERSION must be defined by the build"
#endif

#define SEARCH_DIRS_MAX 4

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

/* Opens the plugin at path and checks its table. NULL with err set on failure. */
static const void *open_at(const char *path, const char *symbol, int abi, char *err, size_t errlen)
{
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        const char *why = dlerror();
        if (strncmp(why, path, strlen(path)) == 0) { /* glibc's message starts with the path */
            snprintf(err, errlen, "cannot load %.800s", why);
        } else {
            snprintf(err, errlen, "cannot load %.400s: %.400s", path, why);
        }
        return NULL;
    }
    const ah_plugin_header_t *header = dlsym(handle, symbol);
    if (header == NULL) {
        snprintf(err, errlen, "%.400s is not an agenthost plugin: %.400s", path, dlerror());
    } else if (header->abi_version != abi) {
        snprintf(err, errlen, "%.400s has plugin ABI %d, expected %d", path, header->abi_version,
                 abi);
    } else if (header->build_version == NULL || strcmp(header->build_version, AH_VERSION) != 0) {
        snprintf(err, errlen, "%.400s belongs to agenthost %.40s, this is %s", path,
                 header->build_version ? header->build_version : "?", AH_VERSION);
    } else {
        return header;
    }
    dlclose(handle);
    return NULL;
}

const void *ah_plugin_open(const char *file, const char *symbol, int abi, char *err, size_t errlen)
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
        if (snprintf(path, sizeof(path), "%s/%s", dirs[i], file) >= (int)sizeof(path)) {
            continue;
        }
        if (access(path, F_OK) == 0) {
            return open_at(path, symbol, abi, err, errlen); /* the first one found decides */
        }
        size_t used = strlen(searched);
        snprintf(searched + used, sizeof(searched) - used, "%s%.200s", used ? ", " : "", dirs[i]);
    }
    snprintf(err, errlen, "%s not found in %s%s", file,
             searched[0] ? searched : "(no directory to search)",
             override != NULL && override[0] != '\0' ? " (AGENTHOST_PLUGIN_DIR)"
                                                     : " (set AGENTHOST_PLUGIN_DIR)");
    return NULL;
}
