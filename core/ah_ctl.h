/* `agenthost ctl`: a small HTTP client for the agent API, usable from CronJobs and scripts. */
#ifndef AH_CTL_H
#define AH_CTL_H

#include <stddef.h>

/* Runs `agenthost ctl ARGS...` (argv[0] is the command name, e.g. "pause"). Prints the JSON
 * answer on stdout. Returns the exit code: 0 on a 2xx answer, 1 on an HTTP error or when the
 * agent cannot be reached (message on stderr), 2 on bad usage. */
int ah_ctl_main(int argc, char **argv);

/* Performs one request (the libcurl plugin, ah_curl.h; every resolved address tried) to base_url +
 * path within timeout_s. Returns the status code (>0) and a malloc'd body in *body (caller frees),
 * or a negative AH_E* with err set: AH_EINVAL when the URL, path or token contains CR, LF or
 * another control character (nothing is sent). token may be NULL. */
int ah_ctl_request(const char *base_url, const char *method, const char *path, const char *token,
                   double timeout_s, char **body, char *err, size_t errlen);

#endif
