--[[ Fixture: drains with deadlines (drain=, PAUSE_DRAIN_TIMEOUT), agent.pending() and
task:cancel(). Records facts as JSON lines in $EVENTS_FILE. Knobs (environment):
  EVENTS_FILE   where to append the records (required)
  MODE          hang | mongo_hang | queue_hang | pending_loop | cancel_one | sleepers
  HANG_URL      hang: the URL every task requests (a server that never answers)
  TASKS         hang, sleepers: number of tasks (default 64)
  HTTP_TIMEOUT  hang: each request's own timeout, seconds (default 60)
  SLEEP         sleepers: seconds each task sleeps (default 60), in a loop that ignores wake-ups
  JIT           "off" turns the JIT compiler off
MODE's work runs in every batch while the agent runs (a batch records "batch_start" first);
between batches nothing waits. ]]
local agent = require "agent"
local fixture = require "lib.fixture"
local http = require "agent.http"

if agent.env("JIT", "on") == "off" then
    jit.off()
end

local events_file = assert(agent.env("EVENTS_FILE"), "EVENTS_FILE is required")
local mode = agent.env("MODE", "hang")
local ntasks = tonumber(agent.env("TASKS", "64"))
local http_timeout = tonumber(agent.env("HTTP_TIMEOUT", "60"))
local sleep_s = tonumber(agent.env("SLEEP", "60"))
local batch_no = 0

local record = fixture.recorder(events_file, function(rec)
    rec.batch = batch_no
end)

local function str(v)
    return v == nil and "nil" or tostring(v)
end

local modes = {}

-- TASKS tasks each request HANG_URL; the batch joins them all and records what each saw.
function modes.hang()
    local url = assert(agent.env("HANG_URL"), "HANG_URL is required")
    local tasks = {}
    for i = 1, ntasks do
        tasks[i] = agent.spawn(function(k)
            local res, msg, code = http.get(url, {timeout = http_timeout})
            record({ev = "task_end", k = k, ok = res ~= nil, msg = str(msg), code = str(code)})
            return code
        end, i)
    end
    local joins = {}
    for i = 1, ntasks do
        local ok, a, b = tasks[i]:join()
        joins[#joins + 1] = str(ok) .. ":" .. str(b or a)
    end
    -- a wait after the deadline returns at once
    local after = {agent.sleep(30)}
    record({ev = "batch_end", joins = joins, after_code = str(after[3]),
            pending = agent.pending()})
end

-- TASKS tasks each run a find_one on the collection "slow" (a test blocks it at the server); the
-- batch joins them all.
function modes.mongo_hang()
    local coll = agent.mongo.collection("slow")
    local tasks = {}
    for i = 1, ntasks do
        tasks[i] = agent.spawn(function(k)
            local doc, msg, code = coll:find_one({k = k})
            record({ev = "task_end", k = k, ok = doc ~= nil, msg = str(msg), code = str(code)})
            return code
        end, i)
    end
    for i = 1, ntasks do
        tasks[i]:join()
    end
    local after = {agent.sleep(30)}
    record({ev = "batch_end", after_code = str(after[3])})
end

-- Claims 2 of the 3 jobs of agent.queue "drain_jobs" (enqueued by the first batch), then works
-- on them: a request to HANG_URL that never answers. A drain cuts it; the host then releases the
-- claims.
local work_queue
function modes.queue_hang()
    if work_queue == nil then
        work_queue = require("agent.queue").open({collection = "drain_jobs", lease = 600})
        assert(work_queue:enqueue({{n = 1}, {n = 2}, {n = 3}}))
    end
    local jobs, err = work_queue:claim(2)
    record({ev = "claimed", n = #jobs, err = str(err)})
    local res, msg, code = http.get(assert(agent.env("HANG_URL")), {timeout = http_timeout})
    record({ev = "task_end", ok = res ~= nil, msg = str(msg), code = str(code)})
    if res then
        for _, job in ipairs(jobs) do
            work_queue:ack(job)
        end
    end
    local after = {agent.sleep(30)}
    record({ev = "batch_end", after_code = str(after[3])})
end

-- A loop of short sleeps that ignore wake-ups, checking agent.pending() on every turn (a wait
-- that returns early because a command is pending is what a loop sees; the deadline is read
-- from agent.pending()).
function modes.pending_loop()
    local t0 = agent.monotonic()
    local turns = 0
    while true do
        turns = turns + 1
        local p = agent.pending()
        if p then
            record({ev = "pending", command = p.command, reason = p.reason,
                    deadline = p.deadline == nil and "nil" or p.deadline, turns = turns,
                    elapsed = agent.monotonic() - t0})
            return turns
        end
        -- busy work between checks; sleep(0) would return at once once a command is pending
        local x = 0
        for i = 1, 10000 do x = x + i end
        agent.sleep(0.01)
    end
end

-- Three tasks sleep; the batch cancels the second one; all are joined.
function modes.cancel_one()
    local tasks = {}
    for i = 1, 3 do
        tasks[i] = agent.spawn(function(k)
            local a, msg, code = agent.sleep(i == 2 and 60 or 0.2)
            local b, msg2, code2 = agent.sleep(0.01) -- a later wait of a cancelled task
            return str(a) .. ":" .. str(code), str(b) .. ":" .. str(code2), str(msg)
        end, i)
    end
    agent.sleep(0.05)
    local was_running = tasks[2]:cancel()
    local outcomes = {}
    for i = 1, 3 do
        local ok, first, second, msg = tasks[i]:join()
        outcomes[i] = {ok = ok, first = first, second = second, msg = msg}
    end
    local again = tasks[2]:cancel() -- an ended task: nothing to cancel
    record({ev = "cancel_one", outcomes = outcomes, was_running = was_running, again = again})
    agent.sleep(3600) -- idle until a command
end

-- TASKS tasks sleep SLEEP seconds in a loop that ignores wake-ups (only a cancelled wait ends it).
function modes.sleepers()
    local tasks = {}
    for i = 1, ntasks do
        tasks[i] = agent.spawn(function(k)
            while true do
                local ok, msg, code = agent.sleep(sleep_s)
                if ok == nil then
                    record({ev = "task_end", k = k, code = str(code), msg = str(msg)})
                    return code
                end
            end
        end, i)
    end
    for i = 1, ntasks do
        tasks[i]:join()
    end
    record({ev = "batch_end"})
end

local M = {}

function M.batch(ctx)
    batch_no = batch_no + 1
    record({ev = "batch_start"})
    modes[mode]()
    return 0
end

local function hook(name)
    return function(ev)
        record({ev = name, command = ev.command, source = ev.source,
                drain = ev.drain == nil and "nil" or ev.drain,
                pending = agent.pending() and agent.pending().command or "nil"})
    end
end

M.on_pause = hook("on_pause")
M.on_resume = hook("on_resume")
M.on_shutdown = hook("on_shutdown")

return M
