--[[ Fixture for tests/e2e/test_lua_mongo.py: the BSON <-> Lua mapping through a real server.
In init: inserts a document made in Lua (_id "from_lua") into $COLLECTION, reads the document the
test inserted with pymongo (_id "from_py"), reports what it saw in $OUT_FILE (JSON: the
agent.mongo.type() of every field and a few values) and writes it back unchanged as _id "echo". ]]
local agent = require "agent"
local mongo = agent.mongo
local json = agent.json

local out_file = assert(agent.env("OUT_FILE"), "OUT_FILE is required")
local coll = mongo.collection(agent.env("COLLECTION", "types"))

local function write(report)
    local f = assert(io.open(out_file .. ".tmp", "w"))
    f:write(json.encode(report))
    f:close()
    assert(os.rename(out_file .. ".tmp", out_file))
end

local function describe(v)
    local t = mongo.type(v)
    if t == "document" or t == "array" then
        local fields = {}
        for k, x in pairs(v) do
            fields[tostring(k)] = describe(x)
        end
        return { type = t, fields = fields, is_array = mongo.is_array(v) }
    end
    return { type = t, text = tostring(v) }
end

local M = {}

function M.init()
    local report = {}
    local cyc = {}
    cyc.self = cyc
    local doc = {
        _id = "from_lua",
        dbl = 1.5, nonint = 0.1, int32 = 42, neg = -7, int32_max = 2147483647,
        int64_from_number = 2 ^ 40, int64_neg = -2147483649,
        int64_forced = mongo.int64(5),
        int64_huge = mongo.int64("9007199254740993"),
        int64_max = mongo.int64("9223372036854775807"),
        str = "héllo", bool_t = true, bool_f = false,
        null_v = mongo.null, cjson_null = json.null,
        oid = mongo.oid("0123456789abcdef01234567"),
        date = mongo.date(1700000000123),
        dec = mongo.decimal128("1234.5678"),
        bin = mongo.binary("\0\1\2\255"),
        uuid = mongo.binary("0123456789abcdef", 4),
        nested = { a = { b = { c = { 1, 2, { d = "x" } } } } },
        arr = { 1, "two", 3.5, { x = 1 } },
        empty_arr = mongo.array({}), empty_doc = {}, empty_doc_forced = mongo.document({}),
        arr_of_empty = mongo.array({ mongo.array(), {} }),
    }
    local res, err = coll:insert_one(doc)
    report.insert = res and tostring(res.inserted_id) or err

    local seen, ferr = coll:find_one({ _id = "from_py" })
    if seen == nil then
        report.read_error = ferr or "not found"
    else
        report.seen = describe(seen)
        report.int64_big_text = tostring(seen.int64_big)
        report.int64_small_plus_one = seen.int64_small + 1
        report.date_ms = seen.date.ms
        report.oid_hex = seen.oid:hex()
        report.dec_text = tostring(seen.dec)
        report.bin_data = seen.bin.data and #seen.bin.data
        report.bin5_subtype = seen.bin5.subtype
        report.null_is_null = seen.none == mongo.null and seen.none == json.null
        seen._id = "echo"
        local echoed, eerr = coll:insert_one(seen)
        report.echo = echoed and "ok" or eerr
    end
    write(report)
end

function M.batch()
    agent.sleep(0.2)
    return 0
end

return M
