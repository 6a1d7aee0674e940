-- batch: agent.sleep(seconds from AH_TEST_SLEEP) → 1 if woken early, 0 if the time passed; a
-- cancelled sleep (nil, msg, code) raises msg.
local agent = require "agent"
return {
    batch = function()
        local woken, msg, code = agent.sleep(tonumber(agent.env("AH_TEST_SLEEP", "30")))
        if code then
            error(msg, 0)
        end
        return woken and 1 or 0
    end,
}
