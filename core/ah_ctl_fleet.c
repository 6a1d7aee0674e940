/* Implementation of ah_ctl_fleet.h. The reader below walks a JSON text in place: it can skip any
 * value, decode a string, read a scalar's text, and find a member of an object. It validates as
 * it goes (a malformed body makes the caller report "not an answer"), and never allocates. */
#include "ah_ctl_fleet.h"

#include "ah_common.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define CTL_DEPTH_MAX 32

typedef struct json_reader_s {
    const char *p;
    bool ok;
} json_reader_t;

static void skip_ws(json_reader_t *r)
{
    while (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r') {
        r->p++;
    }
}

/* Appends the UTF-8 encoding of code point cp to out (size n, used *len). */
static void put_utf8(char *out, size_t n, size_t *len, unsigned cp)
{
    char enc[4];
    size_t k;
    if (cp < 0x80) {
        enc[0] = (char)cp;
        k = 1;
    } else if (cp < 0x800) {
        enc[0] = (char)(0xC0 | (cp >> 6));
        enc[1] = (char)(0x80 | (cp & 0x3F));
        k = 2;
    } else if (cp < 0x10000) {
        enc[0] = (char)(0xE0 | (cp >> 12));
        enc[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        enc[2] = (char)(0x80 | (cp & 0x3F));
        k = 3;
    } else {
        enc[0] = (char)(0xF0 | (cp >> 18));
        enc[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        enc[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        enc[3] = (char)(0x80 | (cp & 0x3F));
        k = 4;
    }
    for (size_t i = 0; i < k && out != NULL && *len + 1 < n; i++) {
        out[(*len)++] = enc[i];
    }
}

static int hex4(const char *p)
{
    int v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (d < 0) {
            return -1;
        }
        v = v * 16 + d;
    }
    return v;
}

/* Reads a string at r->p into out (size n, truncated; out may be NULL to skip it). */
static void read_string(json_reader_t *r, char *out, size_t n)
{
    size_t len = 0;
    skip_ws(r);
    if (*r->p != '"') {
        r->ok = false;
        return;
    }
    r->p++;
    while (r->ok && *r->p != '"') {
        unsigned char c = (unsigned char)*r->p;
        if (c == '\0' || c < 0x20) {
            r->ok = false;
            break;
        }
        if (c != '\\') {
            if (out != NULL && len + 1 < n) {
                out[len++] = (char)c;
            }
            r->p++;
            continue;
        }
        char e = r->p[1];
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e != '\0' && simple != NULL) {
            static const char decoded[] = "\"\\/\b\f\n\r\t";
            if (out != NULL && len + 1 < n) {
                out[len++] = decoded[simple - "\"\\/bfnrt"];
            }
            r->p += 2;
        } else if (e == 'u' && hex4(r->p + 2) >= 0) {
            unsigned cp = (unsigned)hex4(r->p + 2);
            r->p += 6;
            if (cp >= 0xD800 && cp < 0xDC00 && r->p[0] == '\\' && r->p[1] == 'u' &&
                hex4(r->p + 2) >= 0xDC00 && hex4(r->p + 2) < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + ((unsigned)hex4(r->p + 2) - 0xDC00);
                r->p += 6;
            }
            put_utf8(out, n, &len, cp);
        } else {
            r->ok = false;
        }
    }
    if (r->ok) {
        r->p++; /* the closing quote */
    }
    if (out != NULL && n > 0) {
        out[len < n ? len : n - 1] = '\0';
    }
}

static void skip_value(json_reader_t *r, int depth);

/* Calls nothing: walks an object or array at r->p to its end. */
static void skip_container(json_reader_t *r, int depth)
{
    char close = *r->p == '{' ? '}' : ']';
    bool object = close == '}';
    r->p++;
    skip_ws(r);
    if (*r->p == close) {
        r->p++;
        return;
    }
    while (r->ok) {
        if (object) {
            read_string(r, NULL, 0);
            skip_ws(r);
            if (*r->p != ':') {
                r->ok = false;
                return;
            }
            r->p++;
        }
        skip_value(r, depth + 1);
        skip_ws(r);
        if (*r->p == ',') {
            r->p++;
            continue;
        }
        if (*r->p == close) {
            r->p++;
            return;
        }
        r->ok = false;
    }
}

static void skip_value(json_reader_t *r, int depth)
{
    skip_ws(r);
    if (depth > CTL_DEPTH_MAX) {
        r->ok = false;
    } else if (*r->p == '"') {
        read_string(r, NULL, 0);
    } else if (*r->p == '{' || *r->p == '[') {
        skip_container(r, depth);
    } else {
        const char *start = r->p;
        while (*r->p != '\0' && strchr(",}] \t\r\n", *r->p) == NULL) {
            r->p++;
        }
        r->ok = r->ok && r->p > start;
    }
}

/* Copies the text of the scalar at r->p (a number, true, false, null, or a decoded string) into
 * out and moves past it. */
static void read_scalar(json_reader_t *r, char *out, size_t n)
{
    skip_ws(r);
    if (*r->p == '"') {
        read_string(r, out, n);
        return;
    }
    const char *start = r->p;
    skip_value(r, 0);
    size_t len = (size_t)(r->p - start);
    if (len >= n) {
        len = n - 1;
    }
    memcpy(out, start, len);
    out[len] = '\0';
}

/* With r->p at an object: moves r->p to the value of member `key` and returns true, or returns
 * false (r->p unspecified). */
static bool find_member(json_reader_t *r, const char *key)
{
    skip_ws(r);
    if (*r->p != '{') {
        return false;
    }
    r->p++;
    skip_ws(r);
    if (*r->p == '}') {
        return false;
    }
    while (r->ok) {
        char name[64];
        read_string(r, name, sizeof(name));
        skip_ws(r);
        if (!r->ok || *r->p != ':') {
            r->ok = false;
            return false;
        }
        r->p++;
        if (strcmp(name, key) == 0) {
            skip_ws(r);
            return true;
        }
        skip_value(r, 1);
        skip_ws(r);
        if (*r->p != ',') {
            return false;
        }
        r->p++;
    }
    return false;
}

/* The scalar text of member `key` of the object at `object` into out ("" if absent). */
static void member_text(const char *object, const char *key, char *out, size_t n)
{
    json_reader_t r = {.p = object, .ok = true};
    out[0] = '\0';
    if (find_member(&r, key) && r.ok) {
        read_scalar(&r, out, n);
        if (!r.ok) {
            out[0] = '\0';
        }
    }
}

/* Positions r at the first element of the array at r->p; false if it is empty or not one. */
static bool array_first(json_reader_t *r)
{
    skip_ws(r);
    if (*r->p != '[') {
        r->ok = false;
        return false;
    }
    r->p++;
    skip_ws(r);
    if (*r->p == ']') {
        r->p++;
        return false;
    }
    return true;
}

/* After an element: moves to the next one; false at the end of the array. */
static bool array_next(json_reader_t *r)
{
    skip_ws(r);
    if (*r->p == ',') {
        r->p++;
        skip_ws(r);
        return r->ok;
    }
    if (*r->p == ']') {
        r->p++;
    } else {
        r->ok = false;
    }
    return false;
}

/* The labels object (member "labels") of the object at `object` as "k=v,k=v" into out. */
static void member_labels(const char *object, char *out, size_t n)
{
    json_reader_t r = {.p = object, .ok = true};
    size_t used = 0;
    out[0] = '\0';
    if (!find_member(&r, "labels") || !r.ok || *r.p != '{') {
        return;
    }
    r.p++;
    skip_ws(&r);
    while (r.ok && *r.p == '"') {
        char key[320], value[80];
        read_string(&r, key, sizeof(key));
        skip_ws(&r);
        if (!r.ok || *r.p != ':') {
            break;
        }
        r.p++;
        skip_ws(&r);
        read_string(&r, value, sizeof(value));
        int len = snprintf(out + used, n - used, "%s%s=%s", used > 0 ? "," : "", key, value);
        if (len < 0 || (size_t)len >= n - used) {
            out[used] = '\0';
            break;
        }
        used += (size_t)len;
        skip_ws(&r);
        if (*r.p != ',') {
            break;
        }
        r.p++;
        skip_ws(&r);
    }
}

int ah_ctl_fleet_print_scopes(const char *body, FILE *out, FILE *err)
{
    json_reader_t r = {.p = body, .ok = true};
    if (!find_member(&r, "scopes") || !r.ok) {
        fprintf(err, "agenthost ctl: the answer has no \"scopes\"\n");
        return 1;
    }
    fprintf(out, "%-32s %-8s %7s %7s %5s %-24s %s\n", "SELECTOR", "COMMAND", "VERSION", "MATCHED",
            "HOLDS", "EXPIRES", "REASON");
    if (array_first(&r)) {
        do {
            const char *object = r.p;
            char selector[512], command[16], version[32], matched[32], holds[32], expires[40],
                reason[256];
            member_text(object, "selector", selector, sizeof(selector));
            member_text(object, "command", command, sizeof(command));
            member_text(object, "version", version, sizeof(version));
            member_text(object, "matched", matched, sizeof(matched));
            member_text(object, "holds", holds, sizeof(holds));
            member_text(object, "expires_at", expires, sizeof(expires));
            member_text(object, "reason", reason, sizeof(reason));
            fprintf(out, "%-32s %-8s %7s %7s %5s %-24s %s\n", selector, command, version, matched,
                    holds, strcmp(expires, "null") == 0 ? "-" : expires, reason);
            skip_value(&r, 1);
        } while (array_next(&r));
    }
    if (!r.ok) {
        fprintf(err, "agenthost ctl: malformed \"scopes\" in the answer\n");
        return 1;
    }
    char count[32], active[32];
    member_text(body, "count", count, sizeof(count));
    member_text(body, "active", active, sizeof(active));
    fprintf(out, "%s scopes, %s holding (pause or shutdown)\n", count, active);
    return 0;
}

int ah_ctl_fleet_print_agents(const char *body, FILE *out, FILE *err)
{
    json_reader_t r = {.p = body, .ok = true};
    if (!find_member(&r, "agents") || !r.ok) {
        fprintf(err, "agenthost ctl: the answer has no \"agents\"\n");
        return 1;
    }
    fprintf(out, "%-24s %-15s %8s %-6s %-25s %-16s %8s %10s %7s %s\n", "AGENT", "STATE", "APPLIED",
            "STALE", "LAST SEEN", "HOST", "PID", "BATCHES", "ERRORS", "LABELS");
    if (array_first(&r)) {
        do {
            const char *object = r.p;
            char id[AH_NAME_MAX + 1], state[32], applied[32], stale[16], seen[40], host[64],
                pid[32], batches[32], errors[32];
            member_text(object, "agent_id", id, sizeof(id));
            member_text(object, "state", state, sizeof(state));
            member_text(object, "applied_version", applied, sizeof(applied));
            member_text(object, "stale", stale, sizeof(stale));
            member_text(object, "last_seen", seen, sizeof(seen));
            member_text(object, "host", host, sizeof(host));
            member_text(object, "pid", pid, sizeof(pid));
            member_text(object, "batches", batches, sizeof(batches));
            member_text(object, "errors", errors, sizeof(errors));
            char labels[1024];
            member_labels(object, labels, sizeof(labels));
            /* A stale agent that did not stop is lost: its last state is only what it was. */
            bool lost = strcmp(stale, "true") == 0 && strcmp(state, "stopped") != 0;
            char shown_state[48];
            snprintf(shown_state, sizeof(shown_state), lost ? "lost (%s)" : "%s", state);
            fprintf(out, "%-24s %-15s %8s %-6s %-25s %-16s %8s %10s %7s %s\n", id, shown_state,
                    applied, strcmp(stale, "true") == 0 ? "STALE" : "no", seen, host, pid, batches,
                    errors, labels);
            skip_value(&r, 1);
        } while (array_next(&r));
    }
    if (!r.ok) {
        fprintf(err, "agenthost ctl: malformed \"agents\" in the answer\n");
        return 1;
    }
    char count[32], version[32], total[32], current[32], stale[32];
    member_text(body, "count", count, sizeof(count));
    member_text(body, "version", version, sizeof(version));
    json_reader_t s = {.p = body, .ok = true};
    const char *summary = find_member(&s, "summary") && s.ok ? s.p : "{}";
    member_text(summary, "total", total, sizeof(total));
    member_text(summary, "applied_current", current, sizeof(current));
    member_text(summary, "stale", stale, sizeof(stale));
    fprintf(out, "%s listed; fleet: %s agents, %s applied version %s, %s stale\n", count, total,
            current, version, stale);
    return 0;
}

int ah_ctl_fleet_print_leases(const char *body, FILE *out, FILE *err)
{
    json_reader_t r = {.p = body, .ok = true};
    if (!find_member(&r, "leases") || !r.ok) {
        fprintf(err, "agenthost ctl: the answer has no \"leases\"\n");
        return 1;
    }
    fprintf(out, "%-32s %-24s %8s %10s\n", "NAME", "OWNER", "TOKEN", "EXPIRES IN");
    int n = 0;
    if (array_first(&r)) {
        do {
            const char *object = r.p;
            char name[AH_NAME_MAX + 1], owner[AH_NAME_MAX + 1], token[32], expires[32];
            member_text(object, "name", name, sizeof(name));
            member_text(object, "owner", owner, sizeof(owner));
            member_text(object, "token", token, sizeof(token));
            member_text(object, "expires_in", expires, sizeof(expires));
            if (owner[0] == '\0') {
                fprintf(out, "%-32s %-24s %8s %10s\n", name, "(free)", token, "-");
            } else {
                fprintf(out, "%-32s %-24s %8s %9.1fs\n", name, owner, token, strtod(expires, NULL));
            }
            n++;
            skip_value(&r, 1);
        } while (array_next(&r));
    }
    if (!r.ok) {
        fprintf(err, "agenthost ctl: malformed \"leases\" in the answer\n");
        return 1;
    }
    fprintf(out, "%d lease%s\n", n, n == 1 ? "" : "s");
    return 0;
}

/* Prints " name" for each string of the array `key` of object. */
static void print_names(const char *object, const char *key, FILE *err)
{
    json_reader_t p = {.p = object, .ok = true};
    if (find_member(&p, key) && p.ok && array_first(&p)) {
        do {
            char id[AH_NAME_MAX + 1];
            read_string(&p, id, sizeof(id));
            fprintf(err, " %s", id);
        } while (p.ok && array_next(&p));
    }
}

int ah_ctl_fleet_wait_outcome(const char *body, FILE *err)
{
    json_reader_t r = {.p = body, .ok = true};
    if (!find_member(&r, "wait") || !r.ok) {
        fprintf(err, "agenthost ctl: the answer has no \"wait\" (an agent without --wait "
                     "support?)\n");
        return 1;
    }
    const char *wait = r.p;
    char complete[16], waited[32], error[AH_ERRLEN];
    member_text(wait, "complete", complete, sizeof(complete));
    member_text(wait, "waited_s", waited, sizeof(waited));
    member_text(wait, "error", error, sizeof(error));
    if (error[0] != '\0') {
        /* The agent could not read the fleet's records: whatever "complete" says, nobody knows
         * whether the command was applied. */
        fprintf(err, "agenthost ctl: cannot tell whether every agent applied it: %s\n", error);
        return 1;
    }
    bool done = strcmp(complete, "true") == 0;
    if (done) {
        fprintf(err, "agenthost ctl: every live agent applied it (%ss)\n", waited);
    } else {
        fprintf(err, "agenthost ctl: not applied everywhere after %ss; pending:", waited);
        print_names(wait, "pending", err);
        fprintf(err, "\n");
    }
    json_reader_t x = {.p = wait, .ok = true};
    if (find_member(&x, "excluded") && x.ok && array_first(&x)) {
        fprintf(err, "agenthost ctl: not waited for (stale, stopping or stopped):");
        print_names(wait, "excluded", err);
        fprintf(err, "\n");
    }
    return done ? 0 : 1;
}
