/* Credentials never leave the process. Two mechanisms, both applied by every writer that lets
 * text out (ah_log's lines, text or JSON; ah_json_str, so every HTTP body; the command line's
 * messages on stderr; `ctl`'s output; the store's last error):
 *
 * - structure: in anything that looks like a URI (`scheme://...`, also a mistyped scheme or a
 *   missing slash when the caller knows the text is a URI), the password of the user info and the
 *   values of secret options (password=, authMechanismProperties=, tlsCertificateKeyFilePassword=,
 *   token=, ...) become "***"; the user name, hosts and other options stay, so the text still
 *   says what is wrong;
 * - registration: the configuration registers each secret it is given (the passwords and secret
 *   options of MONGODB_URI and AGENT_MONGODB_URI, raw and percent-decoded, and AGENT_API_TOKEN),
 *   and every occurrence of one, anywhere in a text (a driver's message that quotes it), becomes
 *   "***". Secrets shorter than AH_REDACT_MIN characters are not registered (they would
 *   mangle ordinary words); the structural rule still hides them inside URIs.
 *
 * All functions are thread-safe; the registry only grows (at most AH_REDACT_MAX secrets). */
#ifndef AH_REDACT_H
#define AH_REDACT_H

#include <stdbool.h>
#include <stddef.h>

#define AH_REDACTED "***"
#define AH_REDACT_MIN 4
#define AH_REDACT_MAX 32

/* Writes uri into out (size n, NUL-terminated, truncated) with its secrets replaced by "***",
 * treating the whole text as one URI even when it is not a valid one (`mongdb://u:p@h`,
 * `mongodb:/u:p@h`). Registered secrets are replaced too. Returns out. */
const char *ah_redact_uri(const char *uri, char *out, size_t n);

/* Writes text into out (size n, NUL-terminated, truncated) with every URI-looking word
 * (`scheme://...`) redacted as by ah_redact_uri and every registered secret replaced.
 * Returns out. */
const char *ah_redact_text(const char *text, char *out, size_t n);

/* True when ah_redact_text could change text (it names a scheme or holds a registered secret);
 * a cheap test for writers that copy only when needed. */
bool ah_redact_needed(const char *text);

/* ah_redact_text into a malloc'd copy (the caller frees it); NULL when out of memory. */
char *ah_redact_dup(const char *text);

/* Registers secret (copied) for every later redaction; ignored when NULL, shorter than
 * AH_REDACT_MIN, already known or the registry is full. */
void ah_redact_add_secret(const char *secret);

/* Registers the secrets a URI carries: the user info's password and the values of secret
 * options, each raw and percent-decoded. Works on invalid URIs too. */
void ah_redact_add_uri(const char *uri);

#endif
