/* Implementation of ah_console.h. The page loads only its own files and talks only to its own
 * origin, so the policy allows 'self' and nothing inline; everything else is refused. */
#include "ah_console.h"

#include <string.h>

static const ah_console_header_t console_headers[] = {
    {"Content-Security-Policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
     "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"},
    {"X-Frame-Options", "DENY"},
    {"Referrer-Policy", "no-referrer"},
    {"Cross-Origin-Opener-Policy", "same-origin"},
    {"Cross-Origin-Resource-Policy", "same-origin"},
    {NULL, NULL},
};

const ah_console_asset_t *ah_console_find(const char *path)
{
    for (const ah_console_asset_t *a = ah_console_assets; a->path != NULL; a++) {
        if (strcmp(a->path, path) == 0) {
            return a;
        }
    }
    return NULL;
}

const ah_console_header_t *ah_console_headers(void)
{
    return console_headers;
}
