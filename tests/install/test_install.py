"""Install and embed (issue 6): `cmake --install` into a temporary prefix, check the layout, run the
installed binary from elsewhere, and build examples/embed against the prefix with pkg-config only
(shared and static), run it and check that it paused and resumed its embedded agent and exited 0.
A second small program checks the API's error paths and agenthost_run() on its own thread.

Build directory: $AGENTHOST_BUILD_DIR, else the directory of $AGENTHOST_BIN when it is a CMake
build directory (scripts/test.sh sets it), else a fresh Release build in a temporary directory.
In a sanitizer build (AH_SANITIZE=ON) the programs are compiled with the same sanitizers.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The session fixtures build and install into one prefix: when the suite runs in parallel
# (pytest-xdist, --dist loadgroup) every test of this file runs on one worker, so that is done
# once and no two `cmake --build` share the build directory.
pytestmark = pytest.mark.xdist_group("install")
TIMEOUT = 60


def run(cmd, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", TIMEOUT)
    return subprocess.run(cmd, **kw)


def check(cmd, **kw):
    res = run(cmd, **kw)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def cmake_cache(build_dir):
    cache = Path(build_dir) / "CMakeCache.txt"
    values = {}
    for line in cache.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_]+):[A-Z]+=(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2)
    return values


def find_build_dir(tmp_root):
    explicit = os.environ.get("AGENTHOST_BUILD_DIR")
    if explicit:
        return Path(explicit).resolve()
    binary = os.environ.get("AGENTHOST_BIN")
    if binary and (Path(binary).resolve().parent / "CMakeCache.txt").exists():
        return Path(binary).resolve().parent
    build = tmp_root / "build"
    check(["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
           "-DAH_BUILD_TESTS=OFF"], timeout=300)
    return build


@pytest.fixture(scope="session")
def tmp_root():
    root = Path(tempfile.mkdtemp(prefix="agenthost-install-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def build_dir(tmp_root):
    build = find_build_dir(tmp_root)
    # Up to date in CI (a no-op); builds what install needs otherwise.
    check(["cmake", "--build", str(build), "-j4", "--target", "agenthost", "agenthost_core",
           "agenthost_shared", "agenthost_mongo", "agenthost_curl"], timeout=600)
    return build


@pytest.fixture(scope="session")
def sanitize_flags(build_dir):
    if cmake_cache(build_dir).get("AH_SANITIZE", "OFF").upper() in ("ON", "1", "TRUE", "YES"):
        return "-fsanitize=address,undefined -fno-omit-frame-pointer"
    return ""


@pytest.fixture(scope="session")
def prefix(build_dir, tmp_root):
    p = tmp_root / "prefix"
    check(["cmake", "--install", str(build_dir), "--prefix", str(p)])
    return p


def pc_env(prefix, **extra):
    env = dict(os.environ)
    env["PKG_CONFIG_PATH"] = str(prefix / "lib" / "pkgconfig")
    env.pop("LD_LIBRARY_PATH", None)
    env.pop("LUA_PATH", None)
    env.pop("LUA_CPATH", None)
    env.update(extra)
    return env


def needed_libs(binary):
    out = check(["readelf", "-d", str(binary)]).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def dynamic_symbols(binary, defined):
    flag = "--defined-only" if defined else "--undefined-only"
    out = check(["nm", "-D", flag, str(binary)]).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


# ---- layout ---------------------------------------------------------------------------------


def test_installed_files(prefix):
    binary = prefix / "bin" / "agenthost"
    assert binary.is_file() and os.access(binary, os.X_OK)
    assert (prefix / "lib" / "libagenthost.a").is_file()
    so = prefix / "lib" / "libagenthost.so"
    assert so.exists()
    assert (prefix / "lib" / "pkgconfig" / "agenthost.pc").is_file()
    assert (prefix / "share" / "agenthost" / "lua" / "agent.lua").is_file()
    assert (prefix / "share" / "agenthost" / "examples" / "embed" / "embed.c").is_file()
    # Only the public header is installed.
    assert sorted(p.name for p in (prefix / "include").iterdir()) == ["agenthost.h"]

    dyn = check(["readelf", "-d", str(so)]).stdout
    soname = re.search(r"\(SONAME\)\s+Library soname: \[([^\]]+)\]", dyn)
    assert soname and soname.group(1) == "libagenthost.so.0"
    assert (prefix / "lib" / "libagenthost.so.0").exists()

    # The shared library exports the public API, plus the internal ah_* functions for the
    # MongoDB plugin, and nothing else (no Lua, cjson or driver symbols).
    names = dynamic_symbols(so, defined=True)
    assert {"agenthost_new", "agenthost_run", "agenthost_start", "agenthost_pause",
            "agenthost_register", "agenthost_free"} <= names
    assert not [n for n in names if not n.startswith(("agenthost_", "ah_"))], sorted(names)


PLUGINS = [  # file, the library only it links, its one exported symbol, core functions it calls
    ("agenthost_mongo.so", "libmongoc-1.0.so.0", "ah_mongo_plugin_v1", {"ah_strlcpy", "ah_mono_us"}),
    ("agenthost_curl.so", "libcurl.so.4", "ah_curl_plugin_v1", {"ah_buf_append", "ah_lua_op_wait"}),
]


@pytest.mark.parametrize("plugin_file,library,symbol,calls", PLUGINS, ids=[p[0] for p in PLUGINS])
def test_mongodb_and_libcurl_are_plugins(prefix, plugin_file, library, symbol, calls):
    """libmongoc and libcurl are linked only by their plugins; the binary and libagenthost.so
    export every ah_* function a plugin imports, and a plugin exports only its table."""
    plugin = prefix / "lib" / "agenthost" / plugin_file
    assert plugin.is_file()
    assert library in needed_libs(plugin)
    binary = prefix / "bin" / "agenthost"
    so = prefix / "lib" / "libagenthost.so"
    heavy = ("libmongoc", "libbson", "libcurl", "libssl", "libcrypto")
    for obj in (binary, so):
        assert not [n for n in needed_libs(obj) if n.startswith(heavy)], obj
    exported = {n for n in dynamic_symbols(plugin, defined=True) if not n.startswith("_")}
    assert exported == {symbol}, exported
    imports = {n for n in dynamic_symbols(plugin, defined=False) if n.startswith("ah_")}
    assert calls <= imports, imports
    for obj in (binary, so):
        missing = imports - dynamic_symbols(obj, defined=True)
        assert not missing, (obj, sorted(missing))


def test_public_header_is_self_contained(prefix, tmp_root):
    header = (prefix / "include" / "agenthost.h").read_text()
    assert not re.search(r'#include\s+"', header), "the public header includes internal headers"
    assert not re.search(r"\bah_[a-z_]+_t\b", header), "the public header names internal types"
    cflags = check(["pkg-config", "--cflags", "agenthost"], env=pc_env(prefix)).stdout.split()
    src = tmp_root / "header_only.c"
    src.write_text("#include <agenthost.h>\nint main(void) { return agenthost_state_name("
                   "AGENTHOST_STATE_PAUSED)[0] == 'p' ? 0 : 1; }\n")
    check(["cc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only",
           *cflags, str(src)])


def test_pkg_config_file(prefix):
    env = pc_env(prefix)
    assert check(["pkg-config", "--modversion", "agenthost"], env=env).stdout.strip()
    libs = check(["pkg-config", "--libs", "agenthost"], env=env).stdout.split()
    assert "-lagenthost" in libs and "-lluajit-5.1" in libs
    static = check(["pkg-config", "--static", "--libs", "agenthost"], env=env).stdout
    for lib in ("-luv", "-lmicrohttpd", "-lsqlite3", "cjson"):
        assert lib in static, f"{lib} missing from pkg-config --static --libs"
    # MongoDB and libcurl are the plugins' business: linking the core never needs them.
    assert "mongoc" not in static and "bson" not in static and "curl" not in static, static


# ---- the installed binary -------------------------------------------------------------------


def test_installed_binary_runs_from_elsewhere(prefix, tmp_root):
    scripts = tmp_root / "scripts"
    scripts.mkdir(exist_ok=True)
    script = scripts / "uses_agent.lua"
    script.write_text(
        'local agent = require "agent"\n'
        'local json = require "cjson"\n'
        'assert(type(agent.log.info) == "function" and json.encode({1}) == "[1]")\n'
        "return { batch = function() return 0 end }\n")
    elsewhere = tmp_root / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    binary = prefix / "bin" / "agenthost"
    env = pc_env(prefix)
    res = check([str(binary), "check", str(script)], cwd=elsewhere, env=env)
    assert "OK" in res.stdout
    # The Lua modules are compiled in: the installed copies are not needed at run time either.
    lua_dir = prefix / "share" / "agenthost" / "lua"
    hidden = prefix / "share" / "agenthost" / "lua.hidden"
    lua_dir.rename(hidden)
    try:
        check([str(binary), "check", str(script)], cwd=elsewhere, env=env)
    finally:
        hidden.rename(lua_dir)
    broken = scripts / "no_batch.lua"
    broken.write_text('local agent = require "agent"\nreturn {}\n')
    res = run([str(binary), "check", str(broken)], cwd=elsewhere, env=env)
    assert res.returncode == 2 and "batch" in res.stderr
    version = check([str(binary), "version"], env=env).stdout
    assert version.startswith("agenthost ") and re.search(r"libmongoc \d+\.\d+", version), version


def test_installed_binary_loads_the_mongodb_plugin_on_demand(prefix, tmp_root):
    """The installed binary finds <prefix>/lib/agenthost/agenthost_mongo.so from its own location;
    without it, agent.mongo fails with a message naming where it looked."""
    script = tmp_root / "uses_mongo.lua"
    script.write_text('local mongo = require "agent.mongo"\n'
                      'assert(mongo.configured() == false and type(mongo.oid) == "function")\n'
                      "return { batch = function() return 0 end }\n")
    binary = prefix / "bin" / "agenthost"
    env = pc_env(prefix)
    env.pop("AGENTHOST_PLUGIN_DIR", None)
    check([str(binary), "check", str(script)], cwd=tmp_root, env=env)
    plugin_dir = prefix / "lib" / "agenthost"
    hidden = prefix / "lib" / "agenthost.hidden"
    plugin_dir.rename(hidden)
    try:
        res = run([str(binary), "check", str(script)], cwd=tmp_root, env=env)
        version = run([str(binary), "version"], env=env)
    finally:
        hidden.rename(plugin_dir)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "agenthost_mongo.so not found in" in res.stderr, res.stderr
    assert str(prefix / "bin" / ".." / "lib" / "agenthost") in res.stderr, res.stderr
    assert version.returncode == 0 and "libmongoc unavailable" in version.stdout, version


def test_installed_binary_loads_the_curl_plugin_for_agent_http_and_ctl(prefix, tmp_root):
    """agent.http and ctl find <prefix>/lib/agenthost/agenthost_curl.so from the binary's own
    location; without it, both name where they looked."""
    script = tmp_root / "uses_http.lua"
    script.write_text('local http = require "agent.http"\n'
                      'assert(type(http.request) == "function")\n'
                      "return { batch = function() return 0 end }\n")
    binary = prefix / "bin" / "agenthost"
    env = pc_env(prefix)
    env.pop("AGENTHOST_PLUGIN_DIR", None)
    check([str(binary), "check", str(script)], cwd=tmp_root, env=env)
    # ctl reaches the transport: nothing listens on port 1, so curl's own error comes back
    ctl = run([str(binary), "ctl", "state", "--url", "http://127.0.0.1:1", "--timeout", "5"],
              env=env)
    assert ctl.returncode == 1 and "not found" not in ctl.stderr, ctl
    plugin_dir = prefix / "lib" / "agenthost"
    hidden = prefix / "lib" / "agenthost.hidden"
    plugin_dir.rename(hidden)
    try:
        res = run([str(binary), "check", str(script)], cwd=tmp_root, env=env)
        ctl = run([str(binary), "ctl", "state", "--url", "http://127.0.0.1:1"], env=env)
    finally:
        hidden.rename(plugin_dir)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "agent.http: HTTP client support (libcurl) is not available: " in res.stderr, res.stderr
    assert "agenthost_curl.so not found in" in res.stderr, res.stderr
    assert ctl.returncode == 1 and "agenthost_curl.so not found in" in ctl.stderr, ctl


# ---- examples/embed -------------------------------------------------------------------------


def build_example(prefix, tmp_root, name, sanitize_flags, static):
    work = tmp_root / name
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(REPO / "examples" / "embed", work)
    cmd = ["make", "-C", str(work), f"CFLAGS=-O1 -g -Wall -Wextra -Werror {sanitize_flags}"]
    if static:
        cmd.append("STATIC=1")
    if sanitize_flags:
        cmd.append(f"LDFLAGS={sanitize_flags}")
    check(cmd, env=pc_env(prefix), timeout=120)
    return work / "embed"


def assert_embed_run(res):
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"embed exited {res.returncode}:\n{out}"
    assert "paused: state=paused" in res.stdout
    m = re.search(r"ticks (\d+) -> (\d+) over", res.stdout)
    assert m and m.group(1) == m.group(2), res.stdout
    assert "resumed: state=running" in res.stdout
    assert "stopped: state=stopped, exit code 0" in res.stdout
    assert "embed: OK" in res.stdout
    # The host itself saw the local commands, in order.
    paused = res.stderr.find("Agent paused (local command 'pause' by host: paused by embed.c)")
    resumed = res.stderr.find("Agent running (local command 'running' by host: resumed by embed.c)")
    stopped = res.stderr.find("Agent stopped")
    assert 0 <= paused < resumed < stopped, res.stderr


def test_embed_example_shared(prefix, tmp_root, sanitize_flags):
    exe = build_example(prefix, tmp_root, "embed-shared", sanitize_flags, static=False)
    assert "libagenthost.so.0" in needed_libs(exe)
    res = run([str(exe)], cwd=tmp_root, env=pc_env(prefix, LD_LIBRARY_PATH=str(prefix / "lib")))
    assert_embed_run(res)


def test_embed_example_static(prefix, tmp_root, sanitize_flags):
    exe = build_example(prefix, tmp_root, "embed-static", sanitize_flags, static=True)
    assert not [n for n in needed_libs(exe) if "agenthost" in n]
    res = run([str(exe)], cwd=tmp_root, env=pc_env(prefix))
    assert_embed_run(res)


# ---- API edge cases -------------------------------------------------------------------------

API_CHECK = r"""
#include <agenthost.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#define EXPECT(c) do { if (!(c)) { fprintf(stderr, "FAILED line %d: %s\n", __LINE__, #c); \
    return 1; } } while (0)

static int add(lua_State *L)
{
    int *base = agenthost_userdata(L);
    lua_pushinteger(L, *base + luaL_checkinteger(L, 1));
    return 1;
}

static void *runner(void *arg)
{
    static int code;
    code = agenthost_run(arg);
    return &code;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        return 2;
    }
    const char *state = argv[1];
    char err[512] = "";
    agenthost_config_t *cfg = agenthost_config_new();
    EXPECT(cfg != NULL);
    EXPECT(agenthost_config_set(cfg, "NO_SUCH_SETTING", "1", err, sizeof(err)) ==
           AGENTHOST_EINVAL);
    EXPECT(strstr(err, "NO_SUCH_SETTING") != NULL);
    /* A bad value is refused when it is set, with the setting and what it expects. */
    EXPECT(agenthost_config_set(cfg, "HTTP_BIND", "not an ip", err, sizeof(err)) ==
           AGENTHOST_EINVAL);
    EXPECT(strstr(err, "HTTP_BIND") != NULL && strstr(err, "IPv4 or IPv6") != NULL);
    EXPECT(agenthost_config_set(cfg, "AGENTHOST_STATE", state, err, sizeof(err)) == 0);
    EXPECT(agenthost_config_set(cfg, "HTTP_PORT", "0", err, sizeof(err)) == 0);
    EXPECT(agenthost_config_set(cfg, "HTTP_BIND", "127.0.0.1", err, sizeof(err)) == 0);
    EXPECT(agenthost_config_set(cfg, "AGENTHOST_SIGNALS", "false", err, sizeof(err)) == 0);

    /* Exactly one script; a syntax error fails in agenthost_new with the chunk name. */
    EXPECT(agenthost_new(cfg, NULL, NULL, err, sizeof(err)) == NULL);
    EXPECT(agenthost_new(cfg, NULL, "return {", err, sizeof(err)) == NULL);
    EXPECT(strstr(err, "embedded:1:") != NULL);
    EXPECT(agenthost_new(cfg, "/nonexistent/x.lua", NULL, err, sizeof(err)) == NULL);
    EXPECT(strstr(err, "/nonexistent/x.lua") != NULL);

    /* A contract error is reported by agenthost_start. */
    agenthost_t *bad = agenthost_new(cfg, NULL, "return {}", err, sizeof(err));
    EXPECT(bad != NULL);
    EXPECT(agenthost_start(bad) == AGENTHOST_ESCRIPT);
    EXPECT(strstr(agenthost_error(bad), "batch") != NULL);
    EXPECT(agenthost_state(bad) == AGENTHOST_STATE_STOPPED);
    EXPECT(agenthost_pause(bad, NULL) == AGENTHOST_EINVAL);
    EXPECT(strstr(agenthost_error(bad), "agenthost_pause: the host is stopping or has stopped") !=
           NULL);
    agenthost_free(bad);

    /* A failing init: exit 1, and agenthost_error() carries the Lua error. */
    agenthost_t *failing = agenthost_new(
        cfg, NULL, "return { init = function() error('no database today') end,\n"
                   "         batch = function() end }", err, sizeof(err));
    EXPECT(failing != NULL);
    EXPECT(agenthost_run(failing) == AGENTHOST_EXIT_FAILURE);
    EXPECT(strstr(agenthost_error(failing), "init failed: embedded:1: no database today") != NULL);
    agenthost_free(failing);

    /* agent.ext at the script's top level and through require "agent.ext"; agenthost_run on
     * another thread, stopped by a local shutdown command. */
    const char *src =
        "local agent = require 'agent'\n"
        "local ext = require 'agent.ext'\n"
        "assert(agent.ext == ext and ext.add(2) == 42, 'agent.ext')\n"
        "return { batch = function() agent.sleep(0.01) return 0 end,\n"
        "         on_shutdown = function(ev) agent.log.info('bye: %s', ev.reason) end }\n";
    agenthost_t *h = agenthost_new(cfg, NULL, src, err, sizeof(err));
    agenthost_config_free(cfg);
    EXPECT(h != NULL);
    int base = 40;
    EXPECT(agenthost_register(h, "1bad", add, &base) == AGENTHOST_EINVAL);
    EXPECT(agenthost_register(h, "add", add, &base) == 0);
    EXPECT(agenthost_register(h, "add", add, &base) == AGENTHOST_EINVAL);
    EXPECT(agenthost_pause(h, "too early") == AGENTHOST_EINVAL);
    EXPECT(strstr(agenthost_error(h), "agenthost_pause: the host has not been started") != NULL);
    EXPECT(agenthost_wait(h) == AGENTHOST_EINVAL);
    pthread_t t;
    EXPECT(pthread_create(&t, NULL, runner, h) == 0);
    EXPECT(agenthost_wait_state(h, AGENTHOST_STATE_RUNNING, 20) == 0);
    EXPECT(agenthost_register(h, "late", add, &base) == AGENTHOST_EINVAL);
    EXPECT(agenthost_run(h) == AGENTHOST_EINVAL);
    EXPECT(agenthost_http_port(h) > 0);
    EXPECT(agenthost_shutdown(h, "api check done") == 0);
    void *code = NULL;
    pthread_join(t, &code);
    EXPECT(*(int *)code == AGENTHOST_EXIT_OK);
    EXPECT(agenthost_state(h) == AGENTHOST_STATE_STOPPED);
    EXPECT(agenthost_wait_state(h, AGENTHOST_STATE_RUNNING, 1) == AGENTHOST_EINVAL);
    /* The errors of the calls before are gone after a clean stop. */
    EXPECT(strcmp(agenthost_error(h), "") == 0);
    /* After the stop a pause is refused, not silently dropped; a shutdown is already done. */
    EXPECT(agenthost_pause(h, "late") == AGENTHOST_EINVAL);
    EXPECT(strstr(agenthost_error(h), "stopping or has stopped") != NULL);
    EXPECT(agenthost_resume(h, "late") == AGENTHOST_EINVAL);
    EXPECT(agenthost_shutdown(h, "again") == 0);
    EXPECT(agenthost_stop(h) == 0);
    agenthost_free(h);
    printf("api check: OK\n");
    return 0;
}
"""


DEFAULTS_CHECK = r"""
#include <agenthost.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#define EXPECT(c) do { if (!(c)) { fprintf(stderr, "FAILED line %d: %s\n", __LINE__, #c); \
    return 1; } } while (0)

static volatile sig_atomic_t usr1_seen;
static void on_usr1(int sig) { (void)sig; usr1_seen = 1; }

/* agenthost_new(NULL, ...): loopback, any free port, no state file, the program's signals. */
int main(void)
{
    char err[512] = "";
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_usr1;
    EXPECT(sigaction(SIGUSR1, &sa, NULL) == 0);
    agenthost_t *h = agenthost_new(NULL, NULL,
        "local agent = require 'agent'\n"
        "return { batch = function() agent.sleep(0.05) return 0 end }", err, sizeof(err));
    EXPECT(h != NULL);
    EXPECT(agenthost_start(h) == 0);
    EXPECT(agenthost_wait_state(h, AGENTHOST_STATE_RUNNING, 20) == 0);
    EXPECT(agenthost_http_port(h) > 0 && agenthost_http_port(h) != 8000);
    EXPECT(raise(SIGUSR1) == 0);
    EXPECT(usr1_seen == 1);
    EXPECT(agenthost_state(h) == AGENTHOST_STATE_RUNNING);
    EXPECT(agenthost_stop(h) == AGENTHOST_EXIT_OK);
    agenthost_free(h);
    printf("defaults check: OK\n");
    return 0;
}
"""


def test_embedding_defaults_are_loopback_any_port_no_state_file_no_signals(prefix, tmp_root,
                                                                            sanitize_flags):
    env = pc_env(prefix)
    src = tmp_root / "defaults_check.c"
    src.write_text(DEFAULTS_CHECK)
    exe = tmp_root / "defaults_check"
    cflags = check(["pkg-config", "--cflags", "agenthost"], env=env).stdout.split()
    libs = check(["pkg-config", "--libs", "agenthost"], env=env).stdout.split()
    check(["cc", "-g", "-Wall", "-Wextra", "-Werror", *sanitize_flags.split(), "-o", str(exe),
           str(src), *cflags, *libs, "-lpthread"])
    work = tmp_root / "defaults_cwd"
    work.mkdir(exist_ok=True)
    res = run([str(exe)], cwd=work, env=pc_env(prefix, LD_LIBRARY_PATH=str(prefix / "lib")))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "defaults check: OK" in res.stdout
    assert re.search(r"HTTP API listening on 127\.0\.0\.1:\d+", res.stderr), res.stderr
    assert "ENABLE_DISTRIBUTED_CONTROL=false" in res.stderr, res.stderr
    assert list(work.iterdir()) == []  # no ./agenthost-state.db


MONGO_CHECK = r"""
#include <agenthost.h>
#include <stdio.h>
#include <string.h>

/* require "agent.mongo" and "agent.http" in a script must load the plugins (an unconfigured
 * MongoDB binding). */
int main(void)
{
    char err[512] = "";
    agenthost_config_t *cfg = agenthost_config_new();
    if (cfg == NULL) {
        return 2;
    }
    const char *src = "local mongo = require 'agent.mongo'\n"
                      "assert(mongo.configured() == false, 'configured')\n"
                      "local http = require 'agent.http'\n"
                      "assert(type(http.get) == 'function', 'agent.http')\n"
                      "return { batch = function() return 0 end }\n";
    agenthost_t *h = agenthost_new(cfg, NULL, src, err, sizeof(err));
    agenthost_config_free(cfg);
    if (h == NULL) {
        fprintf(stderr, "FAILED: %s\n", err);
        return 1;
    }
    agenthost_free(h);
    printf("mongo check: OK\n");
    return 0;
}
"""


@pytest.mark.parametrize("link", ["shared", "static"])
def test_embedders_load_the_plugins(prefix, tmp_root, sanitize_flags, link):
    """libagenthost.so finds the plugins in <libdir>/agenthost and gives them the ah_* functions;
    a static embedder links the whole archive with -rdynamic as docs/EMBEDDING.md says and points
    AGENTHOST_PLUGIN_DIR at the plugins."""
    env = pc_env(prefix)
    src = tmp_root / "mongo_check.c"
    src.write_text(MONGO_CHECK)
    exe = tmp_root / f"mongo_check_{link}"
    cflags = check(["pkg-config", "--cflags", "agenthost"], env=env).stdout.split()
    if link == "shared":
        libs = check(["pkg-config", "--libs", "agenthost"], env=env).stdout.split()
    else:
        static = check(["pkg-config", "--static", "--libs", "agenthost"], env=env).stdout.split()
        archive = ["-rdynamic", "-Wl,--whole-archive", "-Wl,-Bstatic", "-lagenthost",
                   "-Wl,-Bdynamic", "-Wl,--no-whole-archive"]
        libs = [*archive, *[f for f in static if f != "-lagenthost"]]
    check(["cc", "-g", "-Wall", "-Wextra", "-Werror", *sanitize_flags.split(), "-o", str(exe),
           str(src), *cflags, *libs, "-lpthread"])
    run_env = pc_env(prefix, AGENTHOST_PLUGIN_DIR=str(prefix / "lib" / "agenthost"))
    if link == "shared":
        run_env = pc_env(prefix, LD_LIBRARY_PATH=str(prefix / "lib"))  # found from the .so's dir
    res = run([str(exe)], cwd=tmp_root, env=run_env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "mongo check: OK" in res.stdout


def test_api_edge_cases(prefix, tmp_root, sanitize_flags):
    env = pc_env(prefix)
    src = tmp_root / "api_check.c"
    src.write_text(API_CHECK)
    exe = tmp_root / "api_check"
    cflags = check(["pkg-config", "--cflags", "agenthost"], env=env).stdout.split()
    libs = check(["pkg-config", "--libs", "agenthost"], env=env).stdout.split()
    check(["cc", "-g", "-Wall", "-Wextra", "-Werror", *sanitize_flags.split(), "-o", str(exe),
           str(src), *cflags, *libs, "-lpthread"])
    state = tmp_root / "api_check_state.db"
    res = run([str(exe), str(state)], cwd=tmp_root,
              env=pc_env(prefix, LD_LIBRARY_PATH=str(prefix / "lib")))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "api check: OK" in res.stdout
    assert "bye: api check done" in res.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
