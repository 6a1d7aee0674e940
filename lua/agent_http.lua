--[[ agent.http: an HTTP client whose requests suspend only the calling task; the worker's loop
drives every transfer through libcurl's multi interface (core/ah_lua_http.c). Reference:
docs/LUA.md.

  agent.http.request{method, url, headers, query, body | json, timeout, connect_timeout,
                     max_body, follow_redirects, tls_verify, ca_file}
  agent.http.get(url [, opts])
  agent.http.post(url, body_or_table [, opts])      -- a table is sent as JSON

Each returns {status, headers (lower-case names), body}; any HTTP status is a response. A failure
returns nil, msg, code ("timeout", "connect", "resolve", "tls", "too_large", "redirects", "io",
"cancelled"); misuse raises. ]]
local core = require "agent.http.core"
local json = require "cjson"

local pairs, type, error = pairs, type, error

local M = {}

-- headers + Content-Type: application/json unless the caller set a content type.
local function with_json_type(headers)
    local out = {}
    if headers ~= nil then
        if type(headers) ~= "table" then
            error("agent.http: headers must be a table of name = value", 3)
        end
        for k, v in pairs(headers) do
            if type(k) == "string" and k:lower() == "content-type" then
                return headers
            end
            out[k] = v
        end
    end
    out["Content-Type"] = "application/json"
    return out
end

local function request(opts)
    if type(opts) ~= "table" then
        error("agent.http.request: expects a table of options", 2)
    end
    local body, headers = opts.body, opts.headers
    if opts.json ~= nil then
        if body ~= nil then
            error("agent.http.request: give body or json, not both", 2)
        end
        body = json.encode(opts.json)
        headers = with_json_type(headers)
    elseif body ~= nil and type(body) ~= "string" then
        error("agent.http.request: body must be a string (use json for a table)", 2)
    end
    local transfer, msg, code = core.start(opts, body, headers)
    if not transfer then
        return nil, msg, code -- the call's waits are already cancelled
    end
    local ok
    ok, msg, code = core.wait(transfer)
    if not ok then
        core.release(transfer)
        return nil, msg, code
    end
    return core.result(transfer)
end
M.request = request

local function copy(opts, name)
    local out = {}
    if opts ~= nil then
        if type(opts) ~= "table" then
            error("agent.http." .. name .. ": options must be a table", 3)
        end
        for k, v in pairs(opts) do
            out[k] = v
        end
    end
    return out
end

function M.get(url, opts)
    local o = copy(opts, "get")
    o.url = url
    o.method = o.method or "GET"
    return request(o)
end

function M.post(url, body, opts)
    local o = copy(opts, "post")
    o.url = url
    o.method = o.method or "POST"
    if type(body) == "table" then
        o.json = body
    else
        o.body = body
    end
    return request(o)
end

return M
