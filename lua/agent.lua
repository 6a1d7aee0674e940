--[[ The `agent` module offered to scripts (docs/LUA.md): `local agent = require "agent"`.
The C half ("agent.core", core/ah_lua_core.c) talks to the host; this file shapes the public
table. Functions that misuse the API (bad arguments) raise. agent.sleep, task:join
and agent.http suspend the calling task (a coroutine on the worker's loop) while they wait. ]]
local core = require "agent.core"
local json = require "cjson"

local format, select, tostring = string.format, select, tostring
local pairs, pcall, setmetatable, type = pairs, pcall, setmetatable, type

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
