/* The agenthost command line: run | check | ctl | version (README.md). Exit codes: 0 clean
 * shutdown, 1 runtime failure, 2 bad usage, configuration or script. */
#include "ah_config.h"
#include "ah_ctl.h"
#include "ah_curl.h"
#include "ah_host.h"
#include "ah_log.h"
#include "ah_lua.h"
#include "ah_mongo.h"
#include "ah_redact.h"

#include <luajit.h>
#include <malloc.h>
#include <microhttpd.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

static const char usage[] =
    "usage: agenthost [run] SCRIPT.lua [options]   run an agent\n"
    "       agenthost check SCRIPT.lua              load the script and verify the contract\n"
    "       agenthost ctl COMMAND [options]         talk to a running agent (ctl --help)\n"
    "       agenthost version                       print versions\n"
    "\n"
    "Every command accepts --help. Settings come from the environment; flags override:\n";

/* Prints a table cell without the Markdown backticks it carries for the README. */
static void print_plain(FILE *out, const char *s, int width)
{
    int n = 0;
    for (; *s != '\0'; s++) {
        if (*s != '`') {
            fputc(*s, out);
            n++;
        }
    }
    fprintf(out, "%*s", n < width ? width - n : 0, "");
}

/* The settings, one per line, from the same table that README.md's Settings section shows. */
static void print_run_help(FILE *out)
{
    fputs(usage, out);
    for (const ah_config_var_t *v = ah_config_vars(); v->name != NULL; v++) {
        char range[64];
        ah_config_describe_range(v, range, sizeof(range));
        fprintf(out, "  %-30s %-25s default ", v->name, v->flag ? v->flag : "");
        print_plain(out, ah_config_default_doc(v), 21);
        fputc(' ', out);
        print_plain(out, v->help, 0);
        if (range[0] != '\0') {
            fprintf(out, " [%s]", range);
        }
        fputc('\n', out);
    }
    fputs("\nexit codes: 0 clean shutdown, 1 runtime failure, 2 bad usage, config or script\n",
          out);
}

/* Every message of the command line goes out through here: credentials become "***". */
static void print_error(const char *prefix, const char *message)
{
    char shown[AH_ERRLEN * 4];
    fprintf(stderr, "%s: %s\n", prefix, ah_redact_text(message, shown, sizeof(shown)));
}

static bool wants_help(int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            return true;
        }
    }
    return false;
}

/* The only command that loads the plugins just to ask them something (the versions of libmongoc
 * and libcurl); a plugin that cannot be loaded is named "unavailable" and the reason goes to
 * stderr. */
static int cmd_version(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        printf("usage: agenthost version\n\nPrints the versions of agenthost and of the libraries "
               "it runs with\n(libmongoc and libcurl through their plugins, if they can be "
               "loaded).\n");
        return 0;
    }
    char mongo_err[AH_ERRLEN * 2];
    char curl_err[AH_ERRLEN * 2];
    const ah_mongo_plugin_t *mongo = ah_mongo_load(mongo_err, sizeof(mongo_err));
    const ah_curl_plugin_t *curl = ah_curl_load(curl_err, sizeof(curl_err));
    printf("agenthost %s (%s, libmongoc %s, libcurl %s, libuv %s, libmicrohttpd %s, SQLite %s)\n",
           AH_VERSION, LUAJIT_VERSION, mongo != NULL ? mongo->driver_version() : "unavailable",
           curl != NULL ? curl->curl_version() : "unavailable", uv_version_string(),
           MHD_get_version(), sqlite3_libversion());
    if (mongo == NULL) {
        print_error("agenthost", mongo_err);
    }
    if (curl == NULL) {
        print_error("agenthost", curl_err);
    }
    return 0;
}

static int cmd_check(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        printf("usage: agenthost check SCRIPT.lua\n\nLoads the script and verifies that it "
               "returns a table with a batch function\n(and that hooks, if present, are "
               "functions). Exit 0 if so, 2 with the reason otherwise.\n");
        return 0;
    }
    if (argc != 1) {
        fprintf(stderr, "agenthost check: expected one SCRIPT.lua argument\n");
        return 2;
    }
    char err[AH_ERRLEN * 4];
    ah_lua_options_t opts = {.agent_id = "check", .state = NULL, .batch_timeout = 10};
    ah_lua_t *lua = ah_lua_open(&opts, argv[0], err, sizeof(err));
    if (lua == NULL) {
        print_error("agenthost check", err);
        return 2;
    }
    ah_lua_close(lua);
    printf("%s: OK\n", argv[0]);
    return 0;
}

static int cmd_run(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        print_run_help(stdout);
        return 0;
    }
    /* SQLite allocates no page cache in advance (its default: 20 pages per connection at the
     * first read, about 88 KiB each, resident); pages are allocated as the small state file
     * needs them. Before any other SQLite call (it fails harmlessly after one). */
    sqlite3_config(SQLITE_CONFIG_PAGECACHE, NULL, 0, 0);
    ah_config_t cfg;
    char err[AH_ERRLEN * 4];
    ah_config_defaults(&cfg);
    if (ah_config_from_env(&cfg, err, sizeof(err)) != 0 ||
        ah_config_from_args(&cfg, argc, argv, err, sizeof(err)) != 0) {
        print_error("agenthost", err);
        ah_config_free(&cfg);
        return 2;
    }
    if (cfg.script_path == NULL) {
        fprintf(stderr, "agenthost: no SCRIPT.lua given\n\n");
        print_run_help(stderr);
        ah_config_free(&cfg);
        return 2;
    }
    ah_log_setup(cfg.log_level, cfg.log_json, cfg.agent_id);
    ah_host_options_t hopts = {.exit_on_shutdown_timeout = true, .load_on_worker = true};
    ah_host_t *host = ah_host_new(&cfg, &hopts, err, sizeof(err));
    if (host == NULL) {
        print_error("agenthost", err);
        ah_config_free(&cfg);
        return 2;
    }
    int rc = ah_host_run(host, err, sizeof(err));
    if (rc == AH_HOST_WEDGED) {
        _exit(1); /* the Lua worker is stuck in a call; it cannot be joined or freed */
    }
    if (rc == AH_HOST_LOAD_FAILED) {
        print_error("agenthost", err); /* as a script that does not load always was */
        rc = 2;
    } else if (rc != 0) {
        ah_log_error("agenthost: %s", err);
    }
    ah_host_free(host);
    ah_config_free(&cfg);
    /* Join libuv's thread pool (agent.mongo's driver calls ran there): the threads' exit
     * handlers free what they hold (OpenSSL's per-thread state) before the process ends. */
    uv_library_shutdown();
    return rc;
}

int main(int argc, char **argv)
{
#ifdef M_ARENA_MAX
    /* One malloc arena for every thread (glibc gives each thread that allocates one of its own,
     * up to 8 per core: a 64 MiB reservation and its first pages each). Small blocks come from
     * each thread's cache without the arena's lock; Lua allocates from its own allocator. Fewer
     * mappings and pages to touch at start, and less resident memory (docs/ARCHITECTURE.md,
     * "Threads"). An environment's MALLOC_ARENA_MAX or glibc.malloc.arena_max wins. */
    const char *tunables = getenv("GLIBC_TUNABLES");
    if (getenv("MALLOC_ARENA_MAX") == NULL &&
        (tunables == NULL || strstr(tunables, "arena_max") == NULL)) {
        mallopt(M_ARENA_MAX, 1);
    }
#endif
    ah_config_register_secrets();
    if (argc < 2) {
        print_run_help(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        print_run_help(stdout);
        return 0;
    }
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        return cmd_version(argc - 2, argv + 2);
    }
    if (strcmp(cmd, "check") == 0) {
        return cmd_check(argc - 2, argv + 2);
    }
    if (strcmp(cmd, "ctl") == 0) {
        return ah_ctl_main(argc - 2, argv + 2);
    }
    if (strcmp(cmd, "run") == 0) {
        return cmd_run(argc - 2, argv + 2);
    }
    /* `agenthost SCRIPT.lua`: a word that is no file and looks like a command is a typo. */
    static const char *const commands[] = {"run", "check", "ctl", "version", "help", NULL};
    const char *meant = ah_suggest(cmd, commands, NULL);
    if (cmd[0] != '-' && strchr(cmd, '/') == NULL && strchr(cmd, '.') == NULL &&
        access(cmd, F_OK) != 0) {
        if (meant != NULL) {
            fprintf(stderr, "agenthost: unknown command \"%s\" (did you mean \"%s\"?)\n", cmd,
                    meant);
        } else {
            fprintf(stderr,
                    "agenthost: unknown command \"%s\" (commands: run, check, ctl, "
                    "version; or a SCRIPT.lua to run)\n",
                    cmd);
        }
        return 2;
    }
    return cmd_run(argc - 1, argv + 1);
}
