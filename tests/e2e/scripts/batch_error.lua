--[[ Fixture: batch raises a runtime error from a nested function (so the traceback has frames).
FAIL_TIMES (default: always) limits how many batches fail; later batches succeed. ]]
local agent = require "agent"

local fail_times = tonumber(agent.env("FAIL_TIMES", "1e9"))
local calls = 0

local function explode_deeply(i)
    error("boom from fixture batch " .. i)
end

local M = {}

function M.batch(ctx)
    calls = calls + 1
    if calls <= fail_times then
        explode_deeply(calls)
    end
    agent.sleep(0.05)
    return 1
end

return M
