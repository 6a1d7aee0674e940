/* What the driver does not say about a URI: a check of the options it accepts without
 * validating them (the authentication mechanism), and a direct connection attempt to the URI's
 * hosts that names why a server cannot be reached ("connection refused"), for errors whose
 * driver message does not (server selection). Part of the MongoDB plugin. */
#include "ahm.h"

#include "ah_common.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

/* How long the probe waits for one address to accept a connection. */
#define PROBE_CONNECT_MS 1000

static const char *const auth_mechanisms[] = {
    "SCRAM-SHA-1", "SCRAM-SHA-256", "MONGODB-X509", "GSSAPI", "PLAIN", "MONGODB-AWS",
};

int ahm_uri_check(const mongoc_uri_t *uri, const char *setting, char *err, size_t errlen)
{
    const char *mechanism = mongoc_uri_get_auth_mechanism(uri);
    if (mechanism == NULL) {
        return AH_OK;
    }
    for (size_t i = 0; i < sizeof(auth_mechanisms) / sizeof(auth_mechanisms[0]); i++) {
        if (strcasecmp(mechanism, auth_mechanisms[i]) == 0) {
            return AH_OK;
        }
    }
    snprintf(err, errlen,
             "%s has an unknown authMechanism \"%.64s\" (expected SCRAM-SHA-256, SCRAM-SHA-1, "
             "MONGODB-X509, GSSAPI, PLAIN or MONGODB-AWS)",
             setting, mechanism);
    return AH_EINVAL;
}

/* One connection attempt to one address: 0 (accepted), an errno, or ETIMEDOUT. */
static int probe_address(const struct addrinfo *ai)
{
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        return errno;
    }
    int rc = 0;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        rc = errno;
        if (rc == EINPROGRESS) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            int ready = poll(&pfd, 1, PROBE_CONNECT_MS);
            socklen_t len = sizeof(rc);
            if (ready <= 0) {
                rc = ETIMEDOUT;
            } else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &rc, &len) != 0) {
                rc = errno;
            }
        }
    }
    close(fd);
    return rc;
}

void ahm_uri_probe(const mongoc_uri_t *uri, char *out, size_t n)
{
    out[0] = '\0';
    for (const mongoc_host_list_t *h = mongoc_uri_get_hosts(uri); h != NULL; h = h->next) {
        if (h->family == AF_UNIX) {
            continue;
        }
        char port[16];
        snprintf(port, sizeof(port), "%u", (unsigned)h->port);
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
        struct addrinfo *res = NULL;
        int gai = getaddrinfo(h->host, port, &hints, &res);
        if (gai != 0) {
            snprintf(out, n, "cannot resolve %s: %s", h->host, gai_strerror(gai));
            return;
        }
        int problem = ECONNREFUSED;
        for (const struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
            problem = probe_address(ai);
            if (problem == 0) {
                break;
            }
        }
        freeaddrinfo(res);
        if (problem == ECONNREFUSED) {
            snprintf(out, n, "connection refused by %s (nothing listening on that port?)",
                     h->host_and_port);
            return;
        }
        if (problem == ETIMEDOUT) {
            snprintf(out, n, "no answer from %s within %d ms", h->host_and_port, PROBE_CONNECT_MS);
            return;
        }
        if (problem != 0) {
            snprintf(out, n, "cannot connect to %s: %s", h->host_and_port, strerror(problem));
            return;
        }
    }
}
