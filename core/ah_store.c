/* Dispatch of the store interface (ah_store.h) to its implementation. */
#include "ah_store.h"

#include <stdio.h>

int ah_store_read(ah_store_t *st, ah_control_t *out, char *err, size_t errlen)
{
    return st->ops->read(st, out, err, errlen);
}

int ah_store_command(ah_store_t *st, ah_command_t cmd, const char *reason, const char *updated_by,
                     const char *agent_id, ah_control_t *out, char *err, size_t errlen)
{
    if (cmd != AH_CMD_PAUSE && cmd != AH_CMD_RUNNING && cmd != AH_CMD_SHUTDOWN) {
        snprintf(err, errlen, "unknown command");
        return AH_EINVAL;
    }
    return st->ops->command(st, cmd, reason ? reason : "", updated_by ? updated_by : "",
                            agent_id ? agent_id : "", out, err, errlen);
}

int ah_store_history(ah_store_t *st, int limit, ah_control_t *out, int *count, char *err,
                     size_t errlen)
{
    if (limit < 1 || limit > 1000) {
        snprintf(err, errlen, "limit must be between 1 and 1000");
        return AH_EINVAL;
    }
    return st->ops->history(st, limit, out, count, err, errlen);
}

int ah_store_watch_start(ah_store_t *st, const ah_store_listener_t *listener, char *err,
                         size_t errlen)
{
    return st->ops->watch_start(st, listener, err, errlen);
}

void ah_store_close(ah_store_t *st)
{
    if (st != NULL) {
        st->ops->close(st);
    }
}
