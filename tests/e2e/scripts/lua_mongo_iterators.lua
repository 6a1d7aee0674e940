--[[ Fixture for tests/e2e/test_lua_mongo_pool.py: $ITERATORS find_iter iterators opened and
dropped unclosed in init, then as many as the pool has held open while a find_one meets the
empty pool (default bounded wait), then closed. Writes the report ($OUT_FILE, JSON). ]]
local agent = require "agent"
local fixture = require "lib.fixture"
local mongo = agent.mongo

local out_file = assert(agent.env("OUT_FILE"), "OUT_FILE is required")
local n = tonumber(agent.env("ITERATORS") or "40")
local coll = mongo.collection("big")

local M = {}

function M.init()
    local r = { opened = 0 }
    for _ = 1, n do
        local it = coll:find_iter({}, { batch_size = 2 })
        if it and it:next() then
            r.opened = r.opened + 1
        end
    end
    local held = {}
    while true do -- take every client: the pool size is the URI's business
        local it, msg, code = coll:find_iter({}, { batch_size = 2 })
        if it == nil then
            r.take_failed = { msg, code }
            break
        end
        assert(it:next())
        held[#held + 1] = it
        if #held > 100 then
            break
        end
    end
    r.held = #held
    local t0 = agent.monotonic()
    local doc, msg, code = coll:find_one({ _id = 1 })
    r.empty_pool = { doc == nil, msg, code, agent.monotonic() - t0 }
    for _, it in ipairs(held) do
        it:close()
    end
    local again = coll:find_one({ _id = 1 })
    r.after_close = again and again._id
    fixture.write_report(out_file, r)
end

function M.batch()
    agent.sleep(0.1)
    return 1
end

return M
