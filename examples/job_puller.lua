--[[ The reference pulling agent: claims jobs from a MongoDB collection in batches, processes them
and records the results, with agent.queue (docs/LUA_MONGO.md). Run as many copies as you like
against the same collection: every claim is atomic and leased, so each job is done once.

    MONGODB_URI=mongodb://localhost:27017/?replicaSet=rs0 BATCH_SIZE=20 \
        agenthost examples/job_puller.lua

A job is {status = "pending", payload = {n = <integer>, text = <string>}} (see q:enqueue). The
work is a small deterministic computation (sum of squares 1..n and a checksum of text) so results
can be checked; JOB_WORK_MS adds simulated work time per job.

Environment:
  JOBS_COLLECTION     collection holding the jobs (default "jobs")
  BATCH_SIZE          jobs claimed per batch (default 10)
  JOB_LEASE           seconds a claim is valid before another agent may take it (default 30)
  JOB_MAX_ATTEMPTS    claims a job gets before it is marked failed (default 3)
  JOB_WORK_MS         simulated work per job in milliseconds (default 0)
  RESULTS_COLLECTION  if set, also insert one {job_id, agent, result, at} document per processed
                      job (an audit trail: a job processed twice would show up twice)

Lifecycle: on_pause gives back the claims the agent has not started (another agent can take
them while this one is paused); on_resume logs the stats; on_shutdown releases every claim still
held, so a stopped agent never strands jobs. A batch that is asked to stop (a command arrived
during the simulated work) finishes the job in hand and leaves the rest to those hooks. ]]
local agent = require "agent"

local format = string.format

local M = {}

local collection = agent.env("JOBS_COLLECTION", "jobs")
local batch_size = tonumber(agent.env("BATCH_SIZE", "10")) or 10
local lease = tonumber(agent.env("JOB_LEASE", "30")) or 30
local max_attempts = tonumber(agent.env("JOB_MAX_ATTEMPTS", "3")) or 3
local work_seconds = (tonumber(agent.env("JOB_WORK_MS", "0")) or 0) / 1000
local results_name = agent.env("RESULTS_COLLECTION", "")

local queue, results
local waiting = {} -- claimed jobs not started yet (left over when a batch stops early)
local stats = { processed = 0, failed = 0, released = 0, batches = 0 }
local started_at

-- The work: deterministic in the payload. Raises on a bad payload (the job then fails).
local function process(job)
    local payload = job.payload
    if type(payload) ~= "table" then
        error("payload must be a document")
    end
    local n = tonumber(payload.n) or 0
    if n < 0 or n > 1e6 or n % 1 ~= 0 then
        error("payload.n must be an integer 0..1000000")
    end
    local sum = 0
    for i = 1, n do
        sum = sum + i * i
    end
    local text = tostring(payload.text or "")
    local checksum = 0
    for i = 1, #text do
        checksum = (checksum * 31 + text:byte(i)) % 2147483647
    end
    return { sum_squares = sum, checksum = checksum, length = #text, by = agent.id }
end

-- Processes one claimed job and records the outcome. Returns true if a command arrived during
-- the simulated work (the caller stops starting new jobs).
local function run(job)
    local interrupted = false
    if work_seconds > 0 then
        interrupted = agent.sleep(work_seconds)
    end
    local ok, result = pcall(process, job)
    if ok then
        if results then
            local _, err = results:insert_one { job_id = job._id, agent = agent.id, result = result,
                                                at = agent.mongo.date() }
            if err then
                agent.log.warn("job %s: cannot record the result: %s", tostring(job._id), err)
            end
        end
        local acked, err = queue:ack(job, result)
        if acked then
            stats.processed = stats.processed + 1
        else
            agent.log.warn("job %s: ack failed: %s", tostring(job._id), err)
        end
    else
        stats.failed = stats.failed + 1
        agent.log.warn("job %s failed (attempt %s): %s", tostring(job._id), tostring(job.attempts),
                       result)
        local _, err = queue:fail(job, result)
        if err then
            agent.log.warn("job %s: cannot record the failure: %s", tostring(job._id), err)
        end
    end
    return interrupted
end

local function release_waiting(why)
    local n = 0
    for i = #waiting, 1, -1 do
        local job = table.remove(waiting, i)
        if queue:release(job) then
            n = n + 1
        end
    end
    stats.released = stats.released + n
    if n > 0 then
        agent.log.info("released %d claimed job(s) not started (%s)", n, why)
    end
    return n
end

function M.init(ctx)
    started_at = agent.monotonic()
    queue = agent.queue.open { collection = collection, lease = lease, owner = agent.id,
                               max_attempts = max_attempts }
    if results_name ~= "" then
        results = agent.mongo.collection(results_name)
    end
    -- Claims are looked up by status then _id: keep that fast. Failure is not fatal (logged).
    local _, err = agent.mongo.collection(collection):create_index({ { "status", 1 }, { "_id", 1 } })
    if err then
        agent.log.warn("job_puller: cannot create the jobs index: %s", err)
    end
    -- Claims this agent held when it last died are given back right away.
    local released = queue:release_all()
    agent.log.info("job_puller: collection %s, batch %d, lease %gs%s", collection, batch_size,
                   lease, released and released > 0 and format(", released %d stale claims", released) or "")
end

function M.batch(ctx)
    local jobs, err = queue:claim(batch_size)
    if err then
        agent.log.warn("job_puller: %s", err)
    end
    if #jobs == 0 then
        return 0 -- idle: the host backs off
    end
    stats.batches = stats.batches + 1
    for i = #jobs, 1, -1 do -- a stack: run() pops from the end
        waiting[#waiting + 1] = jobs[i]
    end
    local done = 0
    while #waiting > 0 do
        local job = table.remove(waiting)
        local interrupted = run(job)
        done = done + 1
        if interrupted or agent.should_stop() then
            break -- a command is waiting: the hooks deal with the rest
        end
    end
    agent.log.info("job_puller: batch %d: %d job(s) done, %d total (%d failed)", ctx.iteration,
                   done, stats.processed, stats.failed)
    return done
end

function M.on_pause(ev)
    release_waiting("paused")
    agent.log.info("job_puller paused (%s): %d processed so far", ev.reason, stats.processed)
end

function M.on_resume(ev)
    local elapsed = agent.monotonic() - started_at
    local counts = queue:stats()
    agent.log.info("job_puller resumed: %d processed in %.1fs (%.1f jobs/s), %d failed, %d released%s",
                   stats.processed, elapsed, stats.processed / math.max(elapsed, 1e-3),
                   stats.failed, stats.released,
                   counts and format("; queue: %d pending, %d claimed, %d done, %d failed",
                                     counts.pending, counts.claimed, counts.done, counts.failed) or "")
end

function M.on_shutdown(ev)
    release_waiting("shutdown")
    local n, err = queue:release_all()
    if err then
        agent.log.error("job_puller: cannot release claims at shutdown: %s", err)
    end
    agent.log.info("job_puller stopped: %d processed, %d failed, %d released",
                   stats.processed, stats.failed, stats.released + (n or 0))
end

return M
