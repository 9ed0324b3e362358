"""deploy/: the alert rules and the dashboard name only metrics and labels the processes register, every alert has
a test that fires it and one where it stays quiet, and the dashboard shows every series of the service.
(`make lint` runs promtool on the same files: check config, check rules, test rules.)"""
import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import consumers.worker  # noqa: F401  (the four processes: whatever they register)
import producers.relay  # noqa: F401
import producers.ttl  # noqa: F401
import service.read.api  # noqa: F401
from service.infra import metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS, GRAFANA = ROOT / "deploy" / "prometheus", ROOT / "deploy" / "grafana"
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus to every series it scrapes
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
             "inf", "nan"}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def registered() -> dict[str, set[str]]:
    """Every sample name the processes can expose (histograms with their suffixes), with its label names."""
    labels = {m._name: set(m._labelnames) for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    names: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = labels.get(family.name, set()) | ({"le"} if suffix == "_bucket" else set())
    return names


def selectors(expr: str) -> tuple[set[str], set[str]]:
    """The metric names a PromQL expression reads, and every label name it matches or groups by."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, never names
    used = {m.group(1) for m in re.finditer(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", "".join(re.findall(r"\{[^}]*\}", expr)))}
    used |= {label.strip() for group in _GROUPING.findall(expr) for label in group.split(",") if label.strip()}
    expr = _GROUPING.sub(" ", re.sub(r"\[[^\]]*\]", " ", re.sub(r"\{[^}]*\}", " ", expr)))
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        if not expr[m.end():].lstrip().startswith("(") and m.group().lower() not in _KEYWORDS:  # not a function
            names.add(m.group())
    return names, used


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "segmentation.json").read_text())


def panel_exprs() -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard()["panels"] if p["type"] != "row"}


def _check(where: str, expr: str, known: dict[str, set[str]]) -> list[str]:
    names, labels = selectors(expr)
    problems = [f"{where}: {name} is not a metric of the service" for name in sorted(names - known.keys() - PROMETHEUS_OWN)]
    allowed = set().union(SCRAPE_LABELS, *(known.get(name, set()) for name in names))
    return problems + [f"{where}: no metric it reads has the label {label}" for label in sorted(labels - allowed)]


def test_the_promql_reader_finds_metrics_and_labels_and_skips_functions_and_keywords():
    names, labels = selectors('histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{route!~".*[.]csv"}[5m]))) '
                              '> 1 and on (job) b offset 5m or vector(1e3) unless absent(up{job="x"} == 1)')
    assert names == {"a_bucket", "b", "up"}
    assert labels == {"le", "route", "job"}


def test_every_metric_and_label_an_alert_names_is_registered_by_a_process():
    known = registered()
    assert "segmentation_http_request_seconds_bucket" in known and "segmentation_commands_total" in known
    problems = [p for rule in alert_rules() for p in _check(rule["alert"], rule["expr"], known)]
    assert problems == []


def test_every_metric_and_label_a_dashboard_panel_names_is_registered_by_a_process():
    known = registered()
    problems = [p for title, exprs in panel_exprs().items() for expr in exprs for p in _check(title, expr, known)]
    assert problems == []


def test_the_checks_catch_a_misspelt_metric_or_label():
    known = registered()
    assert _check("x", 'sum by (statu) (rate(segmentation_http_requests_total{rout="/"}[5m]))', known) == [
        "x: no metric it reads has the label rout", "x: no metric it reads has the label statu"]
    assert _check("x", "segmentation_consumer_lags > 0", known) == ["x: segmentation_consumer_lags is not a metric of "
                                                                    "the service"]


def test_the_dashboard_shows_every_series_of_the_service_and_every_alerts_series():
    shown = {name for exprs in panel_exprs().values() for expr in exprs for name in selectors(expr)[0]}
    families = {name for m in vars(metrics).values() if isinstance(m, MetricWrapperBase) for name in [m._name]}
    missing = {f for f in families if not any(s == f or s.startswith(f + "_") for s in shown)}
    assert missing == set()
    alerted = {name for rule in alert_rules() for name in selectors(rule["expr"])[0]}
    assert alerted <= shown


def test_every_alert_has_a_test_that_fires_it_and_one_where_it_stays_quiet():
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fired, quiet = set(), set()
    for test in tests["tests"]:
        for case in test["alert_rule_test"]:
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert (alerts - fired, alerts - quiet) == (set(), set())


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_has_a_severity_and_a_summary_and_an_operations_entry(rule):
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert rule["annotations"]["summary"]
    assert f"`{rule['alert']}`" in (ROOT / "README.md").read_text()


def test_the_dashboard_reads_the_provisioned_datasource():
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in provisioned["datasources"]}
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    assert panels and {p["datasource"]["uid"] for p in panels} == uids
    assert {t["datasource"]["uid"] for p in panels for t in p["targets"]} == uids
    assert len({p["id"] for p in dashboard()["panels"]}) == len(dashboard()["panels"])
