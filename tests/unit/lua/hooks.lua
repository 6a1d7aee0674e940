-- Each hook appends one line "hook|command|version|reason|updated_by|timestamp|source" to the
-- file named by AH_TEST_OUT.
local agent = require "agent"
local M = {}

local function record(name, ev)
    local f = assert(io.open(agent.env("AH_TEST_OUT"), "a"))
    f:write(table.concat({ name, ev.command, string.format("%d", ev.version), ev.reason,
        ev.updated_by, ev.timestamp, ev.source }, "|"), "\n")
    f:close()
end

function M.batch() return 0 end
function M.on_pause(ev) record("on_pause", ev) end
function M.on_resume(ev) record("on_resume", ev) end
function M.on_shutdown(ev) record("on_shutdown", ev) end
return M
