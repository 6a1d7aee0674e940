--[[ Fixture for tests/e2e/test_lua_mongo.py: every collection method once, against $COLLECTION
(which the test pre-fills with {_id = 1..10, n = i, grp = i % 2}). init runs the calls and writes
their results to $OUT_FILE as JSON, for the test to compare with what pymongo sees. ]]
local agent = require "agent"
local fixture = require "lib.fixture"
local mongo = agent.mongo

local out_file = assert(agent.env("OUT_FILE"), "OUT_FILE is required")
local coll = mongo.collection(agent.env("COLLECTION", "ops"))

local function ids(docs)
    local out = {}
    for i, d in ipairs(docs) do
        out[i] = d._id
    end
    return out
end

local M = {}

function M.init()
    local r = {}
    -- find: filter, sort (ordered pairs), skip, limit, projection
    local docs = assert(coll:find({ grp = 0 }, { sort = { { "n", -1 } }, skip = 1, limit = 3,
                                                 projection = { n = 1 } }))
    r.find_ids = ids(docs)
    r.find_fields = {}
    for k in pairs(docs[1]) do
        r.find_fields[#r.find_fields + 1] = k
    end
    table.sort(r.find_fields)
    r.find_is_array = mongo.is_array(docs)
    -- find with opts.iterator and find_iter
    local seen = {}
    for d in coll:find({}, { iterator = true, sort = { _id = 1 }, batch_size = 3 }) do
        seen[#seen + 1] = d._id
    end
    r.iter_ids = seen
    local it = coll:find_iter({ n = { ["$gt"] = 8 } }, { sort = { _id = 1 } })
    r.iter_next = { it:next()._id, it:next()._id, it:next() == nil }
    local it2 = coll:find_iter({})
    it2:next()
    it2:close() -- gives its client back early
    -- find_one
    r.find_one_n = assert(coll:find_one({ _id = 3 })).n
    r.find_one_missing = coll:find_one({ _id = 999 }) == nil
    -- count, aggregate
    r.count_all = assert(coll:count())
    r.count_odd = assert(coll:count({ grp = 1 }))
    local groups = assert(coll:aggregate({
        { ["$group"] = { _id = "$grp", total = { ["$sum"] = "$n" } } },
        { ["$sort"] = { _id = 1 } },
    }))
    r.agg = { groups[1]._id, groups[1].total, groups[2]._id, groups[2].total }
    -- insert_one / insert_many
    local ins = assert(coll:insert_one({ _id = 11, n = 11, grp = 1 }))
    r.insert_one_id = ins.inserted_id
    local gen = assert(coll:insert_one({ n = 100 }))
    r.generated_id_type = mongo.type(gen.inserted_id)
    local many = assert(coll:insert_many({ { _id = 12, n = 12 }, { _id = 13, n = 13 } }))
    r.insert_many = { many.inserted, many.inserted_ids[1], many.inserted_ids[2] }
    local dup, dup_err, dup_code = coll:insert_one({ _id = 11 })
    r.duplicate = { dup == nil, dup_code, dup_err ~= nil }
    -- update_one / update_many / upsert / replace_one
    local u1 = assert(coll:update_one({ _id = 1 }, { ["$set"] = { touched = true } }))
    r.update_one = { u1.matched, u1.modified }
    local um = assert(coll:update_many({ grp = 0 }, { ["$inc"] = { n = 100 } }))
    r.update_many = { um.matched, um.modified }
    local up = assert(coll:update_one({ _id = 50 }, { ["$set"] = { n = 50 } }, { upsert = true }))
    r.upsert = { up.matched, up.modified, up.upserted_id }
    local rep = assert(coll:replace_one({ _id = 3 }, { n = 333, replaced = true }))
    r.replace_one = { rep.matched, rep.modified }
    -- find_one_and_update: old and new document, sort, upsert
    local old = assert(coll:find_one_and_update({ _id = 5 }, { ["$set"] = { n = 55 } }))
    local new = assert(coll:find_one_and_update({ _id = 5 }, { ["$inc"] = { n = 1 } },
                                                { new = true, projection = { n = 1 } }))
    r.fam = { old.n, new.n }
    local first = assert(coll:find_one_and_update({ grp = 1 }, { ["$set"] = { first = true } },
                                                  { sort = { { "n", 1 } }, new = true }))
    r.fam_sorted = first._id
    r.fam_none = coll:find_one_and_update({ _id = 777 }, { ["$set"] = { x = 1 } }) == nil
    local ups = assert(coll:find_one_and_update({ _id = 60 }, { ["$set"] = { n = 60 } },
                                                { upsert = true, new = true }))
    r.fam_upsert = ups.n
    -- delete_one / delete_many
    r.delete_one = assert(coll:delete_one({ _id = 11 })).deleted
    r.delete_many = assert(coll:delete_many({ _id = { ["$in"] = { 12, 13 } } })).deleted
    -- create_index: ordered keys, options, generated and given names
    r.index_auto = assert(coll:create_index({ { "grp", 1 }, { "n", -1 } }))
    r.index_named = assert(coll:create_index({ n = 1 }, { name = "by_n", unique = false }))
    fixture.write_report(out_file, r)
end

function M.batch()
    agent.sleep(0.2)
    return 0
end

return M
