--[[ Fixture: work that must run on one agent of the fleet. agent.every(SWEEP_EVERY, sweep,
{lease = "sweep"}) records each run's start and end (agent, token, ctx.missed, lease:held()) as
JSON lines in $EVENTS_FILE; the tests check that no two agents' runs overlap and how tokens move.
Knobs (environment): EVENTS_FILE (required), SWEEP_EVERY (seconds or a cron expression,
default 1), LEASE_TTL (default 3), SWEEP_SECONDS (how long a run takes, default 0.2), SWEEP_LEASE
(the lease name, default "sweep"; "none": no lease). ]]
local agent = require "agent"
local json = agent.json

local events_file = assert(agent.env("EVENTS_FILE"), "EVENTS_FILE is required")
local every = agent.env("SWEEP_EVERY", "1")
every = tonumber(every) or every
local ttl = tonumber(agent.env("LEASE_TTL", "3"))
local run_seconds = tonumber(agent.env("SWEEP_SECONDS", "0.2"))
local lease_name = agent.env("SWEEP_LEASE", "sweep")

local function record(rec)
    rec.t = agent.now()
    rec.agent = agent.id
    local f = assert(io.open(events_file, "a"))
    f:write(json.encode(rec), "\n")
    f:close()
end

local lease = lease_name ~= "none" and agent.lease(lease_name, {ttl = ttl}) or nil

agent.every(every, function(ctx)
    record({ev = "start", token = ctx.token, missed = ctx.missed,
            held = lease and lease:held() or false, state = agent.state()})
    local _, msg, code = agent.sleep(run_seconds)
    record({ev = "end", token = ctx.token, held = lease and lease:held() or false, code = code,
            msg = msg})
end, lease and {lease = lease_name, ttl = ttl} or nil)

return {
    init = function()
        record({ev = "init"})
    end,
    batch = function()
        agent.sleep(0.05)
        return 0
    end,
}
