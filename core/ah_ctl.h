/* `agenthost ctl`: a small HTTP client for the agent API, usable from CronJobs and scripts. */
#ifndef AH_CTL_H
#define AH_CTL_H

#include <stdbool.h>
#include <stddef.h>

/* Runs `agenthost ctl ARGS...` (argv[0] is the command name, e.g. "pause"). Prints the JSON
 * answer on stdout. Returns the exit code: 0 on a 2xx answer, 1 on an HTTP error or when the
 * agent cannot be reached (message on stderr), 2 on bad usage. */
int ah_ctl_main(int argc, char **argv);

/* Where and how ctl talks to an agent. */
typedef struct ah_ctl_target_s {
    const char *base_url; /* http://HOST[:PORT] or https://HOST[:PORT] */
    const char *token;    /* bearer token, or NULL */
    const char *ca_file;  /* https: CA bundle that signed the server's certificate (NULL: the
                             system's) */
    bool insecure;        /* https: no certificate or host name check */
    double timeout_s;     /* the whole request */
} ah_ctl_target_t;

/* Performs one request (the libcurl plugin, ah_curl.h; every resolved address tried) to
 * to->base_url + path. Returns the status code (>0) and a malloc'd body in *body (caller frees),
 * or a negative AH_E* with err set: AH_EINVAL when the URL, path or token contains CR, LF or
 * another control character (nothing is sent). */
int ah_ctl_request(const ah_ctl_target_t *to, const char *method, const char *path, char **body,
                   char *err, size_t errlen);

#endif
