"""Every PromQL query the deployment depends on, and the metrics (and labels) it names.

Sources: the Grafana dashboard (panel targets and template variables), the alerting rules,
and the autoscalers in the rendered manifests (KEDA ScaledObject triggers, the
InferenceService's autoScaling metrics, HorizontalPodAutoscaler custom metrics, the
prometheus-adapter rule). Each query is parsed by a real PromQL parser
(``promql-parser``), so a syntax error fails, and the names come from the syntax tree.

``missing_metrics`` compares them with the text a service's ``/metrics`` returns:
a metric name counts when the exposition declares it (``# TYPE``) or has samples of it,
with the sample suffixes of its type (``_bucket``/``_count``/``_sum`` of a histogram,
``_count``/``_sum`` of a summary, ``_total``/``_created`` of a counter) and no others: a
gauge named ``x`` does not make ``x_count`` valid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "observability" / "grafana-dashboard.json"
RULES = REPO / "deploy" / "observability" / "prometheus-rules.yaml"
ADAPTER_VALUES = REPO / "deploy" / "k8s" / "components" / "hpa" / "prometheus-adapter-values.yaml"
# Labels Prometheus attaches to every series of a Kubernetes scrape target (discovery
# and the operator's relabelling), not the service: never on /metrics.
TARGET_LABELS = frozenset(
    {"namespace", "pod", "container", "service", "endpoint", "job", "instance", "node"}
)
# Grafana's interval variables are not PromQL; any duration parses the same way.
GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b")
LABEL_VALUES = re.compile(r"^label_values\(\s*(?P<query>.+?)\s*,\s*\w+\s*\)$")
SUFFIXES = {
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}


@dataclass(frozen=True)
class Query:
    source: str  # where it is, for the failure message
    expr: str  # PromQL (Grafana variables already replaced)


@dataclass(frozen=True)
class Problem:
    source: str
    what: str

    def __str__(self) -> str:
        return f"{self.source}: {self.what}"


# ------------------------------------------------------------------ where queries live


def dashboard_queries(path: Path = DASHBOARD) -> list[Query]:
    dashboard = json.loads(path.read_text())
    found = []

    def panels(items: list[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                where = f"{path.name}: panel {panel.get('title')!r} {target.get('refId')}"
                found.append(Query(where, GRAFANA_INTERVALS.sub("5m", target["expr"])))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = LABEL_VALUES.match(query.strip())
        expr = match["query"] if match else query
        found.append(Query(f"{path.name}: variable ${var['name']}", expr))
    return found


def rule_queries(path: Path = RULES) -> list[Query]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [
        Query(f"{path.name}: {rule.get('alert') or rule.get('record')}", str(rule["expr"]))
        for group in groups
        for rule in group["rules"]
    ]


def adapter_queries(path: Path = ADAPTER_VALUES) -> list[Query]:
    """prometheus-adapter rules: the series query, and the metrics query template."""
    found = []
    for rule in yaml.safe_load(path.read_text())["rules"]["custom"]:
        series = promql_parser.parse(rule["seriesQuery"])
        found.append(Query(f"{path.name}: seriesQuery", rule["seriesQuery"]))
        template = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series.name)
            .replace("<<.LabelMatchers>>", 'namespace="seednet"')
            .replace("<<.GroupBy>>", "pod")
        )
        found.append(Query(f"{path.name}: metricsQuery", template))
    return found


def manifest_queries(objects: Iterable[dict], where: str) -> list[Query]:
    """The autoscalers' queries and metric names in rendered objects."""
    found = []
    for obj in objects:
        name = f"{where}: {obj['kind']}/{obj['metadata']['name']}"
        spec = obj.get("spec") or {}
        if obj["kind"] == "ScaledObject":
            for i, trigger in enumerate(spec.get("triggers", [])):
                if trigger["type"] == "prometheus":
                    found.append(Query(f"{name} trigger {i}", trigger["metadata"]["query"]))
        elif obj["kind"] == "InferenceService":
            metrics = spec.get("predictor", {}).get("autoScaling", {}).get("metrics", [])
            for i, metric in enumerate(metrics):
                external = metric.get("external", {}).get("metric", {})
                if external.get("backend") == "prometheus":
                    found.append(Query(f"{name} autoScaling metric {i}", external["query"]))
        elif obj["kind"] == "HorizontalPodAutoscaler":
            for i, metric in enumerate(spec.get("metrics", [])):
                source = metric.get("pods") or metric.get("object") or metric.get("external")
                if source is not None:  # a metric name, served by an adapter
                    found.append(Query(f"{name} metric {i}", source["metric"]["name"]))
    return found


# ------------------------------------------------------------------ what a query names


@dataclass(frozen=True)
class Selector:
    metric: str
    labels: frozenset[str]  # label names its matchers use
    matchers: tuple[tuple[str, str, str], ...]  # (label, "=" | "=~", value), positive only


@dataclass(frozen=True)
class Grouping:
    labels: frozenset[str]  # by (...) labels of an aggregation
    metrics: frozenset[str]  # the metrics it aggregates


def parse(query: Query) -> promql_parser.Expr:
    try:
        return promql_parser.parse(query.expr)
    except ValueError as e:
        raise ValueError(f"{query.source}: not valid PromQL: {e}\n  {query.expr}") from None


def selectors_and_groupings(expr: promql_parser.Expr) -> tuple[list[Selector], list[Grouping]]:
    selectors: list[Selector] = []
    groupings: list[Grouping] = []

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = node.matchers.matchers
            names = [m.value for m in matchers if m.name == "__name__"]
            metric = node.name or (names[0] if names else None)
            if metric is None:
                raise ValueError(f"a selector without a metric name: {node}")
            labels = frozenset(m.name for m in matchers if m.name != "__name__")
            positive = tuple(
                (m.name, "=" if m.op == promql_parser.MatchOp.Equal else "=~", m.value)
                for m in matchers
                if m.name != "__name__"
                and m.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.Re)
            )
            selectors.append(Selector(metric, labels, positive))
        elif (
            isinstance(node, promql_parser.AggregateExpr)
            and node.modifier is not None
            and node.modifier.type == promql_parser.AggModifierType.By
        ):
            inner: list[str] = []
            promql_parser.walk(
                node.expr,
                pre_visit=lambda n: (
                    inner.append(n.name)
                    if isinstance(n, promql_parser.VectorSelector) and n.name
                    else None
                ),
            )
            groupings.append(Grouping(frozenset(node.modifier.labels), frozenset(inner)))

    promql_parser.walk(expr, pre_visit=visit)
    return selectors, groupings


# ------------------------------------------------------------------ what /metrics has


@dataclass(frozen=True)
class Exposition:
    names: frozenset[str]  # every sample name the exposition allows
    labels: dict[str, frozenset[str]]  # sample name -> label names seen on its samples
    families: dict[str, str]  # sample name -> "family (type)", for messages
    values: dict[tuple[str, str], frozenset[str]]  # (sample name, label) -> values seen


def read_exposition(text: str) -> Exposition:
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    families: dict[str, str] = {}
    values: dict[tuple[str, str], set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
            families[family.name + suffix] = f"{family.name} ({family.type})"
        for sample in family.samples:
            names.add(sample.name)
            families.setdefault(sample.name, f"{family.name} ({family.type})")
            labels.setdefault(sample.name, set()).update(sample.labels)
            for label, value in sample.labels.items():
                values.setdefault((sample.name, label), set()).add(value)
    return Exposition(
        frozenset(names),
        {k: frozenset(v) for k, v in labels.items()},
        families,
        {k: frozenset(v) for k, v in values.items()},
    )


def missing_metrics(queries: Iterable[Query], exposition: Exposition) -> list[Problem]:
    """Each metric a query names that /metrics lacks, and each label it uses that no
    sample of that metric carries (target labels aside)."""
    problems = []
    for query in queries:
        selectors, groupings = selectors_and_groupings(parse(query))
        for sel in selectors:
            if sel.metric not in exposition.names:
                problems.append(Problem(query.source, f"metric {sel.metric} is not on /metrics"))
                continue
            seen = exposition.labels.get(sel.metric, frozenset())
            for label in sorted(sel.labels - TARGET_LABELS - seen):
                problems.append(
                    Problem(query.source, f"{sel.metric} has no label {label!r} on /metrics")
                )
        for group in groupings:
            known = set(TARGET_LABELS)
            for metric in group.metrics:
                known |= exposition.labels.get(metric, frozenset())
            for label in sorted(group.labels - known):
                problems.append(
                    Problem(
                        query.source,
                        f"groups by {label!r}, a label none of {sorted(group.metrics)} has",
                    )
                )
    return problems


def unmatched_values(
    queries: Iterable[Query], exposition: Exposition, labels: Iterable[str]
) -> list[Problem]:
    """Each ``label="v"`` / ``label=~"re"`` matcher (for the given labels, whose values
    the exposition is known to hold in full) that matches none of the values seen.
    Prometheus anchors regular expressions: a match is a full match."""
    checked = set(labels)
    problems = []
    for query in queries:
        selectors, _ = selectors_and_groupings(parse(query))
        for sel in selectors:
            for label, op, value in sel.matchers:
                seen = exposition.values.get((sel.metric, label))
                if label not in checked or not seen:
                    continue
                pattern = re.compile(re.escape(value) if op == "=" else value)
                if not any(pattern.fullmatch(v) for v in seen):
                    problems.append(
                        Problem(
                            query.source,
                            f"{label}{op}{json.dumps(value)} matches no value of "
                            f"{sel.metric}'s {label} on /metrics",
                        )
                    )
    return problems


def metric_names(queries: Iterable[Query]) -> set[str]:
    names = set()
    for query in queries:
        selectors, _ = selectors_and_groupings(parse(query))
        names |= {s.metric for s in selectors}
    return names
