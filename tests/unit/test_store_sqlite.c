/* Unit tests of the embedded control store (core/ah_store_sqlite.c): initial document,
 * persistence, gapless versions and audit under concurrent writer processes, history order,
 * the polling watcher and error reporting. Every test works in its own mkdtemp directory. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ah_store.h"

#define WAIT_DEADLINE_S 5.0

typedef struct fixture_s {
    char dir[64];
    char path[128];
} fixture_t;

static int setup(void **state)
{
    fixture_t *fx = calloc(1, sizeof(*fx));
    if (fx == NULL) {
        return -1;
    }
    snprintf(fx->dir, sizeof(fx->dir), "/tmp/ah_store_sqlite_XXXXXX");
    if (mkdtemp(fx->dir) == NULL) {
        free(fx);
        return -1;
    }
    snprintf(fx->path, sizeof(fx->path), "%s/state.db", fx->dir);
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *fx = *state;
    DIR *d = opendir(fx->dir);
    if (d != NULL) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            char file[512];
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) {
                continue;
            }
            snprintf(file, sizeof(file), "%s/%s", fx->dir, e->d_name);
            unlink(file);
        }
        closedir(d);
    }
    rmdir(fx->dir);
    free(fx);
    return 0;
}

static ah_store_t *open_store(const fixture_t *fx, double poll_interval)
{
    char err[AH_ERRLEN] = "";
    ah_store_t *st = ah_store_sqlite_open(fx->path, poll_interval, err, sizeof(err));
    if (st == NULL) {
        fail_msg("open failed: %s", err);
    }
    return st;
}

/* A store whose file is set up: opening only checks the path, the first call that needs the API
 * connection (here a read) sets the file up. */
static ah_store_t *open_store_set_up(const fixture_t *fx, double poll_interval)
{
    char err[AH_ERRLEN] = "";
    ah_control_t doc;
    ah_store_t *st = open_store(fx, poll_interval);
    if (ah_store_read(st, &doc, err, sizeof(err)) != 0) {
        fail_msg("first read failed: %s", err);
    }
    return st;
}

/* A listener that records what the watcher reports, for a test thread to wait on. */
typedef struct recorder_s {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    ah_control_t docs[32];
    int doc_count;
    ah_store_status_t status;
    int status_count;
} recorder_t;

static void recorder_on_control(void *ud, const ah_control_t *doc)
{
    recorder_t *r = ud;
    pthread_mutex_lock(&r->lock);
    if (r->doc_count < (int)(sizeof(r->docs) / sizeof(r->docs[0]))) {
        r->docs[r->doc_count] = *doc;
    }
    r->doc_count++;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->lock);
}

static void recorder_on_status(void *ud, const ah_store_status_t *status)
{
    recorder_t *r = ud;
    pthread_mutex_lock(&r->lock);
    r->status = *status;
    r->status_count++;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->lock);
}

static void recorder_init(recorder_t *r)
{
    pthread_condattr_t attr;
    memset(r, 0, sizeof(*r));
    pthread_mutex_init(&r->lock, NULL);
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&r->cond, &attr);
    pthread_condattr_destroy(&attr);
}

static void recorder_destroy(recorder_t *r)
{
    pthread_cond_destroy(&r->cond);
    pthread_mutex_destroy(&r->lock);
}

/* Waits (up to WAIT_DEADLINE_S) until at least `count` documents were reported. Returns
 * whether they were; on success *last is the newest one. */
static bool recorder_wait_docs(recorder_t *r, int count, ah_control_t *last)
{
    struct timespec deadline;
    bool ok;

    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += (time_t)WAIT_DEADLINE_S;
    pthread_mutex_lock(&r->lock);
    while (r->doc_count < count) {
        if (pthread_cond_timedwait(&r->cond, &r->lock, &deadline) == ETIMEDOUT) {
            break;
        }
    }
    ok = r->doc_count >= count;
    if (ok && last != NULL) {
        *last = r->docs[r->doc_count - 1];
    }
    pthread_mutex_unlock(&r->lock);
    return ok;
}

/* Waits (up to WAIT_DEADLINE_S) until the latest status has connected == connected and
 * reconnects >= min_reconnects. Returns whether it did; *out is that status. */
static bool recorder_wait_status(recorder_t *r, bool connected, uint64_t min_reconnects,
                                 ah_store_status_t *out)
{
    struct timespec deadline;
    bool ok;

    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += (time_t)WAIT_DEADLINE_S;
    pthread_mutex_lock(&r->lock);
    for (;;) {
        ok = r->status_count > 0 && r->status.connected == connected &&
             r->status.reconnects >= min_reconnects;
        if (ok || pthread_cond_timedwait(&r->cond, &r->lock, &deadline) == ETIMEDOUT) {
            break;
        }
    }
    ok = r->status_count > 0 && r->status.connected == connected &&
         r->status.reconnects >= min_reconnects;
    *out = r->status;
    pthread_mutex_unlock(&r->lock);
    return ok;
}

static void exec_sql(const char *path, const char *sql)
{
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
}

/* ---- a VFS that counts syncs: the default VFS ("unix") with every file's xSync counted ---- */

typedef struct counted_file_s {
    sqlite3_file base;  /* pMethods = &counted_io */
    sqlite3_file *real; /* the unix VFS's file, allocated right after this struct */
} counted_file_t;

static sqlite3_vfs *real_vfs;
static sqlite3_io_methods counted_io;
static atomic_int sync_count;

static int counted_sync(sqlite3_file *f, int flags)
{
    atomic_fetch_add(&sync_count, 1);
    counted_file_t *c = (counted_file_t *)f;
    return c->real->pMethods->xSync(c->real, flags);
}

#define FORWARD(name, params, args)                                                                \
    static int counted_##name params                                                               \
    {                                                                                              \
        counted_file_t *c = (counted_file_t *)f;                                                   \
        return c->real->pMethods->x##name args;                                                    \
    }
FORWARD(Read, (sqlite3_file * f, void *buf, int n, sqlite3_int64 off), (c->real, buf, n, off))
FORWARD(Write, (sqlite3_file * f, const void *buf, int n, sqlite3_int64 off),
        (c->real, buf, n, off))
FORWARD(Truncate, (sqlite3_file * f, sqlite3_int64 size), (c->real, size))
FORWARD(FileSize, (sqlite3_file * f, sqlite3_int64 *size), (c->real, size))
FORWARD(Lock, (sqlite3_file * f, int level), (c->real, level))
FORWARD(Unlock, (sqlite3_file * f, int level), (c->real, level))
FORWARD(CheckReservedLock, (sqlite3_file * f, int *out), (c->real, out))
FORWARD(FileControl, (sqlite3_file * f, int op, void *arg), (c->real, op, arg))
FORWARD(SectorSize, (sqlite3_file * f), (c->real))
FORWARD(DeviceCharacteristics, (sqlite3_file * f), (c->real))
FORWARD(ShmMap, (sqlite3_file * f, int pg, int size, int extend, void volatile **out),
        (c->real, pg, size, extend, out))
FORWARD(ShmLock, (sqlite3_file * f, int offset, int n, int flags), (c->real, offset, n, flags))
FORWARD(ShmUnmap, (sqlite3_file * f, int del), (c->real, del))
#undef FORWARD

static void counted_ShmBarrier(sqlite3_file *f)
{
    counted_file_t *c = (counted_file_t *)f;
    c->real->pMethods->xShmBarrier(c->real);
}

static int counted_Close(sqlite3_file *f)
{
    counted_file_t *c = (counted_file_t *)f;
    int rc = c->real->pMethods != NULL ? c->real->pMethods->xClose(c->real) : SQLITE_OK;
    f->pMethods = NULL;
    return rc;
}

static int counted_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags, int *out)
{
    (void)vfs;
    counted_file_t *c = (counted_file_t *)f;
    c->real = (sqlite3_file *)(c + 1);
    memset(c->real, 0, (size_t)real_vfs->szOsFile);
    int rc = real_vfs->xOpen(real_vfs, name, c->real, flags, out);
    f->pMethods = rc == SQLITE_OK ? &counted_io : NULL;
    return rc;
}

/* Makes the counting VFS the default one (every connection of the store goes through it). */
static void counting_vfs_install(void)
{
    static sqlite3_vfs vfs;
    if (real_vfs != NULL) {
        return;
    }
    real_vfs = sqlite3_vfs_find(NULL);
    vfs = *real_vfs;
    vfs.zName = "counted";
    vfs.szOsFile = (int)sizeof(counted_file_t) + real_vfs->szOsFile;
    vfs.xOpen = counted_open;
    counted_io = (sqlite3_io_methods){.iVersion = 2,
                                      .xClose = counted_Close,
                                      .xRead = counted_Read,
                                      .xWrite = counted_Write,
                                      .xTruncate = counted_Truncate,
                                      .xSync = counted_sync,
                                      .xFileSize = counted_FileSize,
                                      .xLock = counted_Lock,
                                      .xUnlock = counted_Unlock,
                                      .xCheckReservedLock = counted_CheckReservedLock,
                                      .xFileControl = counted_FileControl,
                                      .xSectorSize = counted_SectorSize,
                                      .xDeviceCharacteristics = counted_DeviceCharacteristics,
                                      .xShmMap = counted_ShmMap,
                                      .xShmLock = counted_ShmLock,
                                      .xShmBarrier = counted_ShmBarrier,
                                      .xShmUnmap = counted_ShmUnmap};
    assert_int_equal(sqlite3_vfs_register(&vfs, 1), SQLITE_OK);
}

/* The one integer a query answers through a connection of its own. */
static int query_int(const char *path, const char *sql)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *stmt = NULL;
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &stmt, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(stmt), SQLITE_ROW);
    int value = sqlite3_column_int(stmt, 0);
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return value;
}

/* The sync count when the watcher delivered its first document (-1: not yet). */
static atomic_int syncs_at_first_doc = -1;

static void sync_counting_on_control(void *ud, const ah_control_t *doc)
{
    int unset = -1;
    atomic_compare_exchange_strong(&syncs_at_first_doc, &unset, atomic_load(&sync_count));
    recorder_on_control(ud, doc);
}

static long file_size(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? (long)sb.st_size : -1;
}

static void test_a_new_file_is_created_without_a_sync_and_complete(void **state)
{
    fixture_t *fx = *state;
    char err[AH_ERRLEN] = "";
    ah_control_t doc;
    recorder_t rec;
    ah_store_listener_t listener = {sync_counting_on_control, recorder_on_status, &rec, NULL};
    counting_vfs_install();
    recorder_init(&rec);

    /* Opening only checks the path: the file is there, empty, and nothing was written. */
    atomic_store(&sync_count, 0);
    ah_store_t *st = open_store(fx, 1.0);
    assert_int_equal(file_size(fx->path), 0);
    /* The watcher creates the schema and the initial document and delivers it without waiting
     * for the disk; it flushes the new file after that delivery, outside SQLite. */
    assert_int_equal(ah_store_watch_start(st, &listener, err, sizeof(err)), 0);
    assert_true(recorder_wait_docs(&rec, 1, &doc));
    assert_int_equal(doc.command, AH_CMD_RUNNING);
    assert_int_equal(doc.version, 0);
    assert_int_equal(atomic_load(&syncs_at_first_doc), 0);
    /* the flush syncs the file, then its WAL: both, before the command below counts its own */
    for (int i = 0; i < 500 && atomic_load(&sync_count) < 2; i++) {
        usleep(10000);
    }
    assert_int_equal(atomic_load(&sync_count), 2);
    /* ... and the file is complete: the current schema version, every column, the document. */
    assert_int_equal(query_int(fx->path, "PRAGMA user_version"), 1);
    assert_int_equal(query_int(fx->path, "SELECT count(*) FROM pragma_table_info('control')"
                                         " WHERE name IN ('selector', 'drain_ms', 'expires_us')"),
                     3);
    assert_int_equal(query_int(fx->path, "SELECT count(*) FROM control"), 1);
    /* commands are written as before, on the API connection opened by the first of them (WAL,
     * synchronous = NORMAL: no sync per commit) */
    int before = atomic_load(&sync_count);
    assert_int_equal(
        ah_store_command(st, AH_CMD_PAUSE, "after", "ops", "agent-a", &doc, err, sizeof(err)), 0);
    assert_int_equal(doc.version, 1);
    assert_int_equal(atomic_load(&sync_count), before);
    ah_store_close(st);
    recorder_destroy(&rec);
    /* the last connection's close checkpoints: synced then, as always */
    assert_true(atomic_load(&sync_count) > before);

    /* A file that exists is opened with its syncs as before and keeps its data. */
    st = open_store(fx, 1.0);
    assert_int_equal(ah_store_read(st, &doc, err, sizeof(err)), 0);
    assert_int_equal(doc.version, 1);
    ah_store_close(st);
}

/* A new file created by the API connection (a call before the watcher's first read) is set up
 * unsynced too, and flushed by the watcher after its first read. */
static void test_a_new_file_set_up_by_a_call_is_flushed_by_the_watcher(void **state)
{
    fixture_t *fx = *state;
    char err[AH_ERRLEN] = "";
    ah_control_t doc;
    recorder_t rec;
    ah_store_listener_t listener = {recorder_on_control, recorder_on_status, &rec, NULL};
    counting_vfs_install();
    recorder_init(&rec);

    atomic_store(&sync_count, 0);
    ah_store_t *st = open_store(fx, 1.0);
    assert_int_equal(
        ah_store_command(st, AH_CMD_PAUSE, "first", "ops", "agent-a", &doc, err, sizeof(err)), 0);
    assert_int_equal(doc.version, 1);
    assert_int_equal(atomic_load(&sync_count), 0);
    assert_int_equal(ah_store_watch_start(st, &listener, err, sizeof(err)), 0);
    assert_true(recorder_wait_docs(&rec, 1, &doc));
    assert_int_equal(doc.version, 1);
    for (int i = 0; i < 500 && atomic_load(&sync_count) == 0; i++) {
        usleep(10000);
    }
    assert_true(atomic_load(&sync_count) > 0);
    ah_store_close(st);
    recorder_destroy(&rec);
}

/* Opening takes no lock: it succeeds at once while another connection holds the write lock
 * (the watcher then waits for it, and the first document arrives once it is released). */
static void test_open_does_not_wait_for_a_write_lock(void **state)
{
    fixture_t *fx = *state;
    char err[AH_ERRLEN] = "";
    recorder_t rec;
    ah_control_t doc;
    ah_store_listener_t listener = {recorder_on_control, recorder_on_status, &rec, NULL};
    ah_store_close(open_store_set_up(fx, 1.0));
    sqlite3 *holder = NULL;
    assert_int_equal(sqlite3_open_v2(fx->path, &holder, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_exec(holder, "BEGIN IMMEDIATE", NULL, NULL, NULL), SQLITE_OK);

    recorder_init(&rec);
    ah_store_t *st = open_store(fx, 0.05);
    assert_int_equal(ah_store_watch_start(st, &listener, err, sizeof(err)), 0);
    ah_store_status_t status;
    assert_true(recorder_wait_status(&rec, false, 0, &status));
    assert_non_null(strstr(status.last_error, "locked"));
    pthread_mutex_lock(&rec.lock);
    assert_int_equal(rec.doc_count, 0);
    pthread_mutex_unlock(&rec.lock);
    assert_int_equal(sqlite3_exec(holder, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(holder);
    assert_true(recorder_wait_docs(&rec, 1, &doc));
    assert_int_equal(doc.command, AH_CMD_RUNNING);
    ah_store_close(st);
    recorder_destroy(&rec);
}

static void test_a_file_at_the_schema_version_is_not_set_up_again(void **state)
{
    fixture_t *fx = *state;
    ah_store_close(open_store_set_up(fx, 1.0));
    assert_int_equal(query_int(fx->path, "PRAGMA user_version"), 1);
    /* A table removed behind the store's back is not re-created by the next open: a file at the
     * current schema version costs a connection no CREATE TABLE, no probe, no insert. */
    exec_sql(fx->path, "DROP TABLE agent_leases");
    ah_store_close(open_store_set_up(fx, 1.0));
    assert_int_equal(
        query_int(fx->path, "SELECT count(*) FROM sqlite_master WHERE name = 'agent_leases'"), 0);
    /* A file of an older build (schema version 0) is set up again, which restores it. */
    exec_sql(fx->path, "PRAGMA user_version = 0");
    ah_store_close(open_store_set_up(fx, 1.0));
    assert_int_equal(
        query_int(fx->path, "SELECT count(*) FROM sqlite_master WHERE name = 'agent_leases'"), 1);
    assert_int_equal(query_int(fx->path, "PRAGMA user_version"), 1);
}

static void test_fresh_file_reads_running_version_zero_and_reopen_keeps_data(void **state)
{
    fixture_t *fx = *state;
    char err[AH_ERRLEN] = "";
    ah_control_t doc;
    ah_store_t *st = open_store(fx, 1.0);

    assert_int_equal(ah_store_read(st, &doc, err, sizeof(err)), 0);
    assert_int_equal(doc.command, AH_CMD_RUNNING);
    assert_int_equal(doc.version, 0);
    assert_string_equal(doc.reason, "initial state");
    assert_string_equal(doc.updated_by, "system");
    assert_true(doc.timestamp_us > 0);

    assert_int_equal(
        ah_store_command(st, AH_CMD_PAUSE, "maintenance", "ops", "agent-a", NULL, err, sizeof(err)),
        0);
    ah_store_close(st);

    st = open_store(fx, 1.0);
    assert_int_equal(ah_store_read(st, &doc, err, sizeof(err)), 0);
    assert_int_equal(doc.command, AH_CMD_PAUSE);
    assert_int_equal(doc.version, 1);
    assert_string_equal(doc.reason, "maintenance");
    assert_string_equal(doc.updated_by, "ops");
    ah_store_close(st);
}

static void test_file_uses_wal_journal_mode(void **state)
{
    fixture_t *fx = *state;
    sqlite3 *db = NULL;
    sqlite3_stmt *stmt = NULL;
    ah_store_t *st = open_store_set_up(fx, 1.0);

    assert_int_equal(sqlite3_open_v2(fx->path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &stmt, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(stmt), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(stmt, 0), "wal");
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    ah_store_close(st);
}

static void test_command_increments_version_and_writes_audit(void **state)
{
    fixture_t *fx = *state;
    char err[AH_ERRLEN] = "";
    ah_control_t doc, hist[10];
    int count = -1;
    ah_store_t *st = open_store(fx, 1.0);
    const ah_command_t cmds[3] = {AH_CMD_PAUSE, AH_CMD_RUNNING, AH_CMD_SHUTDOWN};
    const char *reasons[3] = {"deploy", "deploy done", "decommission"};

    for (int i = 0; i < 3; i++) {
        int64_t before = ah_now_us();
        assert_int_equal(
            ah_store_command(st, cmds[i], reasons[i], "alice", "agent-7", &doc, err, sizeof(err)),
            0);
        assert_int_equal(doc.version, i + 1);
        assert_int_equal(doc.command, cmds[i]);
        assert_string_equal(doc.reason, reasons[i]);
        assert_string_equal(doc.updated_by, "alice");
        assert_string_equal(doc.agent_id, "agent-7");
        assert_true(doc.timestamp_us >= before);
    }

    assert_int_equal(ah_store_read(st, &doc, err, sizeof(err)), 0);
    assert_int_equal(doc.version, 3);
    assert_int_equal(doc.command, AH_CMD_SHUTDOWN);
    assert_string_equal(doc.reason, "decommission");

    assert_int_equal(ah_store_history(st, 10, hist, &count, err, sizeof(err)), 0);
    assert_int_equal(count, 3);
    for (int i = 0; i < 3; i++) {
        const ah_control_t *e = &hist[i]; /* newest first */
        assert_int_equal(e->version, 3 - i);
        assert_int_equal(e->command, cmds[2 - i]);
        assert_string_equal(e->reason, reasons[2 - i]);
        assert_string_equal(e->updated_by, "alice");
        assert_string_equal(e->agent_id, "agent-7");
    }
    ah_store_close(st);
}

static void test_history_is_newest_first_and_respects_limit(void **state)
{
    fixture_t *fx = *state;
    char err[AH_ERRLEN] = "";
    ah_control_t hist[4];
    int count = -1;
    ah_store_t *st = open_store(fx, 1.0);

    assert_int_equal(ah_store_history(st, 4, hist, &count, err, sizeof(err)), 0);
    assert_int_equal(count, 0);

    for (int i = 0; i < 7; i++) {
        char reason[16];
        snprintf(reason, sizeof(reason), "r%d", i + 1);
        assert_int_equal(ah_store_command(st, i % 2 ? AH_CMD_RUNNING : AH_CMD_PAUSE, reason, "api",
                                          "agent-h", NULL, err, sizeof(err)),
                         0);
    }
    assert_int_equal(ah_store_history(st, 4, hist, &count, err, sizeof(err)), 0);
    assert_int_equal(count, 4);
    assert_int_equal(hist[0].version, 7);
    assert_string_equal(hist[0].reason, "r7");
    assert_int_equal(hist[3].version, 4);
    assert_string_equal(hist[3].reason, "r4");
    for (int i = 1; i < 4; i++) {
        assert_int_equal(hist[i].version, hist[i - 1].version - 1);
    }

    assert_int_equal(ah_store_history(st, 0, hist, &count, err, sizeof(err)), AH_EINVAL);
    ah_store_close(st);
}

#define WRITERS 4
#define COMMANDS_PER_WRITER 25

static void test_concurrent_processes_write_gapless_versions(void **state)
{
    fixture_t *fx = *state;
    char err[AH_ERRLEN] = "";
    pid_t pids[WRITERS];
    static ah_control_t hist[1000];
    int count = -1;
    int per_writer[WRITERS] = {0};
    ah_control_t doc;
    ah_store_t *st;

    /* The children open the fresh file at the same time, as agents started together do. */
    for (int w = 0; w < WRITERS; w++) {
        pids[w] = fork();
        assert_true(pids[w] >= 0);
        if (pids[w] == 0) {
            char child_err[AH_ERRLEN] = "";
            char agent[32];
            ah_store_t *cst = ah_store_sqlite_open(fx->path, 1.0, child_err, sizeof(child_err));
            int rc = 0;
            if (cst == NULL) {
                fprintf(stderr, "writer %d: %s\n", w, child_err);
                _exit(2);
            }
            snprintf(agent, sizeof(agent), "writer-%d", w);
            for (int i = 0; i < COMMANDS_PER_WRITER && rc == 0; i++) {
                rc = ah_store_command(cst, i % 2 ? AH_CMD_RUNNING : AH_CMD_PAUSE, "load", agent,
                                      agent, NULL, child_err, sizeof(child_err));
            }
            if (rc != 0) {
                fprintf(stderr, "writer %d: %s\n", w, child_err);
            }
            ah_store_close(cst);
            _exit(rc == 0 ? 0 : 1);
        }
    }
    for (int w = 0; w < WRITERS; w++) {
        int status = 0;
        assert_int_equal(waitpid(pids[w], &status, 0), pids[w]);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
    }

    st = open_store(fx, 1.0);
    assert_int_equal(ah_store_read(st, &doc, err, sizeof(err)), 0);
    assert_int_equal(doc.version, WRITERS * COMMANDS_PER_WRITER);
    assert_int_equal(ah_store_history(st, 1000, hist, &count, err, sizeof(err)), 0);
    assert_int_equal(count, WRITERS * COMMANDS_PER_WRITER);
    for (int i = 0; i < count; i++) {
        int w = -1;
        assert_int_equal(hist[i].version, WRITERS * COMMANDS_PER_WRITER - i);
        assert_int_equal(sscanf(hist[i].agent_id, "writer-%d", &w), 1);
        assert_true(w >= 0 && w < WRITERS);
        assert_string_equal(hist[i].updated_by, hist[i].agent_id);
        per_writer[w]++;
    }
    for (int w = 0; w < WRITERS; w++) {
        assert_int_equal(per_writer[w], COMMANDS_PER_WRITER);
    }
    ah_store_close(st);
}

static void test_watch_reports_initial_doc_then_change_from_another_handle(void **state)
{
    fixture_t *fx = *state;
    char err[AH_ERRLEN] = "";
    recorder_t rec;
    ah_store_listener_t listener = {recorder_on_control, recorder_on_status, &rec, NULL};
    ah_control_t seen, written;
    ah_store_t *watched = open_store(fx, 0.05);
    ah_store_t *other = open_store(fx, 0.05);

    recorder_init(&rec);
    assert_int_equal(ah_store_watch_start(watched, &listener, err, sizeof(err)), 0);
    assert_int_equal(ah_store_watch_start(watched, &listener, err, sizeof(err)), AH_EINVAL);

    assert_true(recorder_wait_docs(&rec, 1, &seen));
    assert_int_equal(seen.version, 0);
    assert_int_equal(seen.command, AH_CMD_RUNNING);
    pthread_mutex_lock(&rec.lock);
    assert_true(rec.status_count >= 1);
    assert_string_equal(rec.status.backend, "embedded");
    assert_string_equal(rec.status.topology, "embedded");
    assert_string_equal(rec.status.watch_mode, "polling");
    assert_true(rec.status.connected);
    assert_true(rec.status.latency_ms >= 0.0);
    pthread_mutex_unlock(&rec.lock);

    assert_int_equal(ah_store_command(other, AH_CMD_PAUSE, "from another agent", "bob", "agent-b",
                                      &written, err, sizeof(err)),
                     0);
    assert_true(recorder_wait_docs(&rec, 2, &seen));
    assert_int_equal(seen.version, written.version);
    assert_int_equal(seen.command, AH_CMD_PAUSE);
    assert_string_equal(seen.reason, "from another agent");
    assert_string_equal(seen.updated_by, "bob");

    /* A command through the watched handle's own API connection is seen too. */
    assert_int_equal(ah_store_command(watched, AH_CMD_RUNNING, "back", "bob", "agent-a", &written,
                                      err, sizeof(err)),
                     0);
    assert_true(recorder_wait_docs(&rec, 3, &seen));
    assert_int_equal(seen.version, written.version);
    assert_int_equal(seen.command, AH_CMD_RUNNING);

    ah_store_close(other);
    ah_store_close(watched);
    recorder_destroy(&rec);
}

static void test_watch_reports_failure_then_recovers(void **state)
{
    fixture_t *fx = *state;
    char err[AH_ERRLEN] = "";
    recorder_t rec;
    ah_store_listener_t listener = {recorder_on_control, recorder_on_status, &rec, NULL};
    ah_store_status_t status;
    ah_control_t seen, written, hist[4];
    int count = -1;
    ah_store_t *st = open_store(fx, 0.05);

    recorder_init(&rec);
    assert_int_equal(
        ah_store_command(st, AH_CMD_PAUSE, "before", "ops", "agent-a", NULL, err, sizeof(err)), 0);
    assert_int_equal(ah_store_watch_start(st, &listener, err, sizeof(err)), 0);
    assert_true(recorder_wait_docs(&rec, 1, &seen));
    assert_int_equal(seen.version, 1);

    /* Someone removes the control document behind the agents' backs: the watcher reports it. */
    exec_sql(fx->path, "DELETE FROM control");
    assert_true(recorder_wait_status(&rec, false, 0, &status));
    assert_non_null(strstr(status.last_error, "control document is missing"));
    assert_non_null(strstr(status.last_error, fx->path));
    assert_true(status.last_error_us > 0);

    /* A read re-creates it at the last audited version; the watcher recovers. */
    assert_int_equal(ah_store_read(st, &seen, err, sizeof(err)), 0);
    assert_int_equal(seen.version, 1);
    assert_int_equal(seen.command, AH_CMD_RUNNING);
    assert_string_equal(seen.reason, "initial state");
    assert_true(recorder_wait_status(&rec, true, 1, &status));

    /* Deleted again: the next command re-creates it and continues the version sequence. */
    exec_sql(fx->path, "DELETE FROM control");
    assert_true(recorder_wait_status(&rec, false, 1, &status));
    assert_int_equal(
        ah_store_command(st, AH_CMD_RUNNING, "after", "ops", "agent-a", &written, err, sizeof(err)),
        0);
    assert_int_equal(written.version, 2);
    assert_true(recorder_wait_status(&rec, true, 2, &status));
    assert_true(recorder_wait_docs(&rec, 2, &seen));
    assert_int_equal(seen.version, 2);
    assert_string_equal(seen.reason, "after");
    assert_int_equal(ah_store_history(st, 4, hist, &count, err, sizeof(err)), 0);
    assert_int_equal(count, 2);
    assert_int_equal(hist[0].version, 2);
    assert_int_equal(hist[1].version, 1);

    ah_store_close(st);
    recorder_destroy(&rec);
}

static void test_close_interrupts_a_long_poll_wait(void **state)
{
    fixture_t *fx = *state;
    char err[AH_ERRLEN] = "";
    recorder_t rec;
    ah_store_listener_t listener = {recorder_on_control, recorder_on_status, &rec, NULL};
    ah_store_t *st = open_store(fx, 3600.0);

    recorder_init(&rec);
    assert_int_equal(ah_store_watch_start(st, &listener, err, sizeof(err)), 0);
    assert_true(recorder_wait_docs(&rec, 1, NULL));
    /* The watcher now sleeps for an hour; close must wake it. SIGALRM kills the test if not. */
    alarm(30);
    ah_store_close(st);
    alarm(0);
    recorder_destroy(&rec);
}

static void test_unopenable_path_fails_naming_the_path(void **state)
{
    fixture_t *fx = *state;
    char err[AH_ERRLEN] = "";
    char path[256];
    ah_store_t *st;

    snprintf(path, sizeof(path), "%s/no/such/dir/state.db", fx->dir);
    st = ah_store_sqlite_open(path, 1.0, err, sizeof(err));
    assert_null(st);
    assert_non_null(strstr(err, path));

    ah_store_close(NULL); /* NULL-safe */
}

static void test_file_that_is_not_a_database_fails(void **state)
{
    fixture_t *fx = *state;
    char err[AH_ERRLEN] = "";
    FILE *f = fopen(fx->path, "w");

    assert_non_null(f);
    fputs("this is not a database file, just some text long enough to have a header\n", f);
    fclose(f);
    assert_null(ah_store_sqlite_open(fx->path, 1.0, err, sizeof(err)));
    assert_non_null(strstr(err, fx->path));
    assert_non_null(strstr(err, "not a database"));
}

/* ---- status records, compare-and-set, timed pauses ---------------------------------------- */

static ah_agent_status_t status_record(const char *id, const char *state, int64_t applied,
                                       int64_t last_seen_us)
{
    ah_agent_status_t rec;
    memset(&rec, 0, sizeof(rec));
    snprintf(rec.agent_id, sizeof(rec.agent_id), "%s", id);
    snprintf(rec.state, sizeof(rec.state), "%s", state);
    rec.applied_version = applied;
    snprintf(rec.watch_mode, sizeof(rec.watch_mode), "polling");
    rec.last_seen_us = last_seen_us;
    rec.started_us = last_seen_us - 1000000;
    snprintf(rec.host, sizeof(rec.host), "host-%s", id);
    rec.pid = 4242;
    snprintf(rec.agenthost_version, sizeof(rec.agenthost_version), "0.0.0");
    rec.batches = 7;
    rec.errors = 1;
    return rec;
}

static void test_status_records_upsert_list_sorted_and_sweep(void **state)
{
    fixture_t *fx = *state;
    ah_store_t *st = open_store(fx, 1.0);
    char err[AH_ERRLEN] = "";
    int64_t now = ah_now_us();
    ah_agent_status_t b = status_record("b", "running", 0, now);
    ah_agent_status_t a = status_record("a", "paused", 3, now);
    ah_agent_status_t old = status_record("old", "running", 0, now - 7200 * INT64_C(1000000));
    assert_int_equal(ah_store_put_status(st, &old, 0, err, sizeof(err)), 0); /* no sweep */
    assert_int_equal(ah_store_put_status(st, &b, 0, err, sizeof(err)), 0);
    assert_int_equal(ah_store_put_status(st, &a, 0, err, sizeof(err)), 0);
    a.applied_version = 4; /* a second write replaces the record */
    assert_int_equal(ah_store_put_status(st, &a, 0, err, sizeof(err)), 0);

    ah_agent_status_t *recs = NULL;
    int count = 0;
    assert_int_equal(ah_store_list_status(st, &recs, &count, err, sizeof(err)), 0);
    assert_int_equal(count, 3);
    assert_string_equal(recs[0].agent_id, "a");
    assert_string_equal(recs[1].agent_id, "b");
    assert_string_equal(recs[2].agent_id, "old");
    assert_int_equal(recs[0].applied_version, 4);
    assert_string_equal(recs[0].state, "paused");
    assert_string_equal(recs[0].host, "host-a");
    assert_int_equal(recs[0].pid, 4242);
    assert_int_equal(recs[0].last_seen_us, now);
    assert_int_equal(recs[0].batches, 7);
    free(recs);

    /* a write with a TTL sweeps the records it has outlived */
    assert_int_equal(ah_store_put_status(st, &b, 3600, err, sizeof(err)), 0);
    assert_int_equal(ah_store_list_status(st, &recs, &count, err, sizeof(err)), 0);
    assert_int_equal(count, 2);
    assert_string_equal(recs[1].agent_id, "b");
    free(recs);

    ah_agent_status_t nameless = status_record("", "running", 0, now);
    assert_int_equal(ah_store_put_status(st, &nameless, 0, err, sizeof(err)), AH_EINVAL);
    ah_store_close(st);
}

static void test_compare_and_set_writes_only_on_the_expected_version(void **state)
{
    fixture_t *fx = *state;
    ah_store_t *st = open_store(fx, 1.0);
    char err[AH_ERRLEN] = "";
    ah_control_t doc;
    ah_command_req_t req = {.command = AH_CMD_PAUSE,
                            .reason = "r",
                            .updated_by = "u",
                            .agent_id = "agent-a",
                            .if_version = 3};
    assert_int_equal(ah_store_command_req(st, &req, &doc, err, sizeof(err)), AH_ECONFLICT);
    assert_string_equal(err, "version conflict: expected 3, current is 0");
    assert_int_equal(doc.version, 0);
    assert_int_equal(doc.command, AH_CMD_RUNNING);
    ah_control_t hist[4];
    int n = -1;
    assert_int_equal(ah_store_history(st, 4, hist, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 0); /* nothing written */

    req.if_version = 0;
    req.expires_us = ah_now_us() + 60 * INT64_C(1000000);
    assert_int_equal(ah_store_command_req(st, &req, &doc, err, sizeof(err)), 0);
    assert_int_equal(doc.version, 1);
    assert_int_equal(doc.expires_us, req.expires_us);
    ah_control_t read;
    assert_int_equal(ah_store_read(st, &read, err, sizeof(err)), 0);
    assert_int_equal(read.version, 1);
    assert_int_equal(read.expires_us, req.expires_us);

    /* a plain command clears the expiry; only a pause may carry one */
    assert_int_equal(ah_store_command(st, AH_CMD_RUNNING, "", "u", "a", &doc, err, sizeof(err)), 0);
    assert_int_equal(ah_store_read(st, &read, err, sizeof(err)), 0);
    assert_int_equal(read.expires_us, 0);
    ah_command_req_t bad = {.command = AH_CMD_RUNNING, .if_version = -1, .expires_us = 5};
    assert_int_equal(ah_store_command_req(st, &bad, &doc, err, sizeof(err)), AH_EINVAL);
    ah_store_close(st);
}

/* A drain deadline is stored on the control document and its audit entry; a command without
 * one clears it; a resume cannot carry one. */
static void test_drain_is_stored_with_the_command_and_its_audit_entry(void **state)
{
    fixture_t *fx = *state;
    ah_store_t *st = open_store(fx, 1.0);
    char err[AH_ERRLEN] = "";
    ah_control_t doc, read, hist[4];
    int n = 0;
    ah_command_req_t req = {.command = AH_CMD_PAUSE, .if_version = -1, .drain_ms = 2500};
    assert_int_equal(ah_store_command_req(st, &req, &doc, err, sizeof(err)), 0);
    assert_int_equal(doc.drain_ms, 2500);
    assert_int_equal(ah_store_read(st, &read, err, sizeof(err)), 0);
    assert_int_equal(read.drain_ms, 2500);
    req.command = AH_CMD_SHUTDOWN;
    req.drain_ms = 90000;
    assert_int_equal(ah_store_command_req(st, &req, &doc, err, sizeof(err)), 0);
    assert_int_equal(ah_store_command(st, AH_CMD_RUNNING, "", "u", "a", &doc, err, sizeof(err)), 0);
    assert_int_equal(ah_store_read(st, &read, err, sizeof(err)), 0);
    assert_int_equal(read.drain_ms, 0);
    assert_int_equal(ah_store_history(st, 4, hist, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 3);
    assert_int_equal(hist[0].drain_ms, 0);
    assert_int_equal(hist[1].drain_ms, 90000);
    assert_int_equal(hist[2].drain_ms, 2500);

    ah_command_req_t bad = {.command = AH_CMD_RUNNING, .if_version = -1, .drain_ms = 5};
    assert_int_equal(ah_store_command_req(st, &bad, &doc, err, sizeof(err)), AH_EINVAL);
    assert_string_equal(err, "only a pause or a shutdown can have a drain deadline");
    bad.command = AH_CMD_PAUSE;
    bad.drain_ms = -1;
    assert_int_equal(ah_store_command_req(st, &bad, &doc, err, sizeof(err)), AH_EINVAL);
    ah_store_close(st);
}

/* A file written before timed pauses, drains and status records existed gains them at open. */
static void test_file_of_an_older_version_is_upgraded(void **state)
{
    fixture_t *fx = *state;
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(fx->path, &db), SQLITE_OK);
    assert_int_equal(
        sqlite3_exec(db,
                     "CREATE TABLE control (id TEXT PRIMARY KEY, command TEXT NOT NULL,"
                     " version INTEGER NOT NULL, timestamp_us INTEGER NOT NULL,"
                     " reason TEXT NOT NULL, updated_by TEXT NOT NULL);"
                     "CREATE TABLE audit (version INTEGER PRIMARY KEY, command TEXT NOT NULL,"
                     " timestamp_us INTEGER NOT NULL, reason TEXT NOT NULL,"
                     " updated_by TEXT NOT NULL, agent_id TEXT NOT NULL);"
                     "INSERT INTO control VALUES ('global_control', 'pause', 9, 1, 'old', 'ops');",
                     NULL, NULL, NULL),
        SQLITE_OK);
    sqlite3_close(db);
    ah_store_t *st = open_store(fx, 1.0);
    char err[AH_ERRLEN] = "";
    ah_control_t doc;
    assert_int_equal(ah_store_read(st, &doc, err, sizeof(err)), 0);
    assert_int_equal(doc.version, 9);
    assert_int_equal(doc.command, AH_CMD_PAUSE);
    assert_int_equal(doc.expires_us, 0);
    assert_int_equal(doc.drain_ms, 0);
    ah_command_req_t req = {
        .command = AH_CMD_PAUSE, .if_version = 9, .expires_us = 123000, .drain_ms = 2000};
    assert_int_equal(ah_store_command_req(st, &req, &doc, err, sizeof(err)), 0);
    assert_int_equal(doc.version, 10);
    assert_int_equal(ah_store_read(st, &doc, err, sizeof(err)), 0);
    assert_int_equal(doc.drain_ms, 2000);
    ah_control_t hist[2];
    int n = 0;
    assert_int_equal(ah_store_history(st, 2, hist, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 1);
    assert_int_equal(hist[0].drain_ms, 2000);
    ah_agent_status_t rec = status_record("x", "paused", 10, ah_now_us());
    assert_int_equal(ah_store_put_status(st, &rec, 60, err, sizeof(err)), 0);
    ah_store_close(st);
    assert_int_equal(query_int(fx->path, "PRAGMA user_version"), 1);
}

static void test_lease_goes_to_one_owner_and_its_token_grows_on_each_change_of_hands(void **state)
{
    fixture_t *fx = *state;
    ah_store_t *st = open_store(fx, 1.0);
    char err[AH_ERRLEN] = "";
    ah_lease_t l;

    assert_int_equal(
        ah_store_lease(st, AH_LEASE_ACQUIRE, "sweep", "a", 0, 60000, &l, err, sizeof(err)), 0);
    assert_string_equal(l.owner, "a");
    assert_int_equal(l.token, 1);
    assert_true(l.expires_in_ms > 59000 && l.expires_in_ms <= 60000);
    /* another agent is refused and told who holds it */
    assert_int_equal(
        ah_store_lease(st, AH_LEASE_ACQUIRE, "sweep", "b", 0, 60000, &l, err, sizeof(err)),
        AH_ECONFLICT);
    assert_string_equal(l.owner, "a");
    assert_int_equal(l.token, 1);
    /* the holder renews and re-acquires with its token: same token */
    assert_int_equal(
        ah_store_lease(st, AH_LEASE_RENEW, "sweep", "a", 1, 60000, &l, err, sizeof(err)), 0);
    assert_int_equal(l.token, 1);
    assert_int_equal(
        ah_store_lease(st, AH_LEASE_ACQUIRE, "sweep", "a", 1, 60000, &l, err, sizeof(err)), 0);
    assert_int_equal(l.token, 1);
    /* the same agent id without the token (a restarted process) waits like anyone else */
    assert_int_equal(
        ah_store_lease(st, AH_LEASE_ACQUIRE, "sweep", "a", 0, 60000, &l, err, sizeof(err)),
        AH_ECONFLICT);
    /* released: free for the next one, whose token is higher */
    assert_int_equal(ah_store_lease(st, AH_LEASE_RELEASE, "sweep", "a", 1, 0, &l, err, sizeof(err)),
                     0);
    assert_int_equal(
        ah_store_lease(st, AH_LEASE_ACQUIRE, "sweep", "b", 0, 60000, &l, err, sizeof(err)), 0);
    assert_string_equal(l.owner, "b");
    assert_int_equal(l.token, 2);
    /* the old holder can neither renew nor release it any more */
    assert_int_equal(
        ah_store_lease(st, AH_LEASE_RENEW, "sweep", "a", 1, 60000, &l, err, sizeof(err)),
        AH_ECONFLICT);
    assert_int_equal(l.token, 0);
    assert_int_equal(ah_store_lease(st, AH_LEASE_RELEASE, "sweep", "a", 1, 0, &l, err, sizeof(err)),
                     AH_ECONFLICT);

    ah_lease_t *recs = NULL;
    int count = 0;
    assert_int_equal(
        ah_store_lease(st, AH_LEASE_ACQUIRE, "report", "c", 0, 60000, &l, err, sizeof(err)), 0);
    assert_int_equal(ah_store_list_leases(st, &recs, &count, err, sizeof(err)), 0);
    assert_int_equal(count, 2);
    assert_string_equal(recs[0].name, "report");
    assert_string_equal(recs[1].name, "sweep");
    assert_string_equal(recs[1].owner, "b");
    assert_int_equal(recs[1].token, 2);
    assert_true(recs[1].expires_in_ms > 0);
    free(recs);

    assert_int_equal(ah_store_lease(st, AH_LEASE_ACQUIRE, "", "a", 0, 1000, &l, err, sizeof(err)),
                     AH_EINVAL);
    assert_int_equal(
        ah_store_lease(st, AH_LEASE_RENEW, "sweep", "a", 0, 1000, &l, err, sizeof(err)), AH_EINVAL);
    ah_store_close(st);
}

static void test_expired_lease_is_taken_over_with_a_higher_token(void **state)
{
    fixture_t *fx = *state;
    ah_store_t *st = open_store(fx, 1.0);
    char err[AH_ERRLEN] = "";
    ah_lease_t l;

    assert_int_equal(
        ah_store_lease(st, AH_LEASE_ACQUIRE, "sweep", "a", 0, 50, &l, err, sizeof(err)), 0);
    assert_int_equal(l.token, 1);
    int64_t deadline = ah_mono_us() + (int64_t)(WAIT_DEADLINE_S * 1e6);
    int rc;
    while ((rc = ah_store_lease(st, AH_LEASE_ACQUIRE, "sweep", "b", 0, 60000, &l, err,
                                sizeof(err))) == AH_ECONFLICT &&
           ah_mono_us() < deadline) {
        ah_sleep(0.02);
    }
    assert_int_equal(rc, 0);
    assert_string_equal(l.owner, "b");
    assert_int_equal(l.token, 2);
    /* the expired holder's renewal is refused: the lease changed hands */
    assert_int_equal(
        ah_store_lease(st, AH_LEASE_RENEW, "sweep", "a", 1, 60000, &l, err, sizeof(err)),
        AH_ECONFLICT);
    ah_store_close(st);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(
            test_fresh_file_reads_running_version_zero_and_reopen_keeps_data, setup, teardown),
        cmocka_unit_test_setup_teardown(test_file_uses_wal_journal_mode, setup, teardown),
        cmocka_unit_test_setup_teardown(test_command_increments_version_and_writes_audit, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_history_is_newest_first_and_respects_limit, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_processes_write_gapless_versions, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(
            test_watch_reports_initial_doc_then_change_from_another_handle, setup, teardown),
        cmocka_unit_test_setup_teardown(test_watch_reports_failure_then_recovers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_interrupts_a_long_poll_wait, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unopenable_path_fails_naming_the_path, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_file_that_is_not_a_database_fails, setup, teardown),
        cmocka_unit_test_setup_teardown(test_status_records_upsert_list_sorted_and_sweep, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_compare_and_set_writes_only_on_the_expected_version,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_drain_is_stored_with_the_command_and_its_audit_entry,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_file_of_an_older_version_is_upgraded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_a_new_file_is_created_without_a_sync_and_complete,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_a_new_file_set_up_by_a_call_is_flushed_by_the_watcher,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_open_does_not_wait_for_a_write_lock, setup, teardown),
        cmocka_unit_test_setup_teardown(test_a_file_at_the_schema_version_is_not_set_up_again,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(
            test_lease_goes_to_one_owner_and_its_token_grows_on_each_change_of_hands, setup,
            teardown),
        cmocka_unit_test_setup_teardown(test_expired_lease_is_taken_over_with_a_higher_token, setup,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
