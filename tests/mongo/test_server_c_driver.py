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
    if os.access(built, os.X_OK):
        return built
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
    assert "resumed after hangup" in r.stderr
    stats = mongo_server.stats()
    # the stream was opened twice: initially and when resuming after the hangup
    assert stats["aggregate"] >= 2, stats
    assert stats["findAndModify"] >= 6, stats
    assert stats.get("testControl", 0) >= 1


def test_c_driver_standalone(c_driver_check, mongo_standalone):
    r = run_check(c_driver_check, mongo_standalone, "standalone")
    assert "40573" in r.stderr
