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
local agent_core = require "agent.core"
local json = require "cjson"

local pairs, ipairs, type, error, tostring, format, sub, find =
    pairs, ipairs, type, error, tostring, string.format, string.sub, string.find

local M = {}

-- The options of agent.http.request (get and post take the same, url and body aside).
local OPTIONS = { "method", "url", "headers", "query", "body", "json", "timeout",
                  "connect_timeout", "max_body", "follow_redirects", "tls_verify", "ca_file" }
local KNOWN = {}
for _, name in pairs(OPTIONS) do
    KNOWN[name] = true
end
local SECONDS = { "timeout", "connect_timeout" }
local BOOLEANS = { "follow_redirects", "tls_verify" }
-- Method names that are tokens (the pattern below), so that the usual ones skip the match.
local TOKEN_METHODS = { GET = true, HEAD = true, POST = true, PUT = true, DELETE = true,
                        PATCH = true, OPTIONS = true }

local function shown(v)
    return type(v) == "string" and format("%q", v) or tostring(v)
end

-- Raises "agent.http.<fname>: <what> (got <type> <value>)" at the script's line (level: the
-- script's stack level seen from check).
local function bad(fname, level, what, v)
    error(format("agent.http.%s: %s (got %s %s)", fname, what, type(v), shown(v)), level + 1)
end

-- Checks every option before anything is sent; a misuse raises at the script's line (level:
-- the script's stack level seen from here), naming agent.http.<fname> and the option, as
-- agent.mongo does. Runtime failures are returned by request, never raised. Returns the body to
-- send (the JSON encoding of json, or body).
local function check(fname, o, level)
    for k in pairs(o) do
        if not KNOWN[k] then
            local meant = type(k) == "string" and agent_core.suggest(k, OPTIONS)
            error(format("agent.http.%s: unknown option '%s'%s", fname, tostring(k),
                         meant and format(" (did you mean '%s'?)", meant) or ""), level)
        end
    end
    local url = o.url
    if type(url) ~= "string" or not (sub(url, 1, 7) == "http://" or sub(url, 1, 8) == "https://") then
        bad(fname, level, "url must be a string starting with http:// or https://", url)
    end
    local method = o.method
    if method ~= nil and not TOKEN_METHODS[method] and
        (type(method) ~= "string" or not find(method, "^[%w!#%$%%&'%*%+%.%^_`|~%-]+$")) then
        bad(fname, level, "method must be an HTTP method name such as \"GET\"", method)
    end
    for _, name in ipairs(SECONDS) do
        local v = o[name]
        if v ~= nil and (type(v) ~= "number" or not (v > 0) or v == math.huge) then
            bad(fname, level, name .. " must be a number of seconds > 0", v)
        end
    end
    if o.max_body ~= nil and (type(o.max_body) ~= "number" or not (o.max_body >= 0)) then
        bad(fname, level, "max_body must be a number of bytes >= 0", o.max_body)
    end
    for _, name in ipairs(BOOLEANS) do
        if o[name] ~= nil and type(o[name]) ~= "boolean" then
            bad(fname, level, name .. " must be a boolean", o[name])
        end
    end
    if o.ca_file ~= nil and type(o.ca_file) ~= "string" then
        bad(fname, level, "ca_file must be a path", o.ca_file)
    end
    if o.headers ~= nil then
        if type(o.headers) ~= "table" then
            bad(fname, level, "headers must be a table of name = value", o.headers)
        end
        for k, v in pairs(o.headers) do
            if type(k) ~= "string" then
                bad(fname, level, "header names must be strings", k)
            end
            if type(v) ~= "string" and type(v) ~= "number" then
                bad(fname, level, "header " .. k .. " must be a string or a number", v)
            end
        end
    end
    if o.query ~= nil then
        if type(o.query) ~= "table" then
            bad(fname, level, "query must be a table of name = value", o.query)
        end
        for k, v in pairs(o.query) do
            local vt = type(v)
            if type(k) ~= "string" or (vt ~= "string" and vt ~= "number" and vt ~= "boolean") then
                bad(fname, level, "query must map strings to strings, numbers or booleans", v)
            end
        end
    end
    if o.json ~= nil then
        if o.body ~= nil then
            error(format("agent.http.%s: give body or json, not both", fname), level)
        end
        local ok, encoded = pcall(json.encode, o.json)
        if not ok then
            error(format("agent.http.%s: the body cannot be encoded as JSON: %s", fname,
                         tostring(encoded):gsub("^.-:%d+: ", "")), level)
        end
        return encoded
    elseif o.body ~= nil and type(o.body) ~= "string" then
        bad(fname, level, "body must be a string (use json for a table)", o.body)
    end
    return o.body
end

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

-- Sends opts (already checked, body prepared by check) and waits for the answer.
local function send(opts, body)
    local headers = opts.headers
    if opts.json ~= nil then
        headers = with_json_type(headers)
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

function M.request(opts)
    if type(opts) ~= "table" then
        error("agent.http.request: expects a table of options", 2)
    end
    local body = check("request", opts, 3)
    local r, msg, code = send(opts, body) -- not a tail call: the levels above stay as they are
    return r, msg, code
end

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
    local o
    if opts == nil then
        o = { url = url, method = "GET" }
    else
        o = copy(opts, "get")
        o.url = url
        o.method = o.method or "GET"
    end
    local b = check("get", o, 3)
    local r, msg, code = send(o, b)
    return r, msg, code
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
    local b = check("post", o, 3)
    local r, msg, code = send(o, b)
    return r, msg, code
end

return M
