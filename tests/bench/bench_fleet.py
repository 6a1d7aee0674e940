"""Fleet benchmark (scripts/bench.sh fleet; docs/BENCHMARKS.md): BENCH_FLEET_AGENTS agents
(default 100) of tests/e2e/scripts/mongo_idle.lua on this machine,

  * on the MongoDB wire-protocol test server (tests/mongo, one-member replica set, change
    streams): the time from sending POST /api/cluster/{pause,resume}?wait=30 to its answer with
    "complete": true, for BENCH_FLEET_COMMANDS commands (default 3; target <= 1.5 s each), then
    the idle database commands per agent per minute counted at the server over
    BENCH_FLEET_IDLE_SECONDS (default 60; targets <= 6 getMore and <= 12 data commands, the
    status heartbeats included) and the connections per agent;
  * on the embedded store (one SQLite file): the same POST -> complete times.

Every agent has labels, region spread over 4 regions (eu, us, ap, sa) and role over 2; on both
stores a scoped pause and resume of one region with wait=30 are timed too (POST -> complete,
target <= 1.5 s), and on MongoDB the idle cost is measured with BENCH_FLEET_SCOPES (default 20)
scope documents present (same targets).

Prints one line per measurement ending in PASS/FAIL and exits 0 unless the bench itself broke
(an agent that would not start, an answer that was not 200)."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "mongo"))
from mongo_fixture import MongoTestServer  # noqa: E402

BIN = os.environ.get("AGENTHOST_BIN", os.path.join(ROOT, "build", "agenthost"))
SCRIPT = os.path.join(ROOT, "tests", "e2e", "scripts", "mongo_idle.lua")
AGENTS = int(os.environ.get("BENCH_FLEET_AGENTS", "100"))
COMMANDS = int(os.environ.get("BENCH_FLEET_COMMANDS", "3"))
IDLE_SECONDS = float(os.environ.get("BENCH_FLEET_IDLE_SECONDS", "60"))
SCOPES = int(os.environ.get("BENCH_FLEET_SCOPES", "20"))
COMPLETE_TARGET_S = 1.5
REGIONS = ["eu", "us", "ap", "sa"]


def labels_of(i):
    return f"region={REGIONS[i % len(REGIONS)]},role={'ingest' if i % 2 == 0 else 'api'}"


def http(method, url, timeout=60):
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Fleet:
    def __init__(self, env, tmp):
        self.procs = []
        self.ports = []
        for i in range(AGENTS):
            port = free_port()
            e = dict(os.environ, HTTP_PORT=str(port), HTTP_BIND="127.0.0.1",
                     AGENT_ID=f"bench-{i:03d}", EVENTS_FILE=os.path.join(tmp, f"e{i}.jsonl"),
                     LOG_LEVEL="warn", AGENT_LABELS=labels_of(i), **env)
            log = open(os.path.join(tmp, f"agent-{i}.log"), "w")
            self.procs.append(subprocess.Popen([BIN, "run", SCRIPT], env=e, stdout=log,
                                               stderr=subprocess.STDOUT))
            log.close()
            self.ports.append(port)

    def url(self, i):
        return f"http://127.0.0.1:{self.ports[i]}"

    def wait_ready(self, timeout=180):
        """True once agent 0 lists every agent running; else prints what it saw last."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                status, body = http("GET", self.url(0) + "/api/cluster/agents")
                last = (status, body.get("summary") if status == 200 else body)
                if status == 200 and body["summary"]["states"].get("running") == AGENTS:
                    return True
            except (OSError, ValueError) as e:
                last = repr(e)
            time.sleep(0.5)
        print(f"  last answer of agent 0: {last}")
        return False

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(p / 100.0 * (len(values) - 1)))))]


def run_commands(fleet, label):
    """COMMANDS alternating pause/resume with wait=30; returns False if the bench broke."""
    times = []
    for n in range(COMMANDS):
        cmd = "pause" if n % 2 == 0 else "resume"
        issuer = (n * 37) % AGENTS
        sent = time.monotonic()
        status, body = http("POST", fleet.url(issuer) + f"/api/cluster/{cmd}?wait=30&reason=bench")
        took = time.monotonic() - sent
        if status != 200:
            print(f"{label}: BENCH BROKEN: {cmd} answered {status}: {body}")
            return False
        w = body["wait"]
        times.append(took)
        print(f"  {label} {cmd} v{body['version']}: POST -> complete {took:.3f} s "
              f"(complete={w['complete']}, acknowledged {len(w['acknowledged'])}, "
              f"pending {len(w['pending'])}, excluded {len(w['excluded'])}, "
              f"waited_s {w['waited_s']})")
        if not w["complete"]:
            times[-1] = float("inf")
        time.sleep(1)  # let the fleet settle between commands (hooks, status writes)
    worst = max(times)
    print(f"{label}: {AGENTS} agents, POST -> every agent applied: max {worst:.3f} s, "
          f"p50 {percentile(times, 50):.3f} s of {COMMANDS} (target <= {COMPLETE_TARGET_S} s "
          f"each) {'PASS' if worst <= COMPLETE_TARGET_S else 'FAIL'}")
    return True


def run_scoped(fleet, label):
    """A scoped pause and resume of region=eu with wait=30, timed; False if the bench broke."""
    times = []
    expected = sum(1 for i in range(AGENTS) if labels_of(i).startswith("region=eu,"))
    for n, cmd in enumerate(("pause", "resume")):
        issuer = (n * 37 + 1) % AGENTS  # any agent, matching or not
        sent = time.monotonic()
        status, body = http("POST", fleet.url(issuer) +
                            f"/api/cluster/{cmd}?selector=region%3Deu&wait=30&reason=bench")
        took = time.monotonic() - sent
        if status != 200:
            print(f"{label}: BENCH BROKEN: scoped {cmd} answered {status}: {body}")
            return False
        w = body["wait"]
        ok = w["complete"] and len(w["acknowledged"]) == expected
        times.append(took if ok else float("inf"))
        print(f"  {label} {cmd}?selector=region=eu v{body['version']}: POST -> complete "
              f"{took:.3f} s (complete={w['complete']}, acknowledged {len(w['acknowledged'])} "
              f"of {expected} matching, pending {len(w['pending'])}, "
              f"excluded {len(w['excluded'])}, waited_s {w['waited_s']})")
        time.sleep(1)
    worst = max(times)
    print(f"{label} scoped: {AGENTS} agents over {len(REGIONS)} regions, POST "
          f"?selector=region=eu&wait=30 -> every matching agent applied: max {worst:.3f} s "
          f"(target <= {COMPLETE_TARGET_S} s) {'PASS' if worst <= COMPLETE_TARGET_S else 'FAIL'}")
    return True


def make_scopes(fleet, label):
    """SCOPES scope documents that hold nobody (resumes of zone=zNN); False if the bench broke."""
    for n in range(SCOPES):
        status, body = http("POST", fleet.url(n % AGENTS) +
                            f"/api/cluster/resume?selector=zone%3Dz{n:02d}&reason=bench")
        if status != 200:
            print(f"{label}: BENCH BROKEN: scope {n} answered {status}: {body}")
            return False
    return True


def bench_mongodb(tmp):
    srv = MongoTestServer(mode="replset").start()
    fleet = None
    try:
        base_conns = srv.status()["connections"]
        fleet = Fleet({"MONGODB_URI": srv.uri, "MONGODB_DATABASE": "agenthost"}, tmp)
        if not fleet.wait_ready():
            print("fleet mongodb: BENCH BROKEN: the agents did not all report running")
            return False
        if not run_commands(fleet, "fleet mongodb (change streams)"):
            return False
        if not run_scoped(fleet, "fleet mongodb (change streams)"):
            return False
        if not make_scopes(fleet, "fleet mongodb"):
            return False
        time.sleep(5)
        srv.reset_stats()
        time.sleep(IDLE_SECONDS)
        stats = srv.control("stats")
        counts = stats["counts"]
        per_min = 60.0 / IDLE_SECONDS / AGENTS
        get_more = counts.get("getMore", 0) * per_min
        data = stats["dataCommands"] * per_min
        detail = ", ".join(f"{k} {v * per_min:.2f}" for k, v in sorted(counts.items())
                           if k != "testControl")
        conns = (srv.status()["connections"] - base_conns) / AGENTS
        ok = get_more <= 6 and data <= 12
        print(f"fleet mongodb idle ({SCOPES + 1} scope documents present): per agent per minute "
              f"{get_more:.2f} getMore, {data:.2f} data "
              f"commands in all (targets <= 6 and <= 12) {'PASS' if ok else 'FAIL'}; "
              f"by command: {detail}")
        print(f"fleet mongodb connections: {conns:.2f} per agent (target <= 2) "
              f"{'PASS' if conns <= 2 else 'FAIL'}")
        return True
    finally:
        if fleet is not None:
            fleet.close()
        srv.close()


def bench_embedded(tmp):
    fleet = Fleet({"MONGODB_URI": "", "AGENTHOST_STATE": os.path.join(tmp, "fleet.db")}, tmp)
    try:
        if not fleet.wait_ready():
            print("fleet embedded: BENCH BROKEN: the agents did not all report running")
            return False
        return run_commands(fleet, "fleet embedded") and run_scoped(fleet, "fleet embedded")
    finally:
        fleet.close()


def main():
    ok = True
    with tempfile.TemporaryDirectory(prefix="ah-bench-fleet.") as tmp:
        os.makedirs(os.path.join(tmp, "m"))
        os.makedirs(os.path.join(tmp, "e"))
        ok = bench_mongodb(os.path.join(tmp, "m")) and ok
        ok = bench_embedded(os.path.join(tmp, "e")) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
