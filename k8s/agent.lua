-- The agent script deployed by k8s/kustomization.yaml (mounted at /etc/agenthost/agent.lua).
-- Replace the body of M.batch with your real work; the host calls it repeatedly while the
-- cluster is running and stops calling it while paused (see docs/LUA.md).
local agent = require "agent"

local M = {}

function M.init(ctx)
  agent.log.info("agent " .. agent.id .. " starting")
end

function M.batch(ctx)
  -- Pull one unit of work here and return how many items were done; 0 or nil means idle,
  -- and the host backs off (interruptibly, so pause/shutdown are applied promptly).
  return 0
end

function M.on_pause(ev)
  agent.log.info("paused by " .. tostring(ev.updated_by) .. ": " .. tostring(ev.reason))
end

function M.on_resume(ev)
  agent.log.info("resumed by " .. tostring(ev.updated_by) .. ": " .. tostring(ev.reason))
end

function M.on_shutdown(ev)
  agent.log.info("shutting down (" .. tostring(ev.source) .. ")")
end

return M
