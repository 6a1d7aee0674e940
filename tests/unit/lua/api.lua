-- Checks the agent module with no shared state (agenthost check): returns 1 if all is as
-- documented, else raises naming the first difference.
local agent = require "agent"
local M = {}
function M.batch()
    assert(agent.id == "unit-agent", "agent.id")
    assert(agent.state() == "running", "state() without a state object")
    assert(agent.should_stop() == false, "should_stop()")
    assert(agent.sleep(0) == false, "sleep(0)")
    assert(agent.sleep(0.001) == false, "sleep(0.001)")
    assert(agent.env("AH_TEST_SURELY_UNSET", "dflt") == "dflt", "env default")
    assert(agent.env("AH_TEST_SURELY_UNSET") == nil, "env without default")
    assert(agent.env("AH_TEST_SET", "dflt") == "value", "env set")
    assert(type(agent.now()) == "number" and agent.now() > 1.6e9, "now()")
    local t0 = agent.monotonic()
    assert(agent.monotonic() >= t0, "monotonic()")
    agent.log.info("plain message with %s kept as is")
    agent.log.info("formatted %d %s", 42, "ok")
    agent.log.debug("debug %d", 1)
    agent.log.warn("warn")
    agent.log.error("error")
    assert(not pcall(agent.sleep, -1), "sleep(-1) raises")
    assert(not pcall(agent.sleep, 0 / 0), "sleep(NaN) raises")
    assert(not pcall(agent.sleep, "x"), "sleep('x') raises")
    return 1
end
function M.on_pause()
    agent.sleep(-1)
end
return M
