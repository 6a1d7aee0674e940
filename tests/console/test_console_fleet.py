"""The console's fleet view and its guarded commands in a real browser: /api/cluster/agents,
`wait` ("N of M applied"), `if_version` (409) and stale agents."""
import os
import shutil
import signal

from console_harness import ARTIFACTS, REPO, start_agents, wait_for


def control(agent):
    return agent.get("/api/cluster/control-state").json()


def test_the_page_lists_every_agent_of_the_fleet(fleet, state_file, page):
    agents = start_agents(fleet, state_file, 3)
    page.open(agents[0])
    wait_for(lambda: set(page.fleet_rows()) == {"agent-1", "agent-2", "agent-3"}, 10,
             message="three rows")
    page.wait_text("fleet-summary", lambda t: t.startswith("3 agents") and "3 running" in t and
                   "3 of 3 on version 0" in t and "0 stale" in t)
    for name, row in page.fleet_rows().items():
        cells = row["cells"]
        assert cells[1] == "running" and cells[2] == "0" and cells[3] == "no", (name, cells)
        assert "stale" not in row["class"] and "behind" not in row["class"]
    assert page.browser_errors() == []


def test_pause_from_the_page_reaches_3_of_3_applied(fleet, state_file, page):
    agents = start_agents(fleet, state_file, 3)
    page.open(agents[0])
    page.wait_text("cluster-version", lambda t: t == "0")
    page.el("reason").send_keys("drain for the upgrade")
    page.el("duration").send_keys("15m")
    page.act("pause-button")
    page.wait_text("progress-text", lambda t: t == "Pause (version 1): 3 of 3 live agents applied", 15)
    assert page.text("progress-detail").startswith("Complete in ")
    for a in agents:
        assert a.state()["state"] == "paused"
    cs = control(agents[1])
    assert cs["reason"] == "drain for the upgrade" and cs["expires_at"]
    page.wait_text("cluster-expires", lambda t: "(in 1" in t)  # "(in 15 min)"
    page.wait_text("fleet-summary", lambda t: "3 paused" in t and "3 of 3 on version 1" in t)
    page.wait_text("history-rows", lambda t: "drain for the upgrade" in t)
    page.wait_text("agent-state", lambda t: t == "paused")
    # the picture in docs/CONSOLE.md
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "console.png")
    page.driver.save_screenshot(shot)
    if os.environ.get("UPDATE_CONSOLE_SCREENSHOT") == "1":
        shutil.copyfile(shot, os.path.join(REPO, "docs", "console.png"))
    assert page.browser_errors() == []


def test_a_stale_if_version_shows_the_conflict_and_changes_nothing(fleet, state_file, page):
    agents = start_agents(fleet, state_file, 2)
    page.open(agents[0])
    page.wait_text("cluster-version", lambda t: t == "0")
    # Freeze what the page knows (its control-state refreshes fail), so that it still shows
    # version 0 when someone else moves the cluster to version 1.
    d = page.driver
    d.execute_cdp_cmd("Network.enable", {})
    d.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/api/cluster/control-state*"]})
    page.wait_text("cluster-problem", lambda t: t != "")
    r = agents[1].post("/api/cluster/pause?reason=someone+else&updated_by=bob")
    assert r.status == 200 and r.json()["version"] == 1
    page.el("reason").send_keys("mine")
    page.act("resume-button")
    text = page.wait_text("error-text", lambda t: "someone else changed" in t)
    assert "expected 0, current is 1" in text, text
    assert "pause (version 1) by bob" in text and "reason: someone else" in text, text
    # the panel shows the command that won, and nothing was overridden
    assert page.text("cluster-command") == "pause" and page.text("cluster-by") == "bob"
    assert control(agents[1])["version"] == 1
    for a in agents:
        a.wait_state("paused")
    d.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
    assert page.browser_errors(allow=["ERR_BLOCKED_BY_CLIENT", "status of 409"]) == []


def test_a_killed_agent_turns_stale(fleet, state_file, page):
    agents = start_agents(fleet, state_file, 3, AGENT_HEARTBEAT_INTERVAL="0.2")
    page.open(agents[0])
    wait_for(lambda: len(page.fleet_rows()) == 3, 10, message="three rows")
    agents[2].signal(signal.SIGKILL)
    agents[2].wait_exit()
    wait_for(lambda: "stale" in page.fleet_rows()["agent-3"]["class"], 15,
             message="agent-3 marked stale")
    row = page.fleet_rows()["agent-3"]
    assert row["cells"][3] == "STALE"
    # its state shows as lost (the last known one in grey), never as a green "running"
    assert row["cells"][1] == "lost last: running", row
    badge = page.driver.execute_script(
        "const b = [...document.querySelectorAll('#fleet-rows tr')].find((tr) =>"
        " tr.cells[0].textContent === 'agent-3').cells[1].querySelector('.badge');"
        "return [b.className, getComputedStyle(b).backgroundColor];")
    assert "lost" in badge[0] and "running" not in badge[0], badge
    page.wait_text("fleet-summary", lambda t: "1 stale" in t and "1 lost" in t and
                   "2 running" in t and "3 running" not in t)
    for name in ("agent-1", "agent-2"):
        assert "stale" not in page.fleet_rows()[name]["class"]
    # a pause waits for the live agents only, and names the one it did not wait for
    page.act("pause-button")
    page.wait_text("progress-text", lambda t: t == "Pause (version 1): 2 of 2 live agents applied", 15)
    assert "Not waited for (stale, stopping or stopped): agent-3." in page.text("progress-detail")
    # the shutdown confirmation counts it, and says it may be gone
    page.act("shutdown-button")
    wait_for(lambda: page.dialog_open("confirm-dialog"), 5, message="confirmation")
    assert page.text("confirm-message").startswith("3 agents will stop (1 of them stale")
    page.el("confirm-cancel").click()
    assert page.browser_errors() == []
