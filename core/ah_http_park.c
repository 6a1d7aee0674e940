/* Replies, request contexts and parked requests of the HTTP API (ah_http_park.h): the layer
 * below the handlers. A request whose answer is not ready leaves libmicrohttpd's threads
 * suspended, and is answered later from any thread. This file owns the threads that do that
 * work: up to HTTP_STORE_WORKERS store workers (started by the first jobs that find the started
 * ones busy), which run the jobs that may block (store calls) from a bounded queue, and one park
 * thread, which runs the checks of waiting requests after each change of the state object and
 * answers them at their deadline. libmicrohttpd's threads therefore never wait on the store or on
 * the Lua worker, and probes are answered while the store hangs. It also owns what suspending and
 * resuming needs: the request context that points at the park, the suspend/resume calls, and the
 * queuing of a reply on its connection.
 *
 * Ownership: a park is reference counted (atomic). The connection's reference is dropped when
 * libmicrohttpd completes the request, which can only happen after the answer (a suspended
 * connection is not processed); a queued job holds one until the job has run; a caller of
 * ah_http_park() holds one. The last release frees the park and its argument. */
#include "ah_http_park.h"

#include "ah_log.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define HTTP_STORE_WORKERS 2    /* threads running store work for the API */
#define HTTP_STORE_QUEUE_MAX 32 /* jobs waiting for one of them; past this: 503 */
#define HTTP_RETRY_AFTER_S 1    /* Retry-After of that 503 */

#define JSON_TYPE "application/json"

/* Lock order: the state object's listener lock → lock → the state object's lock (a park check
 * reads a snapshot). */
struct ah_http_parking_s {
    ah_state_t *state;
    /* lock guards everything below; park_cond wakes the park thread (a deadline, a state change,
     * stop), jobs_cond the store workers (a job, stop). */
    pthread_mutex_t lock;
    pthread_cond_t park_cond;
    pthread_cond_t jobs_cond;
    bool stopping;          /* ah_http_park_stop() began: nothing new is parked */
    bool dirty;             /* the state changed (or a request was parked): run the checks */
    http_park_t *parks;     /* requests parked and not answered yet (a list through next) */
    http_park_t *jobs_head; /* jobs waiting for a store worker, oldest first */
    http_park_t *jobs_tail;
    int jobs_waiting;            /* length of jobs_head; at most HTTP_STORE_QUEUE_MAX */
    int jobs_running;            /* store workers inside a job */
    atomic_ullong jobs_rejected; /* 503s of a full queue */
    bool park_started;           /* the park thread was created */
    int workers_started; /* store workers created: on demand, when a job finds every one busy */
    pthread_t park_thread;
    pthread_t store_workers[HTTP_STORE_WORKERS];
};

struct http_park_s {
    ah_http_parking_t *parking;
    struct MHD_Connection *conn;
    atomic_int refs;
    bool answered;       /* under the parking lock: `answer` is final, the connection was resumed */
    http_reply_t answer; /* read by the resumed request, after `answered` */
    int64_t deadline_us; /* monotonic; 0: none (jobs) */
    http_park_check_t check;
    http_job_t job; /* NULL for ah_http_park() */
    void *arg;
    void (*free_arg)(void *arg);
    http_park_t *prev; /* in parking->parks while not answered */
    http_park_t *next;
    http_park_t *job_next; /* in the job queue while waiting for a worker */
};

static void *store_worker_main(void *arg);
static void *park_main(void *arg);

/* ---- replies ---------------------------------------------------------------------------- */

void ah_http_reply_init(http_reply_t *reply)
{
    memset(reply, 0, sizeof(*reply));
    reply->status = MHD_HTTP_OK;
    ah_buf_init(&reply->body);
}

void ah_http_reply_error(http_reply_t *reply, unsigned status, const char *fmt, ...)
{
    char message[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof(message), fmt, ap);
    va_end(ap);
    ah_buf_free(&reply->body);
    reply->status = status;
    reply->content_type = NULL;
    ah_json_open(&reply->body);
    ah_json_str(&reply->body, "status", "error");
    ah_json_str(&reply->body, "error", message);
    ah_json_close(&reply->body);
}

enum MHD_Result ah_http_reply_send(struct MHD_Connection *conn, http_reply_t *reply)
{
    static const char out_of_memory[] = "{\"status\":\"error\",\"error\":\"out of memory\"}";
    size_t len = 0;
    char *data = ah_buf_take(&reply->body, &len);
    struct MHD_Response *response;
    unsigned status = reply->status;
    if (data == NULL) {
        status = MHD_HTTP_INTERNAL_SERVER_ERROR;
        reply->content_type = NULL;
        response = MHD_create_response_from_buffer(sizeof(out_of_memory) - 1, (void *)out_of_memory,
                                                   MHD_RESPMEM_PERSISTENT);
    } else {
        response = MHD_create_response_from_buffer(len, data, MHD_RESPMEM_MUST_FREE);
        if (response == NULL) {
            free(data);
        }
    }
    if (response == NULL) {
        return MHD_NO;
    }
    bool ok =
        MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE,
                                reply->content_type ? reply->content_type : JSON_TYPE) == MHD_YES &&
        MHD_add_response_header(response, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store") == MHD_YES &&
        MHD_add_response_header(response, "X-Content-Type-Options", "nosniff") == MHD_YES;
    if (ok && reply->allow != NULL) {
        ok = MHD_add_response_header(response, MHD_HTTP_HEADER_ALLOW, reply->allow) == MHD_YES;
    }
    if (ok && reply->www_authenticate) {
        ok = MHD_add_response_header(response, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer") ==
             MHD_YES;
    }
    if (ok && reply->retry_after > 0) {
        char seconds[16];
        snprintf(seconds, sizeof(seconds), "%u", reply->retry_after);
        ok = MHD_add_response_header(response, MHD_HTTP_HEADER_RETRY_AFTER, seconds) == MHD_YES;
    }
    enum MHD_Result result = ok ? MHD_queue_response(conn, status, response) : MHD_NO;
    MHD_destroy_response(response);
    return result;
}

/* ---- parks ------------------------------------------------------------------------------ */

static void park_unref(http_park_t *park)
{
    if (park == NULL || atomic_fetch_sub(&park->refs, 1) != 1) {
        return;
    }
    if (park->free_arg != NULL) {
        park->free_arg(park->arg);
    }
    ah_buf_free(&park->answer.body);
    free(park);
}

void ah_http_park_release(http_park_t *park)
{
    park_unref(park);
}

/* Makes *reply the answer of park unless it has one (the parking lock held); resumes the connection
 * (under the lock, so that ah_http_park_stop() never sees a park answered but still suspended).
 * reply's body is taken either way. Returns true if this answer is the one sent. */
static bool answer_locked(http_park_t *park, http_reply_t *reply)
{
    if (park->answered) {
        ah_buf_free(&reply->body);
        return false;
    }
    ah_http_parking_t *parking = park->parking;
    park->answer = *reply;
    park->answer.parked = false;
    ah_buf_init(&reply->body);
    park->answered = true;
    if (park->prev != NULL) {
        park->prev->next = park->next;
    } else {
        parking->parks = park->next;
    }
    if (park->next != NULL) {
        park->next->prev = park->prev;
    }
    park->prev = park->next = NULL;
    MHD_resume_connection(park->conn);
    return true;
}

bool ah_http_park_answer(http_park_t *park, http_reply_t *reply)
{
    ah_http_parking_t *parking = park->parking;
    pthread_mutex_lock(&parking->lock);
    bool sent = answer_locked(park, reply);
    pthread_mutex_unlock(&parking->lock);
    return sent;
}

/* ---- request contexts ------------------------------------------------------------------- */

http_request_t *ah_http_request_context(void **req_cls)
{
    if (*req_cls != NULL) {
        return *req_cls;
    }
    http_request_t *req = calloc(1, sizeof(*req));
    if (req != NULL) {
        *req_cls = req;
    }
    return req;
}

void ah_http_request_done(void **req_cls)
{
    http_request_t *req = *req_cls;
    if (req != NULL) {
        park_unref(req->park); /* NULL when it was never parked */
        free(req);
    }
    *req_cls = NULL;
}

enum MHD_Result ah_http_request_send_answer(struct MHD_Connection *conn, http_request_t *req)
{
    return ah_http_reply_send(conn, &req->park->answer);
}

/* Fills reply with the 503 of a server that is stopping. */
static void reply_stopping(http_reply_t *reply)
{
    ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, "the agent is shutting down");
}

/* A new park for the request at conn (its context at req_cls, allocated if needed; not linked
 * yet), with the connection's reference, or NULL (out of memory; arg not released). */
static http_park_t *park_new(ah_http_parking_t *parking, struct MHD_Connection *conn,
                             void **req_cls, http_park_check_t check, http_job_t job, void *arg,
                             void (*free_arg)(void *arg), double timeout_s)
{
    if (ah_http_request_context(req_cls) == NULL) {
        return NULL;
    }
    http_park_t *park = calloc(1, sizeof(*park));
    if (park == NULL) {
        return NULL;
    }
    park->parking = parking;
    park->conn = conn;
    atomic_init(&park->refs, 1);
    ah_http_reply_init(&park->answer);
    park->check = check;
    park->job = job;
    park->arg = arg;
    park->free_arg = free_arg;
    if (job == NULL) {
        if (!(timeout_s > 0)) {
            timeout_s = 0.001;
        }
        if (timeout_s > 86400.0) {
            timeout_s = 86400.0;
        }
        park->deadline_us = ah_mono_us() + (int64_t)(timeout_s * 1e6);
    }
    return park;
}

/* Suspends the connection and links park into the parked requests (lock held); req_cls holds
 * the request context park_new() made sure of. */
static void park_link_locked(ah_http_parking_t *parking, void **req_cls, http_park_t *park)
{
    http_request_t *ctx = *req_cls;
    MHD_suspend_connection(park->conn);
    ctx->park = park;
    park->next = parking->parks;
    if (parking->parks != NULL) {
        parking->parks->prev = park;
    }
    parking->parks = park;
}

int ah_http_run_job(ah_http_parking_t *parking, struct MHD_Connection *conn, void **req_cls,
                    http_reply_t *reply, http_job_t job, void *arg, void (*free_arg)(void *arg))
{
    http_park_t *park = park_new(parking, conn, req_cls, NULL, job, arg, free_arg, 0);
    if (park == NULL) {
        if (free_arg != NULL) {
            free_arg(arg);
        }
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return AH_ENOMEM;
    }
    pthread_mutex_lock(&parking->lock);
    if (parking->stopping || parking->jobs_waiting >= HTTP_STORE_QUEUE_MAX) {
        bool stopping = parking->stopping;
        pthread_mutex_unlock(&parking->lock);
        park_unref(park); /* frees arg */
        if (stopping) {
            reply_stopping(reply);
        } else {
            atomic_fetch_add(&parking->jobs_rejected, 1);
            ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE,
                                "too many requests waiting for the control store (%d running, "
                                "%d queued): retry later",
                                HTTP_STORE_WORKERS, HTTP_STORE_QUEUE_MAX);
            reply->retry_after = HTTP_RETRY_AFTER_S;
        }
        return AH_EUNAVAIL;
    }
    /* Store workers start on demand: one when a job finds every started one busy (an agent
     * that is sent no store work has none). Without any, the job cannot run: 503. */
    if (parking->workers_started < HTTP_STORE_WORKERS &&
        parking->jobs_running + parking->jobs_waiting >= parking->workers_started) {
        int rc = pthread_create(&parking->store_workers[parking->workers_started], NULL,
                                store_worker_main, parking);
        if (rc == 0) {
            parking->workers_started++;
        } else if (parking->workers_started == 0) {
            pthread_mutex_unlock(&parking->lock);
            park_unref(park); /* frees arg */
            ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE,
                                "cannot start a control-store worker: %s", strerror(rc));
            reply->retry_after = HTTP_RETRY_AFTER_S;
            return AH_EUNAVAIL;
        }
    }
    park_link_locked(parking, req_cls, park);
    atomic_fetch_add(&park->refs, 1); /* the queue's */
    if (parking->jobs_tail != NULL) {
        parking->jobs_tail->job_next = park;
    } else {
        parking->jobs_head = park;
    }
    parking->jobs_tail = park;
    parking->jobs_waiting++;
    pthread_cond_signal(&parking->jobs_cond);
    pthread_mutex_unlock(&parking->lock);
    reply->parked = true;
    return AH_OK;
}

http_park_t *ah_http_park(ah_http_parking_t *parking, struct MHD_Connection *conn, void **req_cls,
                          http_reply_t *reply, double timeout_s, http_park_check_t check, void *arg,
                          void (*free_arg)(void *arg))
{
    http_park_t *park = park_new(parking, conn, req_cls, check, NULL, arg, free_arg, timeout_s);
    if (park == NULL) {
        if (free_arg != NULL) {
            free_arg(arg);
        }
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return NULL;
    }
    pthread_mutex_lock(&parking->lock);
    if (parking->stopping) {
        pthread_mutex_unlock(&parking->lock);
        park_unref(park);
        reply_stopping(reply);
        return NULL;
    }
    /* The park thread starts with the first parked request (an agent that is sent no wait=
     * has none, and the start-up creates one thread less). */
    if (!parking->park_started) {
        int rc = pthread_create(&parking->park_thread, NULL, park_main, parking);
        if (rc != 0) {
            pthread_mutex_unlock(&parking->lock);
            park_unref(park);
            ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE,
                                "cannot start the HTTP park thread: %s", strerror(rc));
            reply->retry_after = HTTP_RETRY_AFTER_S;
            return NULL;
        }
        parking->park_started = true;
    }
    park_link_locked(parking, req_cls, park);
    atomic_fetch_add(&park->refs, 1); /* the caller's */
    parking->dirty = true;            /* the check may already hold */
    pthread_cond_broadcast(&parking->park_cond);
    pthread_mutex_unlock(&parking->lock);
    reply->parked = true;
    return park;
}

/* ---- the threads ------------------------------------------------------------------------ */

/* The state object's change listener: wakes the park thread. */
static void on_state_change(void *ud)
{
    ah_http_parking_t *parking = ud;
    pthread_mutex_lock(&parking->lock);
    parking->dirty = true;
    pthread_cond_broadcast(&parking->park_cond);
    pthread_mutex_unlock(&parking->lock);
}

/* Runs the checks that are due (the parking lock held); returns the earliest deadline still ahead
 * (monotonic µs), or 0 when nothing waits for one. */
static int64_t run_checks_locked(ah_http_parking_t *parking, bool dirty)
{
    int64_t now = ah_mono_us();
    int64_t earliest = 0;
    http_park_t *next;
    for (http_park_t *park = parking->parks; park != NULL; park = next) {
        next = park->next; /* answer_locked() unlinks park, never next */
        if (park->job != NULL) {
            continue;
        }
        bool expired = park->deadline_us <= now;
        if (expired || (dirty && park->check != NULL)) {
            http_reply_t reply;
            ah_http_reply_init(&reply);
            bool done = expired;
            if (park->check != NULL) {
                done = park->check(park->arg, expired, &reply) || expired;
            } else {
                ah_http_reply_error(&reply, MHD_HTTP_GATEWAY_TIMEOUT,
                                    "no answer within the time allowed");
            }
            if (done) {
                answer_locked(park, &reply);
                continue;
            }
            ah_buf_free(&reply.body);
        }
        if (earliest == 0 || park->deadline_us < earliest) {
            earliest = park->deadline_us;
        }
    }
    return earliest;
}

static bool park_thread_has_work(void *arg)
{
    const ah_http_parking_t *parking = arg;
    return parking->dirty || parking->stopping;
}

static void *park_main(void *arg)
{
    ah_http_parking_t *parking = arg;
    pthread_mutex_lock(&parking->lock);
    bool dirty = true;
    while (!parking->stopping) {
        int64_t earliest = run_checks_locked(parking, dirty);
        double wait_s = earliest == 0 ? 3600.0 : (double)(earliest - ah_mono_us()) / 1e6;
        if (wait_s > 0) {
            ah_cond_wait_until(&parking->park_cond, &parking->lock, wait_s, park_thread_has_work,
                               parking);
        }
        dirty = parking->dirty;
        parking->dirty = false;
    }
    pthread_mutex_unlock(&parking->lock);
    return NULL;
}

static bool job_ready(void *arg)
{
    const ah_http_parking_t *parking = arg;
    return parking->jobs_head != NULL || parking->stopping;
}

static void *store_worker_main(void *arg)
{
    ah_http_parking_t *parking = arg;
    pthread_mutex_lock(&parking->lock);
    for (;;) {
        while (!job_ready(parking)) {
            pthread_cond_wait(&parking->jobs_cond, &parking->lock);
        }
        http_park_t *park = parking->jobs_head;
        if (park == NULL) {
            break; /* stopping (queued jobs were dropped by ah_http_park_stop) */
        }
        parking->jobs_head = park->job_next;
        if (parking->jobs_head == NULL) {
            parking->jobs_tail = NULL;
        }
        park->job_next = NULL;
        parking->jobs_waiting--;
        parking->jobs_running++;
        pthread_mutex_unlock(&parking->lock);

        http_reply_t reply;
        ah_http_reply_init(&reply);
        park->job(park->arg, &reply);

        pthread_mutex_lock(&parking->lock);
        answer_locked(park, &reply);
        parking->jobs_running--;
        pthread_cond_broadcast(&parking->jobs_cond); /* ah_http_park_stop() may wait for it */
        pthread_mutex_unlock(&parking->lock);
        park_unref(park); /* the queue's reference */
        pthread_mutex_lock(&parking->lock);
    }
    pthread_mutex_unlock(&parking->lock);
    return NULL;
}

ah_http_parking_t *ah_http_park_start(ah_state_t *state, char *err, size_t errlen)
{
    ah_http_parking_t *parking = calloc(1, sizeof(*parking));
    if (parking == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    parking->state = state;
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_mutex_init(&parking->lock, NULL);
    pthread_cond_init(&parking->park_cond, &attr);
    pthread_cond_init(&parking->jobs_cond, &attr);
    pthread_condattr_destroy(&attr);
    ah_state_set_change_listener(parking->state, on_state_change, parking);
    return parking;
}

static bool jobs_idle(void *arg)
{
    const ah_http_parking_t *parking = arg;
    return parking->jobs_running == 0;
}

int ah_http_park_stop(ah_http_parking_t *parking, double seconds)
{
    ah_state_set_change_listener(parking->state, NULL, NULL);
    pthread_mutex_lock(&parking->lock);
    parking->stopping = true; /* from now on requests are answered 503 without parking */
    /* Drop the queued jobs (they never ran: answered 503 below), let the running ones finish
     * within the budget (a cluster shutdown's own answer comes from one), then answer
     * everything still parked. */
    http_park_t *dropped = parking->jobs_head;
    parking->jobs_head = parking->jobs_tail = NULL;
    int dropped_count = parking->jobs_waiting;
    parking->jobs_waiting = 0;
    if (dropped_count > 0 || parking->jobs_running > 0) {
        ah_log_info("Stopping the API: %d queued control-store request(s) dropped (answered 503), "
                    "%d running",
                    dropped_count, parking->jobs_running);
    }
    pthread_cond_broadcast(&parking->park_cond);
    pthread_cond_broadcast(&parking->jobs_cond);
    bool idle =
        ah_cond_wait_until(&parking->jobs_cond, &parking->lock, seconds, jobs_idle, parking);
    while (parking->parks != NULL) {
        http_reply_t reply;
        ah_http_reply_init(&reply);
        reply_stopping(&reply);
        answer_locked(parking->parks, &reply);
    }
    pthread_mutex_unlock(&parking->lock);
    while (dropped != NULL) {
        http_park_t *next = dropped->job_next;
        park_unref(dropped);
        dropped = next;
    }
    if (parking->park_started) {
        pthread_join(parking->park_thread, NULL);
        parking->park_started = false;
    }
    if (!idle) {
        return AH_ETIMEOUT; /* a store call is stuck: its worker keeps using parking and the store
                             */
    }
    for (int i = 0; i < parking->workers_started; i++) {
        pthread_join(parking->store_workers[i], NULL);
    }
    parking->workers_started = 0;
    return AH_OK;
}

void ah_http_park_free(ah_http_parking_t *parking)
{
    if (parking == NULL) {
        return;
    }
    pthread_cond_destroy(&parking->jobs_cond);
    pthread_cond_destroy(&parking->park_cond);
    pthread_mutex_destroy(&parking->lock);
    free(parking);
}

void ah_http_park_render_metrics(ah_http_parking_t *parking, ah_buf_t *out)
{
    pthread_mutex_lock(&parking->lock);
    int running = parking->jobs_running;
    int queued = parking->jobs_waiting;
    int parked = 0;
    for (const http_park_t *park = parking->parks; park != NULL; park = park->next) {
        parked++;
    }
    pthread_mutex_unlock(&parking->lock);
    ah_buf_printf(out,
                  "# HELP agenthost_http_parked_requests API requests waiting for their answer "
                  "(store work or a state), holding no HTTP thread\n"
                  "# TYPE agenthost_http_parked_requests gauge\n"
                  "agenthost_http_parked_requests %d\n"
                  "# HELP agenthost_http_store_jobs API store calls by state\n"
                  "# TYPE agenthost_http_store_jobs gauge\n"
                  "agenthost_http_store_jobs{state=\"running\"} %d\n"
                  "agenthost_http_store_jobs{state=\"queued\"} %d\n"
                  "# HELP agenthost_http_store_rejected_total API requests answered 503 because "
                  "the store queue was full\n"
                  "# TYPE agenthost_http_store_rejected_total counter\n"
                  "agenthost_http_store_rejected_total %llu\n",
                  parked, running, queued,
                  (unsigned long long)atomic_load(&parking->jobs_rejected));
}
