#!/usr/bin/python3
"""The time a drain takes: POST /api/cluster/pause?drain=2s while 64 tasks each wait on an HTTP
request that never answers (their own timeout is 60 s), to /readyz answering 503.

usage: drain_bench.py AGENTHOST [ROUNDS]

One agent on a fresh embedded store runs tests/e2e/scripts/drain.lua (MODE=hang, 64 tasks) against
a local server that reads each request and never answers. Each round: wait until the batch's 64
requests hang at the server, POST pause?drain=2s, poll /readyz every 5 ms until 503 (the time
printed), check that every task saw "cancelled", then resume (the next batch hangs again).
ROUNDS rounds (default 5); the median and the worst are reported.

Prints one line per round, then "RESULT key=value ..." for scripts/bench.sh.
"""
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "e2e", "scripts", "drain.lua")
TASKS = 64
DRAIN_S = 2.0


class Hang(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        with self.server.lock:
            self.server.count += 1
        self.server.release.wait(300)
        self.close_connection = True


class HangServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address):
        pass

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Hang)
        self.lock = threading.Lock()
        self.count = 0
        self.release = threading.Event()

    def requests(self):
        with self.lock:
            return self.count


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def status_of(port, path):
    """The status GET path answers, None when the agent does not answer."""
    try:
        return request(port, "GET", path, 1.0)[0]
    except OSError:
        return None


def wait_until(predicate, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise SystemExit(f"drain_bench: timed out waiting for {what}")


def events(path):
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (FileNotFoundError, ValueError):
        return []


def main():
    binary = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    tmp = tempfile.mkdtemp(prefix="ah-drain-bench.")
    srv = HangServer()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = free_port()
    events_file = os.path.join(tmp, "events.jsonl")
    env = dict(os.environ, HTTP_PORT=str(port), HTTP_BIND="127.0.0.1", MONGODB_URI="",
               AGENTHOST_STATE=os.path.join(tmp, "state.db"), AGENT_ID="bench-drain",
               EVENTS_FILE=events_file, MODE="hang", TASKS=str(TASKS),
               HANG_URL=f"http://127.0.0.1:{srv.server_address[1]}/hang", HTTP_TIMEOUT="60")
    log = open(os.path.join(tmp, "agent.log"), "w")
    proc = subprocess.Popen([binary, SCRIPT], env=env, stdout=log, stderr=subprocess.STDOUT)
    times = []
    try:
        wait_until(lambda: status_of(port, "/readyz") == 200, 15, "the agent")
        for r in range(rounds):
            wait_until(lambda: srv.requests() >= TASKS * (r + 1), 30, f"{TASKS} hanging requests")
            t0 = time.monotonic()
            status, body = request(port, "POST", f"/api/cluster/pause?drain={DRAIN_S:g}s")
            if status != 200:
                raise SystemExit(f"drain_bench: pause answered {status}: {body!r}")
            wait_until(lambda: status_of(port, "/readyz") == 503, 30, "/readyz 503")
            elapsed = time.monotonic() - t0
            times.append(elapsed)
            ends = [e for e in events(events_file) if e.get("ev") == "task_end"
                    and e.get("batch") == r + 1]
            cancelled = sum(e.get("code") == "cancelled" for e in ends)
            print(f"round {r + 1}: POST pause?drain={DRAIN_S:g}s -> /readyz 503 in "
                  f"{elapsed:.3f} s ({cancelled} of {TASKS} tasks saw \"cancelled\" by then)")
            status, _ = request(port, "POST", "/api/cluster/resume")
            if status != 200:
                raise SystemExit(f"drain_bench: resume answered {status}")
            wait_until(lambda: status_of(port, "/readyz") == 200, 15, "/readyz 200")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        srv.release.set()
        srv.shutdown()
        log.close()
    print(f"RESULT median_s={statistics.median(times):.3f} max_s={max(times):.3f} "
          f"drain_s={DRAIN_S:g} tasks={TASKS} rounds={rounds}")


if __name__ == "__main__":
    main()
