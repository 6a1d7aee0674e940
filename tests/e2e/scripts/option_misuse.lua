--[[ Fixture for tests/e2e/test_lua_options.py: each misuse of agent.http and agent.queue, on its
own line of check(), raised at that line; init logs "misuse <n>: <error>" for each (check() is
called from pcall, so the position in the message is the script's own line). ]]
local agent = require "agent"
local http = require "agent.http"

local U = "http://127.0.0.1:9/"
local cyclic = {}
cyclic.self = cyclic

local checks = {
    function() local r = http.get(U, { timout = 1 }); return r end, -- line 12
    function() local r = http.get(U, { timeout = "10" }); return r end,
    function() local r = http.get("127.0.0.1/x"); return r end,
    function() local r = http.request { url = U, method = 5 }; return r end,
    function() local r = http.get(U, { headers = { 1, 2 } }); return r end,
    function() local r = http.get(U, { query = "a=1" }); return r end,
    function() local r = http.get(U, { max_body = "big" }); return r end,
    function() local r = http.post(U, { bad = function() end }); return r end,
    function() local r = http.post(U, cyclic); return r end,
    function() local r = http.request { url = U, folow_redirects = false }; return r end,
    function() local q = agent.queue.open { colection = "qx" }; return q end,
    function() local q = agent.queue.open { collection = "qx", leese = 5 }; return q end, -- 24
}

local M = {}

function M.init()
    for i, f in ipairs(checks) do
        local ok, err = pcall(f)
        agent.log.info("misuse %d: %s", i, ok and "no error" or tostring(err))
    end
end

function M.batch()
    agent.sleep(0.5)
end

return M
