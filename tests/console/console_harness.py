"""Helpers for the console tests: agents (the e2e harness), the browser's settings and `Page`,
the console in one browser tab."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "e2e"))
from agenthost_harness import BINARY, REPO, Fleet, agent_env, wait_for  # noqa: E402

from selenium.webdriver.common.by import By  # noqa: E402

ARTIFACTS = os.environ.get("CONSOLE_ARTIFACTS",
                           os.path.join(os.path.dirname(os.path.abspath(BINARY)),
                                        "console-artifacts"))
WORKER = os.path.join(HERE, "worker.lua")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
# Without the background-networking flags Chromium keeps trying to reach Google's services.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-default-apps",
                  "--disable-extensions", "--window-size=1280,1000"]


def start_agents(fleet, state_file, n, **extra):
    """n agents on one embedded store, all running."""
    agents = [fleet.start(WORKER, env=agent_env(state_file, **extra), name=f"agent-{i + 1}")
              for i in range(n)]
    for a in agents:
        a.wait_state("running", timeout=15)
    return agents


def start_labelled_agents(fleet, state_file, labels):
    """One agent per AGENT_LABELS text in labels (agent-1, agent-2, ...) on one embedded store,
    all running."""
    agents = [fleet.start(WORKER, env=agent_env(state_file, AGENT_LABELS=text),
                          name=f"agent-{i + 1}") for i, text in enumerate(labels)]
    for a in agents:
        a.wait_state("running", timeout=15)
    return agents


class Page:
    """The console in one browser tab."""

    def __init__(self, driver):
        self.driver = driver

    def open(self, agent):
        self.driver.get(agent.url + "/")
        # the first refresh has filled the page
        self.wait_text("served-by", lambda t: t == agent.name)
        return self

    def el(self, element_id):
        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id):
        return self.el(element_id).text

    def wait_text(self, element_id, predicate, timeout=10.0):
        """Waits until predicate(text of #element_id) holds; returns the text."""
        last = {}

        def check():
            last["text"] = self.el(element_id).text
            return predicate(last["text"])

        wait_for(check, timeout, interval=0.05,
                 message=f"#{element_id} text (last: {last.get('text')!r})")
        return last["text"]

    def act(self, button_id):
        """Clicks an action button once the page is not busy with the previous command (a click
        during one is ignored)."""
        wait_for(lambda: self.el(button_id).get_attribute("aria-disabled") != "true", 40,
                 interval=0.05, message=f"#{button_id} enabled")
        self.el(button_id).click()

    def visible(self, element_id):
        return self.el(element_id).is_displayed()

    def dialog_open(self, element_id):
        return self.driver.execute_script(
            "return document.getElementById(arguments[0]).open", element_id)

    def history_rows(self):
        """[[version, command, when, by, agent, reason], ...] as shown."""
        rows = self.driver.find_elements(By.CSS_SELECTOR, "#history-rows tr")
        return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in rows]

    def fleet_rows(self):
        rows = self.driver.find_elements(By.CSS_SELECTOR, "#fleet-rows tr")
        return {tr.find_elements(By.TAG_NAME, "td")[0].text:
                {"cells": [td.text for td in tr.find_elements(By.TAG_NAME, "td")],
                 "class": tr.get_attribute("class")} for tr in rows}

    def browser_errors(self, allow=()):
        """SEVERE browser log entries, except those containing one of `allow` and Chromium's
        net::ERR_NETWORK_CHANGED (the host's interfaces changed, e.g. podman making a network
        for the container checks beside the suite: the page's next poll succeeds)."""
        entries = self.driver.get_log("browser")
        allow = tuple(allow) + ("net::ERR_NETWORK_CHANGED",)
        return [e for e in entries if e["level"] == "SEVERE" and
                not any(a in e["message"] for a in allow)]


