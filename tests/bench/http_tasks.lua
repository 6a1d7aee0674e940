--[[ Benchmark script for `scripts/bench.sh http` (not a test). MODE=rps: TASKS tasks loop
agent.http.get(URL) for SECONDS, then log "HTTPBENCH requests=N seconds=S errors=E". MODE=idle:
log "IDLE_BASE", wait 3 s (the baseline RSS is read then), spawn TASKS tasks that each sleep
60 s, log "TASKS_SLEEPING ...", and wait for them (SIGTERM wakes the sleeps). ]]
local agent = require "agent"
local http = require "agent.http"

local mode = agent.env("MODE", "rps")
local ntasks = tonumber(agent.env("TASKS", "64"))
local seconds = tonumber(agent.env("SECONDS", "5"))
local url = agent.env("URL", "")
local done = false

local function rps()
    local requests, errors = 0, 0
    local t0 = agent.monotonic()
    local deadline = t0 + seconds
    local tasks = {}
    for i = 1, ntasks do
        tasks[i] = agent.spawn(function()
            while agent.monotonic() < deadline do
                local res = http.get(url)
                if res and res.status == 200 then
                    requests = requests + 1
                else
                    errors = errors + 1
                end
            end
        end)
    end
    for i = 1, ntasks do
        tasks[i]:join()
    end
    agent.log.info("HTTPBENCH requests=%d seconds=%.3f errors=%d", requests,
                   agent.monotonic() - t0, errors)
end

local function idle()
    agent.log.info("IDLE_BASE")
    agent.sleep(3)
    local tasks = {}
    for i = 1, ntasks do
        tasks[i] = agent.spawn(agent.sleep, 60)
    end
    agent.sleep(0.5) -- every task has started and is waiting
    collectgarbage()
    agent.log.info("TASKS_SLEEPING n=%d lua_kib=%d", ntasks, collectgarbage("count"))
    for i = 1, ntasks do
        tasks[i]:join()
    end
end

return {
    batch = function()
        if done then
            agent.sleep(1)
            return 0
        end
        done = true
        if mode == "rps" then rps() else idle() end
        return 1
    end,
}
