#!/usr/bin/python3
"""A small MongoDB wire-protocol server for tests (NOT MongoDB).

It pretends to be a one-member replica set ("rs0") or a standalone mongod 6.0
closely enough for pymongo and mongo-c-driver.  Documents, queries and updates
are handled by mongomock; the wire protocol, command dispatch, cursors, the
change log behind change streams, fail points and test-only controls live here.
See README.md next to this file for what is and is not emulated.

Run with Debian's interpreter:  /usr/bin/python3 mongo_test_server.py --port 0
It prints "ready <port>" (flushed) once it accepts connections; SIGTERM stops it
(and saves the data to --data FILE if given).
"""

import argparse
import collections
import copy
import datetime
import os
import pickle
import random
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback

import bson
from bson import CodecOptions, Int64, ObjectId, Timestamp
from bson.binary import Binary, UuidRepresentation

import mongomock
import mongomock.aggregate
import mongomock.helpers
from mongomock import filtering

OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013
MSG_CHECKSUM_PRESENT = 1
MSG_MORE_TO_COME = 1 << 1
MSG_EXHAUST_ALLOWED = 1 << 16   # (MockupDB 1.8 wrongly uses 16)

CODEC = CodecOptions(document_class=dict, tz_aware=False,
                     uuid_representation=UuidRepresentation.UNSPECIFIED)

MAX_BSON = 16 * 1024 * 1024
MAX_MESSAGE = 48000000
COMMAND_LOG_SIZE = 100000  # data commands kept for {testControl: "commandLog"}
MAX_BATCH = 100000
VERSION = "6.0.0"

CODE_NAMES = {
    1: "InternalError", 2: "BadValue", 8: "UnknownError", 9: "FailedToParse",
    11: "UserNotFound", 14: "TypeMismatch", 18: "AuthenticationFailed",
    20: "IllegalOperation", 26: "NamespaceNotFound", 40: "ConflictingUpdateOperators",
    43: "CursorNotFound", 48: "NamespaceExists", 50: "MaxTimeMSExpired",
    59: "CommandNotFound", 66: "ImmutableField", 72: "InvalidOptions",
    73: "InvalidNamespace", 85: "IndexOptionsConflict", 86: "IndexKeySpecsConflict",
    89: "NetworkTimeout", 91: "ShutdownInProgress", 115: "CommandNotSupported",
    189: "PrimarySteppedDown", 251: "NoSuchTransaction", 260: "InvalidResumeToken",
    262: "ExceededTimeLimit", 286: "ChangeStreamHistoryLost", 9001: "SocketException",
    10107: "NotWritablePrimary", 11000: "DuplicateKey", 11600: "InterruptedAtShutdown",
    11602: "InterruptedDueToReplStateChange", 13435: "NotPrimaryNoSecondaryOk",
    13436: "NotPrimaryOrSecondary", 40573: "Location40573",
    40324: "Location40324",
}
RETRYABLE_WRITE_CODES = {6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436}
RESUMABLE_CS_CODES = RETRYABLE_WRITE_CODES | {43, 63, 133, 150, 234, 13388}
# not counted in {testControl: "stats"}.dataCommands (driver monitoring / test plumbing)
NON_DATA_COMMANDS = {"hello", "isMaster", "ismaster", "ping", "endSessions", "buildInfo",
                     "buildinfo", "testControl", "configureFailPoint", "saslStart",
                     "saslContinue", "killCursors", "getParameter", "serverStatus"}
RETRYABLE_WRITES = {"insert", "update", "delete", "findAndModify"}
WRITE_COMMANDS = {"insert", "update", "delete", "findAndModify", "createIndexes",
                  "dropIndexes", "drop", "dropDatabase", "create"}


def log(msg):
    sys.stderr.write("[mongo_test_server %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


class CommandError(Exception):
    def __init__(self, code, msg, labels=None, extra=None):
        Exception.__init__(self, msg)
        self.code = code
        self.msg = msg
        self.labels = list(labels or [])
        self.extra = extra or {}


class Drop(Exception):
    """Close the connection without replying."""


def bson_same(a, b):
    return bson.encode({"v": a}, codec_options=CODEC) == bson.encode({"v": b}, codec_options=CODEC)


def diff_docs(pre, post, prefix=""):
    updated, removed = {}, []
    for k, v in post.items():
        path = prefix + k
        if k not in pre:
            updated[path] = v
            continue
        old = pre[k]
        if isinstance(old, dict) and isinstance(v, dict):
            if not bson_same(old, v):
                if [x for x in old if x in v] == [x for x in v if x in old] and v:
                    u, r = diff_docs(old, v, path + ".")
                    updated.update(u)
                    removed.extend(r)
                else:
                    updated[path] = v
        elif not bson_same(old, v):
            updated[path] = v
    for k in pre:
        if k not in post:
            removed.append(prefix + k)
    return updated, removed


def sort_list(spec):
    if not spec:
        return None
    out = []
    for k, v in spec.items():
        if isinstance(v, dict):
            raise CommandError(2, "sort by %r is not emulated" % (v,))
        out.append((k, -1 if v < 0 else 1))
    return out


def get_path(doc, path):
    cur = doc
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


class Cursor(object):
    def __init__(self, cid, ns, docs):
        self.id = cid
        self.ns = ns
        self.docs = collections.deque(docs)
        self.lock = threading.Lock()


class ChangeStreamCursor(object):
    def __init__(self, cid, ns, db, coll, cluster, stages, full_document, before_change, pos):
        self.id = cid
        self.ns = ns
        self.db = db
        self.coll = coll
        self.cluster = cluster
        self.stages = stages
        self.full_document = full_document
        self.before_change = before_change
        self.pos = pos
        self.closed = False
        self.killed = False  # by killCursors: a getMore waiting on it fails with CursorKilled
        self.lock = threading.Lock()
        self.cond = None  # a getMore waits on it (on the server's lock); made by the first one

    def matches_ns(self, ev):
        if self.cluster:
            return True
        if ev["db"] != self.db:
            return False
        if self.coll is None:
            return ev["coll"] is None or not ev["coll"].startswith("system.")
        return ev["coll"] == self.coll or ev["coll"] is None

    def invalidated_by(self, ev):
        if self.cluster:
            return False
        if self.coll is None:
            return ev["op"] == "dropDatabase"
        return ev["op"] in ("drop", "dropDatabase") and ev["db"] == self.db


class TestServer(object):
    def __init__(self, host, port, mode, data_file=None, changelog_size=10000):
        self.host = host
        self.port = port
        self.mode = mode
        self.data_file = data_file
        self.changelog_size = changelog_size
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.cs_waiting = set()  # change stream cursors whose getMore waits (under self.lock)
        self.client = mongomock.MongoClient()
        self.last_ts = Timestamp(0, 0)
        self.events = []          # ordered by seq
        self.seq = 0
        self.trimmed_seq = 0
        self.trimmed_ts = Timestamp(0, 0)
        self.term = int(time.time())
        self.primary = True
        self.stepup_timer = None
        self.blackhole_until = 0.0
        self.blackhole_apps = {}  # appName -> until: only that client's connections go silent
        self.failpoint = None
        self.fp_lock = threading.Lock()
        self.stats = collections.Counter()
        self.stats_lock = threading.Lock()
        self.command_log = collections.deque(maxlen=COMMAND_LOG_SIZE)  # under stats_lock
        self.drop_change_events = False
        self.cursors = {}
        self.retry_cache = collections.OrderedDict()
        self.cursors_lock = threading.Lock()
        self.conns = {}
        self.conns_lock = threading.Lock()
        self.conn_counter = 0
        self.started = time.time()
        if data_file and os.path.exists(data_file):
            self.load(data_file)

    # ------------------------------------------------------------ persistence
    def load(self, path):
        with open(path, "rb") as f:
            state = pickle.load(f)
        for (dbname, cname), info in state["collections"].items():
            c = self.client[dbname][cname]
            self.client[dbname].create_collection(cname)
            for name, idx in info["indexes"].items():
                if name == "_id_":
                    continue
                kw = {k: v for k, v in idx.items() if k not in ("key", "v")}
                c.create_index(idx["key"], name=name, **kw)
            if info["docs"]:
                c.insert_many(info["docs"])
        self.last_ts = state["last_ts"]
        self.events = state["events"]
        self.seq = state["seq"]
        self.trimmed_seq = state["trimmed_seq"]
        self.trimmed_ts = state["trimmed_ts"]
        self.term = max(state["term"] + 1, self.term)
        self.retry_cache = state.get("retry_cache", collections.OrderedDict())
        log("loaded %d collections, %d change events from %s"
            % (len(state["collections"]), len(self.events), path))

    def save(self):
        if not self.data_file:
            return
        with self.lock:
            cols = {}
            for dbname in self.client.list_database_names():
                db = self.client[dbname]
                for cname in db.list_collection_names():
                    c = db[cname]
                    cols[(dbname, cname)] = {"docs": list(c.find()),
                                             "indexes": c.index_information()}
            state = {"collections": cols, "last_ts": self.last_ts, "events": self.events,
                     "seq": self.seq, "trimmed_seq": self.trimmed_seq,
                     "trimmed_ts": self.trimmed_ts, "term": self.term,
                     "retry_cache": self.retry_cache}
            tmp = self.data_file + ".tmp"
            with open(tmp, "wb") as f:
                pickle.dump(state, f)
            os.replace(tmp, self.data_file)
        log("saved data to %s" % self.data_file)

    # ------------------------------------------------------------ clocks
    def next_ts(self):
        now = int(time.time())
        if now > self.last_ts.time:
            self.last_ts = Timestamp(now, 1)
        else:
            self.last_ts = Timestamp(self.last_ts.time, self.last_ts.inc + 1)
        return self.last_ts

    def current_ts(self):
        with self.lock:
            if self.last_ts.time == 0:
                return self.next_ts()
            return self.last_ts

    def cluster_time_doc(self):
        return {"clusterTime": self.current_ts(),
                "signature": {"hash": Binary(b"\0" * 20, 0), "keyId": Int64(0)}}

    def election_id(self):
        return ObjectId("7fffffff" + ("%016x" % self.term))

    def blackholed(self, conn=None):
        now = time.time()
        if now < self.blackhole_until:
            return True
        app = conn.get("appName") if conn is not None else None
        return app is not None and now < self.blackhole_apps.get(app, 0.0)

    # ------------------------------------------------------------ connections
    def register(self, sock):
        with self.conns_lock:
            self.conn_counter += 1
            self.conns[self.conn_counter] = sock
            return self.conn_counter

    def unregister(self, cid):
        with self.conns_lock:
            self.conns.pop(cid, None)

    def hangup_all(self, exclude=None, only=None):
        with self.conns_lock:
            socks = [s for cid, s in self.conns.items()
                     if cid != exclude and (only is None or cid == only)]
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        log("hung up %d connections" % len(socks))

    # ------------------------------------------------------------ change log
    def log_event(self, op, db, coll, doc_id=None, full=None, pre=None, upd=None):
        ts = self.next_ts()
        self.seq += 1
        self.events.append({"seq": self.seq, "ts": ts, "wall": datetime.datetime.utcnow(),
                            "op": op, "db": db, "coll": coll, "id": doc_id,
                            "full": copy.deepcopy(full), "pre": copy.deepcopy(pre),
                            "upd": upd, "dropped": self.drop_change_events})
        if len(self.events) > self.changelog_size:
            self.trim(self.changelog_size)
        self.notify_streams(self.events[-1] if self.events else None)

    def notify_streams(self, ev):
        """Wakes the waiting change stream getMores a new event concerns (lock held). A waiting
        cursor that has scanned every earlier event and would skip this one (another namespace,
        or a dropped event) is moved past it here, exactly as collect_events would move it,
        instead of being woken: with 300 agents' streams on agent_control, waking all of them for
        each of the 300 status updates that follow a command (90,000 wake-ups, one thread at a
        time under the interpreter lock) delayed the command's own event to the last agents by
        seconds."""
        for cur in self.cs_waiting:
            if (ev is not None and cur.pos == ev["seq"] - 1 and
                    (ev.get("dropped") or not cur.matches_ns(ev))):
                cur.pos = ev["seq"]
            else:
                cur.cond.notify()
        self.cond.notify_all()

    def wake_all(self):
        """Wakes every waiting getMore (lock held): trims, step-downs, killed cursors."""
        for cur in self.cs_waiting:
            cur.cond.notify()
        self.cond.notify_all()

    def trim(self, keep):
        with self.lock:
            keep = max(0, int(keep))
            cut = len(self.events) - keep
            if cut > 0:
                self.trimmed_seq = self.events[cut - 1]["seq"]
                self.trimmed_ts = self.events[cut - 1]["ts"]
                del self.events[:cut]
            elif not self.events and self.seq > self.trimmed_seq:
                self.trimmed_seq = self.seq
                self.trimmed_ts = self.last_ts
            self.wake_all()
            return max(cut, 0)

    def ts_of_seq(self, seq):
        if self.events and seq >= self.events[0]["seq"]:
            return self.events[seq - self.events[0]["seq"]]["ts"]
        if seq == self.trimmed_seq:
            return self.trimmed_ts
        return Timestamp(0, 0)

    @staticmethod
    def make_token(ts, seq, kind=0):
        return {"_data": "82%016X%016X%02X" % ((ts.time << 32) | ts.inc, seq, kind)}

    @staticmethod
    def parse_token(tok):
        try:
            data = tok["_data"]
            if len(data) != 36 or not data.startswith("82"):
                raise ValueError
            t = int(data[2:18], 16)
            return (int(data[18:34], 16), int(data[34:36], 16),
                    Timestamp(t >> 32, t & 0xFFFFFFFF))
        except Exception:
            raise CommandError(260, "invalid resume token: %r" % (tok,))

    # ------------------------------------------------------------ dispatch
    def handle_command(self, cmd, db, conn):
        """Returns (reply, after) ; raises Drop to close without a reply."""
        name = next(iter(cmd)) if cmd else ""
        with self.stats_lock:
            self.stats[name] += 1
            if name not in NON_DATA_COMMANDS:
                target = cmd.get(name)
                self.command_log.append({"t": time.time(), "command": name, "db": db,
                                         "collection": target if isinstance(target, str) else None})
        try:
            self.check_failpoint(name, cmd, conn)
            fn = COMMANDS.get(name) or COMMANDS_CI.get(name.lower())
            if fn is None:
                raise CommandError(59, "no such command: '%s'" % name)
            if name in WRITE_COMMANDS and self.mode == "replset" and not self.primary:
                raise CommandError(10107, "not primary",
                                   ["RetryableWriteError"] if "txnNumber" in cmd else [])
            after = None
            if name in RETRYABLE_WRITES and "txnNumber" in cmd and "lsid" in cmd:
                reply = self.retryable_write(fn, name, cmd, db, conn)
            else:
                reply = fn(self, cmd, db, conn)
            if isinstance(reply, tuple):
                reply, after = reply
            reply.setdefault("ok", 1.0)
            wce = conn.pop("pending_wce", None)
            if wce:
                reply["writeConcernError"] = wce
        except Drop:
            raise
        except CommandError as e:
            reply = {"ok": 0.0, "errmsg": e.msg, "code": e.code,
                     "codeName": CODE_NAMES.get(e.code, "Location%d" % e.code)}
            if e.labels:
                reply["errorLabels"] = e.labels
            reply.update(e.extra)
            after = None
        except Exception as e:  # never let a handler kill the connection
            code = getattr(e, "code", None)
            if not isinstance(code, int) or code == 0:
                code = 2 if isinstance(e, (mongomock.OperationFailure, ValueError, TypeError,
                                           KeyError, NotImplementedError)) else 1
            log("error in %s: %s" % (name, traceback.format_exc()))
            reply = {"ok": 0.0, "errmsg": "%s: %s" % (type(e).__name__, e), "code": code,
                     "codeName": CODE_NAMES.get(code, "Location%d" % code)}
            after = None
        if self.mode == "replset":
            reply["$clusterTime"] = self.cluster_time_doc()
            reply["operationTime"] = self.current_ts()
        return reply, after

    def retryable_write(self, fn, name, cmd, db, conn):
        """Execute a write with lsid+txnNumber once: a retry gets the first reply."""
        key = (bytes(cmd["lsid"].get("id", b"")), int(cmd["txnNumber"]))
        with self.lock:
            prev = self.retry_cache.get(key)
            if prev is not None:
                log("retried write %s txnNumber %d: returning the recorded result" % (name, key[1]))
                return copy.deepcopy(prev)
            reply = fn(self, cmd, db, conn)
            self.retry_cache[key] = copy.deepcopy(reply)
            while len(self.retry_cache) > 10000:
                self.retry_cache.popitem(last=False)
            return reply

    def check_failpoint(self, name, cmd, conn):
        with self.fp_lock:
            fp = self.failpoint
            if not fp or name not in fp["data"].get("failCommands", []):
                return
            app = fp["data"].get("appName")
            if app and conn.get("appName") != app:
                return
            mode = fp["mode"]
            if isinstance(mode, dict) and "skip" in mode:
                if fp["skipped"] < mode["skip"]:
                    fp["skipped"] += 1
                    return
            elif isinstance(mode, dict) and "times" in mode:
                fp["remaining"] -= 1
                if fp["remaining"] <= 0:
                    self.failpoint = None
            data = fp["data"]
        log("failCommand fires for %s" % name)
        if data.get("blockConnection"):
            time.sleep(data.get("blockTimeMS", 0) / 1000.0)
        if data.get("closeConnection"):
            raise Drop()
        if "writeConcernError" in data:
            conn["pending_wce"] = data["writeConcernError"]
        if "errorCode" in data:
            code = int(data["errorCode"])
            if "errorLabels" in data:
                labels = data["errorLabels"]
            else:
                labels = []
                if code in RETRYABLE_WRITE_CODES and "txnNumber" in cmd:
                    labels.append("RetryableWriteError")
                if (name == "getMore" and code in RESUMABLE_CS_CODES and
                        isinstance(self.cursors.get(cmd.get("getMore")), ChangeStreamCursor)):
                    labels.append("ResumableChangeStreamError")
            raise CommandError(code, "Failing command via 'failCommand' failpoint", labels)

    # ------------------------------------------------------------ helpers
    def coll(self, db, name):
        if not isinstance(name, str) or not name:
            raise CommandError(73, "Invalid namespace specified '%s.%r'" % (db, name))
        return self.client[db][name]

    def coll_exists(self, db, name):
        return name in self.client[db].list_collection_names()

    def new_cursor_id(self):
        while True:
            cid = random.randint(1, 2 ** 62)
            if cid not in self.cursors:
                return cid

    def cursor_reply(self, ns, docs, batch_size, single=False, first=True):
        docs = list(docs)
        if batch_size is None or batch_size <= 0:
            batch_size = 101 if first else len(docs)
        batch, rest = docs[:batch_size], docs[batch_size:]
        cid = 0
        if rest and not single:
            cid = self.new_cursor_id()
            with self.cursors_lock:
                self.cursors[cid] = Cursor(cid, ns, rest)
        return {"cursor": {"firstBatch": batch, "id": Int64(cid), "ns": ns}}

    def read_check(self, cmd, conn):
        if self.mode == "replset" and not self.primary:
            rp = cmd.get("$readPreference", {}).get("mode", "primary")
            if rp == "primary" and not conn.get("secondaryOk"):
                raise CommandError(13435, "not primary and secondaryOk=false")

    def project(self, c, doc, fields):
        if doc is None:
            return None
        if not fields:
            return copy.deepcopy(doc)
        return c._copy_only_fields(copy.deepcopy(doc), dict(fields), dict)

    def find_by_id(self, c, _id):
        key = mongomock.helpers.hashdict(_id) if isinstance(_id, dict) else _id
        try:
            return copy.deepcopy(c._store[key])
        except KeyError:
            return None
        except TypeError:
            for d in c.find({"_id": _id}):
                return d
            return None

    def match_docs(self, c, q, sort=None, limit=0):
        """Documents matching q (fast path for {_id: <value>})."""
        if (isinstance(q, dict) and list(q) == ["_id"] and not (
                isinstance(q["_id"], dict) and any(k.startswith("$") for k in q["_id"]))
                and not isinstance(q["_id"], (list, type(None)))):
            d = self.find_by_id(c, q["_id"])
            return [d] if d is not None else []
        cur = c.find(q, sort=sort_list(sort))
        if limit:
            cur = cur.limit(limit)
        return list(cur)

    def fix_int64(self, c, pre, post, u):
        """mongomock turns Int64 arithmetic into Python ints; MongoDB keeps int64 when
        either operand of $inc/$mul is int64."""
        fixes = {}
        for op in ("$inc", "$mul"):
            for path, operand in (u.get(op) or {}).items() if isinstance(u, dict) else ():
                new = get_path(post, path)
                if not isinstance(new, int) or isinstance(new, (Int64, bool)):
                    continue
                if isinstance(operand, Int64) or isinstance(get_path(pre, path), Int64):
                    fixes[path] = Int64(new)
        if fixes:
            c.update_one({"_id": post["_id"]}, {"$set": fixes})
            post = self.find_by_id(c, post["_id"])
        return post

    def apply_update(self, c, db, name, pre, q, u, array_filters=None):
        """Update the existing doc `pre`; returns (post, changed)."""
        _id = pre["_id"]
        if isinstance(u, list):
            u = run_update_pipeline(pre, u)
        replace = not any(k.startswith("$") for k in u)
        if replace:
            if "_id" in u and not bson_same(u["_id"], _id):
                raise CommandError(66, "After applying the update, the (immutable) field "
                                       "'_id' was found to have been altered to _id: %r"
                                   % (u["_id"],))
            new = {"_id": _id}
            new.update((k, v) for k, v in u.items() if k != "_id")
            c.replace_one({"_id": _id}, new)
        else:
            if "_id" in q:
                f = {"$and": [q, {"_id": _id}]}
            else:
                f = dict(q)
                f["_id"] = _id
            kw = {"array_filters": array_filters} if array_filters else {}
            c.update_one(f, u, **kw)
        post = self.find_by_id(c, _id)
        if not replace:
            post = self.fix_int64(c, pre, post, u)
        if bson.encode(pre, codec_options=CODEC) == bson.encode(post, codec_options=CODEC):
            return post, False
        if replace:
            self.log_event("replace", db, name, _id, full=post, pre=pre)
        else:
            updated, removed = diff_docs(pre, post)
            self.log_event("update", db, name, _id, pre=pre,
                           upd={"updatedFields": updated, "removedFields": removed,
                                "truncatedArrays": []})
        return post, True

    def apply_upsert(self, c, db, name, q, u):
        if isinstance(u, list):
            seed = {k: v for k, v in q.items() if not k.startswith("$")}
            u = run_update_pipeline(seed, u)
        replace = not any(k.startswith("$") for k in u)
        if replace:
            res = c.replace_one(q, u, upsert=True)
        else:
            res = c.update_one(q, u, upsert=True)
        _id = res.upserted_id
        post = self.find_by_id(c, _id)
        if not replace:
            post = self.fix_int64(c, {}, post, u)
        self.log_event("insert", db, name, _id, full=post)
        return post

    def write_error(self, index, e, ns=""):
        if isinstance(e, mongomock.DuplicateKeyError):
            return {"index": index, "code": 11000,
                    "errmsg": "E11000 duplicate key error collection: %s (%s)" % (ns, e)}
        if isinstance(e, CommandError):
            return {"index": index, "code": e.code, "errmsg": e.msg}
        code = getattr(e, "code", None) or 2
        return {"index": index, "code": code, "errmsg": "%s: %s" % (type(e).__name__, e)}

    # ------------------------------------------------------------ change streams
    def open_change_stream(self, cmd, db, conn):
        if self.mode != "replset":
            raise CommandError(40573, "The $changeStream stage is only supported on replica sets")
        self.read_check(cmd, conn)
        pipeline = cmd["pipeline"]
        opts = pipeline[0]["$changeStream"] or {}
        stages = pipeline[1:]
        for st in stages:
            op = next(iter(st))
            if op not in ("$match", "$project", "$addFields", "$set", "$unset",
                          "$replaceRoot", "$replaceWith", "$redact"):
                raise CommandError(40324, "%s is not permitted in a $changeStream pipeline" % op)
        target = cmd["aggregate"]
        cluster = False
        if target == 1 or target == 1.0:
            coll = None
            if opts.get("allChangesForCluster"):
                if db != "admin":
                    raise CommandError(2, "allChangesForCluster requires the admin database")
                cluster = True
                ns = "admin.$cmd.aggregate"
            else:
                if db == "admin":
                    raise CommandError(73, "$changeStream may not be opened on the admin "
                                           "database without allChangesForCluster")
                ns = "%s.$cmd.aggregate" % db
        else:
            coll = target
            ns = "%s.%s" % (db, coll)
        fd = opts.get("fullDocument", "default")
        fdbc = opts.get("fullDocumentBeforeChange", "off")
        with self.lock:
            tok = opts.get("resumeAfter") or opts.get("startAfter")
            if tok is not None:
                seq, kind, tok_ts = self.parse_token(tok)
                if kind == 1 and "resumeAfter" in opts:
                    raise CommandError(260, "Attempted to resume a stream on a collection "
                                            "which has been dropped; use startAfter")
                if (seq < self.trimmed_seq or seq > self.seq or
                        self.ts_of_seq(seq) != tok_ts):
                    # trimmed, or a token of another server's history
                    raise CommandError(286, "Resume of change stream was not possible, as the "
                                            "resume point may no longer be in the oplog.")
                pos = seq
            elif opts.get("startAtOperationTime") is not None:
                ts = opts["startAtOperationTime"]
                if self.trimmed_seq and self.trimmed_ts >= ts:
                    raise CommandError(286, "Resume of change stream was not possible, as the "
                                            "resume point may no longer be in the oplog.")
                pos = self.trimmed_seq
                for ev in self.events:
                    if ev["ts"] >= ts:
                        break
                    pos = ev["seq"]
            else:
                pos = self.seq
            cid = self.new_cursor_id()
            cur = ChangeStreamCursor(cid, ns, db, coll, cluster, stages, fd, fdbc, pos)
            with self.cursors_lock:
                self.cursors[cid] = cur
            bs = cmd.get("cursor", {}).get("batchSize")
            batch = self.collect_events(cur, bs if bs is not None else 101)
            return self.cs_reply(cur, batch, "firstBatch")

    def cs_reply(self, cur, batch, key):
        if cur.closed:
            with self.cursors_lock:
                self.cursors.pop(cur.id, None)
        pbrt = self.make_token(self.ts_of_seq(cur.pos), cur.pos)
        if batch and batch[-1]["operationType"] == "invalidate":
            pbrt = batch[-1]["_id"]
        return {"cursor": {key: batch, "id": Int64(0 if cur.closed else cur.id), "ns": cur.ns,
                           "postBatchResumeToken": pbrt}}

    def render_event(self, ev, cur):
        doc = {"_id": self.make_token(ev["ts"], ev["seq"]), "operationType": ev["op"],
               "clusterTime": ev["ts"], "wallTime": ev["wall"]}
        op = ev["op"]
        if op in ("insert", "replace"):
            doc["fullDocument"] = copy.deepcopy(ev["full"])
        elif op == "update" and cur.full_document in ("updateLookup", "whenAvailable", "required"):
            c = self.client[ev["db"]][ev["coll"]]
            doc["fullDocument"] = self.find_by_id(c, ev["id"])
        if op == "dropDatabase":
            doc["ns"] = {"db": ev["db"]}
        else:
            doc["ns"] = {"db": ev["db"], "coll": ev["coll"]}
        if op in ("insert", "update", "replace", "delete"):
            doc["documentKey"] = {"_id": ev["id"]}
        if op == "update":
            doc["updateDescription"] = copy.deepcopy(ev["upd"])
        if (cur.before_change in ("whenAvailable", "required") and
                op in ("update", "replace", "delete")):
            doc["fullDocumentBeforeChange"] = copy.deepcopy(ev["pre"])
        return doc

    def apply_stages(self, doc, stages, db):
        for st in stages:
            op, arg = next(iter(st.items()))
            if op == "$match":
                if not filtering.filter_applies(arg, doc):
                    return None
            else:
                out = list(mongomock.aggregate.process_pipeline(
                    [doc], self.client[db], [st], None))
                if not out:
                    return None
                doc = out[0]
        return doc

    def collect_events(self, cur, limit):
        """Called with self.lock held."""
        out = []
        if cur.closed or limit == 0:
            return out
        if cur.pos < self.trimmed_seq:
            with self.cursors_lock:
                self.cursors.pop(cur.id, None)
            cur.closed = True
            raise CommandError(286, "Resume of change stream was not possible, as the resume "
                                    "point may no longer be in the oplog.")
        if not self.events:
            return out
        first = self.events[0]["seq"]
        i = max(0, cur.pos + 1 - first)
        while i < len(self.events):
            ev = self.events[i]
            i += 1
            cur.pos = ev["seq"]
            if ev.get("dropped") or not cur.matches_ns(ev):
                continue
            if cur.coll is not None and ev["op"] == "dropDatabase":
                doc = None
            else:
                doc = self.apply_stages(self.render_event(ev, cur), cur.stages, cur.db)
            if doc is not None:
                out.append(doc)
            if cur.invalidated_by(ev) and (cur.coll is None or ev["coll"] in (cur.coll, None)):
                out.append({"_id": self.make_token(ev["ts"], ev["seq"], 1),
                            "operationType": "invalidate", "clusterTime": ev["ts"],
                            "wallTime": ev["wall"]})
                cur.closed = True
                break
            if limit is not None and len(out) >= limit:
                break
        return out

    def change_stream_get_more(self, cur, cmd, conn):
        max_ms = cmd.get("maxTimeMS")
        wait = 1.0 if max_ms is None else max(0, max_ms) / 1000.0
        deadline = time.time() + wait
        limit = cmd.get("batchSize") or None
        with self.cond:
            interrupted = False
            while True:
                if not self.primary:
                    code = 11602 if interrupted else 10107
                    raise CommandError(code, "not primary (change stream getMore)",
                                       ["ResumableChangeStreamError"])
                if cur.killed:
                    # mongod >= 4.0 interrupts a getMore whose cursor is killed meanwhile
                    raise CommandError(237, "cursor id %d was killed" % cur.id)
                batch = self.collect_events(cur, limit)
                if batch or cur.closed:
                    break
                remaining = deadline - time.time()
                if remaining <= 0:
                    break
                if cur.cond is None:
                    cur.cond = threading.Condition(self.lock)
                self.cs_waiting.add(cur)
                try:
                    cur.cond.wait(remaining)
                finally:
                    self.cs_waiting.discard(cur)
                interrupted = True
            return self.cs_reply(cur, batch, "nextBatch")

    # ------------------------------------------------------------ controls
    def step_down(self, seconds=None):
        with self.cond:
            self.primary = False
            if self.stepup_timer:
                self.stepup_timer.cancel()
                self.stepup_timer = None
            if seconds:
                t = threading.Timer(float(seconds), self.step_up)
                t.daemon = True
                self.stepup_timer = t
                t.start()
            self.wake_all()
        log("stepped down for %s s" % seconds)

    def step_up(self):
        with self.cond:
            if not self.primary:
                self.primary = True
                self.term += 1
            if self.stepup_timer:
                self.stepup_timer.cancel()
                self.stepup_timer = None
            self.wake_all()
        log("stepped up (term %d)" % self.term)


# ================================================================ update pipelines
# Pipeline-style updates ($set/$addFields, $unset stages) with the aggregation expressions a
# conditional write needs: field paths, $$NOW, $literal, $cond, $ifNull, $and, $or, $not,
# $eq/$ne/$lt/$lte/$gt/$gte (BSON type order), $add/$subtract (numbers and dates).
MISSING = object()
_TYPE_RANK = [(type(None), 1), (bool, 8), ((int, float), 3), (str, 4), (dict, 5), (list, 6),
              (ObjectId, 7), (datetime.datetime, 9)]


def now_date():
    """The server's clock as a BSON date (millisecond precision, naive UTC)."""
    now = datetime.datetime.utcnow()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def literal_now(value, now):
    """A copy of an aggregation pipeline where "$$NOW" is the literal date `now`."""
    if value == "$$NOW":
        return {"$literal": now}
    if isinstance(value, dict):
        return {k: literal_now(v, now) for k, v in value.items()}
    if isinstance(value, list):
        return [literal_now(v, now) for v in value]
    return value


def _rank(v):
    if v is MISSING:
        return (0, 0)
    for t, r in _TYPE_RANK:
        if isinstance(v, t):
            return (r, v)
    return (10, 0)


def _cmp(a, b):
    ra, rb = _rank(a), _rank(b)
    if ra[0] != rb[0]:
        return -1 if ra[0] < rb[0] else 1
    if ra[0] in (0, 1):
        return 0
    return (ra[1] > rb[1]) - (ra[1] < rb[1])


def _truthy(v):
    return not (v is MISSING or v is None or v is False or (isinstance(v, (int, float))
                                                            and not isinstance(v, bool) and v == 0))


def eval_expr(doc, e, now):
    if isinstance(e, str):
        if e == "$$NOW":
            return now
        if e == "$$ROOT":
            return doc
        if e.startswith("$$"):
            raise CommandError(17276, "Use of undefined variable: %s" % e[2:])
        if e.startswith("$"):
            v = doc
            for part in e[1:].split("."):
                if not isinstance(v, dict) or part not in v:
                    return MISSING
                v = v[part]
            return v
        return e
    if isinstance(e, list):
        return [eval_expr(doc, x, now) for x in e]
    if not isinstance(e, dict) or not e or not next(iter(e)).startswith("$"):
        if isinstance(e, dict):
            return {k: eval_expr(doc, v, now) for k, v in e.items()}
        return e
    op, arg = next(iter(e.items()))
    if op == "$literal":
        return arg
    if op == "$cond":
        if isinstance(arg, dict):
            arg = [arg["if"], arg["then"], arg["else"]]
        return eval_expr(doc, arg[1] if _truthy(eval_expr(doc, arg[0], now)) else arg[2], now)
    args = [eval_expr(doc, a, now) for a in (arg if isinstance(arg, list) else [arg])]
    if op == "$ifNull":
        for a in args[:-1]:
            if a is not MISSING and a is not None:
                return a
        return args[-1]
    if op == "$and":
        return all(_truthy(a) for a in args)
    if op == "$or":
        return any(_truthy(a) for a in args)
    if op == "$not":
        return not _truthy(args[0])
    cmps = {"$eq": lambda c: c == 0, "$ne": lambda c: c != 0, "$lt": lambda c: c < 0,
            "$lte": lambda c: c <= 0, "$gt": lambda c: c > 0, "$gte": lambda c: c >= 0}
    if op in cmps:
        return cmps[op](_cmp(args[0], args[1]))
    if op in ("$add", "$subtract"):
        if any(a is MISSING or a is None for a in args):
            return None
        if op == "$subtract":
            a, b = args
            if isinstance(a, datetime.datetime) and isinstance(b, datetime.datetime):
                return Int64(int((a - b) / datetime.timedelta(milliseconds=1)))
            if isinstance(a, datetime.datetime):
                return a - datetime.timedelta(milliseconds=b)
            return a - b
        dates = [a for a in args if isinstance(a, datetime.datetime)]
        total = sum(a for a in args if not isinstance(a, datetime.datetime))
        if dates:
            return dates[0] + datetime.timedelta(milliseconds=total)
        return Int64(total) if any(isinstance(a, Int64) for a in args) else total
    raise CommandError(168, "Unrecognized expression '%s' (not emulated)" % op)


def run_update_pipeline(pre, pipeline):
    """Applies an update pipeline to `pre` with one $$NOW; returns the replacement doc."""
    now = now_date()
    doc = copy.deepcopy(pre)
    for stage in pipeline:
        name, spec = next(iter(stage.items()))
        if name in ("$set", "$addFields"):
            new = dict(doc)
            for k, v in spec.items():
                val = eval_expr(doc, v, now)
                if val is MISSING:
                    new.pop(k, None)
                else:
                    new[k] = val
            doc = new
        elif name == "$unset":
            for k in ([spec] if isinstance(spec, str) else spec):
                doc.pop(k, None)
        else:
            raise CommandError(2, "update pipeline stage %s is not emulated" % name)
    doc.pop("_id", None)
    return doc


# ================================================================ commands
def cmd_hello(srv, cmd, db, conn):
    if "client" in cmd:
        app = cmd["client"].get("application", {}).get("name")
        if app:
            conn["appName"] = app
    now = datetime.datetime.utcnow()
    me = "%s:%d" % (srv.host, srv.port)
    r = {}
    if cmd.get("helloOk"):
        r["helloOk"] = True
    writable = srv.mode == "standalone" or srv.primary
    r["isWritablePrimary"] = writable
    r["ismaster"] = writable
    if srv.mode == "replset":
        ts = srv.current_ts()
        r.update({"hosts": [me], "setName": "rs0", "setVersion": 1, "secondary": not srv.primary,
                  "me": me})
        if srv.primary:
            r["primary"] = me
            r["electionId"] = srv.election_id()
        r["lastWrite"] = {"opTime": {"ts": ts, "t": Int64(srv.term)}, "lastWriteDate": now,
                          "majorityOpTime": {"ts": ts, "t": Int64(srv.term)},
                          "majorityWriteDate": now}
    r.update({"maxBsonObjectSize": MAX_BSON, "maxMessageSizeBytes": MAX_MESSAGE,
              "maxWriteBatchSize": MAX_BATCH, "localTime": now,
              "logicalSessionTimeoutMinutes": 30, "connectionId": conn["id"],
              "minWireVersion": 0, "maxWireVersion": 17, "readOnly": False})
    return r


def cmd_ping(srv, cmd, db, conn):
    return {}


def cmd_build_info(srv, cmd, db, conn):
    return {"version": VERSION, "gitVersion": "0000000000000000000000000000000000000000",
            "versionArray": [6, 0, 0, 0], "modules": [], "allocator": "system",
            "javascriptEngine": "none", "sysInfo": "deprecated", "bits": 64, "debug": False,
            "maxBsonObjectSize": MAX_BSON, "storageEngines": ["mongomock"],
            "openssl": {"running": "disabled", "compiled": "disabled"}}


def cmd_server_status(srv, cmd, db, conn):
    with srv.conns_lock:
        current = len(srv.conns)
        total = srv.conn_counter
    with srv.stats_lock:
        counts = dict(srv.stats)
    up = time.time() - srv.started
    r = {"host": "%s:%d" % (srv.host, srv.port), "version": VERSION, "process": "mongod",
         "pid": Int64(os.getpid()), "uptime": float(int(up)), "uptimeMillis": Int64(int(up * 1000)),
         "localTime": datetime.datetime.utcnow(),
         "connections": {"current": current, "available": 1000, "totalCreated": total},
         "opcounters": {"insert": counts.get("insert", 0), "query": counts.get("find", 0),
                        "update": counts.get("update", 0), "delete": counts.get("delete", 0),
                        "getmore": counts.get("getMore", 0), "command": sum(counts.values())},
         "storageEngine": {"name": "mongomock"}}
    if srv.mode == "replset":
        r["repl"] = {"setName": "rs0", "isWritablePrimary": srv.primary,
                     "hosts": ["%s:%d" % (srv.host, srv.port)]}
    return r


def cmd_noop(srv, cmd, db, conn):
    return {}


def cmd_whatsmyuri(srv, cmd, db, conn):
    return {"you": conn.get("peer", "")}


def cmd_sasl(srv, cmd, db, conn):
    raise CommandError(18, "Authentication failed (authentication is not emulated by "
                           "mongo_test_server; connect without credentials)")


def cmd_transaction(srv, cmd, db, conn):
    raise CommandError(251, "Transactions are not emulated by mongo_test_server")


def cmd_get_parameter(srv, cmd, db, conn):
    return {"featureCompatibilityVersion": {"version": "6.0"}}


def cmd_insert(srv, cmd, db, conn):
    name = cmd["insert"]
    docs = cmd.get("documents", [])
    ordered = cmd.get("ordered", True)
    n, errors = 0, []
    with srv.lock:
        c = srv.coll(db, name)
        for i, d in enumerate(docs):
            if "_id" not in d:
                nd = {"_id": ObjectId()}
                nd.update(d)
                d = nd
            try:
                c.insert_one(d)
                n += 1
                srv.log_event("insert", db, name, d["_id"], full=d)
            except Exception as e:
                errors.append(srv.write_error(i, e, "%s.%s" % (db, name)))
                if ordered:
                    break
    r = {"n": n}
    if errors:
        r["writeErrors"] = errors
    return r


def cmd_update(srv, cmd, db, conn):
    name = cmd["update"]
    ordered = cmd.get("ordered", True)
    n = modified = 0
    upserted, errors = [], []
    with srv.lock:
        c = srv.coll(db, name)
        for i, st in enumerate(cmd.get("updates", [])):
            try:
                q = st.get("q", {})
                u = st["u"]
                multi = st.get("multi", False)
                matches = srv.match_docs(c, q, st.get("sort"), 0 if multi else 1)
                if matches:
                    if multi and isinstance(u, dict) and not any(k.startswith("$") for k in u):
                        raise CommandError(9, "multi update is not supported for replacement-style "
                                              "update")
                    for pre in matches:
                        n += 1
                        _, changed = srv.apply_update(c, db, name, pre, q, u,
                                                      st.get("arrayFilters"))
                        modified += int(changed)
                elif st.get("upsert"):
                    post = srv.apply_upsert(c, db, name, q, u)
                    n += 1
                    upserted.append({"index": i, "_id": post["_id"]})
            except Exception as e:
                errors.append(srv.write_error(i, e, "%s.%s" % (db, name)))
                if ordered:
                    break
    r = {"n": n, "nModified": modified}
    if upserted:
        r["upserted"] = upserted
    if errors:
        r["writeErrors"] = errors
    return r


def cmd_delete(srv, cmd, db, conn):
    name = cmd["delete"]
    ordered = cmd.get("ordered", True)
    n, errors = 0, []
    with srv.lock:
        c = srv.coll(db, name)
        for i, st in enumerate(cmd.get("deletes", [])):
            try:
                for pre in srv.match_docs(c, st.get("q", {}), None, 1 if st.get("limit") else 0):
                    c.delete_one({"_id": pre["_id"]})
                    n += 1
                    srv.log_event("delete", db, name, pre["_id"], pre=pre)
            except Exception as e:
                errors.append(srv.write_error(i, e, "%s.%s" % (db, name)))
                if ordered:
                    break
    r = {"n": n}
    if errors:
        r["writeErrors"] = errors
    return r


def cmd_find_and_modify(srv, cmd, db, conn):
    name = cmd.get("findAndModify", cmd.get("findandmodify"))
    q = cmd.get("query") or {}
    fields = cmd.get("fields")
    with srv.lock:
        c = srv.coll(db, name)
        found = srv.match_docs(c, q, cmd.get("sort"), 1)
        pre = found[0] if found else None
        if cmd.get("remove"):
            if pre is None:
                return {"lastErrorObject": {"n": 0}, "value": None}
            c.delete_one({"_id": pre["_id"]})
            srv.log_event("delete", db, name, pre["_id"], pre=pre)
            return {"lastErrorObject": {"n": 1}, "value": srv.project(c, pre, fields)}
        u = cmd.get("update")
        if u is None:
            raise CommandError(9, "Either an update or remove=true must be specified")
        if pre is not None:
            post, _ = srv.apply_update(c, db, name, pre, q, u, cmd.get("arrayFilters"))
            value = post if cmd.get("new") else pre
            return {"lastErrorObject": {"n": 1, "updatedExisting": True},
                    "value": srv.project(c, value, fields)}
        if cmd.get("upsert"):
            post = srv.apply_upsert(c, db, name, q, u)
            return {"lastErrorObject": {"n": 1, "updatedExisting": False,
                                        "upserted": post["_id"]},
                    "value": srv.project(c, post, fields) if cmd.get("new") else None}
        return {"lastErrorObject": {"n": 0, "updatedExisting": False}, "value": None}


def cmd_find(srv, cmd, db, conn):
    srv.read_check(cmd, conn)
    name = cmd["find"]
    limit = int(cmd.get("limit", 0) or 0)
    proj = cmd.get("projection") or None
    with srv.lock:
        c = srv.coll(db, name)
        cur = c.find(cmd.get("filter") or {}, proj, skip=int(cmd.get("skip", 0) or 0),
                     limit=abs(limit), sort=sort_list(cmd.get("sort")))
        docs = list(cur)
    single = cmd.get("singleBatch", False) or limit < 0
    bs = cmd.get("batchSize")
    if limit and (bs is None or bs > abs(limit)):
        bs = abs(limit)
    return srv.cursor_reply("%s.%s" % (db, name), docs, bs, single)


def cmd_get_more(srv, cmd, db, conn):
    cid = int(cmd["getMore"])
    with srv.cursors_lock:
        cur = srv.cursors.get(cid)
    if cur is None:
        raise CommandError(43, "cursor id %d not found" % cid)
    if not cur.lock.acquire(False):
        raise CommandError(2, "cursor id %d is already in use" % cid)
    try:
        if isinstance(cur, ChangeStreamCursor):
            try:
                return srv.change_stream_get_more(cur, cmd, conn)
            except CommandError as e:
                if e.code in RESUMABLE_CS_CODES and "ResumableChangeStreamError" not in e.labels:
                    e.labels.append("ResumableChangeStreamError")
                raise
        srv.read_check(cmd, conn)
        bs = cmd.get("batchSize") or len(cur.docs)
        batch = [cur.docs.popleft() for _ in range(min(bs, len(cur.docs)))]
        if not cur.docs:
            with srv.cursors_lock:
                srv.cursors.pop(cid, None)
        return {"cursor": {"nextBatch": batch, "id": Int64(cid if cur.docs else 0),
                           "ns": cur.ns}}
    finally:
        cur.lock.release()


def cmd_kill_cursors(srv, cmd, db, conn):
    killed, missing = [], []
    for cid in cmd.get("cursors", []):
        with srv.cursors_lock:
            cur = srv.cursors.pop(int(cid), None)
        if cur is None:
            missing.append(cid)
        else:
            if isinstance(cur, ChangeStreamCursor):
                with srv.cond:
                    cur.closed = True
                    cur.killed = True
                    srv.wake_all()
            killed.append(cid)
    return {"cursorsKilled": killed, "cursorsNotFound": missing, "cursorsAlive": [],
            "cursorsUnknown": []}


def cmd_aggregate(srv, cmd, db, conn):
    pipeline = cmd.get("pipeline")
    if not isinstance(pipeline, list):
        raise CommandError(14, "'pipeline' option must be specified as an array")
    if pipeline and "$changeStream" in pipeline[0]:
        return srv.open_change_stream(cmd, db, conn)
    for st in pipeline[1:]:
        if "$changeStream" in st:
            raise CommandError(40602, "$changeStream is only valid as the first stage")
    srv.read_check(cmd, conn)
    target = cmd["aggregate"]
    if not isinstance(target, str):
        raise CommandError(115, "collection-less aggregate is not emulated (only $changeStream)")
    pipeline = literal_now(pipeline, now_date())
    with srv.lock:
        c = srv.coll(db, target)
        docs = list(c.aggregate(pipeline))
    bs = cmd.get("cursor", {}).get("batchSize")
    return srv.cursor_reply("%s.%s" % (db, target), docs, bs)


def cmd_count(srv, cmd, db, conn):
    srv.read_check(cmd, conn)
    with srv.lock:
        c = srv.coll(db, cmd["count"])
        kw = {}
        if cmd.get("skip"):
            kw["skip"] = int(cmd["skip"])
        if cmd.get("limit"):
            kw["limit"] = abs(int(cmd["limit"]))
        n = c.count_documents(cmd.get("query") or {}, **kw)
    return {"n": n}


def cmd_distinct(srv, cmd, db, conn):
    srv.read_check(cmd, conn)
    with srv.lock:
        c = srv.coll(db, cmd["distinct"])
        vals = c.distinct(cmd["key"], cmd.get("query") or {})
    return {"values": list(vals)}


def cmd_create_indexes(srv, cmd, db, conn):
    name = cmd["createIndexes"]
    with srv.lock:
        existed = srv.coll_exists(db, name)
        c = srv.coll(db, name)
        if not existed:
            srv.client[db].create_collection(name)
        before = len(c.index_information())
        for idx in cmd.get("indexes", []):
            kw = {}
            for opt in ("unique", "sparse", "expireAfterSeconds", "partialFilterExpression"):
                if opt in idx:
                    kw[opt] = idx[opt]
            try:
                c.create_index(list(idx["key"].items()), name=idx.get("name"), **kw)
            except mongomock.DuplicateKeyError as e:
                raise CommandError(11000, "E11000 duplicate key error collection: %s.%s "
                                          "(building index %s): %s"
                                   % (db, name, idx.get("name"), e))
            except mongomock.OperationFailure as e:
                raise CommandError(85, str(e))
        after = len(c.index_information())
    return {"createdCollectionAutomatically": not existed, "numIndexesBefore": before,
            "numIndexesAfter": after}


def cmd_drop_indexes(srv, cmd, db, conn):
    name = cmd["dropIndexes"]
    with srv.lock:
        if not srv.coll_exists(db, name):
            raise CommandError(26, "ns not found %s.%s" % (db, name))
        c = srv.coll(db, name)
        before = len(c.index_information())
        which = cmd.get("index")
        if which == "*":
            c.drop_indexes()
        elif isinstance(which, dict):
            for n_, info in c.index_information().items():
                if list(info["key"]) == list(which.items()):
                    c.drop_index(n_)
                    break
            else:
                raise CommandError(27, "can't find index with key: %r" % (which,))
        else:
            for n_ in (which if isinstance(which, list) else [which]):
                try:
                    c.drop_index(n_)
                except mongomock.OperationFailure as e:
                    raise CommandError(27, str(e))
    return {"nIndexesWas": before}


def cmd_list_indexes(srv, cmd, db, conn):
    name = cmd["listIndexes"]
    with srv.lock:
        if not srv.coll_exists(db, name):
            raise CommandError(26, "ns does not exist: %s.%s" % (db, name))
        c = srv.coll(db, name)
        out = []
        for n_, info in c.index_information().items():
            d = {"v": 2, "key": dict(info["key"]), "name": n_}
            for k, v in info.items():
                if k not in ("key", "v"):
                    d[k] = v
            out.append(d)
    return srv.cursor_reply("%s.%s" % (db, name), out, cmd.get("cursor", {}).get("batchSize"))


def cmd_list_collections(srv, cmd, db, conn):
    flt = cmd.get("filter") or {}
    with srv.lock:
        names = srv.client[db].list_collection_names()
    out = []
    for n_ in names:
        d = {"name": n_, "type": "collection"}
        if not cmd.get("nameOnly"):
            d.update({"options": {}, "info": {"readOnly": False},
                      "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"}})
        if filtering.filter_applies(flt, d):
            out.append(d)
    return srv.cursor_reply("%s.$cmd.listCollections" % db, out,
                            cmd.get("cursor", {}).get("batchSize"))


def cmd_list_databases(srv, cmd, db, conn):
    with srv.lock:
        names = srv.client.list_database_names()
    dbs = [{"name": n_, "sizeOnDisk": 0, "empty": False} for n_ in names]
    if cmd.get("nameOnly"):
        dbs = [{"name": d["name"]} for d in dbs]
    flt = cmd.get("filter") or {}
    dbs = [d for d in dbs if filtering.filter_applies(flt, d)]
    return {"databases": dbs, "totalSize": 0}


def cmd_create(srv, cmd, db, conn):
    name = cmd["create"]
    with srv.lock:
        if srv.coll_exists(db, name):
            raise CommandError(48, "Collection %s.%s already exists." % (db, name))
        srv.client[db].create_collection(name)
    return {}


def cmd_drop(srv, cmd, db, conn):
    name = cmd["drop"]
    with srv.lock:
        if not srv.coll_exists(db, name):
            raise CommandError(26, "ns not found")
        n_idx = len(srv.coll(db, name).index_information())
        srv.client[db].drop_collection(name)
        srv.log_event("drop", db, name)
    return {"ns": "%s.%s" % (db, name), "nIndexesWas": n_idx}


def cmd_drop_database(srv, cmd, db, conn):
    with srv.lock:
        names = srv.client[db].list_collection_names()
        for n_ in names:
            srv.client[db].drop_collection(n_)
            srv.log_event("drop", db, n_)
        srv.client.drop_database(db)
        if names:
            srv.log_event("dropDatabase", db, None)
    return {"dropped": db}


def cmd_configure_fail_point(srv, cmd, db, conn):
    if db != "admin":
        raise CommandError(13, "configureFailPoint may only be run against the admin database.")
    if cmd["configureFailPoint"] != "failCommand":
        raise CommandError(72, "only the failCommand fail point is emulated")
    mode = cmd.get("mode")
    with srv.fp_lock:
        if mode == "off":
            srv.failpoint = None
        elif mode == "alwaysOn" or (isinstance(mode, dict) and ("times" in mode or "skip" in mode)):
            times = int(mode["times"]) if isinstance(mode, dict) and "times" in mode else 0
            if isinstance(mode, dict) and "times" in mode and times <= 0:
                srv.failpoint = None
            else:
                srv.failpoint = {"mode": mode, "data": cmd.get("data", {}), "remaining": times,
                                 "skipped": 0}
        else:
            raise CommandError(2, "unsupported failpoint mode %r" % (mode,))
    return {"count": 0}


def cmd_repl_set_get_status(srv, cmd, db, conn):
    if srv.mode != "replset":
        raise CommandError(76, "not running with --replSet")
    ts = srv.current_ts()
    return {"set": "rs0", "date": datetime.datetime.utcnow(), "myState": 1 if srv.primary else 2,
            "term": Int64(srv.term),
            "members": [{"_id": 0, "name": "%s:%d" % (srv.host, srv.port), "health": 1.0,
                         "state": 1 if srv.primary else 2,
                         "stateStr": "PRIMARY" if srv.primary else "SECONDARY",
                         "optime": {"ts": ts, "t": Int64(srv.term)}, "self": True}]}


def cmd_test_control(srv, cmd, db, conn):
    what = cmd["testControl"]
    if what == "hangup":
        delay = float(cmd.get("delayMS", 0)) / 1000.0
        if delay > 0:
            def later():
                t = threading.Timer(delay, srv.hangup_all)
                t.daemon = True
                t.start()
            return {"hangupInMS": delay * 1000}, later
        # everybody else first, so that the caller sees all connections closed
        # once it has the reply; then the caller's own connection
        srv.hangup_all(exclude=conn["id"])
        return {"hungUp": True}, lambda: srv.hangup_all(only=conn["id"])
    if what == "blackhole":
        secs = float(cmd.get("seconds", 5))
        until = time.time() + secs
        app = cmd.get("appName")
        if app is not None:
            # only the connections of the client that named itself so in its handshake
            srv.blackhole_apps[str(app)] = until
            log("blackhole of appName %r for %s s" % (app, secs))
        else:
            srv.blackhole_until = until
            log("blackhole for %s s" % secs)
        return {"until": datetime.datetime.utcfromtimestamp(until)}
    if what == "heal":
        srv.blackhole_until = 0.0
        srv.blackhole_apps.clear()
        return {}
    if what == "stepDown":
        if srv.mode != "replset":
            raise CommandError(76, "stepDown needs --mode replset")
        srv.step_down(cmd.get("seconds"))
        return {}
    if what == "stepUp":
        srv.step_up()
        return {}
    if what == "trimChangeLog":
        n = srv.trim(cmd.get("keep", 0))
        return {"trimmed": n}
    if what == "stats":
        with srv.stats_lock:
            counts = {k: v for k, v in srv.stats.items()}
        data = sum(v for k, v in counts.items() if k not in NON_DATA_COMMANDS)
        return {"counts": counts, "total": sum(counts.values()), "dataCommands": data}
    if what == "resetStats":
        with srv.stats_lock:
            srv.stats.clear()
            srv.command_log.clear()
        return {}
    if what == "commandLog":
        with srv.stats_lock:
            entries = [dict(e) for e in srv.command_log]
        for key in ("command", "collection"):
            if cmd.get(key) is not None:
                entries = [e for e in entries if e[key] == cmd[key]]
        return {"entries": entries}
    if what == "dropChangeEvents":
        with srv.lock:
            srv.drop_change_events = bool(cmd.get("on", True))
        return {"on": srv.drop_change_events}
    if what == "status":
        with srv.lock:
            return {"mode": srv.mode, "primary": srv.primary, "blackholed": srv.blackholed(),
                    "changeLog": {"size": len(srv.events), "lastSeq": srv.seq,
                                  "trimmedSeq": srv.trimmed_seq},
                    "cursors": len(srv.cursors), "connections": len(srv.conns)}
    if what == "save":
        srv.save()
        return {}
    raise CommandError(2, "unknown testControl %r (hangup, blackhole, heal, stepDown, stepUp, "
                          "trimChangeLog, stats, resetStats, commandLog, dropChangeEvents, status, save)" % (what,))


COMMANDS = {
    "hello": cmd_hello, "isMaster": cmd_hello, "ismaster": cmd_hello,
    "ping": cmd_ping, "buildInfo": cmd_build_info, "buildinfo": cmd_build_info,
    "serverStatus": cmd_server_status, "endSessions": cmd_noop, "killSessions": cmd_noop,
    "killAllSessions": cmd_noop, "refreshSessions": cmd_noop, "getLastError": cmd_noop,
    "whatsmyuri": cmd_whatsmyuri, "getParameter": cmd_get_parameter,
    "saslStart": cmd_sasl, "saslContinue": cmd_sasl, "authenticate": cmd_sasl,
    "commitTransaction": cmd_transaction, "abortTransaction": cmd_transaction,
    "find": cmd_find, "insert": cmd_insert, "update": cmd_update, "delete": cmd_delete,
    "findAndModify": cmd_find_and_modify, "findandmodify": cmd_find_and_modify,
    "count": cmd_count, "distinct": cmd_distinct, "aggregate": cmd_aggregate,
    "getMore": cmd_get_more, "killCursors": cmd_kill_cursors,
    "createIndexes": cmd_create_indexes, "dropIndexes": cmd_drop_indexes,
    "listIndexes": cmd_list_indexes, "listCollections": cmd_list_collections,
    "listDatabases": cmd_list_databases, "create": cmd_create, "drop": cmd_drop,
    "dropDatabase": cmd_drop_database, "configureFailPoint": cmd_configure_fail_point,
    "replSetGetStatus": cmd_repl_set_get_status, "testControl": cmd_test_control,
}
COMMANDS_CI = {"ismaster": cmd_hello, "findandmodify": cmd_find_and_modify,
               "buildinfo": cmd_build_info}


# ================================================================ wire protocol
def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_cstring(data, pos):
    end = data.index(b"\0", pos)
    return data[pos:end].decode("utf-8"), end + 1


def parse_op_msg(body):
    flags = struct.unpack_from("<I", body, 0)[0]
    end = len(body) - (4 if flags & MSG_CHECKSUM_PRESENT else 0)
    pos = 4
    cmd = None
    seqs = []
    while pos < end:
        kind = body[pos]
        pos += 1
        if kind == 0:
            size = struct.unpack_from("<i", body, pos)[0]
            cmd = bson.decode(body[pos:pos + size], codec_options=CODEC)
            pos += size
        elif kind == 1:
            size = struct.unpack_from("<i", body, pos)[0]
            sec_end = pos + size
            ident, p = read_cstring(body, pos + 4)
            docs = []
            while p < sec_end:
                dsize = struct.unpack_from("<i", body, p)[0]
                docs.append(bson.decode(body[p:p + dsize], codec_options=CODEC))
                p += dsize
            seqs.append((ident, docs))
            pos = sec_end
        else:
            raise ValueError("unknown OP_MSG section kind %d" % kind)
    if cmd is None:
        raise ValueError("OP_MSG without a body section")
    for ident, docs in seqs:
        cmd.setdefault(ident, [])
        cmd[ident].extend(docs)
    return flags, cmd


def build_msg(request_id, response_to, opcode, payload):
    return struct.pack("<iiii", 16 + len(payload), request_id, response_to, opcode) + payload


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        srv = self.server.app
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = srv.register(sock)
        conn = {"id": cid, "peer": "%s:%d" % self.client_address[:2]}
        try:
            while True:
                header = recv_exact(sock, 16)
                if header is None:
                    return
                length, req_id, _, opcode = struct.unpack("<iiii", header)
                if length < 16 or length > MAX_MESSAGE + 1024:
                    log("bad message length %d, closing" % length)
                    return
                body = recv_exact(sock, length - 16)
                if body is None:
                    return
                if opcode == OP_MSG:
                    flags, cmd = parse_op_msg(body)
                    db = cmd.pop("$db", "admin")
                    more_to_come = bool(flags & MSG_MORE_TO_COME)
                    legacy = False
                elif opcode == OP_QUERY:
                    qflags = struct.unpack_from("<i", body, 0)[0]
                    ns, p = read_cstring(body, 4)
                    p += 8
                    size = struct.unpack_from("<i", body, p)[0]
                    cmd = bson.decode(body[p:p + size], codec_options=CODEC)
                    if "$query" in cmd:
                        inner = cmd["$query"]
                        if "$readPreference" in cmd:
                            inner["$readPreference"] = cmd["$readPreference"]
                        cmd = inner
                    conn["secondaryOk"] = bool(qflags & 4)
                    db = ns.split(".", 1)[0]
                    more_to_come = False
                    legacy = True
                    if not ns.endswith(".$cmd"):
                        reply = {"$err": "OP_QUERY is only supported for commands", "code": 5739101,
                                 "ok": 0.0}
                        self.send(req_id, reply, True, flags=2)
                        continue
                else:
                    log("unsupported opcode %d, closing" % opcode)
                    return
                name = next(iter(cmd)) if cmd else ""
                if isinstance(cmd.get("client"), dict) and "appName" not in conn:
                    app = cmd["client"].get("application", {}).get("name")
                    if app:
                        conn["appName"] = app  # known before the blackhole check below
                if srv.blackholed(conn) and name != "testControl":
                    continue
                try:
                    reply, after = srv.handle_command(cmd, db, conn)
                except Drop:
                    return
                if more_to_come:
                    continue
                if srv.blackholed(conn) and name != "testControl":
                    continue
                self.send(req_id, reply, legacy)
                if after:
                    after()
        except (OSError, ConnectionError):
            pass
        except Exception:
            log("connection %d failed: %s" % (cid, traceback.format_exc()))
        finally:
            srv.unregister(cid)

    def send(self, req_id, reply, legacy, flags=0):
        data = bson.encode(reply, codec_options=CODEC)
        rid = random.randint(1, 2 ** 31 - 1)
        if legacy:
            payload = struct.pack("<iqii", flags, 0, 0, 1) + data
            msg = build_msg(rid, req_id, OP_REPLY, payload)
        else:
            msg = build_msg(rid, req_id, OP_MSG, struct.pack("<I", 0) + b"\0" + data)
        self.request.sendall(msg)


class ThreadedServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=27017)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--mode", choices=["replset", "standalone"], default="replset")
    ap.add_argument("--data", default=None, help="pickle file: loaded at start, saved on SIGTERM")
    ap.add_argument("--changelog-size", type=int, default=10000,
                    help="change events retained before the oldest are trimmed")
    args = ap.parse_args(argv)

    tcp = None
    for attempt in range(50):
        try:
            tcp = ThreadedServer((args.host, args.port), Handler)
            break
        except OSError as e:
            if attempt == 49 or args.port == 0:
                raise
            log("bind failed (%s), retrying" % e)
            time.sleep(0.1)
    port = tcp.server_address[1]
    app = TestServer(args.host, port, args.mode, args.data, args.changelog_size)
    tcp.app = app

    stopping = threading.Event()

    def on_term(signum, frame):
        if stopping.is_set():
            return
        stopping.set()
        threading.Thread(target=tcp.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sys.stdout.write("ready %d\n" % port)
    sys.stdout.flush()
    log("listening on %s:%d mode=%s" % (args.host, port, args.mode))
    tcp.serve_forever(poll_interval=0.1)
    tcp.server_close()
    app.hangup_all()
    try:
        app.save()
    finally:
        log("stopped")
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
