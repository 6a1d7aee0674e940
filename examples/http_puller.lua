--[[ Pulls a paginated JSON API with N concurrent tasks (agent.spawn + agent.http) and stores what
it pulls: into MongoDB with agent.mongo when MongoDB is configured, else it logs each page. Stops
cleanly on pause and shutdown without losing a page: a task finishes (or gives back) the page in
hand, and the checkpoint only moves past pages that were stored.

    API_URL=https://api.example.com/items CONCURRENCY=8 agenthost examples/http_puller.lua

The API: GET API_URL?page=N (PAGE_PARAM) answers 200 with {"items": [...]}; an empty list means
"no more pages yet" (the agent polls that page again later, so new pages are picked up).

Environment:
  API_URL             the endpoint (required)
  PAGE_PARAM          query parameter carrying the page number (default "page")
  FIRST_PAGE          page to start from when there is no checkpoint (default 1)
  CONCURRENCY         tasks fetching pages at once (default 4)
  API_TOKEN           if set, sent as "Authorization: Bearer <token>"
  REQUEST_TIMEOUT     seconds per request (default 10)
  ITEMS_COLLECTION    where items go with MongoDB (default "pulled_items"); each item is stored
                      as {_id = "<page>:<index>", page, item}, so a page stored twice is not
                      duplicated
  STATE_COLLECTION    where the checkpoint lives with MongoDB (default "puller_state")

Without MongoDB the checkpoint lives in memory: a restarted agent starts at FIRST_PAGE again. ]]
local agent = require "agent"
local http = require "agent.http"
local json = agent.json

local api_url = assert(agent.env("API_URL"), "API_URL is required")
local page_param = agent.env("PAGE_PARAM", "page")
local first_page = tonumber(agent.env("FIRST_PAGE", "1"))
local concurrency = tonumber(agent.env("CONCURRENCY", "4"))
local token = agent.env("API_TOKEN")
local request_timeout = tonumber(agent.env("REQUEST_TIMEOUT", "10"))
local use_mongo = (agent.env("AGENT_MONGODB_URI") or agent.env("MONGODB_URI") or "") ~= ""

local items_coll, state_coll -- agent.mongo collections, when use_mongo

-- Pages: `next_page` is the next page nobody has claimed; `retry` holds pages given back (a
-- failed request, a stop in the middle); `stored` marks pages whose items are stored. The
-- checkpoint is the lowest page not yet stored: everything below it is safe.
local next_page
local retry = {}
local stored = {}
local checkpoint
local reached_end = false

local pages_total = agent.metrics.counter("puller_pages_total", "Pages fetched and stored.")
local items_total = agent.metrics.counter("puller_items_total", "Items stored.")
local errors_total = agent.metrics.counter("puller_errors_total", "Failed page requests.")

local M = {}

local function load_checkpoint()
    if not use_mongo then
        return first_page
    end
    local doc, err = state_coll:find_one({_id = agent.id})
    if err then
        error("cannot read the checkpoint: " .. err)
    end
    return doc and doc.checkpoint or first_page
end

local function save_checkpoint()
    while stored[checkpoint] do
        stored[checkpoint] = nil
        checkpoint = checkpoint + 1
    end
    if use_mongo then
        local _, err = state_coll:update_one({_id = agent.id},
                                             {["$set"] = {checkpoint = checkpoint}},
                                             {upsert = true})
        if err then
            agent.log.warn("checkpoint not saved (kept in memory): %s", err)
        end
    end
end

-- The next page to fetch (given-back pages first, lowest first), or nil once this batch saw
-- the end.
local function claim()
    if reached_end then
        return nil
    end
    if #retry > 0 then
        table.sort(retry, function(a, b) return a > b end)
        return table.remove(retry)
    end
    local page = next_page
    next_page = next_page + 1
    return page
end

local function give_back(page)
    retry[#retry + 1] = page
end

local function store(page, items)
    if not use_mongo then
        agent.log.info("page %d: %d items (first: %s)", page, #items, json.encode(items[1]))
        return true
    end
    local docs = {}
    for i, item in ipairs(items) do
        docs[i] = {_id = page .. ":" .. i, page = page, item = item}
    end
    -- Unordered: a page stored before (a retry after a crash) only reports duplicates.
    local res, err, code = items_coll:insert_many(docs, {ordered = false})
    if res or code == 11000 then
        return true
    end
    agent.log.error("page %d not stored: %s", page, err)
    return false
end

-- True when the task should stop taking pages: shutdown, or any command pending (a pause is
-- applied only after the batch, so finish quickly). agent.sleep(0) also lets other tasks run.
local function should_yield_batch()
    return agent.should_stop() or agent.sleep(0) ~= false
end

local function fetch_pages()
    local count = 0
    while not should_yield_batch() do
        local page = claim()
        if page == nil then
            break
        end
        local res, err, code = http.get(api_url, {
            query = {[page_param] = page},
            headers = token and {Authorization = "Bearer " .. token} or nil,
            timeout = request_timeout,
        })
        local ok, doc = false, nil
        if res and res.status == 200 then
            ok, doc = pcall(json.decode, res.body)
        end
        if not (ok and type(doc) == "table") then
            give_back(page)
            errors_total:inc()
            agent.log.warn("page %d: %s", page, res and ("HTTP " .. res.status) or err)
            break -- the page is retried next batch (after the host's idle back-off)
        elseif type(doc.items) ~= "table" or #doc.items == 0 then
            give_back(page) -- not there yet: poll it again next batch
            reached_end = true
        elseif store(page, doc.items) then
            stored[page] = true
            pages_total:inc()
            items_total:inc(#doc.items)
            count = count + #doc.items
        else
            give_back(page)
            break
        end
    end
    return count
end

function M.init()
    if use_mongo then
        items_coll = agent.mongo.collection(agent.env("ITEMS_COLLECTION", "pulled_items"))
        state_coll = agent.mongo.collection(agent.env("STATE_COLLECTION", "puller_state"))
    end
    checkpoint = load_checkpoint()
    next_page = checkpoint
    agent.log.info("http_puller: %s from page %d, %d tasks, storing in %s", api_url, checkpoint,
                   concurrency, use_mongo and "MongoDB" or "the log")
end

function M.batch()
    reached_end = false
    local tasks = {}
    for i = 1, concurrency do
        tasks[i] = agent.spawn(fetch_pages)
    end
    local count = 0
    for _, t in ipairs(tasks) do
        local ok, n = t:join()
        if ok then
            count = count + n
        else
            agent.log.error("fetch task failed: %s", n)
        end
    end
    -- Every task has ended: each claimed page is stored or back in `retry` (fetched first next
    -- batch), so the checkpoint only passes stored pages.
    save_checkpoint()
    return count
end

function M.on_pause()
    agent.log.info("http_puller paused at checkpoint %d", checkpoint)
end

function M.on_resume()
    agent.log.info("http_puller resumed at checkpoint %d", checkpoint)
end

function M.on_shutdown()
    save_checkpoint()
    agent.log.info("http_puller stopped at checkpoint %d", checkpoint)
end

return M
