local M = {}
error("refusing to load")
return M
