"""The metric (sample) names the server exports, read from `server.http.metrics.ServerMetrics.exposition()`.

A scrape has only samples that exist: a labelled counter nobody has incremented yet has no sample. So the
names come from the metric families (type and base name) in the exposition, expanded the way the text
format names their samples, plus every sample actually present.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

# Sample names a family of each type produces in the Prometheus text format (`_created` samples, which
# only some client collectors emit, are taken from the samples present instead).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}


class AnyStats:
    """Stands in for `Engine.stats()`: every attribute is another AnyStats, and each converts to 0.

    `_EngineCollector.collect` reads fields of the stats object (and of its `cache`); answering any field
    keeps this independent of exactly which fields the engine's stats dataclass has, while every metric
    the collector yields still appears in the exposition."""

    def __getattr__(self, name: str) -> AnyStats:
        if name.startswith("__"):
            raise AttributeError(name)
        return AnyStats()

    def __float__(self) -> float:
        return 0.0

    def __int__(self) -> int:
        return 0

    __index__ = __int__


def exported_sample_names(exposition: str) -> set[str]:
    """Sample names a Prometheus text-format `exposition` exports, including those of empty families."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def server_metric_names() -> set[str]:
    """Sample names of a freshly constructed `ServerMetrics` (the server's whole metric registry)."""
    from server.http.metrics import ServerMetrics

    return exported_sample_names(ServerMetrics(AnyStats).exposition().decode())
