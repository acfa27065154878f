"""The Helm chart with a real helm: lint, render (default, GPU, the optional parts), validate
the core objects against Kubernetes' schemas and the RayService against the KubeRay API, and
check that what the chart renders is a pdserve config that builds into the app."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from deploy_paths import CHART, K8S_VERSIONS, NAMESPACE, RELEASE, pyproject_pins
from kuberay_check import check_rayservice
from pdserve.cluster.config import POLICIES, AppConfig
from pdserve.router.proto import SERVICER_FUNCTION
from ray._common.utils import import_attr
from serve_build import build_from_config, check_built

GPU_VALUES = CHART / "values-gpu.yaml"
CRD_KINDS = {"RayService", "ServiceMonitor"}  # not in Kubernetes' own schemas


def by_kind(objs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


def named(objs: list[dict], kind: str, suffix: str) -> dict:
    (o,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    return o


def rayservice(objs: list[dict]) -> dict:
    (rs,) = by_kind(objs)["RayService"]
    return rs


def serve_config(objs: list[dict]) -> dict:
    return yaml.safe_load(rayservice(objs)["spec"]["serveConfigV2"])


def api_keys_env(objs: list[dict]) -> str:
    """What the Ray pods get as PDSERVE_API_KEYS from the rendered Secret."""
    secret = by_kind(objs)["Secret"][0]
    return secret["stringData"]["api-keys"]


def k8s_problems(objs: list[dict]) -> list[str]:
    problems = []
    for o in objs:
        if o["kind"] in CRD_KINDS:
            continue
        for v in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(o, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(map(str, e.absolute_path))
                problems.append(f"{o['kind']}/{o['metadata']['name']} (k8s {v}) {path}: "
                                f"{e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(e.message)
    return problems


def pod_templates(rs: dict) -> dict[str, dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    for g in cluster["workerGroupSpecs"]:
        out[g["groupName"]] = g["template"]
    return out


# ---- lint ---------------------------------------------------------------------------------
@pytest.mark.parametrize("values", [None, GPU_VALUES], ids=["default", "gpu"])
def test_lint_is_clean(helm, values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    proc = helm.run(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def test_chart_versions_follow_pyproject():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pins = pyproject_pins()
    assert chart["appVersion"] == pins["version"]
    assert values["rayVersion"] == chart["annotations"]["pdserve/ray-version"] == pins["ray"]


# ---- default values -----------------------------------------------------------------------
def test_default_render_has_every_part(render):
    objs = render()
    kinds = Counter(o["kind"] for o in objs)
    assert kinds == Counter({"RayService": 1, "ConfigMap": 1, "Secret": 1, "Deployment": 1,
                             "Service": 5, "Pod": 1}), kinds
    services = {o["metadata"]["name"] for o in by_kind(objs)["Service"]}
    assert services == {f"{RELEASE}-pdserve-{s}"
                        for s in ("http", "grpc", "console", "metrics", "redis")}
    assert all(o["metadata"].get("namespace", NAMESPACE) == NAMESPACE for o in objs)


@pytest.mark.parametrize("values", [(), (GPU_VALUES,)], ids=["default", "gpu"])
def test_core_objects_pass_kubernetes_schemas(render, values):
    assert k8s_problems(render(*values)) == []


@pytest.mark.parametrize("values", [(), (GPU_VALUES,)], ids=["default", "gpu"])
def test_rayservice_matches_the_kuberay_api(render, values):
    rs = rayservice(render(*values))
    for v in K8S_VERSIONS:
        assert check_rayservice(rs, v) == []
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == pyproject_pins()["ray"]


def test_the_checks_can_fail(render):
    """Mutations the validators must catch, so the passing checks above mean something."""
    objs = render()
    rs = rayservice(objs)
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupname"] = "x"  # misspelled
    assert any("groupname" in p for p in check_rayservice(bad, K8S_VERSIONS[0]))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("rayStartParams" in p for p in check_rayservice(bad, K8S_VERSIONS[0]))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["groupName"] = "prefill"
    assert any("used twice" in p for p in check_rayservice(bad, K8S_VERSIONS[0]))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = 5
    assert any("outside" in p for p in check_rayservice(bad, K8S_VERSIONS[0]))
    bad = copy.deepcopy(rs)
    container = bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"][0]
    container["ports"][0]["containerPort"] = "8000"
    assert any("containerPort" in p for p in check_rayservice(bad, K8S_VERSIONS[0]))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]["runAsUser"] = "me"
    assert any("autoscalerOptions" in p for p in check_rayservice(bad, K8S_VERSIONS[0]))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"][
        "ray.io/node-type"] = "head"
    assert any("reserves" in p for p in check_rayservice(bad, K8S_VERSIONS[0]))
    bad = copy.deepcopy(rs)
    bad["spec"]["serveConfigV2"] = "applications: 3"
    assert any("serveConfigV2" in p for p in check_rayservice(bad, K8S_VERSIONS[0]))
    svc = copy.deepcopy(named(objs, "Service", "-http"))
    svc["spec"]["selektor"] = svc["spec"].pop("selector")
    assert k8s_problems([svc])


def test_serve_config_is_the_pdserve_config(render, monkeypatch):
    objs = render()
    from ray.serve.schema import ServeDeploySchema

    serve = ServeDeploySchema.model_validate(serve_config(objs))
    (app,) = serve.applications
    assert app.import_path == "pdserve.cluster.app:build_app"
    cm = named(objs, "ConfigMap", "-config")
    assert yaml.safe_load(cm["data"]["cluster.yaml"]) == app.args
    assert yaml.safe_load(cm["data"]["serve.yaml"]) == serve_config(objs)
    # The proxies listen on every interface, and the config says so: pdserve accepts it only
    # with the API keys the Secret hands the pods.
    monkeypatch.delenv("PDSERVE_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="API keys"):
        AppConfig.from_dict(app.args)
    monkeypatch.setenv("PDSERVE_API_KEYS", api_keys_env(objs))
    cfg = AppConfig.from_dict(app.args)
    assert cfg.router.port == serve.http_options.port
    assert cfg.router.grpc_port == serve.grpc_options.port
    assert serve.grpc_options.grpc_servicer_functions == [SERVICER_FUNCTION]
    assert callable(import_attr(SERVICER_FUNCTION))
    assert cfg.redis_url == f"redis://{RELEASE}-pdserve-redis.{NAMESPACE}.svc:6379/0"


@pytest.mark.parametrize("values", [(), (GPU_VALUES,)], ids=["default", "gpu"])
def test_serve_config_builds_the_app(render, model_for, monkeypatch, values):
    objs = render(*values)
    monkeypatch.setenv("PDSERVE_API_KEYS", api_keys_env(objs))
    (app,) = serve_config(objs)["applications"]
    cfg = AppConfig.from_dict(app["args"])
    check_built(build_from_config(app, model_for(cfg.model)), cfg)


def test_worker_groups_follow_the_pools(render):
    objs = render()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    cluster = rayservice(objs)["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert list(groups) == ["prefill", "decode"]
    for name, g in groups.items():
        pool = values[name]
        assert g["replicas"] == pool["replicas"]
        assert (g["minReplicas"], g["maxReplicas"]) == (pool["autoscaling"]["minReplicas"],
                                                       pool["autoscaling"]["maxReplicas"])
        cpus = pool["tp"] * pool["cpusPerRank"]
        assert g["rayStartParams"]["num-cpus"] == str(cpus)
        (c,) = g["template"]["spec"]["containers"]
        assert c["resources"]["requests"]["cpu"] == str(cpus)
        assert not any("gpu" in k for k in c["resources"]["limits"])


def test_gpu_values(render):
    objs = render(GPU_VALUES)
    gpu = yaml.safe_load(GPU_VALUES.read_text())
    groups = {g["groupName"]: g
              for g in rayservice(objs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    args = serve_config(objs)["applications"][0]["args"]
    assert (args["prefill"]["tp"], args["decode"]["tp"], args["dtype"]) == (2, 1, "bfloat16")
    for name in ("prefill", "decode"):
        tp = gpu[name]["tp"]
        g = groups[name]
        assert g["rayStartParams"]["num-gpus"] == str(tp)
        assert g["rayStartParams"]["num-cpus"] == str(tp * gpu[name]["cpusPerRank"])
        spec = g["template"]["spec"]
        (c,) = spec["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == tp
        assert c["image"].endswith("-cuda")
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    head = rayservice(objs)["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert args["model"].startswith("/models/")


def test_services_reach_the_ray_pods(render):
    """Every Service selects pods the chart creates, on ports those pods declare (KubeRay adds
    ray.io/* labels itself, so those are left out of the match)."""
    objs = render()
    pods = {name: t for name, t in pod_templates(rayservice(objs)).items()}
    redis = named(objs, "Deployment", "-redis")["spec"]["template"]
    pods["redis"] = redis
    for svc in by_kind(objs)["Service"]:
        sel = {k: v for k, v in svc["spec"]["selector"].items() if not k.startswith("ray.io/")}
        matched = [n for n, t in pods.items()
                   if sel.items() <= t["metadata"]["labels"].items()]
        assert matched, f"{svc['metadata']['name']} selects no pod"
        for n in matched:
            ports = {p["name"] for c in pods[n]["spec"]["containers"] for p in c["ports"]}
            for p in svc["spec"]["ports"]:
                assert p["targetPort"] in ports, (svc["metadata"]["name"], n, p)
    assert named(objs, "Service", "-http")["spec"]["selector"]["ray.io/serve"] == "true"
    console = named(objs, "Service", "-console")
    assert [n for n, t in pods.items()
            if console["spec"]["selector"].items() <= t["metadata"]["labels"].items()] == ["head"]


def test_secret_reaches_every_ray_container(render):
    objs = render(sets=("auth.apiKeys={sk-one,sk-two}", "auth.adminToken=admin-secret"))
    secret = by_kind(objs)["Secret"][0]
    assert secret["stringData"] == {"api-keys": "sk-one,sk-two", "admin-token": "admin-secret"}
    for name, t in pod_templates(rayservice(objs)).items():
        env = {e["name"]: e for e in t["spec"]["containers"][0]["env"]}
        for var, key in (("PDSERVE_API_KEYS", "api-keys"), ("PDSERVE_ADMIN_TOKEN", "admin-token")):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], key), name
    # Keys live in the Secret only, never in the RayService or the ConfigMap.
    text = json.dumps([o for o in objs if o["kind"] != "Secret"])
    assert "sk-one" not in text and "admin-secret" not in text


# ---- the optional parts -------------------------------------------------------------------
OPTIONS = (
    "mode=colocated",
    "serviceMonitor.enabled=true",
    "networkPolicy.enabled=true",
    "redis.enabled=false",
    "redis.externalUrl=redis://redis.shared.svc:6379/3",
    "auth.existingSecret=my-keys",
    "autoscaling.enabled=false",
    "colocated.kvCacheMemory=4294967296",
)


def test_optional_parts(render, model_for, monkeypatch):
    objs = render(sets=OPTIONS, json_sets=("serve.grpcServicerFunctions=[]",))
    kinds = by_kind(objs)
    assert "Secret" not in kinds and "Deployment" not in kinds  # existing secret, external Redis
    (np,) = kinds["NetworkPolicy"]
    (sm,) = kinds["ServiceMonitor"]
    assert k8s_problems(objs) == []
    rs = rayservice(objs)
    assert check_rayservice(rs, K8S_VERSIONS[-1]) == []
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
    (g,) = cluster["workerGroupSpecs"]
    assert g["groupName"] == "colocated" and g["minReplicas"] == g["maxReplicas"] == g["replicas"]
    env = {e["name"]: e for e in g["template"]["spec"]["containers"][0]["env"]}
    assert env["PDSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "my-keys"
    args = serve_config(objs)["applications"][0]["args"]
    assert args["redis_url"] == "redis://redis.shared.svc:6379/3"
    assert args["colocated"]["kv_cache_memory"] == 4294967296  # an int, not 4.29e+09
    assert "prefill" not in args and "decode" not in args
    assert "grpc_port" not in args["router"]  # no gRPC proxy, nothing for pdserve to guard
    monkeypatch.setenv("PDSERVE_API_KEYS", "sk-from-my-keys")
    cfg = AppConfig.from_dict(args)
    assert cfg.mode == "colocated" and cfg.colocated.kv_cache_memory == 4294967296
    check_built(build_from_config(serve_config(objs)["applications"][0], model_for(cfg.model)),
                cfg)
    # ServiceMonitor: its endpoints name ports of the Services it selects.
    selected = [s for s in kinds["Service"]
                if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
                and s["metadata"]["labels"]["app.kubernetes.io/component"]
                in sm["spec"]["selector"]["matchExpressions"][0]["values"]]
    ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports
    # NetworkPolicy: the named ports it opens exist on the Ray containers.
    container_ports = {p["name"] for t in pod_templates(rs).values()
                       for c in t["spec"]["containers"] for p in c["ports"]}
    named_ports = {p["port"] for rule in np["spec"]["ingress"] for p in rule.get("ports", [])
                   if isinstance(p["port"], str)}
    assert named_ports <= container_ports


def test_open_api_must_be_asked_for(render, monkeypatch):
    objs = render(sets=("auth.allowPublicWithoutKeys=true",))
    assert api_keys_env(objs) == ""
    monkeypatch.delenv("PDSERVE_API_KEYS", raising=False)
    cfg = AppConfig.from_dict(serve_config(objs)["applications"][0]["args"])
    assert cfg.router.allow_public_without_keys


def test_extra_config_reaches_pdserve(render, monkeypatch):
    objs = render(sets=("extraConfig.router.max_queue=7", "extraConfig.testing_faults=false"))
    monkeypatch.setenv("PDSERVE_API_KEYS", api_keys_env(objs))
    cfg = AppConfig.from_dict(serve_config(objs)["applications"][0]["args"])
    assert cfg.router.max_queue == 7


def test_schema_policies_match_pdserve():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert tuple(schema["properties"]["router"]["properties"]["policy"]["enum"]) == POLICIES


# ---- values that must be refused ----------------------------------------------------------
BAD_VALUES = [
    ("prefill:\n  tp: two\n", "/prefill/tp"),
    ("decode:\n  replicas: 0\n", "/decode/replicas"),
    ("device: tpu\n", "/device"),
    ("prefil:\n  tp: 2\n", "prefil"),
    ("service:\n  http:\n    port: \"8000\"\n", "/service/http/port"),
    ("auth:\n  apiKeys: sk-1\n", "/auth/apiKeys"),
    ("model:\n  dtype: float16\n", "/model/dtype"),
    ("router:\n  policy: random\n", "/router/policy"),
    ("prefill:\n  kvCacheMemory: 4GiB\n", "/prefill/kvCacheMemory"),
]


@pytest.mark.parametrize("text,where", BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_wrong_values_are_rejected(helm, tmp_path: Path, text: str, where: str):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    proc = helm.template(bad)
    assert proc.returncode != 0, f"helm accepted {text!r}"
    assert "schema" in proc.stderr and where in proc.stderr, proc.stderr


def test_lint_rejects_a_wrong_type(helm, tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefill:\n  tp: \"2\"\n")
    proc = helm.run("lint", str(CHART), "-f", str(bad))
    assert proc.returncode != 0 and "/prefill/tp" in proc.stdout + proc.stderr


@pytest.mark.parametrize("sets,message", [
    (("prefill.replicas=3",), "prefill.replicas=3 is outside prefill.autoscaling [1, 2]"),
    (("decode.autoscaling.minReplicas=3",), "minReplicas (3) is above maxReplicas (2)"),
    (("redis.enabled=false",), "redis.externalUrl"),
    (("model.volume.enabled=true",), "model.volume.claimName is required"),
])
def test_inconsistent_values_fail_with_a_message(helm, sets, message):
    proc = helm.template(sets=sets)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
