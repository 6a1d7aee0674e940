"""The console in a real browser (headless Chromium): three agents on one embedded store, the
page served by one of them, commands sent from the page and from elsewhere."""
from urllib.parse import quote

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from console_harness import start_agents, start_labelled_agents, wait_for

HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


def control(agent):
    return agent.get("/api/cluster/control-state").json()


def test_page_shows_the_cluster_store_agent_and_history(fleet, state_file, page):
    agents = start_agents(fleet, state_file, 3)
    r = agents[1].post("/api/cluster/pause?reason=before+the+page&updated_by=ops")
    assert r.status == 200, r.body
    page.open(agents[0])
    page.wait_text("cluster-command", lambda t: t == "pause")
    assert page.text("cluster-version") == "1"
    assert page.text("cluster-by") == "ops"
    assert page.text("cluster-reason") == "before the page"
    assert page.text("cluster-when").startswith(r.json()["timestamp"][:10])
    assert page.text("store-status") == "connected"
    assert page.text("store-watch").startswith("polling")
    assert page.text("agent-id") == "agent-1"
    page.wait_text("agent-state", lambda t: t == "paused")
    rows = page.wait_text("history-rows", lambda t: "before the page" in t)
    history = page.history_rows()
    assert history[0][0] == "1" and history[0][1] == "pause"
    assert history[0][3] == "ops" and history[0][4] == "agent-2"
    assert history[0][5] == "before the page", rows
    # refreshed in place: the element holding the batch count is the same one later
    cell = page.el("agent-batches")
    first = cell.text
    agents[1].post("/api/cluster/resume?reason=go")
    page.wait_text("agent-batches", lambda t: t != first)
    assert page.el("agent-batches") == cell
    assert page.browser_errors() == []


def test_pause_from_the_page_reaches_the_fleet_and_the_history(fleet, state_file, page):
    agents = start_agents(fleet, state_file, 3)
    page.open(agents[0])
    page.wait_text("cluster-version", lambda t: t == "0")
    page.el("reason").send_keys("maintenance window")
    page.act("pause-button")
    for a in agents:
        a.wait_state("paused", timeout=15)
    page.wait_text("progress-text", lambda t: t == "Pause (version 1): 3 of 3 live agents applied")
    cs = control(agents[2])
    assert cs["command"] == "pause" and cs["reason"] == "maintenance window"
    assert cs["updated_by"] == "console"
    page.wait_text("cluster-command", lambda t: t == "pause")
    page.wait_text("history-rows", lambda t: "maintenance window" in t)
    assert page.history_rows()[0][1] == "pause"
    assert page.browser_errors() == []


def test_a_pause_made_elsewhere_appears_within_seconds(fleet, state_file, page):
    agents = start_agents(fleet, state_file, 2)
    page.open(agents[0])
    page.wait_text("cluster-command", lambda t: t == "running")
    r = agents[1].post("/api/cluster/pause?reason=from+the+cli&updated_by=someone")
    assert r.status == 200
    page.wait_text("cluster-command", lambda t: t == "pause", timeout=5)
    page.wait_text("cluster-reason", lambda t: t == "from the cli", timeout=5)
    page.wait_text("agent-state", lambda t: t == "paused", timeout=5)
    assert page.browser_errors() == []


def test_a_hostile_reason_is_shown_as_text_and_runs_nothing(fleet, state_file, page):
    agents = start_agents(fleet, state_file, 1)
    r = agents[0].post("/api/cluster/pause?reason=" + quote(HOSTILE) + "&updated_by=" +
                       quote("<b>mallory</b>"))
    assert r.status == 200, r.body
    page.open(agents[0])
    page.wait_text("cluster-reason", lambda t: t == HOSTILE)
    assert page.text("cluster-by") == "<b>mallory</b>"
    page.wait_text("history-rows", lambda t: HOSTILE in t)
    # the same text typed into the page goes out and comes back as text too
    page.el("reason").send_keys(HOSTILE + " again")
    page.act("resume-button")
    page.wait_text("cluster-reason", lambda t: t == HOSTILE + " again")
    d = page.driver
    assert d.find_elements(By.CSS_SELECTOR, "main img, main script, main b") == []
    assert d.execute_script("return window.__pwned === undefined")
    assert page.browser_errors() == []


def test_a_wrong_token_shows_an_error_and_changes_nothing(fleet, state_file, page):
    agents = start_agents(fleet, state_file, 2, AGENT_API_TOKEN="s3cret-token")
    page.open(agents[0])
    page.wait_text("cluster-version", lambda t: t == "0")
    page.el("reason").send_keys("needs a token")
    page.act("pause-button")
    wait_for(lambda: page.dialog_open("token-dialog"), 5, message="token dialog")
    assert "requires an API token" in page.text("token-message")
    page.el("token-input").send_keys("wrong-token", Keys.ENTER)
    page.wait_text("token-message", lambda t: "rejected" in t)
    assert page.dialog_open("token-dialog")
    page.el("token-cancel").click()
    page.wait_text("error-text", lambda t: "invalid bearer token" in t)
    assert control(agents[1])["version"] == 0
    assert agents[1].state()["state"] == "running"
    assert page.driver.execute_script("return sessionStorage.getItem('agenthost.token')") is None

    # the right token: sent, kept for this tab, and never part of a URL
    page.act("pause-button")
    wait_for(lambda: page.dialog_open("token-dialog"), 5, message="token dialog")
    page.el("token-input").send_keys("s3cret-token", Keys.ENTER)
    page.wait_text("progress-text", lambda t: t == "Pause (version 1): 2 of 2 live agents applied")
    for a in agents:
        assert a.state()["state"] == "paused"
    assert control(agents[1])["reason"] == "needs a token"
    assert page.driver.execute_script(
        "return sessionStorage.getItem('agenthost.token')") == "s3cret-token"
    assert not page.visible("error")
    urls = page.driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".concat([location.href])")
    assert urls and not any("s3cret" in u for u in urls), urls
    # later commands reuse the stored token without asking
    page.act("resume-button")
    for a in agents:
        a.wait_state("running", timeout=10)
    assert not page.dialog_open("token-dialog")
    assert page.browser_errors(allow=["status of 401"]) == []


def test_shutdown_asks_for_confirmation_first(fleet, state_file, page):
    agents = start_agents(fleet, state_file, 2)
    page.open(agents[0])
    page.wait_text("cluster-version", lambda t: t == "0")
    page.act("shutdown-button")
    wait_for(lambda: page.dialog_open("confirm-dialog"), 5, message="confirmation")
    message = page.text("confirm-message")
    assert message.startswith("2 agents will stop."), message
    assert page.text("confirm-ok") == "Shut down 2 agents"
    page.el("confirm-cancel").click()
    assert not page.dialog_open("confirm-dialog")
    assert control(agents[1])["version"] == 0
    page.act("shutdown-button")
    wait_for(lambda: page.dialog_open("confirm-dialog"), 5, message="confirmation")
    page.el("confirm-ok").click()
    for a in agents:
        assert a.wait_exit(timeout=20) == 0


def test_a_scoped_shutdown_confirms_the_count_of_the_matching_agents(fleet, state_file, page):
    agents = start_labelled_agents(fleet, state_file, ["region=eu", "region=eu,role=api",
                                                       "region=us"])
    page.open(agents[2])
    page.wait_text("fleet-rows", lambda t: "region=us" in t and t.count("region=eu") == 2)
    # a malformed selector: said on the page, no dialog, nothing sent
    page.el("selector").send_keys("region in (eu")
    page.act("shutdown-button")
    page.wait_text("error", lambda t: "Shutdown not sent" in t and "selector" in t)
    assert not page.dialog_open("confirm-dialog")
    page.el("selector").clear()
    # the scope counts the 2 agents it matches, not the fleet's 3
    page.el("selector").send_keys("region=eu")
    page.act("shutdown-button")
    wait_for(lambda: page.dialog_open("confirm-dialog"), 5, message="confirmation")
    message = page.text("confirm-message")
    assert message.startswith("2 agents matching region=eu will stop."), message
    assert page.text("confirm-ok") == "Shut down 2 agents matching region=eu"
    page.el("confirm-cancel").click()
    assert not page.dialog_open("confirm-dialog")
    assert agents[2].get("/api/cluster/scopes").json()["count"] == 0
    # one agent matched: the count follows the selector
    page.el("selector").clear()
    page.el("selector").send_keys("region=us")
    page.act("shutdown-button")
    wait_for(lambda: page.dialog_open("confirm-dialog"), 5, message="confirmation")
    assert page.text("confirm-message").startswith("1 agent matching region=us will stop."), \
        page.text("confirm-message")
    page.el("confirm-cancel").click()
    # confirmed: exactly the matching agents stop
    page.el("selector").clear()
    page.el("selector").send_keys("role=api")
    page.act("shutdown-button")
    wait_for(lambda: page.dialog_open("confirm-dialog"), 5, message="confirmation")
    assert page.text("confirm-ok") == "Shut down 1 agent matching role=api"
    page.el("confirm-ok").click()
    assert agents[1].wait_exit(timeout=20) == 0
    assert [a.state()["state"] for a in (agents[0], agents[2])] == ["running", "running"]
    assert page.browser_errors(allow=["status of 400"]) == []


def test_keyboard_only_pause_and_a_narrow_window(fleet, state_file, page):
    agents = start_agents(fleet, state_file, 1)
    d = page.driver
    d.set_window_size(380, 900)
    page.open(agents[0])
    page.wait_text("cluster-version", lambda t: t == "0")
    # no horizontal scrolling of the page itself (wide tables scroll inside their region)
    assert d.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    # every control has a name a screen reader can announce
    unnamed = d.execute_script("""
        return Array.from(document.querySelectorAll('input, button, select, textarea'))
          .filter(e => !(e.labels && e.labels.length) && !e.textContent.trim()
                       && !e.getAttribute('aria-label'))
          .map(e => e.id);""")
    assert unnamed == []
    # Tab from the top of the page reaches the reason field; Enter pauses
    d.find_element(By.TAG_NAME, "body").click()
    for _ in range(10):
        d.switch_to.active_element.send_keys(Keys.TAB)
        if d.switch_to.active_element.get_attribute("id") == "reason":
            break
    assert d.switch_to.active_element.get_attribute("id") == "reason"
    d.switch_to.active_element.send_keys("typed with keys", Keys.ENTER)
    agents[0].wait_state("paused", timeout=10)
    assert control(agents[0])["reason"] == "typed with keys"
    assert page.browser_errors() == []


def test_history_is_paged(fleet, state_file, page):
    agents = start_agents(fleet, state_file, 1)
    for i in range(1, 26):
        command = "pause" if i % 2 else "resume"
        assert agents[0].post(f"/api/cluster/{command}?reason=step+{i}").status == 200
    page.open(agents[0])
    page.wait_text("history-page", lambda t: t == "Page 1 (entries 1–20)")
    rows = page.history_rows()
    assert [r[0] for r in rows] == [str(v) for v in range(25, 5, -1)]
    assert rows[0][5] == "step 25"
    assert page.el("history-newer").get_attribute("aria-disabled") == "true"
    page.el("history-older").click()
    page.wait_text("history-page", lambda t: t == "Page 2 (entries 21–25)")
    assert [r[0] for r in page.history_rows()] == ["5", "4", "3", "2", "1"]
    assert page.el("history-older").get_attribute("aria-disabled") == "true"
    page.el("history-newer").click()
    page.wait_text("history-page", lambda t: t == "Page 1 (entries 1–20)")
    assert page.browser_errors() == []


def test_scoped_pause_from_the_page_and_its_resume_button(fleet, state_file, page):
    agents = start_labelled_agents(fleet, state_file, ["region=eu", "region=eu,role=api",
                                                       "region=us"])
    page.open(agents[2])
    page.wait_text("fleet-rows", lambda t: "region=us" in t and t.count("region=eu") == 2)
    page.wait_text("scopes-summary", lambda t: t.startswith("No scopes"))
    page.el("reason").send_keys("eu db down")
    page.el("selector").send_keys("region = eu")
    page.act("pause-button")
    page.wait_text("progress-text", lambda t: t == "Pause region=eu (version 1): 2 of 2 live agents applied")
    assert [a.state()["state"] for a in agents] == ["paused", "paused", "running"]
    rows = page.wait_text("scopes-rows", lambda t: "region=eu" in t and "eu db down" in t)
    assert "pause" in rows
    page.wait_text("history-rows", lambda t: "pause (region=eu)" in t)
    # the scope's own Resume button
    button = page.driver.find_element(By.CSS_SELECTOR, "#scopes-rows button")
    assert button.get_attribute("aria-label") == "Resume region=eu"
    # a click while the page is still busy with the pause is ignored (as for the other buttons)
    wait_for(lambda: button.get_attribute("aria-disabled") != "true", 40, interval=0.05,
             message="the scope's Resume enabled")
    button.click()
    page.wait_text("progress-text", lambda t: t == "Resume region=eu (version 2): 2 of 2 live agents applied")
    assert [a.state()["state"] for a in agents] == ["running", "running", "running"]
    page.wait_text("scopes-summary", lambda t: t == "1 scope, 0 holding agents")
    assert not button.is_displayed()
    assert page.browser_errors() == []


def test_a_drain_from_the_page_is_stored_and_shown(fleet, state_file, page):
    agents = start_agents(fleet, state_file, 2)
    page.open(agents[0])
    page.wait_text("cluster-version", lambda t: t == "0")
    # a malformed drain is refused on the page: nothing is sent
    page.el("drain").send_keys("soon")
    page.act("pause-button")
    page.wait_text("error-text", lambda t: "Drain within: expected a duration" in t)
    assert control(agents[1])["version"] == 0
    page.el("drain").clear()
    page.el("drain").send_keys("30s")
    page.el("reason").send_keys("rolling upgrade")
    page.act("pause-button")
    page.wait_text("progress-text", lambda t: t == "Pause (version 1): 2 of 2 live agents applied", 15)
    cs = control(agents[1])
    assert cs["command"] == "pause" and cs["drain"] == 30, cs
    page.wait_text("cluster-drain", lambda t: t.startswith("30 s after the command"))
    page.wait_text("history-rows", lambda t: "rolling upgrade" in t)
    assert page.history_rows()[0][1] == "pause (drain 30 s)"
    assert page.el("drain").get_attribute("value") == ""
    assert page.browser_errors() == []


def test_the_fleet_table_shows_who_holds_each_lease(fleet, state_file, page, tmp_path):
    import os
    from console_harness import agent_env
    sweeper = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "e2e", "scripts", "lease_sweeper.lua")
    events = tmp_path / "events.jsonl"
    agents = [fleet.start(sweeper, env=agent_env(state_file, events, LEASE_TTL=3),
                          name=f"agent-{i + 1}") for i in range(2)]
    for a in agents:
        a.wait_state("running", timeout=15)
    page.open(agents[0])
    page.wait_text("fleet-rows", lambda t: "sweep" in t, timeout=20)
    holder = agents[0].get("/api/cluster/leases").json()["leases"][0]["owner"]
    rows = page.fleet_rows()
    assert rows[holder]["cells"][9] == "sweep"
    other = next(a.name for a in agents if a.name != holder)
    assert rows[other]["cells"][9] == "—"
    # the holder pauses: the lease moves, and the table follows
    by_name = {a.name: a for a in agents}
    by_name[holder].post("/api/agent/pause?reason=handover")
    wait_for(lambda: page.fleet_rows()[other]["cells"][9] == "sweep", 20,
             message="the other agent shown as the holder")
    assert page.fleet_rows()[holder]["cells"][9] == "—"
    assert page.browser_errors() == []
