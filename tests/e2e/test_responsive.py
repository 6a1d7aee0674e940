"""The agent stays responsive while its control store hangs (docs/ARCHITECTURE.md, "Threads"):
store work runs on the HTTP module's store workers, never on libmicrohttpd's threads, so probes,
/metrics and the state routes answer from memory while cluster commands and history wait; the
store queue is bounded (503 + Retry-After when full); shutdown is bounded by SHUTDOWN_TIMEOUT
even with a request stuck in the store.

Faults: a second process holding the embedded store's write lock (BEGIN IMMEDIATE), and the
MongoDB test server's `blackhole` (it reads requests and never answers)."""
import os
import signal
import sys
import threading
import time

import pytest

from agenthost_harness import (MONGO_DIR, WriteLock, agent_env, http, metric, mongo_agent_env,
                               script, wait_for)

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server  # noqa: E402,F401

RECORDER = script("recorder.lua")
PROBE_TIMEOUT = 1.0  # what a Kubernetes probe would allow
STORE_WORKERS = 2  # core/ah_http_park.c
STORE_QUEUE_MAX = 32


class Flood:
    """Clients looping on store routes in threads until stop(); results are ignored (they time
    out, or answer 503, while the store hangs)."""

    def __init__(self, agent, history=4, pauses=2, timeout=30.0):
        self.agent = agent
        self.timeout = timeout
        self.done = threading.Event()
        self.threads = []
        for _ in range(history):
            self.threads.append(threading.Thread(target=self._loop, args=(
                "GET", "/api/cluster/history"), daemon=True))
        for _ in range(pauses):
            self.threads.append(threading.Thread(target=self._loop, args=(
                "POST", "/api/cluster/pause?reason=flood"), daemon=True))
        for t in self.threads:
            t.start()

    def _loop(self, method, path):
        while not self.done.is_set():
            try:
                http(method, self.agent.url + path, timeout=self.timeout)
            except OSError:
                time.sleep(0.05)  # refused or reset: the agent may be going away

    def stop(self):
        self.done.set()


def store_jobs(agent, state):
    return metric(agent, f'agenthost_http_store_jobs{{state="{state}"}}')


def assert_probes_answer(agent, seconds):
    """Every probe and in-memory route answers within PROBE_TIMEOUT, for `seconds`."""
    deadline = time.monotonic() + seconds
    tries = 0
    while time.monotonic() < deadline:
        for path in ("/healthz", "/readyz", "/metrics", "/api/agent/state",
                     "/api/cluster/control-state", "/api/mongo/status"):
            started = time.monotonic()
            r = agent.get(path, timeout=PROBE_TIMEOUT)
            assert r.status in (200, 503), (path, r.status, r.body)
            assert time.monotonic() - started < PROBE_TIMEOUT
        assert agent.get("/healthz", timeout=PROBE_TIMEOUT).status == 200
        tries += 1
    assert tries >= 3


def test_probes_answer_while_a_second_process_holds_the_store_lock_under_load(
        fleet, state_file, tmp_path):
    agent = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl"))
    agent.wait_state("running", timeout=15)
    lock = WriteLock(state_file)
    flood = Flood(agent)
    try:
        # the store calls are stuck in the store workers, not in libmicrohttpd's threads
        wait_for(lambda: store_jobs(agent, "running") == 2, 10, message="both store workers busy")
        assert_probes_answer(agent, 4.0)
        assert metric(agent, "agenthost_http_parked_requests") >= 2
    finally:
        flood.stop()
        lock.release()
    r = wait_for(lambda: (lambda r: r if r.status == 200 else None)(
        agent.post("/api/cluster/resume?reason=after", timeout=30)), 30,
        message="commands work again once the lock is released")
    assert r.json()["command"] == "running"
    assert agent.get("/api/cluster/history", timeout=30).status == 200


def test_a_full_store_queue_answers_503_with_retry_after_at_once(fleet, state_file, tmp_path):
    agent = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl"))
    agent.wait_state("running", timeout=15)
    lock = WriteLock(state_file)
    waiting = []
    clients = [threading.Thread(target=lambda: waiting.append(
        agent.post("/api/cluster/pause?reason=queued", timeout=60)), daemon=True)
        for _ in range(STORE_WORKERS + STORE_QUEUE_MAX)]
    try:
        for c in clients:
            c.start()
        wait_for(lambda: store_jobs(agent, "running") == STORE_WORKERS and
                 store_jobs(agent, "queued") == STORE_QUEUE_MAX, 20, message="a full queue")
        started = time.monotonic()
        r = agent.post("/api/cluster/pause?reason=one+too+many", timeout=PROBE_TIMEOUT)
        assert time.monotonic() - started < PROBE_TIMEOUT
        assert r.status == 503 and r.headers.get("Retry-After") == "1", (r.status, r.headers)
        assert "too many requests waiting for the control store" in r.json()["error"]
        hist = agent.get("/api/cluster/history", timeout=PROBE_TIMEOUT)
        assert hist.status == 503 and hist.headers.get("Retry-After") == "1", hist.body
        assert metric(agent, "agenthost_http_store_rejected_total") == 2
        assert agent.get("/healthz", timeout=PROBE_TIMEOUT).status == 200
    finally:
        lock.release()
    # the queue drains once the lock is gone: every waiting command is written
    for c in clients:
        c.join(timeout=60)
    assert sorted(r.status for r in waiting) == [200] * len(clients), \
        [(r.status, r.body) for r in waiting if r.status != 200]
    assert agent.get("/api/cluster/history?limit=1000").json()["count"] == len(clients)


def test_sigterm_with_a_request_stuck_in_the_store_exits_within_shutdown_timeout(
        fleet, state_file, tmp_path):
    agent = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl",
                                                SHUTDOWN_TIMEOUT=3))
    agent.wait_state("running", timeout=15)
    lock = WriteLock(state_file)
    answers = []
    client = threading.Thread(target=lambda: answers.append(
        agent.post("/api/cluster/pause?reason=stuck", timeout=30)), daemon=True)
    try:
        client.start()
        wait_for(lambda: store_jobs(agent, "running") == 1, 10, message="the POST is in the store")
        started = time.monotonic()
        agent.signal(signal.SIGTERM)
        rc = agent.wait_exit(timeout=20)
        took = time.monotonic() - started
    finally:
        lock.release()
    assert took < 10, f"exit took {took:.1f}s with SHUTDOWN_TIMEOUT=3:\n{agent.log_text()}"
    assert rc == 1, agent.log_text()  # the store call did not finish: not a clean exit
    assert agent.find_logs(r"SHUTDOWN_TIMEOUT"), agent.log_text()
    client.join(timeout=10)
    assert answers and answers[0].status == 503, answers  # answered, not dropped
    assert "shutting down" in answers[0].json()["error"]


def test_probes_answer_while_mongodb_is_blackholed_under_load(fleet, tmp_path, mongo_server):
    agent = fleet.start(RECORDER, env=mongo_agent_env(mongo_server.uri, tmp_path / "ev.jsonl"),
                        name="blackholed")
    agent.wait_state("running", timeout=20)
    mongo_server.blackhole(60)
    flood = Flood(agent)
    try:
        wait_for(lambda: store_jobs(agent, "running") == 2, 15, message="both store workers busy")
        assert_probes_answer(agent, 4.0)
    finally:
        flood.stop()
        mongo_server.heal()
    wait_for(lambda: agent.post("/api/cluster/resume?reason=healed", timeout=30).status == 200,
             60, interval=0.5, message="commands work again after the blackhole")


@pytest.mark.parametrize("mode", [{}, {"ENABLE_CHANGE_STREAMS": "false",
                                       "CONTROL_POLLING_INTERVAL": "0.5"}],
                         ids=["change_streams", "polling"])
def test_sigterm_while_mongodb_is_blackholed_exits_within_shutdown_timeout(
        fleet, tmp_path, mongo_server, mode):
    # Closing the store waits for its watcher, stuck in a read MongoDB never answers (about
    # 8-11 s before the shutdown timer): the timer armed at the signal ends the process at
    # SHUTDOWN_TIMEOUT.
    agent = fleet.start(RECORDER, env=mongo_agent_env(
        mongo_server.uri, tmp_path / "ev.jsonl", SHUTDOWN_TIMEOUT=1, **mode), name="closing")
    agent.wait_state("running", timeout=20)
    mongo_server.blackhole(60)
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    rc = agent.wait_exit(timeout=30)
    took = time.monotonic() - started
    mongo_server.heal()
    assert took < 5, f"exit took {took:.1f}s with SHUTDOWN_TIMEOUT=1:\n{agent.log_text()}"
    assert rc in (0, 1), agent.log_text()
