-- Iteration 1 loops forever in interpreted code (JIT off: compiled traces run no hooks);
-- iteration 2 catches every error with pcall and loops again; later iterations return 5.
jit.off()
local M = {}
function M.batch(ctx)
    if ctx.iteration == 1 then
        while true do
            local x = {}
        end
    elseif ctx.iteration == 2 then
        while true do
            pcall(function()
                while true do
                    local x = {}
                end
            end)
        end
    end
    return 5
end
return M
