/* Configuration: built from the environment (docs: README.md, Settings), then overridden by
 * command-line flags, then validated. Invalid values are rejected with a message naming the
 * variable. */
#ifndef AH_CONFIG_H
#define AH_CONFIG_H

#include "ah_log.h"

#include <stdbool.h>
#include <stddef.h>

typedef struct ah_config_s {
    char *mongodb_uri;        /* MONGODB_URI; NULL → embedded store */
    char *mongodb_database;   /* MONGODB_DATABASE, default "agenthost" */
    char *agent_mongodb_uri;  /* AGENT_MONGODB_URI (agent.mongo); NULL → MONGODB_URI */
    char *agent_mongodb_db;   /* AGENT_MONGODB_DATABASE; NULL → URI's, else MONGODB_DATABASE */
    bool distributed_control; /* ENABLE_DISTRIBUTED_CONTROL, default true */
    bool change_streams;      /* ENABLE_CHANGE_STREAMS, default true */
    double polling_interval;  /* CONTROL_POLLING_INTERVAL seconds, default 10 (mongo) */
    char *state_path;         /* AGENTHOST_STATE, default ./agenthost-state.db */
    char *http_bind;          /* HTTP_BIND, default 0.0.0.0 */
    int http_port;            /* HTTP_PORT, default 8000; 0 = any free port */
    bool http_console;        /* HTTP_CONSOLE, default true: the console at GET / */
    char *agent_id;           /* AGENT_ID, default $HOSTNAME, else gethostname() */
    char *api_token;          /* AGENT_API_TOKEN; NULL → no auth */
    ah_log_level_t log_level; /* LOG_LEVEL, default info */
    bool log_json;            /* LOG_FORMAT=json */
    double batch_timeout;     /* BATCH_TIMEOUT seconds, default 300 */
    double shutdown_timeout;  /* SHUTDOWN_TIMEOUT seconds, default 25: hard bound on shutdown */
    double change_stream_verify_interval; /* CHANGE_STREAM_VERIFY_INTERVAL seconds, default 60;
                                             0 = never verify a silent stream by a read */
    size_t lua_memory_limit;       /* LUA_MEMORY_LIMIT bytes (suffix k/m/g accepted), 0 = none */
    double embedded_poll_interval; /* AGENTHOST_STATE_POLL seconds, default 0.1 */
    char *script_path;             /* the Lua script (positional argument) */
    bool signals; /* AGENTHOST_SIGNALS, default true: handle SIGTERM/INT/USR1/USR2/HUP */
} ah_config_t;

/* One accepted environment variable (for docs and the manifest cross-check). */
typedef struct ah_config_var_s {
    const char *name;
    const char *flag;          /* command-line flag or NULL */
    const char *default_value; /* as documented */
    const char *help;
} ah_config_var_t;

/* The table of every variable the binary reads, terminated by a {NULL} entry. */
const ah_config_var_t *ah_config_vars(void);

/* Fills cfg with defaults. cfg must be released with ah_config_free(). */
void ah_config_defaults(ah_config_t *cfg);
/* Applies the environment on top of cfg. Returns 0, or AH_EINVAL with err naming the variable. */
int ah_config_from_env(ah_config_t *cfg, char *err, size_t errlen);
/* Sets one setting by variable name (used for env and flags). 0 or AH_EINVAL (err set). */
int ah_config_set(ah_config_t *cfg, const char *name, const char *value, char *err, size_t errlen);
/* Parses the flags of `agenthost run` (argv[0] is the first argument after "run"): --name=value
 * or --name value for every flag in ah_config_vars(), and one positional SCRIPT. 0 or AH_EINVAL. */
int ah_config_from_args(ah_config_t *cfg, int argc, char **argv, char *err, size_t errlen);
/* Parses a boolean: true/false/1/0/yes/no, case-insensitive. 0 or AH_EINVAL. */
int ah_config_parse_bool(const char *s, bool *out);
/* Releases the strings owned by cfg; cfg may be reused after ah_config_defaults(). */
void ah_config_free(ah_config_t *cfg);

#endif
