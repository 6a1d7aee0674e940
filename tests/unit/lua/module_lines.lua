-- Returns 1 when the embedded agent module keeps its debug information: its functions name
-- lua/agent.lua and the lines they are defined at in that file (read next to this fixture's
-- repository), and an error raised inside it names the caller's line.
local agent = require "agent"
local M = {}
function M.batch()
    local here = debug.getinfo(1, "S").source:match("^@(.*)/tests/unit/lua/[^/]*$")
    local line = 0
    local n = 0
    for text in io.lines(here .. "/lua/agent.lua") do
        n = n + 1
        if text:match("^function agent%.every%(") then
            line = n
        end
    end
    local info = debug.getinfo(agent.every, "S")
    local ok, err = pcall(function() agent.metrics.counter(42) end)
    return (line > 0 and info.source == "@lua/agent.lua" and info.linedefined == line
        and not ok and tostring(err):find("module_lines.lua:17:", 1, true)) and 1 or 0
end
return M
