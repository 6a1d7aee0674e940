-- batch: agent.sleep(seconds from AH_TEST_SLEEP) → 1 if woken early, 0 if the time passed.
local agent = require "agent"
return {
    batch = function()
        return agent.sleep(tonumber(agent.env("AH_TEST_SLEEP", "30"))) and 1 or 0
    end,
}
