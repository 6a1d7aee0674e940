--[[ Fixture for tests/e2e/test_queue.py: the agent.queue ownership fence and the retry limit,
through the real binary. init runs both scenarios against $COLLECTION and writes what every call
returned to $OUT_FILE as JSON. Two queue objects with different owners stand for two agents. ]]
local agent = require "agent"
local fixture = require "lib.fixture"

local out_file = assert(agent.env("OUT_FILE"), "OUT_FILE is required")
local collection = agent.env("COLLECTION", "queue_jobs")


local M = {}

function M.init()
    local r = {}
    local coll = agent.mongo.collection(collection)

    -- 1. The lease of "first" expires, "second" claims the job, "first" acks too late.
    local first = agent.queue.open { collection = coll, lease = 0.2, owner = "first" }
    local second = agent.queue.open { collection = coll, lease = 30, owner = "second" }
    assert(first:enqueue({ _id = "late-ack", payload = { n = 1 } }))
    local mine = fixture.claim_within(first, 10)
    r.first_claim_attempts = mine and mine.attempts
    local theirs = fixture.claim_within(second, 10) -- only possible once first's lease has expired
    r.second_claim_id = theirs and theirs._id
    r.second_claim_attempts = theirs and theirs.attempts
    local ack = fixture.pack(first:ack(mine, { by = "first" }))
    r.late_ack = { ack[1], ack[2] }
    local late_fail = fixture.pack(first:fail(mine, "late"))
    r.late_fail = { late_fail[1], late_fail[2] }
    local own = fixture.pack(second:ack(theirs, { by = "second" }))
    r.owner_ack = { own[1], own[2] }

    -- 2. max_attempts = 3: each fail sends the job back to pending until the third attempt.
    local q = agent.queue.open { collection = coll, lease = 30, owner = "retry", max_attempts = 3 }
    assert(q:enqueue({ _id = "flaky", payload = { n = 2 } }))
    r.after_fail = {}
    for attempt = 1, 4 do
        local job = fixture.claim_within(q, attempt < 4 and 10 or 0)
        if job == nil then
            r.after_fail[attempt] = "unclaimable"
            break
        end
        local ok, err = q:fail(job, "attempt " .. attempt)
        assert(ok == true, err)
        local doc = assert(coll:find_one({ _id = "flaky" }))
        r.after_fail[attempt] = { doc.status, doc.attempts }
    end

    -- 3. renew's values, enqueue of an empty list, ack after a failed attempt.
    local e = agent.queue.open { collection = coll, lease = 30, owner = "edges", max_attempts = 3 }
    local before = coll:count({})
    local ids = assert(e:enqueue({}))
    r.empty_enqueue = { #ids, coll:count({}) - before }
    assert(e:enqueue({ _id = "renewed", payload = { n = 3 } }))
    local job = fixture.claim_within(e, 10)
    r.renew = fixture.pack(e:renew(job))
    assert(e:fail(job, "first try failed"))
    job = fixture.claim_within(e, 10)
    r.renew_after_fail = fixture.pack(e:renew(job))
    assert(e:ack(job, { ok = true }) == true)
    r.renew_after_ack = fixture.pack(e:renew(job))

    fixture.write_report(out_file, r)
end

function M.batch()
    agent.sleep(1)
    return 0
end

return M
