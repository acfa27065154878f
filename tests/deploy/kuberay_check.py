"""Checks a rendered ``RayService`` against the KubeRay ``ray.io/v1`` API, without a cluster.

The schema below is written from KubeRay's API reference (docs/reference/api.md, types
RayService, RayServiceSpec, RayServiceUpgradeStrategy, RayClusterSpec, AutoscalerOptions,
HeadGroupSpec, WorkerGroupSpec, ScaleStrategy): every field the reference lists is allowed with
its type and enum, and anything else is an error, so a misspelled or invented field fails here
instead of being dropped by the API server's pruning. Kubernetes types embedded in it (the pod
templates, the autoscaler's securityContext) are checked against the Kubernetes schemas by
``kubernetes-validate``. On top of the schema: the rules the operator enforces or relies on
(unique group names, min <= replicas <= max, the Serve config parses with Ray Serve's own
schema, no user labels under ray.io/).
"""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import yaml

_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_INT = {"type": "integer"}
_NONNEG = {"type": "integer", "minimum": 0}
_OBJ = {"type": "object"}  # a Kubernetes type, checked separately where we set it
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _strict(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": props,
            "required": required or []}


_AUTOSCALER_OPTIONS = _strict({
    "resources": _OBJ,
    "image": _STR,
    "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "securityContext": _OBJ,
    "idleTimeoutSeconds": _NONNEG,
    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
    "version": {"enum": ["v1", "v2"]},
    "env": {"type": "array", "items": _OBJ},
    "envFrom": {"type": "array", "items": _OBJ},
    "volumeMounts": {"type": "array", "items": _OBJ},
})

_HEAD_GROUP = _strict({
    "template": _OBJ,
    "headService": _OBJ,
    "enableIngress": _BOOL,
    "rayStartParams": _STRMAP,  # keys and values are strings: `ray start --key=value`
    "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
}, required=["template"])

_WORKER_GROUP = _strict({
    "suspend": _BOOL,
    "groupName": {"type": "string", "minLength": 1},
    "replicas": _NONNEG,
    "minReplicas": _NONNEG,
    "maxReplicas": _NONNEG,
    "idleTimeoutSeconds": _NONNEG,
    "rayStartParams": _STRMAP,
    "template": _OBJ,
    "scaleStrategy": _strict({"workersToDelete": {"type": "array", "items": _STR}}),
    "numOfHosts": {"type": "integer", "minimum": 1},
}, required=["groupName", "template"])

_RAY_CLUSTER_SPEC = _strict({
    "suspend": _BOOL,
    "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
    "autoscalerOptions": _AUTOSCALER_OPTIONS,
    "headServiceAnnotations": _STRMAP,
    "enableInTreeAutoscaling": _BOOL,
    "gcsFaultToleranceOptions": _OBJ,
    "headGroupSpec": _HEAD_GROUP,
    "rayVersion": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+$"},
    "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
}, required=["headGroupSpec"])

RAYSERVICE_SCHEMA: dict[str, Any] = _strict({
    "apiVersion": {"const": "ray.io/v1"},
    "kind": {"const": "RayService"},
    "metadata": {"type": "object", "required": ["name"],
                 "properties": {"name": {"type": "string", "maxLength": 63}}},
    "spec": _strict({
        "serviceUnhealthySecondThreshold": _INT,  # deprecated, ignored by the operator
        "deploymentUnhealthySecondThreshold": _INT,  # deprecated, ignored by the operator
        "serveService": _OBJ,
        "upgradeStrategy": _strict({"type": {"enum": ["NewCluster", "None"]}}),
        "serveConfigV2": _STR,
        "rayClusterConfig": _RAY_CLUSTER_SPEC,
        "excludeHeadPodFromServeSvc": _BOOL,
    }, required=["serveConfigV2", "rayClusterConfig"]),
    "status": _OBJ,
}, required=["apiVersion", "kind", "metadata", "spec"])


def check_rayservice(obj: dict[str, Any], k8s_version: str) -> list[str]:
    """Problems of one RayService object (empty list: it passes)."""
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                for e in jsonschema.Draft7Validator(RAYSERVICE_SCHEMA).iter_errors(obj)]
    if problems:
        return problems  # the semantic checks below assume the shape is right
    spec = obj["spec"]
    cluster = spec["rayClusterConfig"]
    problems += _check_serve_config(spec["serveConfigV2"])
    head = cluster["headGroupSpec"]
    problems += _check_template("rayClusterConfig.headGroupSpec.template", head["template"],
                                k8s_version)
    names: set[str] = set()
    for i, g in enumerate(cluster.get("workerGroupSpecs", [])):
        where = f"rayClusterConfig.workerGroupSpecs[{i}] ({g['groupName']})"
        if g["groupName"] in names:
            problems.append(f"{where}: groupName is used twice")
        names.add(g["groupName"])
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        n = g.get("replicas", lo)
        if not lo <= n <= hi:
            problems.append(f"{where}: replicas={n} outside [minReplicas={lo}, maxReplicas={hi}]")
        problems += _check_template(f"{where}.template", g["template"], k8s_version)
    sc = cluster.get("autoscalerOptions", {}).get("securityContext")
    if sc is not None:
        probe = {"spec": {"containers": [{"name": "autoscaler", "securityContext": sc}]}}
        problems += [f"rayClusterConfig.autoscalerOptions (as a container's): {p}"
                     for p in _k8s("PodTemplate", probe, k8s_version)]
    return problems


def _check_serve_config(text: str) -> list[str]:
    from ray.serve.schema import ServeDeploySchema

    try:
        doc = yaml.safe_load(text)
        ServeDeploySchema.model_validate(doc)
    except Exception as e:  # noqa: BLE001 - yaml and pydantic errors alike are findings
        return [f"serveConfigV2: {type(e).__name__}: {e}"]
    return []


def _check_template(where: str, template: dict[str, Any], k8s_version: str) -> list[str]:
    problems = [f"{where}.{p}" for p in _k8s("PodTemplate", template, k8s_version)]
    labels = template.get("metadata", {}).get("labels", {})
    problems += [f"{where}: label {k!r} is under ray.io/, which KubeRay reserves"
                 for k in labels if k.startswith("ray.io/")]
    containers = template.get("spec", {}).get("containers", [])
    if not containers or not containers[0].get("image"):
        problems.append(f"{where}: the first container (KubeRay's Ray container) has no image")
    return problems


def _k8s(kind: str, template: dict[str, Any], k8s_version: str) -> list[str]:
    """Validate a pod template as the ``template`` of a v1 PodTemplate object."""
    wrapped = {"apiVersion": "v1", "kind": kind, "metadata": {"name": "probe"},
               "template": template}
    try:
        kubernetes_validate.validate(wrapped, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = list(e.absolute_path)[1:]  # drop the wrapper's "template"
        return [f"{'.'.join(map(str, path))}: {e.message}"]
    return []
