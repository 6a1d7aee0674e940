--[[ Fixture: a batch that never ends, in interpreted code (JIT off), so the BATCH_TIMEOUT
interrupt can reach it. Records batch starts and interrupted batches in $EVENTS_FILE if set. ]]
jit.off()
local agent = require "agent"

local M = {}
local x = 0

function M.batch(ctx)
    agent.log.info("busy batch starting")
    while true do
        x = x + 1
    end
end

return M
