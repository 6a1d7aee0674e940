--[[ Fixture for tests/e2e/test_inflight.py's stress test: every batch misuses agent.mongo under a
small pool (maxPoolSize=4 in the URI) and a tight LUA_MEMORY_LIMIT while commands arrive: 8 finds
that fail on the memory limit while their results are built, 40 find_iter iterators left open
(more than the pool has clients: each new one collects the unreachable ones), a few finds from
tasks on the thread pool, then agent.sleep(0.2). Logs "stress batch N" after each batch and
"stress paused" in on_pause. JIT=off turns the compiler off. The collection "big" is filled by
the test. Under LUA_MEMORY_LIMIT the host keeps the JIT compiler off (an allocation refused
inside compiled code crashed LuaJIT 2.1): JIT=on asks for it anyway. ]]
local agent = require "agent"
local fixture = require "lib.fixture"
if agent.env("JIT") == "off" then
    jit.off()
else
    jit.on() -- ignored (with a warning) while LUA_MEMORY_LIMIT is set
end
agent.log.info("jit status: %s", tostring((jit.status())))
local coll = agent.mongo.collection("big")
local batches = 0

-- 8 finds that fail on the memory limit while their results are built.
local function memory_misuse()
    local ballast = fixture.fill_memory(262144, 64) -- too little left for a find's result
    collectgarbage("stop")
    local failed = 0
    for _ = 1, 8 do
        local ok = pcall(coll.find, coll, {})
        if not ok then
            failed = failed + 1
        end
    end
    ballast = nil -- luacheck: ignore
    return failed
end

-- 40 find_iter iterators left open (the pool has 4 clients: each new one collects garbage).
local function leave_iterators()
    local opened = 0
    for _ = 1, 40 do
        local it = coll:find_iter({}, { batch_size = 2 })
        if it and it:next() then
            opened = opened + 1
        end
    end
    return opened
end

local M = {}

function M.batch()
    batches = batches + 1
    local ok, failed = xpcall(memory_misuse, function(e) return tostring(e) .. " @ " .. debug.traceback("", 2):sub(1, 300) end)
    collectgarbage("restart") -- also when the ballast itself ran out of memory
    collectgarbage()
    local ok2, opened = pcall(leave_iterators)
    local tasks = {}
    for i = 1, 3 do
        tasks[i] = agent.spawn(function()
            local docs = coll:find({ _id = { ["$lte"] = 3 } })
            return docs and #docs or -1
        end)
    end
    for i = 1, 3 do
        tasks[i]:join()
    end
    agent.log.info("stress batch %d: %s %s %s %s", batches, tostring(ok), tostring(failed),
        tostring(ok2), tostring(opened))
    agent.sleep(0.2)
    return 1
end

function M.on_pause()
    collectgarbage()
    local doc = coll:find_one({ _id = 1 })
    agent.log.info("stress paused: %s", doc and tostring(doc._id) or "nil")
end

return M
