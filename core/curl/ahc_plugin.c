/* The libcurl plugin's single exported symbol: the function table the core finds with dlsym
 * (ah_curl_plugin.h). Everything else in agenthost_curl.so has hidden visibility. */
#include "ahc.h"

#include <curl/curl.h>

#ifndef AH_VERSION
#error "AH_VERSION must be defined by the build"
#endif

static const char *curl_version_string(void)
{
    return curl_version_info(CURLVERSION_NOW)->version;
}

__attribute__((visibility("default"))) const ah_curl_plugin_t ah_curl_plugin_v1 = {
    .header = {.abi_version = AH_CURL_PLUGIN_ABI, .build_version = AH_VERSION},
    .lua_http_open = ahc_lua_http_open,
    .request = ahc_request,
    .curl_version = curl_version_string,
};
