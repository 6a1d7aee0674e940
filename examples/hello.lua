--[[ The smallest useful agent: one short batch about every second, and a log line for every
lifecycle hook. Try it:

    agenthost check examples/hello.lua
    agenthost examples/hello.lua
    agenthost ctl pause --reason "maintenance"   # on_pause runs after the current batch
]]
local agent = require "agent"

local M = {}
local batches = 0

function M.init(ctx)
    agent.log.info("hello agent %s starting (script %s)", ctx.agent_id, ctx.script)
end

function M.batch(ctx)
    batches = batches + 1
    agent.log.info("hello from batch %d", batches)
    -- Wait for the next round; returns early when a command (pause, shutdown) arrives, so the
    -- transition is not delayed by this sleep.
    agent.sleep(1)
    return 1
end

function M.on_pause(ev)
    agent.log.info("paused after %d batches (reason: %q, source: %s)", batches, ev.reason, ev.source)
end

function M.on_resume(ev)
    agent.log.info("resumed (reason: %q, source: %s)", ev.reason, ev.source)
end

function M.on_shutdown(ev)
    agent.log.info("goodbye after %d batches (reason: %q, source: %s)", batches, ev.reason, ev.source)
end

return M
