"""The base kustomization in deploy/kubernetes, offline: schema validation on the oldest and
newest supported Kubernetes, the pod's security context and volumes, probes, ports and
selectors that line up, the ServiceMonitor, and the kustomize render with and without
the mlock patch (kubectl skips with the reason when missing)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate.utils import SchemaNotFoundError

from tests.deploy_support import (
    CRD_KINDS,
    K8S,
    K8S_VERSIONS,
    PATCH_FILES,
    dockerfile_cmd,
    example_config,
    k8s_resources,
    kustomize,
    load_yaml_docs,
    only,
    zrproxy_container,
)
from zrproxy.config import parse_config


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml_docs(K8S / "kustomization.yaml")[0]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} - PATCH_FILES
    assert sorted(kustomization["resources"]) == sorted(on_disk)
    text = (K8S / "kustomization.yaml").read_text(encoding="utf-8")
    assert "mlock-patch.yaml" in text, "the mlock variant must be discoverable from here"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_offline(version: str) -> None:
    checked = 0
    for doc in k8s_resources():
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            with pytest.raises(SchemaNotFoundError):  # validated by hand below
                kubernetes_validate.validate(doc, version, strict=True)
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 5


def test_validation_rejects_a_broken_manifest() -> None:
    deployment = only("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFileSystem"
    ] = True  # misspelt: strict validation must refuse it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_configmap_config_parses_with_zrproxy() -> None:
    config = example_config()
    env_names = {u["api_key_env"] for u in config["upstreams"] if "api_key_env" in u}
    parsed = parse_config(config, {name: "placeholder" for name in env_names})
    assert (parsed.server.listen.host, parsed.server.listen.port) == ("0.0.0.0", 8080)
    assert (parsed.server.admin_listen.host, parsed.server.admin_listen.port) == ("0.0.0.0", 9090)
    assert parsed.server.mlock is False, "mlock needs mlock-patch.yaml; the base must not"


def test_deployment_security_context() -> None:
    deployment = only("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = zrproxy_container(deployment)
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add"), "IPC_LOCK belongs in mlock-patch.yaml only"
    for level in (pod["securityContext"], sc):
        assert level["runAsNonRoot"] is True
        assert level["runAsUser"] == 10001
        assert level["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # preStop only waits for endpoint removal to propagate (the sleep action: no shell);
    # the drain itself is the proxy's, so the grace period must cover both.
    pre_stop = container["lifecycle"]["preStop"]
    assert set(pre_stop) == {"sleep"}
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop["sleep"]["seconds"] + 30
    for name in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][name].keys()


def test_deployment_writes_nothing_to_disk() -> None:
    deployment = only("Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for volume in volumes.values():
        kinds = volume.keys() - {"name"}
        assert kinds in ({"configMap"}, {"emptyDir"}), f"unexpected volume {volume}"
        if "emptyDir" in volume:
            assert volume["emptyDir"]["medium"] == "Memory", "an emptyDir on disk retains data"
    mounts = {m["mountPath"]: m for m in zrproxy_container(deployment)["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert mounts["/etc/zrproxy"]["readOnly"] is True
    assert "configMap" in volumes[mounts["/etc/zrproxy"]["name"]]


def test_deployment_probes_ports_and_grace_period() -> None:
    deployment = only("Deployment")
    container = zrproxy_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "admin": 9090}
    config = example_config()
    assert config["server"]["listen"].endswith(f":{ports['http']}")
    assert config["server"]["admin_listen"].endswith(f":{ports['admin']}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "admin"}
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config["server"]["drain_timeout_s"]


def test_deployment_command_matches_image() -> None:
    container = zrproxy_container(only("Deployment"))
    assert container["command"] + container["args"] == dockerfile_cmd()


def test_api_keys_come_from_secrets() -> None:
    container = zrproxy_container(only("Deployment"))
    wanted = {u["api_key_env"] for u in example_config()["upstreams"] if "api_key_env" in u}
    assert wanted, "the example config should show api_key_env"
    # The whole Secret, whatever keys it has (tests/test_deploy_kubernetes.py has more).
    assert container["envFrom"] == [
        {"secretRef": {"name": "zrproxy-upstream-keys", "optional": False}}
    ]
    assert all("value" not in e for e in container.get("env", [])), "no literal env values"


def test_selectors_and_ports_line_up() -> None:
    resources = k8s_resources()
    deployment = only("Deployment", resources)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in zrproxy_container(deployment)["ports"]}
    services = [r for r in resources if r["kind"] == "Service"]
    service_ports: dict[str, Any] = {}
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        service_ports |= {p["name"]: p for p in service["spec"]["ports"]}
    assert {n: p["port"] for n, p in service_ports.items()} == {"http": 8080, "admin": 9090}
    assert {p["targetPort"] for p in service_ports.values()} <= container_ports
    pdb = only("PodDisruptionBudget", resources)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = only("HorizontalPodAutoscaler", resources)
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2, "with one replica, a node drain is an outage"


def test_servicemonitor_scrapes_the_admin_port() -> None:
    resources = k8s_resources()
    monitor = only("ServiceMonitor", resources)
    (service,) = [r for r in resources if r["metadata"]["name"] == "zrproxy-admin"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    endpoints = monitor["spec"]["endpoints"]
    assert endpoints
    for endpoint in endpoints:
        assert endpoint["port"] in service_ports
        assert endpoint["port"] == "admin"
        assert endpoint["path"] == "/metrics"


def test_kustomize_renders_the_base() -> None:
    rendered = kustomize(K8S)
    generated = ["ConfigMap"]  # configMapGenerator
    assert sorted(r["kind"] for r in rendered) == sorted(
        [r["kind"] for r in k8s_resources()] + generated
    )
    assert zrproxy_container(only("Deployment", rendered))["image"] == "zrproxy:0.1.0"


def test_mlock_patch_adds_only_ipc_lock(tmp_path: Path) -> None:
    overlay = tmp_path / "kubernetes"
    shutil.copytree(K8S, overlay)
    with (overlay / "kustomization.yaml").open("a", encoding="utf-8") as f:
        f.write("patches:\n  - path: mlock-patch.yaml\n")
    deployment = only("Deployment", kustomize(overlay))
    kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    sc = zrproxy_container(deployment)["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    # Kubernetes grants no ambient capabilities, so only UID 0 can hold IPC_LOCK.
    assert (sc["runAsUser"], sc["runAsNonRoot"]) == (0, False)
