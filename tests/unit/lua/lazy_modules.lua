-- Returns 1 when the embedded modules a script does not require are not compiled: until the
-- first require, package.preload holds a C loader for each (no Lua function of the module
-- exists yet); require compiles and runs a module once, and the loaded module is kept.
local preload = package.preload
local M = {}
function M.batch()
    local lazy = true
    for _, name in ipairs({ "agent.queue", "agent.http" }) do
        local loader = preload[name]
        lazy = lazy and type(loader) == "function" and debug.getinfo(loader, "S").what == "C"
            and package.loaded[name] == nil
    end
    local agent = require "agent"
    local again = require "agent"
    local missing_ok, missing_err = pcall(require, "agent.no_such_module")
    return (lazy and type(agent) == "table" and type(agent.sleep) == "function"
        and agent == again and package.loaded.agent == agent and not missing_ok
        and tostring(missing_err):find("agent.no_such_module", 1, true)) and 1 or 0
end
return M
