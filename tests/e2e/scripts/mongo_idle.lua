--[[ Fixture for the MongoDB benchmark: an idle agent (every batch returns 0, so the host backs
off) that appends one JSON line {ev, version, t} to $EVENTS_FILE per pause/resume hook, t being
the wall clock when the hook ran. ]]
local agent = require "agent"
local json = agent.json

local events_file = assert(agent.env("EVENTS_FILE"), "EVENTS_FILE is required")

local function hook(name)
    return function(ev)
        local f = assert(io.open(events_file, "a"))
        f:write(json.encode({ev = name, version = ev.version, t = agent.now()}), "\n")
        f:close()
    end
end

local M = {}

function M.batch(ctx)
    return 0
end

M.on_pause = hook("on_pause")
M.on_resume = hook("on_resume")

return M
