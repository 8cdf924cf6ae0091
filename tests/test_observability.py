"""The alert rules and the dashboard only use metrics a running agent serves, and promtool accepts the rules.

``promtool`` must exist (``make test`` installs Debian's ``prometheus`` package, which ships it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import Daemon, local_driver, poll, write_config, write_files

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "docs" / "grafana" / "bucketsync.json"
OPERATIONS = ROOT / "docs" / "operations.md"
#: Prometheus' own series about a scrape target, not the agent's.
PROMETHEUS_SERIES = {"up"}
METRIC = re.compile(r"\b((?:bucketsync|process)_[a-z0-9_]+)\b")
#: What the issue asks the rules to cover, by the alert that covers it.
REQUIRED_ALERTS = {
    "BucketsyncRunsFailing",
    "BucketsyncNoRecentSuccess",
    "BucketsyncGuardAborted",
    "BucketsyncOutboxBacklogGrowing",
    "BucketsyncDownstreamOpFailed",
    "BucketsyncDatasetNotReady",
    "BucketsyncRestarted",
}


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def _used_metrics(expr: str) -> set[str]:
    return set(METRIC.findall(expr)) | {w for w in PROMETHEUS_SERIES if re.search(rf"\b{w}\{{", expr)}


@pytest.fixture(scope="module")
def served_metrics(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every series name a running agent's /metrics can serve (from its TYPE lines), after one run."""
    tmp = tmp_path_factory.mktemp("metrics")
    write_files(tmp / "data", {"a.txt": "a"})
    cfg = write_config(tmp, {"local": local_driver(tmp / "data")}, {"photos": {"driver": "local"}})
    with Daemon(cfg) as daemon:
        poll(lambda: daemon.api("GET", "/datasets/photos/runs").body["runs"], what="a run")
        text = daemon.get("/metrics").text
        assert daemon.stop() == 0
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
    return names


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors, plus explicit <a id="...">."""
    out = set(re.findall(r'<a id="([^"]+)"', markdown))
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_every_alert_has_summary_description_runbook_and_known_metrics(served_metrics: set[str]) -> None:
    rules = _rules()
    assert {r["alert"] for r in rules} >= REQUIRED_ALERTS
    anchors = _anchors(OPERATIONS.read_text())
    for rule in rules:
        ann = rule["annotations"]
        assert ann.get("summary") and ann.get("description"), rule["alert"]
        page, _, anchor = ann["runbook_url"].partition("#")
        assert page == "docs/operations.md" and anchor in anchors, (rule["alert"], anchor)
        used = _used_metrics(rule["expr"])
        assert used, f"{rule['alert']} uses no metric"
        unknown = used - served_metrics - PROMETHEUS_SERIES
        assert not unknown, f"{rule['alert']} uses metrics the agent does not serve: {unknown}"


def test_promtool_accepts_the_rules() -> None:
    beside = Path(sys.executable).parent / "promtool"  # where `make test` puts it
    promtool = str(beside) if beside.exists() else shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs it (apt-get install prometheus)"
    proc = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in proc.stdout


def test_every_dashboard_query_uses_served_metrics(served_metrics: set[str]) -> None:
    exprs = _dashboard_exprs()
    assert len(exprs) >= 10
    for expr in exprs:
        used = _used_metrics(expr)
        assert used, f"a query without a metric: {expr}"
        assert not used - served_metrics, f"{expr!r} uses metrics the agent does not serve: {used - served_metrics}"


def test_dashboard_covers_what_the_issue_asks() -> None:
    titles = " ".join(p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"])
    for topic in ("items", "runs", "duration", "changes", "backlog", "probe"):
        assert topic in titles, topic
