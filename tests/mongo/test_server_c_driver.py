"""mongo_test_server.py checked with mongo-c-driver (see c_driver_check.c)."""

import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture(scope="session")
def c_driver_check(tmp_path_factory):
    env = os.environ.get("MONGO_C_DRIVER_CHECK")
    if env:
        assert os.access(env, os.X_OK), "MONGO_C_DRIVER_CHECK=%s is not executable" % env
        return env
    built = os.path.join(REPO, "build", "tests", "mongo", "mongo_c_driver_check")
    sources = [os.path.join(HERE, f) for f in ("c_driver_check.c", "CMakeLists.txt")]
    if os.access(built, os.X_OK) and \
            os.path.getmtime(built) >= max(os.path.getmtime(f) for f in sources):
        return built   # (a stale build/ binary is ignored: we build our own below)
    if not shutil.which("cmake"):
        pytest.skip("cmake not available to build mongo_c_driver_check")
    bdir = str(tmp_path_factory.mktemp("mongo_c_driver_check"))
    subprocess.run(["cmake", "-S", HERE, "-B", bdir], check=True, capture_output=True,
                   timeout=120)
    subprocess.run(["cmake", "--build", bdir], check=True, capture_output=True, timeout=300)
    return os.path.join(bdir, "mongo_c_driver_check")


def run_check(binary, server, mode):
    r = subprocess.run([binary, server.uri, mode], capture_output=True, text=True, timeout=60)
    detail = "stdout:\n%s\nstderr:\n%s\nserver log:\n%s" % (r.stdout, r.stderr[-4000:],
                                                          server.log_tail())
    assert r.returncode == 0, detail
    assert r.stdout.strip().splitlines()[-1] == "OK", detail
    return r


def test_c_driver_replset(c_driver_check, mongo_server):
    mongo_server.reset_stats()
    r = run_check(c_driver_check, mongo_server, "replset")
    assert "stream resumed after hangup" in r.stderr
    assert "stream resumed after stepdown" in r.stderr
    stats = mongo_server.stats()
    # the stream was opened three times: initially, after the hangup, after the stepdown
    assert stats["aggregate"] == 3, stats
    assert stats["findAndModify"] >= 7, stats
    assert stats["testControl"] == 3, stats   # hangup, stepDown and this stats call
    assert mongo_server.status()["primary"] is True


def test_c_driver_standalone(c_driver_check, mongo_standalone):
    r = run_check(c_driver_check, mongo_standalone, "standalone")
    assert "40573" in r.stderr
