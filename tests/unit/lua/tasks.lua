-- batch: the scenario named by AH_TEST_TASKS; returns a number the test checks.
local agent = require "agent"

local scenarios = {}

-- 50 tasks sleep 0.2 s at once; returns the sum of their results (1..50).
function scenarios.concurrent()
    local tasks = {}
    for i = 1, 50 do
        tasks[i] = agent.spawn(function(k) agent.sleep(0.2) return k end, i)
    end
    local sum = 0
    for i = 1, 50 do
        local ok, k = tasks[i]:join()
        assert(ok, k)
        sum = sum + k
    end
    return sum
end

-- Two tasks join each other: nothing can wake them, so both joins are cancelled (the call ends
-- after them; the next call reads the count).
function scenarios.deadlock()
    local a, b
    _G.deadlock_cancelled = 0
    local function join_other(get_other)
        agent.sleep(0)
        local r, _, code = get_other():join()
        if r == nil and code == "cancelled" then
            _G.deadlock_cancelled = _G.deadlock_cancelled + 1
        end
    end
    a = agent.spawn(join_other, function() return b end)
    b = agent.spawn(join_other, function() return a end)
    return 0
end

function scenarios.after_deadlock()
    return _G.deadlock_cancelled
end

-- Waiting inside a coroutine the script created raises; returns 1 when it did.
function scenarios.foreign_coroutine()
    local co = coroutine.create(function() return agent.sleep(0.01) end)
    local ok, err = coroutine.resume(co)
    return (not ok and tostring(err):find("cannot wait here", 1, true)) and 1 or 0
end

-- The call's function fails while a task sleeps: the task's sleep is cancelled, then the error
-- is the call's.
function scenarios.main_fails()
    agent.spawn(function()
        local r, msg, code = agent.sleep(30)
        _G.cancelled_code = code
    end)
    agent.sleep(0.01)
    error("main failed")
end

function scenarios.after_main_fails()
    return _G.cancelled_code == "cancelled" and 1 or 0
end

-- The call's result around everything that leaves the plain path: the function yields to the
-- other tasks, sleeps, and returns while a task it spawned still sleeps (the call waits for it).
-- ctx is the same table on every call, so a field set in one persists: returns 40 + calls.
function scenarios.result_after_waits(ctx)
    ctx.calls = (ctx.calls or 0) + 1
    coroutine.yield()
    agent.sleep(0)
    agent.spawn(function() agent.sleep(0.05) end)
    return 40 + ctx.calls
end

-- Returns the number of results and the first one of nothing, nil and two values, in turn.
function scenarios.plain_results(ctx)
    ctx.plain = (ctx.plain or 0) + 1
    if ctx.plain == 1 then
        return
    elseif ctx.plain == 2 then
        return nil
    end
    return 6, 7
end

return {
    batch = function(ctx)
        return scenarios[agent.env("AH_TEST_TASKS", "concurrent")](ctx)
    end,
    on_pause = function(ev)
        return 99 -- a hook's results are dropped; the next batch's are its own
    end,
}
