"""The agents of docker-compose-replicaset.yml, mimicked with podman from the file itself: image,
command, script volume, environment (with compose's ${VAR:-default} substitution), read_only,
tmpfs, security_opt, cap_drop, the published address of each port, hostname and
stop_grace_period. MongoDB is the wire-protocol test server in a container on the same network,
named like the first member of MONGODB_URI (one member: the URI keeps that host and rs0).

Host ports are picked by podman (the address is the file's), so runs never collide; the agents
are started again by hand where compose's `restart: unless-stopped` would do it.

Shown: agents published on loopback only; `docker compose stop` (SIGTERM, then SIGKILL after
stop_grace_period) lets a long batch finish and on_shutdown run; a cluster shutdown makes every
agent exit 0, and an agent started again afterwards stays paused."""
import socket
import time

import pytest

from container_helpers import (REPO, duration_seconds, http, interpolate, slow_batch_script,
                               uri_for_test_server, wait_for, wait_status, yaml_docs)

COMPOSE = REPO / "docker-compose-replicaset.yml"
AGENTS = ("agent1", "agent2", "agent3")
DOCKER_DEFAULT_STOP_TIMEOUT = 10


def services():
    (doc,) = yaml_docs(COMPOSE)
    return doc["services"]


def agent_run_args(svc, mongo_host, mongo_ip, script=None):
    """(podman run options, command) for one compose agent service."""
    opts = ["--hostname", svc["hostname"], "--add-host", f"{mongo_host}:{mongo_ip}"]
    env = {k: interpolate(v, environ={}) for k, v in svc["environment"].items()}
    env["MONGODB_URI"] = uri_for_test_server(env["MONGODB_URI"])[0]
    for k, v in env.items():
        opts += ["-e", f"{k}={v}"]
    for vol in svc.get("volumes", []):
        src, dst, *mode = vol.split(":")
        src = script if (script and dst.endswith(".lua")) else (REPO / src).resolve()
        opts += ["-v", ":".join([str(src), dst, *mode])]
    if svc.get("read_only"):
        opts += ["--read-only", "--read-only-tmpfs=false"]
    for t in svc.get("tmpfs", []):
        opts += ["--tmpfs", f"{t}:rw,mode=1777"]
    for s in svc.get("security_opt", []):
        opts += ["--security-opt", s.replace(":true", "")]
    for cap in svc.get("cap_drop", []):
        opts += ["--cap-drop", cap]
    for p in svc.get("ports", []):
        host_ip, _host_port, container_port = p.rsplit(":", 2)
        opts += ["-p", f"{host_ip}::{container_port}"]
    grace = duration_seconds(svc.get("stop_grace_period", "10s"))
    opts += ["--stop-timeout", str(int(grace))]
    return opts, list(svc.get("command", [])), grace


@pytest.fixture(scope="module")
def compose_env(podman, agent_image, start_mongo):
    svcs = services()
    mongo_host = uri_for_test_server(svcs["agent1"]["environment"]["MONGODB_URI"])[1]
    net = podman.network("compose")
    _, mongo_ip = start_mongo("compose-mongo", net, mongo_host)

    def start(service, script=None):
        """Starts one agent service; returns the container name."""
        opts, cmd, _ = agent_run_args(svcs[service], mongo_host, mongo_ip, script)
        return podman.run_detached(service, agent_image, *opts, cmd=cmd, network=net)
    return svcs, start


def published(podman, name, port=8000):
    out = podman("port", name, f"{port}/tcp").stdout.split()
    assert len(out) == 1, out
    host, _, p = out[0].rpartition(":")
    return host, int(p)


def non_loopback_address():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
        return s.getsockname()[0]
    finally:
        s.close()


def test_compose_stop_lets_a_long_batch_finish(podman, compose_env, tmp_path):
    svcs, start = compose_env
    grace = duration_seconds(svcs["agent3"]["stop_grace_period"])
    script = tmp_path / "agent.lua"
    script.write_text(slow_batch_script(13))
    script.chmod(0o644)
    name = start("agent3", script=script)
    wait_for("slow batch started", lambda: "slow batch started" in podman.logs(name), timeout=60)
    t0 = time.monotonic()
    podman("stop", name, timeout=grace + 30)  # the container's --stop-timeout: stop_grace_period
    elapsed = time.monotonic() - t0
    logs = podman.logs(name)
    assert podman.inspect(name)["State"]["ExitCode"] == 0, logs[-3000:]
    assert "slow batch finished" in logs and "on_shutdown ran, source signal" in logs, logs[-3000:]
    # Compose's default grace (10 s) would have killed the agent mid-batch.
    assert DOCKER_DEFAULT_STOP_TIMEOUT < elapsed < grace, elapsed
    podman("rm", name)


def test_cluster_shutdown_stops_every_agent_and_a_restarted_one_stays_paused(podman, compose_env):
    svcs, start = compose_env
    names = {s: start(s) for s in AGENTS}
    bases = {}
    for s, name in names.items():
        host, port = published(podman, name)
        assert host == "127.0.0.1", (s, host)
        bases[s] = f"http://127.0.0.1:{port}"
        wait_status(bases[s] + "/readyz", 200, timeout=60)
    # Loopback only: the same port on the machine's other address answers nothing.
    other = non_loopback_address()
    status, err = http("GET", f"http://{other}:{published(podman, names['agent1'])[1]}/healthz",
                       timeout=2)
    assert status is None, (other, status, err)

    token = interpolate(svcs["agent1"]["environment"]["AGENT_API_TOKEN"], environ={})
    assert token == "dev-only-token"
    status, body = http("POST", bases["agent1"] + "/api/cluster/shutdown?reason=down&updated_by=ct",
                        token=token)
    assert status == 200 and body["command"] == "shutdown", body
    for s, name in names.items():
        code = podman.wait_exit(name, timeout=30)
        assert code == 0, (s, podman.logs(name)[-3000:])

    # What compose's restart policy does next: the agent starts again, and is held paused.
    podman("start", names["agent2"])
    host, port = published(podman, names["agent2"])
    base = f"http://{host}:{port}"
    wait_for("restarted agent2 answering", lambda: http("GET", base + "/healthz")[0] == 200,
             timeout=60)
    state = wait_for("restarted agent2 applied the cluster command",
                     lambda: (lambda st: st if st.get("cluster_command") else None)(
                         http("GET", base + "/api/agent/state")[1] or {}), timeout=30)
    assert state["state"] == "paused" and state["cluster_command"] == "shutdown", state
    assert http("GET", base + "/readyz")[0] == 503
    assert podman.inspect(names["agent2"])["State"]["Status"] == "running"
    podman("stop", names["agent2"], timeout=90)
    assert podman.inspect(names["agent2"])["State"]["ExitCode"] == 0
