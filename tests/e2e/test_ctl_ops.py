"""`agenthost ctl` for operators: `ctl reload` (with --wait for the outcome: exit 0 on 200, 1 with
the error on 422, 1 when still pending), and `ctl --url https://...` through a TLS-terminating
proxy (docs/OPERATIONS.md recommends one) with --cacert or --insecure."""
import http.server
import os
import ssl
import subprocess
import threading
import urllib.request

import pytest

from agenthost_harness import agent_env, run_cli

GOOD = """
local agent = require "agent"
local M = {}
function M.init() agent.log.info("init of version %s", VERSION) end
function M.batch()
    if agent.env("BUSY_FILE") and io.open(agent.env("BUSY_FILE")) then
        agent.log.info("busy batch")
        local t0 = agent.monotonic()
        while agent.monotonic() - t0 < 4 do end -- a batch that does not wait: a reload waits for it
    end
    agent.sleep(0.05)
end
return M
"""


def write(path, version, broken=False):
    text = "VERSION = %d\n" % version + GOOD
    if broken:
        text += "\nthis is not lua\n"
    path.write_text(text)


def ctl(agent, *args, timeout=60):
    return run_cli(["ctl", *args, "--url", agent.url], timeout=timeout)


def test_ctl_reload_waits_for_the_outcome(fleet, tmp_path, state_file):
    script = tmp_path / "worker.lua"
    write(script, 1)
    busy = tmp_path / "busy"
    a = fleet.start(str(script), env=agent_env(state_file, BUSY_FILE=str(busy)))
    a.wait_state("running")
    write(script, 2)
    r = ctl(a, "reload", "--wait", "20")
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"Script reloaded"' in r.stdout
    a.wait_log("init of version 2")
    write(script, 3, broken=True)
    r = ctl(a, "reload", "--wait", "20")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "reload failed, the previous script keeps running" in r.stdout
    assert "HTTP 422" in r.stderr
    # A batch that keeps running: no outcome within --wait, exit 1 saying so.
    write(script, 4)
    busy.write_text("1")
    a.wait_log("busy batch")
    r = ctl(a, "reload", "--wait", "0.5")
    busy.unlink()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "still pending" in r.stderr
    a.wait_log("init of version 4", timeout=30)
    r = ctl(a, "reload", "--wait", "abc")
    assert r.returncode == 1 and "wait must be a number of seconds" in r.stdout


@pytest.fixture
def tls_proxy(tmp_path):
    """An HTTPS proxy on 127.0.0.1 with a self-signed certificate for 127.0.0.1; .target is set
    to the agent's URL by the test."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)

    class Proxy(http.server.BaseHTTPRequestHandler):
        target = None

        def relay(self):
            req = urllib.request.Request(Proxy.target + self.path, method=self.command,
                                         data=b"" if self.command == "POST" else None)
            if self.headers.get("Authorization"):
                req.add_header("Authorization", self.headers["Authorization"])
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    status, body = r.status, r.read()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = relay

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.cert = str(cert)
    server.url = "https://127.0.0.1:%d" % server.server_address[1]
    server.proxy = Proxy
    yield server
    server.shutdown()
    server.server_close()


def test_ctl_speaks_tls_with_a_ca_file_or_insecure(fleet, tmp_path, state_file, tls_proxy):
    a = fleet.start(os.path.join(os.path.dirname(__file__), "scripts", "recorder.lua"),
                    env=agent_env(state_file, EVENTS_FILE=str(tmp_path / "ev.jsonl")))
    a.wait_state("running")
    tls_proxy.proxy.target = a.url
    url = tls_proxy.url
    r = run_cli(["ctl", "state", "--local", "--url", url, "--cacert", tls_proxy.cert])
    assert r.returncode == 0, r.stderr
    assert '"state":"running"' in r.stdout
    r = run_cli(["ctl", "pause", "--url", url + "/", "--reason", "tls"],
                env={"AGENTHOST_CACERT": tls_proxy.cert})
    assert r.returncode == 0, r.stderr
    a.wait_state("paused")
    r = run_cli(["ctl", "state", "--local", "--url", url])  # self-signed: refused
    assert r.returncode == 1
    assert "certificate" in r.stderr.lower() or "SSL" in r.stderr, r.stderr
    r = run_cli(["ctl", "resume", "--url", url, "--insecure"])
    assert r.returncode == 0, r.stderr
    a.wait_state("running")


def test_a_killed_agent_is_lost_in_ctl_and_the_summary(fleet, tmp_path, state_file):
    import signal
    from agenthost_harness import wait_for
    agents = [fleet.start(os.path.join(os.path.dirname(__file__), "scripts", "recorder.lua"),
                          name=f"a{i}", env=agent_env(state_file, tmp_path / f"ev{i}.jsonl",
                                                      AGENT_HEARTBEAT_INTERVAL="0.2"))
              for i in (1, 2)]
    for a in agents:
        a.wait_state("running")
    # an agent's first record follows its startup sync: both are listed before a2 is killed
    wait_for(lambda: [r.get("agent_id") for r in agents[0].get("/api/cluster/agents").json()
                      ["agents"]] == ["a1", "a2"], 15, message="both records")
    agents[1].signal(signal.SIGKILL)
    agents[1].wait_exit()
    body = wait_for(lambda: (lambda b: b if b["summary"]["stale"] == 1 else None)(
        agents[0].get("/api/cluster/agents").json()), 15, message="a2 stale")
    # never counted as running: its own state is "lost"; the record keeps what it last wrote
    assert body["summary"]["states"] == {"running": 1, "lost": 1}, body["summary"]
    assert [r["state"] for r in body["agents"]] == ["running", "running"]
    r = ctl(agents[0], "agents")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:-1]}
    assert " lost (running) " in rows["a2"] and "STALE" in rows["a2"], r.stdout
    assert " running " in rows["a1"] and "lost" not in rows["a1"]
    r = ctl(agents[0], "pause", "--wait", "20")
    assert r.returncode == 0, r.stderr
    assert "every live agent applied it" in r.stderr
    assert "not waited for (stale, stopping or stopped): a2" in r.stderr
