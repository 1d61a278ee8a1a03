"""deploy/monitoring: alerting rules checked and unit-tested by the real promtool, the scrape
configs checked by it, and the dashboard and the autoscaler's adapter rules querying only
metrics the gateway exposes."""

import json
import re
import subprocess

import yaml

from deploy_tools import DEPLOY, REPO, exposed_metric_names, queried_metrics, tool

MONITORING = DEPLOY / "monitoring"
RULES = MONITORING / "onellm-rules.yml"
RULE_TESTS = MONITORING / "tests" / "onellm-rules.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
# what the alerts must cover, each by the metric it reads
ALERTED_METRICS = {
    "error rate": "onellm_requests_total",
    "queue saturation": "onellm_admission_waiting",
    "no healthy backend": "onellm_vllm_backend_healthy",
    "Redis unreachable": "onellm_shared_cache_up",
    "time to first token": "onellm_time_to_first_token_seconds_bucket",
}
# Prometheus's own series about each target
PROMETHEUS_SERIES = {"up"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([tool("promtool", "make system-packages installs it (Debian's prometheus)"), *args],
                            capture_output=True, text=True, timeout=120, cwd=MONITORING)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def alerting_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules():
    assert f"SUCCESS: {len(alerting_rules())} rules found" in promtool("check", "rules", str(RULES)).stdout


def test_the_alerts_pass_their_promtool_unit_tests():
    assert "SUCCESS" in promtool("test", "rules", str(RULE_TESTS)).stdout


def test_every_alert_is_tested_firing_and_silent():
    """Each alert has a case where it fires and a near miss where it does not."""
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in alerting_rules():
        expectations = [case["exp_alerts"] for case in cases if case["alertname"] == rule["alert"]]
        assert any(expectations), f"{rule['alert']} is never expected to fire"
        assert [] in expectations, f"{rule['alert']} is never expected to stay silent"


def test_the_alerts_cover_errors_saturation_backends_redis_and_latency():
    read = set().union(*(queried_metrics(rule["expr"]) for rule in alerting_rules()))
    for concern, metric in ALERTED_METRICS.items():
        assert metric in read, concern


def test_rules_query_only_metrics_that_exist():
    exposed = exposed_metric_names() | PROMETHEUS_SERIES
    for rule in alerting_rules():
        assert queried_metrics(rule["expr"]) <= exposed, rule["alert"]


def scrape_config(name: str) -> dict:
    return yaml.safe_load((MONITORING / name).read_text())


def check_config(config: dict, tmp_path) -> None:
    """promtool on a config; --syntax-only as the API key file exists only where Prometheus runs."""
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "onellm-rules.yml").write_text(RULES.read_text())
    promtool("check", "config", "--syntax-only", str(path))


def job(config: dict, name: str) -> dict:
    [found] = [j for j in config["scrape_configs"] if j["job_name"] == name]
    return found


def test_the_compose_scrape_config_finds_every_gateway_vllm_and_haproxy(tmp_path):
    from test_compose import MULTI_GPU_FILE, compose_config, running, vllm_services
    config = scrape_config("prometheus-compose.yml")
    check_config(config, tmp_path)
    assert config["rule_files"] == [RULES.name]
    services = compose_config(files=(REPO / "docker-compose.yml", MULTI_GPU_FILE))["services"]
    gateways = job(config, "onellm-gateway")
    # the same job name as the alerts' `up` rule
    assert any('job="onellm-gateway"' in rule["expr"] for rule in alerting_rules())
    [dns] = gateways["dns_sd_configs"]
    assert dns["names"] == ["gateway"] and dns["type"] == "A"
    assert dns["port"] == int(services["gateway"]["environment"]["ONELLM_PORT"])
    assert gateways["authorization"]["type"] == "Bearer"
    [vllm] = job(config, "vllm")["static_configs"]
    assert {t.split(":")[0] for t in vllm["targets"]} == set(vllm_services(services))
    [haproxy] = job(config, "haproxy")["static_configs"]
    stats_port = re.search(r"frontend haproxy-stats\s+bind :(\d+)",
                           (DEPLOY / "haproxy" / "compose-servers.cfg").read_text()).group(1)
    assert haproxy["targets"] == [f"haproxy:{stats_port}"]
    assert "haproxy" in running(services)


def test_the_kubernetes_scrape_config_keeps_the_gateway_pods_and_names_them(tmp_path):
    """Debian's promtool is built without Kubernetes discovery: it checks the rest of the file,
    and the discovery block is checked here against the rendered manifests."""
    from test_kubernetes import KUBERNETES, main_container, pod_labels, render
    config = scrape_config("prometheus-kubernetes.yml")
    gateways = job(config, "onellm-gateway")
    [discovery] = gateways.pop("kubernetes_sd_configs")
    check_config(config, tmp_path)
    objects = render(KUBERNETES / "overlays" / "multi-node")
    [deployment] = [o for o in objects if o["kind"] == "Deployment"
                    and pod_labels(o)["app.kubernetes.io/name"] == "onellm-gateway"]
    [namespace] = {o["metadata"]["namespace"] for o in objects if "namespace" in o["metadata"]}
    assert discovery == {"role": "pod", "namespaces": {"names": [namespace]}}
    keep = {tuple(r["source_labels"]): r["regex"] for r in gateways["relabel_configs"] if r.get("action") == "keep"}
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == pod_labels(deployment)["app.kubernetes.io/name"]
    port_names = [p["name"] for p in main_container(deployment)["ports"]]
    assert keep[("__meta_kubernetes_pod_container_port_name",)] in port_names
    targets = {r["target_label"]: r["source_labels"] for r in gateways["relabel_configs"] if "target_label" in r}
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]
    assert targets["pod"] == ["__meta_kubernetes_pod_name"]


def test_the_adapter_serves_the_metric_the_autoscaler_reads():
    from test_kubernetes import KUBERNETES, render
    [hpa] = [o for o in render(KUBERNETES / "overlays" / "multi-node") if o["kind"] == "HorizontalPodAutoscaler"]
    [metric] = hpa["spec"]["metrics"]
    [rule] = yaml.safe_load((MONITORING / "prometheus-adapter.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert queried_metrics(rule["seriesQuery"]) <= exposed_metric_names()
    # the labels the Kubernetes scrape config gives each series
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_dashboard_queries_only_metrics_that_exist():
    exposed = exposed_metric_names()
    queries = dashboard_queries()
    assert queries
    for expr in queries:
        assert queried_metrics(expr) <= exposed, expr
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"]).group(1)
            assert metric in exposed


def test_the_dashboard_shows_every_gateway_metric():
    """Nothing the gateway measures is left off the dashboard (histograms by their buckets)."""
    shown = set().union(*map(queried_metrics, dashboard_queries()))
    for name in exposed_metric_names():
        if name.endswith(("_sum", "_count")):
            continue
        assert name in shown, name


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each query, Grafana's variables given values."""
    grafana = {"$__rate_interval": "5m", "$instance": ".*"}
    records = []
    for i, expr in enumerate(dashboard_queries()):
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        records.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    promtool("check", "rules", str(path))


def test_the_dashboard_panels_have_ids_places_and_the_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"].strip("${}") in variables
