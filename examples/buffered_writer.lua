--[[ A realistic agent: every batch produces a few records into an in-memory buffer; the buffer
is flushed to a JSON Lines file when it is full, and also in on_pause and on_shutdown so that
nothing is left in memory while the agent is paused or after it stops.

    OUTPUT_FILE=/tmp/out.jsonl BUFFER_SIZE=50 agenthost examples/buffered_writer.lua

The buffer lives in a module next to this script (examples/lib/buffer.lua), found by require
because the script's directory comes first in package.path. ]]
local agent = require "agent"
local buffer = require "lib.buffer"

local M = {}

local output = agent.env("OUTPUT_FILE", "/tmp/agenthost-output.jsonl")
local capacity = tonumber(agent.env("BUFFER_SIZE", "20")) or 20
local per_batch = 5
local buf
local sequence = 0

local function flush(why)
    local n, err = buf:flush()
    if n == nil then
        agent.log.error("flush (%s) to %s failed, %d records kept: %s", why, output, buf:size(), err)
        return false
    end
    if n > 0 then
        agent.log.info("flushed %d records to %s (%s)", n, output, why)
    end
    return true
end

function M.init(ctx)
    buf = buffer.new { path = output, capacity = capacity, encode = agent.json.encode }
    agent.log.info("buffered writer: %s, flush every %d records", output, capacity)
end

function M.batch(ctx)
    for _ = 1, per_batch do
        sequence = sequence + 1
        local full = buf:push {
            agent_id = agent.id,
            seq = sequence,
            batch = ctx.iteration,
            at = agent.now(),
        }
        if full then
            flush("buffer full")
        end
    end
    -- Pace the producer; a command (pause, shutdown) cuts the wait short.
    agent.sleep(0.5)
    return per_batch
end

function M.on_pause(ev)
    flush("paused: " .. ev.reason)
end

function M.on_resume(ev)
    agent.log.info("resuming at record %d (source: %s)", sequence + 1, ev.source)
end

function M.on_shutdown(ev)
    if flush("shutdown") then
        agent.log.info("wrote %d records in total to %s", buf.written, output)
    end
end

return M
