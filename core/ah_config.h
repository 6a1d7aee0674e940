/* Configuration: built from the environment (docs: README.md, Settings), then overridden by
 * command-line flags, then validated. Invalid values are rejected with a message naming the
 * variable. */
#ifndef AH_CONFIG_H
#define AH_CONFIG_H

#include "ah_log.h"

#include <stdbool.h>
#include <stddef.h>

typedef struct ah_config_s ah_config_t;

/* The settings of one agent. Each field is described (variable, default, bounds) by its row in
 * ah_config_vars(); the comments here only say what an unusual value means. */
struct ah_config_s {
    char *mongodb_uri;                    /* MONGODB_URI; NULL → embedded store */
    char *mongodb_database;               /* MONGODB_DATABASE */
    char *agent_mongodb_uri;              /* AGENT_MONGODB_URI; NULL → MONGODB_URI */
    char *agent_mongodb_db;               /* AGENT_MONGODB_DATABASE; NULL → URI's, else ↑ */
    bool distributed_control;             /* ENABLE_DISTRIBUTED_CONTROL */
    bool change_streams;                  /* ENABLE_CHANGE_STREAMS */
    double polling_interval;              /* CONTROL_POLLING_INTERVAL, seconds */
    char *state_path;                     /* AGENTHOST_STATE */
    char *http_bind;                      /* HTTP_BIND */
    int http_port;                        /* HTTP_PORT; 0 = any free port */
    char *http_allowed_hosts;             /* HTTP_ALLOWED_HOSTS: comma-separated; NULL → none */
    bool http_console;                    /* HTTP_CONSOLE: the fleet console at GET / */
    char *agent_id;                       /* AGENT_ID */
    char *agent_labels;                   /* AGENT_LABELS; NULL → none */
    char *agent_labels_file;              /* AGENT_LABELS_FILE; NULL → none */
    char *api_token;                      /* AGENT_API_TOKEN; NULL → no auth */
    ah_log_level_t log_level;             /* LOG_LEVEL */
    bool log_json;                        /* LOG_FORMAT=json */
    double batch_timeout;                 /* BATCH_TIMEOUT, seconds */
    double shutdown_timeout;              /* SHUTDOWN_TIMEOUT, seconds: hard bound on shutdown */
    double pause_drain_timeout;           /* PAUSE_DRAIN_TIMEOUT, seconds: the drain deadline of a
                                             pause that names none; 0 = none */
    double change_stream_verify_interval; /* CHANGE_STREAM_VERIFY_INTERVAL, seconds; 0 = never */
    size_t lua_memory_limit;              /* LUA_MEMORY_LIMIT, bytes; 0 = no limit */
    double embedded_poll_interval;        /* AGENTHOST_STATE_POLL, seconds */
    double heartbeat_interval;            /* AGENT_HEARTBEAT_INTERVAL, seconds */
    double status_ttl;                    /* AGENT_STATUS_TTL, seconds */
    char *script_path;                    /* the Lua script (positional argument) */
    bool signals;                         /* AGENTHOST_SIGNALS: handle SIGTERM/INT/USR1/USR2/HUP */
};

/* How a setting's text becomes a value in ah_config_t. */
typedef enum {
    AH_CONFIG_STRING,  /* char *, owned by the config; see AH_CONFIG_EMPTY_UNSETS */
    AH_CONFIG_BOOL,    /* bool: true/false/1/0/yes/no, case-insensitive */
    AH_CONFIG_SECONDS, /* double: a finite number of seconds within [min, max] */
    AH_CONFIG_INT,     /* int: a decimal integer within [min, max] */
    AH_CONFIG_BYTES,   /* size_t: bytes with an optional k/m/g suffix, within [min, max] */
    AH_CONFIG_CUSTOM,  /* parsed by the row's parse function */
} ah_config_kind_t;

/* Row flags. */
/* Strings: "" leaves the setting unset (NULL) instead of being an error. */
#define AH_CONFIG_EMPTY_UNSETS 0x1u
/* Numbers: 0 is accepted outside [min, max] and means "off" / "no limit". */
#define AH_CONFIG_ZERO_DISABLES 0x2u
/* Strings: the whole value is a secret (ah_redact.h): registered, never shown in an error. */
#define AH_CONFIG_SECRET 0x4u
/* Strings: a URI whose credentials are secrets: registered, shown redacted in an error. */
#define AH_CONFIG_SECRET_URI 0x8u

typedef struct ah_config_var_s ah_config_var_t;

/* One setting: the single description that defaults, the environment, the flags, validation,
 * `--help`, ah_config_free() and the README table (checked by tests/unit/test_config.c) all read.
 */
struct ah_config_var_s {
    const char *name; /* environment variable */
    const char *flag; /* command-line flag of `agenthost run`, or NULL (environment only) */
    ah_config_kind_t kind;
    size_t offset;             /* of the field in ah_config_t (unused by fields-less CUSTOM rows) */
    unsigned flags;            /* AH_CONFIG_* row flags */
    const char *default_value; /* parsed by ah_config_defaults(); NULL: unset or computed */
    const char *default_doc;   /* documented default when it is not default_value, else NULL */
    double min, max;           /* numbers: inclusive bounds (bytes as a count of bytes) */
    /* STRING: extra validation, 0 or AH_EINVAL. NULL: any value. */
    int (*check)(const char *value);
    /* CUSTOM: stores value into cfg, 0 or AH_EINVAL. */
    int (*parse)(ah_config_t *cfg, const ah_config_var_t *var, const char *value);
    /* STRING: computes the default when default_value is NULL (may be NULL: unset). */
    char *(*compute_default)(void);
    const char *expect; /* what a valid value looks like, for errors (numbers: generated) */
    const char *help;   /* one line for --help and the README */
};

/* The table of every variable the binary reads, terminated by an entry whose name is NULL. */
const ah_config_var_t *ah_config_vars(void);
/* The row of one variable, or NULL. */
const ah_config_var_t *ah_config_find(const char *name);
/* Writes the accepted values of a numeric row ("0.01 to 3600 s", "0 or 1m to 1024g"), or "" for
 * other kinds, into buf (NUL-terminated, truncated to len). */
void ah_config_describe_range(const ah_config_var_t *var, char *buf, size_t len);
/* The documented default of a row: default_doc, else default_value, else "unset". */
const char *ah_config_default_doc(const ah_config_var_t *var);

/* Fills cfg with the defaults of the table. cfg must be released with ah_config_free(). */
void ah_config_defaults(ah_config_t *cfg);
/* Applies the environment on top of cfg. Returns 0, or AH_EINVAL with err naming the variable. */
int ah_config_from_env(ah_config_t *cfg, char *err, size_t errlen);
/* Sets one setting by variable name (used for env and flags). 0 or AH_EINVAL (err set). */
int ah_config_set(ah_config_t *cfg, const char *name, const char *value, char *err, size_t errlen);
/* Parses the flags of `agenthost run` (argv[0] is the first argument after "run"): --name=value
 * or --name value for every flag in ah_config_vars(), and one positional SCRIPT. 0 or AH_EINVAL. */
int ah_config_from_args(ah_config_t *cfg, int argc, char **argv, char *err, size_t errlen);
/* Registers the secrets of every secret row found in the environment (ah_redact.h), for the
 * commands that do not read the whole configuration (check, ctl); ah_config_set() registers
 * what it is given. */
void ah_config_register_secrets(void);
/* Parses a boolean: true/false/1/0/yes/no, case-insensitive. 0 or AH_EINVAL. */
int ah_config_parse_bool(const char *s, bool *out);
/* Releases the strings owned by cfg (every STRING row); cfg may be reused after
 * ah_config_defaults(). */
void ah_config_free(ah_config_t *cfg);

#endif
