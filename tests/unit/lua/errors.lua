-- Odd iterations fail (a string error, then an error object), even ones succeed.
local M = {}

local function fail(iteration)
    if iteration == 3 then
        error({ code = 7 })
    end
    error("boom at iteration " .. iteration)
end

function M.batch(ctx)
    if ctx.iteration % 2 == 1 then
        fail(ctx.iteration)
    end
    return 1
end

function M.on_pause(ev)
    error("pause hook failed")
end
return M
