--[[ Fixture for tests/e2e/test_lua_mongo_pool.py: a script that misuses agent.mongo under a
small pool (maxPoolSize=4 in the URI) and LUA_MEMORY_LIMIT, then proves agent.mongo still works.

batch 1: every way a call can be left by a Lua error or an unclosed iterator, each repeated more
  often than the pool has clients: the memory limit hit while a find's result is built, a
  document or an options table whose __index raises, an error inside a find_iter loop, 40
  find_iter iterators never closed. After each: a find_one must still answer.
batches 2..4: a find loop that never ends, stopped by the BATCH_TIMEOUT hook (in interpreted
  code: jit.off). The docs carry int64 values past 2^53, which the binding builds by calling Lua,
  so the hook lands inside the result building too.
batch 5: holds 4 iterators (the whole pool), times a find_one against the empty pool, writes
  the report ($OUT_FILE, JSON) and keeps holding them: the test then sends a cluster command.
The collection "big" is filled by the test. ]]
jit.off()
local agent = require "agent"
local fixture = require "lib.fixture"
local mongo = agent.mongo
local json = agent.json

local out_file = assert(agent.env("OUT_FILE"), "OUT_FILE is required")
local coll = mongo.collection("big")
local report = { errors = {} }
local batches = 0
local held -- the iterators of batch 5, kept open

local function works(what)
    local doc, msg = coll:find_one({ _id = 1 })
    if not (doc and doc._id == 1) then
        report.errors[#report.errors + 1] = what .. ": find_one failed afterwards: " .. tostring(msg)
    end
end

-- Raises f's error n times in a row; returns how many errors matched pattern.
local function raise_n(n, pattern, f)
    local matched = 0
    for i = 1, n do
        local ok, e = pcall(f)
        if not ok and tostring(e):find(pattern, 1, true) then
            matched = matched + 1
        else
            report.errors[#report.errors + 1] =
                pattern .. ": call " .. i .. " got " .. tostring(ok and "no error" or e)
        end
    end
    return matched
end

local function misuse()
    -- about 64 KB left: too little for the result of a find over "big" (about 400 KB of
    -- strings), enough to call it
    local ballast = fixture.fill_memory(65536, 200)
    collectgarbage("stop") -- the failed results stay garbage: every find meets the limit
    report.memory = raise_n(8, "not enough memory", function() return coll:find({}) end)
    ballast = nil -- luacheck: ignore
    collectgarbage("restart")
    collectgarbage()
    works("memory limit")

    local raising = setmetatable({}, { __index = function() error("index raised") end })
    report.index_doc = raise_n(8, "index raised", function() return coll:insert_one(raising) end)
    report.index_opts = raise_n(8, "index raised", function() return coll:find({}, raising) end)
    works("__index")

    report.loop_errors = raise_n(8, "loop body raised", function()
        for _ in coll:find_iter({}) do
            error("loop body raised")
        end
    end)
    works("error in a find_iter loop")

    local opened = 0
    for _ = 1, 40 do
        local it = coll:find_iter({}, { batch_size = 2 })
        if it and it:next() then
            opened = opened + 1
        end
    end
    report.unclosed_iterators = opened
    works("40 unclosed iterators")
end

local M = {}

function M.batch()
    batches = batches + 1
    if batches == 1 then
        misuse()
        return 1
    elseif batches <= 4 then
        report.timeouts = batches - 1
        while true do
            coll:find({})
        end
    elseif batches == 5 then
        works("BATCH_TIMEOUT interrupts")
        held = {}
        for i = 1, 4 do
            held[i] = assert(coll:find_iter({}, { batch_size = 2 }))
            assert(held[i]:next())
        end
        local t0 = agent.monotonic()
        local doc, msg, code = coll:find_one({ _id = 1 })
        report.empty_pool = { doc == nil, msg, code, agent.monotonic() - t0 }
        local f = assert(io.open(out_file .. ".tmp", "w"))
        f:write(json.encode(report))
        f:close()
        assert(os.rename(out_file .. ".tmp", out_file))
        return 1
    end
    agent.sleep(0.1)
    return 1
end

function M.on_pause()
    -- The pool is still held: the pause reached this agent through the control store's own
    -- connections. Give the clients back now.
    for _, it in ipairs(held or {}) do
        it:close()
    end
    local doc = coll:find_one({ _id = 1 })
    agent.log.info("pool misuse fixture: paused, find_one after closing: %s",
        doc and tostring(doc._id) or "nil")
end

return M
