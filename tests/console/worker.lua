--[[ Fixture for the console tests: a worker that does a little work per batch (so the batch
counters move) and nothing else. ]]
local agent = require "agent"

local M = {}

function M.batch(ctx)
    agent.sleep(0.05)
    return 1
end

return M
