--[[ Fixture: agent.http against the tests' local server. Records results as JSON lines in
$EVENTS_FILE. Knobs (environment):
  EVENTS_FILE  where to append the records (required)
  BASE         the plain HTTP server, e.g. http://127.0.0.1:PORT
  TLS_BASE     the HTTPS server with a self-signed certificate (suite mode)
  CA_FILE      that certificate (suite mode)
  MODE         suite | proxy | hang | hang_shutdown | webhook
The first batch does the work of MODE; later batches sleep a little and return 0. ]]
local agent = require "agent"
local fixture = require "lib.fixture"
local http = require "agent.http"

local events_file = assert(agent.env("EVENTS_FILE"), "EVENTS_FILE is required")
local base = agent.env("BASE", "")
local tls_base = agent.env("TLS_BASE", "")
local ca_file = agent.env("CA_FILE", "")
local mode = agent.env("MODE", "suite")

local record = fixture.recorder(events_file)

-- Records the outcome of one request under `name`: status, headers, body size, or the error.
local function outcome(name, res, msg, code, extra)
    local rec = {ev = name}
    if res then
        rec.status, rec.headers, rec.size = res.status, res.headers, #res.body
        rec.body = #res.body <= 4096 and res.body or nil
    else
        rec.err, rec.code = msg, code
    end
    for k, v in pairs(extra or {}) do
        rec[k] = v
    end
    record(rec)
end

local suite = {}

function suite.statuses()
    for _, s in ipairs({200, 201, 204, 404, 500, 503}) do
        local res, msg, code = http.get(base .. "/status/" .. s)
        outcome("status", res, msg, code, {asked = s})
    end
end

function suite.headers()
    outcome("headers", http.request{url = base .. "/headers",
                                    headers = {["X-Agent"] = "a1", Accept = "text/plain"}})
end

function suite.json_post()
    outcome("json_post", http.post(base .. "/echo", {items = {1, 2, 3}, name = "n"},
                                   {query = {page = 2, q = "a b&c"}}))
    outcome("put_body", http.request{method = "PUT", url = base .. "/echo", body = "raw",
                                     headers = {["Content-Type"] = "text/plain"}})
end

function suite.bodies()
    outcome("large", http.get(base .. "/bytes?size=" .. 8 * 1024 * 1024))
    outcome("chunked", http.get(base .. "/chunked?size=" .. 3 * 1024 * 1024 + 17))
    outcome("too_large", http.get(base .. "/bytes?size=2000000", {max_body = 1000000}))
    outcome("too_large_chunked", http.get(base .. "/chunked?size=2000000", {max_body = 1000000}))
end

function suite.failures()
    outcome("refused", http.get("http://127.0.0.1:" .. agent.env("CLOSED_PORT", "1") .. "/"))
    outcome("dns", http.get("http://no-such-host.invalid/"))
end

function suite.redirects()
    outcome("redirect", http.get(base .. "/redirect?n=3"))
    outcome("redirect_off", http.get(base .. "/redirect?n=3", {follow_redirects = false}))
    outcome("redirect_loop", http.get(base .. "/redirect?n=50"))
end

function suite.keepalive()
    local ports = {}
    for i = 1, 5 do
        local res = http.get(base .. "/conn")
        ports[#ports + 1] = res and res.body or "error"
    end
    record({ev = "keepalive", ports = ports})
end

function suite.tls()
    outcome("tls_default", http.get(tls_base .. "/status/200"))
    outcome("tls_noverify", http.get(tls_base .. "/status/200", {tls_verify = false}))
    outcome("tls_cafile", http.get(tls_base .. "/status/200", {ca_file = ca_file}))
end

function suite.misuse()
    local checks = {
        function() return http.request("x") end,
        function() return http.get("ftp://x/") end,
        function() return http.get(base .. "/", {headers = {["X-Bad"] = "a\r\nInjected: 1"}}) end,
        function() return http.get(base .. "/", {timeout = -1}) end,
        function() return http.request{url = base .. "/", body = "a", json = {}} end,
        function()
            return coroutine.wrap(function() return http.get(base .. "/status/200") end)()
        end,
    }
    local errors = {}
    for i, f in ipairs(checks) do
        local ok, err = pcall(f)
        errors[i] = ok and "no error" or tostring(err)
    end
    record({ev = "misuse", errors = errors})
end

function suite.concurrent()
    local tasks = {}
    for i = 1, 20 do
        tasks[i] = agent.spawn(function() return http.get(base .. "/status/200") end)
    end
    local ok_count = 0
    for i = 1, 20 do
        local ok, res = tasks[i]:join()
        if ok and res and res.status == 200 then
            ok_count = ok_count + 1
        end
    end
    record({ev = "concurrent", ok = ok_count})
end

local order = {"statuses", "headers", "json_post", "bodies", "failures", "redirects", "keepalive",
               "tls", "misuse", "concurrent"}

local first = true
local M = {}

function M.batch()
    if not first then
        agent.sleep(0.05)
        return 0
    end
    first = false
    if mode == "suite" then
        for _, name in ipairs(order) do
            suite[name]()
        end
        record({ev = "suite_done"})
    elseif mode == "proxy" then
        -- http_proxy points at the test server: a name that resolves nowhere still answers
        outcome("proxied", http.get("http://through-the-proxy.invalid/status/201"))
        -- no_proxy lists 127.0.0.1: this one goes direct (CLOSED_PORT: nobody listens)
        outcome("direct", http.get("http://127.0.0.1:" .. agent.env("CLOSED_PORT", "1") .. "/"))
    elseif mode == "hang" or mode == "hang_shutdown" then
        record({ev = "hang_start"})
        local t0 = agent.monotonic()
        local res, msg, code = http.get(base .. "/hang", {timeout = 600})
        outcome("hang", res, msg, code, {elapsed = agent.monotonic() - t0})
    end
    return 1
end

function M.on_pause(ev)
    if mode == "webhook" then
        outcome("webhook", http.post(base .. "/echo", {event = ev.command, reason = ev.reason}))
    end
end

function M.on_shutdown()
    record({ev = "on_shutdown"})
end

return M
