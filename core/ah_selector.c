/* Implementation of ah_selector.h: a hand-written scanner over the selector text (one pass,
 * positions in the errors), label sets kept sorted by key, requirements sorted into their
 * canonical order once parsed. */
#include "ah_selector.h"

#include "ah_common.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct ah_labels_s {
    char **keys; /* sorted, unique */
    char **values;
    size_t count;
};

typedef enum {
    OP_EQ = 0, /* the order of the canonical form */
    OP_IN,
    OP_NE,
    OP_NOTIN,
    OP_EXISTS,
    OP_NOT_EXISTS,
} op_t;

typedef struct {
    char *key;
    op_t op;
    char **values; /* sorted, unique; one for = and != */
    size_t count;
} requirement_t;

struct ah_selector_s {
    requirement_t *reqs;
    size_t count;
};

/* ---- label syntax ------------------------------------------------------------------------ */

static bool is_alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* A name: 1-63 bytes, alphanumeric at both ends, [-_.] allowed between. */
static bool name_ok(const char *s, size_t n)
{
    if (n == 0 || n > AH_LABEL_NAME_MAX || !is_alnum(s[0]) || !is_alnum(s[n - 1])) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        if (!is_alnum(s[i]) && s[i] != '-' && s[i] != '_' && s[i] != '.') {
            return false;
        }
    }
    return true;
}

/* A DNS-1123 subdomain: dot-separated parts of [a-z0-9-], alphanumeric at both ends. */
static bool prefix_ok(const char *s, size_t n)
{
    if (n == 0 || n > AH_LABEL_PREFIX_MAX) {
        return false;
    }
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i == n || s[i] == '.') {
            size_t len = i - start;
            if (len == 0 || s[start] == '-' || s[i - 1] == '-') {
                return false;
            }
            start = i + 1;
            continue;
        }
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '-')) {
            return false;
        }
    }
    return true;
}

/* Writes at most 64 bytes of s (n bytes) into out, escaped for a message. */
static void quote(const char *s, size_t n, char *out, size_t outlen)
{
    size_t o = 0;
    for (size_t i = 0; i < n && o + 5 < outlen; i++) {
        unsigned char c = (unsigned char)s[i];
        if (i == 64) {
            o += (size_t)snprintf(out + o, outlen - o, "...");
            break;
        }
        if (c < 0x20 || c >= 0x7f || c == '\'') {
            o += (size_t)snprintf(out + o, outlen - o, "\\x%02x", c);
        } else {
            out[o++] = (char)c;
        }
    }
    out[o < outlen ? o : outlen - 1] = '\0';
}

int ah_label_key_check(const char *key, size_t n, char *err, size_t errlen)
{
    char shown[300];
    quote(key, n, shown, sizeof(shown));
    const char *slash = memchr(key, '/', n);
    if (slash != NULL) {
        size_t plen = (size_t)(slash - key);
        if (!prefix_ok(key, plen)) {
            snprintf(err, errlen,
                     "label key '%s': the prefix before '/' must be a DNS subdomain (lowercase "
                     "letters, digits, '-' and '.', at most %d characters)",
                     shown, AH_LABEL_PREFIX_MAX);
            return AH_EINVAL;
        }
        key = slash + 1;
        n -= plen + 1;
    }
    if (!name_ok(key, n)) {
        snprintf(err, errlen,
                 "label key '%s': the name must be 1-%d characters of letters, digits, '-', '_' "
                 "and '.', beginning and ending with a letter or digit",
                 shown, AH_LABEL_NAME_MAX);
        return AH_EINVAL;
    }
    return AH_OK;
}

int ah_label_value_check(const char *value, size_t n, char *err, size_t errlen)
{
    if (n == 0 || name_ok(value, n)) {
        return AH_OK;
    }
    char shown[300];
    quote(value, n, shown, sizeof(shown));
    snprintf(err, errlen,
             "label value '%s': must be empty or 1-%d characters of letters, digits, '-', '_' "
             "and '.', beginning and ending with a letter or digit",
             shown, AH_LABEL_NAME_MAX);
    return AH_EINVAL;
}

/* ---- label sets -------------------------------------------------------------------------- */

ah_labels_t *ah_labels_new(void)
{
    return calloc(1, sizeof(ah_labels_t));
}

void ah_labels_free(ah_labels_t *l)
{
    if (l == NULL) {
        return;
    }
    for (size_t i = 0; i < l->count; i++) {
        free(l->keys[i]);
        free(l->values[i]);
    }
    free(l->keys);
    free(l->values);
    free(l);
}

/* Adds or replaces key (kn bytes) = value (vn bytes), both already checked. */
static int labels_put(ah_labels_t *l, const char *key, size_t kn, const char *value, size_t vn,
                      bool replace, char *err, size_t errlen)
{
    size_t at = 0;
    while (at < l->count) {
        int c = strncmp(l->keys[at], key, kn);
        if (c == 0 && l->keys[at][kn] == '\0') {
            if (!replace) {
                char shown[300];
                quote(key, kn, shown, sizeof(shown));
                snprintf(err, errlen, "label key '%s' is given twice", shown);
                return AH_EINVAL;
            }
            char *v = strndup(value, vn);
            if (v == NULL) {
                snprintf(err, errlen, "out of memory");
                return AH_ENOMEM;
            }
            free(l->values[at]);
            l->values[at] = v;
            return AH_OK;
        }
        if (c > 0) {
            break;
        }
        at++;
    }
    if (l->count >= AH_LABELS_MAX) {
        snprintf(err, errlen, "more than %d labels", AH_LABELS_MAX);
        return AH_EINVAL;
    }
    char **keys = realloc(l->keys, (l->count + 1) * sizeof(*keys));
    if (keys != NULL) {
        l->keys = keys;
    }
    char **values = realloc(l->values, (l->count + 1) * sizeof(*values));
    if (values != NULL) {
        l->values = values;
    }
    char *k = strndup(key, kn);
    char *v = strndup(value, vn);
    if (keys == NULL || values == NULL || k == NULL || v == NULL) {
        free(k);
        free(v);
        snprintf(err, errlen, "out of memory");
        return AH_ENOMEM;
    }
    memmove(&l->keys[at + 1], &l->keys[at], (l->count - at) * sizeof(*keys));
    memmove(&l->values[at + 1], &l->values[at], (l->count - at) * sizeof(*values));
    l->keys[at] = k;
    l->values[at] = v;
    l->count++;
    return AH_OK;
}

int ah_labels_set(ah_labels_t *l, const char *key, const char *value, char *err, size_t errlen)
{
    size_t kn = strlen(key), vn = strlen(value);
    int rc = ah_label_key_check(key, kn, err, errlen);
    if (rc == AH_OK) {
        rc = ah_label_value_check(value, vn, err, errlen);
    }
    return rc != AH_OK ? rc : labels_put(l, key, kn, value, vn, true, err, errlen);
}

static bool is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* The n bytes at s without leading and trailing blanks: *start and *len. */
static void trim(const char *s, size_t n, const char **start, size_t *len)
{
    while (n > 0 && is_blank(*s)) {
        s++;
        n--;
    }
    while (n > 0 && is_blank(s[n - 1])) {
        n--;
    }
    *start = s;
    *len = n;
}

/* Checks and adds one "key=value" (kn, vn bytes, trimmed). */
static int labels_add_pair(ah_labels_t *l, const char *key, size_t kn, const char *value, size_t vn,
                           char *err, size_t errlen)
{
    int rc = ah_label_key_check(key, kn, err, errlen);
    if (rc == AH_OK) {
        rc = ah_label_value_check(value, vn, err, errlen);
    }
    return rc != AH_OK ? rc : labels_put(l, key, kn, value, vn, false, err, errlen);
}

ah_labels_t *ah_labels_parse(const char *text, char *err, size_t errlen)
{
    ah_labels_t *l = ah_labels_new();
    if (l == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    const char *p = text != NULL ? text : "";
    const char *blank;
    size_t blank_len;
    trim(p, strlen(p), &blank, &blank_len);
    if (blank_len == 0) {
        return l;
    }
    for (;;) {
        const char *end = strchr(p, ',');
        size_t n = end != NULL ? (size_t)(end - p) : strlen(p);
        const char *eq = memchr(p, '=', n);
        if (eq == NULL) {
            char shown[300];
            const char *item;
            size_t item_len;
            trim(p, n, &item, &item_len);
            quote(item, item_len, shown, sizeof(shown));
            snprintf(err, errlen, "label '%s' has no '=' (labels are key=value,key=value)", shown);
            goto fail;
        }
        const char *key, *value;
        size_t kn, vn;
        trim(p, (size_t)(eq - p), &key, &kn);
        trim(eq + 1, n - (size_t)(eq - p) - 1, &value, &vn);
        if (labels_add_pair(l, key, kn, value, vn, err, errlen) != AH_OK) {
            goto fail;
        }
        if (end == NULL) {
            break;
        }
        p = end + 1;
    }
    return l;
fail:
    ah_labels_free(l);
    return NULL;
}

ah_labels_t *ah_labels_parse_downward(const char *content, char *err, size_t errlen)
{
    ah_labels_t *l = ah_labels_new();
    if (l == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    const char *p = content != NULL ? content : "";
    char inner[AH_ERRLEN];
    for (int line = 1; *p != '\0'; line++) {
        const char *end = strchr(p, '\n');
        size_t n = end != NULL ? (size_t)(end - p) : strlen(p);
        const char *s;
        size_t len;
        trim(p, n, &s, &len);
        if (len > 0) {
            const char *eq = memchr(s, '=', len);
            const char *key, *value;
            size_t kn, vn;
            if (eq == NULL) {
                snprintf(err, errlen, "line %d: expected key=\"value\"", line);
                goto fail;
            }
            trim(s, (size_t)(eq - s), &key, &kn);
            trim(eq + 1, len - (size_t)(eq - s) - 1, &value, &vn);
            if (vn < 2 || value[0] != '"' || value[vn - 1] != '"') {
                snprintf(err, errlen, "line %d: the value must be in double quotes", line);
                goto fail;
            }
            if (labels_add_pair(l, key, kn, value + 1, vn - 2, inner, sizeof(inner)) != AH_OK) {
                snprintf(err, errlen, "line %d: %s", line, inner);
                goto fail;
            }
        }
        if (end == NULL) {
            break;
        }
        p = end + 1;
    }
    return l;
fail:
    ah_labels_free(l);
    return NULL;
}

const char *ah_labels_get(const ah_labels_t *l, const char *key)
{
    for (size_t i = 0; l != NULL && i < l->count; i++) {
        if (strcmp(l->keys[i], key) == 0) {
            return l->values[i];
        }
    }
    return NULL;
}

size_t ah_labels_count(const ah_labels_t *l)
{
    return l != NULL ? l->count : 0;
}

const char *ah_labels_key(const ah_labels_t *l, size_t i)
{
    return l->keys[i];
}

const char *ah_labels_value(const ah_labels_t *l, size_t i)
{
    return l->values[i];
}

/* Appends s to out[n] at *used; false when it does not fit. */
static bool append(char *out, size_t n, size_t *used, const char *s)
{
    size_t len = strlen(s);
    if (*used + len + 1 > n) {
        return false;
    }
    memcpy(out + *used, s, len + 1);
    *used += len;
    return true;
}

int ah_labels_format(const ah_labels_t *l, char *out, size_t n)
{
    size_t used = 0;
    if (n == 0) {
        return AH_EINVAL;
    }
    out[0] = '\0';
    for (size_t i = 0; i < ah_labels_count(l); i++) {
        if ((i > 0 && !append(out, n, &used, ",")) || !append(out, n, &used, l->keys[i]) ||
            !append(out, n, &used, "=") || !append(out, n, &used, l->values[i])) {
            out[0] = '\0';
            return AH_EINVAL;
        }
    }
    return AH_OK;
}

/* ---- selectors --------------------------------------------------------------------------- */

static void requirement_clear(requirement_t *r)
{
    free(r->key);
    for (size_t i = 0; i < r->count; i++) {
        free(r->values[i]);
    }
    free(r->values);
}

void ah_selector_free(ah_selector_t *sel)
{
    if (sel == NULL) {
        return;
    }
    for (size_t i = 0; i < sel->count; i++) {
        requirement_clear(&sel->reqs[i]);
    }
    free(sel->reqs);
    free(sel);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int cmp_requirement(const void *a, const void *b)
{
    const requirement_t *x = a, *y = b;
    int c = strcmp(x->key, y->key);
    if (c != 0) {
        return c;
    }
    if (x->op != y->op) {
        return x->op < y->op ? -1 : 1;
    }
    for (size_t i = 0; i < x->count && i < y->count; i++) {
        c = strcmp(x->values[i], y->values[i]);
        if (c != 0) {
            return c;
        }
    }
    return x->count < y->count ? -1 : x->count > y->count ? 1 : 0;
}

/* The scanner: text, position, error buffer. */
typedef struct {
    const char *text;
    size_t pos;
    char *err;
    size_t errlen;
} scanner_t;

static void skip_blanks(scanner_t *s)
{
    while (is_blank(s->text[s->pos])) {
        s->pos++;
    }
}

static bool is_key_char(char c)
{
    return is_alnum(c) || c == '-' || c == '_' || c == '.' || c == '/';
}

static bool is_value_char(char c)
{
    return is_alnum(c) || c == '-' || c == '_' || c == '.';
}

/* Reports "selector: <what> at position N" (1-based) and returns AH_EINVAL. */
static int scan_error(scanner_t *s, const char *what)
{
    char c = s->text[s->pos];
    if (c == '\0') {
        snprintf(s->err, s->errlen, "selector: %s at the end", what);
    } else if ((unsigned char)c >= 0x20 && (unsigned char)c < 0x7f) {
        snprintf(s->err, s->errlen, "selector: %s at position %zu ('%c')", what, s->pos + 1, c);
    } else {
        snprintf(s->err, s->errlen, "selector: %s at position %zu (byte 0x%02x)", what, s->pos + 1,
                 (unsigned char)c);
    }
    return AH_EINVAL;
}

/* Reads a key into *out (malloc'd) and checks it. */
static int scan_key(scanner_t *s, char **out)
{
    size_t start = s->pos;
    while (is_key_char(s->text[s->pos])) {
        s->pos++;
    }
    if (s->pos == start) {
        return scan_error(s, "expected a label key");
    }
    char inner[AH_ERRLEN];
    if (ah_label_key_check(s->text + start, s->pos - start, inner, sizeof(inner)) != AH_OK) {
        snprintf(s->err, s->errlen, "selector: %s", inner);
        return AH_EINVAL;
    }
    *out = strndup(s->text + start, s->pos - start);
    if (*out == NULL) {
        snprintf(s->err, s->errlen, "out of memory");
        return AH_ENOMEM;
    }
    return AH_OK;
}

/* Reads a value (possibly empty) and adds it to r's values. */
static int scan_value(scanner_t *s, requirement_t *r)
{
    size_t start = s->pos;
    while (is_value_char(s->text[s->pos])) {
        s->pos++;
    }
    char inner[AH_ERRLEN];
    if (ah_label_value_check(s->text + start, s->pos - start, inner, sizeof(inner)) != AH_OK) {
        snprintf(s->err, s->errlen, "selector: %s", inner);
        return AH_EINVAL;
    }
    if (r->count >= AH_SELECTOR_VALUES_MAX) {
        snprintf(s->err, s->errlen, "selector: more than %d values in one set",
                 AH_SELECTOR_VALUES_MAX);
        return AH_EINVAL;
    }
    char **values = realloc(r->values, (r->count + 1) * sizeof(*values));
    if (values == NULL) {
        snprintf(s->err, s->errlen, "out of memory");
        return AH_ENOMEM;
    }
    r->values = values;
    r->values[r->count] = strndup(s->text + start, s->pos - start);
    if (r->values[r->count] == NULL) {
        snprintf(s->err, s->errlen, "out of memory");
        return AH_ENOMEM;
    }
    r->count++;
    return AH_OK;
}

/* True (and the word consumed) when the text at the position is `word` followed by a blank or
 * '('. */
static bool scan_word(scanner_t *s, const char *word)
{
    size_t n = strlen(word);
    const char *at = s->text + s->pos;
    if (strncmp(at, word, n) == 0 && (is_blank(at[n]) || at[n] == '(')) {
        s->pos += n;
        return true;
    }
    return false;
}

/* Reads "(v1, v2, ...)" into r. */
static int scan_set(scanner_t *s, requirement_t *r)
{
    skip_blanks(s);
    if (s->text[s->pos] != '(') {
        return scan_error(s, "expected '(' after in/notin");
    }
    s->pos++;
    for (;;) {
        skip_blanks(s);
        if (s->text[s->pos] == ')' && r->count == 0) {
            return scan_error(s, "an in/notin set needs at least one value");
        }
        if (!is_value_char(s->text[s->pos])) {
            /* an empty value in a set would format as "k in ()", which is no selector */
            return scan_error(s, "expected a value in the set");
        }
        int rc = scan_value(s, r);
        if (rc != AH_OK) {
            return rc;
        }
        skip_blanks(s);
        if (s->text[s->pos] == ')') {
            s->pos++;
            return AH_OK;
        }
        if (s->text[s->pos] != ',') {
            return scan_error(s, "expected ',' or ')' in a value set");
        }
        s->pos++;
    }
}

/* Reads one requirement into r (zeroed by the caller). */
static int scan_requirement(scanner_t *s, requirement_t *r)
{
    skip_blanks(s);
    if (s->text[s->pos] == '!') {
        s->pos++;
        skip_blanks(s);
        r->op = OP_NOT_EXISTS;
        return scan_key(s, &r->key);
    }
    int rc = scan_key(s, &r->key);
    if (rc != AH_OK) {
        return rc;
    }
    skip_blanks(s);
    const char *at = s->text + s->pos;
    if (*at == '\0' || *at == ',') {
        r->op = OP_EXISTS;
        return AH_OK;
    }
    if (at[0] == '=' || (at[0] == '!' && at[1] == '=')) {
        r->op = at[0] == '=' ? OP_EQ : OP_NE;
        s->pos += at[0] == '=' && at[1] == '=' ? 2 : at[0] == '=' ? 1 : 2;
        skip_blanks(s);
        return scan_value(s, r);
    }
    if (scan_word(s, "in")) {
        r->op = OP_IN;
        return scan_set(s, r);
    }
    if (scan_word(s, "notin")) {
        r->op = OP_NOTIN;
        return scan_set(s, r);
    }
    return scan_error(s, "expected '=', '==', '!=', 'in', 'notin', ',' or the end");
}

/* Sorts r's values and drops duplicates. */
static void requirement_normalise(requirement_t *r)
{
    if (r->count < 2) {
        return;
    }
    qsort(r->values, r->count, sizeof(*r->values), cmp_str);
    size_t kept = 1;
    for (size_t i = 1; i < r->count; i++) {
        if (strcmp(r->values[i], r->values[kept - 1]) == 0) {
            free(r->values[i]);
        } else {
            r->values[kept++] = r->values[i];
        }
    }
    r->count = kept;
}

ah_selector_t *ah_selector_parse(const char *text, char *err, size_t errlen)
{
    ah_selector_t *sel = calloc(1, sizeof(*sel));
    if (sel == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    scanner_t s = {.text = text != NULL ? text : "", .err = err, .errlen = errlen};
    skip_blanks(&s);
    if (s.text[s.pos] == '\0') {
        return sel;
    }
    for (;;) {
        if (sel->count >= AH_SELECTOR_REQS_MAX) {
            snprintf(err, errlen, "selector: more than %d requirements", AH_SELECTOR_REQS_MAX);
            goto fail;
        }
        requirement_t *reqs = realloc(sel->reqs, (sel->count + 1) * sizeof(*reqs));
        if (reqs == NULL) {
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
        sel->reqs = reqs;
        requirement_t *r = &sel->reqs[sel->count++];
        memset(r, 0, sizeof(*r));
        if (scan_requirement(&s, r) != AH_OK) {
            goto fail;
        }
        requirement_normalise(r);
        skip_blanks(&s);
        if (s.text[s.pos] == '\0') {
            break;
        }
        if (s.text[s.pos] != ',') {
            scan_error(&s, "expected ',' between requirements");
            goto fail;
        }
        s.pos++;
        skip_blanks(&s);
        if (s.text[s.pos] == '\0') {
            scan_error(&s, "expected a requirement after ','");
            goto fail;
        }
    }
    qsort(sel->reqs, sel->count, sizeof(*sel->reqs), cmp_requirement);
    size_t kept = sel->count > 0 ? 1 : 0;
    for (size_t i = 1; i < sel->count; i++) {
        if (cmp_requirement(&sel->reqs[i], &sel->reqs[kept - 1]) == 0) {
            requirement_clear(&sel->reqs[i]);
        } else {
            sel->reqs[kept++] = sel->reqs[i];
        }
    }
    sel->count = kept;
    return sel;
fail:
    ah_selector_free(sel);
    return NULL;
}

bool ah_selector_empty(const ah_selector_t *sel)
{
    return sel->count == 0;
}

int ah_selector_format(const ah_selector_t *sel, char *out, size_t n)
{
    static const char *const op_text[] = {
        [OP_EQ] = "=", [OP_IN] = " in (", [OP_NE] = "!=", [OP_NOTIN] = " notin ("};
    size_t used = 0;
    if (n == 0) {
        return AH_EINVAL;
    }
    out[0] = '\0';
    for (size_t i = 0; i < sel->count; i++) {
        const requirement_t *r = &sel->reqs[i];
        bool ok = i == 0 || append(out, n, &used, ",");
        if (ok && r->op == OP_NOT_EXISTS) {
            ok = append(out, n, &used, "!");
        }
        ok = ok && append(out, n, &used, r->key);
        if (ok && r->op <= OP_NOTIN) {
            ok = append(out, n, &used, op_text[r->op]);
            for (size_t v = 0; ok && v < r->count; v++) {
                ok = (v == 0 || append(out, n, &used, ",")) && append(out, n, &used, r->values[v]);
            }
            if (ok && (r->op == OP_IN || r->op == OP_NOTIN)) {
                ok = append(out, n, &used, ")");
            }
        }
        if (!ok) {
            out[0] = '\0';
            return AH_EINVAL;
        }
    }
    return AH_OK;
}

/* True when value is one of r's values. */
static bool in_values(const requirement_t *r, const char *value)
{
    for (size_t i = 0; i < r->count; i++) {
        if (strcmp(r->values[i], value) == 0) {
            return true;
        }
    }
    return false;
}

bool ah_selector_matches(const ah_selector_t *sel, const ah_labels_t *labels)
{
    for (size_t i = 0; i < sel->count; i++) {
        const requirement_t *r = &sel->reqs[i];
        const char *value = ah_labels_get(labels, r->key);
        bool holds;
        switch (r->op) {
        case OP_EQ:
        case OP_IN:
            holds = value != NULL && in_values(r, value);
            break;
        case OP_NE:
        case OP_NOTIN:
            holds = value == NULL || !in_values(r, value);
            break;
        case OP_EXISTS:
            holds = value != NULL;
            break;
        default:
            holds = value == NULL;
            break;
        }
        if (!holds) {
            return false;
        }
    }
    return true;
}

bool ah_selector_matches_text(const ah_selector_t *sel, const char *labels_text)
{
    char err[AH_ERRLEN];
    ah_labels_t *labels = ah_labels_parse(labels_text, err, sizeof(err));
    if (labels == NULL) {
        return false;
    }
    bool matches = ah_selector_matches(sel, labels);
    ah_labels_free(labels);
    return matches;
}

unsigned long long ah_selector_id(const char *canonical)
{
    unsigned long long hash = 14695981039346656037ULL;
    for (const unsigned char *p = (const unsigned char *)canonical; *p != '\0'; p++) {
        hash ^= *p;
        hash *= 1099511628211ULL;
    }
    return hash;
}
