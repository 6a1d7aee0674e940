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

/* ---- tables ---------------------------------------------------------------------------- */

#define TABLE_COLS_MAX 10
#define TABLE_CELL_MAX 1024

/* One column of a ctl table: its title, the member of each row object it shows (NULL: computed
 * by the table's adjust function), how many bytes of it are kept (with the NUL) and its width
 * (> 0 right-aligned, < 0 left-aligned, 0: the last column, not padded). */
typedef struct table_col_s {
    const char *title;
    const char *key;
    size_t size;
    int width;
} table_col_t;

typedef char table_row_t[TABLE_COLS_MAX][TABLE_CELL_MAX];

/* A ctl table: the array member of the body it lists, its columns, and an optional function
 * that rewrites the cells read from one row object (computed and derived cells). */
typedef struct table_s {
    const char *key;
    const table_col_t *cols;
    int ncols;
    void (*adjust)(const char *object, table_row_t cells);
} table_t;

/* Prints cell i of a row of t: padded to its column's width, then a space or the line's end. */
static void print_cell(FILE *out, const table_t *t, int i, const char *text)
{
    fprintf(out, i + 1 < t->ncols ? "%*s " : "%*s\n", t->cols[i].width, text);
}

/* Prints the header and one line per element of the array t->key of body on out; *rows counts
 * them. 0, or 1 (message on err) when body has no such array or it is malformed. */
static int print_table(const table_t *t, const char *body, FILE *out, FILE *err, int *rows)
{
    json_reader_t r = {.p = body, .ok = true};
    if (!find_member(&r, t->key) || !r.ok) {
        fprintf(err, "agenthost ctl: the answer has no \"%s\"\n", t->key);
        return 1;
    }
    for (int i = 0; i < t->ncols; i++) {
        print_cell(out, t, i, t->cols[i].title);
    }
    *rows = 0;
    if (array_first(&r)) {
        do {
            table_row_t cells;
            for (int i = 0; i < t->ncols; i++) {
                cells[i][0] = '\0';
                if (t->cols[i].key != NULL) {
                    size_t size =
                        t->cols[i].size < TABLE_CELL_MAX ? t->cols[i].size : TABLE_CELL_MAX;
                    member_text(r.p, t->cols[i].key, cells[i], size);
                }
            }
            if (t->adjust != NULL) {
                t->adjust(r.p, cells);
            }
            for (int i = 0; i < t->ncols; i++) {
                print_cell(out, t, i, cells[i]);
            }
            (*rows)++;
            skip_value(&r, 1);
        } while (array_next(&r));
    }
    if (!r.ok) {
        fprintf(err, "agenthost ctl: malformed \"%s\" in the answer\n", t->key);
        return 1;
    }
    return 0;
}

enum { SCOPE_EXPIRES = 5 };

static void adjust_scope(const char *object, table_row_t cells)
{
    (void)object;
    if (strcmp(cells[SCOPE_EXPIRES], "null") == 0) {
        strcpy(cells[SCOPE_EXPIRES], "-");
    }
}

int ah_ctl_fleet_print_scopes(const char *body, FILE *out, FILE *err)
{
    static const table_col_t cols[] = {
        {"SELECTOR", "selector", 512, -32}, {"COMMAND", "command", 16, -8},
        {"VERSION", "version", 32, 7},      {"MATCHED", "matched", 32, 7},
        {"HOLDS", "holds", 32, 5},          {"EXPIRES", "expires_at", 40, -24},
        {"REASON", "reason", 256, 0},
    };
    static const table_t table = {"scopes", cols, sizeof(cols) / sizeof(cols[0]), adjust_scope};
    int rows;
    if (print_table(&table, body, out, err, &rows) != 0) {
        return 1;
    }
    char count[32], active[32];
    member_text(body, "count", count, sizeof(count));
    member_text(body, "active", active, sizeof(active));
    fprintf(out, "%s scopes, %s holding (pause or shutdown)\n", count, active);
    return 0;
}

enum { AGENT_STATE = 1, AGENT_STALE = 3, AGENT_LABELS = 9 };

static void adjust_agent(const char *object, table_row_t cells)
{
    /* A stale agent that did not stop is lost: its last state is only what it was. */
    bool stale = strcmp(cells[AGENT_STALE], "true") == 0;
    if (stale && strcmp(cells[AGENT_STATE], "stopped") != 0) {
        char state[32];
        ah_strlcpy(state, cells[AGENT_STATE], sizeof(state));
        snprintf(cells[AGENT_STATE], 48, "lost (%s)", state);
    }
    strcpy(cells[AGENT_STALE], stale ? "STALE" : "no");
    member_labels(object, cells[AGENT_LABELS], TABLE_CELL_MAX);
}

int ah_ctl_fleet_print_agents(const char *body, FILE *out, FILE *err)
{
    static const table_col_t cols[] = {
        {"AGENT", "agent_id", AH_NAME_MAX + 1, -24},
        {"STATE", "state", 32, -15},
        {"APPLIED", "applied_version", 32, 8},
        {"STALE", "stale", 16, -6},
        {"LAST SEEN", "last_seen", 40, -25},
        {"HOST", "host", 64, -16},
        {"PID", "pid", 32, 8},
        {"BATCHES", "batches", 32, 10},
        {"ERRORS", "errors", 32, 7},
        {"LABELS", NULL, 0, 0},
    };
    static const table_t table = {"agents", cols, sizeof(cols) / sizeof(cols[0]), adjust_agent};
    int rows;
    if (print_table(&table, body, out, err, &rows) != 0) {
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

enum { LEASE_OWNER = 1, LEASE_EXPIRES = 3 };

static void adjust_lease(const char *object, table_row_t cells)
{
    (void)object;
    if (cells[LEASE_OWNER][0] == '\0') {
        strcpy(cells[LEASE_OWNER], "(free)");
        strcpy(cells[LEASE_EXPIRES], "-");
    } else {
        snprintf(cells[LEASE_EXPIRES], TABLE_CELL_MAX, "%.1fs", strtod(cells[LEASE_EXPIRES], NULL));
    }
}

int ah_ctl_fleet_print_leases(const char *body, FILE *out, FILE *err)
{
    static const table_col_t cols[] = {
        {"NAME", "name", AH_NAME_MAX + 1, -32},
        {"OWNER", "owner", AH_NAME_MAX + 1, -24},
        {"TOKEN", "token", 32, 8},
        {"EXPIRES IN", "expires_in", 32, 10},
    };
    static const table_t table = {"leases", cols, sizeof(cols) / sizeof(cols[0]), adjust_lease};
    int rows;
    if (print_table(&table, body, out, err, &rows) != 0) {
        return 1;
    }
    fprintf(out, "%d lease%s\n", rows, rows == 1 ? "" : "s");
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
