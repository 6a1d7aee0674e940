-- Fixture: a valid chunk that breaks the contract (no batch function).
local M = {}
function M.on_pause(ev) end
return M
