"""Order of the end-to-end tests when they run in parallel (pytest-xdist, `--dist loadgroup`).

xdist hands out the tests one unit at a time (a unit: one test, or a whole `xdist_group`) in
collection order, so a long unit collected last (the install group, a slow fleet test) runs
alone at the end while the other workers sit idle. Each worker here sorts its collection so that
the longest units come first (longest-processing-time-first scheduling; every worker sorts the
same way, so the workers' collections stay identical as xdist requires). The lengths are the
seconds measured in a parallel run, kept in `tests/durations.json` (a test not listed counts as
DEFAULT_SECONDS); refresh them with `--store-durations` after tests were added or became slower:

    /usr/bin/python3 -m pytest -n 2 --dist loadgroup --store-durations tests/mongo tests/e2e \
        tests/console tests/deploy tests/install

A group keeps its tests in their order, and so do the tests of a module that share a
module-scoped fixture (one unit, so that the fixture is set up once); in a run without xdist
nothing is reordered.
"""
import json
import os

import pytest

DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")
DEFAULT_SECONDS = 2.0


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help="write each test's seconds (setup + call + teardown) to "
                          "tests/durations.json, for the order of parallel runs")


def load_durations():
    try:
        with open(DURATIONS) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def group_of(item):
    marker = item.get_closest_marker("xdist_group")
    if marker is None:
        return None
    return marker.args[0] if marker.args else marker.kwargs.get("name", "default")


def uses_a_module_fixture(item):
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(
        d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs)


def seconds_of(seconds, nodeid, group):
    """A test's recorded seconds; xdist names a grouped test "<nodeid>@<group>" in its reports
    (and, depending on the order of the hooks, already here)."""
    if group is not None:
        suffix = "@" + group
        bare = nodeid[:-len(suffix)] if nodeid.endswith(suffix) else nodeid
        for key in (bare + suffix, bare):
            if key in seconds:
                return seconds[key]
    return seconds.get(nodeid, DEFAULT_SECONDS)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # not an xdist worker: keep the collection order
        return
    seconds = load_durations()
    units = {}  # unit key -> [total seconds, first position, items]
    for position, item in enumerate(items):
        group = group_of(item)
        if group is not None:
            key = ("group", group)
        elif uses_a_module_fixture(item):  # kept together, so the fixture is set up once
            key = ("module", item.nodeid.split("::")[0])
        else:
            key = ("test", item.nodeid)
        unit = units.setdefault(key, [0.0, position, []])
        unit[0] += seconds_of(seconds, item.nodeid, group)
        unit[2].append(item)
    ordered = sorted(units.values(), key=lambda unit: (-unit[0], unit[1]))
    items[:] = [item for unit in ordered for item in unit[2]]


class DurationRecorder:
    def __init__(self):
        self.seconds = {}

    def pytest_runtest_logreport(self, report):
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self, session):
        merged = load_durations()
        merged.update({nodeid: round(s, 2) for nodeid, s in self.seconds.items()})
        with open(DURATIONS, "w") as f:
            json.dump(dict(sorted(merged.items())), f, indent=0)
            f.write("\n")


def pytest_configure(config):
    # Recorded where the reports arrive: the controller under xdist, else the one process.
    if config.getoption("store_durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(DurationRecorder(), "agenthost-durations")
