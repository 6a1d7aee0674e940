"""examples/http_puller.lua against a local paginated JSON API: every page is stored exactly
once across a pause in the middle of the run, and shutdown stops at a checkpoint past the last
stored page; with MongoDB configured, the items and the checkpoint go there."""
import json
import re
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import sys

from agenthost_harness import MONGO_DIR, REPO, agent_env, wait_for

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server  # noqa: E402,F401

PAGES = 30
PER_PAGE = 5


class Api(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        q = parse_qs(urlparse(self.path).query)
        page = int(q["page"][0])
        time.sleep(0.05)  # a slow API: a pause arrives while requests are in flight
        items = [{"id": (page - 1) * PER_PAGE + i} for i in range(PER_PAGE)] \
            if 1 <= page <= PAGES else []
        body = json.dumps({"items": items}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_http_puller_stores_every_page_once_across_pause_and_shutdown(fleet, state_file):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        a = fleet.start(f"{REPO}/examples/http_puller.lua", name="puller",
                        env=agent_env(state_file, CONCURRENCY=4,
                                      API_URL=f"http://127.0.0.1:{srv.server_address[1]}/items"))
        a.wait_log(r"page \d+: 5 items")
        assert a.post("/api/agent/pause").status == 200
        a.wait_state("paused")
        a.wait_log(r"http_puller paused at checkpoint \d+")
        stored_at_pause = len(a.find_logs(r"page \d+: 5 items"))
        assert stored_at_pause < PAGES, "the pause came too late to test anything"
        assert a.post("/api/agent/resume").status == 200
        wait_for(lambda: len(a.find_logs(r"page \d+: 5 items")) >= PAGES, 30,
                 message="every page stored")
        a.signal(signal.SIGTERM)
        assert a.wait_exit(20) == 0, a.log_text()
        pages = [int(re.search(r"page (\d+):", l).group(1))
                 for l in a.find_logs(r"page \d+: 5 items")]
        assert sorted(pages) == list(range(1, PAGES + 1)), pages  # each exactly once
        assert a.find_logs(rf"http_puller stopped at checkpoint {PAGES + 1}\b"), a.log_text()
        assert not a.find_logs(r"\[ERROR\]"), a.log_text()
    finally:
        srv.shutdown()
        srv.server_close()


def test_http_puller_stores_pages_in_mongodb(fleet, state_file, mongo_server):
    """With MongoDB configured the pages go to agent.mongo (from the fetching tasks, each insert
    waiting on the thread pool), one document per item, and the checkpoint is kept there."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        env = agent_env(state_file, CONCURRENCY=4, AGENT_MONGODB_URI=mongo_server.uri,
                        AGENT_MONGODB_DATABASE="puller",
                        API_URL=f"http://127.0.0.1:{srv.server_address[1]}/items")
        a = fleet.start(f"{REPO}/examples/http_puller.lua", name="puller-mongo", env=env)
        db = mongo_server.client().puller
        wait_for(lambda: db.pulled_items.count_documents({}) >= PAGES * PER_PAGE, 30,
                 message="every item stored")
        a.signal(signal.SIGTERM)
        assert a.wait_exit(20) == 0, a.log_text()
        items = sorted(d["item"]["id"] for d in db.pulled_items.find({}))
        assert items == list(range(PAGES * PER_PAGE)), items[:10]
        state = db.puller_state.find_one({"_id": "puller-mongo"})
        assert state is not None and state["checkpoint"] == PAGES + 1, state
        assert not a.find_logs(r"\[ERROR\]"), a.log_text()
    finally:
        srv.shutdown()
        srv.server_close()
