/* Five-field cron expressions (minute hour day-of-month month day-of-week, UTC) for
 * agent.every: parsing into bit sets and finding the next matching minute. Pure functions, any
 * thread. */
#ifndef AH_CRON_H
#define AH_CRON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A parsed expression: bit i set = value i allowed. */
typedef struct ah_cron_s {
    uint64_t minutes;  /* 0-59 */
    uint32_t hours;    /* 0-23 */
    uint32_t days;     /* 1-31 */
    uint16_t months;   /* 1-12 */
    uint8_t weekdays;  /* 0-6, Sunday = 0 (7 is read as 0) */
    bool days_any;     /* the day-of-month field was "*" */
    bool weekdays_any; /* the day-of-week field was "*" */
} ah_cron_t;

/* Parses `expr`: five fields separated by blanks, each a list (",") of "*", "N", "N-M", any of
 * those followed by "/STEP". Day of month and day of week: when both are restricted a day
 * matching either one matches (as cron does). Returns 0 and *out, or AH_EINVAL with err naming
 * the field and what is wrong with it. */
int ah_cron_parse(const char *expr, ah_cron_t *out, char *err, size_t errlen);

/* The first matching minute strictly after `after` (seconds since the epoch, UTC), in seconds
 * since the epoch; -1 when none comes within 8 years (e.g. "0 0 31 2 *"). */
int64_t ah_cron_next(const ah_cron_t *cron, int64_t after);

#endif
