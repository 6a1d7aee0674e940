--[[ Fixture: the edges of waiting in tasks (tests/e2e/test_task_edges.py). Records facts as JSON
lines in $EVENTS_FILE. Knobs (environment):
  EVENTS_FILE  where to append the records (required)
  MODE         join_zero | sleep_pending | task_memory
Only the first batch does the work of MODE; later batches sleep a little and return 0. ]]
local agent = require "agent"
local fixture = require "lib.fixture"

local events_file = assert(agent.env("EVENTS_FILE"), "EVENTS_FILE is required")
local mode = agent.env("MODE", "join_zero")

local record = fixture.recorder(events_file)

local modes = {}

-- task:join(0) on a task that sleeps 0.3 s: a timeout at once; a later join gets its result.
function modes.join_zero()
    local t = agent.spawn(function()
        agent.sleep(0.3)
        return "slept"
    end)
    local t0 = agent.monotonic()
    local r, msg, code = t:join(0)
    local elapsed = agent.monotonic() - t0
    local ok, value = t:join()
    record({ev = "join_zero", r = r == nil and "nil" or tostring(r), msg = msg, code = code,
            elapsed = elapsed, ok = ok, value = value})
end

-- The first sleep is ended by the test's pause; the command is still pending when the second
-- sleep is called (the batch has not returned), so it returns true at once.
function modes.sleep_pending()
    record({ev = "sleeping"})
    local first = agent.sleep(60)
    local t0 = agent.monotonic()
    local second = agent.sleep(10)
    record({ev = "slept", first = first, second = second, elapsed = agent.monotonic() - t0})
end

-- A task allocates without bound under LUA_MEMORY_LIMIT: the limit ends it with the memory error
-- (join gives it back); chunks counts the MiB it managed to keep.
function modes.task_memory()
    local chunks = 0
    local t = agent.spawn(function()
        local keep = {}
        while true do
            local chunk = {}
            for i = 1, 131072 do -- 1 MiB of numbers
                chunk[i] = i
            end
            keep[#keep + 1] = chunk
            chunks = chunks + 1
        end
    end)
    local ok, err = t:join()
    collectgarbage("collect")
    local used, limit = agent.memory()
    record({ev = "task_memory", ok = ok, err = tostring(err), chunks = chunks, used = used,
            limit = limit})
end

local M = {}

M.batch = fixture.first_batch(function()
    modes[mode]()
end)

function M.on_pause(ev)
    record({ev = "on_pause", command = ev.command})
end

return M
