--[[ The `agent` module offered to scripts (docs/LUA.md): `local agent = require "agent"`.
The C half ("agent.core", core/ah_lua_core.c) talks to the host; this file shapes the public
table. Functions that misuse the API (bad arguments) raise. agent.sleep, task:join
and agent.http suspend the calling task (a coroutine on the worker's loop) while they wait. ]]
local core = require "agent.core"
local json = require "cjson"

local format, select, tostring = string.format, select, tostring
local ipairs, pairs, pcall, setmetatable, type = ipairs, pairs, pcall, setmetatable, type

-- Misuse is reported at the line of the script that called the public function, not here:
-- calls fn(...) and re-raises its error `level` levels above the function that calls this
-- helper (2: that function's caller).
local function call_or_raise(level, fn, ...)
    local ok, res = pcall(fn, ...)
    if not ok then
        error(tostring(res), level + 1)
    end
    return res
end

local agent = {
    id = core.id(),           -- this agent's name (AGENT_ID)
    state = core.state,       -- "starting" | "running" | "paused" | "stopping" | "stopped"
    sleep = core.sleep,       -- agent.sleep(s) -> true if woken early by a command or shutdown
    spawn = core.spawn,       -- agent.spawn(fn, ...) -> task; task:join([timeout]) -> true, ...
    should_stop = core.should_stop, -- true once shutdown was requested
    pending = core.pending,   -- {command =, reason =, deadline = s left | nil} of the command
                              -- waiting to be applied, or nil
    shutdown = core.shutdown, -- agent.shutdown([reason]): a local, final shutdown of this agent
    env = core.env,           -- agent.env(name, default) -> os.getenv(name) or default
    now = core.now,           -- wall clock, seconds since the Unix epoch (with fractions)
    monotonic = core.monotonic, -- monotonic clock, seconds
    json = json,              -- lua-cjson
}

-- agent.log.info(msg) logs msg as is; agent.log.info(fmt, ...) logs string.format(fmt, ...).
-- Nothing is formatted when the level is disabled.
local function logger(level)
    local log, enabled = core.log, core.log_enabled
    return function(fmt, ...)
        if not enabled(level) then
            return
        end
        if select("#", ...) > 0 then
            local ok, msg = pcall(format, fmt, ...)
            if not ok then
                msg = tostring(msg):gsub("to '%?'", "to 'format'", 1)
                error(format("agent.log.%s: %s", level, msg), 2)
            end
            log(level, msg)
        else
            log(level, tostring(fmt))
        end
    end
end

agent.log = {
    debug = logger("debug"),
    info = logger("info"),
    warn = logger("warn"),
    error = logger("error"),
}

-- agent.metrics: script-defined Prometheus metrics, exported on /metrics with the host's own.
-- Declaring the same name again returns the same metric (so a reloaded script keeps counting).
local metric_update, metric_get = core.metric_update, core.metric_get
local getmetatable = getmetatable
local Counter, Gauge = {}, {}
Counter.__index, Gauge.__index = Counter, Gauge

-- Raises at the script's line unless m is a metric of `class` (catches metric.inc() written
-- with a dot). level: error's level as seen from the caller of this helper (2: its caller).
local function check_metric(m, class, call, level)
    if getmetatable(m) ~= class then
        error(format("agent.metrics: call %s with a colon (metric:%s)", call, call), level + 1)
    end
end

function Counter:inc(n)
    check_metric(self, Counter, "inc(n)", 2)
    n = n or 1
    if type(n) ~= "number" or n < 0 or n ~= n then
        error("agent.metrics: a counter only goes up (inc needs a number >= 0)", 2)
    end
    metric_update(self.index, "add", n)
end
function Counter:value()
    check_metric(self, Counter, "value()", 2)
    return metric_get(self.index)
end
local function check_gauge_value(gauge, v, what)
    check_metric(gauge, Gauge, what .. "(v)", 3)
    if type(v) ~= "number" then
        error(format("agent.metrics: gauge:%s needs a number (got %s)", what, type(v)), 3)
    end
end
function Gauge:set(v)
    check_gauge_value(self, v, "set")
    metric_update(self.index, "set", v)
end
function Gauge:add(v)
    check_gauge_value(self, v, "add")
    metric_update(self.index, "add", v)
end
function Gauge:value()
    check_metric(self, Gauge, "value()", 2)
    return metric_get(self.index)
end

-- Declares (or finds) the metric; a bad name or help, or the name taken by the other kind,
-- raises at the script's line.
local function declare(kind, class, name, help)
    if type(name) ~= "string" then
        error(format("agent.metrics.%s: name must be a string (got %s)", kind, type(name)), 3)
    end
    if help ~= nil and type(help) ~= "string" then
        error(format("agent.metrics.%s: help must be a string (got %s)", kind, type(help)), 3)
    end
    local index = call_or_raise(3, core.metric_declare, kind, name, help)
    return setmetatable({ name = name, index = index }, class)
end

agent.metrics = {
    -- not tail calls: the error levels above count this frame
    counter = function(name, help)
        local metric = declare("counter", Counter, name, help)
        return metric
    end,
    gauge = function(name, help)
        local metric = declare("gauge", Gauge, name, help)
        return metric
    end,
}

-- Objects that hold something for the script outside the process (agent.queue's claims) and
-- give it back when the host closes the state (reload, shutdown): object -> release function.
-- Weak keys: an object the script dropped is not kept alive for this.
local releasers = setmetatable({}, { __mode = "k" })

-- Internal (agent.queue): registers release(obj) to run before the state closes.
function agent._release_on_close(obj, release)
    releasers[obj] = release
end

-- Internal (called by the host before it closes the state): runs every registered release; a
-- failing one is logged and the others still run.
function agent._release()
    for obj, release in pairs(releasers) do
        local ok, err = pcall(release, obj)
        if not ok then
            agent.log.warn("releasing %s before the script closed failed: %s", tostring(obj),
                tostring(err))
        end
    end
end

-- ---- leases and schedules (docs/LUA.md, "Work that runs once per fleet") ----
-- The C half (core/ah_lua_lease.c) talks to the host's lease keeper (core/ah_lease.c), whose
-- thread does every store call: nothing here blocks the Lua thread.
local lease_core = require "agent.lease.core"
local DEFAULT_TTL = 15

local function lease_ttl(opts, level, what)
    if opts == nil then
        return DEFAULT_TTL
    end
    if type(opts) ~= "table" then
        error(format("%s: options must be a table", what), level + 1)
    end
    local ttl = opts.ttl
    if ttl == nil then
        return DEFAULT_TTL
    end
    if type(ttl) ~= "number" or ttl ~= ttl or ttl < 1 or ttl > 3600 then
        error(format("%s: ttl must be a number of seconds between 1 and 3600", what), level + 1)
    end
    return ttl
end

local Lease = {}
local LeaseMeta = {
    __index = function(self, key)
        if key == "token" then
            local _, token = lease_core.status(rawget(self, "name"))
            return token
        end
        return Lease[key]
    end,
    __tostring = function(self)
        return "lease " .. rawget(self, "name")
    end,
}

-- lease:acquire([timeout]) -> true | nil, msg, "timeout" | "cancelled" | "store"
function Lease:acquire(timeout)
    if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout or timeout < 0) then
        error("lease:acquire: timeout must be a non-negative number of seconds", 2)
    end
    local name = rawget(self, "name")
    if lease_core.status(name) then
        return true
    end
    local since = lease_core.want(name)
    local ok, msg, code = lease_core.wait(name, since, timeout)
    if not ok then
        return nil, msg, code
    end
    return lease_core.outcome(name, since)
end

-- lease:held() -> true only while this agent certainly holds it (local monotonic deadline)
function Lease:held()
    return (lease_core.status(rawget(self, "name")))
end

-- lease:release(): held() is false at once; the store write follows off the Lua thread
function Lease:release()
    lease_core.release(rawget(self, "name"))
end

-- agent.lease(name, {ttl = 15}) -> lease object
function agent.lease(name, opts)
    if type(name) ~= "string" then
        error("agent.lease: name must be a string", 2)
    end
    local ttl = lease_ttl(opts, 2, "agent.lease")
    local ok, err = lease_core.declare(name, ttl, false)
    if not ok then
        error("agent.lease: " .. err, 2)
    end
    return setmetatable({ name = name, ttl = ttl }, LeaseMeta)
end

-- agent.every(spec, fn, {lease = name, ttl = 15}): spec is seconds or a five-field cron
-- expression (UTC). Only from the main chunk or init; the host runs the schedules between
-- batches (agent._due).
local schedules = {}
local schedules_closed = false

function agent.every(spec, fn, opts)
    if schedules_closed then
        error("agent.every: only from the script's main chunk or init", 2)
    end
    local sched = { fn = fn }
    if type(spec) == "number" then
        if spec ~= spec or spec < 0.05 or spec > 366 * 86400 then
            error("agent.every: seconds must be between 0.05 and one year", 2)
        end
        sched.period = spec
        sched.spec = tostring(spec)
    elseif type(spec) == "string" then
        local next_at, err = lease_core.cron_next(spec, core.now())
        if next_at == nil then
            error("agent.every: " .. err, 2)
        end
        sched.cron = spec
        sched.spec = spec
    else
        error("agent.every: spec must be seconds or a cron expression", 2)
    end
    if type(fn) ~= "function" then
        error("agent.every: fn must be a function", 2)
    end
    if opts ~= nil and type(opts) ~= "table" then
        error("agent.every: options must be a table", 2)
    end
    if opts ~= nil and opts.lease ~= nil then
        if type(opts.lease) ~= "string" then
            error("agent.every: lease must be a lease name (a string)", 2)
        end
        local ttl = lease_ttl(opts, 2, "agent.every")
        local ok, err = lease_core.declare(opts.lease, ttl, true)
        if not ok then
            error("agent.every: " .. err, 2)
        end
        sched.lease = opts.lease
    end
    schedules[#schedules + 1] = sched
end

-- The next due time after `after` (monotonic seconds for periods, wall seconds for cron).
local function next_due(sched, after)
    if sched.period then
        return after + sched.period
    end
    local t = lease_core.cron_next(sched.cron, after)
    return t >= 0 and t or math.huge
end

-- Internal (the host, between batches, with the agent running): the function and ctx of a
-- schedule that is due now, or nil and the seconds until the next one is (nil: none). A
-- schedule whose lease this agent does not hold lets its due time pass.
function agent._due()
    local first = not schedules_closed
    schedules_closed = true
    local mono, wall = core.monotonic(), core.now()
    local soonest
    for _, sched in ipairs(schedules) do
        local now = sched.period and mono or wall
        if first or sched.at == nil then
            sched.at = next_due(sched, now)
        end
        if now >= sched.at then
            local due = sched.at
            local skipped = 0
            if sched.period then
                skipped = math.floor((now - due) / sched.period)
                sched.at = due + (skipped + 1) * sched.period
            else
                sched.at = next_due(sched, now)
                local t = lease_core.cron_next(sched.cron, due)
                while t >= 0 and t <= now and skipped < 1000000 do
                    skipped = skipped + 1
                    t = lease_core.cron_next(sched.cron, t)
                end
            end
            local held, token = true, nil
            if sched.lease then
                held, token = lease_core.status(sched.lease)
            end
            if held then
                return sched.fn, { missed = skipped, token = token, lease = sched.lease,
                                   spec = sched.spec }
            end
        end
        local wait = sched.at - now
        if soonest == nil or wait < soonest then
            soonest = wait
        end
    end
    return nil, soonest
end

-- agent.memory() -> bytes used by this script's Lua state, LUA_MEMORY_LIMIT (0: none)
agent.memory = core.memory

-- agent.http (lua/agent_http.lua over core/ah_lua_http.c), agent.mongo (core/mongo/ahm_lua.c, in
-- the MongoDB plugin) and agent.queue (lua/agent_queue.lua) are loaded on first use, so a script
-- that never touches them pays nothing. Reference: docs/LUA.md, docs/LUA_MONGO.md.
local lazy_modules = { mongo = "agent.mongo", queue = "agent.queue", http = "agent.http" }
setmetatable(agent, {
    __index = function(t, key)
        local name = lazy_modules[key]
        if name == nil then
            return nil
        end
        local module = call_or_raise(2, require, name)
        rawset(t, key, module)
        return module
    end,
})

return agent
