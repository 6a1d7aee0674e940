-- Returns 1 when agent.json is lua-cjson and survives a round trip.
local agent = require "agent"
local M = {}
function M.batch()
    local cjson = require "cjson"
    local doc = { name = "agent-1", items = { 1, 2, 3 }, nested = { ok = true, pi = 3.5 } }
    local back = agent.json.decode(agent.json.encode(doc))
    local ok = agent.json == cjson
        and back.name == "agent-1" and #back.items == 3 and back.items[3] == 3
        and back.nested.ok == true and back.nested.pi == 3.5
        and agent.json.encode({ 1, 2, 3 }) == "[1,2,3]"
        and agent.json.decode("null") == agent.json.null
    return ok and 1 or 0
end
return M
