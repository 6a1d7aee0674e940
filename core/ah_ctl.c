/* Implementation of ah_ctl.h: argument parsing, URL building with percent-encoding, and a
 * blocking HTTP/1.1 client with a deadline (poll-based, no extra dependency). */
#include "ah_ctl.h"

#include "ah_common.h"
#include "ah_ctl_fleet.h"
#include "ah_json.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* One line of the usage text per line of source. */
/* clang-format off */
static const char ctl_usage[] =
    "usage: agenthost ctl COMMAND [options]\n"
    "\n"
    "commands:\n"
    "  pause | resume | shutdown   cluster command (all agents); with --local: this agent only\n"
    "  state                       cluster control state; with --local: this agent's state\n"
    "  stats                       cluster statistics\n"
    "  history                     audit trail, newest first (--limit N, default 20)\n"
    "  agents                      every agent's status (--version N: only those behind N;\n"
    "                              --json: the raw answer)\n"
    "\n"
    "options:\n"
    "  --url URL          agent API (default $AGENTHOST_URL, else http://127.0.0.1:$HTTP_PORT,\n"
    "                     port 8000 if unset)\n"
    "  --token TOKEN      bearer token (default $AGENT_API_TOKEN)\n"
    "  --reason TEXT      why (pause/resume/shutdown)\n"
    "  --updated-by NAME  who (default: ctl)\n"
    "  --local            act on the agent at --url only (/api/agent/*)\n"
    "  --if-version N     cluster command: only if the current version is N (else 409, exit 1)\n"
    "  --for DURATION     pause: end it automatically after 90s, 15m, 2h, ... (or seconds)\n"
    "  --until TIME       pause: end it automatically at an ISO 8601 UTC time\n"
    "  --wait SECONDS     cluster command: answer once every live agent applied it (exit 0),\n"
    "                     or after SECONDS listing the stragglers (exit 1)\n"
    "  --limit N          history entries (1-" AH_XSTR(AH_HISTORY_MAX) ")\n"
    "  --timeout SECONDS  give up after this long (default 10)\n"
    "\n"
    "exit codes: 0 success, 1 the agent answered an error or could not be reached, 2 bad usage\n";
/* clang-format on */

static void url_encode(ah_buf_t *b, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
            *p == '-' || *p == '_' || *p == '.' || *p == '~') {
            ah_buf_append(b, (const char *)p, 1);
        } else {
            char enc[3] = {'%', hex[*p >> 4], hex[*p & 15]};
            ah_buf_append(b, enc, 3);
        }
    }
}

/* Parses http://HOST[:PORT][/] into host (size n) and port. */
static int parse_url(const char *url, char *host, size_t n, int *port)
{
    if (strncmp(url, "http://", 7) != 0) {
        return AH_EINVAL;
    }
    const char *p = url + 7;
    size_t len = strcspn(p, ":/");
    if (len == 0 || len >= n) {
        return AH_EINVAL;
    }
    memcpy(host, p, len);
    host[len] = '\0';
    p += len;
    *port = 80;
    if (*p == ':') {
        char *end = NULL;
        long v = strtol(p + 1, &end, 10);
        if (end == p + 1 || v < 1 || v > 65535 || (*end != '\0' && *end != '/')) {
            return AH_EINVAL;
        }
        *port = (int)v;
        p = end;
    }
    if (*p != '\0' && strcmp(p, "/") != 0) {
        return AH_EINVAL;
    }
    return AH_OK;
}

static int remaining_ms(int64_t deadline_us)
{
    int64_t left = deadline_us - ah_mono_us();
    return left <= 0 ? 0 : (int)(left / 1000) + 1;
}

int ah_ctl_request(const char *host, int port, const char *method, const char *path,
                   const char *token, double timeout_s, char **body, char *err, size_t errlen)
{
    int rc = AH_EIO;
    int fd = -1;
    struct addrinfo *res = NULL;
    ah_buf_t req, resp;
    ah_buf_init(&req);
    ah_buf_init(&resp);
    *body = NULL;
    int64_t deadline = ah_mono_us() + (int64_t)(timeout_s * 1e6);

    char portstr[16];
    snprintf(portstr, sizeof(portstr), "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    int gai = getaddrinfo(host, portstr, &hints, &res);
    if (gai != 0) {
        snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(gai));
        goto out;
    }
    fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        goto out;
    }
    if (connect(fd, res->ai_addr, res->ai_addrlen) != 0 && errno != EINPROGRESS) {
        snprintf(err, errlen, "cannot connect to %s:%d: %s", host, port, strerror(errno));
        goto out;
    }
    struct pollfd pfd = {.fd = fd, .events = POLLOUT};
    if (poll(&pfd, 1, remaining_ms(deadline)) != 1) {
        snprintf(err, errlen, "cannot connect to %s:%d: timed out", host, port);
        rc = AH_ETIMEOUT;
        goto out;
    }
    int soerr = 0;
    socklen_t slen = sizeof(soerr);
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &slen);
    if (soerr != 0) {
        snprintf(err, errlen, "cannot connect to %s:%d: %s", host, port, strerror(soerr));
        goto out;
    }
    ah_buf_printf(&req, "%s %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n", method, path,
                  host, port);
    if (token != NULL && token[0] != '\0') {
        ah_buf_printf(&req, "Authorization: Bearer %s\r\n", token);
    }
    ah_buf_puts(&req, strcmp(method, "POST") == 0 ? "Content-Length: 0\r\n\r\n" : "\r\n");
    if (!ah_buf_ok(&req)) {
        snprintf(err, errlen, "out of memory");
        rc = AH_ENOMEM;
        goto out;
    }
    size_t sent = 0;
    while (sent < req.len) {
        pfd.events = POLLOUT;
        if (poll(&pfd, 1, remaining_ms(deadline)) != 1) {
            snprintf(err, errlen, "timed out sending the request");
            rc = AH_ETIMEOUT;
            goto out;
        }
        ssize_t w = send(fd, req.data + sent, req.len - sent, MSG_NOSIGNAL);
        if (w < 0 && errno != EAGAIN && errno != EINTR) {
            snprintf(err, errlen, "send: %s", strerror(errno));
            goto out;
        }
        sent += w > 0 ? (size_t)w : 0;
    }
    for (;;) {
        pfd.events = POLLIN;
        if (poll(&pfd, 1, remaining_ms(deadline)) != 1) {
            snprintf(err, errlen, "timed out waiting for the answer");
            rc = AH_ETIMEOUT;
            goto out;
        }
        char chunk[4096];
        ssize_t r = recv(fd, chunk, sizeof(chunk), 0);
        if (r == 0) {
            break;
        }
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                continue;
            }
            snprintf(err, errlen, "recv: %s", strerror(errno));
            goto out;
        }
        ah_buf_append(&resp, chunk, (size_t)r);
        if (resp.len > (16u << 20)) {
            snprintf(err, errlen, "answer too large");
            goto out;
        }
    }
    int status = 0;
    if (resp.data == NULL || sscanf(resp.data, "HTTP/1.%*d %d", &status) != 1 || status < 100) {
        snprintf(err, errlen, "malformed HTTP answer");
        goto out;
    }
    const char *sep = strstr(resp.data, "\r\n\r\n");
    *body = strdup(sep ? sep + 4 : "");
    rc = status;
out:
    if (res != NULL) {
        freeaddrinfo(res);
    }
    if (fd >= 0) {
        close(fd);
    }
    ah_buf_free(&req);
    ah_buf_free(&resp);
    return rc;
}

int ah_ctl_main(int argc, char **argv)
{
    if (argc < 1 || strcmp(argv[0], "--help") == 0 || strcmp(argv[0], "-h") == 0) {
        fputs(ctl_usage, argc < 1 ? stderr : stdout);
        return argc < 1 ? 2 : 0;
    }
    const char *command = argv[0];
    const char *url = getenv("AGENTHOST_URL");
    const char *token = getenv("AGENT_API_TOKEN");
    const char *reason = NULL;
    const char *updated_by = "ctl";
    const char *limit = NULL;
    const char *if_version = NULL; /* cluster command options, passed through as given */
    const char *pause_for = NULL;
    const char *pause_until = NULL;
    const char *wait = NULL;           /* --wait: passed through; the answer decides the exit */
    const char *agents_version = NULL; /* ctl agents --version */
    bool raw_json = false;
    double timeout_s = 10;
    bool local = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char **slot = NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(ctl_usage, stdout);
            return 0;
        } else if (strcmp(a, "--local") == 0) {
            local = true;
            continue;
        } else if (strcmp(a, "--json") == 0) {
            raw_json = true;
            continue;
        } else if (strcmp(a, "--wait") == 0) {
            slot = &wait;
        } else if (strcmp(a, "--version") == 0) {
            slot = &agents_version;
        } else if (strcmp(a, "--url") == 0) {
            slot = &url;
        } else if (strcmp(a, "--token") == 0) {
            slot = &token;
        } else if (strcmp(a, "--reason") == 0) {
            slot = &reason;
        } else if (strcmp(a, "--updated-by") == 0) {
            slot = &updated_by;
        } else if (strcmp(a, "--limit") == 0) {
            slot = &limit;
        } else if (strcmp(a, "--if-version") == 0) {
            slot = &if_version;
        } else if (strcmp(a, "--for") == 0) {
            slot = &pause_for;
        } else if (strcmp(a, "--until") == 0) {
            slot = &pause_until;
        } else if (strcmp(a, "--timeout") == 0) {
            /* A number, not NaN, not past a day: the deadline is computed in microseconds. */
            char *end = NULL;
            timeout_s = i + 1 < argc ? strtod(argv[i + 1], &end) : 0;
            if (i + 1 >= argc || end == argv[i + 1] || *end != '\0' ||
                !(timeout_s > 0 && timeout_s <= 86400)) {
                fprintf(stderr, "agenthost ctl: --timeout needs a number of seconds, more than "
                                "0 and at most 86400\n");
                return 2;
            }
            i++;
            continue;
        } else {
            fprintf(stderr, "agenthost ctl: unknown option %s\n%s", a, ctl_usage);
            return 2;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "agenthost ctl: option %s needs a value\n", a);
            return 2;
        }
        *slot = argv[++i];
    }
    char default_url[64];
    if (url == NULL || url[0] == '\0') {
        const char *port = getenv("HTTP_PORT");
        snprintf(default_url, sizeof(default_url), "http://127.0.0.1:%s",
                 port && port[0] ? port : "8000");
        url = default_url;
    }
    char host[256];
    int port;
    if (parse_url(url, host, sizeof(host), &port) != AH_OK) {
        fprintf(stderr, "agenthost ctl: invalid --url \"%s\" (expected http://HOST[:PORT])\n", url);
        return 2;
    }

    if (local && (strcmp(command, "stats") == 0 || strcmp(command, "history") == 0 ||
                  strcmp(command, "agents") == 0)) {
        fprintf(stderr, "agenthost ctl: --local applies to pause, resume, shutdown and state\n");
        return 2;
    }
    ah_buf_t path;
    ah_buf_init(&path);
    const char *method = "GET";
    bool is_command = strcmp(command, "pause") == 0 || strcmp(command, "resume") == 0 ||
                      strcmp(command, "shutdown") == 0;
    if (is_command) {
        method = "POST";
        ah_buf_printf(&path, "/api/%s/%s?updated_by=", local ? "agent" : "cluster", command);
        url_encode(&path, updated_by);
        if (reason != NULL) {
            ah_buf_puts(&path, "&reason=");
            url_encode(&path, reason);
        }
        const struct {
            const char *name;
            const char *value;
        } options[] = {
            {"if_version", if_version}, {"for", pause_for}, {"until", pause_until}, {"wait", wait}};
        for (size_t k = 0; k < sizeof(options) / sizeof(options[0]); k++) {
            if (options[k].value == NULL) {
                continue;
            }
            if (local) {
                fprintf(stderr, "agenthost ctl: --%s applies to cluster commands only\n",
                        options[k].name);
                ah_buf_free(&path);
                return 2;
            }
            ah_buf_printf(&path, "&%s=", options[k].name);
            url_encode(&path, options[k].value);
        }
    } else if (strcmp(command, "state") == 0) {
        ah_buf_puts(&path, local ? "/api/agent/state" : "/api/cluster/control-state");
    } else if (strcmp(command, "stats") == 0) {
        ah_buf_puts(&path, "/api/cluster/stats");
    } else if (strcmp(command, "agents") == 0) {
        ah_buf_puts(&path, "/api/cluster/agents");
        if (agents_version != NULL) {
            ah_buf_puts(&path, "?version=");
            url_encode(&path, agents_version);
        }
    } else if (strcmp(command, "history") == 0) {
        ah_buf_puts(&path, "/api/cluster/history");
        if (limit != NULL) {
            ah_buf_puts(&path, "?limit=");
            url_encode(&path, limit);
        }
    } else {
        fprintf(stderr, "agenthost ctl: unknown command \"%s\"\n%s", command, ctl_usage);
        ah_buf_free(&path);
        return 2;
    }
    if (wait != NULL && !is_command) {
        fprintf(stderr, "agenthost ctl: --wait applies to pause, resume and shutdown\n");
        ah_buf_free(&path);
        return 2;
    }
    if (wait != NULL) { /* the answer comes after the wait: give the request that long more */
        double seconds = strtod(wait, NULL);
        if (seconds > 0 && seconds <= 300 && timeout_s < seconds + 10) {
            timeout_s = seconds + 10;
        }
    }
    char err[AH_ERRLEN];
    char *body = NULL;
    int status =
        ah_ctl_request(host, port, method, path.data, token, timeout_s, &body, err, sizeof(err));
    ah_buf_free(&path);
    if (status < 0) {
        fprintf(stderr, "agenthost ctl: %s\n", err);
        return 1;
    }
    int rc = 0;
    if (status >= 200 && status <= 299 && strcmp(command, "agents") == 0 && !raw_json) {
        rc = ah_ctl_fleet_print_agents(body, stdout, stderr);
    } else {
        printf("%s\n", body);
    }
    if (status < 200 || status > 299) {
        fprintf(stderr, "agenthost ctl: the agent answered HTTP %d\n", status);
        rc = 1;
    } else if (wait != NULL) {
        rc = ah_ctl_fleet_wait_outcome(body, stderr);
    }
    free(body);
    return rc;
}
