/* Implementation of ah_config.h. Every setting is one typed row of config_vars[]: defaults, the
 * environment, the flags (all through ah_config_set()), validation, `--help` and
 * ah_config_free() read that row and nothing else, so a setting is added in one place. */
#include "ah_config.h"

#include "ah_common.h"
#include "ah_redact.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define KIB 1024.0
#define MIB (1024.0 * 1024.0)
#define GIB (1024.0 * 1024.0 * 1024.0)

static int check_mongodb_uri(const char *value)
{
    return strncmp(value, "mongodb://", 10) == 0 || strncmp(value, "mongodb+srv://", 14) == 0
               ? AH_OK
               : AH_EINVAL;
}

static int check_database_name(const char *value)
{
    return strpbrk(value, "/\\. \"$") != NULL || strlen(value) > 63 ? AH_EINVAL : AH_OK;
}

static int check_agent_id(const char *value)
{
    return strlen(value) > AH_NAME_MAX || !ah_utf8_valid(value, strlen(value)) ? AH_EINVAL : AH_OK;
}

/* HTTP_BIND: an IPv4 or IPv6 literal, or "localhost" (what the API's listener accepts). */
static int check_bind_address(const char *value)
{
    unsigned char addr[sizeof(struct in6_addr)];
    if (strcmp(value, "localhost") == 0 || inet_pton(AF_INET, value, addr) == 1 ||
        inet_pton(AF_INET6, value, addr) == 1) {
        return AH_OK;
    }
    return AH_EINVAL;
}

/* HTTP_ALLOWED_HOSTS: names (letters, digits, '.', '-', ':' and brackets for an address),
 * separated by commas. */
static int check_host_list(const char *value)
{
    for (const char *p = value; *p != '\0'; p++) {
        if (!isalnum((unsigned char)*p) && strchr(".-_:[],", *p) == NULL) {
            return AH_EINVAL;
        }
    }
    return strlen(value) > 1024 ? AH_EINVAL : AH_OK;
}

/* $HOSTNAME, else gethostname(), else "agent". */
static char *default_agent_id(void)
{
    char host[256] = "";
    const char *env_host = getenv("HOSTNAME");
    if (env_host != NULL && env_host[0] != '\0') {
        ah_strlcpy(host, env_host, sizeof(host));
    } else if (gethostname(host, sizeof(host) - 1) != 0 || host[0] == '\0') {
        ah_strlcpy(host, "agent", sizeof(host));
    }
    return strdup(host);
}

static int parse_log_level(ah_config_t *cfg, const ah_config_var_t *var, const char *value)
{
    (void)var;
    return ah_log_parse_level(value, &cfg->log_level);
}

static int parse_log_format(ah_config_t *cfg, const ah_config_var_t *var, const char *value)
{
    (void)var;
    if (strcasecmp(value, "json") == 0) {
        cfg->log_json = true;
    } else if (strcasecmp(value, "text") == 0) {
        cfg->log_json = false;
    } else {
        return AH_EINVAL;
    }
    return AH_OK;
}

/* Read by core/ah_mongo.c from the environment, once per process, when MongoDB support is first
 * needed; accepted here so that it is a known setting, refused when it would not take effect
 * (set through the embedding API to another value). */
static int parse_plugin_dir(ah_config_t *cfg, const ah_config_var_t *var, const char *value)
{
    (void)cfg;
    const char *env = getenv(var->name);
    return env != NULL && strcmp(env, value) == 0 ? AH_OK : AH_EINVAL;
}

#define FIELD(f) offsetof(ah_config_t, f)
#define URI_EXPECT "a URI starting with mongodb:// or mongodb+srv://"
#define DB_EXPECT "a MongoDB database name (1-63 characters, none of /\\. \"$)"
#define BOOL_EXPECT "true/false/1/0/yes/no"

/* Bounds: intervals and timeouts start at 10 ms (below that a timer or a poll only burns CPU);
 * polls are at most an hour apart, a silent stream is verified at least daily, a Lua call or a
 * shutdown may be given at most a day / an hour. */
static const ah_config_var_t config_vars[] = {
    {.name = "MONGODB_URI",
     .flag = "--mongodb-uri",
     .kind = AH_CONFIG_STRING,
     .offset = FIELD(mongodb_uri),
     .flags = AH_CONFIG_EMPTY_UNSETS | AH_CONFIG_SECRET_URI,
     .check = check_mongodb_uri,
     .expect = URI_EXPECT,
     .help = "MongoDB deployment for distributed control"},
    {.name = "MONGODB_DATABASE",
     .flag = "--mongodb-database",
     .kind = AH_CONFIG_STRING,
     .offset = FIELD(mongodb_database),
     .default_value = "agenthost",
     .check = check_database_name,
     .expect = DB_EXPECT,
     .help = "database holding agent_control"},
    {.name = "AGENT_MONGODB_URI",
     .flag = "--agent-mongodb-uri",
     .kind = AH_CONFIG_STRING,
     .offset = FIELD(agent_mongodb_uri),
     .flags = AH_CONFIG_EMPTY_UNSETS | AH_CONFIG_SECRET_URI,
     .default_doc = "`MONGODB_URI`",
     .check = check_mongodb_uri,
     .expect = URI_EXPECT,
     .help = "MongoDB deployment for the script's work data (agent.mongo)"},
    {.name = "AGENT_MONGODB_DATABASE",
     .flag = "--agent-mongodb-database",
     .kind = AH_CONFIG_STRING,
     .offset = FIELD(agent_mongodb_db),
     .flags = AH_CONFIG_EMPTY_UNSETS,
     .default_doc = "the URI's database, else `MONGODB_DATABASE`",
     .check = check_database_name,
     .expect = DB_EXPECT,
     .help = "default database of `agent.mongo.collection()`"},
    {.name = "ENABLE_DISTRIBUTED_CONTROL",
     .kind = AH_CONFIG_BOOL,
     .offset = FIELD(distributed_control),
     .default_value = "true",
     .help = "false: local control only"},
    {.name = "ENABLE_CHANGE_STREAMS",
     .kind = AH_CONFIG_BOOL,
     .offset = FIELD(change_streams),
     .default_value = "true",
     .help = "false: poll MongoDB instead of watching"},
    {.name = "CONTROL_POLLING_INTERVAL",
     .flag = "--polling-interval",
     .kind = AH_CONFIG_SECONDS,
     .offset = FIELD(polling_interval),
     .default_value = "10",
     .min = 0.01,
     .max = 3600,
     .help = "seconds between polls"},
    {.name = "CHANGE_STREAM_VERIFY_INTERVAL",
     .kind = AH_CONFIG_SECONDS,
     .offset = FIELD(change_stream_verify_interval),
     .flags = AH_CONFIG_ZERO_DISABLES,
     .default_value = "60",
     .min = 0.01,
     .max = 86400,
     .help = "seconds of stream silence before a verifying read (0: never)"},
    {.name = "AGENTHOST_STATE",
     .flag = "--state",
     .kind = AH_CONFIG_STRING,
     .offset = FIELD(state_path),
     .default_value = "./agenthost-state.db",
     .expect = "a file path",
     .help = "embedded store file (agents sharing it form a local cluster)"},
    {.name = "AGENTHOST_STATE_POLL",
     .kind = AH_CONFIG_SECONDS,
     .offset = FIELD(embedded_poll_interval),
     .default_value = "0.1",
     .min = 0.01,
     .max = 60,
     .help = "seconds between embedded store checks"},
    {.name = "AGENT_HEARTBEAT_INTERVAL",
     .kind = AH_CONFIG_SECONDS,
     .offset = FIELD(heartbeat_interval),
     .default_value = "15",
     .min = 0.05,
     .max = 3600,
     .help = "seconds between status record writes (stale after 3)"},
    {.name = "AGENT_STATUS_TTL",
     .kind = AH_CONFIG_SECONDS,
     .offset = FIELD(status_ttl),
     .default_value = "3600",
     .min = 1,
     .max = 864000,
     .help = "seconds before an unrefreshed status record is removed"},
    {.name = "HTTP_BIND",
     .flag = "--bind",
     .kind = AH_CONFIG_STRING,
     .offset = FIELD(http_bind),
     .default_value = "0.0.0.0",
     .check = check_bind_address,
     .expect = "an IPv4 or IPv6 address such as 0.0.0.0, 127.0.0.1 or ::1, or localhost",
     .help = "API listen address"},
    {.name = "HTTP_PORT",
     .flag = "--port",
     .kind = AH_CONFIG_INT,
     .offset = FIELD(http_port),
     .default_value = "8000",
     .min = 0,
     .max = 65535,
     .help = "API port (0: any free port)"},
    {.name = "HTTP_ALLOWED_HOSTS",
     .kind = AH_CONFIG_STRING,
     .offset = FIELD(http_allowed_hosts),
     .flags = AH_CONFIG_EMPTY_UNSETS,
     .check = check_host_list,
     .expect = "comma-separated host names such as agents.example.com,agent-1",
     .help = "Host names the API answers besides loopback ones; set, or HTTP_BIND on loopback: "
             "421 for any other Host"},
    {.name = "HTTP_CONSOLE",
     .kind = AH_CONFIG_BOOL,
     .offset = FIELD(http_console),
     .default_value = "true",
     .help = "false: no fleet console at GET /"},
    {.name = "AGENT_ID",
     .flag = "--agent-id",
     .kind = AH_CONFIG_STRING,
     .offset = FIELD(agent_id),
     .default_doc = "`$HOSTNAME`",
     .check = check_agent_id,
     .compute_default = default_agent_id,
     .expect = "a non-empty UTF-8 name of at most 255 bytes",
     .help = "this agent's name"},
    {.name = "AGENT_LABELS",
     .flag = "--labels",
     .kind = AH_CONFIG_STRING,
     .offset = FIELD(agent_labels),
     .flags = AH_CONFIG_EMPTY_UNSETS,
     .help = "this agent's labels, key=value,key=value (plus agent=<AGENT_ID>)"},
    {.name = "AGENT_LABELS_FILE",
     .kind = AH_CONFIG_STRING,
     .offset = FIELD(agent_labels_file),
     .flags = AH_CONFIG_EMPTY_UNSETS,
     .expect = "a file path",
     .help = "a Kubernetes Downward API labels file: the pod's labels become the agent's"},
    {.name = "AGENT_API_TOKEN",
     .kind = AH_CONFIG_STRING,
     .offset = FIELD(api_token),
     .flags = AH_CONFIG_EMPTY_UNSETS | AH_CONFIG_SECRET,
     .help = "bearer token required by mutating routes"},
    {.name = "LOG_LEVEL",
     .flag = "--log-level",
     .kind = AH_CONFIG_CUSTOM,
     .offset = FIELD(log_level),
     .default_value = "info",
     .parse = parse_log_level,
     .expect = "debug, info, warn or error",
     .help = "debug, info, warn or error"},
    {.name = "LOG_FORMAT",
     .flag = "--log-format",
     .kind = AH_CONFIG_CUSTOM,
     .offset = FIELD(log_json),
     .default_value = "text",
     .parse = parse_log_format,
     .expect = "text or json",
     .help = "text or json"},
    {.name = "LUA_MEMORY_LIMIT",
     .flag = "--lua-memory-limit",
     .kind = AH_CONFIG_BYTES,
     .offset = FIELD(lua_memory_limit),
     .flags = AH_CONFIG_ZERO_DISABLES,
     .default_value = "0",
     .min = MIB,
     .max = 1024 * GIB,
     .help = "bytes the script may allocate, e.g. 256m (0: no limit; turns the JIT off)"},
    {.name = "BATCH_TIMEOUT",
     .flag = "--batch-timeout",
     .kind = AH_CONFIG_SECONDS,
     .offset = FIELD(batch_timeout),
     .default_value = "300",
     .min = 0.01,
     .max = 86400,
     .help = "seconds a batch or hook may run"},
    {.name = "SHUTDOWN_TIMEOUT",
     .flag = "--shutdown-timeout",
     .kind = AH_CONFIG_SECONDS,
     .offset = FIELD(shutdown_timeout),
     .default_value = "25",
     .min = 0.01,
     .max = 3600,
     .help = "seconds shutdown may take before exit 1"},
    {.name = "PAUSE_DRAIN_TIMEOUT",
     .flag = "--pause-drain-timeout",
     .kind = AH_CONFIG_SECONDS,
     .offset = FIELD(pause_drain_timeout),
     .flags = AH_CONFIG_ZERO_DISABLES,
     .default_value = "0",
     .min = 0.01,
     .max = 86400,
     .help = "seconds a pause without drain= lets the running call wait (0: no deadline)"},
    {.name = "AGENTHOST_SIGNALS",
     .kind = AH_CONFIG_BOOL,
     .offset = FIELD(signals),
     .default_value = "true",
     .help = "false: leave SIGTERM/SIGINT/SIGUSR1/SIGUSR2/SIGHUP alone"},
    {.name = "AGENTHOST_PLUGIN_DIR",
     .kind = AH_CONFIG_CUSTOM,
     .parse = parse_plugin_dir,
     .default_doc = "beside the binary, then `../lib/agenthost`",
     .expect = "to be set in the environment (it is read from there)",
     .help = "directory of the plugins agenthost_mongo.so (MongoDB) and agenthost_curl.so "
             "(agent.http, ctl) (env only)"},
    {.name = NULL},
};

const ah_config_var_t *ah_config_vars(void)
{
    return config_vars;
}

const ah_config_var_t *ah_config_find(const char *name)
{
    for (const ah_config_var_t *v = config_vars; v->name != NULL; v++) {
        if (strcmp(v->name, name) == 0) {
            return v;
        }
    }
    return NULL;
}

const char *ah_config_default_doc(const ah_config_var_t *var)
{
    if (var->default_doc != NULL) {
        return var->default_doc;
    }
    return var->default_value != NULL ? var->default_value : "unset";
}

/* Writes a byte count as the largest exact suffix: 1048576 → "1m". */
static void format_bytes(double v, char *buf, size_t len)
{
    if (v >= GIB && fmod(v, GIB) == 0) {
        snprintf(buf, len, "%.0fg", v / GIB);
    } else if (v >= MIB && fmod(v, MIB) == 0) {
        snprintf(buf, len, "%.0fm", v / MIB);
    } else if (v >= KIB && fmod(v, KIB) == 0) {
        snprintf(buf, len, "%.0fk", v / KIB);
    } else {
        snprintf(buf, len, "%.0f", v);
    }
}

void ah_config_describe_range(const ah_config_var_t *var, char *buf, size_t len)
{
    const char *zero = (var->flags & AH_CONFIG_ZERO_DISABLES) ? "0 or " : "";
    char lo[32], hi[32];
    switch (var->kind) {
    case AH_CONFIG_SECONDS:
        snprintf(buf, len, "%s%g to %g s", zero, var->min, var->max);
        break;
    case AH_CONFIG_INT:
        snprintf(buf, len, "%s%g to %g", zero, var->min, var->max);
        break;
    case AH_CONFIG_BYTES:
        format_bytes(var->min, lo, sizeof(lo));
        format_bytes(var->max, hi, sizeof(hi));
        snprintf(buf, len, "%s%s to %s", zero, lo, hi);
        break;
    default:
        if (len > 0) {
            buf[0] = '\0';
        }
        break;
    }
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

/* Parses a whole decimal number such as 10, 0.5 or 2e3 (no spaces, hexadecimal, NaN or
 * infinities). */
static int parse_number(const char *s, const char *charset, double *out)
{
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (s[strspn(s, charset)] != '\0' || errno != 0 || end == s || *end != '\0' || !isfinite(v)) {
        return AH_EINVAL;
    }
    *out = v;
    return AH_OK;
}

/* Parses "0", "262144", "512k", "256m", "256MB", "256MiB", "1g" (case-insensitive) into a count
 * of bytes (powers of 1024). */
static int parse_bytes(const char *s, double *out)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (!isdigit((unsigned char)s[0]) || errno != 0 || end == s || v > (1ULL << 50)) {
        return AH_EINVAL;
    }
    double mult = 1;
    if (*end == 'k' || *end == 'K') {
        mult = KIB;
        end++;
    } else if (*end == 'm' || *end == 'M') {
        mult = MIB;
        end++;
    } else if (*end == 'g' || *end == 'G') {
        mult = GIB;
        end++;
    }
    /* "256m", "256M", "256MB", "256MiB" and "256mb" are the same size; "100B" is 100 bytes. */
    if (strcasecmp(end, "b") == 0 || (mult > 1 && strcasecmp(end, "ib") == 0)) {
        end += strlen(end);
    }
    if (*end != '\0') {
        return AH_EINVAL;
    }
    *out = (double)v * mult;
    return AH_OK;
}

/* Parses a number of the row's kind and checks its bounds. */
static int parse_bounded(const ah_config_var_t *var, const char *value, double *out)
{
    double v;
    int rc = var->kind == AH_CONFIG_BYTES
                 ? parse_bytes(value, &v)
                 : parse_number(
                       value, var->kind == AH_CONFIG_INT ? "0123456789+-" : "0123456789.eE+-", &v);
    if (rc != AH_OK && var->kind == AH_CONFIG_SECONDS) {
        rc = ah_parse_duration(value, &v); /* with a unit: 250ms, 90s, 5m, 1h */
    }
    if (rc != AH_OK) {
        return rc;
    }
    if (var->kind == AH_CONFIG_INT && v != floor(v)) {
        return AH_EINVAL;
    }
    if (v == 0 && (var->flags & AH_CONFIG_ZERO_DISABLES)) {
        *out = 0;
        return AH_OK;
    }
    if (v < var->min || v > var->max) {
        return AH_EINVAL;
    }
    *out = v;
    return AH_OK;
}

/* What a valid number of this row looks like, for the error message. */
static void describe_expected(const ah_config_var_t *var, char *buf, size_t len)
{
    char range[64];
    ah_config_describe_range(var, range, sizeof(range));
    switch (var->kind) {
    case AH_CONFIG_SECONDS:
        snprintf(buf, len, "a number of seconds or a duration such as 250ms, 90s, 5m or 1h: %s",
                 range);
        break;
    case AH_CONFIG_INT:
        snprintf(buf, len, "an integer: %s", range);
        break;
    case AH_CONFIG_BYTES:
        snprintf(buf, len, "a number of bytes with an optional k, m or g suffix (256m, 256MB): %s",
                 range);
        break;
    default:
        ah_strlcpy(buf, var->kind == AH_CONFIG_BOOL ? BOOL_EXPECT : var->expect, len);
        break;
    }
}

static int set_string(char **slot, const char *value)
{
    char *copy = NULL;
    if (value != NULL && (copy = strdup(value)) == NULL) {
        return AH_ENOMEM;
    }
    free(*slot);
    *slot = copy;
    return AH_OK;
}

/* Stores value into the row's field. 0, AH_EINVAL (not a valid value) or AH_ENOMEM. */
static int apply(ah_config_t *cfg, const ah_config_var_t *var, const char *value)
{
    char *field = (char *)cfg + var->offset;
    double number = 0;
    switch (var->kind) {
    case AH_CONFIG_STRING:
        if (value[0] == '\0') {
            return (var->flags & AH_CONFIG_EMPTY_UNSETS) ? set_string((char **)field, NULL)
                                                         : AH_EINVAL;
        }
        if (var->check != NULL && var->check(value) != AH_OK) {
            return AH_EINVAL;
        }
        return set_string((char **)field, value);
    case AH_CONFIG_BOOL:
        return ah_config_parse_bool(value, (bool *)field);
    case AH_CONFIG_SECONDS:
        if (parse_bounded(var, value, &number) != AH_OK) {
            return AH_EINVAL;
        }
        *(double *)field = number;
        return AH_OK;
    case AH_CONFIG_INT:
        if (parse_bounded(var, value, &number) != AH_OK) {
            return AH_EINVAL;
        }
        *(int *)field = (int)number;
        return AH_OK;
    case AH_CONFIG_BYTES:
        if (parse_bounded(var, value, &number) != AH_OK) {
            return AH_EINVAL;
        }
        *(size_t *)field = (size_t)number;
        return AH_OK;
    case AH_CONFIG_CUSTOM:
        return var->parse(cfg, var, value);
    }
    return AH_EINVAL;
}

void ah_config_defaults(ah_config_t *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    for (const ah_config_var_t *v = config_vars; v->name != NULL; v++) {
        if (v->default_value != NULL) {
            /* The table's defaults are valid values (tests/unit/test_config.c); only AH_ENOMEM
             * can fail here, and it leaves the field unset. */
            (void)apply(cfg, v, v->default_value);
        } else if (v->compute_default != NULL) {
            *(char **)((char *)cfg + v->offset) = v->compute_default();
        }
    }
}

void ah_config_free(ah_config_t *cfg)
{
    if (cfg == NULL) {
        return;
    }
    for (const ah_config_var_t *v = config_vars; v->name != NULL; v++) {
        if (v->kind == AH_CONFIG_STRING) {
            free(*(char **)((char *)cfg + v->offset));
        }
    }
    free(cfg->script_path);
    memset(cfg, 0, sizeof(*cfg));
}

/* A secret is registered before it is checked, so even a refused value never shows. */
static void register_secret(const ah_config_var_t *var, const char *value)
{
    if (var->flags & AH_CONFIG_SECRET) {
        ah_redact_add_secret(value);
    } else if (var->flags & AH_CONFIG_SECRET_URI) {
        ah_redact_add_uri(value);
    }
}

void ah_config_register_secrets(void)
{
    for (const ah_config_var_t *v = config_vars; v->name != NULL; v++) {
        const char *value = getenv(v->name);
        if (value != NULL) {
            register_secret(v, value);
        }
    }
}

int ah_config_set(ah_config_t *cfg, const char *name, const char *value, char *err, size_t errlen)
{
    const ah_config_var_t *var = ah_config_find(name);
    if (var == NULL) {
        snprintf(err, errlen, "unknown setting %s", name);
        return AH_EINVAL;
    }
    register_secret(var, value);
    int rc = apply(cfg, var, value);
    if (rc == AH_EINVAL) {
        char expect[160];
        describe_expected(var, expect, sizeof(expect));
        if (var->flags & AH_CONFIG_SECRET) {
            snprintf(err, errlen, "invalid %s (value not shown): expected %s", name, expect);
        } else {
            char shown[256];
            if (var->flags & AH_CONFIG_SECRET_URI) {
                ah_redact_uri(value, shown, sizeof(shown));
            } else {
                ah_strlcpy(shown, value, sizeof(shown));
            }
            snprintf(err, errlen, "invalid %s=\"%.200s\": expected %s", name, shown, expect);
        }
    } else if (rc != AH_OK) {
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
                char shown[256];
                snprintf(err, errlen, "unexpected argument \"%.200s\" (one SCRIPT only)",
                         ah_redact_text(arg, shown, sizeof(shown)));
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
