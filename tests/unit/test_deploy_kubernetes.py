"""deploy/kubernetes and deploy/compose.yaml: every manifest validated by kubernetes-validate
(its schemas are bundled: no network, no cluster), and the facts that must agree across the
manifests, the profile they carry and the Dockerfile: ports, grace periods, user, Secret keys,
selectors, the Redis address. No Docker engine either: compose.yaml is checked as YAML."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from addons.kernel.units import parse_duration
from addons.schema import validate

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
EXAMPLE = "secret.example.yaml"  # kept out of the kustomization: never apply placeholder tokens
# The oldest Kubernetes still supported upstream when written, and the newest schemas bundled.
VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version() + ".0"]


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                yield path, doc


def find(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def deployment() -> dict[str, Any]:
    return find("Deployment", "waypost")


def container() -> dict[str, Any]:
    (c,) = deployment()["spec"]["template"]["spec"]["containers"]
    return c


def profile_text() -> str:
    return find("ConfigMap", "waypost-profile")["data"]["profile.yaml"]


def profile() -> dict[str, Any]:
    return yaml.safe_load(profile_text())


def dockerfile() -> str:
    return re.sub(r"\\\n", " ", DOCKERFILE.read_text())


def dockerfile_user() -> tuple[int, int]:
    uid, gid = re.search(r"^USER (\d+):(\d+)$", dockerfile(), re.M).groups()
    return int(uid), int(gid)


def dockerfile_confdir() -> str:
    return re.search(r'"confdir=([^"]+)"', dockerfile()).group(1)


def port_number(c: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return number


def workloads() -> Iterator[dict[str, Any]]:
    return (d for _, d in manifests() if d["kind"] in {"Deployment", "StatefulSet"})


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    checked = []
    for path, doc in manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {e.message}")
        checked.append(doc["kind"])
    assert {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler"} <= set(checked)
    assert {"PodDisruptionBudget", "Secret"} <= set(checked)


def test_the_validator_refuses_an_unknown_field() -> None:
    bad = yaml.safe_load(yaml.safe_dump(deployment()))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSecond"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)


def test_the_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml", EXAMPLE}
    assert sorted(kustomization["resources"]) == sorted(files)
    (image,) = kustomization["images"]
    assert image["name"] == container()["image"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", image["newTag"])  # a release, never latest
    for workload in workloads():
        for c in workload["spec"]["template"]["spec"]["containers"]:
            if c["image"] != image["name"]:
                assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", c["image"]), c["image"]


def test_probes_use_the_profiles_proxy_port() -> None:
    c = container()
    port = profile()["server"]["port"]
    for probe, path in [
        ("livenessProbe", "/health/liveness"),
        ("readinessProbe", "/health/readiness"),
        ("startupProbe", "/health/startup"),
    ]:
        get = c[probe]["httpGet"]
        assert get["path"] == path
        assert port_number(c, get["port"]) == port, probe


def test_grace_period_covers_the_prestop_sleep_and_the_drain() -> None:
    spec = deployment()["spec"]["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 5  # long enough for the endpoint to leave kube-proxy and load balancers
    shutdown = parse_duration(profile()["server"]["shutdown_timeout"])
    assert spec["terminationGracePeriodSeconds"] > shutdown + pre_stop


def test_the_configmap_profile_passes_validate_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text(profile_text())
    for env in container()["env"]:
        if "value" in env and env["name"] != "WAYPOST_PROFILE":
            monkeypatch.setenv(env["name"], env["value"])
    assert validate.main([str(path)]) == 0, capsys.readouterr().err


def test_the_configmap_profile_is_prod_with_workers_and_redis() -> None:
    """docs/operations.md says so: a change to profiles/prod.yaml belongs here too."""
    mine = profile()
    assert mine["server"].pop("workers") == 2
    assert mine.pop("state")["backend"] == "redis"
    assert mine == yaml.safe_load((ROOT / "profiles" / "prod.yaml").read_text())


def test_the_profile_is_the_mounted_configmap() -> None:
    c = container()
    env = {e["name"]: e for e in c["env"]}
    mounted = Path(env["WAYPOST_PROFILE"]["value"])
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "profile"]
    # A directory mount (no subPath), so ConfigMap edits reach the pod and are reloaded.
    assert mount["mountPath"] == str(mounted.parent) and "subPath" not in mount
    assert mount["readOnly"] is True
    volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
    assert volumes["profile"]["configMap"]["name"] == "waypost-profile"
    assert mounted.name in find("ConfigMap", "waypost-profile")["data"]


def test_resources_are_sized_for_the_profiles_workers() -> None:
    workers = profile()["server"]["workers"]
    resources = container()["resources"]
    for kind in ("requests", "limits"):
        assert float(resources[kind]["cpu"]) >= workers, kind
        assert resources[kind]["memory"]


def test_the_pods_run_as_the_images_user_and_locked_down() -> None:
    uid, gid = dockerfile_user()
    pod = deployment()["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (uid, gid, gid)
    assert container()["securityContext"]["runAsUser"] == uid
    for workload in workloads():
        spec = workload["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]


def test_the_writable_paths_are_emptydirs() -> None:
    volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    for path in (dockerfile_confdir(), "/tmp"):
        assert "emptyDir" in volumes[mounts[path]], path


def test_the_secret_holds_every_key_the_deployment_reads() -> None:
    secret = yaml.safe_load((KUBERNETES / EXAMPLE).read_text())
    refs = [e["valueFrom"]["secretKeyRef"] for e in container()["env"] if "valueFrom" in e]
    assert {e["name"] for e in container()["env"]} >= {"ADMIN_TOKEN", "CLI_TOKEN"}
    for ref in refs:
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"], ref["key"]
    assert "kubectl create secret generic" in (KUBERNETES / EXAMPLE).read_text()


def test_the_autoscaler_targets_the_deployment_from_its_replicas() -> None:
    hpa = find("HorizontalPodAutoscaler", "waypost")["spec"]
    target = hpa["scaleTargetRef"]
    dep = deployment()
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        dep["apiVersion"],
        dep["kind"],
        dep["metadata"]["name"],
    )
    assert dep["spec"]["replicas"] == hpa["minReplicas"] >= 10
    assert hpa["maxReplicas"] > hpa["minReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_match_the_proxy_pods_and_only_them() -> None:
    pods = deployment()["spec"]["template"]["metadata"]["labels"]
    redis = find("Deployment", "waypost-redis")["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment()["spec"]["selector"]["matchLabels"], pods)
    pdb = find("PodDisruptionBudget", "waypost")["spec"]["selector"]["matchLabels"]
    service = find("Service", "waypost")["spec"]["selector"]
    for selector in (pdb, service):
        assert selects(selector, pods) and not selects(selector, redis)
    for spread in deployment()["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert (
            spread["labelSelector"]["matchLabels"]
            == deployment()["spec"]["selector"]["matchLabels"]
        )
    policy = find("NetworkPolicy", "waypost-redis")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], redis)
    (allowed,) = policy["ingress"][0]["from"]
    assert selects(allowed["podSelector"]["matchLabels"], pods)


def test_the_service_and_the_scrape_annotations_use_the_profiles_ports() -> None:
    c = container()
    p = profile()
    ports = {sp["name"]: sp for sp in find("Service", "waypost")["spec"]["ports"]}
    assert port_number(c, ports["proxy"]["targetPort"]) == p["server"]["port"]
    assert port_number(c, ports["metrics"]["targetPort"]) == p["metrics"]["port"]
    assert p["metrics"]["host"] == "0.0.0.0"  # reachable by Prometheus from outside the pod
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(p["metrics"]["port"])
    assert annotations["prometheus.io/path"] == p["metrics"]["path"]


def test_the_profiles_redis_is_the_redis_service() -> None:
    state = profile()["state"]
    assert state["backend"] == "redis"
    url = urlsplit(state["redis_url"])
    service = find("Service", url.hostname)
    (port,) = service["spec"]["ports"]
    assert port["port"] == url.port
    (redis,) = find("Deployment", "waypost-redis")["spec"]["template"]["spec"]["containers"]
    assert port_number(redis, port["targetPort"]) == url.port


# --- compose.yaml ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_profile() -> tuple[Path, dict[str, str]]:
    """The profile file mounted into the waypost service, and the service's environment."""
    service = compose()["services"]["waypost"]
    env = service["environment"]
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if target == env["WAYPOST_PROFILE"]:
            return (COMPOSE.parent / source).resolve(), env
    raise AssertionError("no volume mounts the file WAYPOST_PROFILE names")


def test_compose_builds_the_image_from_the_repository() -> None:
    build = compose()["services"]["waypost"]["build"]
    assert (COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")).exists()


def test_compose_publishes_the_profiles_ports_without_fixed_host_ports() -> None:
    path, env = compose_profile()
    p = yaml.safe_load(path.read_text())
    published = compose()["services"]["waypost"]["ports"]
    # HOST_IP::CONTAINER: a free host port per instance, so --scale never collides.
    assert all(re.fullmatch(r"127\.0\.0\.1::\d+", port) for port in published), published
    assert sorted(int(port.rsplit(":", 1)[1]) for port in published) == sorted(
        [p["server"]["port"], p["metrics"]["port"]]
    )


def test_compose_stops_after_the_drain() -> None:
    path, _ = compose_profile()
    shutdown = parse_duration(yaml.safe_load(path.read_text())["server"]["shutdown_timeout"])
    assert parse_duration(compose()["services"]["waypost"]["stop_grace_period"]) > shutdown


def test_compose_points_the_state_at_its_redis_service() -> None:
    _, env = compose_profile()
    assert env["WAYPOST_STATE__BACKEND"] == "redis"
    url = urlsplit(env["WAYPOST_STATE__REDIS_URL"])
    redis = compose()["services"][url.hostname]
    assert redis["image"].startswith("redis:") and url.port == 6379
    assert "redis-cli" in shlex.join(redis["healthcheck"]["test"])
    waypost = compose()["services"]["waypost"]
    assert waypost["depends_on"][url.hostname]["condition"] == "service_healthy"


def test_compose_runs_read_only_with_a_writable_confdir_for_the_images_user() -> None:
    service = compose()["services"]["waypost"]
    uid, gid = dockerfile_user()
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    tmpfs = dict(entry.partition(":")[::2] for entry in service["tmpfs"])
    assert "/tmp" in tmpfs
    assert f"uid={uid}" in tmpfs[dockerfile_confdir()]
    assert f"gid={gid}" in tmpfs[dockerfile_confdir()]


def test_the_compose_profile_passes_validate_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, env = compose_profile()
    for name, value in env.items():
        # ${VAR:-} interpolations are empty unless the operator sets them.
        if name != "WAYPOST_PROFILE" and not str(value).startswith("${"):
            monkeypatch.setenv(name, str(value))
    assert validate.main([str(path)]) == 0, capsys.readouterr().err
