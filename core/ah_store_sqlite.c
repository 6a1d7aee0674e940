/* The embedded control store (docs/OPERATIONS.md): the control document and its audit trail in
 * one SQLite file that every local agent pointing at it shares. A command is one IMMEDIATE
 * transaction that bumps the version and appends the audit row, so versions stay gapless under
 * concurrent writers in several processes. Two connections: the API connection, used by any
 * thread under api_lock and opened by the first call that needs it, and the watcher's own
 * connection, owned by the watcher thread, which polls the cheap `PRAGMA data_version` (it only
 * changes for commits made through *other* connections, which is why the watcher cannot share the
 * API connection). Opening the store only checks the path and opens the file (sqlite_check_open,
 * on the caller's thread: a bad path fails there); the watcher sets up that connection (creating
 * the schema of a new file) and reads, so the agent's start does not wait for the setup. The
 * agents' status records (table agent_status) live in a file of their own next to it,
 * "<path>-agents", on a third connection (the status connection, under status_lock): after a
 * command every agent writes its record at once, and those writes then queue on that file's write
 * lock alone, not on the commands' lock, and do not change the control file, whose watchers would
 * otherwise re-read the control document after every one of them.
 *
 * Error mapping: the file cannot be opened or stays locked past the busy timeout and retries →
 * AH_EUNAVAIL (nothing written); any other SQLite failure → AH_EIO. Messages include
 * sqlite3_errmsg(). */
#define _GNU_SOURCE
#include "ah_store.h"

#include "ah_log.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define AH_SQLITE_STATUS_SUFFIX "-agents" /* the status records' file: the path + this */
#define AH_SQLITE_BUSY_TIMEOUT_MS 5000
#define AH_SQLITE_BUSY_FIRST_MS 1.0         /* busy handler: the first sleep (before jitter) */
#define AH_SQLITE_BUSY_CAP_MS 10.0          /* busy handler: the longest sleep (before jitter) */
#define AH_SQLITE_TXN_ATTEMPTS 4            /* whole-transaction attempts on SQLITE_BUSY */
#define AH_SQLITE_WATCH_BUSY_MS 250         /* watcher: lock wait per (re)connection attempt */
#define AH_SQLITE_BACKOFF_MIN_S 0.2         /* watcher: first retry delay after a failure */
#define AH_SQLITE_BACKOFF_MAX_S 10.0        /* watcher: retry delay cap */
#define AH_SQLITE_STATUS_MIN_GAP_US 1000000 /* watcher: at most one routine status per second */
#define AH_SQLITE_SWEEP_GAP_US 60000000     /* status records: at most one sweep a minute */

typedef struct ah_sqlite_store_s {
    ah_store_t base; /* must stay first */
    char *path;
    double poll_interval;

    pthread_mutex_t api_lock; /* guards api_db and its error message */
    sqlite3 *api_db;

    char *status_path;           /* "<path>-agents": the status records */
    pthread_mutex_t status_lock; /* guards status_db and its error message, last_sweep_us */
    sqlite3 *status_db;          /* NULL until the first status call opens it */
    int64_t last_sweep_us; /* monotonic time of the last sweep of old status records, 0: none */

    pthread_mutex_t watch_lock; /* guards stopping; watch_cond wakes the watcher early */
    pthread_cond_t watch_cond;  /* on CLOCK_MONOTONIC */
    bool stopping;
    bool watching; /* set once by watch_start; the thread is joined by close */
    pthread_t watcher;
    ah_store_listener_t listener;
    sqlite3 *first_db;     /* the connection the open checked the file with, not set up yet: the
                              watcher's first connection (the store's until the watcher takes it) */
    atomic_bool flush_new; /* a connection created the file without fsync: the watcher flushes
                              it after its next read */
    bool told_initial;     /* the watcher delivered the initial document of a file it was setting
                              up (sqlite_setup): watcher thread only */
    ah_store_reporter_t *reporter; /* the watcher's (on its stack): watcher thread only */
    int64_t connect_us;            /* when the watcher's connect began (ah_mono_us) */
} ah_sqlite_store_t;

static const char ah_sqlite_schema[] =
    "CREATE TABLE IF NOT EXISTS control ("
    " id TEXT PRIMARY KEY, command TEXT NOT NULL, version INTEGER NOT NULL,"
    " timestamp_us INTEGER NOT NULL, reason TEXT NOT NULL, updated_by TEXT NOT NULL,"
    " expires_us INTEGER NOT NULL DEFAULT 0, drain_ms INTEGER NOT NULL DEFAULT 0,"
    " selector TEXT NOT NULL DEFAULT '');"
    "CREATE TABLE IF NOT EXISTS audit ("
    " version INTEGER PRIMARY KEY, command TEXT NOT NULL, timestamp_us INTEGER NOT NULL,"
    " reason TEXT NOT NULL, updated_by TEXT NOT NULL, agent_id TEXT NOT NULL,"
    " drain_ms INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE IF NOT EXISTS scope_audit ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT, selector TEXT NOT NULL, version INTEGER NOT NULL,"
    " command TEXT NOT NULL, timestamp_us INTEGER NOT NULL, reason TEXT NOT NULL,"
    " updated_by TEXT NOT NULL, agent_id TEXT NOT NULL, drain_ms INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE IF NOT EXISTS agent_leases ("
    " name TEXT PRIMARY KEY, owner TEXT NOT NULL, token INTEGER NOT NULL,"
    " expires_ms INTEGER NOT NULL);";

/* The schema's version, kept in the file's PRAGMA user_version and written by the setup
 * transaction: a connection to a file that has it skips the setup (the CREATE TABLEs, the column
 * probes, the initial document). A file of a build before it reads 0 and is set up once more,
 * which brings it up to date. A change of the schema or of ah_sqlite_added_columns bumps it. */
#define AH_SQLITE_SCHEMA_VERSION 1

/* The status records' file ("<path>-agents"). A file made by an older build also has an
 * agent_status table in the control file: no longer read or written. */
static const char ah_sqlite_status_schema[] =
    "CREATE TABLE IF NOT EXISTS agent_status ("
    " agent_id TEXT PRIMARY KEY, state TEXT NOT NULL, applied_version INTEGER NOT NULL,"
    " watch_mode TEXT NOT NULL, last_seen_us INTEGER NOT NULL, started_us INTEGER NOT NULL,"
    " host TEXT NOT NULL, pid INTEGER NOT NULL, agenthost_version TEXT NOT NULL,"
    " batches INTEGER NOT NULL, errors INTEGER NOT NULL,"
    " labels TEXT NOT NULL DEFAULT '', scope_acks TEXT NOT NULL DEFAULT '',"
    " leases TEXT NOT NULL DEFAULT '');";

/* The file's clock in ms since the epoch: SQLite evaluates 'now' once per statement, so every
 * use in one statement sees the same instant. */
#define AH_SQLITE_NOW_MS "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"

/* ?1 name, ?2 owner, ?3 our token (0: none), ?4 ttl ms. Free (expired) or ours: take it. */
static const char ah_sqlite_lease_acquire[] =
    "INSERT INTO agent_leases (name, owner, token, expires_ms)"
    " VALUES (?1, ?2, 1, " AH_SQLITE_NOW_MS " + ?4)"
    " ON CONFLICT (name) DO UPDATE SET"
    " token = CASE WHEN owner = ?2 AND token = ?3 THEN token ELSE token + 1 END,"
    " owner = ?2, expires_ms = " AH_SQLITE_NOW_MS " + ?4"
    " WHERE expires_ms <= " AH_SQLITE_NOW_MS " OR (owner = ?2 AND token = ?3)"
    " RETURNING owner, token, expires_ms - " AH_SQLITE_NOW_MS;

static const char ah_sqlite_lease_renew[] =
    "UPDATE agent_leases SET expires_ms = " AH_SQLITE_NOW_MS " + ?4"
    " WHERE name = ?1 AND owner = ?2 AND token = ?3"
    " RETURNING owner, token, expires_ms - " AH_SQLITE_NOW_MS;

static const char ah_sqlite_lease_release[] =
    "UPDATE agent_leases SET owner = '', expires_ms = " AH_SQLITE_NOW_MS
    " WHERE name = ?1 AND owner = ?2 AND token = ?3"
    " RETURNING owner, token, 0";

static const char ah_sqlite_lease_select[] =
    "SELECT owner, token, expires_ms - " AH_SQLITE_NOW_MS " FROM agent_leases WHERE name = ?1";

static const char ah_sqlite_lease_list[] =
    "SELECT name, owner, token, expires_ms - " AH_SQLITE_NOW_MS " FROM agent_leases"
    " ORDER BY name LIMIT ?1";

/* Columns added since the first schema: a file written before them gets them at open. */
static const struct {
    const char *probe;
    const char *add;
} ah_sqlite_added_columns[] = {
    {"SELECT expires_us FROM control LIMIT 0",
     "ALTER TABLE control ADD COLUMN expires_us INTEGER NOT NULL DEFAULT 0"},
    {"SELECT drain_ms FROM control LIMIT 0",
     "ALTER TABLE control ADD COLUMN drain_ms INTEGER NOT NULL DEFAULT 0"},
    {"SELECT drain_ms FROM audit LIMIT 0",
     "ALTER TABLE audit ADD COLUMN drain_ms INTEGER NOT NULL DEFAULT 0"},
    {"SELECT selector FROM control LIMIT 0",
     "ALTER TABLE control ADD COLUMN selector TEXT NOT NULL DEFAULT ''"},
};

static const char ah_sqlite_put_status[] =
    "INSERT OR REPLACE INTO agent_status (agent_id, state, applied_version, watch_mode,"
    " last_seen_us, started_us, host, pid, agenthost_version, batches, errors, labels,"
    " scope_acks, leases) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

static const char ah_sqlite_sweep_status[] = "DELETE FROM agent_status WHERE last_seen_us < ?1";

static const char ah_sqlite_select_status[] =
    "SELECT agent_id, state, applied_version, watch_mode, last_seen_us, started_us, host, pid,"
    " agenthost_version, batches, errors, labels, scope_acks, leases FROM agent_status"
    " ORDER BY agent_id LIMIT ?1";

static const char ah_sqlite_insert_initial[] =
    "INSERT OR IGNORE INTO control (id, command, version, timestamp_us, reason, updated_by)"
    " VALUES ('global_control', 'running', (SELECT IFNULL(MAX(version), 0) FROM audit), ?1,"
    " 'initial state', 'system')";

#define AH_SQLITE_GLOBAL_ID "global_control"

static const char ah_sqlite_select_control[] =
    "SELECT command, version, timestamp_us, reason, updated_by, expires_us, drain_ms FROM control"
    " WHERE id = ?1";

/* A scope document is created at version 0 by its first command, in the same transaction. */
static const char ah_sqlite_insert_scope[] =
    "INSERT OR IGNORE INTO control (id, command, version, timestamp_us, reason, updated_by,"
    " selector) VALUES (?1, 'running', 0, ?2, '', 'system', ?3)";

static const char ah_sqlite_select_scopes[] =
    "SELECT command, version, timestamp_us, reason, updated_by, expires_us, selector, id,"
    " drain_ms FROM control WHERE id LIKE 'scope:%' ORDER BY id";

/* ?6 < 0: unconditional; else only when the version is ?6 (compare-and-set). */
static const char ah_sqlite_update_control[] =
    "UPDATE control SET version = version + 1, command = ?1, timestamp_us = ?2, reason = ?3,"
    " updated_by = ?4, expires_us = ?5, drain_ms = ?7"
    " WHERE id = ?8 AND (?6 < 0 OR version = ?6)"
    " RETURNING version";

static const char ah_sqlite_insert_scope_audit[] =
    "INSERT INTO scope_audit (selector, version, command, timestamp_us, reason, updated_by,"
    " agent_id, drain_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

static const char ah_sqlite_select_scope_history[] =
    "SELECT command, version, timestamp_us, reason, updated_by, agent_id, selector, drain_ms"
    " FROM scope_audit ORDER BY seq DESC LIMIT ?1";

static const char ah_sqlite_insert_audit[] =
    "INSERT INTO audit (version, command, timestamp_us, reason, updated_by, agent_id, drain_ms)"
    " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

static const char ah_sqlite_select_history[] =
    "SELECT command, version, timestamp_us, reason, updated_by, agent_id, drain_ms FROM audit"
    " ORDER BY version DESC LIMIT ?1";

/* True for the "someone else holds the lock" family of result codes. */
static bool sqlite_is_busy(int rc)
{
    return (rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED;
}

/* Writes "embedded store '<path>': <what>: <sqlite message>" into err. */
static void sqlite_error(char *err, size_t errlen, const ah_sqlite_store_t *st, sqlite3 *db,
                         const char *what)
{
    snprintf(err, errlen, "embedded store '%s': %s: %s", st->path, what,
             db != NULL ? sqlite3_errmsg(db) : "out of memory");
}

/* The busy handler of every connection (arg: the lock wait allowed, in ms, as an intptr_t),
 * called by SQLite on the thread that is waiting when another connection holds the lock this one
 * needs; `count` is 0 at the first call of each wait. Returns 1 after sleeping (try again) or 0
 * once the wait is over (the call fails with SQLITE_BUSY).
 *
 * SQLite's own handler (sqlite3_busy_timeout) sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50,
 * then 100 ms between attempts, the same steps for every waiter. After a command every agent of
 * a fleet writes its status record within a fraction of a second; with hundreds of them on one
 * file most waiters are soon in their 100 ms sleeps, in step, while the lock is free: the last
 * of k waiters each polling every 100 ms leave it idle for about 100 ms * (1/k + ... + 1/1), 0.6 s
 * for 300 agents. Here the sleeps double from 1 ms to 10 ms and each is drawn at random between
 * half and one and a half of its step, so waiters spread out and the lock changes hands within
 * about 10 ms / (waiters left); the wait is bounded by the clock, not by a count. A failed
 * attempt costs a few fcntl() calls; at 10 ms per waiter that is 30,000 calls a second for 300
 * waiters, for as long as the queue lasts. */
static int sqlite_busy_wait(void *arg, int count)
{
    static _Thread_local int64_t wait_started_us;
    static _Thread_local unsigned int seed;
    int64_t limit_us = (int64_t)(intptr_t)arg * 1000;
    int64_t now_us = ah_mono_us();

    if (count == 0) {
        wait_started_us = now_us;
        if (seed == 0) {
            seed = (unsigned int)now_us ^ (unsigned int)(uintptr_t)&wait_started_us ^ 1u;
        }
    }
    int64_t left_us = wait_started_us + limit_us - now_us;
    if (left_us <= 0) {
        return 0;
    }
    double step_ms = AH_SQLITE_BUSY_FIRST_MS * (double)(1 << (count < 8 ? count : 8));
    if (step_ms > AH_SQLITE_BUSY_CAP_MS) {
        step_ms = AH_SQLITE_BUSY_CAP_MS;
    }
    double sleep_s = step_ms * ah_jitter(&seed, 0.5, 1.5) / 1000.0;
    if (sleep_s > (double)left_us / 1e6) {
        sleep_s = (double)left_us / 1e6;
    }
    ah_sleep(sleep_s);
    return 1;
}

/* Sets db's lock wait to `ms` through sqlite_busy_wait (0: fail at once). */
static void sqlite_set_busy_wait(sqlite3 *db, int ms)
{
    sqlite3_busy_handler(db, ms > 0 ? sqlite_busy_wait : NULL, (void *)(intptr_t)ms);
}

/* For a call on db that failed with rc: writes err as sqlite_error and returns what the failure
 * maps to, AH_EUNAVAIL when another connection holds the lock, else AH_EIO. */
static int sqlite_failed(const ah_sqlite_store_t *st, sqlite3 *db, int rc, const char *what,
                         char *err, size_t errlen)
{
    sqlite_error(err, errlen, st, db, what);
    return sqlite_is_busy(rc) ? AH_EUNAVAIL : AH_EIO;
}

/* Prepares sql on db into *stmt. 0, or AH_EUNAVAIL/AH_EIO with err set ("<what>: ...") and
 * *stmt NULL. */
static int sqlite_prepare(const ah_sqlite_store_t *st, sqlite3 *db, const char *sql,
                          const char *what, sqlite3_stmt **stmt, char *err, size_t errlen)
{
    if (sqlite3_prepare_v2(db, sql, -1, stmt, NULL) != SQLITE_OK) {
        return sqlite_failed(st, db, sqlite3_errcode(db), what, err, errlen);
    }
    return 0;
}

/* Rolls back whatever transaction db has open; harmless when none is. */
static void sqlite_rollback(sqlite3 *db)
{
    if (!sqlite3_get_autocommit(db)) {
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    }
}

/* True when path names no file or an empty one: a connection would create the database. */
static bool sqlite_file_is_new(const char *path)
{
    struct stat sb;
    return stat(path, &sb) != 0 ? errno == ENOENT : sb.st_size == 0;
}

/* The directory of path into dir[n] ("." for a bare file name). */
static void sqlite_dir_of(const char *path, char *dir, size_t n)
{
    ah_strlcpy(dir, path, n);
    char *slash = strrchr(dir, '/');
    if (slash == NULL) {
        ah_strlcpy(dir, ".", n);
    } else if (slash == dir) {
        dir[1] = '\0';
    } else {
        *slash = '\0';
    }
}

/* The integer the one-row, one-column query sql answers into *out (0 when it answers no row).
 * SQLite's result code. */
static int sqlite_query_int(sqlite3 *db, const char *sql, int *out)
{
    sqlite3_stmt *stmt = NULL;
    int rc = sqlite3_prepare_v2(db, sql, -1, &stmt, NULL);
    if (rc == SQLITE_OK) {
        rc = sqlite3_step(stmt);
        *out = rc == SQLITE_ROW ? sqlite3_column_int(stmt, 0) : 0;
        rc = rc == SQLITE_ROW || rc == SQLITE_DONE ? SQLITE_OK : rc;
    }
    sqlite3_finalize(stmt);
    return rc;
}

/* The watcher's delivery of the initial document of a file that has no schema yet, once: the
 * cluster state of a file without a control document is that document's ("running", version 0),
 * and while the caller holds the file's write lock, no command can be written before it. */
static void sqlite_tell_initial(ah_sqlite_store_t *st)
{
    const ah_store_listener_t *listener = &st->listener;
    if (st->told_initial || listener->on_control == NULL || st->reporter == NULL) {
        return;
    }
    st->told_initial = true;
    /* connected, as after a read, which took until now */
    if (ah_store_note_connected(st->reporter, (double)(ah_mono_us() - st->connect_us) / 1000.0)) {
        ah_store_report(st->reporter, true);
    }
    if (listener->on_scopes != NULL) {
        listener->on_scopes(listener->ud, NULL, 0);
    }
    ah_control_t doc;
    memset(&doc, 0, sizeof(doc));
    doc.command = AH_CMD_RUNNING;
    doc.timestamp_us = ah_now_us();
    ah_strlcpy(doc.reason, "initial state", sizeof(doc.reason));
    ah_strlcpy(doc.updated_by, "system", sizeof(doc.updated_by));
    listener->on_control(listener->ud, &doc);
}

/* Inside the caller's write transaction: the schema, the columns added since the first schema
 * (probed only in a file that had tables), the initial document and the schema version. A file
 * without tables is new: the watcher (tell_initial) delivers its initial document before the
 * schema is written, so that the agent's start does not wait for the setup's statements (about
 * 1 M instructions of SQLite's parser). SQLite's result code; the caller rolls back on failure. */
static int sqlite_setup(ah_sqlite_store_t *st, sqlite3 *db, bool tell_initial)
{
    sqlite3_stmt *stmt = NULL;
    int had_tables = 0;
    int rc = sqlite_query_int(db, "SELECT count(*) FROM sqlite_master", &had_tables);
    if (rc == SQLITE_OK && had_tables == 0 && tell_initial) {
        sqlite_tell_initial(st);
    }
    if (rc == SQLITE_OK) {
        rc = sqlite3_exec(db, ah_sqlite_schema, NULL, NULL, NULL);
    }
    for (size_t i = 0; rc == SQLITE_OK && had_tables > 0 &&
                       i < sizeof(ah_sqlite_added_columns) / sizeof(ah_sqlite_added_columns[0]);
         i++) {
        if (sqlite3_prepare_v2(db, ah_sqlite_added_columns[i].probe, -1, &stmt, NULL) !=
            SQLITE_OK) {
            rc = sqlite3_exec(db, ah_sqlite_added_columns[i].add, NULL, NULL, NULL);
        }
        sqlite3_finalize(stmt);
        stmt = NULL;
    }
    if (rc == SQLITE_OK) {
        rc = sqlite3_prepare_v2(db, ah_sqlite_insert_initial, -1, &stmt, NULL);
    }
    if (rc == SQLITE_OK) {
        sqlite3_bind_int64(stmt, 1, ah_now_us());
        rc = sqlite3_step(stmt) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(db);
    }
    sqlite3_finalize(stmt);
    if (rc == SQLITE_OK) {
        char sql[64];
        snprintf(sql, sizeof(sql), "PRAGMA user_version = %d", AH_SQLITE_SCHEMA_VERSION);
        rc = sqlite3_exec(db, sql, NULL, NULL, NULL);
    }
    return rc;
}

/* Opens a connection to st->path with the store's pragmas (opened: a connection to it that is
 * open but not set up yet, taken over: closed on failure; NULL: one is opened here), waiting up to
 * busy_ms for another connection's lock, `attempts` times, and creates the file, the schema and
 * the initial document unless the file has them (its schema version). write_lock: the file's
 * write lock is taken even when there is nothing to set up (the watcher: an agent that starts
 * while another process holds it waits, not ready, as on an unreachable store); else a file at
 * the schema version is only read (the API connection, opened by a call: a read does not wait
 * for another process's write). The watcher's setup of a file without tables delivers its initial
 * document as soon as it holds the lock (sqlite_tell_initial). Returns 0 and *out, or
 * AH_EUNAVAIL/AH_EIO with err set (*out NULL).
 *
 * A file that does not exist yet (or is empty) is created and set up without fsync (synchronous =
 * OFF until the setup is committed; its content is what any start writes into a new file), and
 * st->flush_new is set: the watcher flushes it after its next read, off the start-up path
 * (sqlite_flush_new). Any thread; the connection is the caller's. */
static int sqlite_connect(ah_sqlite_store_t *st, sqlite3 *opened, bool write_lock, int busy_ms,
                          int attempts, sqlite3 **out, char *err, size_t errlen)
{
    sqlite3 *db = opened;
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_CREATE;
    int ret = AH_EIO;
    int rc;
    bool unsynced = sqlite_file_is_new(st->path);

    *out = NULL;
    if (db == NULL && (rc = sqlite3_open_v2(st->path, &db, flags, NULL)) != SQLITE_OK) {
        sqlite_error(err, errlen, st, db, "cannot open");
        ret = AH_EUNAVAIL;
        goto cleanup;
    }
    sqlite_set_busy_wait(db, busy_ms);

    /* Several agents may open a fresh file at once: the journal-mode switch and the schema can
     * meet a lock that the busy handler does not wait for, so the setup is retried. */
    for (int attempt = 1;; attempt++) {
        int version = 0;
        rc = sqlite3_exec(db,
                          unsynced ? "PRAGMA synchronous = OFF; PRAGMA journal_mode = WAL;"
                                     " PRAGMA foreign_keys = OFF;"
                                   : "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;"
                                     " PRAGMA foreign_keys = OFF;",
                          NULL, NULL, NULL);
        if (rc == SQLITE_OK && !write_lock && !unsynced) {
            rc = sqlite_query_int(db, "PRAGMA user_version", &version);
            if (rc == SQLITE_OK && version >= AH_SQLITE_SCHEMA_VERSION) {
                break; /* set up: nothing to write */
            }
        }
        if (rc == SQLITE_OK) {
            rc = sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
        }
        if (rc == SQLITE_OK) {
            rc = sqlite_query_int(db, "PRAGMA user_version", &version);
        }
        if (rc == SQLITE_OK && version < AH_SQLITE_SCHEMA_VERSION) {
            rc = sqlite_setup(st, db, write_lock);
        }
        if (rc == SQLITE_OK) {
            rc = sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
        }
        if (rc == SQLITE_OK && unsynced) {
            rc = sqlite3_exec(db, "PRAGMA synchronous = NORMAL", NULL, NULL, NULL);
        }
        if (rc == SQLITE_OK) {
            break;
        }
        rc = sqlite3_extended_errcode(db);
        sqlite_error(err, errlen, st, db, "cannot set up");
        sqlite_rollback(db);
        if (!sqlite_is_busy(rc) || attempt >= attempts) {
            ret =
                sqlite_is_busy(rc) || (rc & 0xff) == SQLITE_CANTOPEN || (rc & 0xff) == SQLITE_NOTADB
                    ? AH_EUNAVAIL
                    : AH_EIO;
            goto cleanup;
        }
        ah_sleep(0.05 * attempt);
    }

    if (unsynced) {
        atomic_store(&st->flush_new, true);
    }
    *out = db;
    db = NULL;
    ret = 0;
cleanup:
    sqlite3_close_v2(db); /* NULL is a no-op */
    return ret;
}

/* The part of opening the store that runs on the caller's thread (before any connection of this
 * store exists): what makes the path unusable whatever other processes do, so that a bad
 * AGENTHOST_STATE fails at start instead of leaving the watcher retrying for ever. It opens a
 * connection to the file (creating it, empty, when missing: the directory must exist and take
 * new files), which must be writable, and whose first bytes, when it has any, must be SQLite's
 * header; its directory must be writable (the WAL, its index and the status records' file are
 * created there). No pragma, no lock, no setup: that connection becomes the watcher's first, set
 * up on its thread. The header is read through SQLite's own descriptor, never one of ours
 * (see sync_dir). 0 and *out, or AH_EUNAVAIL with err set. */
static int sqlite_check_open(const ah_sqlite_store_t *st, sqlite3 **out, char *err, size_t errlen)
{
    static const char header[16] = "SQLite format 3"; /* and its NUL */
    sqlite3 *db = NULL;
    sqlite3_file *file = NULL;
    sqlite3_int64 size = 0;
    char first[sizeof(header)];
    char dir[PATH_MAX];
    int ret = AH_EUNAVAIL;

    *out = NULL;
    sqlite_dir_of(st->path, dir, sizeof(dir));
    int rc = sqlite3_open_v2(
        st->path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_CREATE, NULL);
    if (rc != SQLITE_OK) {
        /* SQLite's errno is that of its last attempt (a read-only open): the directory's tells
         * more when the file could not be created */
        struct stat sb;
        int sys = db != NULL ? sqlite3_system_errno(db) : 0;
        if (stat(dir, &sb) != 0) {
            snprintf(err, errlen, "embedded store '%s': cannot open: directory '%s': %s", st->path,
                     dir, strerror(errno));
        } else if (!S_ISDIR(sb.st_mode)) {
            snprintf(err, errlen, "embedded store '%s': cannot open: '%s' is not a directory",
                     st->path, dir);
        } else if (access(dir, W_OK | X_OK) != 0) {
            snprintf(err, errlen,
                     "embedded store '%s': cannot open: no file can be created in its directory "
                     "'%s' (%s)",
                     st->path, dir, strerror(errno));
        } else {
            snprintf(err, errlen, "embedded store '%s': cannot open: %s%s%s%s", st->path,
                     db != NULL ? sqlite3_errmsg(db) : "out of memory", sys != 0 ? " (" : "",
                     sys != 0 ? strerror(sys) : "", sys != 0 ? ")" : "");
        }
        goto cleanup;
    }
    if (sqlite3_db_readonly(db, "main") == 1) {
        snprintf(err, errlen, "embedded store '%s': cannot open: the file is not writable",
                 st->path);
        goto cleanup;
    }
    if (access(dir, W_OK | X_OK) != 0) {
        snprintf(err, errlen,
                 "embedded store '%s': cannot open: no file can be created in its directory "
                 "'%s' (%s)",
                 st->path, dir, strerror(errno));
        goto cleanup;
    }
    if (sqlite3_file_control(db, "main", SQLITE_FCNTL_FILE_POINTER, &file) != SQLITE_OK ||
        file == NULL || file->pMethods == NULL ||
        file->pMethods->xFileSize(file, &size) != SQLITE_OK) {
        sqlite_error(err, errlen, st, db, "cannot open");
        goto cleanup;
    }
    if (size > 0) {
        memset(first, 0, sizeof(first));
        rc = file->pMethods->xRead(file, first, (int)sizeof(first), 0);
        if ((rc != SQLITE_OK && rc != SQLITE_IOERR_SHORT_READ) ||
            memcmp(first, header, sizeof(header)) != 0) {
            snprintf(err, errlen, "embedded store '%s': cannot open: file is not a database",
                     st->path);
            goto cleanup;
        }
    }
    *out = db;
    db = NULL;
    ret = 0;
cleanup:
    sqlite3_close_v2(db);
    return ret;
}

/* Opens a connection to the status records' file (st->status_path), creating it and its table
 * when missing, waiting up to busy_ms for another connection's lock, `attempts` times. 0 and
 * *out, or AH_EUNAVAIL/AH_EIO with err set (*out NULL). */
static int sqlite_connect_status(const ah_sqlite_store_t *st, int busy_ms, int attempts,
                                 sqlite3 **out, char *err, size_t errlen)
{
    sqlite3 *db = NULL;
    int ret = AH_EIO;
    int rc =
        sqlite3_open_v2(st->status_path, &db,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_CREATE, NULL);

    *out = NULL;
    if (rc != SQLITE_OK) {
        sqlite_error(err, errlen, st, db, "cannot open the status records' file");
        ret = AH_EUNAVAIL;
        goto cleanup;
    }
    sqlite_set_busy_wait(db, busy_ms);
    /* The setup is not synced (a new file's journal-mode switch and table would cost several
     * fsyncs): the records are rewritten by every heartbeat, and the file by the first write
     * after a crash that left it empty. Later writes are synced as the control file's. */
    for (int attempt = 1;; attempt++) {
        rc = sqlite3_exec(db,
                          "PRAGMA synchronous = OFF; PRAGMA journal_mode = WAL;"
                          " PRAGMA foreign_keys = OFF;",
                          NULL, NULL, NULL);
        if (rc == SQLITE_OK) {
            rc = sqlite3_exec(db, ah_sqlite_status_schema, NULL, NULL, NULL);
        }
        if (rc == SQLITE_OK) {
            rc = sqlite3_exec(db, "PRAGMA synchronous = NORMAL", NULL, NULL, NULL);
        }
        if (rc == SQLITE_OK) {
            break;
        }
        rc = sqlite3_extended_errcode(db);
        ret = sqlite_failed(st, db, rc, "cannot set up the status records' file", err, errlen);
        if (!sqlite_is_busy(rc) || attempt >= attempts) {
            goto cleanup;
        }
        ah_sleep(0.05 * attempt);
    }
    *out = db;
    db = NULL;
    ret = 0;
cleanup:
    sqlite3_close_v2(db); /* NULL is a no-op */
    return ret;
}

/* fsync of a directory (the entries of files just created in it). Never used on a database
 * file: closing any descriptor of a file drops every POSIX lock this process holds on it, and
 * with the locks of its connections gone, another process's last close would checkpoint and
 * delete the WAL this process still writes to (its commits would then reach no other process). */
static bool sync_dir(const char *path, const char **why)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        *why = strerror(errno);
        return false;
    }
    int rc = fsync(fd);
    if (rc != 0) {
        *why = strerror(errno);
    }
    close(fd);
    return rc == 0;
}

/* Syncs the file behind a connection's descriptor (op: SQLITE_FCNTL_FILE_POINTER for the
 * database, SQLITE_FCNTL_JOURNAL_POINTER for its WAL), through SQLite's own descriptor. True when
 * synced, or when the connection has no such file open. */
static bool sync_connection_file(sqlite3 *db, int op, const char **why)
{
    sqlite3_file *file = NULL;
    int rc = sqlite3_file_control(db, "main", op, &file);
    if (rc == SQLITE_OK && file != NULL && file->pMethods != NULL) {
        rc = file->pMethods->xSync(file, SQLITE_SYNC_NORMAL);
    }
    if (rc != SQLITE_OK) {
        *why = sqlite3_errstr(rc); /* SQLite's I/O error, not errno: its call may not set it */
    }
    return rc == SQLITE_OK;
}

/* Makes a file that sqlite_connect created without fsync as durable as a synced setup would have
 * left it: the database file and its WAL (through db, the watcher's connection, so that no
 * descriptor of them is opened and closed beside SQLite's: see sync_dir) and their directory
 * are synced (what SQLite syncs when it creates a file, at once instead of in six steps). A
 * failure is logged: the next checkpoint syncs anyway. */
static void sqlite_flush_new(const ah_sqlite_store_t *st, sqlite3 *db)
{
    char dir[PATH_MAX];
    sqlite_dir_of(st->path, dir, sizeof(dir));
    const char *why = "";
    const char *failed = !sync_connection_file(db, SQLITE_FCNTL_FILE_POINTER, &why) ? "the file"
                         : !sync_connection_file(db, SQLITE_FCNTL_JOURNAL_POINTER, &why) ? "its WAL"
                         : !sync_dir(dir, &why)                                          ? dir
                                                                                         : NULL;
    if (failed != NULL) {
        ah_log_warn("embedded store '%s': the new file could not be flushed to disk yet (%s: %s)",
                    st->path, failed, why);
    }
}

/* Fills *out from the row a statement is positioned on: command, version, timestamp_us, reason,
 * updated_by[, agent_id]. A command this build does not know becomes AH_CMD_NONE. */
static void control_from_row(sqlite3_stmt *stmt, bool with_agent, ah_control_t *out)
{
    memset(out, 0, sizeof(*out));
    if (ah_command_parse((const char *)sqlite3_column_text(stmt, 0), &out->command) != 0) {
        out->command = AH_CMD_NONE;
    }
    out->version = sqlite3_column_int64(stmt, 1);
    out->timestamp_us = sqlite3_column_int64(stmt, 2);
    ah_strlcpy(out->reason, (const char *)sqlite3_column_text(stmt, 3), sizeof(out->reason));
    ah_strlcpy(out->updated_by, (const char *)sqlite3_column_text(stmt, 4),
               sizeof(out->updated_by));
    if (with_agent) {
        ah_strlcpy(out->agent_id, (const char *)sqlite3_column_text(stmt, 5),
                   sizeof(out->agent_id));
    }
}

/* Reads the control row through db (caller owns db). 0, or AH_EUNAVAIL (locked) / AH_EIO with
 * err set; AH_EIO also when the row holds an unknown command or is missing (then *missing is
 * set, if missing is not NULL). */
static int control_select_id(const ah_sqlite_store_t *st, sqlite3 *db, const char *id,
                             ah_control_t *out, bool *missing, char *err, size_t errlen)
{
    sqlite3_stmt *stmt = NULL;
    int ret = AH_EIO;
    int rc;

    if (missing != NULL) {
        *missing = false;
    }
    if ((ret = sqlite_prepare(st, db, ah_sqlite_select_control, "read failed", &stmt, err,
                              errlen)) != 0) {
        goto cleanup;
    }
    ret = AH_EIO;
    sqlite3_bind_text(stmt, 1, id, -1, SQLITE_STATIC);
    rc = sqlite3_step(stmt);
    if (rc == SQLITE_DONE) {
        snprintf(err, errlen, "embedded store '%s': read failed: control document is missing",
                 st->path);
        if (missing != NULL) {
            *missing = true;
        }
        goto cleanup;
    }
    if (rc != SQLITE_ROW) {
        ret = sqlite_failed(st, db, rc, "read failed", err, errlen);
        goto cleanup;
    }
    control_from_row(stmt, false, out);
    out->expires_us = sqlite3_column_int64(stmt, 5);
    out->drain_ms = sqlite3_column_int64(stmt, 6);
    if (out->command == AH_CMD_NONE) {
        snprintf(err, errlen, "embedded store '%s': read failed: unknown command '%s'", st->path,
                 (const char *)sqlite3_column_text(stmt, 0));
        goto cleanup;
    }
    ret = 0;
cleanup:
    sqlite3_finalize(stmt);
    return ret;
}

static int control_select(const ah_sqlite_store_t *st, sqlite3 *db, ah_control_t *out,
                          bool *missing, char *err, size_t errlen)
{
    return control_select_id(st, db, AH_SQLITE_GLOBAL_ID, out, missing, err, errlen);
}

/* Reads every scope document through db into a new array *out (free() it), sorted by selector,
 * at most AH_SCOPES_MAX; malformed ones are left out with one warning each (warned). 0, or
 * AH_EUNAVAIL/AH_EIO/AH_ENOMEM with err set. */
static int scopes_select(const ah_sqlite_store_t *st, sqlite3 *db, ah_control_t **out, int *count,
                         ah_store_warned_t *warned, char *err, size_t errlen)
{
    sqlite3_stmt *stmt = NULL;
    ah_control_t *docs = NULL;
    int n = 0, rc;
    int ret = AH_EIO;

    *out = NULL;
    *count = 0;
    if ((ret = sqlite_prepare(st, db, ah_sqlite_select_scopes, "scope read failed", &stmt, err,
                              errlen)) != 0) {
        goto cleanup;
    }
    while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
        if (docs == NULL && (docs = calloc(AH_SCOPES_MAX, sizeof(*docs))) == NULL) {
            snprintf(err, errlen, "embedded store '%s': scope read: out of memory", st->path);
            ret = AH_ENOMEM;
            goto cleanup;
        }
        const char *id = (const char *)sqlite3_column_text(stmt, 7);
        if (n >= AH_SCOPES_MAX) {
            if (ah_store_warn_first(warned, "too many scopes", 0)) {
                ah_log_warn("More than %d scope documents: '%s' and later ones are ignored",
                            AH_SCOPES_MAX, id);
            }
            break;
        }
        char why[AH_ERRLEN];
        control_from_row(stmt, false, &docs[n]);
        docs[n].expires_us = sqlite3_column_int64(stmt, 5);
        docs[n].drain_ms = sqlite3_column_int64(stmt, 8);
        if (ah_store_scope_check(id, (const char *)sqlite3_column_text(stmt, 6), &docs[n], why,
                                 sizeof(why)) != AH_OK) {
            if (ah_store_warn_first(warned, id, docs[n].version)) {
                ah_log_warn("Ignoring the malformed scope document '%s' (version %lld): %s", id,
                            (long long)docs[n].version, why);
            }
            continue;
        }
        n++;
    }
    /* A read that failed part way (the file locked or unreadable) must not pass for the whole
     * set: a scope left out would release the agents it holds. */
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        ret = sqlite_failed(st, db, rc, "scope read failed", err, errlen);
        goto cleanup;
    }
    *out = docs;
    *count = n;
    docs = NULL;
    ret = 0;
cleanup:
    sqlite3_finalize(stmt);
    free(docs);
    return ret;
}

/* One attempt at the command transaction on the API connection (api_lock held): fills
 * doc->version. Returns SQLITE_OK, or the extended result code of the failure with err set and
 * the transaction rolled back. With if_version >= 0 and another current version: returns
 * SQLITE_OK with *conflict set and *current read inside the same transaction (nothing
 * written). */
static int command_txn(const ah_sqlite_store_t *st, sqlite3 *db, ah_control_t *doc,
                       int64_t if_version, bool *conflict, ah_control_t *current, char *err,
                       size_t errlen)
{
    sqlite3_stmt *stmt = NULL;
    const char *name = ah_command_name(doc->command);
    bool scope = doc->selector[0] != '\0';
    char id[sizeof(AH_SQLITE_GLOBAL_ID) + AH_SELECTOR_MAX + 1];
    int rc;

    snprintf(id, sizeof(id), "%s%s", scope ? AH_STORE_SCOPE_PREFIX : AH_SQLITE_GLOBAL_ID,
             doc->selector);
    rc = sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        goto cleanup;
    }
    /* Someone may have deleted the row since the store was opened: it is then re-created at the
     * last audited version, so versions keep increasing and the audit keeps no duplicates. A
     * scope's row is created at version 0 by its first command. */
    rc = sqlite3_prepare_v2(db, scope ? ah_sqlite_insert_scope : ah_sqlite_insert_initial, -1,
                            &stmt, NULL);
    if (rc != SQLITE_OK) {
        goto cleanup;
    }
    if (scope) {
        sqlite3_bind_text(stmt, 1, id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(stmt, 2, doc->timestamp_us);
        sqlite3_bind_text(stmt, 3, doc->selector, -1, SQLITE_STATIC);
    } else {
        sqlite3_bind_int64(stmt, 1, doc->timestamp_us);
    }
    rc = sqlite3_step(stmt);
    if (rc != SQLITE_DONE) {
        goto cleanup;
    }
    sqlite3_finalize(stmt);
    stmt = NULL;

    rc = sqlite3_prepare_v2(db, ah_sqlite_update_control, -1, &stmt, NULL);
    if (rc != SQLITE_OK) {
        goto cleanup;
    }
    sqlite3_bind_text(stmt, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_int64(stmt, 2, doc->timestamp_us);
    sqlite3_bind_text(stmt, 3, doc->reason, -1, SQLITE_STATIC);
    sqlite3_bind_text(stmt, 4, doc->updated_by, -1, SQLITE_STATIC);
    sqlite3_bind_int64(stmt, 5, doc->expires_us);
    sqlite3_bind_int64(stmt, 6, if_version);
    sqlite3_bind_int64(stmt, 7, doc->drain_ms);
    sqlite3_bind_text(stmt, 8, id, -1, SQLITE_STATIC);
    rc = sqlite3_step(stmt);
    if (rc == SQLITE_DONE && if_version >= 0) {
        sqlite3_finalize(stmt);
        stmt = NULL;
        *conflict = true;
        rc = control_select_id(st, db, id, current, NULL, err, errlen) == 0 ? SQLITE_OK
                                                                            : SQLITE_ERROR;
        ah_strlcpy(current->selector, doc->selector, sizeof(current->selector));
        sqlite_rollback(db);
        goto cleanup;
    }
    if (rc != SQLITE_ROW) {
        goto cleanup;
    }
    doc->version = sqlite3_column_int64(stmt, 0);
    rc = sqlite3_step(stmt); /* a RETURNING statement must finish before COMMIT */
    if (rc != SQLITE_DONE) {
        goto cleanup;
    }
    sqlite3_finalize(stmt);
    stmt = NULL;

    rc = sqlite3_prepare_v2(db, scope ? ah_sqlite_insert_scope_audit : ah_sqlite_insert_audit, -1,
                            &stmt, NULL);
    if (rc != SQLITE_OK) {
        goto cleanup;
    }
    int col = 1;
    if (scope) {
        sqlite3_bind_text(stmt, col++, doc->selector, -1, SQLITE_STATIC);
    }
    sqlite3_bind_int64(stmt, col++, doc->version);
    sqlite3_bind_text(stmt, col++, name, -1, SQLITE_STATIC);
    sqlite3_bind_int64(stmt, col++, doc->timestamp_us);
    sqlite3_bind_text(stmt, col++, doc->reason, -1, SQLITE_STATIC);
    sqlite3_bind_text(stmt, col++, doc->updated_by, -1, SQLITE_STATIC);
    sqlite3_bind_text(stmt, col, doc->agent_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(stmt, col + 1, doc->drain_ms);
    rc = sqlite3_step(stmt);
    if (rc != SQLITE_DONE) {
        goto cleanup;
    }
    sqlite3_finalize(stmt);
    stmt = NULL;

    rc = sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
cleanup:
    if (rc != SQLITE_OK) {
        if (rc == SQLITE_ROW) {
            snprintf(err, errlen, "embedded store '%s': command failed: unexpected row", st->path);
        } else if (rc == SQLITE_DONE) { /* the UPDATE matched nothing inside our own txn */
            snprintf(err, errlen, "embedded store '%s': command failed: control document vanished",
                     st->path);
            rc = SQLITE_CORRUPT;
        } else {
            rc = sqlite3_extended_errcode(db);
            sqlite_error(err, errlen, st, db, "command failed");
        }
    }
    sqlite3_finalize(stmt);
    if (rc != SQLITE_OK) {
        sqlite_rollback(db);
    }
    return rc;
}

/* The API connection (api_lock held): opened by the first call that needs it. 0, or
 * AH_EUNAVAIL/AH_EIO with err set. */
static int api_connect_locked(ah_sqlite_store_t *st, char *err, size_t errlen)
{
    if (st->api_db != NULL) {
        return 0;
    }
    return sqlite_connect(st, NULL, false, AH_SQLITE_BUSY_TIMEOUT_MS, AH_SQLITE_TXN_ATTEMPTS,
                          &st->api_db, err, errlen);
}

/* The status connection (status_lock held): opened by the first status call. 0, or
 * AH_EUNAVAIL/AH_EIO with err set. */
static int status_connect_locked(ah_sqlite_store_t *st, char *err, size_t errlen)
{
    if (st->status_db != NULL) {
        return 0;
    }
    return sqlite_connect_status(st, AH_SQLITE_BUSY_TIMEOUT_MS, AH_SQLITE_TXN_ATTEMPTS,
                                 &st->status_db, err, errlen);
}

/* For one call through the API connection (status: the status connection), with its lock
 * held (api_lock / status_lock): opens the connection if needed and prepares sql on it. 0, or
 * AH_EUNAVAIL/AH_EIO with err set ("<what>: ...") and *stmt NULL. */
static int api_prepare_locked(ah_sqlite_store_t *st, bool status, const char *sql, const char *what,
                              sqlite3_stmt **stmt, char *err, size_t errlen)
{
    int ret = status ? status_connect_locked(st, err, errlen) : api_connect_locked(st, err, errlen);
    if (ret != 0) {
        return ret;
    }
    return sqlite_prepare(st, status ? st->status_db : st->api_db, sql, what, stmt, err, errlen);
}

static int sqlite_read(ah_store_t *base, ah_control_t *out, char *err, size_t errlen)
{
    ah_sqlite_store_t *st = (ah_sqlite_store_t *)base;
    sqlite3_stmt *stmt = NULL;
    bool missing = false;
    int ret;

    pthread_mutex_lock(&st->api_lock);
    ret = api_connect_locked(st, err, errlen);
    if (ret != 0) {
        goto cleanup;
    }
    ret = control_select(st, st->api_db, out, &missing, err, errlen);
    if (ret != 0 && missing) {
        /* Deleted behind our back: re-created like at open, at the last audited version. */
        const char *what = "cannot re-create control document";
        if ((ret = sqlite_prepare(st, st->api_db, ah_sqlite_insert_initial, what, &stmt, err,
                                  errlen)) != 0) {
            goto cleanup;
        }
        sqlite3_bind_int64(stmt, 1, ah_now_us());
        if (sqlite3_step(stmt) != SQLITE_DONE) {
            ret = sqlite_failed(st, st->api_db, sqlite3_errcode(st->api_db), what, err, errlen);
            goto cleanup;
        }
        ret = control_select(st, st->api_db, out, NULL, err, errlen);
    }
cleanup:
    sqlite3_finalize(stmt);
    pthread_mutex_unlock(&st->api_lock);
    return ret;
}

static int sqlite_command(ah_store_t *base, const ah_command_req_t *req, ah_control_t *out,
                          char *err, size_t errlen)
{
    ah_sqlite_store_t *st = (ah_sqlite_store_t *)base;
    ah_control_t doc;
    ah_control_t current;
    bool conflict = false;
    int rc = SQLITE_OK;
    int ret = 0;

    memset(&doc, 0, sizeof(doc));
    doc.command = req->command;
    ah_strlcpy(doc.reason, req->reason, sizeof(doc.reason));
    ah_strlcpy(doc.updated_by, req->updated_by, sizeof(doc.updated_by));
    ah_strlcpy(doc.agent_id, req->agent_id, sizeof(doc.agent_id));
    doc.expires_us = req->expires_us;
    ah_strlcpy(doc.selector, req->selector, sizeof(doc.selector));
    doc.drain_ms = req->drain_ms;

    pthread_mutex_lock(&st->api_lock);
    ret = api_connect_locked(st, err, errlen);
    for (int attempt = 1; ret == 0 && attempt <= AH_SQLITE_TXN_ATTEMPTS; attempt++) {
        doc.timestamp_us = ah_now_us();
        rc = command_txn(st, st->api_db, &doc, req->if_version, &conflict, &current, err, errlen);
        if (rc == SQLITE_OK || !sqlite_is_busy(rc)) {
            break;
        }
        ah_sleep(0.02 * attempt);
    }
    if (ret == 0 && rc != SQLITE_OK) {
        ret = sqlite_is_busy(rc) ? AH_EUNAVAIL : AH_EIO;
    } else if (conflict) {
        snprintf(err, errlen, "version conflict: expected %lld, current is %lld",
                 (long long)req->if_version, (long long)current.version);
        ret = AH_ECONFLICT;
    }
    pthread_mutex_unlock(&st->api_lock);
    if (ret == 0) {
        *out = doc;
    } else if (ret == AH_ECONFLICT) {
        *out = current;
    }
    return ret;
}

static int sqlite_history(ah_store_t *base, int limit, ah_control_t *out, int *count, char *err,
                          size_t errlen)
{
    ah_sqlite_store_t *st = (ah_sqlite_store_t *)base;
    sqlite3_stmt *stmt = NULL;
    ah_control_t *scopes = NULL;
    int ret = AH_EIO;
    int n = 0;
    int rc = SQLITE_DONE;

    *count = 0;
    pthread_mutex_lock(&st->api_lock);
    if ((ret = api_prepare_locked(st, false, ah_sqlite_select_history, "history failed", &stmt, err,
                                  errlen)) != 0) {
        goto cleanup;
    }
    sqlite3_bind_int(stmt, 1, limit);
    while (n < limit && (rc = sqlite3_step(stmt)) == SQLITE_ROW) {
        control_from_row(stmt, true, &out[n]);
        out[n].drain_ms = sqlite3_column_int64(stmt, 6);
        n++;
    }
    if (n < limit && rc != SQLITE_DONE) {
        ret = sqlite_failed(st, st->api_db, rc, "history failed", err, errlen);
        goto cleanup;
    }
    sqlite3_finalize(stmt);
    stmt = NULL;
    /* the scope entries, merged in by timestamp */
    if ((ret = sqlite_prepare(st, st->api_db, ah_sqlite_select_scope_history, "history failed",
                              &stmt, err, errlen)) != 0) {
        goto cleanup;
    }
    sqlite3_bind_int(stmt, 1, limit);
    int ns = 0;
    while (ns < limit && (rc = sqlite3_step(stmt)) == SQLITE_ROW) {
        if (scopes == NULL && (scopes = calloc((size_t)limit, sizeof(*scopes))) == NULL) {
            snprintf(err, errlen, "embedded store '%s': history: out of memory", st->path);
            ret = AH_ENOMEM;
            goto cleanup;
        }
        control_from_row(stmt, true, &scopes[ns]);
        ah_strlcpy(scopes[ns].selector, (const char *)sqlite3_column_text(stmt, 6),
                   sizeof(scopes[ns].selector));
        scopes[ns].drain_ms = sqlite3_column_int64(stmt, 7);
        ns++;
    }
    if (ns < limit && rc != SQLITE_DONE) {
        ret = sqlite_failed(st, st->api_db, rc, "history failed", err, errlen);
        goto cleanup;
    }
    if (ah_store_history_merge(out, &n, scopes, ns, limit) != AH_OK) {
        snprintf(err, errlen, "embedded store '%s': history: out of memory", st->path);
        ret = AH_ENOMEM;
        goto cleanup;
    }
    *count = n;
    ret = 0;
cleanup:
    sqlite3_finalize(stmt);
    pthread_mutex_unlock(&st->api_lock);
    free(scopes);
    return ret;
}

/* One attempt at writing a status record (and, when due, sweeping old ones) on the API
 * connection (api_lock held). Returns SQLITE_OK or the failing result code. */
static int put_status_once(sqlite3 *db, const ah_agent_status_t *rec, int64_t sweep_before_us)
{
    sqlite3_stmt *stmt = NULL;
    int rc = sqlite3_prepare_v2(db, ah_sqlite_put_status, -1, &stmt, NULL);
    if (rc != SQLITE_OK) {
        goto cleanup;
    }
    sqlite3_bind_text(stmt, 1, rec->agent_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(stmt, 2, rec->state, -1, SQLITE_STATIC);
    sqlite3_bind_int64(stmt, 3, rec->applied_version);
    sqlite3_bind_text(stmt, 4, rec->watch_mode, -1, SQLITE_STATIC);
    sqlite3_bind_int64(stmt, 5, rec->last_seen_us);
    sqlite3_bind_int64(stmt, 6, rec->started_us);
    sqlite3_bind_text(stmt, 7, rec->host, -1, SQLITE_STATIC);
    sqlite3_bind_int64(stmt, 8, rec->pid);
    sqlite3_bind_text(stmt, 9, rec->agenthost_version, -1, SQLITE_STATIC);
    sqlite3_bind_int64(stmt, 10, rec->batches);
    sqlite3_bind_int64(stmt, 11, rec->errors);
    sqlite3_bind_text(stmt, 12, rec->labels, -1, SQLITE_STATIC);
    sqlite3_bind_text(stmt, 13, rec->scope_acks, -1, SQLITE_STATIC);
    sqlite3_bind_text(stmt, 14, rec->leases, -1, SQLITE_STATIC);
    rc = sqlite3_step(stmt);
    if (rc != SQLITE_DONE) {
        goto cleanup;
    }
    rc = SQLITE_OK;
    if (sweep_before_us > 0) {
        sqlite3_finalize(stmt);
        stmt = NULL;
        rc = sqlite3_prepare_v2(db, ah_sqlite_sweep_status, -1, &stmt, NULL);
        if (rc != SQLITE_OK) {
            goto cleanup;
        }
        sqlite3_bind_int64(stmt, 1, sweep_before_us);
        rc = sqlite3_step(stmt) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(db);
    }
cleanup:
    sqlite3_finalize(stmt);
    return rc;
}

static int sqlite_put_status(ah_store_t *base, const ah_agent_status_t *rec, double ttl, char *err,
                             size_t errlen)
{
    ah_sqlite_store_t *st = (ah_sqlite_store_t *)base;
    int rc = SQLITE_OK;
    int ret = 0;

    pthread_mutex_lock(&st->status_lock);
    if ((ret = status_connect_locked(st, err, errlen)) != 0) {
        pthread_mutex_unlock(&st->status_lock);
        return ret;
    }
    int64_t now_mono = ah_mono_us();
    int64_t sweep_before_us = 0;
    if (ttl > 0 &&
        (st->last_sweep_us == 0 || now_mono - st->last_sweep_us >= AH_SQLITE_SWEEP_GAP_US)) {
        sweep_before_us = ah_now_us() - (int64_t)(ttl * 1e6);
    }
    for (int attempt = 1; attempt <= AH_SQLITE_TXN_ATTEMPTS; attempt++) {
        rc = put_status_once(st->status_db, rec, sweep_before_us);
        if (rc == SQLITE_OK || !sqlite_is_busy(rc)) {
            break;
        }
        ah_sleep(0.02 * attempt);
    }
    if (rc != SQLITE_OK) {
        ret = sqlite_failed(st, st->status_db, rc, "status write failed", err, errlen);
    } else if (sweep_before_us > 0) {
        st->last_sweep_us = now_mono;
    }
    pthread_mutex_unlock(&st->status_lock);
    return ret;
}

static int sqlite_list_status(ah_store_t *base, ah_agent_status_t **out, int *count, char *err,
                              size_t errlen)
{
    ah_sqlite_store_t *st = (ah_sqlite_store_t *)base;
    sqlite3_stmt *stmt = NULL;
    ah_agent_status_t *recs = NULL;
    int cap = 0, n = 0;
    int ret = AH_EIO;
    int rc = SQLITE_DONE;

    pthread_mutex_lock(&st->status_lock);
    if ((ret = api_prepare_locked(st, true, ah_sqlite_select_status, "status read failed", &stmt,
                                  err, errlen)) != 0) {
        goto cleanup;
    }
    sqlite3_bind_int(stmt, 1, AH_AGENTS_MAX);
    while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
        ah_agent_status_t *r = ah_store_status_append(&recs, &n, &cap);
        if (r == NULL) {
            snprintf(err, errlen, "embedded store '%s': status read: out of memory", st->path);
            ret = AH_ENOMEM;
            goto cleanup;
        }
        ah_strlcpy(r->agent_id, (const char *)sqlite3_column_text(stmt, 0), sizeof(r->agent_id));
        ah_strlcpy(r->state, (const char *)sqlite3_column_text(stmt, 1), sizeof(r->state));
        r->applied_version = sqlite3_column_int64(stmt, 2);
        ah_strlcpy(r->watch_mode, (const char *)sqlite3_column_text(stmt, 3),
                   sizeof(r->watch_mode));
        r->last_seen_us = sqlite3_column_int64(stmt, 4);
        r->started_us = sqlite3_column_int64(stmt, 5);
        ah_strlcpy(r->host, (const char *)sqlite3_column_text(stmt, 6), sizeof(r->host));
        r->pid = sqlite3_column_int64(stmt, 7);
        ah_strlcpy(r->agenthost_version, (const char *)sqlite3_column_text(stmt, 8),
                   sizeof(r->agenthost_version));
        r->batches = sqlite3_column_int64(stmt, 9);
        r->errors = sqlite3_column_int64(stmt, 10);
        ah_strlcpy(r->labels, (const char *)sqlite3_column_text(stmt, 11), sizeof(r->labels));
        ah_strlcpy(r->scope_acks, (const char *)sqlite3_column_text(stmt, 12),
                   sizeof(r->scope_acks));
        const unsigned char *leases = sqlite3_column_text(stmt, 13);
        ah_strlcpy(r->leases, leases != NULL ? (const char *)leases : "", sizeof(r->leases));
    }
    if (rc != SQLITE_DONE) {
        ret = sqlite_failed(st, st->status_db, rc, "status read failed", err, errlen);
        goto cleanup;
    }
    *out = recs;
    *count = n;
    recs = NULL;
    ret = 0;
cleanup:
    sqlite3_finalize(stmt);
    pthread_mutex_unlock(&st->status_lock);
    free(recs);
    return ret;
}

/* Fills *out (name already set) from a row: owner, token, expires in ms. */
static void lease_from_row(sqlite3_stmt *stmt, int first, ah_lease_t *out)
{
    const unsigned char *owner = sqlite3_column_text(stmt, first);
    ah_strlcpy(out->owner, owner != NULL ? (const char *)owner : "", sizeof(out->owner));
    out->token = sqlite3_column_int64(stmt, first + 1);
    out->expires_in_ms = sqlite3_column_int64(stmt, first + 2);
}

/* One attempt at a lease operation (api_lock held). Returns SQLITE_DONE when the write took
 * effect (*took true) or its condition failed (*took false; acquire: *out the current holder),
 * else the failing result code. */
static int lease_once(sqlite3 *db, ah_lease_op_t op, const char *name, const char *owner,
                      int64_t token, int64_t ttl_ms, ah_lease_t *out, bool *took)
{
    static const char *const sql[] = {
        [AH_LEASE_ACQUIRE] = ah_sqlite_lease_acquire,
        [AH_LEASE_RENEW] = ah_sqlite_lease_renew,
        [AH_LEASE_RELEASE] = ah_sqlite_lease_release,
    };
    sqlite3_stmt *stmt = NULL;
    *took = false;
    int rc = sqlite3_prepare_v2(db, sql[op], -1, &stmt, NULL);
    if (rc != SQLITE_OK) {
        goto cleanup;
    }
    sqlite3_bind_text(stmt, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_text(stmt, 2, owner, -1, SQLITE_STATIC);
    sqlite3_bind_int64(stmt, 3, token);
    sqlite3_bind_int64(stmt, 4, ttl_ms);
    rc = sqlite3_step(stmt);
    if (rc == SQLITE_ROW) {
        lease_from_row(stmt, 0, out);
        *took = true;
        rc = sqlite3_step(stmt);
    }
    if (rc != SQLITE_DONE) {
        goto cleanup;
    }
    if (!*took && op == AH_LEASE_ACQUIRE) {
        sqlite3_finalize(stmt);
        stmt = NULL;
        rc = sqlite3_prepare_v2(db, ah_sqlite_lease_select, -1, &stmt, NULL);
        if (rc != SQLITE_OK) {
            goto cleanup;
        }
        sqlite3_bind_text(stmt, 1, name, -1, SQLITE_STATIC);
        rc = sqlite3_step(stmt);
        if (rc == SQLITE_ROW) {
            lease_from_row(stmt, 0, out);
            rc = sqlite3_step(stmt);
        }
    }
cleanup:
    sqlite3_finalize(stmt);
    return rc;
}

static int sqlite_lease(ah_store_t *base, ah_lease_op_t op, const char *name, const char *owner,
                        int64_t token, int64_t ttl_ms, ah_lease_t *out, char *err, size_t errlen)
{
    ah_sqlite_store_t *st = (ah_sqlite_store_t *)base;
    int rc = SQLITE_DONE;
    bool took = false;

    pthread_mutex_lock(&st->api_lock);
    int ret = api_connect_locked(st, err, errlen);
    if (ret != 0) {
        goto cleanup;
    }
    for (int attempt = 1; attempt <= AH_SQLITE_TXN_ATTEMPTS; attempt++) {
        memset(out, 0, sizeof(*out));
        rc = lease_once(st->api_db, op, name, owner, token, ttl_ms, out, &took);
        if (rc == SQLITE_DONE || !sqlite_is_busy(rc)) {
            break;
        }
        ah_sleep(0.02 * attempt);
    }
    if (rc != SQLITE_DONE) {
        ret = sqlite_failed(st, st->api_db, rc, "lease write failed", err, errlen);
        goto cleanup;
    }
    ah_strlcpy(out->name, name, sizeof(out->name));
    if (!took) {
        if (op != AH_LEASE_ACQUIRE) {
            memset(out, 0, sizeof(*out));
            ah_strlcpy(out->name, name, sizeof(out->name));
        }
        snprintf(err, errlen, "lease '%s' is not ours", name);
        ret = AH_ECONFLICT;
    }
cleanup:
    pthread_mutex_unlock(&st->api_lock);
    return ret;
}

static int sqlite_list_leases(ah_store_t *base, ah_lease_t **out, int *count, char *err,
                              size_t errlen)
{
    ah_sqlite_store_t *st = (ah_sqlite_store_t *)base;
    sqlite3_stmt *stmt = NULL;
    ah_lease_t *recs = NULL;
    int cap = 0, n = 0;
    int rc = SQLITE_DONE;

    pthread_mutex_lock(&st->api_lock);
    int ret = api_prepare_locked(st, false, ah_sqlite_lease_list, "lease read failed", &stmt, err,
                                 errlen);
    if (ret != 0) {
        goto cleanup;
    }
    sqlite3_bind_int(stmt, 1, AH_LEASES_MAX);
    while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
        ah_lease_t *r = ah_store_lease_append(&recs, &n, &cap);
        if (r == NULL) {
            snprintf(err, errlen, "embedded store '%s': lease read: out of memory", st->path);
            ret = AH_ENOMEM;
            goto cleanup;
        }
        const unsigned char *name = sqlite3_column_text(stmt, 0);
        ah_strlcpy(r->name, name != NULL ? (const char *)name : "", sizeof(r->name));
        lease_from_row(stmt, 1, r);
    }
    if (rc != SQLITE_DONE) {
        ret = sqlite_failed(st, st->api_db, rc, "lease read failed", err, errlen);
        goto cleanup;
    }
    *out = recs;
    *count = n;
    recs = NULL;
    ret = 0;
cleanup:
    sqlite3_finalize(stmt);
    pthread_mutex_unlock(&st->api_lock);
    free(recs);
    return ret;
}

/* Watcher: waits up to `seconds` or until close() asks it to stop. Returns true if stopping. */
static bool watch_wait(ah_sqlite_store_t *st, double seconds)
{
    return ah_cond_wait_flag(&st->watch_cond, &st->watch_lock, &st->stopping, seconds);
}

/* Watcher: the connection's data_version into *out. 0, or AH_EIO with err set. */
static int watch_data_version(const ah_sqlite_store_t *st, sqlite3 *db, sqlite3_stmt **stmt,
                              int64_t *out, char *err, size_t errlen)
{
    /* *stmt: prepared once per connection (the caller finalizes it before closing db) */
    if ((*stmt == NULL &&
         sqlite3_prepare_v2(db, "PRAGMA data_version", -1, stmt, NULL) != SQLITE_OK) ||
        sqlite3_step(*stmt) != SQLITE_ROW) {
        sqlite_error(err, errlen, st, db, "change check failed");
        sqlite3_reset(*stmt);
        return AH_EIO;
    }
    *out = sqlite3_column_int64(*stmt, 0);
    sqlite3_reset(*stmt); /* ends the read transaction the step began */
    return 0;
}

/* The watcher thread: initial read (retried with capped exponential backoff), then one
 * data_version check per poll_interval and a re-read when another connection committed.
 * Owns its connection; callbacks run here without any store lock held. */
static void *watch_main(void *arg)
{
    ah_sqlite_store_t *st = arg;
    const ah_store_listener_t *listener = &st->listener;
    ah_store_reporter_t reporter;
    ah_control_t doc;
    sqlite3 *db = NULL;
    sqlite3_stmt *dv_stmt = NULL; /* PRAGMA data_version on db */
    char err[AH_ERRLEN];
    bool need_read = true;
    bool reported_doc = false;
    int64_t reported_version = 0;
    int64_t data_version = 0;
    int failures = 0;            /* consecutive failures: drives the backoff */
    ah_control_t *scopes = NULL; /* the scope set last delivered */
    int scope_count = -1;        /* -1: none delivered yet */
    ah_store_warned_t warned;
    memset(&warned, 0, sizeof(warned));

    ah_store_reporter_init(&reporter, listener, "embedded", "embedded", "polling",
                           AH_SQLITE_STATUS_MIN_GAP_US);
    st->reporter = &reporter;

    for (;;) {
        int64_t now_dv;

        /* The first connection is the one the open checked the file with: set up here, off the
         * caller's thread (a new file gets its schema here). A short lock wait: the backoff below
         * does the waiting, and close is not delayed. */
        sqlite3 *opened = st->first_db;
        st->first_db = NULL;
        if (db == NULL) {
            st->connect_us = ah_mono_us(); /* the latency sqlite_tell_initial reports */
            if (sqlite_connect(st, opened, true, AH_SQLITE_WATCH_BUSY_MS, 1, &db, err,
                               sizeof(err)) != 0) {
                goto failed;
            }
        }
        if (st->told_initial && !reported_doc) { /* the setup delivered the initial document */
            reported_doc = true;
            reported_version = 0;
            scope_count = 0;
        }
        if (need_read) {
            int64_t started_us = ah_mono_us();
            /* data_version first: a commit landing between the two is caught by the next poll. */
            ah_control_t *fresh = NULL;
            int fresh_count = 0;
            if (watch_data_version(st, db, &dv_stmt, &now_dv, err, sizeof(err)) != 0 ||
                control_select(st, db, &doc, NULL, err, sizeof(err)) != 0 ||
                scopes_select(st, db, &fresh, &fresh_count, &warned, err, sizeof(err)) != 0) {
                goto failed;
            }
            /* the scopes first, so that the startup sync applies them with the document */
            if (fresh_count != scope_count ||
                (fresh_count > 0 &&
                 memcmp(fresh, scopes, (size_t)fresh_count * sizeof(*fresh)) != 0)) {
                if (listener->on_scopes != NULL) {
                    listener->on_scopes(listener->ud, fresh, fresh_count);
                }
                free(scopes);
                scopes = fresh;
                scope_count = fresh_count;
            } else {
                free(fresh);
            }
            data_version = now_dv;
            need_read = false;
            failures = 0;
            if (ah_store_note_connected(&reporter, (double)(ah_mono_us() - started_us) / 1000.0)) {
                ah_store_report(&reporter, true);
            }
            if ((!reported_doc || doc.version != reported_version) &&
                listener->on_control != NULL) {
                listener->on_control(listener->ud, &doc);
            }
            reported_doc = true;
            reported_version = doc.version;
            if (atomic_exchange(&st->flush_new, false)) { /* after the delivery: off the agent's
                                                              start-up path */
                sqlite_flush_new(st, db);
            }
        }

        if (watch_wait(st, st->poll_interval)) {
            break;
        }
        if (watch_data_version(st, db, &dv_stmt, &now_dv, err, sizeof(err)) != 0) {
            goto failed;
        }
        reporter.status.polls++;
        if (now_dv != data_version) {
            need_read = true;
        }
        ah_store_report(&reporter, false);
        continue;

    failed:
        ah_store_note_failure(&reporter, err);
        sqlite3_finalize(dv_stmt);
        dv_stmt = NULL;
        sqlite3_close_v2(db);
        db = NULL;
        need_read = true;
        if (watch_wait(st,
                       ah_backoff(failures, AH_SQLITE_BACKOFF_MIN_S, AH_SQLITE_BACKOFF_MAX_S))) {
            break;
        }
        failures += failures < 64;
    }
    st->reporter = NULL;
    sqlite3_finalize(dv_stmt);
    sqlite3_close_v2(db);
    free(scopes);
    return NULL;
}

static int sqlite_watch_start(ah_store_t *base, const ah_store_listener_t *listener, char *err,
                              size_t errlen)
{
    ah_sqlite_store_t *st = (ah_sqlite_store_t *)base;
    int rc;

    if (listener == NULL) {
        snprintf(err, errlen, "embedded store watch: listener is required");
        return AH_EINVAL;
    }
    pthread_mutex_lock(&st->watch_lock);
    if (st->watching) {
        pthread_mutex_unlock(&st->watch_lock);
        snprintf(err, errlen, "embedded store watch already started");
        return AH_EINVAL;
    }
    st->listener = *listener;
    rc = pthread_create(&st->watcher, NULL, watch_main, st);
    if (rc != 0) {
        pthread_mutex_unlock(&st->watch_lock);
        snprintf(err, errlen, "embedded store watch: cannot start thread: %s", strerror(rc));
        return AH_EIO;
    }
    st->watching = true;
    pthread_mutex_unlock(&st->watch_lock);
    return 0;
}

static void sqlite_close(ah_store_t *base)
{
    ah_sqlite_store_t *st = (ah_sqlite_store_t *)base;
    bool watching;

    pthread_mutex_lock(&st->watch_lock);
    st->stopping = true;
    watching = st->watching;
    pthread_cond_broadcast(&st->watch_cond);
    pthread_mutex_unlock(&st->watch_lock);
    if (watching) {
        pthread_join(st->watcher, NULL);
    }
    sqlite3_close_v2(st->first_db); /* the watcher never started */
    sqlite3_close_v2(st->status_db);
    sqlite3_close_v2(st->api_db);
    pthread_cond_destroy(&st->watch_cond);
    pthread_mutex_destroy(&st->watch_lock);
    pthread_mutex_destroy(&st->status_lock);
    pthread_mutex_destroy(&st->api_lock);
    free(st->status_path);
    free(st->path);
    free(st);
}

static const ah_store_ops_t ah_sqlite_ops = {
    .read = sqlite_read,
    .command = sqlite_command,
    .history = sqlite_history,
    .watch_start = sqlite_watch_start,
    .close = sqlite_close,
    .put_status = sqlite_put_status,
    .list_status = sqlite_list_status,
    .lease = sqlite_lease,
    .list_leases = sqlite_list_leases,
};

ah_store_t *ah_store_sqlite_open(const char *path, double poll_interval, char *err, size_t errlen)
{
    ah_sqlite_store_t *st = NULL;
    pthread_condattr_t cond_attr;
    bool api_lock = false, status_lock = false, watch_lock = false, cond_attr_init = false;

    if (path == NULL || path[0] == '\0') {
        snprintf(err, errlen, "embedded store: no file path given");
        return NULL;
    }
    if (!(poll_interval > 0.0) || !isfinite(poll_interval)) {
        snprintf(err, errlen, "embedded store '%s': poll interval must be a positive number", path);
        return NULL;
    }
    st = calloc(1, sizeof(*st));
    size_t status_len = strlen(path) + sizeof(AH_SQLITE_STATUS_SUFFIX);
    if (st == NULL || (st->path = strdup(path)) == NULL ||
        (st->status_path = malloc(status_len)) == NULL) {
        snprintf(err, errlen, "embedded store '%s': out of memory", path);
        goto fail;
    }
    snprintf(st->status_path, status_len, "%s" AH_SQLITE_STATUS_SUFFIX, path);
    st->base.ops = &ah_sqlite_ops;
    st->poll_interval = poll_interval;
    if (pthread_mutex_init(&st->api_lock, NULL) != 0) {
        snprintf(err, errlen, "embedded store '%s': cannot create mutex", path);
        goto fail;
    }
    api_lock = true;
    if (pthread_mutex_init(&st->status_lock, NULL) != 0) {
        snprintf(err, errlen, "embedded store '%s': cannot create mutex", path);
        goto fail;
    }
    status_lock = true;
    if (pthread_mutex_init(&st->watch_lock, NULL) != 0) {
        snprintf(err, errlen, "embedded store '%s': cannot create mutex", path);
        goto fail;
    }
    watch_lock = true;
    if (pthread_condattr_init(&cond_attr) != 0) {
        snprintf(err, errlen, "embedded store '%s': cannot create condition", path);
        goto fail;
    }
    cond_attr_init = true;
    if (pthread_condattr_setclock(&cond_attr, CLOCK_MONOTONIC) != 0 ||
        pthread_cond_init(&st->watch_cond, &cond_attr) != 0) {
        snprintf(err, errlen, "embedded store '%s': cannot create condition", path);
        goto fail;
    }
    pthread_condattr_destroy(&cond_attr);
    cond_attr_init = false;
    /* Only what another process cannot change is checked here, with no lock taken: the file is
     * set up by the watcher (which retries with backoff while another process holds the write
     * lock: the agent starts, not ready, and syncs when it is released), the API connection is
     * opened by the first call that needs it. */
    if (sqlite_check_open(st, &st->first_db, err, errlen) != 0) {
        pthread_cond_destroy(&st->watch_cond);
        goto fail;
    }
    return &st->base;

fail:
    if (cond_attr_init) {
        pthread_condattr_destroy(&cond_attr);
    }
    if (watch_lock) {
        pthread_mutex_destroy(&st->watch_lock);
    }
    if (status_lock) {
        pthread_mutex_destroy(&st->status_lock);
    }
    if (api_lock) {
        pthread_mutex_destroy(&st->api_lock);
    }
    if (st != NULL) {
        free(st->status_path);
        free(st->path);
    }
    free(st);
    return NULL;
}
