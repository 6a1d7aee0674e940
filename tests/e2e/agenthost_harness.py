"""Test harness for end-to-end tests: starts real `agenthost` processes and talks to them.

Every agent listens on HTTP_PORT=0 (a free port chosen by the kernel); the harness learns the
port from the log line "HTTP API listening on HOST:PORT". Logs (stderr) are collected line by
line in a thread so tests can wait for a line with a deadline instead of sleeping.
"""
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("AGENTHOST_BIN", os.path.join(REPO, "build", "agenthost"))


def wait_for(predicate, timeout=10.0, interval=0.02, message="condition"):
    """Polls predicate() until it returns a truthy value; returns it. Fails after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last: {last!r})")


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)


def http(method, url, token=None, timeout=10.0, body=None, headers=None):
    req = urllib.request.Request(url, method=method, data=body)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Response(r.status, dict(r.headers), r.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as e:
        return Response(e.code, dict(e.headers), e.read().decode("utf-8", "replace"))


class Agent:
    """One agenthost process."""

    def __init__(self, script, env=None, args=None, name="agent", preexec_fn=None):
        self.script = script
        self.preexec_fn = preexec_fn  # runs in the child before exec (e.g. a resource limit)
        self.name = name
        self.env = dict(os.environ)
        self.env.update({"HTTP_PORT": "0", "HTTP_BIND": "127.0.0.1", "AGENT_ID": name})
        self.env.update(env or {})
        self.args = args or []
        self.proc = None
        self.port = None
        self.lines = []
        self._lock = threading.Lock()
        self._reader = None

    # -- process -------------------------------------------------------------------------
    def start(self, wait_port=True):
        self.proc = subprocess.Popen(
            [BINARY, "run", self.script] + self.args,
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", preexec_fn=self.preexec_fn)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_port:
            m = self.wait_log(r"HTTP API listening on \S*:(\d+)", timeout=15)
            self.port = int(m.group(1))
        return self

    def _read(self):
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def log_text(self):
        with self._lock:
            return "\n".join(self.lines)

    def find_logs(self, pattern):
        rx = re.compile(pattern)
        with self._lock:
            return [l for l in self.lines if rx.search(l)]

    def wait_log(self, pattern, timeout=10.0, count=1):
        rx = re.compile(pattern)

        def found():
            with self._lock:
                matches = [rx.search(l) for l in self.lines]
            matches = [m for m in matches if m]
            if len(matches) >= count:
                return matches[count - 1]
            if self.proc.poll() is not None and self._reader is not None and not self._reader.is_alive():
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} before logging "
                    f"{pattern!r}:\n{self.log_text()}")
            return None

        return wait_for(found, timeout, message=f"{self.name} log {pattern!r}")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout=20.0):
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout}s:\n{self.log_text()}")
        if self._reader is not None:
            self._reader.join(timeout=5)
        return rc

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    # -- API -------------------------------------------------------------------------------
    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def get(self, path, **kw):
        return http("GET", self.url + path, **kw)

    def post(self, path, **kw):
        return http("POST", self.url + path, **kw)

    def state(self):
        return self.get("/api/agent/state").json()

    def wait_state(self, state, timeout=10.0):
        return wait_for(lambda: self.state()["state"] == state, timeout,
                        message=f"{self.name} state {state}")


def parse_metrics(text):
    """The samples of a Prometheus text exposition: {"name" or 'name{labels}': value}. HELP and
    TYPE lines are skipped, so a family that is declared but has no sample is absent."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$", line)
        assert m, f"not a Prometheus sample line: {line!r}"
        samples[m.group(1)] = float(m.group(2))
    return samples


def metric(agent, name):
    """The value of one sample on agent's /metrics (name with labels, if any, as exposed:
    'agenthost_state{state="running"}'); None when there is no such sample."""
    return parse_metrics(agent.get("/metrics").body).get(name)


class Fleet:
    """Tracks agents started by a test and kills leftovers at teardown."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.agents = []

    def start(self, script, env=None, name=None, args=None, wait_port=True, preexec_fn=None):
        agent = Agent(script, env=env, args=args, name=name or f"agent-{len(self.agents) + 1}",
                      preexec_fn=preexec_fn)
        self.agents.append(agent)
        return agent.start(wait_port=wait_port)

    def close(self):
        for a in self.agents:
            a.kill()


# -- helpers for the e2e test modules (additive) ---------------------------------------------
SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")


def script(name):
    """Absolute path of a fixture script in tests/e2e/scripts."""
    return os.path.join(SCRIPTS, name)


def read_events(path):
    """The JSON-lines records a fixture script appended to path ([] if none yet). A partially
    written last line (the script is mid-write) is ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def wait_events(path, predicate, timeout=10.0, message="events"):
    """Waits until predicate(events) is truthy; returns the events list."""
    result = {}

    def check():
        ev = read_events(path)
        result["ev"] = ev
        return predicate(ev)

    wait_for(check, timeout, message=message)
    return result["ev"]


def count_events(events, name, **fields):
    return sum(1 for e in events if e.get("ev") == name and
               all(e.get(k) == v for k, v in fields.items()))


def run_cli(args, env=None, timeout=30.0):
    """Runs `agenthost ARGS...` to completion; returns CompletedProcess (text, stdout/stderr)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([BINARY] + list(args), env=full_env, capture_output=True, text=True,
                          errors="replace", timeout=timeout)


def free_port():
    """A TCP port nobody listens on now (bound then released), for a server the test starts on
    it. Another process may take it meanwhile: for a port that must stay closed (connections
    refused), use closed_port()."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


_closed_ports = []  # sockets that hold the ports of closed_port() until the process ends


def closed_port():
    """A TCP port on 127.0.0.1 that refuses connections for the rest of this test process: it is
    bound (so neither the kernel nor another test running in parallel can hand it out) but never
    listened on (so a connection gets a reset: "connection refused")."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _closed_ports.append(s)
    return s.getsockname()[1]


def agent_env(state_file, events_file=None, **extra):
    """Environment for an agent on the embedded store at state_file (MONGODB_URI cleared)."""
    env = {"AGENTHOST_STATE": state_file, "MONGODB_URI": "", "LOG_FORMAT": "text",
           "LOG_LEVEL": "info"}
    if events_file is not None:
        env["EVENTS_FILE"] = str(events_file)
    env.update({k: str(v) for k, v in extra.items()})
    return env


# -- MongoDB helpers (additive; used by tests/e2e/test_mongo_*.py) ----------------------------
MONGO_DIR = os.path.join(REPO, "tests", "mongo")


def mongo_agent_env(uri, events_file=None, **extra):
    """Environment for an agent on the MongoDB store at uri (database "agenthost")."""
    env = {"MONGODB_URI": uri, "MONGODB_DATABASE": "agenthost", "LOG_FORMAT": "text",
           "LOG_LEVEL": "info"}
    if events_file is not None:
        env["EVENTS_FILE"] = str(events_file)
    env.update({k: str(v) for k, v in extra.items()})
    return env


# The heartbeat of the fleet tests' agents: a record is stale after 3 heartbeats (1.5 s).
FLEET_HEARTBEAT = 0.5


class Store:
    """One control store for a test (conftest's `store` fixture gives each test both kinds):
    how to point an agent at it. extra: environment every agent on it gets."""

    def __init__(self, kind, tmp_path, server=None, **extra):
        self.kind = kind
        self.tmp_path = tmp_path
        self.server = server
        self.extra = extra
        self.state_file = str(tmp_path / "agenthost-state.db")

    def env(self, events, **extra):
        extra.setdefault("AGENT_HEARTBEAT_INTERVAL", FLEET_HEARTBEAT)
        for k, v in self.extra.items():
            extra.setdefault(k, v)
        if self.kind == "mongodb":
            return mongo_agent_env(self.server.uri, events, **extra)
        return agent_env(self.state_file, events, **extra)


def wait_store_set_up(path, timeout=15.0):
    """Waits until the embedded store file at path has its schema. An agent on a new file runs
    before the watcher's setup commits it (a file without tables holds no command: the agent
    knows its state), so a test that writes the file's tables itself waits for this first."""
    import sqlite3

    def set_up():
        conn = sqlite3.connect(path, timeout=5)
        try:
            return conn.execute("PRAGMA user_version").fetchone()[0] >= 1
        finally:
            conn.close()
    wait_for(set_up, timeout, message=f"the setup of {path}")


class WriteLock:
    """Another process's write lock on the embedded store at path (held by this test process
    until release())."""

    def __init__(self, path):
        import sqlite3
        # waits for a lock the agents hold for a moment (a new file's setup, a command)
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=15)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self):
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


def mongo_status(agent):
    return agent.get("/api/mongo/status").json()
