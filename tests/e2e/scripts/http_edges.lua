--[[ Fixture: the edges of agent.http (tests/e2e/test_http_client_edges.py) against the tests'
local servers. Records the outcome of each request as a JSON line in $EVENTS_FILE. Knobs:
  EVENTS_FILE  where to append the records (required)
  MODE         header_case | timeout | max_body | tls_host
  BASE         the plain HTTP server, http://127.0.0.1:PORT
  TLS_PORT     the HTTPS server's port (tls_host); its certificate names only DNS:localhost
  CA_FILE      that certificate (tls_host)
The first batch does the work of MODE; later batches sleep a little and return 0. ]]
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

local M = {}

M.batch = fixture.first_batch(function()
    modes[mode]()
    record({ev = "done"})
end)

return M
