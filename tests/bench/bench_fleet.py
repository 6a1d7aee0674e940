"""Fleet benchmark (scripts/bench.sh fleet; docs/BENCHMARKS.md, docs/SCALING.md): FLEET_N agents
(default 100) of tests/e2e/scripts/mongo_idle.lua on this machine,

  * on the MongoDB wire-protocol test server (tests/mongo, one-member replica set, change
    streams): the time from sending POST /api/cluster/{pause,resume}?wait=30 to its answer with
    "complete": true, for BENCH_FLEET_COMMANDS commands (default 3; target <= 1.5 s each), then
    over BENCH_FLEET_IDLE_SECONDS of idleness (default 60): the database commands per agent per
    minute counted at the server (targets <= 6 getMore and <= 12 data commands, the status
    heartbeats included), the connections per agent (target <= 2), the fleet's CPU from /proc
    (utime + stime of every agent, as % of one core and per agent; the test server's own CPU next
    to it), RSS and PSS per agent and open file descriptors per agent;
  * on the embedded store (one SQLite file): the same POST -> complete times, CPU, RSS and fds.

The load average is printed before and after each fleet: on a shared machine the numbers only
mean something next to it. FLEET_STORES=mongodb or =embedded runs one of the two; a broken run
keeps the agents' logs (the path is printed). Extra environment for the agents: FLEET_ENV="VAR=value VAR=value"
(e.g. "AGENT_HEARTBEAT_INTERVAL=60 ENABLE_CHANGE_STREAMS=false CONTROL_POLLING_INTERVAL=5").

Every agent has labels, region spread over 4 regions (eu, us, ap, sa) and role over 2; on both
stores a scoped pause and resume of one region with wait=30 are timed too (POST -> complete,
target <= 1.5 s), and on MongoDB the idle cost is measured with BENCH_FLEET_SCOPES (default 20)
scope documents present (same targets).

Prints one line per measurement ending in PASS/FAIL and exits 0 unless the bench itself broke
(an agent that would not start, an answer that was not 200)."""
import json
import os
import shutil
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
AGENTS = int(os.environ.get("FLEET_N", os.environ.get("BENCH_FLEET_AGENTS", "100")))
FLEET_ENV = dict(kv.split("=", 1) for kv in os.environ.get("FLEET_ENV", "").split() if "=" in kv)
CLK_TCK = os.sysconf("SC_CLK_TCK")
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
        self.tmp = tmp
        self.env = env
        self.procs = [None] * AGENTS
        self.ports = [0] * AGENTS
        for i in range(AGENTS):
            self.start_one(i)

    def start_one(self, i):
        """Starts agent i on a free port. The port is only free when it was picked: another
        process may take it before the agent binds, so restart_lost() starts such an agent
        again on another port."""
        port = free_port()
        e = dict(os.environ, HTTP_PORT=str(port), HTTP_BIND="127.0.0.1",
                 AGENT_ID=f"bench-{i:03d}", EVENTS_FILE=os.path.join(self.tmp, f"e{i}.jsonl"),
                 LOG_LEVEL="warn", AGENT_LABELS=labels_of(i), **{**self.env, **FLEET_ENV})
        log = open(os.path.join(self.tmp, f"agent-{i}.log"), "a")
        self.procs[i] = subprocess.Popen([BIN, "run", SCRIPT], env=e, stdout=log,
                                         stderr=subprocess.STDOUT)
        log.close()
        self.ports[i] = port

    def restart_lost(self):
        """Restarts every agent that exited because its port was taken meanwhile."""
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                with open(os.path.join(self.tmp, f"agent-{i}.log")) as f:
                    if "Address already in use" not in f.read():
                        continue
                print(f"  agent {i}: port {self.ports[i]} was taken before it bound: restarted")
                self.start_one(i)

    def url(self, i):
        return f"http://127.0.0.1:{self.ports[i]}"

    def wait_ready(self, timeout=180 + AGENTS):
        """True once agent 0 lists every agent running; else prints what it saw last."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self.restart_lost()
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


def cpu_ticks(pid):
    """utime + stime of a process (fields 14 and 15 of /proc/PID/stat), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def kib(pid, key, path="status"):
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def measure_idle(fleet, label, seconds, server_pid=None):
    """CPU of the fleet (and of the server) over `seconds`, then memory and fds per agent."""
    pids = [p.pid for p in fleet.procs]
    t0 = time.monotonic()
    ticks0 = sum(cpu_ticks(pid) for pid in pids)
    srv0 = cpu_ticks(server_pid) if server_pid else 0
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    ticks = sum(cpu_ticks(pid) for pid in pids) - ticks0
    srv = (cpu_ticks(server_pid) - srv0) if server_pid else 0
    core_pct = ticks / CLK_TCK / elapsed * 100
    rss = [kib(pid, "VmRSS") for pid in pids]
    pss = [kib(pid, "Pss", "smaps_rollup") for pid in pids]
    fds = [fd_count(pid) for pid in pids]
    n = len(pids)
    server = (f"; the test server {srv / CLK_TCK / elapsed * 100:.1f}% of one core"
              if server_pid else "")
    print(f"{label} idle CPU: {core_pct:.1f}% of one core for {n} agents over {elapsed:.0f} s, "
          f"{core_pct / n:.3f}% per agent{server} (load average {load_average()})")
    print(f"{label} memory: RSS {sum(rss) / n / 1024:.1f} MiB per agent (max "
          f"{max(rss) / 1024:.1f}), PSS {sum(pss) / n / 1024:.1f} MiB per agent, "
          f"{sum(pss) / 1024:.0f} MiB for the fleet; open fds {sum(fds) / n:.1f} per agent "
          f"(max {max(fds)})")


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(p / 100.0 * (len(values) - 1)))))]


def hooks_line(fleet, version, sent_wall):
    """When the agents' hooks ran for `version`, from their EVENTS_FILEs (wall clock, relative to
    the POST): the share of POST -> complete spent before every agent had applied it."""
    times = []
    for i in range(AGENTS):
        try:
            with open(os.path.join(fleet.tmp, f"e{i}.jsonl")) as f:
                for line in f:
                    ev = json.loads(line)
                    if ev.get("version") == version:
                        times.append(ev["t"] - sent_wall)
        except (OSError, ValueError):
            pass
    if not times:
        return "no hook recorded"
    return (f"hooks of {len(times)} agents ran p50 {percentile(times, 50):.3f} s, "
            f"max {max(times):.3f} s after the POST")


def cpu_line(fleet, server_pid, before, seconds):
    """The CPU the agents (and the test server) used since `before` (ticks from cpu_sample)."""
    after = cpu_sample(fleet, server_pid)
    agents = (after[0] - before[0]) / CLK_TCK / seconds * 100
    line = f"CPU meanwhile: the agents {agents:.0f}% of one core"
    if server_pid:
        line += f", the test server {(after[1] - before[1]) / CLK_TCK / seconds * 100:.0f}%"
    return line


def cpu_sample(fleet, server_pid):
    return (sum(cpu_ticks(p.pid) for p in fleet.procs),
            cpu_ticks(server_pid) if server_pid else 0)


def run_commands(fleet, label, server_pid=None):
    """COMMANDS alternating pause/resume with wait=30; returns False if the bench broke. With
    server_pid, the test server's CPU between the POST and its answer is printed too (a
    single-threaded Python server tops out at about 100% of one core)."""
    times = []
    for n in range(COMMANDS):
        cmd = "pause" if n % 2 == 0 else "resume"
        issuer = (n * 37) % AGENTS
        cpu0 = cpu_sample(fleet, server_pid)
        sent = time.monotonic()
        sent_wall = time.time()
        status, body = http("POST", fleet.url(issuer) + f"/api/cluster/{cmd}?wait=30&reason=bench")
        took = time.monotonic() - sent
        cpu = cpu_line(fleet, server_pid, cpu0, took)
        if status != 200:
            print(f"{label}: BENCH BROKEN: {cmd} answered {status}: {body}")
            return False
        w = body["wait"]
        times.append(took)
        print(f"  {label} {cmd} v{body['version']}: POST -> complete {took:.3f} s "
              f"(complete={w['complete']}, acknowledged {len(w['acknowledged'])}, "
              f"pending {len(w['pending'])}, excluded {len(w['excluded'])}, "
              f"waited_s {w['waited_s']}); {hooks_line(fleet, body['version'], sent_wall)}; "
              f"{cpu}")
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
        print(f"  fleet mongodb: {AGENTS} agents running (load average {load_average()})")
        if not run_commands(fleet, "fleet mongodb (change streams)", srv.proc.pid):
            return False
        if not run_scoped(fleet, "fleet mongodb (change streams)"):
            return False
        if not make_scopes(fleet, "fleet mongodb"):
            return False
        time.sleep(5)
        srv.reset_stats()
        measure_idle(fleet, "fleet mongodb", IDLE_SECONDS, srv.proc.pid)
        stats = srv.control("stats")
        counts = stats["counts"]
        per_min = 60.0 / IDLE_SECONDS / AGENTS  # (the idle window measure_idle slept)
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
        print(f"  fleet embedded: {AGENTS} agents running (load average {load_average()})")
        if not run_commands(fleet, "fleet embedded"):
            return False
        if not run_scoped(fleet, "fleet embedded"):
            return False
        time.sleep(5)
        measure_idle(fleet, "fleet embedded", min(IDLE_SECONDS, 30))
        return True
    finally:
        fleet.close()


def main():
    ok = True
    stores = os.environ.get("FLEET_STORES", "mongodb,embedded").split(",")
    tmp = tempfile.mkdtemp(prefix="ah-bench-fleet.")
    os.makedirs(os.path.join(tmp, "m"))
    os.makedirs(os.path.join(tmp, "e"))
    if "mongodb" in stores:
        ok = bench_mongodb(os.path.join(tmp, "m")) and ok
    if "embedded" in stores:
        ok = bench_embedded(os.path.join(tmp, "e")) and ok
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"  the agents' logs are kept in {tmp}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
