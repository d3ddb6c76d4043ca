"""deploy/kubernetes/, validated offline: every manifest against the Kubernetes
schemas (kubernetes-validate, strict: unknown fields are errors too), and what
agent mode needs of each, read from the files. No API server runs here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

BASE = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
#: the Kubernetes version the schemas are taken for
VERSION = "1.30"


def documents() -> list[tuple[str, dict]]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    found = []
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((BASE / name).read_text()):
            found.append((name, document))
    return found


def resource(kind: str, name: str) -> dict:
    return next(document for _, document in documents()
                if document["kind"] == kind and document["metadata"]["name"] == name)


def test_the_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("version", [VERSION, "1.37"])
def test_every_manifest_is_valid_against_the_schemas(version):
    for name, document in documents():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {document['kind']} {document['metadata']['name']}: {exc.message} at "
                        f"{'.'.join(str(p) for p in exc.path)}")


def test_the_validator_refuses_what_it_should():
    agent = resource("DaemonSet", "imagesync-agent")
    broken = yaml.safe_load(yaml.safe_dump(agent))
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(agent))
    broken["spec"]["template"]["spec"]["tolerations"][0]["operator"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_the_agent_daemonset():
    spec = resource("DaemonSet", "imagesync-agent")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["command"] == ["imagesync", "agent"]
    env = {item["name"]: item for item in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    socket = volumes["containerd-socket"]["hostPath"]
    assert socket == {"path": "/run/containerd/containerd.sock", "type": "Socket"}
    assert mounts["containerd-socket"]["mountPath"] == socket["path"]
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in spec["tolerations"])
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_the_agents_port_is_published_to_the_agents_alone(tmp_path):
    from imagesync.config import load_settings

    (tmp_path / "imagesync.toml").write_text(resource("ConfigMap", "imagesync-config")["data"]["imagesync.toml"])
    settings = load_settings(tmp_path / "imagesync.toml", {})
    container = resource("DaemonSet", "imagesync-agent")["spec"]["template"]["spec"]["containers"][0]
    port, = container["ports"]
    assert (port["name"], port["containerPort"]) == ("peers", settings.agent_peer_port)
    policy = resource("NetworkPolicy", "imagesync-agent-peers")["spec"]
    agents = resource("DaemonSet", "imagesync-agent")["spec"]["selector"]["matchLabels"]
    assert policy["podSelector"]["matchLabels"] == agents and policy["policyTypes"] == ["Ingress"]
    rule, = policy["ingress"]
    assert [source["podSelector"]["matchLabels"] for source in rule["from"]] == [agents]
    assert rule["ports"] == [{"protocol": "TCP", "port": "peers"}]


def test_the_configuration_in_the_configmap_is_valid_and_matches_the_mounts(tmp_path):
    from imagesync.config import load_settings

    text = resource("ConfigMap", "imagesync-config")["data"]["imagesync.toml"]
    (tmp_path / "imagesync.toml").write_text(text)
    settings = load_settings(tmp_path / "imagesync.toml", {})
    assert settings.agents and settings.nodes == []
    assert settings.redis_url == "redis://imagesync-redis:6379/0"
    agent = resource("DaemonSet", "imagesync-agent")["spec"]["template"]["spec"]["containers"][0]
    mounted = {mount["mountPath"] for mount in agent["volumeMounts"]}
    assert settings.agent_endpoint in mounted and settings.agent_image_fs in mounted
    assert str(settings.log_dir) in mounted


def test_redis_runs_with_aof_and_noeviction():
    container = resource("StatefulSet", "imagesync-redis")["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"


def test_one_control_worker_one_beat_and_flower_behind_its_login():
    control = resource("Deployment", "imagesync-control")["spec"]
    assert control["template"]["spec"]["containers"][0]["command"] == ["imagesync", "worker", "--control"]
    beat = resource("Deployment", "imagesync-beat")["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    flower = resource("Deployment", "imagesync-flower")["spec"]["template"]["spec"]["containers"][0]
    auth = next(item for item in flower["env"] if item["name"] == "FLOWER_BASIC_AUTH")
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "imagesync-flower", "key": "basic-auth"}
