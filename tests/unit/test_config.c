/* Unit tests for configuration parsing and validation (README.md, Settings). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "ah_common.h"
#include "ah_config.h"

#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

static void clear_env(void)
{
    for (const ah_config_var_t *v = ah_config_vars(); v->name != NULL; v++) {
        unsetenv(v->name);
    }
}

static void test_defaults_match_the_spec(void **unused)
{
    clear_env();
    ah_config_t cfg;
    char err[AH_ERRLEN];
    ah_config_defaults(&cfg);
    assert_int_equal(ah_config_from_env(&cfg, err, sizeof(err)), 0);
    assert_null(cfg.mongodb_uri);
    assert_string_equal(cfg.mongodb_database, "agenthost");
    assert_true(cfg.distributed_control);
    assert_true(cfg.change_streams);
    assert_true(cfg.polling_interval == 10.0);
    assert_string_equal(cfg.state_path, "./agenthost-state.db");
    assert_string_equal(cfg.http_bind, "0.0.0.0");
    assert_int_equal(cfg.http_port, 8000);
    assert_null(cfg.api_token);
    assert_int_equal(cfg.log_level, AH_LOG_INFO);
    assert_false(cfg.log_json);
    assert_true(cfg.batch_timeout == 300.0);
    assert_non_null(cfg.agent_id);
    ah_config_free(&cfg);
}

static void test_booleans_accept_every_documented_spelling(void **unused)
{
    const char *yes[] = {"true", "TRUE", "1", "yes", "Yes"};
    const char *no[] = {"false", "False", "0", "no", "NO"};
    bool v;
    for (size_t i = 0; i < 5; i++) {
        assert_int_equal(ah_config_parse_bool(yes[i], &v), 0);
        assert_true(v);
        assert_int_equal(ah_config_parse_bool(no[i], &v), 0);
        assert_false(v);
    }
    assert_int_equal(ah_config_parse_bool("maybe", &v), AH_EINVAL);
    assert_int_equal(ah_config_parse_bool("", &v), AH_EINVAL);
    assert_int_equal(ah_config_parse_bool("on", &v), AH_EINVAL);
}

/* Each invalid value is rejected and the message names the variable. */
static void test_invalid_values_name_the_variable(void **unused)
{
    static const struct {
        const char *name;
        const char *value;
    } bad[] = {
        {"CONTROL_POLLING_INTERVAL", "abc"},
        {"CONTROL_POLLING_INTERVAL", "0"},
        {"CONTROL_POLLING_INTERVAL", "-1"},
        {"CONTROL_POLLING_INTERVAL", "nan"},
        {"CONTROL_POLLING_INTERVAL", "5x"},
        {"ENABLE_CHANGE_STREAMS", "maybe"},
        {"ENABLE_DISTRIBUTED_CONTROL", ""},
        {"HTTP_PORT", "65536"},
        {"HTTP_PORT", "-1"},
        {"HTTP_PORT", "80x"},
        {"LOG_LEVEL", "loud"},
        {"LOG_FORMAT", "xml"},
        {"BATCH_TIMEOUT", "0"},
        {"MONGODB_URI", "http://x"},
        {"MONGODB_DATABASE", "a.b"},
        {"AGENT_ID", ""},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        clear_env();
        setenv(bad[i].name, bad[i].value, 1);
        ah_config_t cfg;
        char err[AH_ERRLEN] = "";
        ah_config_defaults(&cfg);
        assert_int_equal(ah_config_from_env(&cfg, err, sizeof(err)), AH_EINVAL);
        assert_non_null(strstr(err, bad[i].name));
        ah_config_free(&cfg);
    }
    clear_env();
}

static void test_valid_environment_is_applied(void **unused)
{
    clear_env();
    setenv("CONTROL_POLLING_INTERVAL", "2.5", 1);
    setenv("ENABLE_CHANGE_STREAMS", "no", 1);
    setenv("HTTP_PORT", "0", 1);
    setenv("MONGODB_URI", "mongodb://db:27017/?replicaSet=rs0", 1);
    setenv("LOG_FORMAT", "json", 1);
    setenv("AGENT_API_TOKEN", "s3cret", 1);
    ah_config_t cfg;
    char err[AH_ERRLEN];
    ah_config_defaults(&cfg);
    assert_int_equal(ah_config_from_env(&cfg, err, sizeof(err)), 0);
    assert_true(cfg.polling_interval == 2.5);
    assert_false(cfg.change_streams);
    assert_int_equal(cfg.http_port, 0);
    assert_string_equal(cfg.mongodb_uri, "mongodb://db:27017/?replicaSet=rs0");
    assert_true(cfg.log_json);
    assert_string_equal(cfg.api_token, "s3cret");
    ah_config_free(&cfg);
    clear_env();
}

static void test_flags_override_environment(void **unused)
{
    clear_env();
    setenv("HTTP_PORT", "9000", 1);
    ah_config_t cfg;
    char err[AH_ERRLEN];
    ah_config_defaults(&cfg);
    assert_int_equal(ah_config_from_env(&cfg, err, sizeof(err)), 0);
    char *argv[] = {"--port", "9100", "script.lua", "--log-level=debug"};
    assert_int_equal(ah_config_from_args(&cfg, 4, argv, err, sizeof(err)), 0);
    assert_int_equal(cfg.http_port, 9100);
    assert_string_equal(cfg.script_path, "script.lua");
    assert_int_equal(cfg.log_level, AH_LOG_DEBUG);
    ah_config_free(&cfg);
    clear_env();
}

static void test_bad_flags_are_rejected(void **unused)
{
    ah_config_t cfg;
    char err[AH_ERRLEN];
    ah_config_defaults(&cfg);
    char *unknown[] = {"--bogus", "x"};
    assert_int_equal(ah_config_from_args(&cfg, 2, unknown, err, sizeof(err)), AH_EINVAL);
    assert_non_null(strstr(err, "--bogus"));
    char *missing[] = {"--port"};
    assert_int_equal(ah_config_from_args(&cfg, 1, missing, err, sizeof(err)), AH_EINVAL);
    char *bad_port[] = {"--port=99999"};
    assert_int_equal(ah_config_from_args(&cfg, 1, bad_port, err, sizeof(err)), AH_EINVAL);
    assert_non_null(strstr(err, "HTTP_PORT"));
    char *two_scripts[] = {"a.lua", "b.lua"};
    assert_int_equal(ah_config_from_args(&cfg, 2, two_scripts, err, sizeof(err)), AH_EINVAL);
    ah_config_free(&cfg);
}

/* Numbers outside their documented range, NaN, infinities and garbage are refused with a message
 * naming the setting and the accepted range; the bounds themselves are accepted. */
static void test_numbers_outside_their_range_are_refused(void **unused)
{
    static const struct {
        const char *name;
        const char *value;
    } bad[] = {
        {"CONTROL_POLLING_INTERVAL", "1e-9"},
        {"CONTROL_POLLING_INTERVAL", "0.001"},
        {"CONTROL_POLLING_INTERVAL", "3601"},
        {"CONTROL_POLLING_INTERVAL", "inf"},
        {"CONTROL_POLLING_INTERVAL", "-inf"},
        {"CONTROL_POLLING_INTERVAL", "NaN"},
        {"CONTROL_POLLING_INTERVAL", ""},
        {"CONTROL_POLLING_INTERVAL", " 5"},
        {"CHANGE_STREAM_VERIFY_INTERVAL", "-1"},
        {"CHANGE_STREAM_VERIFY_INTERVAL", "1e-9"},
        {"CHANGE_STREAM_VERIFY_INTERVAL", "86401"},
        {"CHANGE_STREAM_VERIFY_INTERVAL", "nan"},
        {"AGENTHOST_STATE_POLL", "0"},
        {"AGENTHOST_STATE_POLL", "61"},
        {"AGENTHOST_STATE_POLL", "infinity"},
        {"BATCH_TIMEOUT", "1e300"},
        {"BATCH_TIMEOUT", "86401"},
        {"BATCH_TIMEOUT", "0x10"},
        {"SHUTDOWN_TIMEOUT", "1e300"},
        {"SHUTDOWN_TIMEOUT", "-0.5"},
        {"SHUTDOWN_TIMEOUT", "nan"},
        {"HTTP_PORT", "80.5"},
        {"HTTP_PORT", "1e3"},
        {"HTTP_PORT", "inf"},
        {"HTTP_PORT", "99999999999999999999"},
        {"LUA_MEMORY_LIMIT", "1023k"},
        {"LUA_MEMORY_LIMIT", "1025g"},
        {"LUA_MEMORY_LIMIT", "-1m"},
        {"LUA_MEMORY_LIMIT", "10q"},
        {"LUA_MEMORY_LIMIT", "99999999999999999999999"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        ah_config_t cfg;
        char err[AH_ERRLEN] = "";
        ah_config_defaults(&cfg);
        if (ah_config_set(&cfg, bad[i].name, bad[i].value, err, sizeof(err)) != AH_EINVAL) {
            fail_msg("%s=\"%s\" was accepted", bad[i].name, bad[i].value);
        }
        assert_non_null(strstr(err, bad[i].name));
        assert_non_null(strstr(err, " to ")); /* the range is in the message */
        ah_config_free(&cfg);
    }
    static const struct {
        const char *name;
        const char *value;
    } good[] = {
        {"CONTROL_POLLING_INTERVAL", "0.01"},
        {"CONTROL_POLLING_INTERVAL", "3600"},
        {"CHANGE_STREAM_VERIFY_INTERVAL", "0"},
        {"CHANGE_STREAM_VERIFY_INTERVAL", "86400"},
        {"AGENTHOST_STATE_POLL", "0.05"},
        {"BATCH_TIMEOUT", "0.2"},
        {"BATCH_TIMEOUT", "86400"},
        {"SHUTDOWN_TIMEOUT", "3600"},
        {"HTTP_PORT", "0"},
        {"HTTP_PORT", "65535"},
        {"LUA_MEMORY_LIMIT", "0"},
        {"LUA_MEMORY_LIMIT", "1m"},
        {"LUA_MEMORY_LIMIT", "1024G"},
        {"LUA_MEMORY_LIMIT", "1048576"},
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        ah_config_t cfg;
        char err[AH_ERRLEN] = "";
        ah_config_defaults(&cfg);
        if (ah_config_set(&cfg, good[i].name, good[i].value, err, sizeof(err)) != AH_OK) {
            fail_msg("%s=\"%s\" was refused: %s", good[i].name, good[i].value, err);
        }
        ah_config_free(&cfg);
    }
    ah_config_t cfg;
    char err[AH_ERRLEN];
    ah_config_defaults(&cfg);
    assert_int_equal(ah_config_set(&cfg, "LUA_MEMORY_LIMIT", "256m", err, sizeof(err)), AH_OK);
    assert_true(cfg.lua_memory_limit == 256u << 20);
    assert_int_equal(ah_config_set(&cfg, "BATCH_TIMEOUT", "1e300", err, sizeof(err)), AH_EINVAL);
    assert_string_equal(err, "invalid BATCH_TIMEOUT=\"1e300\": expected a number of seconds or a "
                             "duration such as 250ms, 90s, 5m or 1h: 0.01 to 86400 s");
    assert_true(cfg.batch_timeout == 300.0); /* a refused value leaves the setting alone */
    assert_int_equal(ah_config_set(&cfg, "NO_SUCH_SETTING", "1", err, sizeof(err)), AH_EINVAL);
    assert_string_equal(err, "unknown setting NO_SUCH_SETTING");
    ah_config_free(&cfg);
}

/* Durations take the units of a pause's for= (and ms), sizes take an optional B / iB. */
static void test_durations_and_sizes_accept_units(void **unused)
{
    (void)unused;
    static const struct {
        const char *name;
        const char *value;
        double expected;
    } durations[] = {
        {"BATCH_TIMEOUT", "5m", 300},
        {"BATCH_TIMEOUT", "90s", 90},
        {"BATCH_TIMEOUT", "1.5h", 5400},
        {"BATCH_TIMEOUT", "250ms", 0.25},
        {"SHUTDOWN_TIMEOUT", "2m", 120},
        {"AGENT_HEARTBEAT_INTERVAL", "500ms", 0.5},
        {"CONTROL_POLLING_INTERVAL", "1m", 60},
        {"AGENT_STATUS_TTL", "2h", 7200},
        {"CHANGE_STREAM_VERIFY_INTERVAL", "0s", 0},
    };
    for (size_t i = 0; i < sizeof(durations) / sizeof(durations[0]); i++) {
        ah_config_t cfg;
        char err[AH_ERRLEN] = "";
        ah_config_defaults(&cfg);
        if (ah_config_set(&cfg, durations[i].name, durations[i].value, err, sizeof(err)) != AH_OK) {
            fail_msg("%s=\"%s\" was refused: %s", durations[i].name, durations[i].value, err);
        }
        const ah_config_var_t *var = ah_config_find(durations[i].name);
        double got = *(double *)((char *)&cfg + var->offset);
        if (fabs(got - durations[i].expected) > 1e-9) {
            fail_msg("%s=\"%s\" gave %g s", durations[i].name, durations[i].value, got);
        }
        ah_config_free(&cfg);
    }
    static const char *const bad_durations[] = {"5x",  "5 m", "m",  "1..5s",
                                                "-5m", "5mm", "2d", "1e2m"};
    for (size_t i = 0; i < sizeof(bad_durations) / sizeof(bad_durations[0]); i++) {
        ah_config_t cfg;
        char err[AH_ERRLEN] = "";
        ah_config_defaults(&cfg);
        if (ah_config_set(&cfg, "BATCH_TIMEOUT", bad_durations[i], err, sizeof(err)) != AH_EINVAL) {
            fail_msg("BATCH_TIMEOUT=\"%s\" was accepted", bad_durations[i]);
        }
        ah_config_free(&cfg);
    }
    static const char *const same_size[] = {"256m", "256M", "256MB", "256mb", "256MiB", "262144k"};
    for (size_t i = 0; i < sizeof(same_size) / sizeof(same_size[0]); i++) {
        ah_config_t cfg;
        char err[AH_ERRLEN] = "";
        ah_config_defaults(&cfg);
        if (ah_config_set(&cfg, "LUA_MEMORY_LIMIT", same_size[i], err, sizeof(err)) != AH_OK) {
            fail_msg("LUA_MEMORY_LIMIT=\"%s\" was refused: %s", same_size[i], err);
        }
        assert_true(cfg.lua_memory_limit == 256u << 20);
        ah_config_free(&cfg);
    }
    ah_config_t cfg;
    char err[AH_ERRLEN];
    ah_config_defaults(&cfg);
    assert_int_equal(ah_config_set(&cfg, "LUA_MEMORY_LIMIT", "256MBB", err, sizeof(err)),
                     AH_EINVAL);
    assert_int_equal(ah_config_set(&cfg, "LUA_MEMORY_LIMIT", "1048576B", err, sizeof(err)), AH_OK);
    assert_true(cfg.lua_memory_limit == 1048576);
    ah_config_free(&cfg);
}

/* Every row's documented default is a valid value and is what ah_config_defaults() sets. */
static void test_every_default_in_the_table_is_valid(void **unused)
{
    for (const ah_config_var_t *v = ah_config_vars(); v->name != NULL; v++) {
        assert_non_null(v->help);
        if (v->default_value == NULL) {
            continue;
        }
        ah_config_t defaults, set;
        char err[AH_ERRLEN] = "";
        ah_config_defaults(&defaults);
        ah_config_defaults(&set);
        if (ah_config_set(&set, v->name, v->default_value, err, sizeof(err)) != AH_OK) {
            fail_msg("default of %s refused: %s", v->name, err);
        }
        size_t size = v->kind == AH_CONFIG_BOOL      ? sizeof(bool)
                      : v->kind == AH_CONFIG_SECONDS ? sizeof(double)
                      : v->kind == AH_CONFIG_INT     ? sizeof(int)
                      : v->kind == AH_CONFIG_BYTES   ? sizeof(size_t)
                                                     : 0;
        assert_memory_equal((char *)&defaults + v->offset, (char *)&set + v->offset, size);
        if (v->kind == AH_CONFIG_STRING) {
            assert_string_equal(*(char **)((char *)&set + v->offset), v->default_value);
        }
        ah_config_free(&defaults);
        ah_config_free(&set);
    }
}

/* The line README.md's Settings table shows for one row. */
static void readme_row(const ah_config_var_t *v, char *buf, size_t len)
{
    char flag[64] = "", def[128], range[64];
    if (v->flag != NULL) {
        snprintf(flag, sizeof(flag), "`%s`", v->flag);
    }
    if (v->default_doc != NULL) {
        snprintf(def, sizeof(def), "%s", v->default_doc);
    } else {
        snprintf(def, sizeof(def), "`%s`", ah_config_default_doc(v));
    }
    ah_config_describe_range(v, range, sizeof(range));
    snprintf(buf, len, "| `%s` | %s | %s | %s | %s |", v->name, flag, def, range, v->help);
}

/* README.md's Settings table is the table of ah_config_vars(), row for row, in order: a setting
 * added, removed or changed in the code without the README (or the other way) fails here. */
static void test_readme_settings_table_matches_the_code(void **unused)
{
    FILE *f = fopen(AH_TEST_SOURCE_DIR "/README.md", "r");
    assert_non_null(f);
    char line[1024];
    bool in_settings = false;
    const ah_config_var_t *next = ah_config_vars();
    size_t rows = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        if (strncmp(line, "## ", 3) == 0) {
            in_settings = strcmp(line, "## Settings") == 0;
            continue;
        }
        if (!in_settings || strncmp(line, "| `", 3) != 0) {
            continue;
        }
        char want[1024];
        if (next->name == NULL) {
            fail_msg("README.md has a setting the code does not know:\n%s", line);
        }
        readme_row(next, want, sizeof(want));
        if (strcmp(line, want) != 0) {
            fail_msg("README.md Settings row differs from the code:\n  README: %s\n  code:   %s",
                     line, want);
        }
        next++;
        rows++;
    }
    fclose(f);
    if (next->name != NULL) {
        fail_msg("README.md's Settings table lacks %s", next->name);
    }
    assert_true(rows > 0);
}

/* The other docs that list settings (docs/OPERATIONS.md, docs/LUA.md) state the code's default
 * in their second column: "| `NAME` | <default> | ...", with or without backticks. */
static void check_doc_defaults(const char *path)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char line[2048];
    size_t checked = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        char name[64];
        int used = 0;
        if (sscanf(line, "| `%63[A-Z_]` | %n", name, &used) != 1 || used == 0) {
            continue;
        }
        const ah_config_var_t *v = ah_config_find(name);
        if (v == NULL) {
            continue; /* e.g. a signal name */
        }
        const char *cell = line + used;
        size_t cell_len = strcspn(cell, "|");
        char want[128];
        snprintf(want, sizeof(want), "%s", ah_config_default_doc(v));
        bool plain = strncmp(cell, want, strlen(want)) == 0 && cell[strlen(want)] == ' ';
        char quoted[140];
        snprintf(quoted, sizeof(quoted), "`%s`", want);
        bool ticked = strncmp(cell, quoted, strlen(quoted)) == 0 && cell[strlen(quoted)] == ' ';
        if (!plain && !ticked) {
            fail_msg("%s: %s is documented with default \"%.*s\", the code says \"%s\"", path, name,
                     (int)cell_len, cell, want);
        }
        checked++;
    }
    fclose(f);
    assert_true(checked > 0);
}

static void test_other_docs_state_the_defaults_of_the_code(void **unused)
{
    check_doc_defaults(AH_TEST_SOURCE_DIR "/docs/OPERATIONS.md");
    check_doc_defaults(AH_TEST_SOURCE_DIR "/docs/LUA.md");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_match_the_spec),
        cmocka_unit_test(test_booleans_accept_every_documented_spelling),
        cmocka_unit_test(test_invalid_values_name_the_variable),
        cmocka_unit_test(test_valid_environment_is_applied),
        cmocka_unit_test(test_flags_override_environment),
        cmocka_unit_test(test_bad_flags_are_rejected),
        cmocka_unit_test(test_numbers_outside_their_range_are_refused),
        cmocka_unit_test(test_durations_and_sizes_accept_units),
        cmocka_unit_test(test_every_default_in_the_table_is_valid),
        cmocka_unit_test(test_readme_settings_table_matches_the_code),
        cmocka_unit_test(test_other_docs_state_the_defaults_of_the_code),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
