#!/usr/bin/python3
"""Probe latency while the control store hangs, and the time from SIGTERM to exit with a request
stuck in the store.

usage: probes_bench.py AGENTHOST SCRIPT [SECONDS]

1. MongoDB blackholed (the wire-protocol test server of tests/mongo reads requests and never
   answers), 8 clients looping on the store routes (4 GET /api/cluster/history, 4 POST
   /api/cluster/pause): GET /healthz on a fresh connection every 20 ms for SECONDS (default 10);
   p50/p99/max latency, and failures (no 200 within 1 s).
2. The same on the embedded store while this process holds its write lock (BEGIN IMMEDIATE).
3. SHUTDOWN_TIMEOUT=3, embedded store locked, one POST /api/cluster/pause stuck in the store:
   the time from SIGTERM to the process exit (median of 3).

Prints one line per measure, then "RESULT key=value ..." for scripts/bench.sh.
"""
import http.client
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "mongo"))
from mongo_fixture import MongoTestServer  # noqa: E402

PROBE_TIMEOUT = 1.0
SHUTDOWN_TIMEOUT = 3.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, timeout):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def wait_status(port, path, status, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if request(port, "GET", path, 1.0) == status:
                return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def start_agent(agenthost, script, tmp, env_extra):
    port = free_port()
    env = dict(os.environ, HTTP_PORT=str(port), HTTP_BIND="127.0.0.1", AGENT_ID="bench-probes",
               LOG_LEVEL="warn", AGENTHOST_STATE=os.path.join(tmp, "state.db"), MONGODB_URI="")
    env.update(env_extra)
    log = open(os.path.join(tmp, "agent.log"), "ab")
    proc = subprocess.Popen([agenthost, script], env=env, stdout=log, stderr=log)
    if not wait_status(port, "/readyz", 200, 20):
        proc.kill()
        proc.wait()
        raise SystemExit(f"the agent did not become ready (log in {tmp}/agent.log)")
    return proc, port


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Flood:
    def __init__(self, port, clients=8):
        self.port = port
        self.done = threading.Event()
        paths = [("GET", "/api/cluster/history"), ("POST", "/api/cluster/pause?reason=flood")]
        self.threads = [threading.Thread(target=self.loop, args=paths[i % 2], daemon=True)
                        for i in range(clients)]
        for t in self.threads:
            t.start()

    def loop(self, method, path):
        while not self.done.is_set():
            try:
                request(self.port, method, path, 30)
            except OSError:
                time.sleep(0.05)

    def stop(self):
        self.done.set()


def probe_latencies(port, seconds):
    samples, failures = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            ok = request(port, "GET", "/healthz", PROBE_TIMEOUT) == 200
        except OSError:
            ok = False
        took = (time.perf_counter() - started) * 1000.0
        if ok:
            samples.append(took)
        else:
            failures += 1
        time.sleep(0.02)
    return samples, failures


def summary(label, samples, failures):
    samples.sort()
    p50 = statistics.median(samples) if samples else float("nan")
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] if samples else float("nan")
    print(f"{label}: /healthz p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {max(samples or [0]):.2f} "
          f"ms over {len(samples)} probes, {failures} failed")
    return p50, p99, failures


def bench_blackhole(agenthost, script, seconds):
    srv = MongoTestServer(mode="replset").start()
    tmp = tempfile.mkdtemp(prefix="ah-probes-mongo.")
    try:
        proc, port = start_agent(agenthost, script, tmp,
                                 {"MONGODB_URI": srv.uri, "MONGODB_DATABASE": "agenthost"})
        try:
            srv.blackhole(seconds + 60)
            flood = Flood(port)
            time.sleep(1.0)  # let the clients fill the store workers and the queue
            result = summary("MongoDB blackholed, 8 clients on the store routes",
                             *probe_latencies(port, seconds))
            flood.stop()
            srv.heal()
        finally:
            proc.kill()  # the flood's requests may still wait: no need for a clean stop
            proc.wait()
    finally:
        srv.close()
    return result


def bench_sqlite_lock(agenthost, script, seconds):
    tmp = tempfile.mkdtemp(prefix="ah-probes-sqlite.")
    proc, port = start_agent(agenthost, script, tmp, {})
    holder = sqlite3.connect(os.path.join(tmp, "state.db"), isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")
        flood = Flood(port)
        time.sleep(1.0)
        result = summary("embedded store write-locked by another process, 8 clients",
                         *probe_latencies(port, seconds))
        flood.stop()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        stop(proc)
    return result


def bench_sigterm(agenthost, script, runs=3):
    times = []
    for _ in range(runs):
        tmp = tempfile.mkdtemp(prefix="ah-probes-term.")
        proc, port = start_agent(agenthost, script, tmp,
                                 {"SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT)})
        holder = sqlite3.connect(os.path.join(tmp, "state.db"), isolation_level=None, timeout=0)
        holder.execute("BEGIN IMMEDIATE")
        stuck = threading.Thread(target=lambda: request(port, "POST", "/api/cluster/pause", 30),
                                 daemon=True)
        stuck.start()
        time.sleep(0.5)  # the POST reaches the store and waits on the lock
        started = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        times.append(time.perf_counter() - started)
        holder.execute("ROLLBACK")
        holder.close()
        print(f"  SIGTERM → exit {times[-1]:.2f} s (exit code {rc})")
    med = statistics.median(times)
    print(f"SIGTERM with a POST stuck in the store, SHUTDOWN_TIMEOUT={SHUTDOWN_TIMEOUT:g}: median "
          f"{med:.2f} s, max {max(times):.2f} s of {runs}")
    return med, max(times)


def main():
    agenthost, script = sys.argv[1], sys.argv[2]
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    bh = bench_blackhole(agenthost, script, seconds)
    lk = bench_sqlite_lock(agenthost, script, seconds)
    term_med, term_max = bench_sigterm(agenthost, script)
    print(f"RESULT blackhole_p50_ms={bh[0]:.2f} blackhole_p99_ms={bh[1]:.2f} "
          f"blackhole_failed={bh[2]} locked_p50_ms={lk[0]:.2f} locked_p99_ms={lk[1]:.2f} "
          f"locked_failed={lk[2]} sigterm_median_s={term_med:.2f} sigterm_max_s={term_max:.2f} "
          f"shutdown_timeout_s={SHUTDOWN_TIMEOUT:g}")


if __name__ == "__main__":
    main()
