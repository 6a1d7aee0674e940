--[[ Fixture for tests/e2e/test_lua_mongo.py: failures and misuse. init records, as JSON in
$OUT_FILE, what a runtime failure returns (find_one against whatever the configuration gives:
nothing, or a server that is down) and the Lua error every misuse raises; then the agent keeps
running batches (proof it is alive) and counts them in the log. ]]
local agent = require "agent"
local mongo = agent.mongo
local json = agent.json

local out_file = assert(agent.env("OUT_FILE"), "OUT_FILE is required")

-- The calls below are not tail calls, so the error names the function ("bad argument #1 to
-- 'find_one'"); a tail call would show '?'.
local function err_of(f, ...)
    local ok, e = pcall(f, ...)
    return ok and "no error" or tostring(e)
end

local M = {}

function M.init()
    local r = {}
    local coll = mongo.collection("things")
    r.configured = mongo.configured()
    local t0 = agent.monotonic()
    local doc, msg, code = coll:find_one({ x = 1 })
    r.find_one = { doc == nil, msg, code }
    local res, imsg = coll:insert_one({ x = 1 })
    r.insert_one = { res == nil, imsg }
    r.failure_seconds = agent.monotonic() - t0
    local cyc = {}
    cyc.self = cyc
    r.misuse = {
        filter_type = err_of(function() local a, b = coll:find_one(5) return a, b end),
        bad_self = err_of(function() local a, b = coll.find_one({}) return a, b end),
        key_type = err_of(function() local a, b = coll:insert_one({ [true] = 1 }) return a, b end),
        key_nul = err_of(function() local a, b = coll:insert_one({ ["a\0b"] = 1 }) return a, b end),
        mixed = err_of(function() local a, b = coll:insert_one({ 1, 2, x = 3 }) return a, b end),
        cycle = err_of(function() local a, b = coll:insert_one(cyc) return a, b end),
        function_value = err_of(function() local a, b = coll:insert_one({ f = print }) return a, b end),
        unknown_option = err_of(function() local a, b = coll:find({}, { limt = 1 }) return a, b end),
        bad_limit = err_of(function() local a, b = coll:find({}, { limit = -1 }) return a, b end),
        bad_collection = err_of(mongo.collection, ""),
        bad_oid = err_of(mongo.oid, "xyz"),
        bad_int64 = err_of(mongo.int64, 1.5),
        update_missing = err_of(function() local a, b = coll:update_one({}) return a, b end),
        invalid_utf8 = err_of(function() local a, b = coll:insert_one({ s = "\255\254" }) return a, b end),
        key_not_utf8 = err_of(function() local a, b = coll:insert_one({ ["\255"] = 1 }) return a, b end),
        date_past_int64 = err_of(function() local a, b = coll:insert_one({ d = mongo.date(2 ^ 63) }) return a, b end),
    }
    -- Values that only look like agent.mongo's (found by tests/fuzz/fuzz_bson.c): an empty
    -- userdata with a forged __bson field, or with our own metatable moved onto it, was read
    -- past its end as an ObjectId; a forged date's __index raised out of the encoder.
    local forged = newproxy(true)
    getmetatable(forged).__bson = "oid"
    local moved = newproxy(false)
    debug.setmetatable(moved, getmetatable(mongo.oid()))
    local fake_date = setmetatable({}, { __bson = "date", __index = function() error("forged __index") end })
    r.look_alikes = {
        forged_oid = err_of(function() local a, b = coll:insert_one({ v = forged }) return a, b end),
        moved_oid = err_of(function() local a, b = coll:insert_one({ v = moved }) return a, b end),
        moved_oid_tostring = err_of(tostring, moved),
        fake_date = err_of(function() local a, b = coll:insert_one({ v = fake_date }) return a, b end),
    }
    local f = assert(io.open(out_file .. ".tmp", "w"))
    f:write(json.encode(r))
    f:close()
    assert(os.rename(out_file .. ".tmp", out_file))
end

local batches = 0
function M.batch()
    batches = batches + 1
    agent.log.info("errors fixture alive: batch %d", batches)
    agent.sleep(0.1)
    return 1
end

return M
