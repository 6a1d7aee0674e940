-- Each batch spins in interpreted code (JIT off: compiled traces run no hooks) for
-- AH_TEST_SPIN_MS milliseconds of CPU time, then returns 1; an interrupt stops it earlier.
jit.off()
local M = {}
function M.batch(ctx)
    local until_clock = os.clock() + tonumber(os.getenv("AH_TEST_SPIN_MS") or "0") / 1000
    while os.clock() < until_clock do
        local x = {}
    end
    return 1
end
return M
