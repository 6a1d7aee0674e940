--[[ Fixture for tests/e2e/test_lua_mongo_edges.py: the edges of agent.mongo's pool and of
agent.queue's ownership fence, through the real binary. The first batch runs $MODE and writes
what every call returned to $OUT_FILE as JSON:
  getmore_failure  a find_iter whose getMore the server fails (the test's fail point), then a
                   find_one on the same pool (maxPoolSize=1) while the iterator is still referenced
  renew_fence      "first" claims a job with a short lease, "second" claims it once the lease
                   expired, then first renews it ]]
local agent = require "agent"
local fixture = require "lib.fixture"

local out_file = assert(agent.env("OUT_FILE"), "OUT_FILE is required")
local mode = agent.env("MODE", "getmore_failure")

local modes = {}

local held -- the iterator stays referenced after the batch, so it is never collected

function modes.getmore_failure(r)
    local coll = agent.mongo.collection("docs")
    local it = assert(coll:find_iter({}, { batch_size = 2, sort = { _id = 1 } }))
    held = it
    local first, second = it:next(), it:next() -- the first batch
    r.first_batch = { first and first._id, second and second._id }
    local failed = fixture.pack(it:next()) -- the next batch: getMore, failed at the server
    r.getmore = { failed[1] == nil, failed[2], failed[3] }
    local t0 = agent.monotonic()
    local doc, msg, code = coll:find_one({ _id = 3 })
    r.find_one = { doc and doc._id, msg, code, agent.monotonic() - t0 }
    r.after_failure = fixture.pack(it:next()).n -- a failed iterator stays ended
end

function modes.renew_fence(r)
    local coll = agent.mongo.collection("queue_jobs")
    local first = agent.queue.open { collection = coll, lease = 0.2, owner = "first" }
    local second = agent.queue.open { collection = coll, lease = 30, owner = "second" }
    assert(first:enqueue({ _id = "fenced", payload = { n = 1 } }))
    local mine = assert(fixture.claim_within(first, 10))
    local theirs = assert(fixture.claim_within(second, 10)) -- once first's lease has expired
    local before = assert(coll:find_one({ _id = "fenced" }))
    r.claims = { mine.attempts, theirs.attempts, before.owner }
    r.renew = fixture.pack(first:renew(mine))
    local after = assert(coll:find_one({ _id = "fenced" }))
    r.lease_kept = after.owner == "second" and after.lease_until == before.lease_until
    r.after = { after.owner, after.status, after.attempts }
    r.owner_renew = fixture.pack(second:renew(theirs))
end

local M = {}

M.batch = fixture.first_batch(function()
    local r = {}
    modes[mode](r)
    fixture.write_report(out_file, r)
end)

return M
