"""Fixtures for the console tests: agents and a headless Chromium driven by Selenium. When a
browser test fails, a screenshot, the page's HTML and the browser log are kept in ARTIFACTS
(printed in the failure report)."""
import os
import shutil
import sys
import tempfile

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from console_harness import (ARTIFACTS, CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS, Fleet,  # noqa: E402
                             Page)


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


@pytest.fixture
def state_file(tmp_path):
    return str(tmp_path / "agenthost-state.db")


@pytest.fixture
def browser(tmp_path):
    """A fresh headless Chromium (own profile directory)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="console-profile-", dir=str(tmp_path))
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(20)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser):
    return Page(browser)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """The browser tests run one at a time on one worker when the suite runs in parallel
    (pytest-xdist, --dist loadgroup): each starts a Chromium and three agents, and two of them
    at once on a small machine would only make each slower. The other tests spread freely.
    (Called with every collected item, not only this directory's.)"""
    browser_items = []
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("browser"))
            browser_items.append(item)
    # The group is the longest unit of work: handed out first, it runs beside the rest instead
    # of after it (xdist hands out units in collection order).
    if browser_items:
        chosen = set(browser_items)
        items[:] = browser_items + [item for item in items if item not in chosen]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps a screenshot, the HTML and the browser log of a failed browser test."""
    outcome = yield
    report = outcome.get_result()
    driver = item.funcargs.get("browser") if hasattr(item, "funcargs") else None
    if report.when != "call" or not report.failed or driver is None:
        return
    os.makedirs(ARTIFACTS, exist_ok=True)
    base = os.path.join(ARTIFACTS, item.name)
    kept = []
    try:
        driver.save_screenshot(base + ".png")
        kept.append(base + ".png")
        with open(base + ".html", "w", encoding="utf-8") as f:
            f.write(driver.page_source)
        kept.append(base + ".html")
        with open(base + ".log", "w", encoding="utf-8") as f:
            for e in driver.get_log("browser"):
                f.write(f"{e['level']} {e['source']} {e['message']}\n")
        kept.append(base + ".log")
    except WebDriverException as e:
        kept.append(f"(browser unavailable: {e.msg})")
    report.sections.append(("console artifacts", "\n".join(kept)))
    sys.stderr.write("\nconsole artifacts: " + " ".join(kept) + "\n")
