"""The command line: configuration errors, version, ctl, and the JSON log format."""
import json
import re
import signal
import subprocess
from pathlib import Path

import pytest

from agenthost_harness import BINARY, agent_env, closed_port, run_cli, script, wait_for

RECORDER = script("recorder.lua")

BAD_CONFIG = [
    ("HTTP_PORT", "abc"),
    ("HTTP_PORT", "70000"),
    ("CONTROL_POLLING_INTERVAL", "0"),
    ("CONTROL_POLLING_INTERVAL", "-1"),
    ("CONTROL_POLLING_INTERVAL", "soon"),
    ("ENABLE_CHANGE_STREAMS", "maybe"),
    ("ENABLE_DISTRIBUTED_CONTROL", "sometimes"),
    ("LOG_FORMAT", "xml"),
    ("LOG_LEVEL", "loud"),
    ("BATCH_TIMEOUT", "0"),
    ("SHUTDOWN_TIMEOUT", "x"),
    ("HTTP_BIND", "not an ip"),
    ("HTTP_BIND", "example.com"),
]


@pytest.mark.parametrize("var,value", BAD_CONFIG, ids=[f"{v}={x}" for v, x in BAD_CONFIG])
def test_bad_config_exits_2_naming_the_variable(state_file, tmp_path, var, value):
    env = agent_env(state_file, tmp_path / "ev.jsonl")
    env[var] = value
    p = run_cli(["run", RECORDER], env=env)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert var in p.stdout + p.stderr, (p.stdout, p.stderr)


def test_help_lists_every_setting_of_the_readme_with_its_range():
    """`agenthost --help` and README's Settings table come from the same rows."""
    p = run_cli(["run", "--help"])
    assert p.returncode == 0, p.stderr
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    names = re.findall(r"^\| `([A-Z_]+)` \|", readme.split("## Settings", 1)[1].split("\n## ", 1)[0], re.M)
    assert len(names) > 10, names
    for name in names:
        assert re.search(rf"^  {name} ", p.stdout, re.M), name
    assert re.search(r"^  BATCH_TIMEOUT .*default 300 .*\[0\.01 to 86400 s\]$", p.stdout, re.M), p.stdout


def test_out_of_range_setting_exits_2_with_the_range(state_file, tmp_path):
    env = agent_env(state_file, tmp_path / "ev.jsonl")
    env["BATCH_TIMEOUT"] = "1e300"
    p = run_cli(["run", RECORDER], env=env)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert ('invalid BATCH_TIMEOUT="1e300": expected a number of seconds or a duration such as '
            '250ms, 90s, 5m or 1h: 0.01 to 86400 s') in p.stderr


def test_version_exits_0():
    p = run_cli(["version"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("agenthost "), p.stdout


def test_missing_script_exits_2(state_file):
    p = run_cli(["run", "/nonexistent/agent.lua"], env=agent_env(state_file))
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "/nonexistent/agent.lua" in p.stdout + p.stderr


def test_ctl_pause_and_state(fleet, state_file, tmp_path):
    a = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl"), name="ctl")
    a.wait_state("running", timeout=15)
    p = run_cli(["ctl", "pause", "--url", a.url, "--reason", "x"])
    assert p.returncode == 0, (p.stdout, p.stderr)
    a.wait_state("paused")
    cs = a.get("/api/cluster/control-state").json()
    assert cs["command"] == "pause" and cs["reason"] == "x" and cs["version"] == 1

    p = run_cli(["ctl", "state", "--url", a.url])
    assert p.returncode == 0, (p.stdout, p.stderr)
    state = json.loads(p.stdout)
    assert state["command"] == "pause" and state["version"] == 1

    p = run_cli(["ctl", "history", "--url", a.url, "--limit", "5"])
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert json.loads(p.stdout)["count"] == 1


def test_ctl_reports_api_errors_with_exit_1(fleet, state_file, tmp_path):
    a = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl",
                                            AGENT_API_TOKEN="tok"), name="ctl-auth")
    a.wait_state("running", timeout=15)
    p = run_cli(["ctl", "pause", "--url", a.url, "--reason", "x"], env={"AGENT_API_TOKEN": ""})
    assert p.returncode == 1, (p.stdout, p.stderr)
    p = run_cli(["ctl", "pause", "--url", a.url, "--token", "tok"])
    assert p.returncode == 0, (p.stdout, p.stderr)


def test_ctl_against_dead_port_exits_1():
    p = run_cli(["ctl", "state", "--url", f"http://127.0.0.1:{closed_port()}", "--timeout", "3"])
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stderr.strip()


def test_ctl_by_host_name_and_refuses_header_injection(fleet, state_file, tmp_path):
    a = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl",
                                            AGENT_API_TOKEN="tok"), name="ctl-name")
    a.wait_state("running", timeout=15)
    # A name, not an address: resolved by the client (every address it resolves to is tried).
    p = run_cli(["ctl", "state", "--local", "--url", f"http://localhost:{a.port}",
                 "--token", "tok"])
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert json.loads(p.stdout)["state"] == "running"
    for bad in ("tok\r\nX-Injected: 1", "tok\nX", "tok\x01"):
        p = run_cli(["ctl", "pause", "--url", a.url, "--token", bad])
        assert p.returncode == 2, (p.stdout, p.stderr)
        assert "contains CR, LF" in p.stderr, p.stderr
        p = run_cli(["ctl", "pause", "--url", a.url], env={"AGENT_API_TOKEN": bad})
        assert p.returncode == 2, (p.stdout, p.stderr)
    p = run_cli(["ctl", "state", "--url", f"http://127.0.0.1:{a.port}\r\nHost: evil"])
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert a.state()["state"] == "running"  # nothing was sent
    assert a.get("/api/cluster/history").json()["count"] == 0


def test_ctl_bad_usage_exits_2():
    p = run_cli(["ctl", "explode", "--url", "http://127.0.0.1:1"])
    assert p.returncode == 2, (p.stdout, p.stderr)


def test_json_log_lines_all_parse(fleet, state_file, tmp_path):
    env = agent_env(state_file, LOG_FORMAT="json", FAIL_TIMES=1)
    a = fleet.start(script("batch_error.lua"), env=env, name="json")
    # An error with a multi-line traceback, a transition, and a shutdown all go through the log.
    wait_for(lambda: a.state()["errors"] == 1 and a.state()["batches"] >= 2, 15,
             message="one error then successful batches")
    assert a.post("/api/cluster/pause?reason=json+%22quoted%22").status == 200
    a.wait_state("paused")
    a.signal(signal.SIGTERM)
    assert a.wait_exit() == 0, a.log_text()
    lines = [l for l in a.lines if l.strip()]
    assert len(lines) >= 5
    for line in lines:
        obj = json.loads(line)
        assert isinstance(obj, dict), line
        assert obj["level"] in ("DEBUG", "INFO", "WARNING", "ERROR"), line
        assert isinstance(obj["msg"], str), line
    msgs = [json.loads(l)["msg"] for l in lines]
    assert any("stack traceback" in m and "\n" in m for m in msgs), msgs
    assert any('"quoted"' in m for m in msgs), msgs


# ---- MongoDB support is a plugin (agenthost_mongo.so), loaded only when MongoDB is used ------


def mapped_files(pid):
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1] for line in f if "/" in line}


def maps_mongo(pid):
    return [p for p in mapped_files(pid) if "libmongoc" in p or "agenthost_mongo" in p]


def test_an_agent_on_the_embedded_store_never_maps_libmongoc(fleet, state_file, tmp_path):
    a = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl"), name="lean")
    a.wait_state("running", timeout=15)
    wait_for(lambda: a.state()["batches"] >= 2, 15, message="two batches")
    assert maps_mongo(a.proc.pid) == [], maps_mongo(a.proc.pid)
    # the HTTP API answers, from a process that mapped no TLS library
    assert a.get("/healthz").status == 200
    tls = [p for p in mapped_files(a.proc.pid) if "libgnutls" in p or "libmicrohttpd" in p]
    assert tls == [], tls


def test_require_agent_mongo_loads_the_plugin(fleet, state_file, tmp_path):
    uses = tmp_path / "uses_mongo.lua"
    uses.write_text('local agent = require "agent"\n'
                    'local mongo = require "agent.mongo"\n'
                    'agent.log.info("configured=%s", tostring(mongo.configured()))\n'
                    "return { batch = function() agent.sleep(0.05) return 0 end }\n")
    a = fleet.start(str(uses), env=agent_env(state_file), name="mongo-user")
    a.wait_log(r"configured=false")
    a.wait_state("running", timeout=15)
    found = maps_mongo(a.proc.pid)
    assert any("agenthost_mongo.so" in p for p in found), found
    assert any("libmongoc" in p for p in found), found


def test_mongodb_uri_without_the_plugin_exits_2_naming_the_file(state_file, tmp_path):
    empty = tmp_path / "no-plugins"
    empty.mkdir()
    env = agent_env(state_file, tmp_path / "ev.jsonl", MONGODB_URI="mongodb://127.0.0.1:1/",
                    AGENTHOST_PLUGIN_DIR=str(empty))
    p = run_cli(["run", RECORDER], env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "MONGODB_URI" in out and f"agenthost_mongo.so not found in {empty}" in out, out


def test_a_broken_plugin_is_reported_with_the_loader_error(state_file, tmp_path):
    bad = tmp_path / "bad-plugin"
    bad.mkdir()
    (bad / "agenthost_mongo.so").write_text("not an ELF file\n" * 256)
    env = agent_env(state_file, tmp_path / "ev.jsonl", MONGODB_URI="mongodb://127.0.0.1:1/",
                    AGENTHOST_PLUGIN_DIR=str(bad))
    p = run_cli(["run", RECORDER], env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert f"cannot load {bad}/agenthost_mongo.so: " in out and "ELF" in out, out
    # agent.mongo in a script reports the same thing as a Lua error (`check` exits 2 with it).
    uses = tmp_path / "uses_mongo.lua"
    uses.write_text('require "agent.mongo"\nreturn { batch = function() return 0 end }\n')
    p = run_cli(["check", str(uses)], env={"AGENTHOST_PLUGIN_DIR": str(bad)})
    assert p.returncode == 2 and "agent.mongo: MongoDB support is not available" in p.stderr, p
    # `version` still works and says the driver is unavailable.
    p = run_cli(["version"], env={"AGENTHOST_PLUGIN_DIR": str(bad)})
    assert p.returncode == 0 and "libmongoc unavailable" in p.stdout, p


def test_version_names_the_driver_from_the_plugin():
    p = run_cli(["version"])
    assert p.returncode == 0, p.stderr
    assert re.search(r"libmongoc \d+\.\d+\.\d+", p.stdout), p.stdout


# ---- libcurl is a plugin too (agenthost_curl.so): agent.http and ctl load it ------------------

# Libraries an idle agent must not map: libcurl and what it drags in (OpenSSL), and the MongoDB
# driver. Their resident cost is why they are plugins (docs/ARCHITECTURE.md, "Plugins").
HEAVY_LIBRARIES = ("libcurl", "libssl", "libcrypto", "libmongoc", "libbson")


def needed_libs(path):
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out.stdout)


def test_the_binary_and_libagenthost_need_no_curl_tls_or_mongodb_library():
    """A deterministic guard: the NEEDED entries of agenthost and libagenthost.so name none of the
    libraries only the plugins may link."""
    binary = Path(BINARY).resolve()
    shared = binary.parent / "libagenthost.so"
    assert shared.exists(), f"{shared} is built next to {binary}"
    for path in (binary, shared):
        needed = needed_libs(path)
        assert any(n.startswith("libc.so") for n in needed), (path, needed)  # readelf works
        heavy = [n for n in needed if n.startswith(HEAVY_LIBRARIES)]
        assert heavy == [], f"{path} links {heavy}: move that code into a plugin"
    for plugin, lib in (("agenthost_curl.so", "libcurl"), ("agenthost_mongo.so", "libmongoc")):
        assert any(n.startswith(lib) for n in needed_libs(binary.parent / plugin)), plugin


# The HTTP API serves plain HTTP: the executable carries libmicrohttpd's archive without its TLS
# library (core/notls/ah_http_notls.c), so no agent loads gnutls and what gnutls needs.
SERVER_TLS_LIBRARIES = ("libmicrohttpd", "libgnutls", "libnettle", "libhogweed", "libgmp",
                        "libtasn1", "libp11-kit", "libidn2", "libunistring")


def test_the_binary_links_libmicrohttpd_without_gnutls():
    binary = Path(BINARY).resolve()
    needed = needed_libs(binary)
    assert any(n.startswith("libc.so") for n in needed), needed  # readelf works
    tls = [n for n in needed if n.startswith(SERVER_TLS_LIBRARIES)]
    assert tls == [], f"{binary} links {tls}: link libmicrohttpd's archive (CMakeLists.txt)"
    # the stand-ins stay inside the executable: a plugin's real gnutls keeps its own functions
    out = subprocess.run(["nm", "-D", "--defined-only", str(binary)], capture_output=True,
                         text=True, check=True).stdout
    assert "MHD_start_daemon" in out, "libmicrohttpd is linked in"
    assert [l for l in out.splitlines() if " gnutls_" in l] == [], "gnutls stand-ins are exported"


# Every shared library costs each start its mapping, relocations and page faults: the executable
# carries LuaJIT, libuv and SQLite from their archives, and needs only the C runtime.
EXECUTABLE_NEEDS = ("libc.so", "libm.so", "libgcc_s.so", "ld-linux",
                    "libasan.so", "libubsan.so")  # the last two: a sanitizer build


def test_the_binary_needs_only_the_c_runtime():
    binary = Path(BINARY).resolve()
    needed = needed_libs(binary)
    assert any(n.startswith("libc.so") for n in needed), needed  # readelf works
    extra = [n for n in needed if not n.startswith(EXECUTABLE_NEEDS)]
    assert extra == [], f"{binary} links {extra}: link the archive (CMakeLists.txt)"
    # one copy of each in the process: the plugins and a script's C modules bind to the
    # executable's LuaJIT and libuv, so every function of theirs is exported, used or not
    out = subprocess.run(["nm", "-D", "--defined-only", str(binary)], capture_output=True,
                         text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines()}
    for name in ("luaL_openlib", "lua_getallocf", "luaJIT_setmode", "uv_fs_sendfile",
                 "uv_tty_init", "sqlite3_open_v2"):
        assert name in exported, name


def test_a_script_c_module_and_the_plugin_bind_to_the_executable_lua(fleet, state_file, tmp_path):
    """A C module required by a script calls the Lua API of the executable's LuaJIT, which the
    agent's Lua state belongs to; the curl plugin's libuv calls land on the executable's too."""
    src = tmp_path / "probe.c"
    src.write_text('#include <lauxlib.h>\n'
                   'static int twice(lua_State *L) {\n'
                   '    lua_pushinteger(L, 2 * luaL_checkinteger(L, 1));\n'
                   '    return 1;\n'
                   '}\n'
                   'int luaopen_probe(lua_State *L) {\n'
                   '    lua_newtable(L);\n'
                   '    lua_pushcfunction(L, twice);\n'
                   '    lua_setfield(L, -2, "twice");\n'
                   '    return 1;\n'
                   '}\n')
    cflags = subprocess.run(["pkg-config", "--cflags", "luajit"], capture_output=True,
                            text=True, check=True).stdout.split()
    # no -lluajit: the module takes the Lua API from the process that loads it
    subprocess.run(["cc", "-shared", "-fPIC", *cflags, "-o", str(tmp_path / "probe.so"), str(src)],
                   check=True)
    uses = tmp_path / "uses_probe.lua"
    uses.write_text(f'package.cpath = "{tmp_path}/?.so;" .. package.cpath\n'
                    'local agent = require "agent"\n'
                    'local probe = require "probe"\n'
                    'local http = require "agent.http"\n'
                    'agent.log.info("probe=%d", probe.twice(21))\n'
                    'return { batch = function()\n'
                    f'    local res, err, code = http.get("http://127.0.0.1:{closed_port()}/")\n'
                    '    agent.log.info("http=%s", tostring(code))\n'
                    '    agent.sleep(0.2)\n'
                    '    return 0\n'
                    'end }\n')
    a = fleet.start(str(uses), env=agent_env(state_file), name="c-module")
    a.wait_log(r"probe=42")
    a.wait_log(r"http=connect")


def maps_curl(pid):
    return [p for p in mapped_files(pid)
            if "agenthost_curl" in p or "libcurl" in p or "libssl" in p or "libcrypto" in p]


def test_an_agent_that_makes_no_http_request_never_maps_libcurl(fleet, state_file, tmp_path):
    a = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl"), name="no-http")
    a.wait_state("running", timeout=15)
    wait_for(lambda: a.state()["batches"] >= 2, 15, message="two batches")
    # ctl talks to it (and loads the plugin in its own process, not in the agent's)
    p = run_cli(["ctl", "state", "--local", "--url", a.url])
    assert p.returncode == 0 and '"state"' in p.stdout, p
    assert maps_curl(a.proc.pid) == [], maps_curl(a.proc.pid)


def test_require_agent_http_loads_the_curl_plugin(fleet, state_file, tmp_path):
    uses = tmp_path / "uses_http.lua"
    uses.write_text('local agent = require "agent"\n'
                    'local http = require "agent.http"\n'
                    'agent.log.info("http=%s", type(http.get))\n'
                    "return { batch = function() agent.sleep(0.05) return 0 end }\n")
    a = fleet.start(str(uses), env=agent_env(state_file), name="http-user")
    a.wait_log(r"http=function")
    a.wait_state("running", timeout=15)
    found = maps_curl(a.proc.pid)
    assert any("agenthost_curl.so" in p for p in found), found
    assert any("libcurl" in p for p in found), found
    assert maps_mongo(a.proc.pid) == [], maps_mongo(a.proc.pid)


def test_agent_http_and_ctl_without_the_curl_plugin_name_the_file(state_file, tmp_path):
    empty = tmp_path / "no-plugins"
    empty.mkdir()
    uses = tmp_path / "uses_http.lua"
    uses.write_text('require "agent.http"\nreturn { batch = function() return 0 end }\n')
    p = run_cli(["check", str(uses)], env={"AGENTHOST_PLUGIN_DIR": str(empty)})
    assert p.returncode == 2, p
    assert ("agent.http: HTTP client support (libcurl) is not available: "
            f"agenthost_curl.so not found in {empty} (AGENTHOST_PLUGIN_DIR)") in p.stderr, p.stderr
    # a script that never requires it does not care
    plain = tmp_path / "plain.lua"
    plain.write_text('require "agent"\nreturn { batch = function() return 0 end }\n')
    p = run_cli(["check", str(plain)], env={"AGENTHOST_PLUGIN_DIR": str(empty)})
    assert p.returncode == 0, p
    p = run_cli(["ctl", "state", "--url", f"http://127.0.0.1:{closed_port()}"],
                env={"AGENTHOST_PLUGIN_DIR": str(empty)})
    assert p.returncode == 1, p
    assert f"agenthost_curl.so not found in {empty}" in p.stderr, p.stderr
    p = run_cli(["version"], env={"AGENTHOST_PLUGIN_DIR": str(empty)})
    assert p.returncode == 0 and "libcurl unavailable" in p.stdout, p


def test_version_names_libcurl_from_the_plugin():
    p = run_cli(["version"])
    assert p.returncode == 0, p.stderr
    assert re.search(r"libcurl \d+\.\d+\.\d+", p.stdout), p.stdout


def test_an_ipv6_bind_is_logged_in_brackets(fleet, state_file, tmp_path):
    a = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl", HTTP_BIND="::1"),
                    name="v6")
    m = a.wait_log(r"HTTP API listening on (\S+)")
    assert re.fullmatch(r"\[::1\]:\d+", m.group(1)), m.group(0)
    a.signal(signal.SIGTERM)
    assert a.wait_exit() == 0, a.log_text()


@pytest.mark.parametrize("value", ["nan", "-nan", "inf", "1e300", "0", "-1", "5x", ""])
def test_ctl_timeout_must_be_a_sane_number_of_seconds(value):
    p = run_cli(["ctl", "state", "--url", f"http://127.0.0.1:{closed_port()}", "--timeout", value])
    assert p.returncode == 2, (value, p.stdout, p.stderr)
    assert ("agenthost ctl: --timeout needs a number of seconds, more than 0 and at most 86400"
            in p.stderr), p.stderr
