/* The MongoDB control store (SPEC §5). Placeholder until the MongoDB store lands: refuses to
 * open, so MONGODB_URI fails loudly instead of silently using another store. */
#include "ah_store.h"

#include <stdio.h>

ah_store_t *ah_store_mongo_open(const ah_config_t *cfg, char *err, size_t errlen)
{
    (void)cfg;
    snprintf(err, errlen, "MONGODB_URI is set but this build has no MongoDB store yet");
    return NULL;
}
