--[[ The `agent` module offered to scripts (docs/LUA.md): `local agent = require "agent"`.
The C half ("agent.core", registered by core/ah_lua.c) talks to the host; this file shapes
the public table. Functions that misuse the API (bad arguments) raise; none of them yields. ]]
local core = require "agent.core"
local json = require "cjson"

local format, select, tostring = string.format, select, tostring

local agent = {
    id = core.id(),           -- this agent's name (AGENT_ID)
    state = core.state,       -- "starting" | "running" | "paused" | "stopping" | "stopped"
    sleep = core.sleep,       -- agent.sleep(s) -> true if woken early by a command or shutdown
    should_stop = core.should_stop, -- true once shutdown was requested
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
            log(level, format(fmt, ...))
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
local Counter, Gauge = {}, {}
Counter.__index, Gauge.__index = Counter, Gauge
function Counter:inc(n)
    n = n or 1
    if type(n) ~= "number" or n < 0 or n ~= n then
        error("agent.metrics: a counter only goes up (inc needs a number >= 0)", 2)
    end
    metric_update(self.index, "add", n)
end
function Counter:value() return metric_get(self.index) end
function Gauge:set(v) metric_update(self.index, "set", v) end
function Gauge:add(v) metric_update(self.index, "add", v) end
function Gauge:value() return metric_get(self.index) end

agent.metrics = {
    counter = function(name, help)
        return setmetatable({ name = name, index = core.metric_declare("counter", name, help) }, Counter)
    end,
    gauge = function(name, help)
        return setmetatable({ name = name, index = core.metric_declare("gauge", name, help) }, Gauge)
    end,
}

-- agent.memory() -> bytes used by this script's Lua state, LUA_MEMORY_LIMIT (0: none)
agent.memory = core.memory

-- agent.mongo (core/mongo/ahm_lua.c, in the MongoDB plugin) and agent.queue
-- (lua/agent_queue.lua) are loaded on first use, so a script that never touches MongoDB pays
-- nothing. Reference: docs/LUA_MONGO.md.
local lazy_modules = { mongo = "agent.mongo", queue = "agent.queue" }
setmetatable(agent, {
    __index = function(t, key)
        local name = lazy_modules[key]
        if name == nil then
            return nil
        end
        local module = require(name)
        rawset(t, key, module)
        return module
    end,
})

return agent
