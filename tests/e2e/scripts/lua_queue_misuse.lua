--[[ Fixture for tests/e2e/test_lua_mongo.py: agent.queue is loadable under one name only, and
every method that takes a job checks it before touching it (the error names the method and
points at the caller's line). Needs no server: nothing here reaches MongoDB. init writes the
findings as JSON to $OUT_FILE. ]]
local agent = require "agent"
local fixture = require "lib.fixture"

local out_file = assert(agent.env("OUT_FILE"), "OUT_FILE is required")

-- Not tail calls, so the error's position is this file's line.
local function err_of(f)
    local ok, e = pcall(f)
    return ok and "no error" or tostring(e)
end

local M = {}

function M.init()
    local r = {}
    local queue = agent.queue
    r.same_module = require("agent.queue") == queue
    r.old_name_loads = (pcall(require, "agent_queue"))
    local q = queue.open({ collection = "jobs" })
    r.misuse = {
        fail_nil = err_of(function() local a, b = q:fail(nil, "boom") return a, b end),
        fail_number = err_of(function() local a, b = q:fail(42, "boom") return a, b end),
        renew_nil = err_of(function() local a, b = q:renew(nil) return a, b end),
        renew_string = err_of(function() local a, b = q:renew("job-1") return a, b end),
        ack_nil = err_of(function() local a, b = q:ack(nil) return a, b end),
        release_table_without_id = err_of(function() local a, b = q:release({}) return a, b end),
    }
    fixture.write_report(out_file, r)
end

function M.batch()
    agent.sleep(0.1)
    return 0
end

return M
