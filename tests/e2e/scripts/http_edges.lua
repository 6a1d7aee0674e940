--[[ Fixture: the edges of agent.http (tests/e2e/test_http_client_edges.py) against the tests'
local servers. Records the outcome of each request as a JSON line in $EVENTS_FILE. Knobs:
  EVENTS_FILE  where to append the records (required)
  MODE         header_case | timeout | max_body | tls_host | reuse | server_closes | retries |
               closed_seen | closed_unseen | shut_after | closed_while_paused | core_misuse
  BASE         the plain HTTP server, http://127.0.0.1:PORT
  TLS_PORT     the HTTPS server's port (tls_host, reuse); its certificate names only
               DNS:localhost
  CA_FILE      that certificate (tls_host, reuse)
  MARKER       a file the server (closed_unseen) or the test (closed_while_paused) writes once
               it has closed the idle connections
The first batch does the work of MODE; later batches sleep a little and return 0
(closed_while_paused: see there). ]]
local agent = require "agent"
local fixture = require "lib.fixture"
local http = require "agent.http"

local events_file = assert(agent.env("EVENTS_FILE"), "EVENTS_FILE is required")
local mode = agent.env("MODE", "header_case")
local base = agent.env("BASE", "")

local record = fixture.recorder(events_file)

-- Records one request's outcome under name: status, headers and body size, or the error.
local function outcome(name, t0, res, msg, code)
    local rec = {ev = name, elapsed = agent.monotonic() - t0}
    if res then
        rec.status, rec.headers, rec.size = res.status, res.headers, #res.body
    else
        rec.err, rec.code = msg, code
    end
    record(rec)
end

local function request(name, url, opts)
    local t0 = agent.monotonic()
    outcome(name, t0, http.get(url, opts))
end

local modes = {}

function modes.header_case()
    request("zone", base .. "/header?name=X-Zone&value=z")
end

function modes.timeout()
    request("hang", base .. "/hang", {timeout = 0.5})
end

function modes.max_body()
    local cap = {max_body = 1000000}
    request("chunked_over", base .. "/chunked?size=1000001", cap)
    request("chunked_exact", base .. "/chunked?size=1000000", cap)
    request("length_over", base .. "/bytes?size=1000001", cap)
    request("length_exact", base .. "/bytes?size=1000000", cap)
end

function modes.tls_host()
    local port = agent.env("TLS_PORT", "1")
    local opts = {ca_file = agent.env("CA_FILE", "")}
    request("by_name", "https://localhost:" .. port .. "/status/200", opts)
    request("by_address", "https://127.0.0.1:" .. port .. "/status/200", opts)
end

-- One task makes requests one after the other, so each reuses the transfer (and easy handle)
-- the previous one left: nothing of a request may reach the next (method, body, headers,
-- query, timeout, max_body, follow_redirects, ca_file, tls_verify), after a success, a failure,
-- a timeout or a cancelled request alike. Records every outcome with the /echo answer decoded.
function modes.reuse()
    local tls = "https://localhost:" .. agent.env("TLS_PORT", "1") .. "/status/200"
    local function step(name, res, msg, code)
        local rec = {ev = name}
        if res then
            rec.status, rec.size, rec.headers = res.status, #res.body, res.headers
            local ok, echo = pcall(agent.json.decode, res.body)
            if ok and type(echo) == "table" then
                rec.echo = echo
            end
        else
            rec.err, rec.code = msg, code
        end
        record(rec)
    end
    step("put", http.request{method = "PUT", url = base .. "/echo", body = "abc",
                             headers = {["X-One"] = "1"}})
    step("get_after_put", http.get(base .. "/echo"))
    step("headers_after_put", http.get(base .. "/headers"))
    step("head", http.request{method = "HEAD", url = base .. "/echo"})
    step("get_after_head", http.get(base .. "/echo"))
    step("post_json", http.post(base .. "/echo", {a = 1}))
    step("get_after_post", http.get(base .. "/echo"))
    step("query", http.get(base .. "/echo", {query = {a = "1"}}))
    step("no_query", http.get(base .. "/echo"))
    step("short_timeout", http.get(base .. "/slow?ms=3000", {timeout = 0.5}))
    step("after_timeout", http.get(base .. "/slow?ms=1500"))
    step("small_max_body", http.get(base .. "/bytes?size=100", {max_body = 10}))
    step("after_max_body", http.get(base .. "/bytes?size=1000"))
    step("no_follow", http.get(base .. "/redirect?n=1", {follow_redirects = false}))
    step("follow", http.get(base .. "/redirect?n=2"))
    step("after_follow", http.get(base .. "/echo"))
    step("refused", http.get("http://127.0.0.1:" .. agent.env("CLOSED_PORT", "1") .. "/"))
    step("after_refused", http.get(base .. "/echo"))
    -- a request cancelled in flight (task:cancel) gives its transfer back too
    local t = agent.spawn(function()
        return http.get(base .. "/slow?ms=5000")
    end)
    agent.sleep(0.3)
    t:cancel()
    local ok, res, msg, code = t:join()
    step("cancelled", res, msg, code)
    step("after_cancel", http.get(base .. "/echo"))
    step("tls_with_ca_file", http.get(tls, {ca_file = agent.env("CA_FILE", "")}))
    step("tls_without_ca_file", http.get(tls))
    step("tls_unverified", http.get(tls, {tls_verify = false}))
    step("tls_verified_again", http.get(tls))
end

-- The server closes each connection right after its answer, unannounced: every next request
-- finds its kept connection dead (at curl's check before the reuse, or when it is sent) and
-- must still get its answer, on a new connection.
function modes.server_closes()
    for i = 1, 30 do
        local t0 = agent.monotonic()
        outcome("close_" .. i, t0, http.get(base .. "/close"))
        outcome("next_" .. i, t0, http.get(base .. "/conn"))
    end
end

-- Every request but the first is sent on a kept connection that the server then closes without
-- answering: curl retries it on a new connection. Each request has curl's own retries, however
-- many requests before it retried on the same transfer.
function modes.retries()
    for i = 1, 8 do
        local t0 = agent.monotonic()
        outcome("retried_" .. i, t0, http.get(base .. "/drop-second"))
    end
end

-- The C half (agent.http.core) checks what it is given as a transfer: a table, another
-- userdata, nothing and a released transfer are refused with an error naming the problem.
function modes.core_misuse()
    local core = require "agent.http.core"
    local function err(f, ...)
        local ok, e = pcall(f, ...)
        return ok and "no error" or tostring(e)
    end
    record({ev = "table", err = err(core.wait, {})})
    record({ev = "other_userdata", err = err(core.result, io.stdout)})
    record({ev = "nothing", err = err(core.release)})
    local t = core.start({url = base .. "/status/200"}, nil, nil)
    assert(core.wait(t))
    local res = core.result(t)
    record({ev = "answered", status = res.status, body = res.body})
    record({ev = "released", err = err(core.wait, t)})
end

-- Opens n connections at once (n tasks, each a slow request): the client then keeps n idle.
local function open_connections(n)
    local tasks = {}
    for i = 1, n do
        tasks[i] = agent.spawn(http.get, base .. "/slow?ms=300")
    end
    for i = 1, n do
        local t0 = agent.monotonic()
        local _, res, msg, code = tasks[i]:join()
        outcome("open_" .. i, t0, res, msg, code)
    end
end

local function requests_after(n)
    for i = 1, n do
        request("after_" .. i, base .. "/conn")
    end
end

-- Whether the file MARKER exists (no wait: the loop does not run).
local function marker_written()
    local f = io.open(agent.env("MARKER", ""))
    if f then
        f:close()
    end
    return f ~= nil
end

-- The server closes its side of the kept connections while the loop watches them (the idle
-- ones' ends of stream are sent before the answer to /shut-idle, the asking one's with it, and
-- the task then waits a moment): no later request is sent on one of them.
function modes.closed_seen()
    open_connections(6)
    request("shut", base .. "/shut-idle")
    agent.sleep(0.2)
    requests_after(6)
end

-- The same, but the ends of stream arrive while Lua code runs and the loop does not look: its
-- last view of the sockets is too old to answer curl's check then (the socket is asked).
function modes.closed_unseen()
    open_connections(6)
    request("shut", base .. "/shut-idle",
            {query = {delay_ms = "30", marker = agent.env("MARKER", "")}})
    local deadline = agent.monotonic() + 20
    while not marker_written() and agent.monotonic() < deadline do -- busy: no wait
    end
    local t = agent.monotonic()
    while agent.monotonic() - t < 0.05 do -- the ends of stream reach the sockets meanwhile
    end
    requests_after(6)
end

-- Every answer ends with the server's end of stream in the same segment: each next request,
-- made at once, goes to a new connection, never to the closed one.
function modes.shut_after()
    for i = 1, 10 do
        request("shut_" .. i, base .. "/shut-after")
    end
end

-- closed_while_paused, over several batches: the first opens the connections and records
-- "opened"; the next ones return at once (the loop does not run) until MARKER exists (the test
-- paused the agent, had the server close the idle connections, wrote MARKER, resumed), then
-- make their requests and record "done".
local paused_step = "open"

local function closed_while_paused()
    if paused_step == "open" then
        open_connections(6)
        record({ev = "opened"})
        paused_step = "wait"
        return 1
    elseif paused_step == "wait" then
        if not marker_written() then
            return 0
        end
        requests_after(6)
        record({ev = "done"})
        paused_step = "done"
        return 1
    end
    agent.sleep(0.05)
    return 0
end

local M = {}

local first_batch = fixture.first_batch(function()
    modes[mode]()
    record({ev = "done"})
end)

M.batch = mode == "closed_while_paused" and closed_while_paused or first_batch

return M
