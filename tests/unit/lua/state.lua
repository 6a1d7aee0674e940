-- With a shared state object: iteration 1 reports "starting" and no shutdown, iteration 2
-- (after the test offered a shutdown) reports should_stop.
local agent = require "agent"
return {
    batch = function(ctx)
        if ctx.iteration == 1 then
            return (agent.state() == "starting" and not agent.should_stop()) and 1 or 0
        end
        return agent.should_stop() and 1 or 0
    end,
}
