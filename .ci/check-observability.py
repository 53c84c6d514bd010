#!/usr/bin/env python3
"""Checks deploy/observability/ against the relay's sources and docs.

- The Grafana dashboard is valid JSON, takes its datasource from the ${DS_PROMETHEUS} input,
  and every query parses as PromQL (promtool) and names only metrics the relay exports
  (the metrics::counter!/gauge!/histogram! calls in src/).
- Every alert in alerts.yml names only those metrics (and Prometheus's own `up`), has a
  runbook_url whose anchor is a heading of docs/operations.md, and has a promtool test case
  where it fires and one where it must not.

Usage: python3 .ci/check-observability.py  (from anywhere; needs promtool and PyYAML)
"""

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
OBS = ROOT / "deploy" / "observability"
RUNBOOKS = "docs/operations.md"

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2",
}

errors = []


def fail(message):
    errors.append(message)


def exported_metrics():
    """Series names the relay can export: counters and gauges as named, histograms with
    their _bucket, _sum and _count series."""
    call = re.compile(r'metrics::(counter|gauge|histogram)!\(\s*"([A-Za-z_:][A-Za-z0-9_:]*)"')
    names = set()
    for path in sorted((ROOT / "src").rglob("*.rs")):
        for kind, name in call.findall(path.read_text()):
            if kind == "histogram":
                names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
            else:
                names.add(name)
    if not names:
        fail("found no metrics::counter!/gauge!/histogram! calls in src/")
    return names


def metric_names(expr):
    """The metric names a PromQL expression selects (a small scanner, not a parser: enough
    for the expressions in this folder, whose syntax promtool checks separately)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"\$?[A-Za-z_:][A-Za-z0-9_:]*|\d[\w.]*", text):
        token = match.group(0)
        if token[0].isdigit() or token.startswith("$"):
            continue
        followed_by_call = re.match(r"\s*\(", text[match.end():]) is not None
        if followed_by_call or token in AGGREGATIONS or token in KEYWORDS:
            continue
        names.add(token)
    return names


def github_anchors(markdown):
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors = set()
    in_fence = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        if in_fence or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        anchors.add(slug)
    return anchors


def check_dashboard(exported):
    path = OBS / "grafana-dashboard.json"
    try:
        dashboard = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        fail(f"{path.name}: not valid JSON: {e}")
        return []
    inputs = [i.get("name") for i in dashboard.get("__inputs", [])]
    if "DS_PROMETHEUS" not in inputs:
        fail(f"{path.name}: no DS_PROMETHEUS in __inputs")
    queries = []
    panels = [p for p in dashboard.get("panels", []) if p.get("type") != "row"]
    if not panels:
        fail(f"{path.name}: no panels")
    for panel in panels:
        title = panel.get("title", "?")
        if panel.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            fail(f"{path.name}: panel {title!r} does not use the ${{DS_PROMETHEUS}} datasource")
        targets = panel.get("targets", [])
        if not targets:
            fail(f"{path.name}: panel {title!r} has no query")
        for target in targets:
            expr = target.get("expr", "")
            queries.append((f"panel {title!r}", expr))
            names = metric_names(expr)
            if not names:
                fail(f"{path.name}: panel {title!r} queries no metric: {expr}")
            for name in sorted(names - exported):
                fail(f"{path.name}: panel {title!r} names {name}, which the relay does not export")
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query", {})
        query = query.get("query", "") if isinstance(query, dict) else query
        for name in re.findall(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", query):
            if name not in exported:
                fail(f"{path.name}: variable {variable.get('name')} reads {name}, which the relay does not export")
    return queries


def check_alerts(exported):
    rules = yaml.safe_load((OBS / "alerts.yml").read_text())
    tests = yaml.safe_load((OBS / "alerts.test.yml").read_text())
    anchors = github_anchors((ROOT / RUNBOOKS).read_text())
    fires, quiet = set(), set()
    for test in tests.get("tests", []):
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    if not alerts:
        fail("alerts.yml: no alerts")
    for rule in alerts:
        name = rule["alert"]
        for metric in sorted(metric_names(rule["expr"]) - exported - {"up"}):
            fail(f"alerts.yml: {name} names {metric}, which the relay does not export")
        runbook = rule.get("annotations", {}).get("runbook_url", "")
        page, _, anchor = runbook.partition("#")
        if not page.endswith(RUNBOOKS) or anchor not in anchors:
            fail(f"alerts.yml: {name}'s runbook_url {runbook!r} is no heading of {RUNBOOKS}")
        if name not in fires:
            fail(f"alerts.test.yml: no case where {name} fires")
        if name not in quiet:
            fail(f"alerts.test.yml: no case where {name} must not fire")


def check_promql(queries):
    """promtool parses each dashboard query, as the expression of a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        fail("promtool not found (apt-get install prometheus)")
        return
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (_, expr) in enumerate(queries)
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as file:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, file)
        file.flush()
        result = subprocess.run([promtool, "check", "rules", file.name], capture_output=True, text=True)
    if result.returncode != 0:
        fail("grafana-dashboard.json: a query does not parse:\n" + result.stdout + result.stderr)


def main():
    exported = exported_metrics()
    queries = check_dashboard(exported)
    check_promql(queries)
    check_alerts(exported)
    for message in errors:
        print(f"check-observability: {message}", file=sys.stderr)
    if errors:
        return 1
    print(f"check-observability: ok ({len(queries)} dashboard queries, metrics from src: {len(exported)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
