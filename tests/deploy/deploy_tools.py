"""Helpers of the deployment tests, which check deployment files with the real tools: HAProxy,
kubectl kustomize, kubernetes-validate, promtool. A tool that is missing skips its tests, or
fails them when CI is set."""

import os
import re
import shutil
import sys
from pathlib import Path


from missing import unavailable

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def tool(name: str, install_hint: str) -> str:
    """The path of a command, looked for in the venv first (kubectl comes as a wheel)."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if found is None:
        unavailable(f"{name} not found: {install_hint}")
    return found


SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                   "summary": ("", "_sum", "_count")}


def exposed_metric_names() -> set[str]:
    """Every sample name a gateway's /metrics can hold, as Prometheus stores them."""
    from server.metrics import Metrics
    metrics = Metrics()
    metrics.add_shared_cache()  # registered only on gateways given Redis
    names = set()
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type])
    return names


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                "and", "or", "unless", "inf", "nan", "le"}


def queried_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: its identifiers that are not functions,
    aggregations, keywords, label names in matchers or clauses, or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, regexes
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        name = match.group()
        follows = expr[match.end():].lstrip()[:1]
        if follows == "(" or name.lower() in PROMQL_WORDS or re.fullmatch(r"\d", expr[match.start() - 1:match.start()] or " "):
            continue
        names.add(name)
    return names
