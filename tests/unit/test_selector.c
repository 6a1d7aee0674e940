/* Unit tests for labels and label selectors (core/ah_selector.c): the Kubernetes grammar, the
 * canonical form that makes two spellings one scope, the matcher's semantics for each operator,
 * and errors that name the bad part. */
#include "ah_common.h"
#include "ah_selector.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

/* The canonical text of `text`, or "ERROR: <message>". */
static const char *canon(const char *text)
{
    static char out[AH_ERRLEN + 16];
    char err[AH_ERRLEN];
    ah_selector_t *sel = ah_selector_parse(text, err, sizeof(err));
    if (sel == NULL) {
        snprintf(out, sizeof(out), "ERROR: %s", err);
        return out;
    }
    assert_int_equal(ah_selector_format(sel, out, sizeof(out)), AH_OK);
    ah_selector_free(sel);
    return out;
}

static bool matches(const char *selector, const char *labels_text)
{
    char err[AH_ERRLEN];
    ah_selector_t *sel = ah_selector_parse(selector, err, sizeof(err));
    assert_non_null(sel);
    ah_labels_t *labels = ah_labels_parse(labels_text, err, sizeof(err));
    assert_non_null(labels);
    bool m = ah_selector_matches(sel, labels);
    ah_labels_free(labels);
    ah_selector_free(sel);
    return m;
}

static void test_every_operator_parses_to_its_canonical_spelling(void **state)
{
    (void)state;
    assert_string_equal(canon("region=eu"), "region=eu");
    assert_string_equal(canon("region==eu"), "region=eu");
    assert_string_equal(canon("region != eu"), "region!=eu");
    assert_string_equal(canon("region in (us,eu)"), "region in (eu,us)");
    assert_string_equal(canon("region notin ( us , eu, us )"), "region notin (eu,us)");
    assert_string_equal(canon("region"), "region");
    assert_string_equal(canon("! region"), "!region");
    assert_string_equal(canon("tier="), "tier=");
    assert_string_equal(canon("app.kubernetes.io/name=agent-host_1.2"),
                        "app.kubernetes.io/name=agent-host_1.2");
    assert_string_equal(canon(""), "");
    assert_string_equal(canon("   "), "");
}

static void test_two_spellings_of_one_selector_are_one_canonical_text(void **state)
{
    (void)state;
    assert_string_equal(canon("b=2,a=1"), "a=1,b=2");
    assert_string_equal(canon(" a==1 , b=2 "), "a=1,b=2");
    assert_string_equal(canon("role notin (api),!zone,region in (us,eu),region"),
                        "region in (eu,us),region,role notin (api),!zone");
    assert_string_equal(canon("a=1,a=1"), "a=1"); /* duplicates dropped */
    assert_string_equal(canon("a!=2,a!=1"), "a!=1,a!=2");
}

static void test_malformed_selectors_are_errors_that_say_where(void **state)
{
    (void)state;
    assert_string_equal(canon("region="), "region="); /* an empty value is a value */
    assert_string_equal(canon("=eu"), "ERROR: selector: expected a label key at position 1 ('=')");
    assert_string_equal(canon("region=eu,"),
                        "ERROR: selector: expected a requirement after ',' at the end");
    assert_string_equal(canon("region in ()"),
                        "ERROR: selector: an in/notin set needs at least one value at position "
                        "12 (')')");
    /* found by fuzz_selector: an empty value in a set would format as "region in ()" */
    assert_string_equal(canon("region in (,)"),
                        "ERROR: selector: expected a value in the set at position 12 (',')");
    assert_string_equal(canon("region in (eu"),
                        "ERROR: selector: expected ',' or ')' in a value set at the end");
    assert_string_equal(canon("region in eu"),
                        "ERROR: selector: expected '(' after in/notin at position 11 ('e')");
    assert_string_equal(canon("region < 3"), "ERROR: selector: expected '=', '==', '!=', 'in', "
                                             "'notin', ',' or the end at position 8 ('<')");
    assert_string_equal(canon("region=eu us"),
                        "ERROR: selector: expected ',' between requirements at position 11 ('u')");
    assert_non_null(strstr(canon("-region=eu"), "label key '-region'"));
    assert_non_null(strstr(canon("Bad_Prefix/x=1"), "prefix before '/'"));
    assert_non_null(strstr(canon("region=-eu"), "label value '-eu'"));
    char long_value[100];
    memset(long_value, 'v', sizeof(long_value));
    long_value[99] = '\0';
    char text[200];
    snprintf(text, sizeof(text), "k=%s", long_value);
    assert_non_null(strstr(canon(text), "label value"));
    assert_non_null(strstr(canon("k=\xc3\xa9"), "byte 0xc3"));
}

static void test_matcher_follows_kubernetes_semantics(void **state)
{
    (void)state;
    const char *eu_ingest = "region=eu,role=ingest,agent=a1";
    const char *none = "agent=a4";
    assert_true(matches("region=eu", eu_ingest));
    assert_false(matches("region=eu", none));
    assert_true(matches("region!=us", eu_ingest));
    assert_true(matches("region!=us", none)); /* absent counts as "not us" */
    assert_true(matches("role in (ingest,batch)", eu_ingest));
    assert_false(matches("role in (api)", none));
    assert_false(matches("role notin (ingest)", eu_ingest));
    assert_true(matches("role notin (api)", none));
    assert_true(matches("region", eu_ingest));
    assert_false(matches("region", none));
    assert_true(matches("!region", none));
    assert_false(matches("!region", eu_ingest));
    assert_true(matches("region=eu,role=ingest", eu_ingest));
    assert_false(matches("region=eu,role=api", eu_ingest));
    assert_true(matches("", none)); /* the empty selector matches everything */
    assert_true(matches("agent=a4", none));
}

static void test_labels_parse_check_and_format(void **state)
{
    (void)state;
    char err[AH_ERRLEN];
    char text[AH_LABELS_TEXT_MAX + 1];
    ah_labels_t *l = ah_labels_parse(" role = ingest, region=eu ", err, sizeof(err));
    assert_non_null(l);
    assert_int_equal(ah_labels_set(l, "agent", "a1", err, sizeof(err)), AH_OK);
    assert_int_equal(ah_labels_format(l, text, sizeof(text)), AH_OK);
    assert_string_equal(text, "agent=a1,region=eu,role=ingest");
    assert_string_equal(ah_labels_get(l, "region"), "eu");
    assert_null(ah_labels_get(l, "zone"));
    assert_int_equal(ah_labels_set(l, "region", "us", err, sizeof(err)), AH_OK); /* replaces */
    assert_string_equal(ah_labels_get(l, "region"), "us");
    assert_int_equal(ah_labels_format(l, text, 10), AH_EINVAL); /* never a cut set */
    assert_string_equal(text, "");
    ah_labels_free(l);

    assert_null(ah_labels_parse("region=eu,region=us", err, sizeof(err)));
    assert_string_equal(err, "label key 'region' is given twice");
    assert_null(ah_labels_parse("region", err, sizeof(err)));
    assert_string_equal(err, "label 'region' has no '=' (labels are key=value,key=value)");
    assert_null(ah_labels_parse("re gion=eu", err, sizeof(err)));
    assert_non_null(strstr(err, "label key 're gion'"));
    assert_null(ah_labels_parse("region=e u", err, sizeof(err)));
    assert_non_null(strstr(err, "label value 'e u'"));
    l = ah_labels_parse("", err, sizeof(err));
    assert_non_null(l);
    assert_int_equal(ah_labels_count(l), 0);
    ah_labels_free(l);
}

static void test_downward_api_labels_file(void **state)
{
    (void)state;
    char err[AH_ERRLEN];
    char text[AH_LABELS_TEXT_MAX + 1];
    ah_labels_t *l = ah_labels_parse_downward(
        "app.kubernetes.io/name=\"agenthost\"\nregion=\"eu\"\n\npod-template-hash=\"7d9f\"\n", err,
        sizeof(err));
    assert_non_null(l);
    assert_int_equal(ah_labels_format(l, text, sizeof(text)), AH_OK);
    assert_string_equal(text, "app.kubernetes.io/name=agenthost,pod-template-hash=7d9f,region=eu");
    ah_labels_free(l);
    assert_null(ah_labels_parse_downward("region=eu\n", err, sizeof(err)));
    assert_string_equal(err, "line 1: the value must be in double quotes");
    assert_null(ah_labels_parse_downward("a=\"1\"\nbad key=\"x\"\n", err, sizeof(err)));
    assert_non_null(strstr(err, "line 2: label key 'bad key'"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_operator_parses_to_its_canonical_spelling),
        cmocka_unit_test(test_two_spellings_of_one_selector_are_one_canonical_text),
        cmocka_unit_test(test_malformed_selectors_are_errors_that_say_where),
        cmocka_unit_test(test_matcher_follows_kubernetes_semantics),
        cmocka_unit_test(test_labels_parse_check_and_format),
        cmocka_unit_test(test_downward_api_labels_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
