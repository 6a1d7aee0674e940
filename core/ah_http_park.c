/* Parked requests of the HTTP API (ah_http_handlers.h, "parked requests"): a request whose
 * answer is not ready leaves libmicrohttpd's threads suspended, and is answered later from any
 * thread. This file owns the threads that do that work: HTTP_STORE_WORKERS store workers, which
 * run the jobs that may block (store calls) from a bounded queue, and one park thread, which
 * runs the checks of waiting requests after each change of the state object and answers them
 * at their deadline. libmicrohttpd's threads therefore never wait on the store or on the Lua
 * worker, and probes are answered while the store hangs.
 *
 * Ownership: a park is reference counted (atomic). The connection's reference is dropped when
 * libmicrohttpd completes the request, which can only happen after the answer (a suspended
 * connection is not processed); a queued job holds one until the job has run; a caller of
 * ah_http_park() holds one. The last release frees the park and its argument. */
#include "ah_http_handlers.h"

#include "ah_log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define HTTP_STORE_WORKERS 2    /* threads running store work for the API */
#define HTTP_STORE_QUEUE_MAX 32 /* jobs waiting for one of them; past this: 503 */
#define HTTP_RETRY_AFTER_S 1    /* Retry-After of that 503 */

_Static_assert(HTTP_STORE_WORKERS <= sizeof(((ah_http_t *)0)->store_workers) /
                                         sizeof(((ah_http_t *)0)->store_workers[0]),
               "store_workers[] too small");

struct http_park_s {
    ah_http_t *http;
    struct MHD_Connection *conn;
    atomic_int refs;
    bool answered;       /* under park_lock: `answer` is final, the connection was resumed */
    http_reply_t answer; /* read by the resumed request, after `answered` */
    int64_t deadline_us; /* monotonic; 0: none (jobs) */
    http_park_check_t check;
    http_job_t job; /* NULL for ah_http_park() */
    void *arg;
    void (*free_arg)(void *arg);
    http_park_t *prev; /* in http->parks while not answered */
    http_park_t *next;
    http_park_t *job_next; /* in the job queue while waiting for a worker */
};

static void reply_init(http_reply_t *reply)
{
    memset(reply, 0, sizeof(*reply));
    reply->status = MHD_HTTP_OK;
    ah_buf_init(&reply->body);
}

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

/* Makes *reply the answer of park unless it has one (park_lock held); resumes the connection
 * (under the lock, so that ah_http_park_stop() never sees a park answered but still suspended).
 * reply's body is taken either way. Returns true if this answer is the one sent. */
static bool answer_locked(http_park_t *park, http_reply_t *reply)
{
    if (park->answered) {
        ah_buf_free(&reply->body);
        return false;
    }
    ah_http_t *http = park->http;
    park->answer = *reply;
    park->answer.parked = false;
    ah_buf_init(&reply->body);
    park->answered = true;
    if (park->prev != NULL) {
        park->prev->next = park->next;
    } else {
        http->parks = park->next;
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
    ah_http_t *http = park->http;
    pthread_mutex_lock(&http->park_lock);
    bool sent = answer_locked(park, reply);
    pthread_mutex_unlock(&http->park_lock);
    return sent;
}

http_reply_t *ah_http_park_reply(http_park_t *park)
{
    return &park->answer;
}

void ah_http_park_connection_done(http_park_t *park)
{
    park_unref(park);
}

/* Fills reply with the 503 of a server that is stopping. */
static void reply_stopping(http_reply_t *reply)
{
    ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, "the agent is shutting down");
}

/* A new park for call (not linked yet), with the connection's reference, or NULL (out of
 * memory; arg not released). */
static http_park_t *park_new(http_call_t *call, http_park_check_t check, http_job_t job, void *arg,
                             void (*free_arg)(void *arg), double timeout_s)
{
    if (ah_http_request_context(call) == NULL) {
        return NULL;
    }
    http_park_t *park = calloc(1, sizeof(*park));
    if (park == NULL) {
        return NULL;
    }
    park->http = call->http;
    park->conn = call->conn;
    atomic_init(&park->refs, 1);
    reply_init(&park->answer);
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

/* Suspends the connection and links park into the parked requests (park_lock held). */
static void park_link_locked(http_call_t *call, http_park_t *park)
{
    ah_http_t *http = call->http;
    http_request_t *ctx = *call->req_cls;
    MHD_suspend_connection(call->conn);
    ctx->park = park;
    park->next = http->parks;
    if (http->parks != NULL) {
        http->parks->prev = park;
    }
    http->parks = park;
}

int ah_http_run_job(http_call_t *call, http_reply_t *reply, http_job_t job, void *arg,
                    void (*free_arg)(void *arg))
{
    ah_http_t *http = call->http;
    http_park_t *park = park_new(call, NULL, job, arg, free_arg, 0);
    if (park == NULL) {
        if (free_arg != NULL) {
            free_arg(arg);
        }
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return AH_ENOMEM;
    }
    pthread_mutex_lock(&http->park_lock);
    if (http->park_stopping || http->jobs_waiting >= HTTP_STORE_QUEUE_MAX) {
        bool stopping = http->park_stopping;
        pthread_mutex_unlock(&http->park_lock);
        park_unref(park); /* frees arg */
        if (stopping) {
            reply_stopping(reply);
        } else {
            atomic_fetch_add(&http->jobs_rejected, 1);
            ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE,
                                "too many requests waiting for the control store (%d running, "
                                "%d queued): retry later",
                                HTTP_STORE_WORKERS, HTTP_STORE_QUEUE_MAX);
            reply->retry_after = HTTP_RETRY_AFTER_S;
        }
        return AH_EUNAVAIL;
    }
    park_link_locked(call, park);
    atomic_fetch_add(&park->refs, 1); /* the queue's */
    if (http->jobs_tail != NULL) {
        http->jobs_tail->job_next = park;
    } else {
        http->jobs_head = park;
    }
    http->jobs_tail = park;
    http->jobs_waiting++;
    pthread_cond_signal(&http->jobs_cond);
    pthread_mutex_unlock(&http->park_lock);
    reply->parked = true;
    return AH_OK;
}

http_park_t *ah_http_park(http_call_t *call, http_reply_t *reply, double timeout_s,
                          http_park_check_t check, void *arg, void (*free_arg)(void *arg))
{
    ah_http_t *http = call->http;
    http_park_t *park = park_new(call, check, NULL, arg, free_arg, timeout_s);
    if (park == NULL) {
        if (free_arg != NULL) {
            free_arg(arg);
        }
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return NULL;
    }
    pthread_mutex_lock(&http->park_lock);
    if (http->park_stopping) {
        pthread_mutex_unlock(&http->park_lock);
        park_unref(park);
        reply_stopping(reply);
        return NULL;
    }
    park_link_locked(call, park);
    atomic_fetch_add(&park->refs, 1); /* the caller's */
    http->park_dirty = true;          /* the check may already hold */
    pthread_cond_broadcast(&http->park_cond);
    pthread_mutex_unlock(&http->park_lock);
    reply->parked = true;
    return park;
}

/* ---- the threads ------------------------------------------------------------------------ */

/* The state object's change listener: wakes the park thread. */
static void on_state_change(void *ud)
{
    ah_http_t *http = ud;
    pthread_mutex_lock(&http->park_lock);
    http->park_dirty = true;
    pthread_cond_broadcast(&http->park_cond);
    pthread_mutex_unlock(&http->park_lock);
}

/* Runs the checks that are due (park_lock held); returns the earliest deadline still ahead
 * (monotonic µs), or 0 when nothing waits for one. */
static int64_t run_checks_locked(ah_http_t *http, bool dirty)
{
    int64_t now = ah_mono_us();
    int64_t earliest = 0;
    http_park_t *next;
    for (http_park_t *park = http->parks; park != NULL; park = next) {
        next = park->next; /* answer_locked() unlinks park, never next */
        if (park->job != NULL) {
            continue;
        }
        bool expired = park->deadline_us <= now;
        if (expired || (dirty && park->check != NULL)) {
            http_reply_t reply;
            reply_init(&reply);
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
    const ah_http_t *http = arg;
    return http->park_dirty || http->park_stopping;
}

static void *park_main(void *arg)
{
    ah_http_t *http = arg;
    pthread_mutex_lock(&http->park_lock);
    bool dirty = true;
    while (!http->park_stopping) {
        int64_t earliest = run_checks_locked(http, dirty);
        double wait_s = earliest == 0 ? 3600.0 : (double)(earliest - ah_mono_us()) / 1e6;
        if (wait_s > 0) {
            ah_cond_wait_until(&http->park_cond, &http->park_lock, wait_s, park_thread_has_work,
                               http);
        }
        dirty = http->park_dirty;
        http->park_dirty = false;
    }
    pthread_mutex_unlock(&http->park_lock);
    return NULL;
}

static bool job_ready(void *arg)
{
    const ah_http_t *http = arg;
    return http->jobs_head != NULL || http->park_stopping;
}

static void *store_worker_main(void *arg)
{
    ah_http_t *http = arg;
    pthread_mutex_lock(&http->park_lock);
    for (;;) {
        while (!job_ready(http)) {
            pthread_cond_wait(&http->jobs_cond, &http->park_lock);
        }
        http_park_t *park = http->jobs_head;
        if (park == NULL) {
            break; /* stopping (queued jobs were dropped by ah_http_park_stop) */
        }
        http->jobs_head = park->job_next;
        if (http->jobs_head == NULL) {
            http->jobs_tail = NULL;
        }
        park->job_next = NULL;
        http->jobs_waiting--;
        http->jobs_running++;
        pthread_mutex_unlock(&http->park_lock);

        http_reply_t reply;
        reply_init(&reply);
        park->job(park->arg, &reply);

        pthread_mutex_lock(&http->park_lock);
        answer_locked(park, &reply);
        http->jobs_running--;
        pthread_cond_broadcast(&http->jobs_cond); /* ah_http_park_stop() may wait for it */
        pthread_mutex_unlock(&http->park_lock);
        park_unref(park); /* the queue's reference */
        pthread_mutex_lock(&http->park_lock);
    }
    pthread_mutex_unlock(&http->park_lock);
    return NULL;
}

int ah_http_park_start(ah_http_t *http, char *err, size_t errlen)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_mutex_init(&http->park_lock, NULL);
    pthread_cond_init(&http->park_cond, &attr);
    pthread_cond_init(&http->jobs_cond, &attr);
    pthread_condattr_destroy(&attr);
    int rc = pthread_create(&http->park_thread, NULL, park_main, http);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start the HTTP park thread: %s", strerror(rc));
        return AH_EIO;
    }
    http->threads_started = 1;
    for (int i = 0; i < HTTP_STORE_WORKERS; i++) {
        rc = pthread_create(&http->store_workers[i], NULL, store_worker_main, http);
        if (rc != 0) {
            snprintf(err, errlen, "cannot start an HTTP store worker: %s", strerror(rc));
            return AH_EIO;
        }
        http->threads_started++;
    }
    ah_state_set_change_listener(http->state, on_state_change, http);
    return AH_OK;
}

static bool jobs_idle(void *arg)
{
    const ah_http_t *http = arg;
    return http->jobs_running == 0;
}

int ah_http_park_stop(ah_http_t *http, double seconds)
{
    ah_state_set_change_listener(http->state, NULL, NULL);
    pthread_mutex_lock(&http->park_lock);
    http->park_stopping = true; /* from now on requests are answered 503 without parking */
    if (http->threads_started == 0) {
        pthread_mutex_unlock(&http->park_lock);
        return AH_OK;
    }
    /* Drop the queued jobs (they never ran: answered 503 below), let the running ones finish
     * within the budget (a cluster shutdown's own answer comes from one), then answer
     * everything still parked. */
    http_park_t *dropped = http->jobs_head;
    http->jobs_head = http->jobs_tail = NULL;
    http->jobs_waiting = 0;
    pthread_cond_broadcast(&http->park_cond);
    pthread_cond_broadcast(&http->jobs_cond);
    bool idle = ah_cond_wait_until(&http->jobs_cond, &http->park_lock, seconds, jobs_idle, http);
    while (http->parks != NULL) {
        http_reply_t reply;
        reply_init(&reply);
        reply_stopping(&reply);
        answer_locked(http->parks, &reply);
    }
    pthread_mutex_unlock(&http->park_lock);
    while (dropped != NULL) {
        http_park_t *next = dropped->job_next;
        park_unref(dropped);
        dropped = next;
    }
    pthread_join(http->park_thread, NULL);
    if (!idle) {
        return AH_ETIMEOUT; /* a store call is stuck: its worker keeps using http and the store */
    }
    for (int i = 0; i + 1 < http->threads_started; i++) {
        pthread_join(http->store_workers[i], NULL);
    }
    http->threads_started = 0;
    return AH_OK;
}

void ah_http_park_free(ah_http_t *http)
{
    pthread_cond_destroy(&http->jobs_cond);
    pthread_cond_destroy(&http->park_cond);
    pthread_mutex_destroy(&http->park_lock);
}

void ah_http_park_render_metrics(ah_http_t *http, ah_buf_t *out)
{
    pthread_mutex_lock(&http->park_lock);
    int running = http->jobs_running;
    int queued = http->jobs_waiting;
    int parked = 0;
    for (const http_park_t *park = http->parks; park != NULL; park = park->next) {
        parked++;
    }
    pthread_mutex_unlock(&http->park_lock);
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
                  parked, running, queued, (unsigned long long)atomic_load(&http->jobs_rejected));
}
