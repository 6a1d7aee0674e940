"""Podman harness for the container checks (tests/container/README.md).

Every podman call goes through `Podman`, which points podman at this suite's own containers.conf
(CONTAINERS_CONF; /etc is never edited) and labels every container and network it creates with
the run's id, so that the session fixture removes them all, whatever a test left behind. Names
carry the run's id too: two runs at once, or one after another, never meet.

A missing or broken podman fails the tests (never a skip): the container path is part of what
the suite proves.
"""
import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LABEL = "agenthost-test"
AGENT_IMAGE = "localhost/agenthost:test"
MONGO_IMAGE = "localhost/agenthost-test-mongo:bookworm"


def containers_conf(path):
    """Writes this suite's containers.conf to `path` and returns it.

    - runtime runc: crun 1.8 refuses a hybrid cgroup layout (v1 controllers plus a v2 mount with a
      controller of its own), which some sandboxes have; runc handles it, and cgroup v1 or v2.
    - default_ulimits at or below this process's own limits: podman's defaults (nofile and nproc
      of 1048576 for root) cannot be set without CAP_SYS_RESOURCE, which sandboxes often drop.
    - cgroupfs and file events: no systemd needed.
    """
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65536)
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], 32768)
    path.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n')
    return path


class Podman:
    def __init__(self, conf, run_id):
        self.env = dict(os.environ, CONTAINERS_CONF=str(conf))
        self.run_id = run_id
        self.bin = shutil.which("podman")

    def name(self, what):
        return f"{self.run_id}-{what}"

    def __call__(self, *args, check=True, timeout=120, input=None):
        """Runs `podman args...`; returns the CompletedProcess (text). check: fail the test with
        podman's stderr on a non-zero exit."""
        if self.bin is None:
            pytest.fail("podman is not installed (scripts/install-deps.sh --container)")
        try:
            p = subprocess.run([self.bin, *map(str, args)], env=self.env, capture_output=True,
                               text=True, timeout=timeout, input=input)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"podman {' '.join(map(str, args))} did not finish in {timeout} s: {e}")
        if check and p.returncode != 0:
            pytest.fail(f"podman {' '.join(map(str, args))} exited {p.returncode}:\n"
                        f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        return p

    def run_detached(self, what, image, *args, cmd=(), network=None):
        """Starts a container named after the run; returns its name."""
        name = self.name(what)
        net = ["--network", network] if network else []
        self("run", "-d", "--name", name, "--label", f"{LABEL}={self.run_id}",
             "--health-interval", "disable", *net, *args, image, *cmd)
        return name

    def network(self, what):
        name = self.name(what)
        self("network", "create", "--label", f"{LABEL}={self.run_id}", name)
        return name

    def inspect(self, name):
        return json.loads(self("inspect", "--type", "container", name).stdout)[0]

    def ip(self, name, network):
        return self.inspect(name)["NetworkSettings"]["Networks"][network]["IPAddress"]

    def wait_exit(self, name, timeout):
        """Waits for the container to exit; returns its exit code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.inspect(name)["State"]
            if st["Status"] in ("exited", "stopped"):
                return st["ExitCode"]
            time.sleep(0.2)
        pytest.fail(f"container {name} still running after {timeout} s")

    def logs(self, name):
        p = self("logs", name, check=False)
        return p.stdout + p.stderr

    def cleanup(self, stale=False):
        """Removes every container and network this run created (by label); stale: those of
        earlier runs whose process is gone (a run killed before its own cleanup)."""
        def ours(label):
            if label == self.run_id:
                return True
            m = re.fullmatch(r"ahct-(\d+)-[0-9a-f]+", label or "")
            return stale and m is not None and not pid_alive(int(m.group(1)))
        ps = self("ps", "-a", "--filter", f"label={LABEL}", "--format", "json", check=False)
        ids = [c["Id"] for c in json.loads(ps.stdout or "[]")
               if ours((c.get("Labels") or {}).get(LABEL))]
        if ids:
            self("rm", "-f", "-t", "0", *ids, check=False)
        nets = self("network", "ls", "--filter", f"label={LABEL}", "--format", "json", check=False)
        names = [n["name"] for n in json.loads(nets.stdout or "[]")
                 if ours((n.get("labels") or {}).get(LABEL))]
        if names:
            self("network", "rm", "-f", *names, check=False)


def http(method, url, token=None, timeout=5.0):
    """(status, parsed JSON body or text); (None, error text) when nothing answered."""
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return None, str(e)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_for(what, fn, timeout=30.0, interval=0.2):
    """Polls fn() until it returns a truthy value (returned); fails after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def wait_status(url, status, timeout=30.0):
    return wait_for(f"{url} -> {status}", lambda: http("GET", url)[0] == status, timeout)


def wait_log(podman, name, pattern, timeout=30.0):
    rx = re.compile(pattern)
    return wait_for(f"log line /{pattern}/ from {name}",
                    lambda: rx.search(podman.logs(name)), timeout)


def dockerfile_stop_timeout():
    """The --stop-timeout the Dockerfile documents for `docker run`."""
    m = re.search(r"^#.*docker run\b.*--stop-timeout (\d+)", (REPO / "Dockerfile").read_text(), re.M)
    assert m, "the Dockerfile's docker run example has no --stop-timeout"
    return int(m.group(1))


def image_env(podman, image):
    cfg = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    return dict(e.split("=", 1) for e in cfg.get("Env", []))


def yaml_docs(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def duration_seconds(text):
    """'60s', '1m30s', '90' -> seconds (compose durations)."""
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)?", str(text))
    for num, unit in parts:
        total += float(num) * units[unit or "s"]
    return total


def run_id():
    return f"ahct-{os.getpid()}-{secrets.token_hex(2)}"


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def uri_for_test_server(uri):
    """The test server's URI for a manifest's MONGODB_URI: same first host, database and replica
    set; no credentials, no other members (the test server is one member and emulates no auth)."""
    m = re.fullmatch(r"mongodb://(?:[^@/]*@)?([^,/?]+)[^/?]*(/[^?]*)?(?:\?(.*))?", uri)
    assert m, uri
    host, path = m.group(1), m.group(2) or "/"
    params = [p for p in (m.group(3) or "").split("&") if p.startswith("replicaSet=")]
    return f"mongodb://{host}{path}" + (f"?{params[0]}" if params else ""), host.split(":")[0]


def mebibytes(quantity):
    """Kubernetes memory quantity ('256Mi', '1Gi', '64M') -> bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|K|M|G)?", str(quantity))
    assert m, quantity
    mult = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 1000, "M": 10**6, "G": 10**9}
    return int(m.group(1)) * mult.get(m.group(2), 1)


def interpolate(value, environ=None):
    """Compose's ${VAR:-default} / ${VAR} / $VAR substitution."""
    environ = os.environ if environ is None else environ

    def sub(m):
        name, default = m.group(1) or m.group(3), m.group(2)
        got = environ.get(name)
        return got if got else (default or "")
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", sub, str(value))


def slow_batch_script(seconds):
    """A script whose batch does `seconds` of work nothing interrupts (a child process: SIGTERM
    goes to the agent only), logging around it and in on_shutdown."""
    return f"""local agent = require "agent"
local M = {{}}
function M.batch(ctx)
  agent.log.info("slow batch started")
  os.execute("sleep {seconds}")
  agent.log.info("slow batch finished")
  return 1
end
function M.on_shutdown(ev)
  agent.log.info("on_shutdown ran, source " .. tostring(ev.source))
end
return M
"""
