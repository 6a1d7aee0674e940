/* libFuzzer target: settings parsing (core/ah_config.c), through the three ways in: one setting
 * by name (ah_config_set, what the embedding API calls), the environment (ah_config_from_env
 * over the process environment) and the flags of `agenthost run` (ah_config_from_args). The
 * first input byte picks the way; the rest is NUL-separated text (variable names are picked by
 * a byte from the table, so every row is reached; arbitrary names are tried too).
 *
 * Checked after every call: 0 or AH_EINVAL/AH_ENOMEM only; a failure leaves a message naming the
 * setting or the argument; a success leaves every number of the table finite and within its
 * row's bounds (or 0 where 0 disables), every checked string valid; ah_config_free releases
 * everything (LeakSanitizer). */
#include "ah_common.h"
#include "ah_config.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TOKENS 32

static size_t row_count(void)
{
    size_t n = 0;
    while (ah_config_vars()[n].name != NULL) {
        n++;
    }
    return n;
}

/* Aborts unless every field described by the table holds a value its row accepts. */
static void check_fields(const ah_config_t *cfg)
{
    for (const ah_config_var_t *v = ah_config_vars(); v->name != NULL; v++) {
        const char *field = (const char *)cfg + v->offset;
        double number;
        switch (v->kind) {
        case AH_CONFIG_SECONDS:
            number = *(const double *)field;
            break;
        case AH_CONFIG_INT:
            number = *(const int *)field;
            break;
        case AH_CONFIG_BYTES:
            number = (double)*(const size_t *)field;
            break;
        case AH_CONFIG_STRING: {
            const char *s = *(char *const *)field;
            if (s != NULL && (s[0] == '\0' || (v->check != NULL && v->check(s) != AH_OK))) {
                fprintf(stderr, "fuzz_config: %s holds an invalid value \"%s\"\n", v->name, s);
                abort();
            }
            continue;
        }
        default:
            continue;
        }
        bool zero_ok = (v->flags & AH_CONFIG_ZERO_DISABLES) && number == 0;
        if (!isfinite(number) || (!zero_ok && (number < v->min || number > v->max))) {
            fprintf(stderr, "fuzz_config: %s = %g is outside %g..%g\n", v->name, number, v->min,
                    v->max);
            abort();
        }
    }
}

/* Aborts unless rc is a documented result and a failure's message is non-empty and
 * NUL-terminated within err. */
static void check_result(int rc, const char *err, size_t errlen)
{
    if (rc != AH_OK && rc != AH_EINVAL && rc != AH_ENOMEM) {
        fprintf(stderr, "fuzz_config: unexpected result %d\n", rc);
        abort();
    }
    if (rc != AH_OK && (err[0] == '\0' || memchr(err, '\0', errlen) == NULL)) {
        fprintf(stderr, "fuzz_config: failure without a message\n");
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) {
        return 0;
    }
    /* NUL-separated tokens of a private copy (the last one terminated here) */
    char *text = malloc(size + 1);
    if (text == NULL) {
        return 0;
    }
    memcpy(text, data + 1, size - 1);
    text[size - 1] = '\0';
    char *tokens[MAX_TOKENS];
    int ntokens = 0;
    for (char *p = text; p < text + size && ntokens < MAX_TOKENS;) {
        tokens[ntokens++] = p;
        p += strlen(p) + 1;
    }
    size_t nrows = row_count();
    const ah_config_var_t *vars = ah_config_vars();

    ah_config_t cfg;
    ah_config_defaults(&cfg);
    check_fields(&cfg);
    char err[AH_ERRLEN];
    err[0] = '\0';
    int rc = AH_OK;
    switch (data[0] % 3) {
    case 0: /* ah_config_set: pairs (name, value); a name's first byte picks a row */
        for (int i = 0; i + 1 < ntokens && rc == AH_OK; i += 2) {
            unsigned char pick = (unsigned char)tokens[i][0];
            const char *name =
                pick < 0x80 && tokens[i][0] != '\0' ? tokens[i] : vars[pick % nrows].name;
            rc = ah_config_set(&cfg, name, tokens[i + 1], err, sizeof(err));
            check_result(rc, err, sizeof(err));
            /* the message may be truncated: it must hold the name's first 64 bytes */
            char head[65];
            snprintf(head, sizeof(head), "%s", name);
            if (rc != AH_OK && strstr(err, head) == NULL) {
                fprintf(stderr, "fuzz_config: message does not name %s: %s\n", name, err);
                abort();
            }
        }
        break;
    case 1: { /* the environment: tokens are values of rows picked by a leading byte */
        const char *set[MAX_TOKENS];
        int nset = 0;
        for (int i = 0; i < ntokens; i++) {
            if (tokens[i][0] == '\0') {
                continue;
            }
            const char *name = vars[(unsigned char)tokens[i][0] % nrows].name;
            if (setenv(name, tokens[i] + 1, 1) == 0) {
                set[nset++] = name;
            }
        }
        rc = ah_config_from_env(&cfg, err, sizeof(err));
        check_result(rc, err, sizeof(err));
        for (int i = 0; i < nset; i++) {
            unsetenv(set[i]);
        }
        break;
    }
    default: /* the flags of `agenthost run`: a token starting with 0x01 becomes a flag */
        for (int i = 0; i < ntokens; i++) {
            if (tokens[i][0] == '\x01' && tokens[i][1] != '\0') {
                const ah_config_var_t *v = &vars[(unsigned char)tokens[i][1] % nrows];
                if (v->flag == NULL) {
                    continue;
                }
                /* "--flag=rest" written over the token's own bytes would not fit: build it */
                size_t n = strlen(v->flag) + strlen(tokens[i] + 2) + 2;
                char *arg = malloc(n);
                if (arg == NULL) {
                    continue;
                }
                snprintf(arg, n, "%s%s%s", v->flag, tokens[i][2] != '\0' ? "=" : "", tokens[i] + 2);
                tokens[i] = arg; /* freed below: it no longer points into text */
            }
        }
        rc = ah_config_from_args(&cfg, ntokens, tokens, err, sizeof(err));
        check_result(rc, err, sizeof(err));
        for (int i = 0; i < ntokens; i++) {
            if (tokens[i] < text || tokens[i] > text + size) {
                free(tokens[i]);
            }
        }
        break;
    }
    if (rc == AH_OK) {
        check_fields(&cfg);
    }
    ah_config_free(&cfg);
    free(text);
    return 0;
}
