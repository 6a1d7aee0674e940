/* The fleet console (docs/CONSOLE.md): the files of web/ compiled into the binary by
 * cmake/embed_web.cmake, and the headers they are served with. Read-only data: any thread may
 * call these functions. */
#ifndef AH_CONSOLE_H
#define AH_CONSOLE_H

#include <stddef.h>

typedef struct ah_console_asset_s {
    const char *path;         /* "/" for index.html, else "/<file name>" */
    const char *content_type; /* from the file's extension */
    const unsigned char *data;
    size_t size;
} ah_console_asset_t;

/* Every embedded file, terminated by an entry whose path is NULL (generated). */
extern const ah_console_asset_t ah_console_assets[];

/* The file served at `path` (without the query), or NULL. */
const ah_console_asset_t *ah_console_find(const char *path);

/* One response header. */
typedef struct ah_console_header_s {
    const char *name;
    const char *value;
} ah_console_header_t;

/* The headers every console file is served with besides those of every response (Cache-Control,
 * X-Content-Type-Options: nosniff): a Content-Security-Policy without 'unsafe-inline' and with
 * frame-ancestors 'none', and the like. Terminated by {NULL, NULL}. */
const ah_console_header_t *ah_console_headers(void);

#endif
