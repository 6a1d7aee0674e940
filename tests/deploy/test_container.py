"""Dockerfile, .dockerignore and docker-compose-replicaset.yml: they parse, lint clean offline
(npm dockerfile-utils, the compose-spec JSON schema), use Debian bookworm images, and name only
packages that exist in Debian bookworm (apt-cache; skipped where apt has no bookworm lists)."""
import re

import pytest
import yaml

from deploy_helpers import REPO, apt_packages_in_bookworm, bookworm_apt_available

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose-replicaset.yml"


def instructions(text):
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def apt_installs(text):
    pkgs = []
    for ins, args in instructions(text):
        if ins != "RUN":
            continue
        for m in re.finditer(r"apt-get install((?:\s+[^\s&|;]+)+)", args):
            pkgs += [p for p in m.group(1).split() if not p.startswith("-")]
    return pkgs


def test_dockerfile_structure():
    ins = instructions(DOCKERFILE.read_text())
    froms = [a for i, a in ins if i == "FROM"]
    assert froms == ["debian:bookworm AS build", "debian:bookworm-slim AS runtime"]
    after_runtime = ins[[a for _, a in ins].index("debian:bookworm-slim AS runtime"):]
    kinds = [i for i, _ in after_runtime]
    assert "HEALTHCHECK" in kinds
    user = [a for i, a in after_runtime if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert dict(ins)["ENTRYPOINT"] == '["agenthost"]'
    cmd = dict(ins)["CMD"]
    assert "hello.lua" in cmd
    health = [a for i, a in ins if i == "HEALTHCHECK"][0]
    assert "/healthz" in health
    # The runtime stage installs no compiler or -dev package.
    runtime_pkgs = apt_installs("\n".join(f"{i} {a}" for i, a in after_runtime))
    assert runtime_pkgs and not [p for p in runtime_pkgs if p.endswith("-dev") or p in ("build-essential", "cmake")]


def test_default_cmd_example_exists():
    if not (REPO / "examples" / "hello.lua").is_file():
        pytest.skip("examples/hello.lua is not in this checkout yet (the image's default CMD)")
    assert "/usr/local/share/agenthost/examples/hello.lua" in DOCKERFILE.read_text()


def test_dockerfile_lints_clean(node_validator, tmp_path):
    (res,) = node_validator("dockerfile", DOCKERFILE, tmp_path)
    assert res["errors"] == []
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("RUN apt-get update", "RUNN apt-get update", 1))
    (res,) = node_validator("dockerfile", broken, tmp_path)
    assert any("RUNN" in e for e in res["errors"])


def test_dockerignore_keeps_sources_and_drops_local_state():
    lines = {l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")}
    assert {".git", "build", "build-*", "**/node_modules"} <= lines
    for needed in ("core", "lua", "cmake", "CMakeLists.txt", "examples"):
        assert needed not in lines


def test_compose_file_parses_and_matches_the_schema(node_validator, tmp_path):
    doc = yaml.safe_load(COMPOSE.read_text())
    (res,) = node_validator("compose", doc, tmp_path)
    assert res["errors"] == []
    doc["services"]["agent1"]["healthcheck"] = {"test": 5, "bogus": True}
    (res,) = node_validator("compose", doc, tmp_path)
    assert res["errors"]


def test_compose_replica_set_shape():
    doc = yaml.safe_load(COMPOSE.read_text())
    svcs = doc["services"]
    mongos = sorted(n for n, s in svcs.items() if s.get("image") == "mongo:7" and "command" in s)
    assert mongos == ["mongo1", "mongo2", "mongo3"]
    for n in mongos:
        cmd = svcs[n]["command"]
        assert cmd[cmd.index("--replSet") + 1] == "rs0"
    init = svcs["mongo-init"]
    script = init["entrypoint"][-1]
    assert 'rs.initiate({_id: "rs0"' in script
    assert all(f"mongo{i}:27017" in script for i in (1, 2, 3))
    assert {d: c["condition"] for d, c in init["depends_on"].items()} == {f"mongo{i}": "service_healthy" for i in (1, 2, 3)}
    agents = sorted(n for n, s in svcs.items() if str(s.get("image", "")).startswith("agenthost"))
    assert agents == ["agent1", "agent2", "agent3"]
    for n in agents:
        s = svcs[n]
        assert s["depends_on"]["mongo-init"]["condition"] == "service_completed_successfully"
        assert "replicaSet=rs0" in s["environment"]["MONGODB_URI"]
        assert s["build"]["dockerfile"] == "Dockerfile"
        src = s["volumes"][0].split(":")[0]
        assert (REPO / src).is_file(), src
    assert len({svcs[n]["environment"]["AGENT_ID"] for n in agents}) == 3
    # Published on loopback only (the fallback token is public), each on its own host port.
    assert {svcs[n]["ports"][0].rsplit(":", 2)[0] for n in agents} == {"127.0.0.1"}
    assert len({svcs[n]["ports"][0].rsplit(":", 2)[1] for n in agents}) == 3


def test_compose_stop_grace_period_outlasts_shutdown_timeout():
    """`docker compose stop` SIGKILLs after stop_grace_period (10 s when unset): it must outlast
    SHUTDOWN_TIMEOUT, which outlasts BATCH_TIMEOUT (tests/container runs the stop)."""
    svcs = yaml.safe_load(COMPOSE.read_text())["services"]
    for n in ("agent1", "agent2", "agent3"):
        env = svcs[n]["environment"]
        m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", svcs[n]["stop_grace_period"])
        assert m and any(m.groups()), svcs[n]["stop_grace_period"]
        grace = int(m.group(1) or 0) * 60 + int(m.group(2) or 0)
        assert float(env["BATCH_TIMEOUT"]) < float(env["SHUTDOWN_TIMEOUT"]) < grace, n


def test_dockerfile_has_no_syntax_directive_and_documents_stop_timeout():
    text = DOCKERFILE.read_text()
    assert not re.match(r"#\s*syntax\s*=", text, re.I)
    m = re.search(r"docker run .*--stop-timeout (\d+)", text)
    default = re.search(r"SHUTDOWN_TIMEOUT \((\d+) s by default\)", text)
    assert m and default and int(m.group(1)) > int(default.group(1))
    # ... and that default is the binary's.
    config = (REPO / "core" / "ah_config.c").read_text()
    row = re.search(r'\{\.name = "SHUTDOWN_TIMEOUT"[^}]*\}', config)
    assert row and re.search(r'\.default_value = "%s"' % default.group(1), row.group(0))


def test_compose_images_are_pinned():
    doc = yaml.safe_load(COMPOSE.read_text())
    for name, s in doc["services"].items():
        image = s.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, (name, image)


def test_packages_exist_in_debian_bookworm():
    reason = bookworm_apt_available()
    if reason:
        pytest.skip(reason)
    pkgs = apt_installs(DOCKERFILE.read_text())
    assert len(pkgs) >= 15
    absent = "libluajit-5.1-2-does-not-exist"
    offered = apt_packages_in_bookworm(pkgs + [absent])
    missing = [p for p in pkgs if p not in offered]
    assert not missing, f"not in Debian bookworm: {missing}"
    assert absent not in offered
