/* Implementation of ah_config.h. Every setting is described once in the vars table; the
 * environment and the flags both go through ah_config_set(), so validation lives in one place. */
#include "ah_config.h"

#include "ah_common.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static const ah_config_var_t config_vars[] = {
    {"MONGODB_URI", "--mongodb-uri", "unset", "MongoDB deployment for distributed control"},
    {"MONGODB_DATABASE", "--mongodb-database", "agenthost", "database holding agent_control"},
    {"AGENT_MONGODB_URI", "--agent-mongodb-uri", "MONGODB_URI",
     "MongoDB deployment for the script's work data (agent.mongo)"},
    {"AGENT_MONGODB_DATABASE", "--agent-mongodb-database",
     "the URI's database, else MONGODB_DATABASE", "default database of agent.mongo.collection()"},
    {"ENABLE_DISTRIBUTED_CONTROL", NULL, "true", "false: local control only"},
    {"ENABLE_CHANGE_STREAMS", NULL, "true", "false: poll MongoDB instead of watching"},
    {"CONTROL_POLLING_INTERVAL", "--polling-interval", "10", "seconds between polls"},
    {"CHANGE_STREAM_VERIFY_INTERVAL", NULL, "60",
     "seconds of stream silence before a verifying read (0: never)"},
    {"AGENTHOST_STATE", "--state", "./agenthost-state.db", "embedded store file"},
    {"AGENTHOST_STATE_POLL", NULL, "0.1", "seconds between embedded store checks"},
    {"HTTP_BIND", "--bind", "0.0.0.0", "API listen address"},
    {"HTTP_PORT", "--port", "8000", "API port (0: any free port)"},
    {"HTTP_CONSOLE", NULL, "true", "false: no fleet console at GET /"},
    {"AGENT_ID", "--agent-id", "$HOSTNAME", "this agent's name"},
    {"AGENT_API_TOKEN", NULL, "unset", "bearer token required by mutating routes"},
    {"LOG_LEVEL", "--log-level", "info", "debug|info|warn|error"},
    {"LOG_FORMAT", "--log-format", "text", "text|json"},
    {"LUA_MEMORY_LIMIT", "--lua-memory-limit", "0",
     "bytes the script may allocate, e.g. 256m (0: no limit)"},
    {"BATCH_TIMEOUT", "--batch-timeout", "300", "seconds a batch or hook may run"},
    {"SHUTDOWN_TIMEOUT", "--shutdown-timeout", "25", "seconds shutdown may take before exit 1"},
    {"AGENTHOST_SIGNALS", NULL, "true", "false: leave SIGTERM/SIGINT/SIGUSR1/SIGUSR2/SIGHUP alone"},
    {"AGENTHOST_PLUGIN_DIR", NULL, "beside the binary",
     "directory of agenthost_mongo.so, MongoDB support (env only)"},
    {NULL, NULL, NULL, NULL},
};

const ah_config_var_t *ah_config_vars(void)
{
    return config_vars;
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

void ah_config_defaults(ah_config_t *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->mongodb_database = strdup("agenthost");
    cfg->distributed_control = true;
    cfg->change_streams = true;
    cfg->polling_interval = 10.0;
    cfg->state_path = strdup("./agenthost-state.db");
    cfg->http_bind = strdup("0.0.0.0");
    cfg->http_port = 8000;
    cfg->log_level = AH_LOG_INFO;
    cfg->batch_timeout = 300.0;
    cfg->shutdown_timeout = 25.0;
    cfg->embedded_poll_interval = 0.1;
    cfg->signals = true;
    cfg->http_console = true;
    cfg->change_stream_verify_interval = 60.0;
    char host[256] = "";
    const char *env_host = getenv("HOSTNAME");
    if (env_host != NULL && env_host[0] != '\0') {
        ah_strlcpy(host, env_host, sizeof(host));
    } else if (gethostname(host, sizeof(host) - 1) != 0 || host[0] == '\0') {
        ah_strlcpy(host, "agent", sizeof(host));
    }
    cfg->agent_id = strdup(host);
}

void ah_config_free(ah_config_t *cfg)
{
    if (cfg == NULL) {
        return;
    }
    free(cfg->mongodb_uri);
    free(cfg->mongodb_database);
    free(cfg->agent_mongodb_uri);
    free(cfg->agent_mongodb_db);
    free(cfg->state_path);
    free(cfg->http_bind);
    free(cfg->agent_id);
    free(cfg->api_token);
    free(cfg->script_path);
    memset(cfg, 0, sizeof(*cfg));
}

int ah_config_parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"true", "1", "yes"};
    static const char *const no[] = {"false", "0", "no"};
    for (size_t i = 0; s != NULL && i < 3; i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = true;
            return AH_OK;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = false;
            return AH_OK;
        }
    }
    return AH_EINVAL;
}

/* Parses a positive finite number of seconds. */
static int parse_seconds(const char *s, double *out)
{
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || !isfinite(v) || v <= 0) {
        return AH_EINVAL;
    }
    *out = v;
    return AH_OK;
}

/* Parses "0", "262144", "512k", "256m", "1g" (case-insensitive). A non-zero limit must be at
 * least 1 MiB: LuaJIT's libraries alone need several hundred KiB. */
static int parse_bytes(const char *s, size_t *out)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || s[0] == '-') {
        return AH_EINVAL;
    }
    unsigned long long mult = 1;
    if (*end == 'k' || *end == 'K') {
        mult = 1ULL << 10;
        end++;
    } else if (*end == 'm' || *end == 'M') {
        mult = 1ULL << 20;
        end++;
    } else if (*end == 'g' || *end == 'G') {
        mult = 1ULL << 30;
        end++;
    }
    if (*end != '\0' || (v != 0 && v * mult < (1ULL << 20)) || v > (1ULL << 40) / mult) {
        return AH_EINVAL;
    }
    *out = (size_t)(v * mult);
    return AH_OK;
}

static int set_string(char **slot, const char *value)
{
    char *copy = dup_or_null(value);
    if (value != NULL && copy == NULL) {
        return AH_ENOMEM;
    }
    free(*slot);
    *slot = copy;
    return AH_OK;
}

int ah_config_set(ah_config_t *cfg, const char *name, const char *value, char *err, size_t errlen)
{
    int rc = AH_OK;
    const char *expect = NULL;
    if (strcmp(name, "MONGODB_URI") == 0) {
        if (value[0] != '\0' && strncmp(value, "mongodb://", 10) != 0 &&
            strncmp(value, "mongodb+srv://", 14) != 0) {
            expect = "a URI starting with mongodb:// or mongodb+srv://";
        } else {
            rc = set_string(&cfg->mongodb_uri, value[0] ? value : NULL);
        }
    } else if (strcmp(name, "MONGODB_DATABASE") == 0) {
        if (value[0] == '\0' || strpbrk(value, "/\\. \"$") != NULL || strlen(value) > 63) {
            expect = "a MongoDB database name (1-63 characters, none of /\\. \"$)";
        } else {
            rc = set_string(&cfg->mongodb_database, value);
        }
    } else if (strcmp(name, "AGENT_MONGODB_URI") == 0) {
        if (value[0] != '\0' && strncmp(value, "mongodb://", 10) != 0 &&
            strncmp(value, "mongodb+srv://", 14) != 0) {
            expect = "a URI starting with mongodb:// or mongodb+srv://";
        } else {
            rc = set_string(&cfg->agent_mongodb_uri, value[0] ? value : NULL);
        }
    } else if (strcmp(name, "AGENT_MONGODB_DATABASE") == 0) {
        if (value[0] != '\0' && (strpbrk(value, "/\\. \"$") != NULL || strlen(value) > 63)) {
            expect = "a MongoDB database name (1-63 characters, none of /\\. \"$)";
        } else {
            rc = set_string(&cfg->agent_mongodb_db, value[0] ? value : NULL);
        }
    } else if (strcmp(name, "ENABLE_DISTRIBUTED_CONTROL") == 0) {
        if (ah_config_parse_bool(value, &cfg->distributed_control) != 0) {
            expect = "true/false/1/0/yes/no";
        }
    } else if (strcmp(name, "ENABLE_CHANGE_STREAMS") == 0) {
        if (ah_config_parse_bool(value, &cfg->change_streams) != 0) {
            expect = "true/false/1/0/yes/no";
        }
    } else if (strcmp(name, "CONTROL_POLLING_INTERVAL") == 0) {
        if (parse_seconds(value, &cfg->polling_interval) != 0) {
            expect = "a number of seconds > 0";
        }
    } else if (strcmp(name, "CHANGE_STREAM_VERIFY_INTERVAL") == 0) {
        if (strcmp(value, "0") == 0) {
            cfg->change_stream_verify_interval = 0;
        } else if (parse_seconds(value, &cfg->change_stream_verify_interval) != 0) {
            expect = "a number of seconds >= 0 (0 disables)";
        }
    } else if (strcmp(name, "HTTP_CONSOLE") == 0) {
        if (ah_config_parse_bool(value, &cfg->http_console) != 0) {
            expect = "true/false/1/0/yes/no";
        }
    } else if (strcmp(name, "AGENTHOST_SIGNALS") == 0) {
        if (ah_config_parse_bool(value, &cfg->signals) != 0) {
            expect = "true/false/1/0/yes/no";
        }
    } else if (strcmp(name, "AGENTHOST_PLUGIN_DIR") == 0) {
        /* Read by core/ah_mongo.c from the environment, once per process, when MongoDB support is
         * first needed; accepted here so that it is a known setting, refused when it would not
         * take effect (set through the embedding API to another value). */
        const char *env = getenv(name);
        if (env == NULL || strcmp(env, value) != 0) {
            expect = "to be set in the environment (it is read from there)";
        }
    } else if (strcmp(name, "LUA_MEMORY_LIMIT") == 0) {
        if (parse_bytes(value, &cfg->lua_memory_limit) != 0) {
            expect = "a number of bytes with an optional k, m or g suffix (0: no limit), at least "
                     "1m when set";
        }
    } else if (strcmp(name, "AGENTHOST_STATE_POLL") == 0) {
        if (parse_seconds(value, &cfg->embedded_poll_interval) != 0) {
            expect = "a number of seconds > 0";
        }
    } else if (strcmp(name, "BATCH_TIMEOUT") == 0) {
        if (parse_seconds(value, &cfg->batch_timeout) != 0) {
            expect = "a number of seconds > 0";
        }
    } else if (strcmp(name, "SHUTDOWN_TIMEOUT") == 0) {
        if (parse_seconds(value, &cfg->shutdown_timeout) != 0) {
            expect = "a number of seconds > 0";
        }
    } else if (strcmp(name, "AGENTHOST_STATE") == 0) {
        if (value[0] == '\0') {
            expect = "a file path";
        } else {
            rc = set_string(&cfg->state_path, value);
        }
    } else if (strcmp(name, "HTTP_BIND") == 0) {
        if (value[0] == '\0') {
            expect = "an IPv4 address such as 0.0.0.0";
        } else {
            rc = set_string(&cfg->http_bind, value);
        }
    } else if (strcmp(name, "HTTP_PORT") == 0) {
        char *end = NULL;
        errno = 0;
        long port = strtol(value, &end, 10);
        if (errno != 0 || end == value || *end != '\0' || port < 0 || port > 65535) {
            expect = "a port number 0-65535";
        } else {
            cfg->http_port = (int)port;
        }
    } else if (strcmp(name, "AGENT_ID") == 0) {
        if (value[0] == '\0' || strlen(value) > AH_NAME_MAX ||
            !ah_utf8_valid(value, strlen(value))) {
            expect = "a non-empty UTF-8 name of at most 255 bytes";
        } else {
            rc = set_string(&cfg->agent_id, value);
        }
    } else if (strcmp(name, "AGENT_API_TOKEN") == 0) {
        rc = set_string(&cfg->api_token, value[0] ? value : NULL);
    } else if (strcmp(name, "LOG_LEVEL") == 0) {
        if (ah_log_parse_level(value, &cfg->log_level) != 0) {
            expect = "debug, info, warn or error";
        }
    } else if (strcmp(name, "LOG_FORMAT") == 0) {
        if (strcasecmp(value, "json") == 0) {
            cfg->log_json = true;
        } else if (strcasecmp(value, "text") == 0) {
            cfg->log_json = false;
        } else {
            expect = "text or json";
        }
    } else {
        snprintf(err, errlen, "unknown setting %s", name);
        return AH_EINVAL;
    }
    if (expect != NULL) {
        snprintf(err, errlen, "invalid %s=\"%.200s\": expected %s", name, value, expect);
        return AH_EINVAL;
    }
    if (rc != AH_OK) {
        snprintf(err, errlen, "out of memory setting %s", name);
    }
    return rc;
}

int ah_config_from_env(ah_config_t *cfg, char *err, size_t errlen)
{
    for (const ah_config_var_t *v = config_vars; v->name != NULL; v++) {
        const char *value = getenv(v->name);
        if (value == NULL) {
            continue;
        }
        int rc = ah_config_set(cfg, v->name, value, err, errlen);
        if (rc != AH_OK) {
            return rc;
        }
    }
    return AH_OK;
}

int ah_config_from_args(ah_config_t *cfg, int argc, char **argv, char *err, size_t errlen)
{
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0') {
            if (cfg->script_path != NULL) {
                snprintf(err, errlen, "unexpected argument \"%.200s\" (one SCRIPT only)", arg);
                return AH_EINVAL;
            }
            if (set_string(&cfg->script_path, arg) != AH_OK) {
                snprintf(err, errlen, "out of memory");
                return AH_ENOMEM;
            }
            continue;
        }
        const char *eq = strchr(arg, '=');
        size_t flag_len = eq ? (size_t)(eq - arg) : strlen(arg);
        const ah_config_var_t *var = NULL;
        for (const ah_config_var_t *v = config_vars; v->name != NULL; v++) {
            if (v->flag != NULL && strlen(v->flag) == flag_len &&
                strncmp(v->flag, arg, flag_len) == 0) {
                var = v;
                break;
            }
        }
        if (var == NULL) {
            snprintf(err, errlen, "unknown option %.*s (see --help)", (int)flag_len, arg);
            return AH_EINVAL;
        }
        const char *value = eq ? eq + 1 : NULL;
        if (value == NULL) {
            if (i + 1 >= argc) {
                snprintf(err, errlen, "option %s needs a value", var->flag);
                return AH_EINVAL;
            }
            value = argv[++i];
        }
        char inner[AH_ERRLEN];
        if (ah_config_set(cfg, var->name, value, inner, sizeof(inner)) != AH_OK) {
            snprintf(err, errlen, "%s (option %s)", inner, var->flag);
            return AH_EINVAL;
        }
    }
    return AH_OK;
}
