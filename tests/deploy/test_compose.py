"""deploy/docker/compose.yaml and the Prometheus config it mounts, parsed and cross-checked (no daemon)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.deploy.dockerfile import parse

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def split_volume(volume: str) -> tuple[str, str, str]:
    """(source, target, mode) of a short-syntax volume; the source may be `${VAR:-default}`."""
    if volume.startswith("${"):
        end = volume.index("}") + 1
        source, rest = volume[:end], volume[end + 1:].split(":")
    else:
        source, *rest = volume.split(":")
    return source, rest[0], rest[1] if len(rest) > 1 else "rw"


def host_path(volume: str) -> str:
    """The host side of a volume, with `${VAR:-default}` read as its default."""
    source = split_volume(volume)[0]
    if source.startswith("${") and ":-" in source:
        source = source[source.index(":-") + 2:-1]
    return source


def target(volume: str) -> str:
    return split_volume(volume)[1]


def test_services(compose):
    assert set(compose["services"]) == {"mhr", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        assert "image" in service, f"{name}: pin the image (and tag) it runs"
        assert not service["image"].endswith(":latest") and ":" in service["image"], name


def test_server_service(compose):
    mhr = compose["services"]["mhr"]
    build = mhr["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == ROOT, "the images build from the repository root (see .dockerignore)"
    dockerfile = context / build["dockerfile"]
    assert dockerfile.exists()
    modes = {target(v): split_volume(v)[2] for v in mhr["volumes"]}
    assert modes.get("/models") == "ro", "the backbone is mounted read-only"
    assert modes.get("/bundles") == "rw", "hot deploys write into the bundle store"
    assert "8000:8000" in mhr["ports"]
    # Docker sends SIGKILL after stop_grace_period; the server needs its drain time before that.
    drain = float(mhr["environment"]["MHR_DRAIN_SECONDS"])
    assert float(mhr["stop_grace_period"].removesuffix("s")) > drain
    test = mhr["healthcheck"]["test"]
    assert test[0] == "CMD" and "/ready" in " ".join(test)
    image_check = [i for i in parse(dockerfile) if i.keyword == "HEALTHCHECK"][0].exec_form()
    assert test[1] == image_check[0], "compose and image run the same kind of check"


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, raw = host_path(volume), split_volume(volume)[0]
            if raw.startswith("${"):
                continue   # a host directory the user chooses (models, bundles)
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_prometheus_scrapes_the_server(compose):
    mounted = {target(v): host_path(v) for v in compose["services"]["prometheus"]["volumes"]}
    config = yaml.safe_load((DOCKER / mounted["/etc/prometheus/prometheus.yml"]).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["mhr"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    container_port = compose["services"]["mhr"]["ports"][0].split(":")[-1]
    assert targets == [f"mhr:{container_port}"], "the target is the compose service on its container port"


def test_grafana_mounts_provisioning(compose):
    grafana = compose["services"]["grafana"]
    mounted = {target(v): DOCKER / host_path(v) for v in grafana["volumes"] if host_path(v).startswith(".")}
    provisioning = mounted["/etc/grafana/provisioning"]
    assert (provisioning / "datasources").is_dir() and (provisioning / "dashboards").is_dir()
    assert (mounted["/var/lib/grafana/dashboards"] / "mhr.json").exists()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith("/var/lib/grafana/dashboards/")
    assert (mounted["/var/lib/grafana/dashboards"] / Path(home).name).exists()
