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
