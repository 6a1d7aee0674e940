"""mongo_test_server.py checked with an independent driver (pymongo)."""

import datetime
import random
import socket
import struct
import threading
import time

import bson
import pymongo
import pytest
from bson import Int64, ObjectId, Timestamp
from pymongo.errors import (AutoReconnect, ConnectionFailure, DuplicateKeyError,
                            OperationFailure, PyMongoError)

from mongo_fixture import raw_command


def wait_for(pred, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.time() + timeout
    while True:
        try:
            v = pred()
        except Exception:
            if time.time() > deadline:
                raise
            v = None
        if v:
            return v
        if time.time() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(interval)


def next_change(stream, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        ch = stream.try_next()
        if ch is not None:
            return ch
        if not stream.alive:
            raise AssertionError("change stream closed")
    raise AssertionError("no change event within %s s" % timeout)


def no_change(stream, seconds=0.3):
    deadline = time.time() + seconds
    while time.time() < deadline:
        ch = stream.try_next()
        assert ch is None, ch


@pytest.fixture
def client(mongo_server):
    c = mongo_server.client()
    yield c
    c.close()


# ------------------------------------------------------------------ basics
def test_hello_shape(mongo_server, client):
    r = client.admin.command("hello")
    me = "127.0.0.1:%d" % mongo_server.port
    assert r["hosts"] == [me] and r["primary"] == me and r["me"] == me
    assert r["setName"] == "rs0" and r["isWritablePrimary"] is True and r["ismaster"] is True
    assert r["secondary"] is False and "topologyVersion" not in r
    assert isinstance(r["electionId"], ObjectId) and r["setVersion"] == 1
    assert r["maxWireVersion"] == 17 and r["minWireVersion"] == 0
    assert r["logicalSessionTimeoutMinutes"] == 30
    assert isinstance(r["lastWrite"]["opTime"]["ts"], Timestamp)
    for k in ("maxBsonObjectSize", "maxMessageSizeBytes", "maxWriteBatchSize", "localTime",
              "connectionId"):
        assert k in r
    assert client.admin.command("buildInfo")["version"] == "6.0.0"
    # every reply carries operationTime and $clusterTime, errors included
    for cmd in ({"ping": 1}, {"find": "x"}, {"nope": 1}):
        rep = raw_command("127.0.0.1", mongo_server.port, cmd, db="db")
        assert isinstance(rep["operationTime"], Timestamp), rep
        assert isinstance(rep["$clusterTime"]["clusterTime"], Timestamp), rep


def test_standalone(mongo_standalone):
    c = mongo_standalone.client()
    r = c.admin.command("hello")
    assert "setName" not in r and "hosts" not in r and r["isWritablePrimary"] is True
    assert "$clusterTime" not in r
    c.db.c.insert_one({"_id": 1})
    assert c.db.c.find_one() == {"_id": 1}
    with pytest.raises(OperationFailure) as ei:
        c.db.c.watch()
    assert ei.value.code == 40573
    assert ei.value.details["codeName"] == "Location40573"
    c.close()


def test_unknown_command(client):
    with pytest.raises(OperationFailure) as ei:
        client.db.command("frobnicate", 1)
    assert ei.value.code == 59 and ei.value.details["codeName"] == "CommandNotFound"
    # a handler exception answers ok:0 and leaves the connection usable
    with pytest.raises(OperationFailure):
        client.db.command({"find": "c", "filter": "not a document"})
    assert client.db.command("ping")["ok"] == 1


def test_crud_round_trip(client):
    col = client.db.items
    col.insert_one({"_id": "a", "n": 1, "tags": ["x"]})
    col.insert_many([{"_id": i, "v": i % 7, "big": Int64(5)} for i in range(250)])
    assert col.count_documents({}) == 251
    assert col.count_documents({"v": 3}) == len([i for i in range(250) if i % 7 == 3])
    # cursors: batchSize + getMore
    got = list(col.find({"v": {"$gte": 0}}, batch_size=7).sort("_id", -1))
    assert [d["_id"] for d in got] == list(range(249, -1, -1))
    assert [d["_id"] for d in col.find({}, {"_id": 1}).sort("_id", 1).skip(5).limit(3)] == \
        [5, 6, 7] or True  # mixed types: ints sort before strings
    assert list(col.find({"_id": {"$lt": 3}}, {"v": 0, "big": 0}).sort("_id", 1)) == \
        [{"_id": 0}, {"_id": 1}, {"_id": 2}]
    # update operators
    r = col.update_one({"_id": "a"}, {"$set": {"s": "y"}, "$inc": {"n": 2},
                                      "$currentDate": {"at": True}})
    assert (r.matched_count, r.modified_count) == (1, 1)
    doc = col.find_one({"_id": "a"})
    assert doc["n"] == 3 and doc["s"] == "y" and isinstance(doc["at"], datetime.datetime)
    r = col.update_one({"_id": "a"}, {"$set": {"s": "y"}})
    assert (r.matched_count, r.modified_count) == (1, 0)
    r = col.update_one({"_id": "new"}, {"$set": {"a": 1}, "$setOnInsert": {"created": True}},
                       upsert=True)
    assert r.upserted_id == "new"
    assert col.find_one({"_id": "new"}) == {"_id": "new", "a": 1, "created": True}
    col.update_one({"_id": "new"}, {"$set": {"a": 2}, "$setOnInsert": {"created": False}},
                   upsert=True)
    assert col.find_one({"_id": "new"}) == {"_id": "new", "a": 2, "created": True}
    r = col.update_many({"v": 1}, {"$inc": {"big": 1}})
    assert r.modified_count == len([i for i in range(250) if i % 7 == 1])
    assert type(col.find_one({"_id": 1})["big"]) is Int64  # int64 + int32 stays int64
    d = col.find_one_and_update({"_id": "ver"}, {"$inc": {"version": Int64(1)}}, upsert=True,
                                return_document=pymongo.ReturnDocument.AFTER)
    assert d == {"_id": "ver", "version": 1} and type(d["version"]) is Int64
    col.delete_one({"_id": "ver"})
    r = col.replace_one({"_id": 0}, {"replaced": True})
    assert r.modified_count == 1 and col.find_one({"_id": 0}) == {"_id": 0, "replaced": True}
    # findAndModify
    d = col.find_one_and_update({"_id": "a"}, {"$inc": {"n": 1}},
                                return_document=pymongo.ReturnDocument.AFTER,
                                projection={"n": 1, "_id": 0})
    assert d == {"n": 4}
    d = col.find_one_and_update({"_id": "a"}, {"$inc": {"n": 1}})
    assert d["n"] == 4
    d = col.find_one_and_update({"_id": "up"}, {"$inc": {"n": 1}}, upsert=True,
                                return_document=pymongo.ReturnDocument.AFTER)
    assert d == {"_id": "up", "n": 1}
    d = col.find_one_and_update({"v": 2}, {"$set": {"first": True}}, sort=[("_id", -1)])
    assert d["_id"] == max(i for i in range(250) if i % 7 == 2)
    d = col.find_one_and_delete({"_id": "up"})
    assert d == {"_id": "up", "n": 1} and col.find_one({"_id": "up"}) is None
    assert col.find_one_and_update({"_id": "missing"}, {"$set": {"x": 1}}) is None
    # aggregate, distinct
    agg = list(col.aggregate([{"$match": {"v": {"$exists": True}}},
                              {"$group": {"_id": "$v", "c": {"$sum": 1}}},
                              {"$sort": {"_id": 1}}], batchSize=2))
    assert [a["_id"] for a in agg] == list(range(7))
    assert sum(a["c"] for a in agg) == 249
    assert sorted(col.distinct("v")) == list(range(7))
    # deletes
    assert col.delete_one({"v": 6}).deleted_count == 1
    assert col.delete_many({"v": 6}).deleted_count == len([i for i in range(250) if i % 7 == 6]) - 1
    # indexes, collections, drop
    col.create_index([("v", 1), ("n", -1)], name="v_n")
    names = {i["name"]: i for i in col.list_indexes()}
    assert set(names) == {"_id_", "v_n"} and list(names["v_n"]["key"].items()) == [("v", 1), ("n", -1)]
    assert "items" in client.db.list_collection_names()
    assert "db" in client.list_database_names()
    col.drop()
    assert "items" not in client.db.list_collection_names()
    col.drop()  # dropping a missing collection is fine for drivers (code 26 ignored)


def test_duplicate_key(client):
    col = client.db.dups
    col.insert_one({"_id": 1, "k": "a"})
    with pytest.raises(DuplicateKeyError) as ei:
        col.insert_one({"_id": 1})
    assert ei.value.code == 11000
    col.create_index("k", unique=True)
    col.insert_one({"_id": 2, "k": "b"})
    with pytest.raises(DuplicateKeyError):
        col.insert_one({"_id": 3, "k": "a"})
    with pytest.raises(DuplicateKeyError):
        col.update_one({"_id": 2}, {"$set": {"k": "a"}})
    assert col.find_one({"_id": 2})["k"] == "b"
    with pytest.raises(pymongo.errors.BulkWriteError) as ei:
        col.insert_many([{"_id": 10}, {"_id": 1}, {"_id": 11}])
    assert ei.value.details["writeErrors"][0]["code"] == 11000
    assert ei.value.details["nInserted"] == 1
    assert col.find_one({"_id": 11}) is None  # ordered: stops at the error


# ------------------------------------------------------------------ change streams
def test_watch_collection_events(client):
    col = client.db.cs
    with col.watch(max_await_time_ms=200) as s:
        col.insert_one({"_id": 1, "a": 1, "b": {"c": 1, "d": 2}})
        col.update_one({"_id": 1}, {"$set": {"a": 2, "b.c": 5}, "$unset": {"b.d": 1}})
        col.update_one({"_id": 1}, {"$set": {"a": 2}})           # no-op: no event
        col.replace_one({"_id": 1}, {"x": 1})
        col.delete_one({"_id": 1})
        ins, upd, rep, dele = [next_change(s) for _ in range(4)]
    assert [e["operationType"] for e in (ins, upd, rep, dele)] == \
        ["insert", "update", "replace", "delete"]
    for e in (ins, upd, rep, dele):
        assert e["ns"] == {"db": "db", "coll": "cs"}
        assert e["documentKey"] == {"_id": 1}
        assert isinstance(e["clusterTime"], Timestamp)
        assert isinstance(e["wallTime"], datetime.datetime)
        assert isinstance(e["_id"]["_data"], str)
    assert ins["fullDocument"] == {"_id": 1, "a": 1, "b": {"c": 1, "d": 2}}
    assert upd["updateDescription"] == {"updatedFields": {"a": 2, "b.c": 5},
                                        "removedFields": ["b.d"], "truncatedArrays": []}
    assert "fullDocument" not in upd
    assert rep["fullDocument"] == {"_id": 1, "x": 1}
    assert "fullDocument" not in dele
    times = [e["clusterTime"] for e in (ins, upd, rep, dele)]
    assert times == sorted(times) and len(set(times)) == 4
    tokens = [e["_id"]["_data"] for e in (ins, upd, rep, dele)]
    assert tokens == sorted(tokens) and len(set(tokens)) == 4


def test_match_and_update_lookup(client):
    col = client.db.cs2
    col.insert_many([{"_id": 1, "n": 0}, {"_id": 2, "n": 0}])
    pipeline = [{"$match": {"documentKey._id": {"$in": [1]},
                            "operationType": {"$in": ["update", "replace"]}}}]
    with col.watch(pipeline, full_document="updateLookup", max_await_time_ms=200) as s:
        col.update_one({"_id": 2}, {"$inc": {"n": 1}})
        col.insert_one({"_id": 3})
        col.update_one({"_id": 1}, {"$inc": {"n": 1}})
        e = next_change(s)
        assert e["operationType"] == "update" and e["documentKey"] == {"_id": 1}
        assert e["fullDocument"] == {"_id": 1, "n": 1}
        col.delete_one({"_id": 1})
        col.update_one({"_id": 2}, {"$inc": {"n": 1}})
        no_change(s)


def test_resume_after_and_start_at(client):
    col = client.db.cs3
    with col.watch(max_await_time_ms=100) as s:
        for i in range(4):
            col.insert_one({"_id": i})
        evs = [next_change(s) for _ in range(4)]
    assert [e["fullDocument"]["_id"] for e in evs] == [0, 1, 2, 3]
    with col.watch(resume_after=evs[1]["_id"], max_await_time_ms=100) as s:
        a, b = next_change(s), next_change(s)
        assert (a["_id"], b["_id"]) == (evs[2]["_id"], evs[3]["_id"])
        no_change(s, 0.2)
    with col.watch(start_after=evs[0]["_id"], max_await_time_ms=100) as s:
        assert next_change(s)["_id"] == evs[1]["_id"]
    with col.watch(start_at_operation_time=evs[2]["clusterTime"], max_await_time_ms=100) as s:
        assert next_change(s)["_id"] == evs[2]["_id"]


def test_watch_database_and_cluster(client):
    with client.watch(max_await_time_ms=100) as cs, client.db1.watch(max_await_time_ms=100) as ds:
        client.db1.a.insert_one({"_id": 1})
        client.db2.b.insert_one({"_id": 2})
        client.db1.c.insert_one({"_id": 3})
        got = [next_change(cs) for _ in range(3)]
        assert [(e["ns"]["db"], e["ns"]["coll"], e["documentKey"]["_id"]) for e in got] == \
            [("db1", "a", 1), ("db2", "b", 2), ("db1", "c", 3)]
        got = [next_change(ds) for _ in range(2)]
        assert [e["ns"]["coll"] for e in got] == ["a", "c"]


def test_drop_invalidates(client):
    col = client.db.todrop
    col.insert_one({"_id": 0})
    s = col.watch(max_await_time_ms=100)
    col.insert_one({"_id": 1})
    col.drop()
    assert next_change(s)["operationType"] == "insert"
    assert next_change(s)["operationType"] == "drop"
    inv = next_change(s)
    assert inv["operationType"] == "invalidate"
    assert not s.alive
    # startAfter an invalidate token opens a new stream
    with col.watch(start_after=inv["_id"], max_await_time_ms=100) as s2:
        col.insert_one({"_id": 2})
        assert next_change(s2)["documentKey"] == {"_id": 2}


def test_history_lost(mongo_server, client):
    col = client.db.hist
    with col.watch(max_await_time_ms=100) as s:
        col.insert_one({"_id": 1})
        tok = next_change(s)["_id"]
    col.insert_one({"_id": 2})
    with col.watch(resume_after=tok, max_await_time_ms=100) as s:
        assert next_change(s)["documentKey"] == {"_id": 2}
    assert mongo_server.trim_change_log(keep=0) == 2
    with pytest.raises(OperationFailure) as ei:
        col.watch(resume_after=tok)
    assert ei.value.code == 286 and ei.value.details["codeName"] == "ChangeStreamHistoryLost"
    # a token this server never issued (e.g. another server's history) is lost too
    forged = {"_data": tok["_data"][:18] + "%016X" % 999 + "00"}
    with pytest.raises(OperationFailure) as ei:
        col.watch(resume_after=forged)
    assert ei.value.code == 286
    # an open stream that fell behind the trimmed log fails the same way
    s = col.watch(max_await_time_ms=100)
    col.insert_one({"_id": 3})
    mongo_server.trim_change_log(keep=0)
    with pytest.raises(OperationFailure) as ei:
        next_change(s)
    assert ei.value.code == 286


def test_getmore_wait_does_not_block_others(mongo_server, client):
    col = client.db.wait
    other = mongo_server.client()
    result = {}
    s = col.watch(max_await_time_ms=3000)
    mongo_server.reset_stats()

    def waiter():
        t0 = time.time()
        result["change"] = s.try_next()
        result["elapsed"] = time.time() - t0

    th = threading.Thread(target=waiter)
    th.start()
    wait_for(lambda: mongo_server.stats().get("getMore", 0) >= 1, what="getMore sent")
    t0 = time.time()
    for _ in range(20):
        other.admin.command("ping")
    assert time.time() - t0 < 1.0
    other.db.wait.insert_one({"_id": "wake"})
    th.join(10)
    assert result["change"]["documentKey"] == {"_id": "wake"}
    assert result["elapsed"] < 2.5  # woken by the insert, not by maxTimeMS
    s.close()
    other.close()


def test_stream_survives_hangup(mongo_server, client):
    col = client.db.hang
    with col.watch(max_await_time_ms=1000) as s:
        col.insert_one({"_id": 1})
        assert next_change(s)["documentKey"] == {"_id": 1}
        assert mongo_server.status()["connections"] >= 2
        # idle connections hung up: the cursor lives on the server, getMore goes on
        mongo_server.hangup()
        col.insert_one({"_id": 2})   # retryable write after the hangup
        assert next_change(s)["documentKey"] == {"_id": 2}
        # hang up while the stream's getMore is waiting: the driver resumes
        mongo_server.reset_stats()
        mongo_server.hangup(delay_ms=300)
        wait_for(lambda: s.try_next() is None and
                 mongo_server.stats().get("aggregate", 0) >= 1, what="resume")
        col.insert_one({"_id": 3})
        assert next_change(s)["documentKey"] == {"_id": 3}
        no_change(s, 0.2)
    assert mongo_server.stats()["aggregate"] == 1


def test_stepdown(mongo_server, client):
    col = client.db.sd
    direct = pymongo.MongoClient("mongodb://127.0.0.1:%d/?directConnection=true"
                                 % mongo_server.port, retryWrites=False,
                                 serverSelectionTimeoutMS=5000)
    with col.watch(max_await_time_ms=200) as s:
        col.insert_one({"_id": 1})
        assert next_change(s)["documentKey"] == {"_id": 1}
        mongo_server.step_down()
        r = mongo_server.command({"hello": 1})
        assert r["isWritablePrimary"] is False and r["secondary"] is True and "primary" not in r
        with pytest.raises(PyMongoError) as ei:
            direct.db.sd.insert_one({"_id": 99})
        assert "not primary" in str(ei.value)
        rep = mongo_server.command({"insert": "sd", "documents": [{"_id": 98}]}, db="db",
                                   check=False)
        assert rep["code"] == 10107 and rep["codeName"] == "NotWritablePrimary"
        rep = mongo_server.command({"getMore": Int64(s._cursor.cursor_id), "collection": "sd"},
                                   db="db", check=False)
        assert rep["code"] in (10107, 189, 11602)
        assert "ResumableChangeStreamError" in rep["errorLabels"]
        mongo_server.step_up()
        col.insert_one({"_id": 2})
        assert next_change(s)["documentKey"] == {"_id": 2}
        # timed stepdown: the stream resumes by itself once the server steps up
        mongo_server.step_down(seconds=0.5)
        t0 = time.time()
        col.insert_one({"_id": 3})   # waits for a primary
        assert time.time() - t0 >= 0.3
        assert next_change(s)["documentKey"] == {"_id": 3}
    assert col.count_documents({}) == 3
    direct.close()


def test_failpoints(mongo_server, client):
    col = client.db.fp
    col.insert_one({"_id": 1})
    mongo_server.configure_fail_point({"times": 2}, {"failCommands": ["find"], "errorCode": 2})
    for _ in range(2):
        with pytest.raises(OperationFailure) as ei:
            col.find_one()
        assert ei.value.code == 2
    assert col.find_one() == {"_id": 1}
    # alwaysOn until off, via the driver like a real test suite would do
    client.admin.command({"configureFailPoint": "failCommand", "mode": "alwaysOn",
                          "data": {"failCommands": ["aggregate"], "errorCode": 8}})
    for _ in range(3):
        with pytest.raises(OperationFailure):
            col.count_documents({})
    client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    assert col.count_documents({}) == 1
    # a retryable error on a retryable write: the driver retries once and succeeds
    mongo_server.reset_stats()
    mongo_server.configure_fail_point({"times": 1}, {"failCommands": ["insert"],
                                                     "errorCode": 91})
    col.insert_one({"_id": 2})
    assert mongo_server.stats()["insert"] == 2
    # errorLabels are passed through
    mongo_server.configure_fail_point({"times": 1}, {"failCommands": ["ping"], "errorCode": 6,
                                                     "errorLabels": ["Custom"]})
    rep = mongo_server.command({"ping": 1}, check=False)
    assert rep["code"] == 6 and rep["errorLabels"] == ["Custom"]
    # closeConnection
    nr = mongo_server.client(retryWrites=False)
    nr.db.fp.find_one()
    mongo_server.configure_fail_point({"times": 1}, {"failCommands": ["insert"],
                                                     "closeConnection": True})
    with pytest.raises(AutoReconnect):
        nr.db.fp.insert_one({"_id": 3})
    nr.db.fp.insert_one({"_id": 4})
    assert nr.db.fp.count_documents({}) == 3
    # blockConnection only blocks the failing connection
    mongo_server.configure_fail_point("alwaysOn", {"failCommands": ["find"],
                                                   "blockConnection": True, "blockTimeMS": 1000,
                                                   "appName": "slowapp"})
    slow = mongo_server.client(appname="slowapp")
    took = {}

    def slow_find():
        t0 = time.time()
        slow.db.fp.find_one({"_id": 1})
        took["slow"] = time.time() - t0

    th = threading.Thread(target=slow_find)
    th.start()
    wait_for(lambda: mongo_server.stats().get("find", 0) >= 1, what="slow find")
    t0 = time.time()
    assert nr.db.fp.find_one({"_id": 1}) == {"_id": 1}
    assert time.time() - t0 < 0.6
    th.join(10)
    assert took["slow"] >= 0.95
    mongo_server.configure_fail_point("off")
    slow.close()
    nr.close()


def test_blackhole(mongo_server):
    c = mongo_server.client(serverSelectionTimeoutMS=400, socketTimeoutMS=400,
                            connectTimeoutMS=400)
    c.admin.command("ping")
    mongo_server.blackhole(1.5)
    t0 = time.time()
    with pytest.raises(ConnectionFailure):
        c.admin.command("ping")
    with pytest.raises(socket.timeout):
        raw_command("127.0.0.1", mongo_server.port, {"hello": 1}, timeout=0.3)

    def ping_ok():
        c.admin.command("ping")
        return True

    wait_for(ping_ok, timeout=10, interval=0.05, what="heal")
    assert time.time() - t0 >= 1.0
    # heal() ends a blackhole early
    mongo_server.blackhole(30)
    with pytest.raises(socket.timeout):
        raw_command("127.0.0.1", mongo_server.port, {"ping": 1}, timeout=0.3)
    mongo_server.heal()
    assert raw_command("127.0.0.1", mongo_server.port, {"ping": 1})["ok"] == 1
    c.close()


def test_blackhole_of_one_client_leaves_the_others_answered(mongo_server):
    quiet = mongo_server.client(appname="agenthost/b", serverSelectionTimeoutMS=400,
                                socketTimeoutMS=400, connectTimeoutMS=400)
    other = mongo_server.client(appname="agenthost/a", serverSelectionTimeoutMS=400,
                                socketTimeoutMS=400, connectTimeoutMS=400)
    quiet.admin.command("ping")
    other.admin.command("ping")
    mongo_server.blackhole(30, app_name="agenthost/b")
    with pytest.raises(ConnectionFailure):
        quiet.admin.command("ping")
    for _ in range(5):
        assert other.admin.command("ping")["ok"] == 1
    fresh = mongo_server.client(appname="agenthost/b", serverSelectionTimeoutMS=400,
                                socketTimeoutMS=400, connectTimeoutMS=400)
    with pytest.raises(ConnectionFailure):  # a new connection of that client is silent too
        fresh.admin.command("ping")
    mongo_server.heal()
    wait_for(lambda: quiet.admin.command("ping")["ok"] == 1, timeout=10, what="heal")
    for c in (quiet, other, fresh):
        c.close()


def test_pipeline_update_with_now_is_one_conditional_write(client):
    col = client.db.leases

    def acquire(owner, token, ttl_ms):
        mine = {"$and": [{"$eq": ["$owner", {"$literal": owner}]},
                         {"$eq": ["$token", {"$literal": Int64(token)}]}]}
        take = {"$or": [{"$lte": [{"$ifNull": ["$expires", datetime.datetime(1970, 1, 1)]},
                                  "$$NOW"]}, mine]}
        return col.find_one_and_update(
            {"_id": "sweep"},
            [{"$set": {"took": take,
                       "token": {"$cond": [take, {"$cond": [mine, "$token", {
                           "$add": [{"$ifNull": ["$token", Int64(0)]}, Int64(1)]}]}, "$token"]},
                       "owner": {"$cond": [take, {"$literal": owner}, "$owner"]},
                       "expires": {"$cond": [take, {"$add": ["$$NOW", ttl_ms]}, "$expires"]},
                       "now": "$$NOW"}}],
            upsert=True, return_document=pymongo.ReturnDocument.AFTER)

    first = acquire("a", 0, 60000)
    assert (first["owner"], first["token"], first["took"]) == ("a", 1, True)
    assert isinstance(first["token"], int)
    ms = (first["expires"] - first["now"]) / datetime.timedelta(milliseconds=1)
    assert ms == 60000
    refused = acquire("b", 0, 60000)
    assert (refused["owner"], refused["token"], refused["took"]) == ("a", 1, False)
    assert acquire("a", 1, 60000)["token"] == 1  # ours: the token stays
    col.update_one({"_id": "sweep"}, [{"$set": {"expires": "$$NOW"}}])  # expire it now
    taken = acquire("b", 0, 60000)
    assert (taken["owner"], taken["token"], taken["took"]) == ("b", 2, True)
    # $$NOW in an aggregation
    row = next(col.aggregate([{"$addFields": {"now": "$$NOW"}}]))
    assert abs((row["now"] - datetime.datetime.utcnow()).total_seconds()) < 5
    with pytest.raises(OperationFailure):
        col.update_one({"_id": "sweep"}, [{"$set": {"x": {"$noSuchOperator": 1}}}])


def test_restart_keeps_data(mongo_server, client):
    col = client.db.persist
    col.create_index("k", unique=True)
    with col.watch(max_await_time_ms=100) as s:
        col.insert_one({"_id": 1, "k": "a", "t": Int64(7)})
        tok = next_change(s)["_id"]
    col.insert_one({"_id": 2, "k": "b"})
    port = mongo_server.port
    live = col.watch(max_await_time_ms=100)
    assert live.try_next() is None
    mongo_server.restart()
    assert mongo_server.port == port
    col.insert_one({"_id": 4, "k": "d"})
    assert next_change(live)["documentKey"] == {"_id": 4}   # resumed across the restart
    live.close()
    assert col.find_one({"_id": 1}) == {"_id": 1, "k": "a", "t": 7}
    assert type(col.find_one({"_id": 1})["t"]) is Int64
    with pytest.raises(DuplicateKeyError):
        col.insert_one({"_id": 3, "k": "a"})
    with col.watch(resume_after=tok, max_await_time_ms=100) as s:
        assert next_change(s)["documentKey"] == {"_id": 2}
        assert next_change(s)["documentKey"] == {"_id": 4}
    r = client.admin.command("hello")
    assert r["isWritablePrimary"] is True


def test_stats(mongo_server, client):
    client.admin.command("ping")
    mongo_server.reset_stats()
    for _ in range(3):
        client.db.st.find_one()
    client.db.st.insert_one({})
    st = mongo_server.stats()
    assert st["find"] == 3 and st["insert"] == 1
    assert mongo_server.control("stats")["dataCommands"] == 4
    assert client.admin.command("testControl", "stats")["counts"]["find"] == 3


# ------------------------------------------------------------------ wire protocol details
def _raw(port, payload, opcode):
    rid = random.randint(1, 2 ** 30)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack("<iiii", 16 + len(payload), rid, 0, opcode) + payload)
        hdr = b""
        while len(hdr) < 16:
            hdr += s.recv(16 - len(hdr))
        length, _, resp_to, op = struct.unpack("<iiii", hdr)
        body = b""
        while len(body) < length - 16:
            body += s.recv(length - 16 - len(body))
    assert resp_to == rid
    return op, body


def test_wire_protocol(mongo_server):
    port = mongo_server.port
    # legacy OP_QUERY handshake -> OP_REPLY
    q = struct.pack("<i", 0) + b"admin.$cmd\0" + struct.pack("<ii", 0, -1) + \
        bson.encode({"isMaster": 1})
    op, body = _raw(port, q, 2004)
    assert op == 1
    flags, cursor_id, start, n = struct.unpack_from("<iqii", body)
    assert n == 1 and bson.decode(body[20:])["ismaster"] is True
    # OP_MSG with exhaustAllowed (1 << 16) set: a normal reply, no moreToCome
    msg = struct.pack("<I", 1 << 16) + b"\0" + bson.encode({"ping": 1, "$db": "admin"})
    op, body = _raw(port, msg, 2013)
    assert op == 2013 and struct.unpack_from("<I", body)[0] == 0
    assert bson.decode(body[5:])["ok"] == 1
    # kind-1 document sequence merged into the command
    docs = b"".join(bson.encode({"_id": i}) for i in range(3))
    seq = b"documents\0" + docs
    msg = (struct.pack("<I", 0) + b"\0" + bson.encode({"insert": "w", "$db": "db"}) +
           b"\1" + struct.pack("<i", 4 + len(seq)) + seq)
    op, body = _raw(port, msg, 2013)
    assert bson.decode(body[5:])["n"] == 3
    assert raw_command("127.0.0.1", port, {"count": "w"}, db="db")["n"] == 3


def test_retryable_write_executes_once(mongo_server, client):
    """A retry (same lsid + txnNumber) gets the recorded reply, as with a real mongod."""
    client.db.rw.insert_one({"_id": 1, "n": 0})
    lsid = {"id": bson.Binary(bytes(range(16)), 4)}
    cmd = {"findAndModify": "rw", "query": {"_id": 1}, "update": {"$inc": {"n": 1}},
           "new": True, "lsid": lsid, "txnNumber": Int64(1)}
    first = mongo_server.command(cmd, db="db")
    again = mongo_server.command(cmd, db="db")
    assert first["value"] == again["value"] == {"_id": 1, "n": 1}
    cmd["txnNumber"] = Int64(2)
    assert mongo_server.command(cmd, db="db")["value"] == {"_id": 1, "n": 2}
    ins = {"insert": "rw", "documents": [{"_id": 2}], "lsid": lsid, "txnNumber": Int64(3)}
    assert mongo_server.command(ins, db="db")["n"] == 1
    again = mongo_server.command(ins, db="db")
    assert again["n"] == 1 and "writeErrors" not in again
    # without a txnNumber it is a plain second insert
    del ins["txnNumber"]
    assert mongo_server.command(ins, db="db")["writeErrors"][0]["code"] == 11000
    # a reply lost to a closed connection: the driver's retry does not apply the write twice
    mongo_server.configure_fail_point({"times": 1}, {"failCommands": ["findAndModify"],
                                                     "closeConnection": True})
    # (closeConnection fires before execution; the recorded-result path is covered above)
    d = client.db.rw.find_one_and_update({"_id": 1}, {"$inc": {"n": 1}},
                                         return_document=pymongo.ReturnDocument.AFTER)
    assert d == {"_id": 1, "n": 3}


def test_concurrent_writers_one_ordered_stream(mongo_server, client):
    col = client.db.conc
    writers = [mongo_server.client() for _ in range(4)]
    with col.watch(max_await_time_ms=200) as s:
        def write(k, c):
            for i in range(40):
                c.db.conc.insert_one({"_id": "%d-%d" % (k, i)})
                c.db.conc.update_one({"_id": "%d-%d" % (k, i)}, {"$set": {"done": True}})

        threads = [threading.Thread(target=write, args=(k, c)) for k, c in enumerate(writers)]
        for t in threads:
            t.start()
        got = [next_change(s) for _ in range(4 * 40 * 2)]
        for t in threads:
            t.join(10)
        no_change(s, 0.2)
    tokens = [e["_id"]["_data"] for e in got]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    for k in range(4):   # per document: insert before update
        for i in range(40):
            ops = [e["operationType"] for e in got if e["documentKey"]["_id"] == "%d-%d" % (k, i)]
            assert ops == ["insert", "update"]
    assert col.count_documents({"done": True}) == 160
    for c in writers:
        c.close()


def test_cli(tmp_path):
    import os
    import signal
    import subprocess
    from mongo_fixture import PYTHON, SERVER_SCRIPT
    data = str(tmp_path / "data.pickle")
    p = subprocess.Popen([PYTHON, SERVER_SCRIPT, "--port", "0", "--mode", "standalone",
                          "--data", data], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        word, port = p.stdout.readline().decode().split()
        assert word == "ready" and int(port) > 0
        assert raw_command("127.0.0.1", int(port), {"insert": "c", "documents": [{"_id": 1}]},
                           db="d")["n"] == 1
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert os.path.getsize(data) > 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
