--[[ What the e2e fixtures share (require "lib.fixture": the script's directory is on
package.path, docs/LUA.md). A fixture reports what its calls returned, to a file the test reads:
  fixture.recorder(path, stamp) a function record(rec) that appends rec (with t = agent.now(),
                                and whatever stamp(rec) adds, if given) as one JSON line to
                                path: a fixture's events, read as they come
  fixture.write_report(path, r) writes the table r as JSON to path at once (a rename), so the
                                test never reads half a report
  fixture.first_batch(work)     a batch function: the first batch runs work() and returns 1,
                                later ones sleep 0.05 s and return 0
  fixture.pack(...)             every value a call returned, nils included ({n = ..., ...})
  fixture.claim_within(q, s)    claims one job with agent.queue q until one comes back or s
                                seconds pass; the job, or nil
  fixture.fill_memory(leave, n) strings that fill LUA_MEMORY_LIMIT up to about `leave` bytes
                                below it, in at most n steps; keep the table to keep them ]]
local agent = require "agent"
local json = agent.json

local fixture = {}

function fixture.recorder(path, stamp)
    return function(rec)
        rec.t = agent.now()
        if stamp then
            stamp(rec)
        end
        local f = assert(io.open(path, "a"))
        f:write(json.encode(rec), "\n")
        f:close()
    end
end

function fixture.write_report(path, r)
    local f = assert(io.open(path .. ".tmp", "w"))
    f:write(json.encode(r))
    f:close()
    assert(os.rename(path .. ".tmp", path))
end

function fixture.first_batch(work)
    local first = true
    return function()
        if not first then
            agent.sleep(0.05)
            return 0
        end
        first = false
        work()
        return 1
    end
end

function fixture.pack(...)
    return { n = select("#", ...), ... }
end

function fixture.claim_within(q, seconds)
    local deadline = agent.monotonic() + seconds
    repeat
        local jobs = assert(q:claim(1))
        if jobs[1] then
            return jobs[1]
        end
        agent.sleep(0.02)
    until agent.monotonic() > deadline
    return nil
end

function fixture.fill_memory(leave, steps)
    -- each step takes a quarter of what is left above `leave` (string.rep needs a buffer as
    -- large as its result)
    local ballast = {}
    for i = 1, steps do
        collectgarbage()
        local used, limit = agent.memory()
        local spare = limit - used - leave
        if spare < 8192 then
            break
        end
        local ok, s = pcall(string.rep, "b", math.floor(spare / 4)) -- a new length: a new string
        if not ok then
            break
        end
        ballast[i] = s
    end
    return ballast
end

return fixture
