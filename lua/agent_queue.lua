--[[ agent.queue: a job queue in a MongoDB collection, in pure Lua on agent.mongo
(docs/LUA_MONGO.md). Every state change is one atomic single-document write, so any number of
agents can share a collection.

A job is a document {_id, status, payload, attempts, owner, lease_until, claimed_at, result,
error, done_at, created_at}; status goes pending -> claimed -> done | failed (or back to
pending on release, on fail with attempts left, or when its lease expired). A claim is fenced by
(owner, attempts): ack/fail/release of a job whose lease expired and that someone else has
claimed since does nothing and says so.

    local q = agent.queue.open { collection = "jobs", lease = 30, owner = agent.id }
    local jobs, err = q:claim(10)
    for _, job in ipairs(jobs) do q:ack(job, { answer = 42 }) end

Runtime failures return nil, message (and the driver's code); misuse raises. ]]
local agent = require "agent"
local agent_core = require "agent.core"
local mongo = require "agent.mongo"

local format, tostring, type = string.format, tostring, type

local M = {}

local Queue = {}
Queue.__index = Queue

local function now_date(offset_seconds)
    local d = mongo.date()
    if offset_seconds then
        d.ms = d.ms + math.floor(offset_seconds * 1000)
    end
    return d
end

--[[ agent.queue.open(opts) -> queue. opts:
  collection    collection name or an agent.mongo collection object (default "jobs")
  db            database for a collection name (default: agent.mongo's database)
  lease         seconds a claim is valid before others may reclaim it (default 30)
  owner         claim owner (default agent.id)
  max_attempts  claims a job gets before fail() marks it failed (default 3)
  sort          claim order, as ordered pairs (default {{"_id", 1}}: oldest first)
  release_on_close  false: keep this object's claims when the host closes the script (default
                true: a reload or a shutdown releases them, see release_held)
  index         false: do not create the claim index (default true: created by the first claim,
                see claim_index_keys) ]]
local OPEN_OPTIONS = { "collection", "db", "lease", "owner", "max_attempts", "sort",
                       "release_on_close", "index" }

function M.open(opts)
    opts = opts or {}
    if type(opts) ~= "table" then
        error("agent.queue.open: options table expected", 2)
    end
    for k in pairs(opts) do
        local known = false
        for _, name in ipairs(OPEN_OPTIONS) do
            known = known or k == name
        end
        if not known then
            local meant = type(k) == "string" and agent_core.suggest(k, OPEN_OPTIONS)
            error(format("agent.queue.open: unknown option '%s'%s", tostring(k),
                         meant and format(" (did you mean '%s'?)", meant) or ""), 2)
        end
    end
    local coll = opts.collection or "jobs"
    if type(coll) == "string" then
        coll = mongo.collection(coll, opts.db)
    elseif type(coll) ~= "userdata" then
        error("agent.queue.open: collection must be a name or a collection object", 2)
    end
    local lease = opts.lease or 30
    if type(lease) ~= "number" or lease <= 0 then
        error("agent.queue.open: lease must be a positive number of seconds", 2)
    end
    local max_attempts = opts.max_attempts or 3
    if type(max_attempts) ~= "number" or max_attempts < 1 then
        error("agent.queue.open: max_attempts must be >= 1", 2)
    end
    if opts.index ~= nil and type(opts.index) ~= "boolean" then
        error("agent.queue.open: index must be a boolean", 2)
    end
    if opts.release_on_close ~= nil and type(opts.release_on_close) ~= "boolean" then
        error("agent.queue.open: release_on_close must be a boolean", 2)
    end
    local q = setmetatable({
        coll = coll,
        index_pending = opts.index ~= false,
        lease = lease,
        owner = tostring(opts.owner or agent.id),
        max_attempts = max_attempts,
        sort = opts.sort or { { "_id", 1 } },
        held = {}, -- tostring(_id) -> job, the claims this queue object believes it holds
        held_count = 0,
    }, Queue)
    if opts.release_on_close ~= false then
        agent._release_on_close(q, Queue.release_held)
    end
    return q
end

local function id_key(job)
    return tostring(job._id)
end

function Queue:_hold(job)
    local key = id_key(job)
    if self.held[key] == nil then
        self.held_count = self.held_count + 1
    end
    self.held[key] = job
end

function Queue:_drop(job)
    local key = id_key(job)
    if self.held[key] ~= nil then
        self.held_count = self.held_count - 1
        self.held[key] = nil
    end
end

-- The filter that matches a job only while this queue still holds the claim it made.
function Queue:_fence(job)
    return { _id = job._id, status = "claimed", owner = self.owner, attempts = job.attempts }
end

--[[ The keys of the index claim needs: status, then the sort keys, so that both branches of the
claim filter (pending; claimed with an expired lease) are index scans already in claim order. ]]
local function claim_index_keys(sort)
    local keys = { { "status", 1 } }
    if type(sort) == "table" and sort[1] ~= nil then
        for _, pair in ipairs(sort) do
            keys[#keys + 1] = { pair[1], pair[2] }
        end
    elseif type(sort) == "table" then
        for k, v in pairs(sort) do
            keys[#keys + 1] = { k, v }
        end
    end
    return keys
end
M.claim_index_keys = claim_index_keys

-- Creates the claim index once per queue object (createIndexes is a no-op when it exists). A
-- failure (e.g. a user without the createIndex privilege) is logged once and claiming goes on.
function Queue:_ensure_index()
    self.index_pending = false
    local name, err = self.coll:create_index(claim_index_keys(self.sort))
    if name == nil then
        agent.log.warn("agent.queue: cannot create the claim index on %s (%s); claims scan the "
            .. "collection until it exists (open with index = false to skip)", tostring(self.coll),
            tostring(err))
    end
end

--[[ q:claim(n) -> jobs[, err]: claims up to n jobs, one atomic find_one_and_update each, taking
pending jobs and claimed ones whose lease has expired. jobs is always a table (possibly empty);
err is set when a failure stopped the claiming early (jobs then holds what was claimed before).
A reclaimed job that already had max_attempts claims is marked failed instead. ]]
function Queue:claim(n)
    n = n or 1
    if type(n) ~= "number" or n < 1 then
        error("claim: n must be a positive number", 2)
    end
    if self.index_pending then
        self:_ensure_index()
    end
    local jobs = {}
    while #jobs < n do
        local now = now_date()
        local job, err, code = self.coll:find_one_and_update(
            { ["$or"] = {
                { status = "pending" },
                { status = "claimed", lease_until = { ["$lt"] = now } },
            } },
            {
                ["$set"] = {
                    status = "claimed",
                    owner = self.owner,
                    claimed_at = now,
                    lease_until = now_date(self.lease),
                },
                ["$inc"] = { attempts = 1 },
            },
            { new = true, sort = self.sort })
        if job == nil then
            if err ~= nil then
                return jobs, format("claim: %s", err), code
            end
            break -- nothing left to claim
        end
        if (job.attempts or 0) > self.max_attempts then
            -- It keeps coming back (its owners died mid-job): stop retrying it.
            self.coll:update_one(self:_fence(job), { ["$set"] = {
                status = "failed", error = "lease expired after the last attempt",
                done_at = now_date(),
            }, ["$unset"] = { lease_until = "" } })
        else
            self:_hold(job)
            jobs[#jobs + 1] = job
        end
    end
    return jobs
end

-- Raises "<what>: job table expected" at the level of whoever called the public method that
-- calls this (before the method indexes job).
local function check_job(job, what)
    if type(job) ~= "table" or job._id == nil then
        error(what .. ": job table expected", 3)
    end
end

-- Runs a fenced update of a held job (checked by the caller). true, or false + "lost" when the
-- claim is gone, or nil, err, code.
function Queue:_finish(job, update, what)
    local res, err, code = self.coll:update_one(self:_fence(job), update)
    if res == nil then
        return nil, format("%s: %s", what, err), code
    end
    self:_drop(job)
    if res.matched == 0 then
        return false, "lost"
    end
    return true
end

--[[ q:ack(job [, result]) -> true | false, "lost" | nil, err: marks the job done with its result. ]]
function Queue:ack(job, result)
    check_job(job, "ack")
    local set = { status = "done", done_at = now_date() }
    if result ~= nil then
        set.result = result
    end
    -- error goes: it belonged to an earlier failed attempt, not to this result
    return self:_finish(job, { ["$set"] = set, ["$unset"] = { lease_until = "", error = "" } },
        "ack")
end

--[[ q:fail(job, err) -> true | false, "lost" | nil, err: back to pending with the error while the
job has attempts left (attempts < max_attempts), otherwise status "failed". ]]
function Queue:fail(job, why)
    check_job(job, "fail")
    local message = tostring(why)
    local update
    if (job.attempts or 0) < self.max_attempts then
        update = { ["$set"] = { status = "pending", error = message },
                   ["$unset"] = { owner = "", lease_until = "" } }
    else
        update = { ["$set"] = { status = "failed", error = message, done_at = now_date() },
                   ["$unset"] = { lease_until = "" } }
    end
    return self:_finish(job, update, "fail")
end

--[[ q:release(job) -> true | false, "lost" | nil, err: gives an unprocessed claim back (pending;
the claim does not count as an attempt). ]]
function Queue:release(job)
    check_job(job, "release")
    return self:_finish(job, {
        ["$set"] = { status = "pending" },
        ["$unset"] = { owner = "", lease_until = "" },
        ["$inc"] = { attempts = -1 },
    }, "release")
end

--[[ q:release_all() -> n | nil, err: releases every job this owner has claimed (also ones this
queue object does not know about, e.g. from a previous run with the same owner). ]]
function Queue:release_all()
    local res, err, code = self.coll:update_many({ status = "claimed", owner = self.owner }, {
        ["$set"] = { status = "pending" },
        ["$unset"] = { owner = "", lease_until = "" },
        ["$inc"] = { attempts = -1 },
    })
    if res == nil then
        return nil, format("release_all: %s", err), code
    end
    self.held, self.held_count = {}, 0
    return res.modified
end

--[[ q:release_held() -> n[, err]: releases every claim this queue object holds (held_jobs), each
fenced like release; n counts the jobs given back, err is the first failure. The host calls it
before it closes the script (reload, shutdown) unless the queue was opened with
release_on_close = false. ]]
function Queue:release_held()
    if self.held_count == 0 then
        return 0
    end
    local n, first_err = 0, nil
    for _, job in ipairs(self:held_jobs()) do
        local ok, err = self:release(job)
        if ok then
            n = n + 1
        elseif ok == nil and first_err == nil then
            first_err = err
        end
    end
    agent.log.info("agent.queue: released %d claim(s) on %s%s", n, tostring(self.coll),
        first_err and (" (" .. first_err .. ")") or "")
    return n, first_err
end

--[[ q:renew(job) -> true | false, "lost" | nil, err: extends a held claim by another lease. ]]
function Queue:renew(job)
    check_job(job, "renew")
    local res, err, code = self.coll:update_one(self:_fence(job),
        { ["$set"] = { lease_until = now_date(self.lease) } })
    if res == nil then
        return nil, format("renew: %s", err), code
    end
    if res.matched == 0 then
        return false, "lost"
    end
    return true
end

--[[ q:reclaim_expired() -> n | nil, err: puts every claim whose lease expired back to pending. ]]
function Queue:reclaim_expired()
    local res, err, code = self.coll:update_many(
        { status = "claimed", lease_until = { ["$lt"] = now_date() } },
        { ["$set"] = { status = "pending" }, ["$unset"] = { owner = "", lease_until = "" } })
    if res == nil then
        return nil, format("reclaim_expired: %s", err), code
    end
    return res.modified
end

--[[ q:enqueue(jobs) -> ids | nil, err: inserts jobs (one table, or an array of tables), each as
{payload = job.payload or the table itself, status = "pending", attempts = 0, created_at}. A
table with a payload field keeps its other fields too (e.g. _id, priority). ]]
function Queue:enqueue(jobs)
    if type(jobs) ~= "table" then
        error("enqueue: table expected", 2)
    end
    if next(jobs) == nil then
        return {} -- an empty list: nothing to insert (a job with no payload is {payload = {}})
    end
    if jobs[1] == nil then
        jobs = { jobs }
    end
    local docs, created = {}, now_date()
    for i, job in ipairs(jobs) do
        local doc = {}
        if type(job) == "table" and job.payload ~= nil then
            for k, v in pairs(job) do
                doc[k] = v
            end
        else
            doc.payload = job
        end
        doc.status, doc.attempts, doc.created_at = "pending", 0, created
        docs[i] = doc
    end
    local res, err, code = self.coll:insert_many(docs)
    if res == nil then
        return nil, format("enqueue: %s", err), code
    end
    return res.inserted_ids
end

--[[ q:stats() -> {pending = n, claimed = n, done = n, failed = n} | nil, err ]]
function Queue:stats()
    local rows, err, code = self.coll:aggregate({
        { ["$group"] = { _id = "$status", n = { ["$sum"] = 1 } } },
    })
    if rows == nil then
        return nil, format("stats: %s", err), code
    end
    local out = { pending = 0, claimed = 0, done = 0, failed = 0 }
    for _, row in ipairs(rows) do
        if type(row._id) == "string" then
            out[row._id] = row.n
        end
    end
    return out
end

--[[ q:held_jobs() -> the jobs this queue object has claimed and not yet acked/failed/released. ]]
function Queue:held_jobs()
    local out = {}
    for _, job in pairs(self.held) do
        out[#out + 1] = job
    end
    return out
end

M.Queue = Queue
return M
