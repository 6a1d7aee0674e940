/* Parked requests of the HTTP API (ah_http_handlers.h, "parked requests"): a request whose
 * answer is not ready leaves libmicrohttpd's threads suspended (MHD_suspend_connection) and is
 * answered later from any thread (MHD_resume_connection with the answer kept in the park). Used
 * by cluster commands with wait=, answered by the fleet's waiter thread (core/ah_fleet.c).
 *
 * Ownership: a park is reference counted (atomic). The connection's reference is dropped when
 * libmicrohttpd completes the request, which can only happen after the answer (a suspended
 * connection is not processed); the caller of ah_http_park() holds one until it releases it.
 * The last release frees the park and its argument. */
#include "ah_http_handlers.h"

#include <stdlib.h>
#include <string.h>

struct http_park_s {
    ah_http_t *http;
    struct MHD_Connection *conn;
    atomic_int refs;
    bool answered;       /* under park_lock: `answer` is final, the connection was resumed */
    http_reply_t answer; /* read by the resumed request, after `answered` */
    void *arg;
    void (*free_arg)(void *arg);
    http_park_t *prev; /* in http->parks while not answered */
    http_park_t *next;
};

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

void ah_http_park_connection_done(http_park_t *park)
{
    park_unref(park);
}

http_reply_t *ah_http_park_reply(http_park_t *park)
{
    return &park->answer;
}

/* Makes *reply the answer of park unless it has one (park_lock held) and resumes the connection.
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

http_park_t *ah_http_park(http_call_t *call, http_reply_t *reply, double timeout_s, void *check,
                          void *arg, void (*free_arg)(void *arg))
{
    (void)timeout_s;
    (void)check;
    ah_http_t *http = call->http;
    http_request_t *ctx = ah_http_request_context(call);
    http_park_t *park = ctx != NULL ? calloc(1, sizeof(*park)) : NULL;
    if (park == NULL) {
        if (free_arg != NULL) {
            free_arg(arg);
        }
        ah_http_reply_error(reply, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return NULL;
    }
    park->http = http;
    park->conn = call->conn;
    atomic_init(&park->refs, 2); /* the connection's and the caller's */
    park->answer.status = MHD_HTTP_OK;
    ah_buf_init(&park->answer.body);
    park->arg = arg;
    park->free_arg = free_arg;
    pthread_mutex_lock(&http->park_lock);
    if (http->park_stopping) {
        pthread_mutex_unlock(&http->park_lock);
        atomic_store(&park->refs, 1);
        park_unref(park);
        ah_http_reply_error(reply, MHD_HTTP_SERVICE_UNAVAILABLE, "the agent is shutting down");
        return NULL;
    }
    MHD_suspend_connection(call->conn);
    ctx->park = park;
    park->next = http->parks;
    if (http->parks != NULL) {
        http->parks->prev = park;
    }
    http->parks = park;
    pthread_mutex_unlock(&http->park_lock);
    reply->parked = true;
    return park;
}

void ah_http_park_stop(ah_http_t *http)
{
    pthread_mutex_lock(&http->park_lock);
    http->park_stopping = true;
    while (http->parks != NULL) {
        http_reply_t reply = {.status = MHD_HTTP_OK};
        ah_buf_init(&reply.body);
        ah_http_reply_error(&reply, MHD_HTTP_SERVICE_UNAVAILABLE, "the agent is shutting down");
        answer_locked(http->parks, &reply);
    }
    pthread_mutex_unlock(&http->park_lock);
}
