/* ctl's one blocking request (ahc_request, the contract of ah_curl_request in ah_curl.h): an easy
 * handle, curl_easy_perform, the body collected into an ah_buf_t. */
#include "ahc.h"

#include "ah_common.h"
#include "ah_json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

typedef struct body_s {
    ah_buf_t buf;
    size_t max;
} body_t;

/* curl's write callback: appends to the body, up to its maximum. */
static size_t collect_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    body_t *b = userdata;
    size_t n = size * nmemb;
    if (b->buf.len + n > b->max) {
        return 0;
    }
    ah_buf_append(&b->buf, ptr, n);
    return ah_buf_ok(&b->buf) ? n : 0;
}

int ahc_request(const ah_curl_request_t *req, char **body, char *err, size_t errlen)
{
    *body = NULL;
    if (ahc_global_init() != AH_OK) {
        snprintf(err, errlen, "curl_global_init failed");
        return AH_EIO;
    }
    int rc = AH_EIO;
    body_t resp = {.max = req->max_body};
    ah_buf_init(&resp.buf);
    struct curl_slist *headers = NULL;
    CURL *curl = curl_easy_init();
    if (req->auth_header != NULL) {
        headers = curl_slist_append(NULL, req->auth_header);
    }
    if (curl == NULL || (req->auth_header != NULL && headers == NULL)) {
        snprintf(err, errlen, "out of memory");
        rc = AH_ENOMEM;
        goto out;
    }
    char curl_err[CURL_ERROR_SIZE] = "";
    curl_easy_setopt(curl, CURLOPT_URL, req->url);
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, curl_err);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, (long)(req->timeout_s * 1000.0) + 1);
    curl_easy_setopt(curl, CURLOPT_USERAGENT, req->user_agent);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, collect_body);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &resp);
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, req->tls_verify ? 1L : 0L);
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, req->tls_verify ? 2L : 0L);
    if (req->ca_file != NULL) {
        curl_easy_setopt(curl, CURLOPT_CAINFO, req->ca_file);
    }
    if (strcmp(req->method, "POST") == 0) {
        curl_easy_setopt(curl, CURLOPT_POST, 1L);
        curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, 0L);
        curl_easy_setopt(curl, CURLOPT_POSTFIELDS, "");
    }
    /* curl tries every address the name resolves to (IPv6 and IPv4, "happy eyeballs"). */
    CURLcode cc = curl_easy_perform(curl);
    if (cc != CURLE_OK) {
        snprintf(err, errlen, "%s: %s", req->url, curl_err[0] ? curl_err : curl_easy_strerror(cc));
        rc = cc == CURLE_OPERATION_TIMEDOUT ? AH_ETIMEOUT : AH_EIO;
        goto out;
    }
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    *body = strndup(resp.buf.data != NULL ? resp.buf.data : "", resp.buf.len);
    if (*body == NULL) {
        snprintf(err, errlen, "out of memory");
        rc = AH_ENOMEM;
        goto out;
    }
    rc = (int)status;
out:
    curl_slist_free_all(headers);
    if (curl != NULL) {
        curl_easy_cleanup(curl);
    }
    ah_buf_free(&resp.buf);
    return rc;
}
