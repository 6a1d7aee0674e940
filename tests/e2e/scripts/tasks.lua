--[[ Fixture: tasks on the worker's loop (agent.spawn, task:join, agent.sleep). Records facts as
JSON lines in $EVENTS_FILE. Knobs (environment):
  EVENTS_FILE  where to append the records (required)
  MODE         many | join_error | pause_wait | budget | shutdown_wait | sleep_after_idle
  TASKS        number of tasks (default 10)
  SLEEP        seconds each task sleeps (default 1)
  JIT          "off" turns the JIT compiler off
Only the first batch does the work of MODE; later batches sleep a little and return 0. ]]
local agent = require "agent"
local fixture = require "lib.fixture"

if agent.env("JIT", "on") == "off" then
    jit.off()
end

local events_file = assert(agent.env("EVENTS_FILE"), "EVENTS_FILE is required")
local mode = agent.env("MODE", "many")
local ntasks = tonumber(agent.env("TASKS", "10"))
local sleep_s = tonumber(agent.env("SLEEP", "1"))

local record = fixture.recorder(events_file)

local done = 0 -- tasks of the first batch that have ended
local first = true

local modes = {}

-- ntasks tasks each sleep sleep_s; the batch joins them all and sums their results.
function modes.many()
    local t0 = agent.monotonic()
    local tasks = {}
    for i = 1, ntasks do
        tasks[i] = agent.spawn(function(k)
            local woken = agent.sleep(sleep_s)
            return k, woken
        end, i)
    end
    local sum, ok_count = 0, 0
    for i = 1, ntasks do
        local ok, k, woken = tasks[i]:join()
        if ok and woken == false then
            ok_count = ok_count + 1
            sum = sum + k
        end
    end
    record({ev = "many", ok = ok_count, sum = sum, elapsed = agent.monotonic() - t0,
            jit = jit.status()})
end

-- One task fails and is joined; another fails and nobody joins it.
function modes.join_error()
    local failing = agent.spawn(function()
        agent.sleep(0.01)
        error("task boom")
    end)
    agent.spawn(function()
        error("unjoined boom")
    end)
    local fine = agent.spawn(function(a, b) return a + b, "x" end, 40, 2)
    local ok, err = failing:join()
    local ok2, sum, x = fine:join()
    local again_ok = fine:join() -- a finished task can be joined again
    local t = agent.spawn(function() agent.sleep(0.3) end)
    local r, msg, code = t:join(0.05)
    record({ev = "join_error", ok = ok, err = err, ok2 = ok2, sum = sum, x = x,
            again = again_ok, timeout_r = r == nil, timeout_msg = msg, timeout_code = code})
end

-- Tasks sleep long; a command arriving meanwhile wakes them; the hook sees them all ended.
function modes.pause_wait()
    record({ev = "waiting"})
    for i = 1, ntasks do
        agent.spawn(function()
            local t0 = agent.monotonic()
            local woken = agent.sleep(sleep_s)
            agent.sleep(0.05) -- still pending: returns at once
            done = done + 1
            record({ev = "task_end", woken = woken, elapsed = agent.monotonic() - t0})
        end)
    end
end
modes.shutdown_wait = modes.pause_wait

-- Waits longer than BATCH_TIMEOUT: every wait resumes with nil, msg, "timeout".
function modes.budget()
    local t0 = agent.monotonic()
    local tasks = {}
    for i = 1, ntasks do
        tasks[i] = agent.spawn(function()
            local r, msg, code = agent.sleep(sleep_s)
            local r2, _, code2 = agent.sleep(1) -- after the cancellation: at once
            return r, msg, code, code2
        end)
    end
    local codes = {}
    for i = 1, ntasks do
        local ok, r, msg, code, code2 = tasks[i]:join()
        codes[#codes + 1] = tostring(ok) .. ":" .. tostring(r) .. ":" .. tostring(code) .. ":" ..
            tostring(code2)
        if i == 1 then
            record({ev = "budget_msg", msg = msg})
        end
    end
    local r, msg, code = agent.sleep(1)
    record({ev = "budget", codes = codes, main_code = code, elapsed = agent.monotonic() - t0})
end

-- Idle batches first (the host waits 0.1, 0.2, 0.4, 0.8, 1 s between them, while the worker's
-- loop does not run), then one that sleeps: the sleep must still last its time.
local idle_batches = 0
function modes.sleep_after_idle()
    local t0 = agent.monotonic()
    agent.sleep(0.5)
    record({ev = "slept", elapsed = agent.monotonic() - t0, idle_batches = idle_batches})
end

return {
    batch = function()
        if mode == "sleep_after_idle" and first and idle_batches < 5 then
            idle_batches = idle_batches + 1
            return 0
        end
        if not first then
            agent.sleep(0.05)
            return 0
        end
        first = false
        modes[mode]()
        return 1
    end,
    on_pause = function()
        record({ev = "on_pause", done = done})
    end,
    on_shutdown = function()
        record({ev = "on_shutdown", done = done})
    end,
}
