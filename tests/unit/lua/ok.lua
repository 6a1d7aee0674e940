-- Fulfils the whole contract. batch returns a different kind of value on each iteration so the
-- test can check how results become item counts.
local agent = require "agent"
local M = {}
local results = { 3, 2.7, -5, nil, "7", false, 1e300, 0 / 0, {} }
local initialized = false

function M.init(ctx)
    assert(ctx.iteration == 0, "init runs before the first batch")
    initialized = true
end

function M.batch(ctx)
    assert(initialized, "init ran")
    assert(ctx.agent_id == agent.id, "ctx.agent_id is agent.id")
    assert(ctx.script:match("ok%.lua$"), "ctx.script is the script path")
    return results[ctx.iteration]
end

function M.on_pause(ev) end
function M.on_resume(ev) end
function M.on_shutdown(ev) end
return M
