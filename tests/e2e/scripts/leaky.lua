--[[ Fixture for tests/e2e/test_secrets.py: a script that tries to print its secrets. It raises
an error that quotes MONGODB_URI when LEAK_IN_ERROR is set (so `agenthost check` fails with it);
init logs the URI and the token it finds in the environment (agent.log) and, with
AGENT_MONGODB_URI set, makes an agent.mongo call that fails against an unreachable server and logs
the message (init runs while the control store is still unreachable). ]]
local agent = require "agent"

if agent.env("LEAK_IN_ERROR") then
    error("cannot use " .. tostring(agent.env("MONGODB_URI")))
end

local M = {}

function M.init()
    agent.log.info("uri " .. tostring(agent.env("AGENT_MONGODB_URI") or agent.env("MONGODB_URI")))
    agent.log.info("token " .. tostring(agent.env("AGENT_API_TOKEN")))
    if agent.env("AGENT_MONGODB_URI") then
        local _, msg = agent.mongo.collection("things"):find_one({ x = 1 })
        agent.log.info("find_one failed: " .. tostring(msg))
    end
end

function M.batch()
    agent.sleep(0.2)
end

return M
