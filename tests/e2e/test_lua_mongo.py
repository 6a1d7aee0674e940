"""agent.mongo end to end: real agenthost processes against the MongoDB wire-protocol test server
(tests/mongo). The BSON <-> Lua mapping both ways (Lua writes, pymongo reads; pymongo writes, Lua
reads and writes back), every collection method, and failures: no URI, server down, misuse.
docs/LUA_MONGO.md is the reference these tests hold the binding to."""
import datetime
import json
import os
import re
import signal
import sys
import uuid

import bson
from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp

from agenthost_harness import (MONGO_DIR, agent_env, closed_port, mongo_agent_env, script,
                               wait_for)

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server  # noqa: E402,F401

NOT_CONFIGURED = ("agent.mongo: no MongoDB configured (set AGENT_MONGODB_URI or MONGODB_URI)")


def wait_report(path, agent, timeout=20.0):
    def ready():
        if agent.proc.poll() is not None:
            raise AssertionError(f"agent exited early:\n{agent.log_text()}")
        return os.path.exists(path)
    wait_for(ready, timeout, message=f"report {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def stop(agent):
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit() == 0, agent.log_text()


def same(a, b, path="$"):
    """Deep equality that also requires the same Python (BSON) types at every level."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} {a!r} != {type(b).__name__} {b!r}"
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


PY_DOC = {
    "_id": "from_py",
    "dbl": 2.5,
    "dbl_integral": 3.0,
    "int32": 7,
    "int64_small": Int64(12),
    "int64_big": Int64(2 ** 62 + 1),
    "int64_neg_big": Int64(-(2 ** 60) - 3),
    "str": "ü and 日本",
    "t": True,
    "f": False,
    "none": None,
    "oid": ObjectId("65a0f0f0f0f0f0f0f0f0f0f0"),
    "date": datetime.datetime(2024, 1, 2, 3, 4, 5, 678000),
    "dec": Decimal128("3.14159"),
    "bin": Binary(b"\x00\xff\x10", 0),
    "bin5": Binary(b"abc", 5),
    "regex": Regex("^a.*b$", "i"),
    "ts": Timestamp(1700000000, 5),
    "minkey": MinKey(),
    "maxkey": MaxKey(),
    "code": Code("function () { return 1; }"),
    "arr": [1, [2, [3.5]], {"k": []}],
    "empty_arr": [],
    "empty_doc": {},
    "deep": {"a": {"b": {"c": {}}}},
}


def test_types_written_by_lua_read_by_pymongo_and_back(fleet, tmp_path, mongo_server, state_file):
    client = mongo_server.client()
    coll = client.work.types
    coll.insert_one(PY_DOC)
    out = tmp_path / "types.json"
    # Work data on a separate deployment setting (AGENT_MONGODB_URI, own pool); control embedded.
    env = agent_env(state_file, AGENT_MONGODB_URI=mongo_server.uri, AGENT_MONGODB_DATABASE="work",
                    OUT_FILE=out, COLLECTION="types")
    agent = fleet.start(script("lua_mongo_types.lua"), env=env, name="types")
    report = wait_report(str(out), agent)
    stop(agent)
    assert "read_error" not in report, report

    # Lua -> BSON, checked with pymongo's types.
    lua = coll.find_one({"_id": "from_lua"})
    assert report["insert"] == "from_lua"
    assert type(lua["dbl"]) is float and lua["dbl"] == 1.5
    assert type(lua["nonint"]) is float and lua["nonint"] == 0.1
    assert type(lua["int32"]) is int and lua["int32"] == 42
    assert type(lua["neg"]) is int and lua["neg"] == -7
    assert type(lua["int32_max"]) is int and lua["int32_max"] == 2147483647
    for key, value in [("int64_from_number", 2 ** 40), ("int64_neg", -2147483649),
                       ("int64_forced", 5), ("int64_huge", 9007199254740993),
                       ("int64_max", 2 ** 63 - 1)]:
        assert type(lua[key]) is Int64 and lua[key] == value, (key, lua[key])
    assert lua["str"] == "héllo"
    assert lua["bool_t"] is True and lua["bool_f"] is False
    assert lua["null_v"] is None and lua["cjson_null"] is None
    assert lua["oid"] == ObjectId("0123456789abcdef01234567")
    assert lua["date"] == datetime.datetime(2023, 11, 14, 22, 13, 20, 123000)
    assert lua["dec"] == Decimal128("1234.5678")
    assert lua["bin"] == b"\x00\x01\x02\xff"
    assert lua["uuid"] == uuid.UUID(bytes=b"0123456789abcdef")  # subtype 4 (the fixture's
    # client decodes it as a UUID)
    assert lua["nested"] == {"a": {"b": {"c": [1, 2, {"d": "x"}]}}}
    assert lua["arr"] == [1, "two", 3.5, {"x": 1}]
    assert lua["empty_arr"] == [] and isinstance(lua["empty_arr"], list)
    assert lua["empty_doc"] == {} and isinstance(lua["empty_doc"], dict)
    assert lua["empty_doc_forced"] == {} and isinstance(lua["empty_doc_forced"], dict)
    assert lua["arr_of_empty"] == [[], {}]

    # BSON -> Lua: what the script saw.
    seen = report["seen"]["fields"]
    expected_types = {
        "dbl": "double", "dbl_integral": "int32", "int32": "int32", "int64_small": "int32",
        "int64_big": "int64", "int64_neg_big": "int64", "str": "string", "t": "bool",
        "f": "bool", "none": "null", "oid": "objectid", "date": "date", "dec": "decimal128",
        "bin": "binary", "bin5": "binary", "regex": "regex", "ts": "timestamp",
        "minkey": "minkey", "maxkey": "maxkey", "code": "javascript", "arr": "array",
        "empty_arr": "array", "empty_doc": "document", "deep": "document", "_id": "string"}
    assert {k: v["type"] for k, v in seen.items()} == expected_types
    assert seen["arr"]["is_array"] and seen["empty_arr"]["is_array"]
    assert not seen["empty_doc"]["is_array"]
    assert seen["arr"]["fields"]["2"]["fields"]["2"]["type"] == "array"
    assert report["int64_big_text"] == f"{2 ** 62 + 1}LL"
    assert report["int64_small_plus_one"] == 13
    assert report["date_ms"] == 1704164645678
    assert report["oid_hex"] == "65a0f0f0f0f0f0f0f0f0f0f0"
    assert report["dec_text"] == "3.14159"
    assert report["bin_data"] == 3 and report["bin5_subtype"] == 5
    assert report["null_is_null"] is True

    # ... and written back unchanged: exact types, except the documented narrowing of integral
    # numbers (int64 below 2^53 and integral doubles come back as int32).
    assert report["echo"] == "ok"
    echo = coll.find_one({"_id": "echo"})
    original = coll.find_one({"_id": "from_py"})  # as this client decodes it
    assert type(original["int64_small"]) is Int64 and type(original["dbl_integral"]) is float
    expected = dict(original, _id="echo", int64_small=12, dbl_integral=3)
    same(echo, expected)


def test_every_collection_method(fleet, tmp_path, mongo_server, state_file):
    client = mongo_server.client()
    coll = client.agenthost.ops
    coll.insert_many([{"_id": i, "n": i, "grp": i % 2} for i in range(1, 11)])
    out = tmp_path / "ops.json"
    # Work data through the control store's own pool (MONGODB_URI only).
    env = mongo_agent_env(mongo_server.uri, OUT_FILE=out, COLLECTION="ops")
    agent = fleet.start(script("lua_mongo_ops.lua"), env=env, name="ops")
    r = wait_report(str(out), agent)
    stop(agent)

    assert r["find_ids"] == [8, 6, 4]
    assert r["find_fields"] == ["_id", "n"]
    assert r["find_is_array"] is True
    assert r["iter_ids"] == list(range(1, 11))
    assert r["iter_next"] == [9, 10, True]
    assert r["find_one_n"] == 3 and r["find_one_missing"] is True
    assert r["count_all"] == 10 and r["count_odd"] == 5
    assert r["agg"] == [0, 2 + 4 + 6 + 8 + 10, 1, 1 + 3 + 5 + 7 + 9]
    assert r["insert_one_id"] == 11
    assert r["generated_id_type"] == "objectid"
    assert r["insert_many"] == [2, 12, 13]
    assert r["duplicate"] == [True, 11000, True]
    assert r["update_one"] == [1, 1]
    assert r["update_many"] == [5, 5]
    assert r["upsert"] == [0, 0, 50]
    assert r["replace_one"] == [1, 1]
    assert r["fam"] == [5, 56]
    assert r["fam_sorted"] == 1
    assert r["fam_none"] is True
    assert r["fam_upsert"] == 60
    assert r["delete_one"] == 1 and r["delete_many"] == 2
    assert r["index_auto"] == "grp_1_n_-1" and r["index_named"] == "by_n"

    # The server's view agrees.
    assert coll.find_one({"_id": 1})["touched"] is True
    assert coll.find_one({"_id": 2})["n"] == 102
    assert coll.find_one({"_id": 3}) == {"_id": 3, "n": 333, "replaced": True}
    assert coll.find_one({"_id": 5})["n"] == 56
    assert coll.find_one({"_id": 50})["n"] == 50
    assert coll.count_documents({"_id": {"$in": [11, 12, 13]}}) == 0
    assert isinstance(coll.find_one({"n": 100})["_id"], ObjectId)
    indexes = {ix["name"]: list(ix["key"].items()) for ix in coll.list_indexes()}
    assert indexes["grp_1_n_-1"] == [("grp", 1), ("n", -1)]
    assert indexes["by_n"] == [("n", 1)]


def check_misuse(misuse):
    assert "bad argument #1 to 'find_one' (filter: table expected, got number)" in \
        misuse["filter_type"]
    assert "agent.mongo.collection expected" in misuse["bad_self"]
    assert "document keys must be strings (got a boolean key)" in misuse["key_type"]
    assert "NUL" in misuse["key_nul"]
    assert "document keys must be strings (got a number key)" in misuse["mixed"]
    assert "nesting deeper than 100 levels" in misuse["cycle"]
    assert "bad argument #1 to 'insert_one' (document: key 'f': cannot store a function)" in \
        misuse["function_value"]
    assert ("bad argument #2 to 'find' (unknown option 'limt'; did you mean 'limit'?)"
            in misuse["unknown_option"])
    assert "option 'limit' must be a non-negative integer" in misuse["bad_limit"]
    # Called straight from pcall: Lua cannot name the function, the argument is still named.
    assert "bad argument #1 to '?' (expected a collection name" in misuse["bad_collection"]
    assert "bad argument #1 to '?' (expected 24 hexadecimal digits)" in misuse["bad_oid"]
    assert "bad argument #1 to '?' (must be an integer in the int64 range)" in \
        misuse["bad_int64"]
    assert "bad argument #2 to 'update_one' (update: table expected, got no value)" in \
        misuse["update_missing"]
    assert "not valid UTF-8" in misuse["invalid_utf8"]
    assert "document keys must be valid UTF-8" in misuse["key_not_utf8"]
    assert "key 'd': a date needs a field ms: a number of milliseconds in the int64 range" in \
        misuse["date_past_int64"]


def check_look_alikes(look):
    """Only agent.mongo's own values are written as ObjectIds/dates (docs/LUA_MONGO.md)."""
    assert "key 'v': cannot store this userdata" in look["forged_oid"]
    assert "key 'v': cannot store this userdata" in look["moved_oid"]
    assert "ObjectId expected, got userdata" in look["moved_oid_tostring"]
    # a plain (empty) table: encoded as a document, so the call fails only for want of a server
    assert look["fake_date"] == "no error"


def test_without_any_uri_every_call_fails_with_a_clear_message(fleet, tmp_path, state_file):
    out = tmp_path / "errors.json"
    env = agent_env(state_file, OUT_FILE=out)  # MONGODB_URI cleared, no AGENT_MONGODB_URI
    env["AGENT_MONGODB_URI"] = ""
    agent = fleet.start(script("lua_mongo_errors.lua"), env=env, name="no-uri")
    r = wait_report(str(out), agent)
    assert r["configured"] is False
    assert r["find_one"] == [True, NOT_CONFIGURED]
    assert r["insert_one"] == [True, NOT_CONFIGURED]
    check_misuse(r["misuse"])
    check_look_alikes(r["look_alikes"])
    agent.wait_log(r"errors fixture alive: batch 2")
    stop(agent)


def test_server_down_returns_nil_and_message_and_the_agent_keeps_running(fleet, tmp_path,
                                                                         state_file):
    out = tmp_path / "errors.json"
    down = f"mongodb://127.0.0.1:{closed_port()}/?serverSelectionTimeoutMS=500"
    env = agent_env(state_file, OUT_FILE=out, AGENT_MONGODB_URI=down)
    agent = fleet.start(script("lua_mongo_errors.lua"), env=env, name="down")
    r = wait_report(str(out), agent)
    assert r["configured"] is True
    is_nil, msg, code = r["find_one"]
    assert is_nil is True
    assert msg.startswith("agent.mongo: find_one on agenthost.things failed: ")
    assert "No suitable servers found" in msg or "connection" in msg.lower(), msg
    assert isinstance(code, int) and code != 0
    assert r["insert_one"][0] is True and "insert_one" in r["insert_one"][1]
    check_misuse(r["misuse"])
    agent.wait_log(r"errors fixture alive: batch 2")
    assert agent.state()["state"] == "running"
    stop(agent)


def test_queue_has_one_name_and_checks_the_job_before_using_it(fleet, tmp_path, state_file):
    out = tmp_path / "queue.json"
    env = agent_env(state_file, OUT_FILE=out)
    env["AGENT_MONGODB_URI"] = ""
    agent = fleet.start(script("lua_queue_misuse.lua"), env=env, name="queue-misuse")
    r = wait_report(str(out), agent)
    assert r["same_module"] is True
    assert r["old_name_loads"] is False
    for case, method in (("fail_nil", "fail"), ("fail_number", "fail"), ("renew_nil", "renew"),
                         ("renew_string", "renew"), ("ack_nil", "ack"),
                         ("release_table_without_id", "release")):
        msg = r["misuse"][case]
        # raised at the caller's line, not inside agent_queue.lua
        assert "lua_queue_misuse.lua:" in msg and msg.endswith(f"{method}: job table expected"), \
            (case, msg)
    stop(agent)


TO_JSON = """
local agent = require "agent"
local coll = agent.mongo.collection("to_json")
local M = {}
function M.init()
    local doc = assert(coll:find_one({ _id = "d1" }))
    local ok_plain = pcall(agent.json.encode, doc)
    local f = assert(io.open(agent.env("OUT_FILE") .. ".tmp", "w"))
    f:write(agent.json.encode({ plain_encode_fails = not ok_plain,
                                doc = agent.mongo.to_json(doc),
                                list = agent.mongo.to_json(doc.list) }))
    f:close()
    assert(os.rename(agent.env("OUT_FILE") .. ".tmp", agent.env("OUT_FILE")))
end
function M.batch() agent.sleep(1) return 0 end
return M
"""


def test_to_json_writes_a_document_read_from_mongodb_as_relaxed_extended_json(
        fleet, tmp_path, mongo_server):
    oid = ObjectId()
    when = datetime.datetime(2026, 11, 27, 3, 28, 26, 588000, tzinfo=datetime.timezone.utc)
    mongo_server.client().agenthost.to_json.insert_one(
        {"_id": "d1", "oid": oid, "at": when, "n": Int64(2**53 + 1), "price": Decimal128("1.25"),
         "list": [1, "a", when], "none": None})
    path = tmp_path / "to_json.lua"
    path.write_text(TO_JSON)
    out = tmp_path / "to_json.json"
    agent = fleet.start(str(path), env=mongo_agent_env(mongo_server.uri, OUT_FILE=out),
                        name="to-json")
    r = wait_report(str(out), agent)
    assert r["plain_encode_fails"] is True
    doc = json.loads(r["doc"])
    assert doc == {"_id": "d1", "oid": {"$oid": str(oid)},
                   "at": {"$date": "2026-11-27T03:28:26.588Z"}, "n": 2**53 + 1,
                   "price": {"$numberDecimal": "1.25"},
                   "list": [1, "a", {"$date": "2026-11-27T03:28:26.588Z"}], "none": None}
    assert json.loads(r["list"]) == doc["list"]
    stop(agent)


def test_dates_beyond_int64_have_defined_text_and_encoding(fleet, tmp_path, state_file):
    out = tmp_path / "dates.json"
    env = agent_env(state_file, OUT_FILE=out)
    env["AGENT_MONGODB_URI"] = ""
    agent = fleet.start(script("lua_mongo_dates.lua"), env=env, name="dates")
    r = wait_report(str(out), agent)
    stop(agent)
    assert r["epoch"] == "1970-01-01T00:00:00.000000Z"
    assert r["last"] == "9999-12-31T23:59:59.999000Z"
    assert r["huge"] == "date(1.0000000000000001e+300 ms, out of range)"
    assert r["negative_huge"] == "date(-1.0000000000000001e+300 ms, out of range)"
    assert r["past_9999"] == "date(253402300800000 ms, out of range)"
    assert re.fullmatch(r"date\(-?nan ms, out of range\)", r["nan"]), r["nan"]
    assert r["nan_equal"] is False and r["huge_less"] is True
    bad = ("bad argument #1 to 'insert_one' (document: key 'd': a date needs a field ms: a "
           "number of milliseconds in the int64 range)")
    assert bad in r["encode_huge"], r["encode_huge"]
    assert bad in r["encode_nan"], r["encode_nan"]
