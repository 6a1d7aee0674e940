"""Unix signals: SIGTERM/SIGINT graceful shutdown, SIGUSR1/SIGUSR2 local pause/resume."""
import signal

from agenthost_harness import agent_env, count_events, read_events, script, wait_events, wait_for

RECORDER = script("recorder.lua")


def start(fleet, state_file, tmp_path, name):
    events = str(tmp_path / f"{name}.jsonl")
    a = fleet.start(RECORDER, env=agent_env(state_file, events), name=name)
    a.events = events
    a.wait_state("running", timeout=15)
    wait_events(events, lambda e: count_events(e, "batch_end") >= 1, 10, f"{name} batches")
    return a


def test_sigterm_exits_zero_after_on_shutdown(fleet, state_file, tmp_path):
    a = start(fleet, state_file, tmp_path, "term")
    a.signal(signal.SIGTERM)
    assert a.wait_exit(timeout=20) == 0, a.log_text()
    ev = read_events(a.events)
    shut = [e for e in ev if e["ev"] == "on_shutdown"]
    assert len(shut) == 1, ev[-5:]
    assert shut[0]["source"] == "signal"
    assert shut[0]["command"] == "shutdown"
    assert ev[-1]["ev"] == "on_shutdown"
    assert count_events(ev, "batch_start") == count_events(ev, "batch_end")


def test_sigint_exits_zero_after_on_shutdown(fleet, state_file, tmp_path):
    a = start(fleet, state_file, tmp_path, "int")
    a.signal(signal.SIGINT)
    assert a.wait_exit(timeout=20) == 0, a.log_text()
    ev = read_events(a.events)
    assert count_events(ev, "on_shutdown", source="signal") == 1


def test_sigterm_does_not_touch_the_cluster(fleet, state_file, tmp_path):
    a = start(fleet, state_file, tmp_path, "a")
    b = start(fleet, state_file, tmp_path, "b")
    a.signal(signal.SIGTERM)
    assert a.wait_exit(timeout=20) == 0
    nb = b.state()["batches"]
    wait_for(lambda: b.state()["batches"] > nb + 2, 10, message="b keeps running")
    assert b.get("/api/cluster/history").json()["count"] == 0
    assert count_events(read_events(b.events), "on_shutdown") == 0


def test_sigusr1_sigusr2_pause_and_resume_this_pod_only(fleet, state_file, tmp_path):
    a = start(fleet, state_file, tmp_path, "a")
    b = start(fleet, state_file, tmp_path, "b")

    a.signal(signal.SIGUSR1)
    a.wait_state("paused")
    st = a.state()
    assert st["local_override"] is True
    assert a.get("/readyz").status == 503
    ev = wait_events(a.events, lambda e: count_events(e, "on_pause") == 1, 10, "on_pause")
    assert [e for e in ev if e["ev"] == "on_pause"][0]["source"] == "signal"

    nb = b.state()["batches"]
    wait_for(lambda: b.state()["batches"] > nb + 2, 10, message="b keeps running")
    assert b.state()["state"] == "running"
    assert count_events(read_events(b.events), "on_pause") == 0
    assert b.get("/api/cluster/control-state").json()["command"] == "running"

    na = a.state()["batches"]
    a.signal(signal.SIGUSR2)
    a.wait_state("running")
    wait_for(lambda: a.state()["batches"] > na, 10, message="a runs batches again")
    ev = read_events(a.events)
    resumes = [e for e in ev if e["ev"] == "on_resume"]
    assert len(resumes) == 1 and resumes[0]["source"] == "signal"
    assert a.get("/readyz").status == 200
