/* Labels and label selectors (docs/API.md, "Label selectors"): an agent's labels
 * (AGENT_LABELS, AGENT_LABELS_FILE, the implicit agent=<AGENT_ID>) and the Kubernetes selector
 * syntax scoped commands are addressed with. Keys and values follow Kubernetes' label syntax:
 * a key is an optional DNS-subdomain prefix (at most 253 bytes) and '/', then a name of 1-63
 * bytes ([A-Za-z0-9] at both ends, [-_.A-Za-z0-9] between); a value is empty or a name.
 *
 * Selector grammar: requirements separated by ',' (AND), each one of `k=v`, `k==v`, `k!=v`,
 * `k in (a,b)`, `k notin (a,b)`, `k` (the label exists), `!k` (it does not); blanks around
 * tokens are ignored. The canonical form sorts the requirements (by key, then operator, then
 * values) and the values of a set, drops duplicates and spells `==` as `=`, so two spellings of
 * one selector format alike: `b=2, a==1` and `a=1,b=2` are both "a=1,b=2".
 *
 * Pure functions on owned heap objects; any thread. */
#ifndef AH_SELECTOR_H
#define AH_SELECTOR_H

#include <stdbool.h>
#include <stddef.h>

#define AH_LABEL_NAME_MAX 63      /* a name or a value */
#define AH_LABEL_PREFIX_MAX 253   /* the DNS-subdomain prefix of a key */
#define AH_LABELS_MAX 64          /* labels per agent */
#define AH_LABELS_TEXT_MAX 2047   /* the canonical "k=v,k=v" text of an agent's labels */
#define AH_SELECTOR_TEXT_MAX 511  /* a selector's canonical text (AH_SELECTOR_MAX) */
#define AH_SELECTOR_REQS_MAX 32   /* requirements per selector */
#define AH_SELECTOR_VALUES_MAX 32 /* values per in / notin set */

typedef struct ah_labels_s ah_labels_t;
typedef struct ah_selector_s ah_selector_t;

/* 0 when the n bytes at key form a valid label key, else AH_EINVAL with err saying why (naming
 * the key). */
int ah_label_key_check(const char *key, size_t n, char *err, size_t errlen);
/* 0 when the n bytes at value form a valid label value (may be empty), else AH_EINVAL. */
int ah_label_value_check(const char *value, size_t n, char *err, size_t errlen);

/* An empty label set. NULL when out of memory. */
ah_labels_t *ah_labels_new(void);
/* Parses "k=v,k2=v2" (blanks around keys and values ignored; an empty text is no labels).
 * A bad key or value, a missing '=', or a key given twice is an error naming it. Returns the
 * set (free with ah_labels_free), or NULL with err set. */
ah_labels_t *ah_labels_parse(const char *text, char *err, size_t errlen);
/* Parses the Kubernetes Downward API `labels` file: one `key="value"` per line (the value
 * quoted as Go's %q writes it; blank lines ignored). NULL with err naming the line on error. */
ah_labels_t *ah_labels_parse_downward(const char *content, char *err, size_t errlen);
/* Adds key=value or replaces the value of key (both checked). 0, AH_EINVAL (err set),
 * AH_ENOMEM. */
int ah_labels_set(ah_labels_t *l, const char *key, const char *value, char *err, size_t errlen);
/* The value of key, or NULL when the set has no such label. */
const char *ah_labels_get(const ah_labels_t *l, const char *key);
size_t ah_labels_count(const ah_labels_t *l);
/* The i-th label in key order (i < ah_labels_count). */
const char *ah_labels_key(const ah_labels_t *l, size_t i);
const char *ah_labels_value(const ah_labels_t *l, size_t i);
/* Writes the canonical text "k=v,k2=v2" (keys sorted) into out[n]. 0, or AH_EINVAL when it
 * does not fit (out then holds "", never a cut set). */
int ah_labels_format(const ah_labels_t *l, char *out, size_t n);
void ah_labels_free(ah_labels_t *l);

/* Parses a selector. An empty (or blank) text is the empty selector, which matches every label
 * set. NULL with err naming the problem (and where) on a malformed selector or out of memory.
 * Free with ah_selector_free. */
ah_selector_t *ah_selector_parse(const char *text, char *err, size_t errlen);
/* True when the selector has no requirement. */
bool ah_selector_empty(const ah_selector_t *sel);
/* Writes the canonical text into out[n]. 0, or AH_EINVAL when it does not fit (out ""). */
int ah_selector_format(const ah_selector_t *sel, char *out, size_t n);
/* True when every requirement holds for labels (NULL: no labels). */
bool ah_selector_matches(const ah_selector_t *sel, const ah_labels_t *labels);
void ah_selector_free(ah_selector_t *sel);

/* The 64-bit identity of a canonical selector text (FNV-1a): how an agent's status record names
 * the scopes it acknowledged without repeating their text. */
unsigned long long ah_selector_id(const char *canonical);

/* Convenience for a caller holding texts: parses the selector text and the canonical labels
 * text and matches. false when either does not parse. */
bool ah_selector_matches_text(const ah_selector_t *sel, const char *labels_text);

#endif
