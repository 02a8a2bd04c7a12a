"""Metric names referenced by PromQL expressions, so dashboards can be checked against the server's metrics.

Not a PromQL parser: it removes what cannot be a metric name (string literals, label matchers, range and
subquery brackets, grouping label lists, durations, numbers), then takes each remaining identifier that is
not a function call or a keyword. That is exact for the expression shapes dashboards use: selectors,
aggregations with by/without, binary operators with on/ignoring/group_*, and function calls.
"""

from __future__ import annotations

import re

# Words that are PromQL syntax, not metric names, where they appear without a following "(".
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
            "unless", "atan2", "inf", "nan", "start", "end"}

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-zA-Z_$]+")
_IDENT = re.compile(r"(?<![\w$.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_NUMBER = re.compile(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b")


def metric_names(expr: str) -> set[str]:
    """Every metric name the PromQL `expr` selects, e.g. {"mhr_requests_total"} for
    `sum by (adapter) (rate(mhr_requests_total{job="mhr"}[5m]))`. Grafana template variables ($x) in
    label values or ranges are removed with the matchers and ranges that hold them."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub(" ", text)  # "sum by (le) (x)" -> "sum   (x)": sum stays a call
    text = _OFFSET.sub("", text)
    text = _NUMBER.sub("0", text)
    names = set()
    for m in _IDENT.finditer(text):
        name, call = m.group(1), m.group(2)
        if call or name in KEYWORDS:
            continue
        names.add(name)
    return names


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.*?)\s*,\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$")
_GRAFANA_FUNC = re.compile(r"^\s*(label_names|metrics|query_result)\(")


def variable_metric_names(query: str) -> set[str]:
    """Metric names a Grafana Prometheus template-variable query reads: `label_values(<selector>, label)`
    and `query_result(<expr>)` hold PromQL; `label_values(label)` alone reads no metric."""
    m = _LABEL_VALUES.match(query)
    if m:
        return metric_names(m.group(1))
    if query.strip().startswith("label_values("):
        return set()
    if _GRAFANA_FUNC.match(query):
        inner = query.strip()[query.strip().index("(") + 1:-1]
        return metric_names(inner)
    return metric_names(query)
