-- Fixture: a syntax error on line 4 (agenthost must exit 2 naming syntax_error.lua:4).
local M = {}
function M.batch(ctx)
    local x = = 1
end
return M
