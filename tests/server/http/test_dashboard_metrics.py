"""The Grafana dashboard queries only metrics that a real running server exports on /metrics."""

from __future__ import annotations

import json

from server.http.app import create_app
from tests.deploy.exported import exported_sample_names
from tests.deploy.promql import metric_names
from tests.deploy.test_grafana import DASHBOARD, expressions
from tests.server import loopback as http
from tests.server.conftest import ROUTED
from tests.server.loopback import serve_app


def test_every_dashboard_metric_is_on_the_live_metrics_page(make_engine):
    with serve_app(create_app(make_engine())) as url:
        http.post(f"{url}/v1/completions", json={"model": ROUTED[0], "prompt": "hello", "max_tokens": 2})
        scraped = exported_sample_names(http.get(f"{url}/metrics").text)
    used = set().union(*(metric_names(expr) for _, expr in expressions(json.loads(DASHBOARD.read_text()))))
    assert used and not used - scraped, f"on the dashboard but not on /metrics: {sorted(used - scraped)}"
