--[[ Benchmark script for `scripts/bench.sh jit` (not a test): what LUA_MEMORY_LIMIT costs a
CPU-heavy batch, whose limit turns LuaJIT's JIT compiler off (docs/LUA.md). The first batch runs
four kernels of plain Lua work and logs the CPU time of each (os.clock: the process's CPU time, so
a loaded machine slows it less than wall time would), then "JITBENCH done"; later batches idle.
The bench runs it with and without a limit and compares. SCALE multiplies the work (default 1). ]]
local agent = require "agent"

local scale = tonumber(agent.env("SCALE", "1"))

local kernels = {}

-- Arithmetic on numbers and an array: what the JIT compiler helps most.
function kernels.numeric()
    local values = {}
    for i = 1, 100000 do
        values[i] = i * 0.5
    end
    local s = 0
    for _ = 1, 800 * scale do
        for i = 1, #values do
            s = s + values[i] * 1.0001 - s * 0.0001
        end
    end
    return math.floor(s)
end

-- Building, formatting and scanning strings (string.format, .., find, sub, byte).
function kernels.string()
    local n = 0
    for i = 1, 1200000 * scale do
        local line = string.format("id=%d name=item%d", i, i % 100)
        local at = line:find("name=", 1, true)
        local name = line:sub(at + 5)
        n = n + #name + line:byte(4)
    end
    return n
end

-- Records as small tables: create, sort with a comparator, group by a key.
function kernels.table()
    local total = 0
    for _ = 1, 400 * scale do
        local rows = {}
        for i = 1, 1000 do
            rows[i] = { id = i, score = (i * 7919) % 1000, tag = "t" .. (i % 10) }
        end
        table.sort(rows, function(a, b) return a.score < b.score end)
        local by_tag = {}
        for _, r in ipairs(rows) do
            by_tag[r.tag] = (by_tag[r.tag] or 0) + r.score
        end
        total = total + by_tag.t3
    end
    return total
end

-- Encoding and decoding JSON (agent.json is C: the JIT has little to do here).
function kernels.json()
    local doc = { items = {} }
    for i = 1, 100 do
        doc.items[i] = { id = i, name = "item" .. i, tags = { "a", "b" }, price = i * 1.5 }
    end
    local n = 0
    for _ = 1, 2000 * scale do
        local text = agent.json.encode(doc)
        n = n + #agent.json.decode(text).items
    end
    return n
end

local done = false

return {
    batch = function()
        if done then
            agent.sleep(1)
            return 0
        end
        done = true
        for _, name in ipairs({ "numeric", "string", "table", "json" }) do
            collectgarbage()
            local t0 = os.clock()
            local result = kernels[name]()
            agent.log.info("JITBENCH kernel=%s cpu_ms=%.1f result=%s", name,
                           (os.clock() - t0) * 1000, tostring(result))
        end
        agent.log.info("JITBENCH done jit=%s", tostring(jit and jit.status()))
        return 0
    end,
}
