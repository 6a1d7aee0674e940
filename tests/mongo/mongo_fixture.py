"""Start/stop mongo_test_server.py from tests (see README.md).

    import sys; sys.path.insert(0, "<repo>/tests/mongo")
    from mongo_fixture import MongoTestServer
    srv = MongoTestServer(mode="replset", port=0); srv.start()
    ... srv.uri ... srv.hangup() ... srv.restart() ...
    srv.close()

Control methods talk to the server over a raw OP_MSG socket (not through a
driver), so they work during a blackhole or a stepdown.
"""

import atexit
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time

import bson
from bson import CodecOptions
from bson.binary import UuidRepresentation

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_SCRIPT = os.path.join(HERE, "mongo_test_server.py")
PYTHON = "/usr/bin/python3"
_CODEC = CodecOptions(uuid_representation=UuidRepresentation.UNSPECIFIED)
_LIVE = set()


def _cleanup_all():
    for srv in list(_LIVE):
        try:
            srv.close()
        except Exception:
            pass


atexit.register(_cleanup_all)


class MongoCommandError(Exception):
    def __init__(self, reply):
        Exception.__init__(self, "%s (code %s)" % (reply.get("errmsg"), reply.get("code")))
        self.reply = reply
        self.code = reply.get("code")


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return bytes(buf)


def raw_command(host, port, cmd, db="admin", timeout=10.0):
    """Send one command as OP_MSG on a fresh connection; return the reply document."""
    doc = dict(cmd)
    doc["$db"] = db
    payload = struct.pack("<I", 0) + b"\0" + bson.encode(doc, codec_options=_CODEC)
    rid = random.randint(1, 2 ** 31 - 1)
    msg = struct.pack("<iiii", 16 + len(payload), rid, 0, 2013) + payload
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(msg)
        length, _, resp_to, opcode = struct.unpack("<iiii", _recv_exact(s, 16))
        body = _recv_exact(s, length - 16)
    assert opcode == 2013 and resp_to == rid, (opcode, resp_to, rid)
    return bson.decode(body[5:], codec_options=_CODEC)


class MongoTestServer(object):
    """One mongo_test_server.py process.

    mode: "replset" (one-member set "rs0") or "standalone"; port: 0 = pick a free one
    (kept across restart()).  Data lives in a private temp dir and survives
    stop()/start()/restart(); close() stops the server and deletes it.
    """

    def __init__(self, mode="replset", port=0, host="127.0.0.1", changelog_size=None):
        assert mode in ("replset", "standalone"), mode
        self.mode = mode
        self.host = host
        self.port = port
        self.changelog_size = changelog_size
        self.proc = None
        self.tmpdir = tempfile.mkdtemp(prefix="mongo_test_server_")
        self.data_file = os.path.join(self.tmpdir, "data.pickle")
        self.log_file = os.path.join(self.tmpdir, "server.log")

    # -------------------------------------------------------------- lifecycle
    @property
    def uri(self):
        if self.mode == "replset":
            return "mongodb://%s:%d/?replicaSet=rs0" % (self.host, self.port)
        return "mongodb://%s:%d/" % (self.host, self.port)

    @property
    def address(self):
        return "%s:%d" % (self.host, self.port)

    def start(self, timeout=60.0):
        if self.proc is not None:
            raise RuntimeError("already started")
        argv = [PYTHON, "-u", SERVER_SCRIPT, "--port", str(self.port), "--host", self.host,
                "--mode", self.mode, "--data", self.data_file]
        if self.changelog_size:
            argv += ["--changelog-size", str(self.changelog_size)]
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        _LIVE.add(self)
        deadline = time.time() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.time()
            r, _, _ = select.select([self.proc.stdout], [], [], max(0, left))
            if not r:
                self._kill()
                raise RuntimeError("mongo_test_server did not get ready:\n" + self.log_tail())
            ch = os.read(self.proc.stdout.fileno(), 1)
            if not ch:
                self._kill()
                raise RuntimeError("mongo_test_server exited:\n" + self.log_tail())
            line += ch
        word, port = line.decode().split()
        assert word == "ready", line
        self.port = int(port)
        return self

    def stop(self, timeout=10.0):
        """SIGTERM (the server saves its data) and wait."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        self._reap()

    def restart(self):
        """Stop and start again on the same port, keeping data and change log."""
        self.stop()
        self.start()
        return self

    def close(self):
        self.stop()
        _LIVE.discard(self)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reap()

    def _reap(self):
        if self.proc is not None:
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None

    def log_tail(self, n=40):
        try:
            with open(self.log_file, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------- commands
    def command(self, cmd, db="admin", check=True, timeout=10.0):
        """Run a command on a fresh raw connection (bypasses blackhole for testControl)."""
        reply = raw_command(self.host, self.port, cmd, db=db, timeout=timeout)
        if check and not reply.get("ok"):
            raise MongoCommandError(reply)
        return reply

    def control(self, what, **kw):
        cmd = {"testControl": what}
        cmd.update(kw)
        return self.command(cmd)

    def hangup(self, delay_ms=0):
        """Close every open client connection (after answering this request, or
        delay_ms later, e.g. to hit a change stream getMore that is waiting)."""
        if delay_ms:
            return self.control("hangup", delayMS=int(delay_ms))
        return self.control("hangup")

    def blackhole(self, seconds, app_name=None):
        """Accept connections but answer nothing (not even hello) for `seconds`; with app_name,
        only the connections whose handshake named that application (a client's appName)."""
        if app_name is not None:
            return self.control("blackhole", seconds=float(seconds), appName=app_name)
        return self.control("blackhole", seconds=float(seconds))

    def heal(self):
        """End a blackhole early."""
        return self.control("heal")

    def step_down(self, seconds=None):
        """Become secondary; step up again after `seconds` (None: until step_up())."""
        kw = {} if seconds is None else {"seconds": float(seconds)}
        return self.control("stepDown", **kw)

    def step_up(self):
        return self.control("stepUp")

    def trim_change_log(self, keep=0):
        """Forget all but the newest `keep` change events (older tokens then get 286)."""
        return self.control("trimChangeLog", keep=int(keep))["trimmed"]

    def stats(self):
        """Commands received per command name since start/reset_stats()."""
        return self.control("stats")["counts"]

    def reset_stats(self):
        return self.control("resetStats")

    def command_log(self, command=None, collection=None):
        """Data commands received since start/reset_stats(), oldest first, as
        [{"t": wall-clock seconds, "command", "db", "collection"}], optionally only one command
        name and/or target collection."""
        kw = {k: v for k, v in (("command", command), ("collection", collection)) if v}
        return self.control("commandLog", **kw)["entries"]

    def drop_change_events(self, on=True):
        """While on, writes are applied but change streams never see them (as if the events
        were lost), and stay unseen after it is turned off."""
        return self.control("dropChangeEvents", on=on)

    def status(self):
        return self.control("status")

    def configure_fail_point(self, mode, data=None):
        """configureFailPoint failCommand, e.g. mode={"times": 2}, "alwaysOn", "off"."""
        cmd = {"configureFailPoint": "failCommand", "mode": mode}
        if data is not None:
            cmd["data"] = data
        return self.command(cmd)

    def client(self, **kwargs):
        """A pymongo MongoClient for self.uri with short timeouts (override with kwargs)."""
        import pymongo
        opts = {"serverSelectionTimeoutMS": 10000, "connectTimeoutMS": 5000}
        opts.update(kwargs)
        return pymongo.MongoClient(self.uri, **opts)


try:
    import pytest
except ImportError:  # pragma: no cover - the fixtures need pytest, the class does not
    pytest = None

if pytest is not None:
    @pytest.fixture
    def mongo_server():
        """A fresh one-member replica set ("rs0") server, closed after the test."""
        srv = MongoTestServer(mode="replset").start()
        try:
            yield srv
        finally:
            srv.close()

    @pytest.fixture
    def mongo_standalone():
        """A fresh standalone server (change streams answer 40573), closed after the test."""
        srv = MongoTestServer(mode="standalone").start()
        try:
            yield srv
        finally:
            srv.close()
