/* Implementation of ah_ctl.h: argument parsing, URL building with percent-encoding, and one
 * blocking request through the libcurl plugin (ah_curl.h: the codebase's one HTTP client, shared
 * with agent.http, loaded only when a request is made). */
#include "ah_ctl.h"

#include "ah_common.h"
#include "ah_ctl_fleet.h"
#include "ah_curl.h"
#include "ah_json.h"
#include "ah_redact.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    "                              --selector S: only those matching S; --json: the raw answer)\n"
    "  scopes                      scope documents: selector, command, agents matched and held\n"
    "  leases                      every lease: owner, fencing token, expires in (--json: the\n"
    "                              raw answer)\n"
    "  reload                      reload the script of the agent at --url (exit 1 with the\n"
    "                              error if it fails to load; --wait S: wait up to S seconds\n"
    "                              for the outcome, default 10)\n"
    "\n"
    "options:\n"
    "  --url URL          agent API (default $AGENTHOST_URL, else http://127.0.0.1:$HTTP_PORT,\n"
    "                     port 8000 if unset)\n"
    "  --token TOKEN      bearer token (default $AGENT_API_TOKEN)\n"
    "  --cacert FILE      https: CA certificates to verify the server with (default\n"
    "                     $AGENTHOST_CACERT, else the system's)\n"
    "  --insecure         https: do not verify the server's certificate or name\n"
    "  --reason TEXT      why (pause/resume/shutdown)\n"
    "  --updated-by NAME  who (default: ctl)\n"
    "  --local            act on the agent at --url only (/api/agent/*)\n"
    "  --selector S       cluster command for the agents matching the label selector S only\n"
    "                     (e.g. 'region=eu,role in (ingest)'; a scope with its own version)\n"
    "  --if-version N     cluster command: only if the current version is N (else 409, exit 1)\n"
    "  --for DURATION     pause: end it automatically after 90s, 15m, 2h, ... (or seconds)\n"
    "  --until TIME       pause: end it automatically at an ISO 8601 UTC time\n"
    "  --drain DURATION   pause, shutdown (also --local): cancel the waits of the running call\n"
    "                     after 90s, 2m, ... so the command applies by then\n"
    "  --wait SECONDS     cluster command: answer once every live agent applied it (exit 0),\n"
    "                     or after SECONDS listing the stragglers (exit 1); reload: wait up to\n"
    "                     SECONDS for the outcome (exit 1 if it is still pending)\n"
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

/* True when s has a character that must never reach a request line or a header: CR, LF, NUL
 * or another control character (a header injection). */
static bool has_control_chars(const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p < 0x20 || *p == 0x7f) {
            return true;
        }
    }
    return false;
}

/* Parses http[s]://[USER[:PASSWORD]@]HOST[:PORT][/] (HOST may be [IPv6]) into host (size n)
 * and port (default 80, 443 for https). */
static int parse_url(const char *url, char *host, size_t n, int *port)
{
    bool tls = strncmp(url, "https://", 8) == 0;
    if ((!tls && strncmp(url, "http://", 7) != 0) || has_control_chars(url)) {
        return AH_EINVAL;
    }
    const char *p = url + (tls ? 8 : 7);
    const char *at = strchr(p, '@');
    if (at != NULL && at < p + strcspn(p, "/")) {
        p = at + 1; /* user info: curl sends it as basic authentication (a proxy's) */
    }
    size_t len = *p == '[' ? strcspn(p, "]") + 1 : strcspn(p, ":/");
    if (*p == '[' && p[len - 1] != ']') {
        return AH_EINVAL;
    }
    if (len == 0 || len >= n) {
        return AH_EINVAL;
    }
    memcpy(host, p, len);
    host[len] = '\0';
    p += len;
    *port = tls ? 443 : 80;
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

int ah_ctl_request(const ah_ctl_target_t *to, const char *method, const char *path, char **body,
                   char *err, size_t errlen)
{
    const char *base_url = to->base_url;
    const char *token = to->token;
    *body = NULL;
    if (has_control_chars(base_url) || has_control_chars(path)) {
        snprintf(err, errlen, "the URL contains CR, LF or another control character");
        return AH_EINVAL;
    }
    if (token != NULL && has_control_chars(token)) {
        snprintf(err, errlen, "the token contains CR, LF or another control character");
        return AH_EINVAL;
    }
    ah_buf_t url, auth;
    ah_buf_init(&url);
    ah_buf_init(&auth);
    size_t base_len = strlen(base_url);
    ah_buf_append(&url, base_url,
                  base_len > 0 && base_url[base_len - 1] == '/' ? base_len - 1 : base_len);
    ah_buf_puts(&url, path);
    bool with_token = token != NULL && token[0] != '\0';
    if (with_token) {
        ah_buf_printf(&auth, "Authorization: Bearer %s", token);
    }
    int rc;
    if (!ah_buf_ok(&url) || !ah_buf_ok(&auth)) {
        snprintf(err, errlen, "out of memory");
        rc = AH_ENOMEM;
    } else {
        ah_curl_request_t req = {
            .url = url.data,
            .method = method,
            .auth_header = with_token ? auth.data : NULL,
            .user_agent = "agenthost-ctl/" AH_VERSION,
            .timeout_s = to->timeout_s,
            .max_body = 16u << 20,
            .ca_file = to->ca_file,
            .tls_verify = !to->insecure,
        };
        rc = ah_curl_request(&req, body, err, errlen);
    }
    ah_buf_free(&url);
    ah_buf_free(&auth);
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
    const char *drain = NULL;          /* --drain: passed through (cluster and local) */
    const char *wait = NULL;           /* --wait: passed through; the answer decides the exit */
    const char *agents_version = NULL; /* ctl agents --version */
    const char *selector = NULL;       /* --selector: a scoped command, or ctl agents' filter */
    const char *ca_file = getenv("AGENTHOST_CACERT");
    bool insecure = false;
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
        } else if (strcmp(a, "--insecure") == 0) {
            insecure = true;
            continue;
        } else if (strcmp(a, "--cacert") == 0) {
            slot = &ca_file;
        } else if (strcmp(a, "--wait") == 0) {
            slot = &wait;
        } else if (strcmp(a, "--version") == 0) {
            slot = &agents_version;
        } else if (strcmp(a, "--selector") == 0) {
            slot = &selector;
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
        } else if (strcmp(a, "--drain") == 0) {
            slot = &drain;
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
    /* Whatever ctl prints (its errors, the agent's answer) shows neither the token nor the
     * URL's credentials. */
    ah_redact_add_secret(token);
    ah_redact_add_uri(url);
    char host[256];
    int port;
    if (token != NULL && has_control_chars(token)) {
        fprintf(stderr, "agenthost ctl: the token (--token or AGENT_API_TOKEN) contains CR, LF or "
                        "another control character\n");
        return 2;
    }
    if (parse_url(url, host, sizeof(host), &port) != AH_OK) {
        char shown[512];
        fprintf(stderr,
                "agenthost ctl: invalid --url \"%s\" (expected http://HOST[:PORT] or "
                "https://HOST[:PORT])\n",
                ah_redact_uri(url, shown, sizeof(shown)));
        return 2;
    }

    if (local && (strcmp(command, "stats") == 0 || strcmp(command, "history") == 0 ||
                  strcmp(command, "agents") == 0 || strcmp(command, "scopes") == 0 ||
                  strcmp(command, "leases") == 0)) {
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
        if (drain != NULL) {
            ah_buf_puts(&path, "&drain=");
            url_encode(&path, drain);
        }
        const struct {
            const char *name;
            const char *value;
        } options[] = {{"selector", selector},
                       {"if_version", if_version},
                       {"for", pause_for},
                       {"until", pause_until},
                       {"wait", wait}};
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
    } else if (strcmp(command, "reload") == 0) {
        method = "POST";
        ah_buf_puts(&path, "/api/agent/reload");
        if (wait != NULL) {
            ah_buf_puts(&path, "?wait=");
            url_encode(&path, wait);
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
        if (selector != NULL) {
            ah_buf_puts(&path, agents_version != NULL ? "&selector=" : "?selector=");
            url_encode(&path, selector);
        }
    } else if (strcmp(command, "scopes") == 0) {
        ah_buf_puts(&path, "/api/cluster/scopes");
    } else if (strcmp(command, "leases") == 0) {
        ah_buf_puts(&path, "/api/cluster/leases");
    } else if (strcmp(command, "history") == 0) {
        ah_buf_puts(&path, "/api/cluster/history");
        if (limit != NULL) {
            ah_buf_puts(&path, "?limit=");
            url_encode(&path, limit);
        }
    } else {
        static const char *const commands[] = {"pause",   "resume", "shutdown", "state", "stats",
                                               "history", "agents", "reload",   NULL};
        const char *meant = ah_suggest(command, commands, NULL);
        char hint[64] = "";
        if (meant != NULL) {
            snprintf(hint, sizeof(hint), " (did you mean \"%s\"?)", meant);
        }
        fprintf(stderr, "agenthost ctl: unknown command \"%s\"%s\n%s", command, hint, ctl_usage);
        ah_buf_free(&path);
        return 2;
    }
    if (drain != NULL && strcmp(command, "pause") != 0 && strcmp(command, "shutdown") != 0) {
        fprintf(stderr, "agenthost ctl: --drain applies to pause and shutdown\n");
        ah_buf_free(&path);
        return 2;
    }
    bool is_reload = strcmp(command, "reload") == 0;
    if (wait != NULL && !is_command && !is_reload) {
        fprintf(stderr, "agenthost ctl: --wait applies to pause, resume, shutdown and reload\n");
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
    if (ca_file != NULL && ca_file[0] == '\0') {
        ca_file = NULL;
    }
    ah_ctl_target_t target = {
        .base_url = url,
        .token = token,
        .ca_file = ca_file,
        .insecure = insecure,
        .timeout_s = timeout_s,
    };
    int status = ah_ctl_request(&target, method, path.data, &body, err, sizeof(err));
    ah_buf_free(&path);
    if (status < 0) {
        char shown[AH_ERRLEN * 2];
        fprintf(stderr, "agenthost ctl: %s\n", ah_redact_text(err, shown, sizeof(shown)));
        return status == AH_EINVAL ? 2 : 1;
    }
    char *shown = ah_redact_dup(body);
    if (shown != NULL) {
        free(body);
        body = shown;
    }
    int rc = 0;
    if (status >= 200 && status <= 299 && strcmp(command, "agents") == 0 && !raw_json) {
        rc = ah_ctl_fleet_print_agents(body, stdout, stderr);
    } else if (status >= 200 && status <= 299 && strcmp(command, "scopes") == 0 && !raw_json) {
        rc = ah_ctl_fleet_print_scopes(body, stdout, stderr);
    } else if (status >= 200 && status <= 299 && strcmp(command, "leases") == 0 && !raw_json) {
        rc = ah_ctl_fleet_print_leases(body, stdout, stderr);
    } else {
        printf("%s\n", body);
    }
    if (status < 200 || status > 299) {
        fprintf(stderr, "agenthost ctl: the agent answered HTTP %d\n", status);
        rc = 1;
    } else if (is_reload && status == 202) {
        /* No outcome yet (the current batch still runs): only a wait that asked for it fails. */
        fprintf(stderr, "agenthost ctl: the reload is still pending (it runs after the current "
                        "batch)\n");
        rc = wait != NULL ? 1 : 0;
    } else if (wait != NULL && !is_reload) {
        rc = ah_ctl_fleet_wait_outcome(body, stderr);
    }
    free(body);
    return rc;
}
