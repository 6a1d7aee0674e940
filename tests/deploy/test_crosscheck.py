"""Cross-checks the deployment artefacts against the binary's sources: probe paths exist in the
HTTP route table (core/ah_http.c), probe ports match HTTP_PORT, every env var given to the agent
image is one the binary reads (core/ah_config.c), and the CronJobs / documented commands hit
real routes with the token."""
import re

import pytest
import yaml

from deploy_helpers import K8S, REPO, is_agent_image, pod_containers, pod_spec

# `agenthost ctl` command -> (method, route), as built in core/ah_ctl.c (checked below).
CTL_ROUTES = {
    "pause": ("POST", "/api/cluster/pause"),
    "resume": ("POST", "/api/cluster/resume"),
    "shutdown": ("POST", "/api/cluster/shutdown"),
    "state": ("GET", "/api/cluster/control-state"),
    "stats": ("GET", "/api/cluster/stats"),
    "history": ("GET", "/api/cluster/history"),
    "agents": ("GET", "/api/cluster/agents"),
    "scopes": ("GET", "/api/cluster/scopes"),
    "leases": ("GET", "/api/cluster/leases"),
    "reload": ("POST", "/api/agent/reload"),
}


def agent_containers(objects):
    for obj in objects:
        for c in pod_containers(obj):
            if is_agent_image(c["image"]):
                yield obj, c


def test_route_matcher_is_not_vacuous(route_ok):
    assert route_ok("/healthz") and route_ok("/readyz")
    assert not route_ok("/api/cluster/nonexistent")
    assert not route_ok("/healthzz")


def test_probe_paths_and_ports_exist_in_the_binary(k8s_objects, route_ok):
    seen = 0
    for obj, c in agent_containers(k8s_objects):
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe not in c:
                continue
            get = c[probe]["httpGet"]
            assert route_ok(get["path"]), f"{obj['metadata']['name']} {probe} {get['path']} not in core/ah_http.c"
            port = ports.get(get["port"], get["port"])
            assert port == int(env.get("HTTP_PORT") or 8000), (probe, port)
            seen += 1
    assert seen >= 2


def test_services_target_the_api_port(k8s_objects):
    dep = next(o for o in k8s_objects if o["kind"] == "Deployment")
    ports = {p["name"]: p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for svc in (o for o in k8s_objects if o["kind"] == "Service" and o["spec"]["selector"] == {"app": "pulling-agent"}):
        for p in svc["spec"]["ports"]:
            assert ports.get(p["targetPort"], p["targetPort"]) == 8000


def test_env_vars_given_to_the_agent_are_accepted(k8s_objects, accepted_env_vars):
    names = {e["name"] for _, c in agent_containers(k8s_objects) for e in c.get("env", [])}
    assert {"MONGODB_URI", "AGENT_API_TOKEN", "AGENT_ID"} <= names
    assert names <= accepted_env_vars, sorted(names - accepted_env_vars)


def test_compose_env_vars_are_accepted(accepted_env_vars):
    doc = yaml.safe_load((REPO / "docker-compose-replicaset.yml").read_text())
    agents = {n: s for n, s in doc["services"].items() if str(s.get("image", "")).startswith("agenthost")}
    assert len(agents) == 3
    for name, svc in agents.items():
        env = svc["environment"]
        assert set(env) <= accepted_env_vars, (name, sorted(set(env) - accepted_env_vars))
        assert {"MONGODB_URI", "AGENT_API_TOKEN", "AGENT_ID"} <= set(env)


def test_dockerfile_env_vars_are_accepted(accepted_env_vars):
    text = (REPO / "Dockerfile").read_text()
    names = set()
    for m in re.finditer(r"^ENV\s+((?:.*\\\n)*.*)$", text, re.M):
        names |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", m.group(1)))
    assert "HTTP_PORT" in names
    assert names <= accepted_env_vars, sorted(names - accepted_env_vars)


def test_ctl_route_table_matches_the_ctl_source(route_ok):
    src = (REPO / "core" / "ah_ctl.c").read_text()
    assert '"/api/%s/%s?updated_by="' in src and '"cluster"' in src
    for route in ("/api/cluster/control-state", "/api/cluster/stats", "/api/cluster/history"):
        assert f'"{route}"' in src
    for sub, (method, route) in CTL_ROUTES.items():
        assert route_ok(route), route
        if sub not in ("pause", "resume", "shutdown"):  # built from the command's name
            assert f'"{route}"' in src, (sub, route)
    # every command ctl builds a request for is in the table above
    built = set(re.findall(r'strcmp\(command, "(\w+)"\) == 0', src))
    assert built and built <= set(CTL_ROUTES), sorted(built - set(CTL_ROUTES))


def test_cronjobs_hit_real_routes_with_the_token(k8s_objects, route_ok):
    commands = {}
    for obj in (o for o in k8s_objects if o["kind"] == "CronJob"):
        (c,) = pod_containers(obj)
        assert is_agent_image(c["image"]), "CronJobs run `agenthost ctl` from the agent image"
        argv = c["command"] + c.get("args", [])
        assert argv[:2] == ["agenthost", "ctl"], argv
        sub = argv[2]
        method, route = CTL_ROUTES[sub]
        assert method == "POST" and route_ok(route)
        url = argv[argv.index("--url") + 1]
        m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url)
        assert m, url
        svc = next(o for o in k8s_objects if o["kind"] == "Service" and o["metadata"]["name"] == m.group(1))
        assert int(m.group(2)) in [p["port"] for p in svc["spec"]["ports"]]
        # Reachable while paused: the resume must not depend on readiness.
        assert svc["spec"].get("publishNotReadyAddresses") is True
        env = {e["name"]: e for e in c["env"]}
        assert "secretKeyRef" in env["AGENT_API_TOKEN"]["valueFrom"]
        assert "--token" not in argv, "the token belongs in the environment, not argv"
        assert "--updated-by" in argv and "--reason" in argv
        commands[obj["metadata"]["name"]] = sub
    assert commands == {"nightly-pause": "pause", "nightly-resume": "resume"}


def documented_requests(text):
    """(method, path, has_token) for each curl / agenthost ctl call in a shell-ish text."""
    out = []
    for line in re.findall(r"curl[^\n]*(?:\\\n[^\n]*)*", text):
        m = re.search(r"https?://[^/\s\"'`]+(/[^\s\"'?`]*)", line)
        if not m:
            continue
        method = "POST" if re.search(r"-X\s*POST", line) else "GET"
        out.append((method, m.group(1), "Authorization: Bearer" in line))
    return out


def test_readme_commands_hit_real_routes_with_the_token(route_ok):
    text = (K8S / "README.md").read_text()
    reqs = documented_requests(text)
    assert len(reqs) >= 3
    for method, path, has_token in reqs:
        assert route_ok(path), path
        if method == "POST":
            assert has_token, f"POST {path} in k8s/README.md without the bearer token"
    for sub in re.findall(r"agenthost ctl (\w+)", text):
        assert sub in CTL_ROUTES, sub


def test_compose_comment_commands_hit_real_routes(route_ok):
    text = (REPO / "docker-compose-replicaset.yml").read_text()
    comment = "\n".join(l.lstrip("# ") for l in text.splitlines() if l.startswith("#"))
    reqs = documented_requests(comment)
    assert reqs
    for method, path, has_token in reqs:
        assert route_ok(path), path
        assert method == "GET" or has_token
