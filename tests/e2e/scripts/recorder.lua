--[[ Fixture: records everything that happens to the agent as JSON lines in $EVENTS_FILE, so the
tests assert on facts rather than on timing. Knobs (environment):
  EVENTS_FILE    where to append the records (required)
  BATCH_SECONDS  busy-wait this long inside each batch (default 0: a short interruptible sleep)
  FAIL_HOOK      name of a hook (on_pause | on_resume | on_shutdown) that raises after recording
Records: {ev = "init"|"batch_start"|"batch_end"|"on_pause"|"on_resume"|"on_shutdown", t = wall
clock, n = batch number, state = agent.state(), and for hooks every ev field}. ]]
local agent = require "agent"
local fixture = require "lib.fixture"

local events_file = assert(agent.env("EVENTS_FILE"), "EVENTS_FILE is required")
local batch_seconds = tonumber(agent.env("BATCH_SECONDS", "0"))
local fail_hook = agent.env("FAIL_HOOK", "")
local clock = agent.monotonic or os.clock

local record = fixture.recorder(events_file, function(rec)
    rec.agent = agent.id
end)

local function hook(name)
    return function(ev)
        record({ev = name, command = ev.command, version = ev.version, reason = ev.reason,
                updated_by = ev.updated_by, timestamp = ev.timestamp, source = ev.source,
                scope = ev.scope, drain = ev.drain, state = agent.state()})
        if fail_hook == name then
            error("fixture failure in " .. name)
        end
    end
end

local M = {}
local n = 0

function M.init(ctx)
    record({ev = "init", state = agent.state()})
end

function M.batch(ctx)
    n = n + 1
    record({ev = "batch_start", n = n, state = agent.state()})
    if batch_seconds > 0 then
        -- Busy wait: a command arriving now must not cut the batch short.
        local deadline = clock() + batch_seconds
        while clock() < deadline do end
    else
        agent.sleep(0.02)
    end
    record({ev = "batch_end", n = n})
    return 1
end

M.on_pause = hook("on_pause")
M.on_resume = hook("on_resume")
M.on_shutdown = hook("on_shutdown")

return M
