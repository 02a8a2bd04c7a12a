"""The Grafana dashboard and its provisioning: the JSON loads, and it queries only metrics the server exports.

Compared against the registry `server.http.metrics.ServerMetrics` builds (its exposition), not against a live
server's /metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.deploy.exported import exported_sample_names, server_metric_names
from tests.deploy.promql import metric_names, variable_metric_names

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mhr.json"


def panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target."""
    return [(f"panel {p['title']!r} target {t.get('refId')}", t["expr"])
            for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return server_metric_names()


@pytest.mark.parametrize("expr, names", [
    ('sum by (adapter) (rate(mhr_requests_total{instance=~"$instance"}[$__rate_interval]))',
     {"mhr_requests_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(mhr_queue_seconds_bucket[5m])))", {"mhr_queue_seconds_bucket"}),
    ("sum(rate(a_total[1m])) / on (instance) group_left (job) sum(b) offset 5m > bool 0.5", {"a_total", "b"}),
    ('up{job="by"} unless count without (pod) (x:recorded:rate5m) and 1e3', {"up", "x:recorded:rate5m"}),
    ("max_over_time(mhr_waiting_requests[10m:1m])", {"mhr_waiting_requests"}),
])
def test_metric_names_helper(expr, names):
    assert metric_names(expr) == names


def test_variable_query_helper():
    assert variable_metric_names("label_values(mhr_tasks, instance)") == {"mhr_tasks"}
    assert variable_metric_names("label_values(instance)") == set()
    assert variable_metric_names("query_result(topk(5, mhr_requests_total))") == {"mhr_requests_total"}


def test_exported_names_cover_empty_families():
    text = ("# HELP a_total A.\n# TYPE a_total counter\n"
            "# HELP h H.\n# TYPE h histogram\n"
            "# HELP g G.\n# TYPE g gauge\ng 1.0\n")
    assert exported_sample_names(text) == {"a_total", "h_bucket", "h_count", "h_sum", "g"}


def test_dashboard_loads(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dashboard):
        assert set(p["gridPos"]) == {"x", "y", "w", "h"}
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]


def test_dashboard_queries_only_exported_metrics(dashboard, exported):
    assert exported, "the server registry exported nothing"
    unknown = {}
    for where, expr in expressions(dashboard):
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        if names - exported:
            unknown[where] = sorted(names - exported)
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else (query or "")
        missing = variable_metric_names(query) - exported if var.get("type") == "query" else set()
        if missing:
            unknown[f"variable {var['name']}"] = sorted(missing)
    assert not unknown, f"metrics the server does not export: {unknown}"


def test_dashboard_covers_the_monitoring_topics(dashboard):
    """The panels the deployment guide promises: per-task traffic, latency histograms, cache, engine."""
    used = set().union(*(metric_names(e) for _, e in expressions(dashboard)))
    for name in ("mhr_requests_total", "mhr_generated_tokens_total", "mhr_queue_seconds_bucket",
                 "mhr_time_to_first_token_seconds_bucket", "mhr_time_per_output_token_seconds_bucket",
                 "mhr_request_seconds_bucket",
                 "mhr_adapter_cache_hits_total", "mhr_adapter_cache_misses_total",
                 "mhr_materialize_seconds_total", "mhr_running_requests", "mhr_waiting_requests",
                 "mhr_adapter_slots_in_use"):
        assert name in used, f"no panel shows {name}"
    per_task = [e for _, e in expressions(dashboard) if "by (adapter)" in e]
    assert per_task, "no per-task (adapter label) panel"


def test_datasource_uid_matches_dashboard(dashboard):
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {s["uid"] for s in sources["datasources"]}
    for p in panels(dashboard):
        if "datasource" in p:
            assert p["datasource"]["uid"] in uids, p["title"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "mhr.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
