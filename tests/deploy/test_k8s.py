"""deploy/k8s: every manifest validates offline against the Kubernetes API schemas, and the pieces agree.

Schemas come from the `kubernetes-validate` package (shipped with it, no network), in strict mode: an
unknown or misspelt field fails. Kustomizations are rendered with `kubectl kustomize` where kubectl
exists, so overlays are checked as they would be applied; without kubectl the plain resources are read
directly and the overlay checks skip. The ServiceMonitor is a CRD of the Prometheus Operator, which has
no schema among the Kubernetes ones: its structure is checked here instead.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from tests.deploy.exported import server_metric_names

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The Kubernetes release whose schemas the manifests must meet. autoscaling/v2, the HPA behavior field
# and fsGroupChangePolicy are all older than this; a cluster this old or newer accepts them.
K8S_VERSION = "1.32"
KUSTOMIZATIONS = ["base", "overlays/gpu", "monitoring", "routing"]
# Kinds from CRDs, which the Kubernetes schemas do not cover; each is checked structurally below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# YAML files under deploy/k8s that are not Kubernetes objects.
NOT_OBJECTS = {"monitoring/prometheus-adapter-values.yaml"}
KUBECTL = shutil.which("kubectl")


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(directory: str) -> dict:
    return load(K8S / directory / "kustomization.yaml")[0]


@cache
def rendered(directory: str) -> tuple[dict, ...]:
    """The objects `kubectl apply -k deploy/k8s/<directory>` would send."""
    if KUBECTL:
        run = subprocess.run([KUBECTL, "kustomize", str(K8S / directory)], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr
        return tuple(d for d in yaml.safe_load_all(run.stdout) if d)
    k = kustomization(directory)
    if k.get("patches") or k.get("images") or any(r.startswith("..") for r in k.get("resources", [])):
        pytest.skip(f"rendering {directory} needs kustomize: install kubectl")
    return tuple(d for r in k["resources"] for d in load(K8S / directory / r))


def find(objects, kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(objects) -> dict:
    return find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomization_lists_its_files(directory):
    """Every YAML in the directory is a resource or patch of its kustomization, and every entry exists."""
    k = kustomization(directory)
    listed = [*k.get("resources", []), *(p["path"] for p in k.get("patches", []) if "path" in p)]
    for entry in listed:
        assert (K8S / directory / entry).exists(), f"{directory}: {entry} does not exist"
    local = {p.name for p in (K8S / directory).glob("*.yaml")} - {"kustomization.yaml"}
    local -= {Path(n).name for n in NOT_OBJECTS if n.startswith(directory + "/")}
    assert local == {e for e in listed if "/" not in e}, f"{directory}: files and kustomization differ"


def test_schemas_of_the_chosen_release_are_shipped():
    # validate() silently falls back to the newest older release it has; insist on the one named.
    assert any(v.startswith(K8S_VERSION + ".") for v in kubernetes_validate.utils.all_versions())


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_manifests_validate(directory):
    for obj in rendered(directory):
        kind = (obj["apiVersion"], obj["kind"])
        if kind in CRD_KINDS:
            continue   # no Kubernetes schema; see test_service_monitor
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{directory}: {obj['kind']}/{obj['metadata']['name']}: {e.message} at "
                        f"{'.'.join(str(p) for p in e.absolute_path)}")


def test_every_file_is_validated():
    """No manifest escapes validation: each YAML sits in a kustomization directory checked above, and the
    plain objects (not the overlay's partial patch) also validate as files, as `kubectl apply -f` sends them."""
    covered = {str(p.relative_to(K8S)) for d in KUSTOMIZATIONS for p in (K8S / d).glob("*.yaml")}
    every = {str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml")}
    assert every - covered == set(), "a YAML outside the kustomizations this test renders"
    plain = every - NOT_OBJECTS - {f"{d}/kustomization.yaml" for d in KUSTOMIZATIONS}
    for name in sorted(n for n in plain if not n.startswith("overlays/")):
        for obj in load(K8S / name):
            if (obj["apiVersion"], obj["kind"]) not in CRD_KINDS:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_deployment_shutdown_and_probes():
    objects = rendered("base")
    deployment = find(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(objects)
    settings = env(c)
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    # The kubelet SIGKILLs after the grace period, counted from the start of preStop.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(settings["MHR_DRAIN_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in port
    assert port["http"] == int(settings["MHR_PORT"])
    assert settings["MHR_HOST"] == "0.0.0.0"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == settings["MHR_PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_volumes_are_shared_claims():
    objects = rendered("base")
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: m for m in container(objects)["volumeMounts"]}
    settings = env(container(objects))
    for path, setting in (("/bundles", "MHR_BUNDLE"), ("/models", "MHR_MODEL")):
        mount = mounts[path]
        assert settings[setting].startswith(path + "/")
        pvc = find(objects, "PersistentVolumeClaim", claims[mount["name"]])
        # Every replica mounts the same claim, on whatever node it runs.
        assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert mounts["/models"].get("readOnly") is True
    assert not mounts["/bundles"].get("readOnly"), "hot deploys write into the bundle store"


def test_service_selects_the_pods():
    objects = rendered("base")
    service = find(objects, "Service")
    labels = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    names = {p["name"] for p in container(objects)["ports"]}
    assert all(p["targetPort"] in names for p in service["spec"]["ports"])


def test_hpa_scales_on_queue_depth():
    objects = rendered("base")
    hpa = find(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", find(objects, "Deployment")["metadata"]["name"])
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == "mhr_waiting_requests"
    assert metric in server_metric_names(), "the HPA's metric must be one the server exports"
    # The Prometheus adapter rule that serves it under the same name.
    values = load(K8S / "monitoring" / "prometheus-adapter-values.yaml")[0]
    rules = values["rules"]["custom"]
    assert any(r["name"]["as"] == metric and metric in r["seriesQuery"] for r in rules)
    for rule in rules:
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_gpu_overlay():
    objects = rendered("overlays/gpu")
    c = container(objects)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env(c)["MHR_DEVICE"] == "cuda"
    assert c["image"].endswith("-cuda")
    base = container(rendered("base"))
    assert "nvidia.com/gpu" not in base["resources"].get("limits", {}), "CPU is the default"
    assert env(base)["MHR_DEVICE"] == "cpu"
    # The patch changes settings; it must not drop the ones it does not name.
    assert set(env(base)) <= set(env(c))


def test_service_monitor():
    monitor = find(rendered("monitoring"), "ServiceMonitor")
    service = find(rendered("base"), "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"


def test_task_affine_ingress():
    ingress = find(rendered("routing"), "Ingress")
    service = find(rendered("base"), "Service")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_mhr_task"
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
            assert not path["path"].startswith("/admin"), "admin routes stay inside the cluster"
