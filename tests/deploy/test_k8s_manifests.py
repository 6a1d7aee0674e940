"""k8s/: every manifest parses, the kustomization builds (offline resolver, and `kubectl
kustomize` too when kubectl is installed), the objects validate against the Kubernetes API
schemas (npm kubernetes-models), and the production settings the issue asks for are present."""
import re
import shutil
import subprocess

import pytest
import yaml

from deploy_helpers import K8S, REPO, kustomize_build, load_yaml_docs, pod_containers, pod_spec, pod_template_labels


def by_kind(objects, kind):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_every_manifest_parses_and_has_identity():
    files = sorted(K8S.glob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        docs = load_yaml_docs(f)
        assert docs, f"{f.name} is empty"
        for d in docs:
            assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), f.name
            if d["kind"] != "Kustomization":
                assert d["metadata"]["name"], f.name
                assert "namespace" not in d["metadata"], f"{f.name}: manifests must be namespace-agnostic"


def test_every_yaml_file_is_listed_in_the_kustomization():
    kust = load_yaml_docs(K8S / "kustomization.yaml")[0]
    listed = set(kust["resources"])
    on_disk = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == listed


def test_kustomization_builds_offline(k8s_objects):
    kinds = sorted({o["kind"] for o in k8s_objects})
    assert kinds == sorted(["ConfigMap", "CronJob", "Deployment", "Job", "NetworkPolicy",
                            "PodDisruptionBudget", "Secret", "Service", "StatefulSet"])
    ids = [(o["kind"], o["metadata"]["name"]) for o in k8s_objects]
    assert len(ids) == len(set(ids)), "duplicate objects"
    cm = by_kind(k8s_objects, "ConfigMap")["pulling-agent-script"]
    assert cm["data"]["agent.lua"] == (K8S / "agent.lua").read_text()
    assert by_kind(k8s_objects, "Deployment")["pulling-agent"]["spec"]["template"]["spec"][
        "containers"][0]["image"] == "agenthost:0.1.0"


def test_resolver_rejects_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [a.yaml]\ncommonLabels: {x: y}\n")
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    with pytest.raises(ValueError, match="commonLabels"):
        kustomize_build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(FileNotFoundError):
        kustomize_build(tmp_path)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed; the offline resolver covers the build")
def test_kubectl_kustomize_matches_offline_resolver(k8s_objects):
    r = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 and "unknown command" in r.stderr:
        pytest.skip("this kubectl has no kustomize subcommand")
    assert r.returncode == 0, r.stderr
    built = [d for d in yaml.safe_load_all(r.stdout) if d]
    key = lambda o: (o["kind"], o["metadata"]["name"])
    assert sorted(built, key=key) == sorted(k8s_objects, key=key)


def test_objects_validate_against_kubernetes_schemas(k8s_objects, node_validator, tmp_path):
    results = node_validator("k8s", k8s_objects, tmp_path)
    assert len(results) == len(k8s_objects)
    bad = {r["id"]: r["errors"] for r in results if r["errors"]}
    assert not bad, bad


def test_schema_validation_catches_a_broken_object(k8s_objects, node_validator, tmp_path):
    import copy
    dep = copy.deepcopy(by_kind(k8s_objects, "Deployment")["pulling-agent"])
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    del dep["spec"]["selector"]
    (res,) = node_validator("k8s", [dep], tmp_path)
    assert any("containerPort" in e for e in res["errors"]), res
    assert any("selector" in e for e in res["errors"]), res


def test_deployment_shape(k8s_objects):
    dep = by_kind(k8s_objects, "Deployment")["pulling-agent"]
    assert dep["metadata"]["labels"]["app"] == "pulling-agent"
    spec = dep["spec"]
    assert spec["replicas"] == 3
    assert spec["selector"]["matchLabels"] == {"app": "pulling-agent"}
    assert spec["template"]["metadata"]["labels"]["app"] == "pulling-agent"
    ps = spec["template"]["spec"]
    (c,) = ps["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["AGENT_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for name, key in (("MONGODB_URI", "mongodb-uri"), ("AGENT_API_TOKEN", "agent-api-token")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == key
        secret = by_kind(k8s_objects, "Secret")[ref["name"]]
        assert key in secret["stringData"], f"placeholder Secret lacks {key}"
    assert "FAKE" in by_kind(k8s_objects, "Secret")["agenthost-secrets"]["stringData"]["agent-api-token"]
    # The script comes from the generated ConfigMap, mounted at /etc/agenthost/agent.lua.
    vols = {v["name"]: v for v in ps["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    script_vol = vols[mounts["/etc/agenthost"]["name"]]
    assert script_vol["configMap"]["name"] in by_kind(k8s_objects, "ConfigMap")
    assert {"key": "agent.lua", "path": "agent.lua"} in script_vol["configMap"]["items"]
    assert c["args"] == ["run", "/etc/agenthost/agent.lua"]
    # Probes.
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Resources.
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][part])
    # Hardening.
    psc, csc = ps["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert "emptyDir" in vols[mounts["/tmp"]["name"]]
    # The pod's labels reach the agent through a Downward API file (scoped commands).
    podinfo = vols[mounts["/etc/podinfo"]["name"]]["downwardAPI"]["items"]
    assert {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}} in podinfo
    assert env["AGENT_LABELS_FILE"]["value"] == "/etc/podinfo/labels"
    # No embedded store file with MongoDB configured and a read-only root filesystem.
    assert "AGENTHOST_STATE" not in env


def test_grace_period_nests_the_timeouts(k8s_objects):
    dep = by_kind(k8s_objects, "Deployment")["pulling-agent"]
    ps = dep["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in ps["containers"][0]["env"]}
    batch, shutdown = float(env["BATCH_TIMEOUT"]), float(env["SHUTDOWN_TIMEOUT"])
    grace = ps["terminationGracePeriodSeconds"]
    assert 0 < batch < shutdown < grace, (batch, shutdown, grace)


def test_services_pdb_and_networkpolicy(k8s_objects):
    svcs = by_kind(k8s_objects, "Service")
    for name in ("pulling-agent-service", "pulling-agent-control"):
        s = svcs[name]
        assert s["spec"]["selector"] == {"app": "pulling-agent"}
        assert s["spec"]["ports"][0]["port"] == 8000
    assert svcs["pulling-agent-control"]["spec"]["publishNotReadyAddresses"] is True
    assert not svcs["pulling-agent-service"]["spec"].get("publishNotReadyAddresses")
    pdb = by_kind(k8s_objects, "PodDisruptionBudget")["pulling-agent"]
    assert pdb["spec"]["selector"]["matchLabels"] == {"app": "pulling-agent"}
    np_ = by_kind(k8s_objects, "NetworkPolicy")["pulling-agent"]["spec"]
    assert np_["podSelector"]["matchLabels"] == {"app": "pulling-agent"}
    assert set(np_["policyTypes"]) == {"Ingress", "Egress"}
    (ing,) = np_["ingress"]
    assert ing["from"] == [{"podSelector": {"matchLabels": {"agenthost-operator": "true"}}}]
    assert ing["ports"] == [{"protocol": "TCP", "port": 8000}]
    egress_ports = sorted((p["protocol"], p["port"]) for rule in np_["egress"] for p in rule["ports"])
    assert egress_ports == [("TCP", 53), ("TCP", 27017), ("UDP", 53)]
    mongo_rule = next(r for r in np_["egress"] if r["ports"][0]["port"] == 27017)
    assert mongo_rule["to"] == [{"podSelector": {"matchLabels": {"app": "mongo"}}}]
    # The mongo StatefulSet pods carry the label the egress rule selects.
    sts = by_kind(k8s_objects, "StatefulSet")["mongo"]
    assert pod_template_labels(sts)["app"] == "mongo"


def test_cronjobs_are_labelled_operators_with_the_token(k8s_objects):
    crons = by_kind(k8s_objects, "CronJob")
    assert set(crons) == {"nightly-pause", "nightly-resume"}
    assert crons["nightly-pause"]["spec"]["schedule"] == "0 2 * * *"
    assert crons["nightly-resume"]["spec"]["schedule"] == "0 4 * * *"
    for cj in crons.values():
        assert pod_template_labels(cj).get("agenthost-operator") == "true"
        assert pod_spec(cj)["restartPolicy"] == "OnFailure"
        (c,) = pod_containers(cj)
        token = {e["name"]: e for e in c["env"]}["AGENT_API_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token == {"name": "agenthost-secrets", "key": "agent-api-token"}


def test_mongo_replica_set_and_init_job(k8s_objects):
    sts = by_kind(k8s_objects, "StatefulSet")["mongo"]
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == "mongo"
    headless = by_kind(k8s_objects, "Service")["mongo"]
    assert headless["spec"]["clusterIP"] == "None"
    (c,) = pod_spec(sts)["containers"]
    assert c["image"].startswith("mongo:7")
    args = c["args"]
    assert args[args.index("--replSet") + 1] == "rs0"
    assert "--keyFile" in args
    job = by_kind(k8s_objects, "Job")["mongo-init"]
    script = "\n".join(pod_containers(job)[0]["command"])
    for member in ("mongo-0.mongo:27017", "mongo-1.mongo:27017", "mongo-2.mongo:27017"):
        assert member in script
    assert 'rs.initiate({_id: "rs0"' in script
    assert 'role: "agentControl"' in script and 'collection: "agent_control"' in script
    assert '["find", "insert", "update", "changeStream"]' in script
    # the status records of GET /api/cluster/agents: upserts and the TTL index
    assert 'collection: "agent_status"' in script
    assert '["find", "insert", "update", "createIndex"]' in script
    # the leases (agent.lease, agent.every): findAndModify upserts and an aggregate
    assert re.search(r'collection: "agent_leases"\},\s*actions: \["find", "insert", "update"\]\}',
                     script)
    assert 'user: "agenthost"' in script
    # The agents' MongoDB URI names the same set, members, user and database.
    uri = by_kind(k8s_objects, "Secret")["agenthost-secrets"]["stringData"]["mongodb-uri"]
    assert "replicaSet=rs0" in uri and uri.startswith("mongodb://agenthost:")
    assert all(m in uri for m in ("mongo-0.mongo:27017", "mongo-1.mongo:27017", "mongo-2.mongo:27017"))


def test_readme_says_what_was_not_run():
    text = (K8S / "README.md").read_text()
    assert "not run" in text.lower()
    for section in ("Deploy", "Pause", "Roll out", "Troubleshoot"):
        assert f"## {section}" in text, section


def test_agent_script_passes_agenthost_check():
    """`agenthost check k8s/agent.lua`, when a built binary is around (AGENTHOST_BIN or build/)."""
    import os
    candidates = [os.environ.get("AGENTHOST_BIN", ""), str(REPO / "build" / "agenthost")]
    binary = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if binary is None:
        pytest.skip("no built agenthost binary (set AGENTHOST_BIN)")
    r = subprocess.run([binary, "check", str(K8S / "agent.lua")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
