"""deploy/kubernetes: the base and every overlay rendered by the real `kubectl kustomize`,
every object validated against the Kubernetes schemas (kubernetes-validate), then the wiring
between the objects, and between them and the gateway, checked on the rendered objects."""

import dataclasses
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from deploy_tools import DEPLOY, exposed_metric_names, tool
from server.config import Settings

# the oldest release the manifests are for; preStop `sleep` needs 1.30 or later
KUBERNETES_VERSION = "1.34.0"
KUBERNETES = DEPLOY / "kubernetes"
KUSTOMIZATIONS = [KUBERNETES / "base", *sorted(p for p in (KUBERNETES / "overlays").iterdir() if p.is_dir())]
GATEWAY = "onellm-gateway"
VLLM = "onellm-vllm"
REDIS = "onellm-redis"
FILES_STORE = "onellm-files-store"
COLLECTOR = "onellm-otel-collector"


def render(path: Path) -> list[dict]:
    result = subprocess.run([tool("kubectl", "it comes with the dev dependencies (uv sync)"), "kustomize", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@dataclasses.dataclass
class Manifests:
    name: str
    objects: list[dict]

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        [found] = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        return found

    def workloads(self) -> list[dict]:
        return [o for o in self.objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]

    def workload(self, app_name: str) -> dict:
        [found] = [w for w in self.workloads() if pod_labels(w).get("app.kubernetes.io/name") == app_name]
        return found

    def environment(self, container: dict) -> dict[str, str]:
        """A container's variables: its envFrom ConfigMaps (the generated names resolved), then env."""
        values = {}
        for source in container.get("envFrom", []):
            values.update(self.get("ConfigMap", source["configMapRef"]["name"])["data"])
        values.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
        return values


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: p.name)
def manifests(request) -> Manifests:
    return Manifests(request.param.name, render(request.param))


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def main_container(workload: dict) -> dict:
    [container] = pod_spec(workload)["containers"]
    return container


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions would need evaluating
    return selector["matchLabels"].items() <= labels.items()


def container_port(container: dict, port) -> int:
    """A port given by name or number, as the container declares it."""
    for declared in container.get("ports", []):
        if port in (declared.get("name"), declared["containerPort"]):
            return declared["containerPort"]
    raise AssertionError(f"{container['name']} declares no port {port!r}")


def probes(container: dict) -> dict[str, dict]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container}


def option(arguments: list[str], name: str) -> str:
    """The value of `--name=value` in vLLM's arguments."""
    [value] = [a.split("=", 1)[1] for a in arguments if a.startswith(name + "=")]
    return value


def flag(arguments: list[str], name: str) -> str:
    """The value after `name` in Redis's arguments."""
    assert name in arguments, f"{name} missing from {arguments}"
    return arguments[arguments.index(name) + 1]


def quantity_bytes(value: str) -> int:
    """A Kubernetes quantity with a binary suffix, or a Redis size (its kb, mb, gb are powers of 1024)."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", value).groups()
    return int(number) * {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
                          "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}[unit]


def validation_error(obj: dict) -> str | None:
    import kubernetes_validate
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return f"{obj['kind']}/{obj['metadata']['name']}: {error.message} at {list(error.path)}"
    return None


def test_there_is_an_overlay_for_one_node_and_one_for_many():
    assert {p.name for p in KUSTOMIZATIONS} >= {"base", "single-node", "multi-node"}


def test_every_object_is_valid_for_kubernetes(manifests):
    errors = [e for e in map(validation_error, manifests.objects) if e]
    assert not errors, "\n".join(errors)
    assert {o["kind"] for o in manifests.objects} >= {
        "Namespace", "ConfigMap", "Service", "Deployment", "StatefulSet", "Job", "PersistentVolumeClaim",
        "PodDisruptionBudget", "NetworkPolicy"}


def test_the_validator_refuses_an_unknown_field(manifests):
    """Strict validation: a misspelt field is an error, not ignored."""
    service = dict(manifests.get("Service", "vllm"))
    service["spec"] = service["spec"] | {"selectr": service["spec"]["selector"]}
    assert "selectr" in validation_error(service)


def test_gateway_probes_are_routes_of_the_app_on_its_port(manifests, app_routes):
    gateway = main_container(manifests.workload(GATEWAY))
    port = int(manifests.environment(gateway)["ONELLM_PORT"])
    found = probes(gateway)
    assert found["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert found["livenessProbe"]["httpGet"]["path"] == "/health"
    for kind, probe in found.items():
        assert probe["httpGet"]["path"] in app_routes, kind
        assert container_port(gateway, probe["httpGet"]["port"]) == port, kind


def test_vllm_probes_are_on_the_port_it_serves(manifests):
    vllm = main_container(manifests.workload(VLLM))
    port = int(option(vllm["args"], "--port"))
    found = probes(vllm)
    assert set(found) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, probe in found.items():
        assert probe["httpGet"]["path"] == "/health", kind
        assert container_port(vllm, probe["httpGet"]["port"]) == port, kind
    # long enough to load 13.5 GB of weights and capture CUDA graphs
    startup = found["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_services_select_pods_and_reach_their_ports(manifests):
    for service in manifests.of_kind("Service"):
        selector = {"matchLabels": service["spec"]["selector"]}
        targets = [w for w in manifests.workloads() if selects(selector, pod_labels(w))]
        assert len(targets) == 1, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            container_port(main_container(targets[0]), port["targetPort"])


def test_the_grace_period_outlasts_the_prestop_sleep_and_the_drain(manifests):
    gateway_workload = manifests.workload(GATEWAY)
    gateway = main_container(gateway_workload)
    drain = float(manifests.environment(gateway).get("ONELLM_DRAIN_TIMEOUT_S", Settings.drain_timeout_s))
    sleep = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep > 0
    assert pod_spec(gateway_workload)["terminationGracePeriodSeconds"] > drain + sleep


def test_network_policies_let_only_gateways_reach_vllm_and_both_redis(manifests):
    gateway_labels = pod_labels(manifests.workload(GATEWAY))
    convert_labels = pod_labels(manifests.workload("onellm-convert"))
    for guarded in (VLLM, REDIS, FILES_STORE):
        workload = manifests.workload(guarded)
        [policy] = [p for p in manifests.of_kind("NetworkPolicy") if selects(p["spec"]["podSelector"], pod_labels(workload))]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        [rule] = policy["spec"]["ingress"]
        [source] = rule["from"]
        assert set(source) == {"podSelector"}, "no namespace or address range is let in"
        assert selects(source["podSelector"], gateway_labels)
        assert not selects(source["podSelector"], convert_labels)
        # the port the service is on, and only that one
        ports = [container_port(main_container(workload), p["port"]) for p in rule["ports"]]
        assert ports == [p["containerPort"] for p in main_container(workload)["ports"]]


def test_gateways_and_vllm_send_their_traces_to_the_collector_over_otlp_http(manifests):
    gateway = main_container(manifests.workload(GATEWAY))
    vllm = main_container(manifests.workload(VLLM))
    collector = manifests.workload(COLLECTOR)
    # the gateway's is the collector's base URL (it appends /v1/traces), vLLM's the full one
    gateway_url = httpx.URL(manifests.environment(gateway)["ONELLM_OTLP_ENDPOINT"])
    vllm_url = httpx.URL(option(vllm["args"], "--otlp-traces-endpoint"))
    assert gateway_url.path in ("", "/") and vllm_url.path == "/v1/traces"
    # vLLM's exporter speaks gRPC unless told otherwise, and this is the HTTP port
    assert {e["name"]: e["value"] for e in vllm["env"]}["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    config = yaml.safe_load(manifests.get("ConfigMap", "otel-collector")["data"]["config.yaml"])
    http_port = int(config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].rsplit(":", 1)[1])
    for url in (gateway_url, vllm_url):
        service = manifests.get("Service", url.host)
        assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(collector))
        [port] = [p for p in service["spec"]["ports"] if p["port"] == url.port]
        assert container_port(main_container(collector), port["targetPort"]) == http_port
    traces = config["service"]["pipelines"]["traces"]
    assert "otlp" in traces["receivers"] and set(traces["exporters"]) <= set(config["exporters"])
    mount = main_container(collector)["volumeMounts"][0]["mountPath"]
    assert main_container(collector)["args"] == [f"--config={mount}/config.yaml"]


def test_settings_in_the_config_map_are_settings_of_the_gateway(manifests):
    fields = {f.name for f in dataclasses.fields(Settings)}
    gateway = main_container(manifests.workload(GATEWAY))
    for name in manifests.environment(gateway):
        assert name.startswith("ONELLM_"), name
        assert name.removeprefix("ONELLM_").lower() in fields, name
    # and the values are what Settings can parse
    values = manifests.environment(gateway)
    Settings.from_env(values)


def test_the_vllm_list_names_every_replica_by_its_pod_dns_name(manifests):
    statefulset = manifests.workload(VLLM)
    service = manifests.get("Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(statefulset))
    gateway = main_container(manifests.workload(GATEWAY))
    urls = [httpx.URL(u) for u in manifests.environment(gateway)["ONELLM_VLLM_URL"].split(",")]
    replicas = statefulset["spec"]["replicas"]
    name, service_name = statefulset["metadata"]["name"], service["metadata"]["name"]
    assert [u.host for u in urls] == [f"{name}-{i}.{service_name}" for i in range(replicas)]
    port = int(option(main_container(statefulset)["args"], "--port"))
    assert {(u.scheme, u.port) for u in urls} == {("http", port)}


def test_the_cache_url_names_the_redis_service(manifests):
    gateway = main_container(manifests.workload(GATEWAY))
    url = httpx.URL(manifests.environment(gateway)["ONELLM_CACHE_URL"])
    service = manifests.get("Service", url.host)
    [port] = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    redis = manifests.workload(REDIS)
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(redis))
    assert url.scheme == "redis"
    arguments = main_container(redis)["args"]
    assert arguments[arguments.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert "--maxmemory" in arguments


def test_the_files_url_names_a_durable_redis_apart_from_the_cache(manifests):
    """A gateway pod's own disk is neither shared with the other gateways nor kept when the pod
    is replaced: files live in a Redis of their own, which evicts nothing and appends every
    write to a file on a volume claimed for it, with room for its maxmemory in memory and on disk."""
    settings = Settings.from_env(manifests.environment(main_container(manifests.workload(GATEWAY))))
    url = httpx.URL(settings.files_url)
    assert url.scheme == "redis" and url.host != httpx.URL(settings.cache_url).host
    service = manifests.get("Service", url.host)
    assert [p["port"] for p in service["spec"]["ports"]] == [url.port]
    store = manifests.workload(FILES_STORE)
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(store))
    assert store["kind"] == "StatefulSet" and store["spec"]["serviceName"] == service["metadata"]["name"]
    redis = main_container(store)
    arguments = redis["args"]
    assert arguments[0] == "redis-server"
    assert flag(arguments, "--maxmemory-policy") == "noeviction"
    assert flag(arguments, "--appendonly") == "yes"
    [mount] = [m for m in redis["volumeMounts"] if m["mountPath"] == flag(arguments, "--dir")]
    assert not mount.get("readOnly")
    [claim] = [c for c in store["spec"]["volumeClaimTemplates"] if c["metadata"]["name"] == mount["name"]]
    maxmemory = quantity_bytes(flag(arguments, "--maxmemory"))
    # the append-only file grows to twice its base before Redis rewrites it
    assert quantity_bytes(claim["spec"]["resources"]["requests"]["storage"]) >= 2 * maxmemory
    assert quantity_bytes(redis["resources"]["limits"]["memory"]) > maxmemory
    # the redis user writes the volume through its group
    security = pod_spec(store)["securityContext"]
    assert security["runAsNonRoot"] and security["fsGroup"]
    # ready once the append-only file is loaded: Redis answers LOADING until then, and
    # redis-cli exits 0 on that error reply too
    assert "PONG" in " ".join(redis["readinessProbe"]["exec"]["command"])
    assert redis["image"] == main_container(manifests.workload(REDIS))["image"]


def mounts_of(workload: dict, claim: str) -> list[dict]:
    volumes = [v["name"] for v in pod_spec(workload)["volumes"]
               if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
    return [m for c in pod_spec(workload)["containers"] + pod_spec(workload).get("initContainers", [])
            for m in c.get("volumeMounts", []) if m["name"] in volumes]


def test_the_model_volume_is_written_by_the_convert_job_and_read_by_the_rest(manifests):
    [claim] = manifests.of_kind("PersistentVolumeClaim")
    name = claim["metadata"]["name"]
    job = manifests.workload("onellm-convert")
    script = " ".join(main_container(job)["command"] + main_container(job)["args"])
    out = re.search(r"onellm convert .*--out (\S+)", script).group(1)
    [writer] = mounts_of(job, name)
    assert not writer.get("readOnly") and out.startswith(writer["mountPath"] + "/")
    gateway = manifests.workload(GATEWAY)
    assert manifests.environment(main_container(gateway))["ONELLM_MODEL"] == out
    vllm = manifests.workload(VLLM)
    assert option(main_container(vllm)["args"], "--model") == f"{out}/llm"
    for reader in (gateway, vllm):
        mounts = mounts_of(reader, name)
        assert mounts and all(m["readOnly"] and m["mountPath"] == writer["mountPath"] for m in mounts)
        # each waits, in an init container, for the file its server loads first
        [wait] = pod_spec(reader)["initContainers"]
        assert out in " ".join(wait["command"])
    # pods on more than one node need a volume every node mounts
    spread = any(pod_spec(w).get("topologySpreadConstraints") for w in (gateway, vllm))
    assert ("ReadWriteMany" in claim["spec"]["accessModes"]) == spread


def test_api_keys_come_from_a_secret_mounted_where_the_gateway_reads_them(manifests):
    workload = manifests.workload(GATEWAY)
    gateway = main_container(workload)
    keys_file = Path(manifests.environment(gateway)["ONELLM_API_KEYS_FILE"])
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod_spec(workload)["volumes"] if "secret" in v}
    [mount] = [m for m in gateway["volumeMounts"] if m["name"] in secrets and keys_file.parent == Path(m["mountPath"])]
    assert mount["readOnly"]
    assert not manifests.of_kind("Secret"), "keys are created beside the manifests, never in them"


def test_the_gateway_decodes_on_as_many_threads_as_it_has_cpus(manifests):
    gateway = main_container(manifests.workload(GATEWAY))
    workers = int(manifests.environment(gateway)["ONELLM_PREPROCESS_WORKERS"])
    assert workers == int(gateway["resources"]["requests"]["cpu"])


def test_the_gateway_memory_budget_leaves_its_pod_room_for_the_runtime_and_the_model(manifests):
    gateway = main_container(manifests.workload(GATEWAY))
    budget = float(manifests.environment(gateway).get("ONELLM_MEMORY_BUDGET_MB", Settings.memory_budget_mb)) * (1 << 20)
    # torch, the CUDA runtime and the encoder's 1.8 GiB of weights on their way to the GPU: an
    # estimate, not measured (no GPU here)
    runtime = 4 << 30
    assert budget + runtime <= quantity_bytes(gateway["resources"]["limits"]["memory"])


def test_gateways_and_vllm_replicas_each_get_a_gpu(manifests):
    for name in (GATEWAY, VLLM):
        resources = main_container(manifests.workload(name))["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == 1, name
        assert "memory" in resources["limits"], name
        assert resources["requests"]["cpu"], name


def test_vllm_runs_the_compose_image_with_its_prefix_cache(manifests):
    from test_compose import compose_config
    vllm = main_container(manifests.workload(VLLM))
    assert vllm["image"] == compose_config()["services"]["vllm"]["image"]
    assert vllm["command"] == ["vllm", "serve"]
    assert "--enable-prompt-embeds" in vllm["args"]
    assert "--enable-prefix-caching" in vllm["args"]
    assert option(vllm["args"], "--block-size") == "16"


def test_disruption_budgets_cover_the_gateways_and_vllm(manifests):
    covered = set()
    for budget in manifests.of_kind("PodDisruptionBudget"):
        [workload] = [w for w in manifests.workloads() if selects(budget["spec"]["selector"], pod_labels(w))]
        covered.add(pod_labels(workload)["app.kubernetes.io/name"])
        assert budget["spec"]["maxUnavailable"] == 1
    assert covered == {GATEWAY, VLLM}


def test_an_autoscaler_scales_the_gateways_on_a_metric_they_expose(manifests):
    autoscalers = manifests.of_kind("HorizontalPodAutoscaler")
    if manifests.name != "multi-node":
        assert not autoscalers
        return
    [hpa] = autoscalers
    target = hpa["spec"]["scaleTargetRef"]
    deployment = manifests.get(target["kind"], target["name"])
    assert pod_labels(deployment)["app.kubernetes.io/name"] == GATEWAY
    assert "replicas" not in deployment["spec"], "the autoscaler owns the count"
    [metric] = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] in exposed_metric_names()
    # below the admission limit, so that gateways are added before requests queue
    average = float(metric["pods"]["target"]["averageValue"])
    max_concurrent = int(manifests.environment(main_container(deployment)).get("ONELLM_MAX_CONCURRENT",
                                                                               Settings.max_concurrent))
    assert 0 < average < max_concurrent
    assert 1 < hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
