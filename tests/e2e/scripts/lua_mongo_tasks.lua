--[[ Fixture: agent.mongo from 16 tasks at once (each call waits on libuv's thread pool while the
others run). Each task writes its own documents, reads them back, updates and counts; the batch
joins them and writes a report ($OUT_FILE, JSON). JIT=off turns the compiler off. ]]
local agent = require "agent"
local json = agent.json
if agent.env("JIT", "on") == "off" then
    jit.off()
end

local out_file = assert(agent.env("OUT_FILE"), "OUT_FILE is required")
local coll = agent.mongo.collection("tasks")
local done = false

local function worker(k)
    local docs = {}
    for i = 1, 5 do
        docs[i] = {_id = k * 100 + i, task = k, sq = (k * 100 + i) ^ 2}
    end
    local res, err = coll:insert_many(docs)
    if not res then return {error = err} end
    local got = {}
    for i = 1, 5 do
        local doc, ferr = coll:find_one({_id = k * 100 + i})
        if not doc then return {error = ferr or "missing"} end
        got[#got + 1] = doc.sq == (k * 100 + i) ^ 2 and doc.task == k
    end
    local upd = coll:update_many({task = k}, {["$set"] = {seen = true}})
    local n = coll:count({task = k, seen = true})
    local mine = coll:find({task = k}, {sort = {_id = 1}})
    return {inserted = res.inserted, matched = upd and upd.modified, counted = n, ok = got,
            ids = (function() local t = {} for i, d in ipairs(mine or {}) do t[i] = d._id end return t end)()}
end

return {
    batch = function()
        if done then
            agent.sleep(0.2)
            return 0
        end
        done = true
        local t0 = agent.monotonic()
        local tasks = {}
        for k = 1, 16 do
            tasks[k] = agent.spawn(worker, k)
        end
        local results = {}
        for k = 1, 16 do
            local ok, r = tasks[k]:join()
            results[k] = ok and r or {error = tostring(r)}
        end
        -- The same from a coroutine the script created itself: the call runs inline.
        local inline = coroutine.wrap(function() return coll:count({}) end)()
        local f = assert(io.open(out_file .. ".tmp", "w"))
        f:write(json.encode({results = results, total = coll:count({}), inline = inline,
                             elapsed = agent.monotonic() - t0}))
        f:close()
        assert(os.rename(out_file .. ".tmp", out_file))
        return 1
    end,
}
