--[[ Fixture for tests/e2e/test_lua_mongo.py: dates whose milliseconds are no int64 (1e300, NaN)
or lie outside years 0-9999. Their text and their encoding must be defined (a plain C cast of
such a double is undefined behaviour, which the UBSan build turns into an abort). init writes the
results as JSON to $OUT_FILE. ]]
local agent = require "agent"
local fixture = require "lib.fixture"
local mongo = agent.mongo

local out_file = assert(agent.env("OUT_FILE"), "OUT_FILE is required")

local M = {}

function M.init()
    local date_mt = getmetatable(mongo.date(0))
    local nan_date = setmetatable({ ms = 0 / 0 }, date_mt)
    local coll = mongo.collection("dates")
    local function encode_error(d)
        local ok, e = pcall(function() local a, b = coll:insert_one({ d = d }) return a, b end)
        return ok and "no error" or tostring(e)
    end
    local r = {
        epoch = tostring(mongo.date(0)),
        last = tostring(mongo.date(253402300799999)),
        huge = tostring(mongo.date(1e300)),
        negative_huge = tostring(mongo.date(-1e300)),
        past_9999 = tostring(mongo.date(253402300800000)),
        nan = tostring(nan_date),
        nan_equal = nan_date == setmetatable({ ms = 0 / 0 }, date_mt),
        huge_less = mongo.date(1e300) < mongo.date(2e300),
        encode_huge = encode_error(mongo.date(1e300)),
        encode_nan = encode_error(nan_date),
    }
    fixture.write_report(out_file, r)
end

function M.batch()
    agent.sleep(0.1)
    return 1
end

return M
