"""deploy/kubernetes as an operator applies it: secrets by envFrom, a config change that
rolls the pods, the NetworkPolicy, the admin Service, the Ingress and HPA examples, and a
deploy/README.md that says what the manifests do."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from tests.deploy_support import (
    DEPLOY,
    K8S,
    K8S_VERSIONS,
    example_config,
    k8s_resources,
    kustomize,
    load_yaml_docs,
    only,
    zrproxy_container,
)
from zrproxy.cli import main
from zrproxy.metrics import Metrics

EXAMPLES = K8S / "examples"
README = DEPLOY / "README.md"
# The documented bound on what one stream whose client stalls holds (README, "How it streams").
STREAM_BOUND_BYTES = 512 * 1024


def named(name: str, kind: str, resources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [
        r
        for r in (resources or k8s_resources())
        if r["kind"] == kind and r["metadata"]["name"] == name
    ]
    assert len(found) == 1, (kind, name)
    return found[0]


def example(name: str) -> dict[str, Any]:
    (doc,) = load_yaml_docs(EXAMPLES / name)
    return doc


def upstream_ports() -> set[int]:
    ports = set()
    for upstream in example_config()["upstreams"]:
        url = urlsplit(upstream["base_url"])
        ports.add(url.port or (443 if url.scheme == "https" else 80))
    return ports


def quantity_bytes(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "m": 2**20, "M": 10**6}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", text)
    assert match, text
    return int(match.group(1)) * units.get(match.group(2), 1)


# --- secrets --------------------------------------------------------------------------


def test_every_secret_key_becomes_an_env_var() -> None:
    container = zrproxy_container(only("Deployment"))
    (source,) = container["envFrom"]
    assert source == {"secretRef": {"name": "zrproxy-upstream-keys", "optional": False}}
    assert "env" not in container, "keys come from the Secret, not one env entry each"


def test_documented_secret_keys_are_the_config_variable_names() -> None:
    wanted = {u["api_key_env"] for u in example_config()["upstreams"] if "api_key_env" in u}
    for path in (README, K8S / "kustomization.yaml"):
        text = path.read_text()
        command = re.search(r"kubectl create secret generic (\S+) \\\s+(.+)", text)
        assert command, path
        assert command.group(1) == "zrproxy-upstream-keys"
        assert set(re.findall(r"--from-literal=([A-Za-z_]+)=", command.group(2))) == wanted


# --- a config change rolls the pods ---------------------------------------------------


def rendered_config_name(directory: Path) -> tuple[str, dict[str, Any]]:
    rendered = kustomize(directory)
    (config_map,) = [r for r in rendered if r["kind"] == "ConfigMap"]
    deployment = only("Deployment", rendered)
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    (referenced,) = [v["configMap"]["name"] for v in volumes if "configMap" in v]
    assert referenced == config_map["metadata"]["name"]
    return referenced, config_map


def test_the_config_map_is_generated_from_config_toml() -> None:
    name, config_map = rendered_config_name(K8S)
    assert re.fullmatch(r"zrproxy-config-[a-z0-9]{10}", name), name
    assert config_map["data"]["config.toml"] == (K8S / "config.toml").read_text()
    assert not (K8S / "configmap.yaml").exists(), "a static ConfigMap would not roll the pods"


def test_a_config_change_gives_the_pods_a_new_config_map(tmp_path: Path) -> None:
    copy = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy)
    before, _ = rendered_config_name(copy)
    config = copy / "config.toml"
    config.write_text(config.read_text().replace("drain_timeout_s = 30", "drain_timeout_s = 20"))
    after, _ = rendered_config_name(copy)
    assert before != after  # a new pod template: kubectl apply rolls the Deployment


def test_the_shipped_config_passes_check_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--no-env", str(K8S / "config.toml")]) == 0
    assert capsys.readouterr().err == "", "no warnings on the config we ship"


# --- services, NetworkPolicy ----------------------------------------------------------


def test_the_admin_port_has_its_own_service() -> None:
    api, admin = named("zrproxy", "Service"), named("zrproxy-admin", "Service")
    assert [p["name"] for p in api["spec"]["ports"]] == ["http"]
    assert [p["name"] for p in admin["spec"]["ports"]] == ["admin"]
    selector = only("ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= admin["metadata"]["labels"].items()
    assert not selector.items() <= api["metadata"]["labels"].items()


def policy() -> dict[str, Any]:
    return named("zrproxy", "NetworkPolicy")


def test_network_policy_selects_the_pods_both_ways() -> None:
    spec = policy()["spec"]
    pod_labels = only("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    container_ports = {p["name"] for p in zrproxy_container(only("Deployment"))["ports"]}
    for rule in spec["ingress"]:
        assert {p["port"] for p in rule["ports"]} <= container_ports


def test_admin_port_only_from_the_monitoring_namespace() -> None:
    monitoring = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    admin_rules = [
        r for r in policy()["spec"]["ingress"] if any(p["port"] == "admin" for p in r["ports"])
    ]
    assert admin_rules, "the admin port must be reachable by Prometheus"
    for rule in admin_rules:
        assert rule.get("from") == monitoring
        assert [p["port"] for p in rule["ports"]] == ["admin"]
    # The API port is open to the cluster (clients, the ingress controller).
    assert any(
        [p["port"] for p in r["ports"]] == ["http"] and "from" not in r
        for r in policy()["spec"]["ingress"]
    )


def test_egress_only_dns_and_the_upstream_ports() -> None:
    egress = policy()["spec"]["egress"]
    dns = [r for r in egress if {p["port"] for p in r["ports"]} == {53}]
    assert len(dns) == 1
    assert {p["protocol"] for p in dns[0]["ports"]} == {"UDP", "TCP"}
    (peer,) = dns[0]["to"]
    assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    others = [r for r in egress if r is not dns[0]]
    assert {p["port"] for r in others for p in r["ports"]} == upstream_ports()
    assert all(p["protocol"] == "TCP" for r in others for p in r["ports"])
    for rule in others:
        blocks = [peer["ipBlock"] for peer in rule["to"]]
        assert len(blocks) == len(rule["to"]), "upstreams are matched by address"
        ipv4 = next(b for b in blocks if b["cidr"] == "0.0.0.0/0")
        for private in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"):
            assert private in ipv4["except"], private  # other workloads, cloud metadata


def test_readme_explains_host_based_egress() -> None:
    text = README.read_text()
    assert "FQDN" in text and "toFQDNs" in text and "egress proxy" in text
    assert "ipBlock" in text


# --- examples: Ingress and HPA --------------------------------------------------------


@pytest.mark.parametrize("name", ["ingress-nginx.yaml", "hpa-open-streams.yaml"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_examples_validate(name: str, version: str) -> None:
    kubernetes_validate.validate(example(name), version, strict=True)


def test_ingress_example_suits_streams() -> None:
    ingress = example("ingress-nginx.yaml")
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    server = example_config()["server"]
    assert notes[prefix + "proxy-buffering"] == "off"
    assert notes[prefix + "proxy-request-buffering"] == "off"  # no body in a temp file
    assert notes[prefix + "enable-access-log"] == "false"  # a query string is content
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[prefix + timeout]) > server["total_timeout_s"], timeout
    assert quantity_bytes(notes[prefix + "proxy-body-size"]) == server["max_body_bytes"]
    backends = [
        path["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    api = named("zrproxy", "Service")
    for backend in backends:
        assert backend["name"] == api["metadata"]["name"]
        assert backend["port"]["name"] in {p["name"] for p in api["spec"]["ports"]}


def test_hpa_example_scales_on_open_streams_within_the_memory_bound() -> None:
    hpa = example("hpa-open-streams.yaml")
    base = only("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == base["spec"]["scaleTargetRef"]
    assert hpa["spec"]["behavior"]["scaleDown"] == base["spec"]["behavior"]["scaleDown"]
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    gauge = Metrics().open_streams._name  # the metric the proxy really exports
    assert pods["metric"]["name"] == gauge
    target = int(pods["target"]["averageValue"])
    limit = quantity_bytes(zrproxy_container(only("Deployment"))["resources"]["limits"]["memory"])
    # At the target, the worst case (every client stalled) fits in half the limit.
    assert target * STREAM_BOUND_BYTES <= limit / 2
    text = README.read_text()
    assert f"{target} open streams per pod" in text
    assert "zrproxy_open_streams" in text


# --- deploy/README.md agrees with the manifests ---------------------------------------


def test_readme_matches_the_shutdown_sequence() -> None:
    text = README.read_text()
    assert "no preStop" not in text
    pod = only("Deployment")["spec"]["template"]["spec"]
    sleep = zrproxy_container(only("Deployment"))["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod["terminationGracePeriodSeconds"]
    drain = example_config()["server"]["drain_timeout_s"]
    assert f"`preStop` hook sleeps {sleep} s" in text
    assert f"`terminationGracePeriodSeconds` is {grace}, above {sleep} + {drain}" in text
    assert f"`drain_timeout_s` ({drain} s)" in text
    assert grace > sleep + drain


def test_readme_lists_every_kubernetes_file() -> None:
    text = README.read_text()
    table = set(re.findall(r"^\| `([^`]+)` \|", text, re.MULTILINE))
    on_disk = {p.relative_to(K8S).as_posix() for p in K8S.rglob("*") if p.is_file()}
    assert on_disk - {"hpa.yaml", "pdb.yaml"} <= table, on_disk - table
    assert "`hpa.yaml`, `pdb.yaml`" in text
