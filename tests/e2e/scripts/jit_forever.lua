--[[ Fixture: a batch that spins forever inside a JIT-compiled trace, where LuaJIT never runs
hooks, so neither BATCH_TIMEOUT nor shutdown can interrupt it. ]]
local agent = require "agent"

local M = {}

function M.batch(ctx)
    agent.log.info("jit batch starting")
    while true do end
end

return M
