/* Unit tests for configuration parsing and validation (README.md, Settings). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "ah_common.h"
#include "ah_config.h"

#include <stdlib.h>
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
        {"CONTROL_POLLING_INTERVAL", "5s"},
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_match_the_spec),
        cmocka_unit_test(test_booleans_accept_every_documented_spelling),
        cmocka_unit_test(test_invalid_values_name_the_variable),
        cmocka_unit_test(test_valid_environment_is_applied),
        cmocka_unit_test(test_flags_override_environment),
        cmocka_unit_test(test_bad_flags_are_rejected),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
