local M = {}

local x = = 1
function M.batch() return 0 end
return M
