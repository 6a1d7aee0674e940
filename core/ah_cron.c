/* Five-field cron expressions: parsing into one bit set per field, and the next matching minute
 * by walking forward field by field (month, day, hour, minute) in UTC. */
#define _GNU_SOURCE
#include "ah_cron.h"

#include "ah_common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct cron_field_s {
    const char *name;
    int min;
    int max;
} cron_field_t;

static const cron_field_t cron_fields[5] = {
    {"minute", 0, 59}, {"hour", 0, 23},       {"day of month", 1, 31},
    {"month", 1, 12},  {"day of week", 0, 7},
};

/* Reads a decimal number at *p (advancing it). false when there is none or it is too long. */
static bool read_number(const char **p, int *out)
{
    const char *s = *p;
    int v = 0, digits = 0;
    while (*s >= '0' && *s <= '9') {
        if (++digits > 4) {
            return false;
        }
        v = v * 10 + (*s - '0');
        s++;
    }
    if (digits == 0) {
        return false;
    }
    *p = s;
    *out = v;
    return true;
}

/* Parses one field [start, end) into *bits. */
static int parse_field(const char *start, const char *end, const cron_field_t *f, uint64_t *bits,
                       bool *any, char *err, size_t errlen)
{
    int len = (int)(end - start);
    *bits = 0;
    *any = len == 1 && start[0] == '*';
    const char *p = start;
    while (p < end) {
        int lo, hi, step = 1;
        bool single = false;
        if (*p == '*') {
            lo = f->min;
            hi = f->max;
            p++;
        } else {
            if (!read_number(&p, &lo)) {
                goto bad;
            }
            hi = lo;
            single = true;
            if (p < end && *p == '-') {
                single = false;
                p++;
                if (!read_number(&p, &hi)) {
                    goto bad;
                }
            }
        }
        if (p < end && *p == '/') {
            p++;
            if (!read_number(&p, &step) || step == 0) {
                goto bad;
            }
            if (single) {
                hi = f->max; /* "N/STEP": from N to the end */
            }
        }
        if (p < end && *p != ',') {
            goto bad;
        }
        if (lo < f->min || hi > f->max || lo > hi) {
            snprintf(err, errlen, "cron %s field '%.*s': values must be %d-%d, low to high",
                     f->name, len, start, f->min, f->max);
            return AH_EINVAL;
        }
        for (int v = lo; v <= hi; v += step) {
            *bits |= UINT64_C(1) << v;
        }
        if (p < end) {
            p++; /* the comma */
            if (p == end) {
                goto bad;
            }
        }
    }
    return 0;
bad:
    snprintf(err, errlen, "cron %s field '%.*s' is not a list of *, N, N-M with an optional /STEP",
             f->name, len, start);
    return AH_EINVAL;
}

int ah_cron_parse(const char *expr, ah_cron_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    uint64_t bits[5];
    bool any[5];
    int n = 0;
    const char *p = expr != NULL ? expr : "";
    for (;;) {
        while (*p == ' ' || *p == '\t') {
            p++;
        }
        if (*p == '\0') {
            break;
        }
        const char *start = p;
        while (*p != '\0' && *p != ' ' && *p != '\t') {
            p++;
        }
        if (n == 5) {
            snprintf(err, errlen, "cron expression '%s' has more than five fields", expr);
            return AH_EINVAL;
        }
        if (parse_field(start, p, &cron_fields[n], &bits[n], &any[n], err, errlen) != 0) {
            return AH_EINVAL;
        }
        n++;
    }
    if (n != 5) {
        snprintf(err, errlen,
                 "cron expression '%s' needs five fields (minute hour day-of-month month "
                 "day-of-week), has %d",
                 expr != NULL ? expr : "", n);
        return AH_EINVAL;
    }
    out->minutes = bits[0];
    out->hours = (uint32_t)bits[1];
    out->days = (uint32_t)bits[2];
    out->months = (uint16_t)bits[3];
    out->weekdays = (uint8_t)((bits[4] | (bits[4] >> 7)) & 0x7f); /* 7 is Sunday too */
    out->days_any = any[2];
    out->weekdays_any = any[4];
    return 0;
}

static bool day_matches(const ah_cron_t *c, const struct tm *tm)
{
    bool dom = (c->days >> tm->tm_mday) & 1;
    bool dow = (c->weekdays >> tm->tm_wday) & 1;
    if (c->days_any || c->weekdays_any) {
        return dom && dow; /* one of them is "*": the other decides */
    }
    return dom || dow;
}

int64_t ah_cron_next(const ah_cron_t *cron, int64_t after)
{
    time_t t = (time_t)((after / 60 + 1) * 60);
    if (after < 0) {
        t = 0;
    }
    time_t limit = t + (time_t)8 * 366 * 86400;
    struct tm tm;
    while (t <= limit) {
        gmtime_r(&t, &tm);
        if (!((cron->months >> (tm.tm_mon + 1)) & 1)) {
            tm.tm_mon++;
            tm.tm_mday = 1;
            tm.tm_hour = 0;
            tm.tm_min = 0;
            tm.tm_sec = 0;
            t = timegm(&tm);
            continue;
        }
        if (!day_matches(cron, &tm)) {
            tm.tm_mday++;
            tm.tm_hour = 0;
            tm.tm_min = 0;
            tm.tm_sec = 0;
            t = timegm(&tm);
            continue;
        }
        if (!((cron->hours >> tm.tm_hour) & 1)) {
            tm.tm_hour++;
            tm.tm_min = 0;
            tm.tm_sec = 0;
            t = timegm(&tm);
            continue;
        }
        if (!((cron->minutes >> tm.tm_min) & 1)) {
            t += 60;
            continue;
        }
        return (int64_t)t;
    }
    return -1;
}
