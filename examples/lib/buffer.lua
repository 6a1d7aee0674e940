--[[ A bounded in-memory buffer of records that flushes to an append-only JSON Lines file.
Local module of examples/buffered_writer.lua: it sits next to the script under lib/ and is
loaded with `require "lib.buffer"` (the script's directory comes first in package.path).

    local buffer = require "lib.buffer"
    local buf = buffer.new{ path = "/tmp/out.jsonl", capacity = 100, encode = agent.json.encode }
    buf:push(record)            -- true when the buffer is full and should be flushed
    local n, err = buf:flush()  -- n records written, or nil, err (records kept for a retry)
]]
local Buffer = {}
Buffer.__index = Buffer

local function new(opts)
    assert(type(opts.path) == "string", "buffer.new: path must be a string")
    assert(type(opts.encode) == "function", "buffer.new: encode must be a function")
    return setmetatable({
        path = opts.path,
        capacity = opts.capacity or 100,
        encode = opts.encode,
        records = {},
        written = 0,
    }, Buffer)
end

function Buffer:push(record)
    self.records[#self.records + 1] = record
    return #self.records >= self.capacity
end

function Buffer:size()
    return #self.records
end

-- Appends every buffered record as one JSON line and empties the buffer. On an I/O error the
-- records stay buffered and nil, err is returned (runtime failures are values, not errors).
function Buffer:flush()
    local n = #self.records
    if n == 0 then
        return 0
    end
    local lines = {}
    for i = 1, n do
        lines[i] = self.encode(self.records[i])
    end
    local f, err = io.open(self.path, "a")
    if not f then
        return nil, err
    end
    local ok, werr = f:write(table.concat(lines, "\n"), "\n")
    local closed, cerr = f:close()
    if not ok or not closed then
        return nil, werr or cerr
    end
    self.records = {}
    self.written = self.written + n
    return n
end

return { new = new }
