/* Implementation of ah_redact.h: a URI scanner that hides the password of the user info and the
 * values of secret options, and a registry of known secrets replaced wherever they appear. */
#include "ah_redact.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Writers take the lock; readers load the count (acquire) and read the entries below it, which
 * are written before the count is published (release) and never change or go away. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static char *registry[AH_REDACT_MAX];
static size_t registry_count;

static size_t known_secrets(void)
{
    return __atomic_load_n(&registry_count, __ATOMIC_ACQUIRE);
}

/* Option names whose value is a secret, compared case-insensitively. */
static const char *const secret_options[] = {
    "password",
    "authmechanismproperties",
    "tlscertificatekeyfilepassword",
    "sslclientcertificatekeypassword",
    "token",
    "access_token",
    "secret",
    "api_key",
    "apikey",
};

/* Where redacted text goes: out (size n) is filled up to n - 1 bytes, always NUL-terminated. */
typedef struct {
    char *out;
    size_t n;
    size_t used;
} sink_t;

static void sink_put(sink_t *s, const char *p, size_t len)
{
    if (s->n == 0) {
        return;
    }
    size_t room = s->n - 1 - s->used;
    if (len > room) {
        len = room;
    }
    memcpy(s->out + s->used, p, len);
    s->used += len;
    s->out[s->used] = '\0';
}

static bool is_secret_option(const char *key, size_t len)
{
    for (size_t i = 0; i < sizeof(secret_options) / sizeof(secret_options[0]); i++) {
        if (strlen(secret_options[i]) == len && strncasecmp(secret_options[i], key, len) == 0) {
            return true;
        }
    }
    return false;
}

/* The longest registered secret that starts at p (at most len bytes), or 0. */
static size_t secret_at(const char *p, size_t len, size_t count)
{
    size_t best = 0;
    for (size_t i = 0; i < count; i++) {
        size_t sl = strlen(registry[i]);
        if (sl <= len && sl > best && memcmp(p, registry[i], sl) == 0) {
            best = sl;
        }
    }
    return best;
}

/* Copies [p, p + len) with registered secrets replaced. */
static void put_plain(sink_t *s, const char *p, size_t len)
{
    size_t count = known_secrets();
    size_t start = 0;
    for (size_t i = 0; i < len;) {
        size_t sl = count > 0 ? secret_at(p + i, len - i, count) : 0;
        if (sl == 0) {
            i++;
            continue;
        }
        sink_put(s, p + start, i - start);
        sink_put(s, AH_REDACTED, strlen(AH_REDACTED));
        i += sl;
        start = i;
    }
    sink_put(s, p + start, len - start);
}

/* The parts of one URI [p, p + len): visit(part, part_len, secret, ud) in order. A part is
 * secret when it is the user info's password or a secret option's value. */
typedef void (*uri_visit_fn)(const char *part, size_t len, bool secret, void *ud);

static void walk_uri(const char *p, size_t len, uri_visit_fn visit, void *ud)
{
    const char *end = p + len;
    const char *colon = memchr(p, ':', len);
    const char *auth = colon != NULL ? colon + 1 : p;
    while (auth < end && *auth == '/') {
        auth++;
    }
    const char *query = auth;
    while (query < end && *query != '?') {
        query++;
    }
    const char *at = NULL; /* the last '@' before the query: passwords may hold '@' unescaped */
    for (const char *q = auth; q < query; q++) {
        if (*q == '@') {
            at = q;
        }
    }
    const char *pos = p;
    if (at != NULL) {
        const char *pw = auth;
        while (pw < at && *pw != ':') {
            pw++;
        }
        if (pw < at) {
            visit(pos, (size_t)(pw + 1 - pos), false, ud);
            visit(pw + 1, (size_t)(at - pw - 1), true, ud);
            pos = at;
        }
    }
    if (query == end) {
        visit(pos, (size_t)(end - pos), false, ud);
        return;
    }
    visit(pos, (size_t)(query + 1 - pos), false, ud);
    const char *opt = query + 1;
    while (opt < end) {
        const char *opt_end = opt;
        while (opt_end < end && *opt_end != '&' && *opt_end != ';') {
            opt_end++;
        }
        const char *eq = opt;
        while (eq < opt_end && *eq != '=') {
            eq++;
        }
        if (eq < opt_end && is_secret_option(opt, (size_t)(eq - opt))) {
            visit(opt, (size_t)(eq + 1 - opt), false, ud);
            visit(eq + 1, (size_t)(opt_end - eq - 1), true, ud);
        } else {
            visit(opt, (size_t)(opt_end - opt), false, ud);
        }
        if (opt_end < end) {
            visit(opt_end, 1, false, ud);
        }
        opt = opt_end + 1;
    }
}

static void visit_redact(const char *part, size_t len, bool secret, void *ud)
{
    sink_t *s = ud;
    if (secret) {
        if (len > 0) {
            sink_put(s, AH_REDACTED, strlen(AH_REDACTED));
        }
    } else {
        put_plain(s, part, len);
    }
}

const char *ah_redact_uri(const char *uri, char *out, size_t n)
{
    sink_t s = {out, n, 0};
    if (n > 0) {
        out[0] = '\0';
    }
    walk_uri(uri, strlen(uri), visit_redact, &s);
    return out;
}

static bool is_scheme_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '+' ||
           c == '-' || c == '.';
}

/* A URI in free text ends at white space, a quote or a bracket. */
static bool ends_word(char c)
{
    return c == '\0' || c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '"' || c == '\'' ||
           c == '`' || c == '<' || c == '>' || c == ')' || c == ']' || c == '}';
}

static void redact_text(const char *text, sink_t *s)
{
    size_t len = strlen(text);
    size_t copied = 0; /* text[0, copied) is written */
    const char *p = text;
    while ((p = strstr(p, "://")) != NULL) {
        const char *start = p;
        while (start > text + copied && is_scheme_char(start[-1])) {
            start--;
        }
        const char *stop = p + 3;
        while (!ends_word(*stop)) {
            stop++;
        }
        if (start == p) { /* no scheme: not a URI */
            p += 3;
            continue;
        }
        put_plain(s, text + copied, (size_t)(start - (text + copied)));
        walk_uri(start, (size_t)(stop - start), visit_redact, s);
        copied = (size_t)(stop - text);
        p = stop;
    }
    put_plain(s, text + copied, len - copied);
}

const char *ah_redact_text(const char *text, char *out, size_t n)
{
    sink_t s = {out, n, 0};
    if (n > 0) {
        out[0] = '\0';
    }
    redact_text(text != NULL ? text : "", &s);
    return out;
}

bool ah_redact_needed(const char *text)
{
    if (text == NULL) {
        return false;
    }
    if (strstr(text, "://") != NULL) {
        return true;
    }
    size_t count = known_secrets();
    for (size_t i = 0; i < count; i++) {
        if (strstr(text, registry[i]) != NULL) {
            return true;
        }
    }
    return false;
}

char *ah_redact_dup(const char *text)
{
    /* Redaction only replaces a part by "***", so the copy is at most that much longer per
     * character of the text. */
    size_t len = strlen(text);
    size_t cap = len * strlen(AH_REDACTED) + 1;
    char *out = malloc(cap);
    if (out != NULL) {
        ah_redact_text(text, out, cap);
    }
    return out;
}

/* Registry lock held. */
static void add_secret_locked(const char *secret, size_t len)
{
    if (len < AH_REDACT_MIN || registry_count >= AH_REDACT_MAX) {
        return;
    }
    for (size_t i = 0; i < registry_count; i++) {
        if (strlen(registry[i]) == len && memcmp(registry[i], secret, len) == 0) {
            return;
        }
    }
    char *copy = strndup(secret, len);
    if (copy != NULL) {
        registry[registry_count] = copy;
        __atomic_store_n(&registry_count, registry_count + 1, __ATOMIC_RELEASE);
    }
}

void ah_redact_add_secret(const char *secret)
{
    if (secret == NULL) {
        return;
    }
    pthread_mutex_lock(&registry_lock);
    add_secret_locked(secret, strlen(secret));
    pthread_mutex_unlock(&registry_lock);
}

static int hex_value(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

static void visit_register(const char *part, size_t len, bool secret, void *ud)
{
    (void)ud;
    if (!secret) {
        return;
    }
    add_secret_locked(part, len);
    char decoded[512];
    size_t used = 0;
    for (size_t i = 0; i < len && used + 1 < sizeof(decoded); i++) {
        int hi = i + 2 < len && part[i] == '%' ? hex_value(part[i + 1]) : -1;
        int lo = hi >= 0 ? hex_value(part[i + 2]) : -1;
        if (hi >= 0 && lo >= 0) {
            decoded[used++] = (char)(hi * 16 + lo);
            i += 2;
        } else {
            decoded[used++] = part[i];
        }
    }
    add_secret_locked(decoded, used);
}

void ah_redact_add_uri(const char *uri)
{
    if (uri == NULL) {
        return;
    }
    pthread_mutex_lock(&registry_lock);
    walk_uri(uri, strlen(uri), visit_register, NULL);
    pthread_mutex_unlock(&registry_lock);
}
