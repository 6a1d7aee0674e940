/* Dispatch of the store interface (ah_store.h) to its implementation, and the status reporter
 * both watchers share. */
#include "ah_store.h"

#include <stdio.h>
#include <string.h>

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
    if (limit < 1 || limit > AH_HISTORY_MAX) {
        snprintf(err, errlen, "limit must be between 1 and %d", AH_HISTORY_MAX);
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

void ah_store_reporter_init(ah_store_reporter_t *r, const ah_store_listener_t *listener,
                            const char *backend, const char *topology, const char *watch_mode,
                            int64_t min_gap_us)
{
    memset(r, 0, sizeof(*r));
    ah_strlcpy(r->status.backend, backend, sizeof(r->status.backend));
    ah_strlcpy(r->status.topology, topology, sizeof(r->status.topology));
    ah_strlcpy(r->status.watch_mode, watch_mode, sizeof(r->status.watch_mode));
    r->status.latency_ms = -1.0;
    r->listener = listener;
    r->min_gap_us = min_gap_us;
}

void ah_store_report(ah_store_reporter_t *r, bool force)
{
    int64_t now = ah_mono_us();
    if (!force &&
        (r->status.polls == r->reported_polls || now - r->last_report_us < r->min_gap_us)) {
        return;
    }
    if (r->listener->on_status != NULL) {
        r->listener->on_status(r->listener->ud, &r->status);
    }
    r->last_report_us = now;
    r->reported_polls = r->status.polls;
}

bool ah_store_note_connected(ah_store_reporter_t *r, double latency_ms)
{
    if (latency_ms >= 0) {
        r->status.latency_ms = latency_ms;
    }
    if (r->status.connected) {
        return false;
    }
    if (r->ever_connected) {
        r->status.reconnects++;
    }
    r->ever_connected = true;
    r->status.connected = true;
    return true;
}

void ah_store_note_failure(ah_store_reporter_t *r, const char *message)
{
    r->status.connected = false;
    ah_strlcpy(r->status.last_error, message, sizeof(r->status.last_error));
    r->status.last_error_us = ah_now_us();
    ah_store_report(r, true);
}
