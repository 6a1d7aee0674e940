"""Misuse of agent.http and agent.queue raises at the script's line, naming the function and the
argument, as agent.mongo does; unknown options are refused with "did you mean" instead of being
silently ignored (docs/LUA.md, docs/LUA_MONGO.md)."""
import re

import pytest

from agenthost_harness import agent_env, script

EXPECTED = {
    1: ("agent.http.get: unknown option 'timout' (did you mean 'timeout'?)", 12),
    2: ('agent.http.get: timeout must be a number of seconds > 0 (got string "10")', 13),
    3: ('agent.http.get: url must be a string starting with http:// or https:// '
        '(got string "127.0.0.1/x")', 14),
    4: ("agent.http.request: method must be an HTTP method name such as \"GET\" (got number 5)",
        15),
    5: ("agent.http.get: header names must be strings (got number 1)", 16),
    6: ('agent.http.get: query must be a table of name = value (got string "a=1")', 17),
    7: ('agent.http.get: max_body must be a number of bytes >= 0 (got string "big")', 18),
    8: ("agent.http.post: the body cannot be encoded as JSON", 19),
    9: ("agent.http.post: the body cannot be encoded as JSON", 20),
    10: ("agent.http.request: unknown option 'folow_redirects' (did you mean "
         "'follow_redirects'?)", 21),
    11: ("agent.queue.open: unknown option 'colection' (did you mean 'collection'?)", 22),
    12: ("agent.queue.open: unknown option 'leese' (did you mean 'lease'?)", 23),
}


@pytest.fixture(scope="module")
def misuse_lines(tmp_path_factory):
    from agenthost_harness import Fleet
    tmp = tmp_path_factory.mktemp("options")
    fleet = Fleet(tmp)
    try:
        a = fleet.start(script("option_misuse.lua"), env=agent_env(str(tmp / "state.db")))
        a.wait_log(r"misuse 12: ", timeout=30)
        lines = {}
        for n in EXPECTED:
            m = a.wait_log(rf"misuse {n}: (.*)$")
            lines[n] = m.group(1)
        return lines
    finally:
        fleet.close()


@pytest.mark.parametrize("n", sorted(EXPECTED))
def test_misuse_raises_at_the_scripts_line(misuse_lines, n):
    message, line = EXPECTED[n]
    got = misuse_lines[n]
    assert message in got, got
    assert re.search(rf"option_misuse\.lua:{line}: ", got), got
