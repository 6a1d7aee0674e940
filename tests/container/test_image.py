"""The image built from the repository's Dockerfile, run with podman: what is in it, its user,
HEALTHCHECK, probes, token, pause/resume, a stop within the documented --stop-timeout while a
long batch runs, and a read-only root without MongoDB."""
import json
import time

import pytest

from container_helpers import (REPO, dockerfile_stop_timeout, http, image_env, slow_batch_script,
                               wait_log, wait_status)

TOKEN = "container-test-token"
DOCKER_DEFAULT_STOP_TIMEOUT = 10


def sh(podman, image, script, *args):
    """Runs a shell script in a throw-away container of the image (not its entrypoint)."""
    return podman("run", "--rm", "--health-interval", "disable", *args, "--entrypoint", "bash",
                  image, "-c", script, check=False)


@pytest.fixture
def hello(podman, agent_image):
    """A container of the image as shipped (default CMD: the hello example) with a token."""
    name = podman.run_detached("hello", agent_image, "-e", f"AGENT_API_TOKEN={TOKEN}")
    base = f"http://{podman.ip(name, 'podman')}:8000"
    wait_status(base + "/readyz", 200)
    yield name, base
    podman("rm", "-f", "-t", "0", name, check=False)


def test_image_size_and_contents_are_trimmed(podman, agent_image, build_stage_image, capsys):
    size = int(podman("image", "inspect", "--format", "{{.Size}}", agent_image).stdout)
    with capsys.disabled():
        print(f"\n[container] agenthost image: {size / 1e6:.1f} MB ({size} bytes)")
    # Runtime libraries on bookworm-slim (78 MB) take 54 MB. Without `apt-get clean` apt's caches
    # (downloaded packages, pkgcache.bin, srcpkgcache.bin) added 96 MB on these base images,
    # which lack the apt settings of Debian's official images that remove them.
    assert size < 150e6, size
    p = sh(podman, agent_image, """
        set -u
        ls /usr/local/share/agenthost/examples
        echo "archives: $(find /var/cache/apt -name '*.deb' -o -name '*.bin' | wc -l)"
        echo "lists: $(find /var/lib/apt/lists -type f | wc -l)"
        for p in /usr/local/share/agenthost/examples/embed /usr/local/share/agenthost/lua \
                 /usr/local/lib/libagenthost.so /usr/local/include/agenthost.h; do
            [ -e "$p" ] && echo "present: $p"
        done
        exit 0""")
    out = p.stdout
    assert p.returncode == 0, p.stderr
    assert "hello.lua" in out and "job_puller.lua" in out and "lib" in out
    assert "archives: 0" in out and "lists: 0" in out, out
    assert "present:" not in out, out
    # The build stage compiled the binary and its plugins, no benchmark and no test.
    p = sh(podman, build_stage_image,
           "ls /src/build; test ! -e /src/build/tests && test ! -e /src/build/bench_batch")
    assert p.returncode == 0, p.stdout + p.stderr
    built = p.stdout.split()
    assert {"agenthost", "agenthost_mongo.so", "agenthost_curl.so"} <= set(built), built
    # Both plugins are installed where the binary looks and load with the runtime libraries.
    p = sh(podman, agent_image, "agenthost version")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "libmongoc unavailable" not in p.stdout and "libcurl unavailable" not in p.stdout, p


def test_dockerfile_needs_no_frontend_image():
    # BuildKit would fetch the frontend named by a `# syntax=` line from a registry (offline: the
    # build fails); podman ignores it, so only the text can show it is gone.
    first = (REPO / "Dockerfile").read_text().splitlines()[0]
    assert not first.lower().replace(" ", "").startswith("#syntax=")


def test_image_runs_as_non_root_with_healthcheck(podman, agent_image, hello):
    info = json.loads(podman("image", "inspect", agent_image).stdout)[0]
    assert info["Config"]["User"] == "10001:10001"
    # Kept because the image is built in docker format (OCI images have no HEALTHCHECK).
    assert info["ManifestType"] == "application/vnd.docker.distribution.manifest.v2+json"
    hc = info.get("Healthcheck") or {}
    assert hc.get("Test") and "/healthz" in " ".join(hc["Test"]), info
    name, base = hello
    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
    assert podman("exec", name, "id", "-g").stdout.strip() == "10001"
    # The HEALTHCHECK command itself, as the engine runs it.
    assert podman("healthcheck", "run", name, check=False).returncode == 0
    # ... and it reports an agent that does not answer as unhealthy.
    podman("kill", "--signal", "STOP", name)
    try:
        assert podman("healthcheck", "run", name, check=False, timeout=30).returncode != 0
    finally:
        podman("kill", "--signal", "CONT", name)
    assert podman("healthcheck", "run", name, check=False).returncode == 0


def test_probes_token_pause_and_resume(hello):
    name, base = hello
    assert http("GET", base + "/healthz")[0] == 200
    assert http("GET", base + "/readyz")[0] == 200
    status, body = http("POST", base + "/api/cluster/pause?reason=test&updated_by=ct")
    assert status == 401, body
    status, body = http("POST", base + "/api/cluster/pause?reason=test&updated_by=ct",
                        token="wrong-token")
    assert status == 401, body
    status, body = http("POST", base + "/api/cluster/pause?reason=test&updated_by=ct", token=TOKEN)
    assert status == 200 and body["command"] == "pause", body
    wait_status(base + "/readyz", 503)
    assert http("GET", base + "/api/agent/state")[1]["state"] == "paused"
    assert http("GET", base + "/healthz")[0] == 200
    status, body = http("POST", base + "/api/cluster/resume?reason=done&updated_by=ct", token=TOKEN)
    assert status == 200, body
    wait_status(base + "/readyz", 200)
    assert http("GET", base + "/api/agent/state")[1]["state"] == "running"


def test_stop_within_documented_timeout_finishes_batch_and_runs_on_shutdown(
        podman, agent_image, tmp_path):
    stop_timeout = dockerfile_stop_timeout()
    shutdown_timeout = float(image_env(podman, agent_image).get("SHUTDOWN_TIMEOUT", "25"))
    assert stop_timeout > shutdown_timeout, (stop_timeout, shutdown_timeout)
    script = tmp_path / "agent.lua"
    script.write_text(slow_batch_script(13))
    script.chmod(0o644)
    name = podman.run_detached(
        "stop", agent_image, "--stop-timeout", str(stop_timeout),
        "-v", f"{script}:/etc/agenthost/agent.lua:ro", cmd=("run", "/etc/agenthost/agent.lua"))
    wait_log(podman, name, "slow batch started")
    t0 = time.monotonic()
    podman("stop", name, timeout=stop_timeout + 30)
    elapsed = time.monotonic() - t0
    code = podman.inspect(name)["State"]["ExitCode"]
    logs = podman.logs(name)
    assert code == 0, logs[-3000:]
    assert "slow batch finished" in logs and "on_shutdown ran, source signal" in logs, logs[-3000:]
    # docker's default (10 s) would have killed it mid-batch: exit 137, no on_shutdown.
    assert DOCKER_DEFAULT_STOP_TIMEOUT < elapsed < stop_timeout, elapsed


def test_read_only_root_without_mongodb_keeps_state_in_tmp(podman, agent_image):
    # docker run --read-only --tmpfs /tmp (podman's own --read-only adds more tmpfs: turned off).
    name = podman.run_detached(
        "readonly", agent_image, "--read-only", "--read-only-tmpfs=false",
        "--tmpfs", "/tmp:rw,size=16m,mode=1777", "-e", f"AGENT_API_TOKEN={TOKEN}")
    base = f"http://{podman.ip(name, 'podman')}:8000"
    wait_status(base + "/readyz", 200)
    assert http("GET", base + "/api/cluster/stats")[1]["watch_mode"] == "polling"
    status, body = http("POST", base + "/api/cluster/pause?reason=ro&updated_by=ct", token=TOKEN)
    assert status == 200, body
    wait_status(base + "/readyz", 503)
    assert podman("exec", name, "test", "-s", "/tmp/agenthost-state.db", check=False).returncode == 0
    assert podman("exec", name, "touch", "/var/lib/agenthost/x", check=False).returncode != 0
    podman("stop", "-t", "30", name, timeout=60)
    assert podman.inspect(name)["State"]["ExitCode"] == 0, podman.logs(name)[-3000:]
