"""Shared helpers and fixtures for the deployment-artefact tests (k8s/, Dockerfile, compose file).

Everything here is offline: YAML parsing (python3-yaml), a small kustomize resolver for the
features k8s/kustomization.yaml uses, the binary's accepted env vars and HTTP routes parsed from
the C sources, and the npm validators in validate.js (installed on first use into tests/deploy/node_modules from
the committed package-lock.json by lock_install.py, which needs no npm)."""
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
K8S = REPO / "k8s"
AGENT_IMAGE = "agenthost"  # the image name the manifests use (kustomize `images` retargets it)

# Kustomization fields the resolver below implements; anything else must fail the test rather
# than be silently ignored.
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "configMapGenerator", "images"}


def load_yaml_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomize_build(directory):
    """Resolves a kustomization the way `kubectl kustomize` does for the supported fields."""
    directory = Path(directory)
    kust = load_yaml_docs(directory / "kustomization.yaml")[0]
    unknown = set(kust) - KUSTOMIZE_FIELDS
    if unknown:
        raise ValueError(f"kustomization uses fields the offline resolver lacks: {sorted(unknown)}")
    objects = []
    for res in kust.get("resources", []):
        path = directory / res
        if not path.is_file():
            raise FileNotFoundError(f"kustomization resource {res} does not exist")
        objects.extend(load_yaml_docs(path))
    for gen in kust.get("configMapGenerator", []):
        if set(gen) - {"name", "files", "options"} or set(gen.get("options", {})) - {
            "disableNameSuffixHash"
        }:
            raise ValueError(f"configMapGenerator entry uses unsupported fields: {gen}")
        if not gen.get("options", {}).get("disableNameSuffixHash"):
            raise ValueError("configMapGenerator without disableNameSuffixHash is not supported")
        data = {}
        for spec in gen["files"]:
            key, _, fname = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
            data[key] = (directory / fname).read_text(encoding="utf-8")
        objects.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data}
        )
    images = {i["name"]: i for i in kust.get("images", [])}
    for obj in objects:
        for container in pod_containers(obj):
            name, tag = split_image(container["image"])
            if name in images:
                img = images[name]
                new = img.get("newName", name)
                if "digest" in img:
                    container["image"] = f"{new}@{img['digest']}"
                else:
                    t = img.get("newTag", tag)
                    container["image"] = f"{new}:{t}" if t else new
    return objects


def split_image(image):
    if "@" in image:
        return image.split("@", 1)[0], None
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = image.rsplit(":", 1)
        return name, tag
    return image, None


def pod_spec(obj):
    """The pod spec inside a workload object, or None."""
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return spec["template"]["spec"]
    if kind == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    if kind == "Pod":
        return spec
    return None


def pod_template_labels(obj):
    spec = obj.get("spec") or {}
    if obj.get("kind") == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return spec["template"]["metadata"].get("labels", {})


def pod_containers(obj, init=True):
    ps = pod_spec(obj)
    if ps is None:
        return []
    return list(ps.get("containers", [])) + (list(ps.get("initContainers", [])) if init else [])


def is_agent_image(image):
    return split_image(image)[0].rsplit("/", 1)[-1] == AGENT_IMAGE or image.startswith(AGENT_IMAGE)


def c_string_literals(text):
    """Every C string literal in text (comments removed first)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return [bytes(m, "utf-8").decode("unicode_escape") for m in re.findall(r'"((?:[^"\\\n]|\\.)*)"', text)]


@pytest.fixture(scope="session")
def k8s_objects():
    return kustomize_build(K8S)


@pytest.fixture(scope="session")
def accepted_env_vars():
    """Env var names the binary reads: the config_vars table in core/ah_config.c plus any
    getenv("NAME") literal in core/*.c (e.g. AGENTHOST_URL read by `agenthost ctl`)."""
    src = (REPO / "core" / "ah_config.c").read_text(encoding="utf-8")
    m = re.search(r"config_vars\s*\[\s*\]\s*=\s*\{(.*?)\n\s*\};", src, re.S)
    assert m, "config_vars table not found in core/ah_config.c"
    names = set(re.findall(r'\.name\s*=\s*"([A-Z][A-Z0-9_]*)"', m.group(1)))
    assert {"MONGODB_URI", "AGENT_API_TOKEN", "HTTP_PORT"} <= names, names
    for c in (REPO / "core").glob("*.c"):
        names |= set(re.findall(r'getenv\s*\(\s*"([A-Z][A-Z0-9_]*)"\s*\)', c.read_text(encoding="utf-8")))
    return names


@pytest.fixture(scope="session")
def http_literals():
    """String literals of the route table (core/ah_http.c) and of the handlers, which parse the
    command word of /api/{cluster,agent}/<word> (core/ah_http_handlers.c)."""
    paths = [REPO / "core" / "ah_http.c", REPO / "core" / "ah_http_handlers.c"]
    if not all(p.is_file() for p in paths):
        pytest.skip("core/ah_http.c / ah_http_handlers.c (the HTTP routes) are not in this checkout")
    return {lit for p in paths for lit in c_string_literals(p.read_text(encoding="utf-8"))}


def route_exists(route, literals):
    """True when the route is in the HTTP sources, written either as one literal ("/healthz") or as a
    prefix literal plus a suffix literal ("/api/cluster/" and "pause")."""
    route = route.split("?", 1)[0]
    if route in literals:
        return True
    for i in range(1, len(route)):
        if route[:i] in literals and route[:i].endswith("/") and route[i:] in literals:
            return True
    return False


@pytest.fixture(scope="session")
def route_ok(http_literals):
    return lambda route: route_exists(route, http_literals)


@pytest.fixture(scope="session")
def node_validator():
    """Runs validate.js; installs its npm packages first (lock_install.py: exactly the
    lockfile's, checked against its hashes) when they are missing or stale. Skips only if node
    is not installed."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed (Debian: nodejs); schema validation not run")
    lock = HERE / "package-lock.json"
    stamp = HERE / "node_modules" / ".agenthost-lock-sha256"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    # Parallel test processes (pytest-xdist) each run this session fixture: one install at a
    # time, and the others find the stamp it wrote.
    with open(HERE / ".lock-install.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if not stamp.is_file() or stamp.read_text() != digest:
            r = subprocess.run(
                [sys.executable, str(HERE / "lock_install.py"), str(HERE)],
                capture_output=True, text=True, timeout=600,
            )
            assert r.returncode == 0, f"lock_install.py failed:\n{r.stdout}\n{r.stderr}"
            stamp.write_text(digest)

    def run(what, payload, tmp_path):
        if what == "dockerfile":
            arg = str(payload)
        else:
            arg = str(tmp_path / f"{what}.json")
            Path(arg).write_text(json.dumps(payload))
        r = subprocess.run([node, str(HERE / "validate.js"), what, arg],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"validate.js {what} failed:\n{r.stderr}"
        return json.loads(r.stdout)

    return run


def bookworm_apt_available():
    """None when apt-cache can answer for Debian bookworm here, else the reason it cannot."""
    apt = shutil.which("apt-cache")
    if apt is None:
        return "apt-cache is not installed"
    r = subprocess.run([apt, "policy"], capture_output=True, text=True)
    if not re.search(r"\bn=bookworm\b", r.stdout):
        return "apt has no Debian bookworm package lists (run apt-get update on a bookworm machine)"
    return None


def apt_packages_in_bookworm(names):
    """The names among `names` that a bookworm archive offers (call bookworm_apt_available()
    first). One apt-cache call for all of them: each call reads the whole package cache."""
    r = subprocess.run(["apt-cache", "madison", *names], capture_output=True, text=True)
    offered = set()
    for line in r.stdout.splitlines():
        fields = line.split("|")
        if len(fields) >= 3 and " bookworm" in fields[2]:
            offered.add(fields[0].strip())
    return offered & set(names)
