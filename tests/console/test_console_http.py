"""The console over plain HTTP: what is served, with which headers, and HTTP_CONSOLE=false."""
import os
import re
from html.parser import HTMLParser

from agenthost_harness import http
from console_harness import REPO, WORKER, agent_env

WEB = os.path.join(REPO, "web")
ASSETS = {"/": "text/html; charset=utf-8", "/console.js": "text/javascript; charset=utf-8",
          "/console.css": "text/css; charset=utf-8", "/favicon.svg": "image/svg+xml"}


def csp_directives(value):
    out = {}
    for part in value.split(";"):
        words = part.split()
        if words:
            out[words[0]] = words[1:]
    return out


def test_console_files_are_served_with_security_headers(fleet, state_file):
    agent = fleet.start(WORKER, env=agent_env(state_file))
    for path, content_type in ASSETS.items():
        r = agent.get(path)
        assert r.status == 200, (path, r.body)
        name = "index.html" if path == "/" else path[1:]
        with open(os.path.join(WEB, name), encoding="utf-8") as f:
            assert r.body == f.read(), f"{path} differs from web/{name}"
        assert r.headers["Content-Type"] == content_type
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["X-Frame-Options"] == "DENY"
        csp = r.headers["Content-Security-Policy"]
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
        d = csp_directives(csp)
        assert d["default-src"] == ["'none'"]
        assert d["frame-ancestors"] == ["'none'"]
        for directive in ("script-src", "style-src", "connect-src", "img-src"):
            assert d[directive] == ["'self'"], (directive, csp)
    r = http("HEAD", agent.url + "/")
    assert r.status == 200 and r.body == ""
    assert r.headers["Content-Security-Policy"]
    # the API keeps answering JSON, and every answer is nosniff
    r = agent.get("/api/agent/state")
    assert r.status == 200 and r.headers["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" not in r.headers
    assert agent.get("/index.html").status == 404
    r = agent.post("/")
    assert r.status == 404 and r.json()["status"] == "error"


def test_http_console_false_turns_the_console_off(fleet, state_file):
    agent = fleet.start(WORKER, env=agent_env(state_file, HTTP_CONSOLE="false"))
    for path in ASSETS:
        r = agent.get(path)
        assert r.status == 404, (path, r.status)
        assert r.json()["status"] == "error"
    assert agent.get("/api/agent/state").status == 200


def test_bad_http_console_value_is_refused(fleet, state_file):
    agent = fleet.start(WORKER, env=agent_env(state_file, HTTP_CONSOLE="maybe"), wait_port=False)
    assert agent.wait_exit() != 0
    assert "HTTP_CONSOLE" in agent.log_text()


class _Inline(HTMLParser):
    """Collects what a strict Content-Security-Policy would block in a page."""

    def __init__(self):
        super().__init__()
        self.problems = []
        self.labelled = set()
        self.controls = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and "src" not in a:
            self.problems.append("inline <script>")
        if tag == "style":
            self.problems.append("<style> element")
        for name in a:
            if name == "style" or name.startswith("on"):
                self.problems.append(f"{name}= attribute on <{tag}>")
        for name in ("src", "href"):
            value = a.get(name) or ""
            if re.match(r"^(https?:)?//", value) or value.startswith("data:"):
                self.problems.append(f"{name}={value} leaves the origin")
        if tag == "label" and "for" in a:
            self.labelled.add(a["for"])
        if tag in ("input", "select", "textarea"):
            self.controls.append(a.get("id"))


def test_assets_are_small_strict_and_labelled():
    names = sorted(os.listdir(WEB))
    total = sum(os.path.getsize(os.path.join(WEB, n)) for n in names)
    assert total < 100 * 1024, f"web/ holds {total} bytes"
    with open(os.path.join(WEB, "index.html"), encoding="utf-8") as f:
        parser = _Inline()
        parser.feed(f.read())
    assert parser.problems == []
    assert parser.controls and all(c in parser.labelled for c in parser.controls), (
        parser.controls, parser.labelled)
    with open(os.path.join(WEB, "console.js"), encoding="utf-8") as f:
        js = f.read()
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                   "new Function"):
        assert banned not in js, f"console.js uses {banned}"
