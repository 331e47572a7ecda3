#!/usr/bin/env python3
"""Checks the kustomize base in deploy/k8s without a cluster and without kustomize.

1. Renders the base as `kubectl apply -k` would: the files in kustomization.yaml's
   `resources`, the `namespace` set on every namespaced object, the `images` rewritten.
   Any other kustomization field is refused, so that nothing is validated that kustomize
   would render differently.
2. Validates every Kubernetes object against the schemas of Kubernetes K8S_VERSION,
   strictly (unknown fields refused), with the schemas kubernetes-validate ships offline.
3. Validates every ScaledObject and TriggerAuthentication against keda-schema.json.
4. Checks the fleet's invariants (see INVARIANTS below).

`--self-test` then breaks copies of the base on purpose, one way each, and requires that
every copy is refused for that reason. `--write-policy` regenerates policy-configmap.yaml
from config/permissions.toml and config/risk_matrix.toml.

Exit status: 0 when everything holds, 1 on any failure (each printed on its own line),
64 for a usage error. Run it through check.sh, which installs the pinned dependencies.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import shutil
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import yaml

# The Kubernetes version whose schemas every object must satisfy.
K8S_VERSION = "1.33"

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent

# What check.py knows how to render; anything else in kustomization.yaml is refused.
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass", "ClusterTriggerAuthentication"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}

SECRETS_DIR = "/run/secrets/agentfleet"
CONFIG_DIR = "/etc/agentfleet"
# The only workload that may reach the node's container engine.
ENGINE_SOCKET_HOLDER = "sandbox-runner"
ENGINE_SOCKETS = ["/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock",
                  "/var/run/containerd/containerd.sock", "/run/crio/crio.sock", "/run/podman/podman.sock"]
# Settings a container may relax, and why: the sandbox runner runs as uid 0 to own the
# engine socket (sandbox-runner.yaml says why); everything else is as strict as the rest.
SECURITY_EXCEPTIONS = {ENGINE_SOCKET_HOLDER: {"runAsNonRoot"}}
# Only these may open connections to Postgres.
POSTGRES_CLIENTS = {"orchestrator", "outbox-relay"}
POSTGRES_PORT = 5432
NO_PROBES = "agentfleet.io/no-probes"
# Files in the policy ConfigMap and where they come from.
POLICY_FILES = {"permissions.toml": "config/permissions.toml", "risk_matrix.toml": "config/risk_matrix.toml"}

INVARIANTS = [
    "every workload's pods are under the default deny and selected by a policy of their own",
    "no pod but sandbox-runner mounts the container engine's socket (or a directory holding it)",
    "no egress rule of a policy selecting workers reaches Postgres; only orchestrator and outbox-relay may",
    "every container: runAsNonRoot, readOnlyRootFilesystem, allowPrivilegeEscalation false, "
    "capabilities drop ALL and add nothing, seccompProfile RuntimeDefault, not privileged",
    "Secrets only as read-only files with mode 0400, one Secret per workload, never in env",
    "every *_FILE variable and every path setting in a config file names a file the pod mounts",
    "probes on every container unless the workload says why not; requests and limits everywhere",
    "every image is covered by kustomization `images`",
    "one ScaledObject per worker, on fleet:tasks:<role> in group <role>, with TLS, lag, its credentials, "
    "and no formula that a missing group would freeze at zero",
    "the policy ConfigMap is config/*.toml byte for byte; budget's [ledger] is the orchestrator's ledger.toml",
    "Redis: TLS only, appendonly yes, appendfsync everysec",
]


class CheckError(Exception):
    """A problem with the base that stops rendering it at all."""


@dataclass
class Result:
    errors: list[str] = field(default_factory=list)
    objects: int = 0
    keda_objects: int = 0

    def fail(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")


def ident(obj: dict) -> str:
    return f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"


# ---------------------------------------------------------------------------------------
# Rendering


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """`name[:tag][@digest]` -> (name, tag, digest); a registry port is not a tag."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    name, tag = image, None
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = image.rsplit(":", 1)
    return name, tag, digest


def pod_specs(obj: dict) -> list[dict]:
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind in WORKLOADS or kind == "Job":
        return [((spec.get("template") or {}).get("spec")) or {}]
    if kind == "CronJob":
        return [(((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}]
    if kind == "Pod":
        return [spec]
    return []


def containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


def render(base: Path) -> tuple[list[dict], dict]:
    """The objects `kubectl apply -k base` would apply, and the kustomization."""
    kpath = base / "kustomization.yaml"
    if not kpath.is_file():
        raise CheckError(f"{kpath}: missing")
    kust = yaml.safe_load(kpath.read_text()) or {}
    unknown = set(kust) - KUSTOMIZATION_FIELDS
    if unknown:
        raise CheckError(
            f"kustomization.yaml: fields {sorted(unknown)} are not rendered by check.py; "
            f"keep the base to {sorted(KUSTOMIZATION_FIELDS)} (an overlay may use anything)"
        )
    objects: list[dict] = []
    for res in kust.get("resources") or []:
        path = (base / res).resolve()
        if "://" in res or not path.is_file() or base.resolve() not in path.parents:
            raise CheckError(f"kustomization.yaml: resource {res!r} is not a file inside {base}")
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                raise CheckError(f"{res}: a document without kind and apiVersion")
            doc.setdefault("metadata", {})
            doc["_file"] = res
            objects.append(doc)
    namespace = kust.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    for img in kust.get("images") or []:
        unknown = set(img) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise CheckError(f"kustomization.yaml: images entry {img.get('name')!r} has unknown fields {sorted(unknown)}")
        for obj in objects:
            for pod in pod_specs(obj):
                for c in containers(pod):
                    name, tag, digest = split_image(c.get("image", ""))
                    if name != img["name"]:
                        continue
                    name = img.get("newName", name)
                    tag = img.get("newTag", tag)
                    digest = img.get("digest", digest)
                    c["image"] = name + (f":{tag}" if tag and not img.get("digest") else "") + (
                        f"@{digest}" if digest else "")
                    c["_image_covered"] = True
    return objects, kust


def strip_private(obj):
    """A copy without the keys render() added (those starting with `_`)."""
    if isinstance(obj, dict):
        return {k: strip_private(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [strip_private(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------
# Schemas


def validate_schemas(objects: list[dict], keda_schema: dict, res: Result) -> None:
    keda = jsonschema.Draft202012Validator(keda_schema)
    for obj in objects:
        clean = strip_private(obj)
        if obj["kind"] in KEDA_KINDS:
            res.keda_objects += 1
            for err in sorted(keda.iter_errors(clean), key=lambda e: list(e.absolute_path)):
                path = ".".join(str(p) for p in err.absolute_path) or "(top)"
                res.fail(ident(obj), f"KEDA schema: {path}: {err.message}")
            behavior = (((clean.get("spec") or {}).get("advanced") or {}).get("horizontalPodAutoscalerConfig")
                        or {}).get("behavior")
            if behavior is not None:
                hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                       "metadata": {"name": "x"},
                       "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1,
                                "behavior": behavior}}
                k8s_validate(hpa, ident(obj) + " advanced.horizontalPodAutoscalerConfig", res)
            continue
        res.objects += 1
        k8s_validate(clean, ident(obj), res)


def k8s_validate(obj: dict, where: str, res: Result) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "(top)"
        res.fail(where, f"Kubernetes {K8S_VERSION} schema: {path}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        res.fail(where, f"no Kubernetes {K8S_VERSION} schema: {e.message}")


# ---------------------------------------------------------------------------------------
# Invariants


def by_kind(objects: list[dict], *kinds: str) -> list[dict]:
    return [o for o in objects if o["kind"] in kinds]


def find(objects: list[dict], kind: str, name: str) -> dict | None:
    for o in objects:
        if o["kind"] == kind and o["metadata"].get("name") == name:
            return o
    return None


def pod_labels(obj: dict) -> dict:
    return (((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}


def selects(selector: dict | None, labels: dict) -> bool:
    """Whether a LabelSelector matches `labels` (an empty selector matches everything)."""
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def check_network_coverage(objects: list[dict], res: Result) -> None:
    policies = by_kind(objects, "NetworkPolicy")
    default_deny = [
        p for p in policies
        if not (p["spec"].get("podSelector") or {})
        and set(p["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    if not default_deny:
        res.fail("NetworkPolicy", "no default deny (podSelector {}, policyTypes Ingress and Egress, no rules)")
    for w in by_kind(objects, *WORKLOADS):
        labels = pod_labels(w)
        own = [p for p in policies if p not in default_deny and selects(p["spec"].get("podSelector"), labels)]
        if not own:
            res.fail(ident(w), "its pods are selected by no NetworkPolicy of their own: say what they may reach")


def ports_allow(rule: dict, port: int, names: set[str]) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        value = p.get("port")
        if value is None:
            return True
        if isinstance(value, str):
            if value in names:
                return True
            continue
        end = p.get("endPort", value)
        if value <= port <= end:
            return True
    return False


def peer_reaches(peer: dict, labels: dict, namespace_labels: dict) -> bool:
    if "ipBlock" in peer:
        # Pod addresses are private; a block that leaves them out cannot reach a pod.
        block = peer["ipBlock"]
        net = ipaddress.ip_network(block["cidr"], strict=False)
        excepted = [ipaddress.ip_network(e, strict=False) for e in block.get("except") or []]
        private = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                         "100.64.0.0/10", "fc00::/7")]
        for p in private:
            if p.version == net.version and net.overlaps(p) and not any(
                    e.version == p.version and p.subnet_of(e) for e in excepted):
                return True
        return False
    if "namespaceSelector" in peer and not selects(peer["namespaceSelector"], namespace_labels):
        return False
    return selects(peer.get("podSelector"), labels)


def check_postgres_reach(objects: list[dict], namespace_labels: dict, res: Result) -> None:
    postgres = find(objects, "StatefulSet", "postgres")
    if postgres is None:
        res.fail("StatefulSet/postgres", "missing")
        return
    pg_labels = pod_labels(postgres)
    pg_port_names = {p.get("name") for c in containers(pod_specs(postgres)[0]) for p in c.get("ports") or []}
    policies = by_kind(objects, "NetworkPolicy")
    for w in by_kind(objects, *WORKLOADS):
        name = w["metadata"]["name"]
        if name in POSTGRES_CLIENTS or name == "postgres":
            continue
        labels = pod_labels(w)
        for p in policies:
            if not selects(p["spec"].get("podSelector"), labels) or "Egress" not in (p["spec"].get("policyTypes") or []):
                continue
            for i, rule in enumerate(p["spec"].get("egress") or []):
                if not ports_allow(rule, POSTGRES_PORT, pg_port_names):
                    continue
                peers = rule.get("to")
                if not peers or any(peer_reaches(peer, pg_labels, namespace_labels) for peer in peers):
                    role = "a worker" if labels.get("app.kubernetes.io/component") == "worker" else name
                    res.fail(ident(p), f"egress rule {i} lets {role} ({ident(w)}) reach Postgres on {POSTGRES_PORT}")
    for p in policies:
        if not selects(p["spec"].get("podSelector"), pg_labels) or "Ingress" not in (p["spec"].get("policyTypes") or []):
            continue
        for i, rule in enumerate(p["spec"].get("ingress") or []):
            for peer in rule.get("from") or [{}]:
                allowed = [c for c in POSTGRES_CLIENTS
                           if (peer.get("podSelector") or {}).get("matchLabels") == {"app.kubernetes.io/name": c}]
                if not allowed or "namespaceSelector" in peer or "ipBlock" in peer:
                    res.fail(ident(p), f"ingress rule {i} admits {peer or 'everyone'} to Postgres; only "
                                       f"{sorted(POSTGRES_CLIENTS)} may connect")


def mounts_engine_socket(path: str) -> bool:
    p = PurePosixPath(path)
    for sock in ENGINE_SOCKETS:
        s = PurePosixPath(sock)
        if p == s or p in s.parents:
            return True
    return p.name.endswith(".sock") and any(k in p.name for k in ("docker", "containerd", "crio", "podman"))


def check_engine_socket(objects: list[dict], res: Result) -> None:
    holders = []
    for w in by_kind(objects, *WORKLOADS, "Pod", "Job", "CronJob"):
        for pod in pod_specs(w):
            for v in pod.get("volumes") or []:
                hp = v.get("hostPath")
                if hp and mounts_engine_socket(hp.get("path", "")):
                    holders.append(w["metadata"]["name"])
                    if w["metadata"]["name"] != ENGINE_SOCKET_HOLDER:
                        res.fail(ident(w), f"mounts the container engine through hostPath {hp['path']}: only "
                                           f"{ENGINE_SOCKET_HOLDER} may hold the engine socket")
    if ENGINE_SOCKET_HOLDER not in holders:
        res.fail(f"DaemonSet/{ENGINE_SOCKET_HOLDER}", "does not mount the engine socket it exists for")


def effective(c: dict, pod: dict, key: str):
    sc = c.get("securityContext") or {}
    if key in sc:
        return sc[key]
    return (pod.get("securityContext") or {}).get(key)


def check_security(objects: list[dict], res: Result) -> None:
    for w in by_kind(objects, *WORKLOADS, "Pod", "Job", "CronJob"):
        name = w["metadata"]["name"]
        allowed = SECURITY_EXCEPTIONS.get(name, set())
        for pod in pod_specs(w):
            if pod.get("automountServiceAccountToken") is not False:
                res.fail(ident(w), "automountServiceAccountToken must be false: no pod here talks to the API server")
            for c in containers(pod):
                where = f"{ident(w)} container {c.get('name')}"
                sc = c.get("securityContext") or {}
                if effective(c, pod, "runAsNonRoot") is not True and "runAsNonRoot" not in allowed:
                    res.fail(where, "securityContext.runAsNonRoot must be true")
                if sc.get("readOnlyRootFilesystem") is not True:
                    res.fail(where, "securityContext.readOnlyRootFilesystem must be true")
                if sc.get("allowPrivilegeEscalation") is not False:
                    res.fail(where, "securityContext.allowPrivilegeEscalation must be false")
                if sc.get("privileged"):
                    res.fail(where, "securityContext.privileged must not be set")
                caps = sc.get("capabilities") or {}
                if "ALL" not in (caps.get("drop") or []):
                    res.fail(where, "securityContext.capabilities.drop must contain ALL")
                if caps.get("add"):
                    res.fail(where, f"securityContext.capabilities.add must be empty, not {caps['add']}")
                seccomp = effective(c, pod, "seccompProfile") or {}
                if seccomp.get("type") != "RuntimeDefault":
                    res.fail(where, "securityContext.seccompProfile.type must be RuntimeDefault")


def check_resources_and_probes(objects: list[dict], res: Result) -> None:
    for w in by_kind(objects, *WORKLOADS):
        reason = (w["metadata"].get("annotations") or {}).get(NO_PROBES, "").strip()
        for pod in pod_specs(w):
            for c in pod.get("containers") or []:
                where = f"{ident(w)} container {c.get('name')}"
                r = c.get("resources") or {}
                for kind in ("requests", "limits"):
                    for res_name in ("cpu", "memory"):
                        if res_name not in (r.get(kind) or {}):
                            res.fail(where, f"resources.{kind}.{res_name} is missing")
                if not reason:
                    for probe in ("livenessProbe", "readinessProbe"):
                        if probe not in c:
                            res.fail(where, f"{probe} is missing (or annotate the workload {NO_PROBES} with why)")


def secret_keys(obj: dict) -> set[str]:
    return set((obj.get("data") or {}).keys()) | set((obj.get("stringData") or {}).keys())


def mounted_files(objects: list[dict], pod: dict, c: dict, where: str, res: Result) -> tuple[dict, list]:
    """Path -> (kind, name) of every ConfigMap/Secret file the container sees, and the
    Secrets it mounts."""
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    files: dict[str, tuple[str, str]] = {}
    secrets = []

    def add(mount_path: str, kind: str, name: str, items, sub_path: str | None):
        obj = find(objects, kind, name)
        if obj is None:
            res.fail(where, f"mounts {kind} {name!r}, which the base does not define")
            return
        keys = secret_keys(obj) if kind == "Secret" else set((obj.get("data") or {}).keys())
        mapping = {i["key"]: i["path"] for i in items} if items else {k: k for k in keys}
        for key, rel in mapping.items():
            if key not in keys:
                res.fail(where, f"projects key {key!r} that {kind} {name!r} does not have")
            if sub_path is None:
                files[str(PurePosixPath(mount_path) / rel)] = (kind, name)
            elif sub_path == rel:
                files[mount_path] = (kind, name)

    for m in c.get("volumeMounts") or []:
        v = volumes.get(m["name"])
        if v is None:
            continue
        sub = m.get("subPath")
        if "configMap" in v:
            add(m["mountPath"], "ConfigMap", v["configMap"]["name"], v["configMap"].get("items"), sub)
        if "secret" in v:
            secrets.append((m, v, v["secret"]))
            add(m["mountPath"], "Secret", v["secret"]["secretName"], v["secret"].get("items"), sub)
        if "projected" in v:
            for s in v["projected"].get("sources") or []:
                if "configMap" in s:
                    add(m["mountPath"], "ConfigMap", s["configMap"]["name"], s["configMap"].get("items"), sub)
                if "secret" in s:
                    secrets.append((m, v, s["secret"]))
                    add(m["mountPath"], "Secret", s["secret"]["name"], s["secret"].get("items"), sub)
    return files, secrets


def config_paths(value) -> list[str]:
    """Every string in a parsed TOML value that is a path under the mounted directories."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in config_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in config_paths(v)]
    if isinstance(value, str) and (value.startswith(CONFIG_DIR + "/") or value.startswith(SECRETS_DIR + "/")):
        return [value]
    return []


def check_secrets_and_files(objects: list[dict], res: Result) -> None:
    users: dict[str, list[str]] = {}
    for w in by_kind(objects, *WORKLOADS):
        for pod in pod_specs(w):
            for c in containers(pod):
                where = f"{ident(w)} container {c.get('name')}"
                for e in c.get("env") or []:
                    if "secretKeyRef" in (e.get("valueFrom") or {}):
                        res.fail(where, f"env {e['name']} takes a Secret's value: mount the Secret as a file and "
                                        f"point {e['name']}_FILE at it")
                    value = e.get("value") or ""
                    if "://" in value and "@" in value:
                        res.fail(where, f"env {e['name']} holds a URL with credentials: put it in the Secret")
                for ef in c.get("envFrom") or []:
                    if "secretRef" in ef:
                        res.fail(where, f"envFrom secretRef {ef['secretRef'].get('name')!r} puts a Secret into "
                                        f"the environment: mount it as files")
                files, secrets = mounted_files(objects, pod, c, where, res)
                for mount, volume, src in secrets:
                    name = src.get("secretName") or src.get("name")
                    users.setdefault(name, []).append(ident(w))
                    if mount.get("readOnly") is not True:
                        res.fail(where, f"mounts Secret {name!r} writable: set readOnly: true")
                    mode = src.get("defaultMode", (volume.get("projected") or {}).get("defaultMode"))
                    if mode != 0o400:
                        shown = oct(mode) if isinstance(mode, int) else mode
                        res.fail(where, f"mounts Secret {name!r} with mode {shown}: use defaultMode 0400")
                for e in c.get("env") or []:
                    if e["name"].endswith("_FILE"):
                        path = e.get("value", "")
                        if path not in files:
                            res.fail(where, f"env {e['name']}={path} names no file the container mounts")
                        elif path.startswith(SECRETS_DIR + "/") and files[path][0] != "Secret":
                            res.fail(where, f"env {e['name']} points at a ConfigMap file under {SECRETS_DIR}")
                args = c.get("args") or []
                if "--config" in args:
                    cfg = args[args.index("--config") + 1] if args.index("--config") + 1 < len(args) else ""
                    if cfg not in files:
                        res.fail(where, f"--config {cfg} is not a file the container mounts")
                        continue
                    kind, cm_name = files[cfg]
                    cm = find(objects, kind, cm_name)
                    text = (cm.get("data") or {}).get(PurePosixPath(cfg).name, "")
                    try:
                        parsed = tomllib.loads(text)
                    except tomllib.TOMLDecodeError as e:
                        res.fail(f"{kind}/{cm_name}", f"{PurePosixPath(cfg).name} is not valid TOML: {e}")
                        continue
                    for path in config_paths(parsed):
                        if path not in files:
                            res.fail(where, f"its config names {path}, which the container does not mount")
    for name, workloads in users.items():
        if len(set(workloads)) > 1:
            res.fail(f"Secret/{name}", f"mounted by {sorted(set(workloads))}: one Secret per process")


def check_images(objects: list[dict], res: Result) -> None:
    for w in by_kind(objects, *WORKLOADS):
        for pod in pod_specs(w):
            for c in containers(pod):
                if not c.get("_image_covered"):
                    res.fail(f"{ident(w)} container {c.get('name')}",
                             f"image {c.get('image')!r} is not in kustomization.yaml `images`: "
                             f"operators could not pin its tag")


def check_keda(objects: list[dict], kust: dict, keda_schema: dict, res: Result) -> None:
    namespace = kust.get("namespace") or "default"
    scaled = {s["spec"]["scaleTargetRef"].get("name"): s for s in by_kind(objects, "ScaledObject")
              if isinstance(s.get("spec"), dict) and isinstance(s["spec"].get("scaleTargetRef"), dict)}
    auth_params = set(keda_schema["$defs"]["RedisAuthParameter"]["enum"])
    for w in by_kind(objects, "Deployment"):
        labels = pod_labels(w)
        if labels.get("app.kubernetes.io/component") != "worker":
            continue
        role = labels.get("agentfleet.io/role")
        so = scaled.get(w["metadata"]["name"])
        where = ident(w)
        if so is None:
            res.fail(where, "no ScaledObject scales this worker")
            continue
        if "replicas" in w["spec"]:
            res.fail(where, "sets spec.replicas, which KEDA owns: every `kubectl apply` would reset the scale")
        spec = so["spec"]
        triggers = [t for t in spec.get("triggers") or [] if t.get("type") == "redis-streams"]
        if ((spec.get("advanced") or {}).get("scalingModifiers") or {}).get("formula") and any(
                "pendingEntriesCount" in (t.get("metadata") or {}) for t in triggers):
            res.fail(ident(so), "combines a pendingEntriesCount trigger in a scalingModifiers formula: KEDA counts "
                                "the object inactive while any trigger fails, XPENDING fails (NOGROUP) until a worker "
                                "created the group, so the role would never leave zero replicas")
        if not triggers:
            res.fail(ident(so), "has no redis-streams trigger")
        if spec.get("minReplicaCount", 0) == 0 and not any("lagCount" in t.get("metadata", {}) for t in triggers):
            res.fail(ident(so), "scales to zero without a lagCount trigger: the pending count of a role with no "
                                "replica never rises, so it would never scale up again")
        for t in triggers:
            md = t.get("metadata") or {}
            tw = f"{ident(so)} trigger {t.get('name', '?')}"
            if md.get("stream") != f"fleet:tasks:{role}":
                res.fail(tw, f"reads stream {md.get('stream')!r}, not the role's fleet:tasks:{role}")
            if md.get("consumerGroup") != role:
                res.fail(tw, f"reads consumer group {md.get('consumerGroup')!r}, not the role's {role!r}")
            if md.get("enableTLS") != "true":
                res.fail(tw, "must set enableTLS: \"true\" (Redis takes TLS only)")
            for secret_key in ("password", "sentinelPassword", "username"):
                if secret_key in md:
                    res.fail(tw, f"metadata.{secret_key}: credentials belong in the TriggerAuthentication")
            host = (md.get("address") or "").rsplit(":", 1)[0]
            if host.count(".") < 2 or host.split(".")[1] != namespace:
                res.fail(tw, f"address {md.get('address')!r} must name the Service in namespace {namespace!r} "
                             f"in full (KEDA runs in its own namespace)")
            ref = (t.get("authenticationRef") or {}).get("name")
            auth = find(objects, "TriggerAuthentication", ref) if ref else None
            if auth is None:
                res.fail(tw, f"authenticationRef {ref!r} names no TriggerAuthentication of the base")
                continue
            refs = (auth.get("spec") or {}).get("secretTargetRef") or []
            params = {r.get("parameter") for r in refs}
            for p in sorted(params - auth_params):
                res.fail(ident(auth), f"parameter {p!r} is not one the redis scalers read")
            if "tls" in params and "enableTLS" in md:
                res.fail(ident(auth), "sets `tls` while the trigger sets enableTLS: KEDA refuses both")
            if not {"username", "password"} <= params:
                res.fail(ident(auth), "must give username and password (the `monitor` ACL user)")
            for r in refs:
                secret = find(objects, "Secret", r.get("name"))
                if secret is None or r.get("key") not in secret_keys(secret):
                    res.fail(ident(auth), f"{r.get('parameter')}: Secret {r.get('name')!r} has no key {r.get('key')!r}")


def check_policy_and_ledger(objects: list[dict], repo_root: Path, res: Result) -> None:
    policy = find(objects, "ConfigMap", "fleet-policy")
    if policy is None:
        res.fail("ConfigMap/fleet-policy", "missing")
    else:
        for key, source in POLICY_FILES.items():
            want = (repo_root / source).read_text()
            if (policy.get("data") or {}).get(key) != want:
                res.fail("ConfigMap/fleet-policy", f"{key} differs from {source}: run `check.py --write-policy`")
    orch = find(objects, "ConfigMap", "orchestrator-config")
    budget = find(objects, "ConfigMap", "budget-config")
    if orch is None or budget is None:
        res.fail("ConfigMap", "orchestrator-config and budget-config must both exist")
        return
    try:
        ledger = tomllib.loads(orch["data"]["ledger.toml"])
        budget_ledger = tomllib.loads(budget["data"]["config.toml"]).get("ledger")
    except (KeyError, tomllib.TOMLDecodeError) as e:
        res.fail("ConfigMap", f"cannot read the two ledgers: {e}")
        return
    if ledger != budget_ledger:
        res.fail("ConfigMap/budget-config", "[ledger] differs from orchestrator-config's ledger.toml: the model "
                                            "proxy and the budget manager would meter with different limits")


def check_redis(objects: list[dict], res: Result) -> None:
    cm = find(objects, "ConfigMap", "redis-config")
    conf = ((cm or {}).get("data") or {}).get("redis.conf", "")
    settings = {}
    for line in conf.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            settings[key.lower()] = value.strip()
    for key, want in [("port", "0"), ("tls-port", "6379"), ("appendonly", "yes"), ("appendfsync", "everysec")]:
        if settings.get(key) != want:
            res.fail("ConfigMap/redis-config", f"redis.conf must say `{key} {want}`, not {settings.get(key)!r}")


def check(base: Path, repo_root: Path) -> Result:
    res = Result()
    try:
        objects, kust = render(base)
    except (CheckError, yaml.YAMLError, OSError) as e:
        res.fail("render", str(e))
        return res
    keda_schema = json.loads((base / "keda-schema.json").read_text())
    validate_schemas(objects, keda_schema, res)
    ns_obj = find(objects, "Namespace", kust.get("namespace", ""))
    ns_labels = dict(((ns_obj or {}).get("metadata") or {}).get("labels") or {})
    ns_labels["kubernetes.io/metadata.name"] = kust.get("namespace", "")
    for step in (
        lambda: check_network_coverage(objects, res),
        lambda: check_postgres_reach(objects, ns_labels, res),
        lambda: check_engine_socket(objects, res),
        lambda: check_security(objects, res),
        lambda: check_resources_and_probes(objects, res),
        lambda: check_secrets_and_files(objects, res),
        lambda: check_images(objects, res),
        lambda: check_keda(objects, kust, keda_schema, res),
        lambda: check_policy_and_ledger(objects, repo_root, res),
        lambda: check_redis(objects, res),
    ):
        try:
            step()
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            # A shape the schema step has already reported; say where the check tripped.
            res.fail("check", f"{type(e).__name__}: {e} (an object is malformed; see the schema errors)")
    return res


# ---------------------------------------------------------------------------------------
# Self-test: broken copies that must be refused.


def edit_docs(base: Path, filename: str, edit) -> None:
    path = base / filename
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        edit(d)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def named(kind: str, name: str):
    def wrap(fn):
        def apply(doc):
            if doc.get("kind") == kind and doc["metadata"].get("name") == name:
                fn(doc)
        return apply
    return wrap


def worker_container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


def misspell_lag(doc):
    md = doc["spec"]["triggers"][0]["metadata"]
    md["lagcount"] = md.pop("lagCount")


def mount_docker_sock(doc):
    pod = doc["spec"]["template"]["spec"]
    pod["volumes"].append({"name": "docker", "hostPath": {"path": "/var/run/docker.sock", "type": "Socket"}})
    worker_container(doc)["volumeMounts"].append({"name": "docker", "mountPath": "/var/run/docker.sock"})


def mount_var_run(doc):
    pod = doc["spec"]["template"]["spec"]
    pod["volumes"].append({"name": "varrun", "hostPath": {"path": "/var/run", "type": "Directory"}})
    worker_container(doc)["volumeMounts"].append({"name": "varrun", "mountPath": "/host/run", "readOnly": True})


def workers_to_postgres(doc):
    doc["spec"]["egress"].append({"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "postgres"}}}],
                                  "ports": [{"protocol": "TCP", "port": 5432}]})


def workers_everywhere(doc):
    doc["spec"]["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})


def writable_root(doc):
    worker_container(doc)["securityContext"]["readOnlyRootFilesystem"] = False


def secret_in_env(doc):
    worker_container(doc)["env"].append(
        {"name": "FLEET_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "budget", "key": "redis-url"}}})


def secret_mode(doc):
    for v in doc["spec"]["template"]["spec"]["volumes"]:
        if "secret" in v:
            v["secret"]["defaultMode"] = 0o444


def unknown_field(doc):
    worker_container(doc)["imagePullPolicy"] = "IfNotPresent"
    worker_container(doc)["imagePulPolicy"] = "Always"


def wrong_group(doc):
    for t in doc["spec"]["triggers"]:
        t["metadata"]["consumerGroup"] = "qa"


def add_formula(doc):
    doc["spec"].setdefault("advanced", {})["scalingModifiers"] = {
        "formula": "queued + running", "target": "1", "metricType": "AverageValue"}


def config_path_unmounted(doc):
    doc["data"]["config.toml"] = doc["data"]["config.toml"].replace(
        "/run/secrets/agentfleet/keyset.toml", "/run/secrets/agentfleet/dev.keyset.toml")


def ledger_drift(doc):
    doc["data"]["config.toml"] = doc["data"]["config.toml"].replace("daily_tokens = 5_000_000", "daily_tokens = 6_000_000")


def runner_dropped(base: Path) -> None:
    path = base / "networkpolicies.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    path.write_text(yaml.safe_dump_all([d for d in docs if d["metadata"]["name"] != "sandbox-runner"], sort_keys=False))


# (what is broken, file, edit, a phrase the refusal must contain)
BREAKAGES = [
    ("a ScaledObject with the metadata key lagCount misspelt lagcount", "keda.yaml",
     named("ScaledObject", "dev-worker")(misspell_lag), "Additional properties are not allowed ('lagcount'"),
    ("the dev worker mounting /var/run/docker.sock", "workers.yaml",
     named("Deployment", "dev-worker")(mount_docker_sock), "only sandbox-runner may hold the engine socket"),
    ("the qa worker mounting the host's /var/run (which holds docker.sock)", "workers.yaml",
     named("Deployment", "qa-worker")(mount_var_run), "mounts the container engine through hostPath /var/run"),
    ("the workers' policy allowing Postgres on 5432", "networkpolicies.yaml",
     named("NetworkPolicy", "workers")(workers_to_postgres), "lets a worker"),
    ("the workers' policy allowing every port to 0.0.0.0/0", "networkpolicies.yaml",
     named("NetworkPolicy", "workers")(workers_everywhere), "reach Postgres on 5432"),
    ("the sandbox runner's own NetworkPolicy removed", None, runner_dropped,
     "selected by no NetworkPolicy of their own"),
    ("a writable root filesystem for the review worker", "workers.yaml",
     named("Deployment", "review-worker")(writable_root), "readOnlyRootFilesystem must be true"),
    ("a Secret's value in the refactor worker's environment", "workers.yaml",
     named("Deployment", "refactor-worker")(secret_in_env), "takes a Secret's value"),
    ("the budget's Secret mounted with mode 0444", "budget.yaml",
     named("Deployment", "budget")(secret_mode), "use defaultMode 0400"),
    ("a misspelt container field (imagePulPolicy)", "orchestrator.yaml",
     named("Deployment", "orchestrator")(unknown_field), "Kubernetes 1.33 schema"),
    ("a ScaledObject reading another role's consumer group", "keda.yaml",
     named("ScaledObject", "review-worker")(wrong_group), "not the role's 'review'"),
    ("a ScaledObject summing lag and pending in a scalingModifiers formula", "keda.yaml",
     named("ScaledObject", "qa-worker")(add_formula), "would never leave zero replicas"),
    ("a worker config naming a secret file its pod does not mount", "configmaps.yaml",
     named("ConfigMap", "dev-worker-config")(config_path_unmounted), "which the container does not mount"),
    ("budget's [ledger] drifting from the orchestrator's ledger.toml", "configmaps.yaml",
     named("ConfigMap", "budget-config")(ledger_drift), "[ledger] differs"),
]


def self_test(repo_root: Path) -> list[str]:
    """Runs every breakage on a fresh copy; returns the problems with the checker itself."""
    problems = []
    for what, filename, edit, phrase in BREAKAGES:
        with tempfile.TemporaryDirectory(prefix="agentfleet-k8s-selftest-") as tmp:
            copy_dir = Path(tmp) / "k8s"
            shutil.copytree(HERE, copy_dir, ignore=shutil.ignore_patterns("__pycache__", "*.py", "*.sh", "*.txt"))
            if filename:
                edit_docs(copy_dir, filename, edit)
            else:
                edit(copy_dir)
            res = check(copy_dir, repo_root)
            hits = [e for e in res.errors if phrase in e]
            if not res.errors:
                problems.append(f"{what}: the broken copy passed")
            elif not hits:
                problems.append(f"{what}: refused, but not for that reason ({'; '.join(res.errors[:3])})")
            else:
                print(f"  refused as it must be: {what}\n    {hits[0]}")
    return problems


def write_policy(repo_root: Path) -> None:
    lines = [
        "# GENERATED by `deploy/k8s/check.py --write-policy` from config/permissions.toml and",
        "# config/risk_matrix.toml; check.py fails when they differ. Edit those files, not this one.",
        "#",
        "# Mounted into the orchestrator, the budget manager and the workers at",
        "# /etc/agentfleet/permissions.toml and /etc/agentfleet/risk_matrix.toml.",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: fleet-policy",
        "  labels:",
        "    app.kubernetes.io/part-of: agentfleet",
        "data:",
    ]
    for key, source in POLICY_FILES.items():
        text = (repo_root / source).read_text()
        if not text.endswith("\n"):
            raise CheckError(f"{source} must end with a newline to be kept byte for byte")
        lines.append(f"  {key}: |")
        lines.extend(("    " + line) if line else "" for line in text.splitlines())
    (HERE / "policy-configmap.yaml").write_text("\n".join(lines) + "\n")
    # The block scalar must give back the files exactly.
    data = yaml.safe_load((HERE / "policy-configmap.yaml").read_text())["data"]
    for key, source in POLICY_FILES.items():
        if data[key] != (repo_root / source).read_text():
            raise CheckError(f"{source} cannot be kept byte for byte in a YAML block (trailing spaces or blank lines at the end?)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=HERE, help="the kustomize base to check [deploy/k8s]")
    ap.add_argument("--repo-root", type=Path, default=REPO_ROOT, help="the repository, for config/*.toml")
    ap.add_argument("--self-test", action="store_true", help="also check that broken copies are refused")
    ap.add_argument("--write-policy", action="store_true", help="regenerate policy-configmap.yaml and exit")
    args = ap.parse_args()
    if args.write_policy:
        write_policy(args.repo_root)
        print("wrote policy-configmap.yaml")
        return 0
    if not (args.base / "kustomization.yaml").is_file():
        print(f"check.py: {args.base} has no kustomization.yaml", file=sys.stderr)
        return 64

    res = check(args.base, args.repo_root)
    for e in res.errors:
        print(f"FAIL {e}")
    if res.errors:
        print(f"{len(res.errors)} problems in {args.base}")
        return 1
    print(f"ok: {res.objects} objects valid for Kubernetes {K8S_VERSION} "
          f"(strict schemas of kubernetes-validate {kubernetes_validate.__version__}), "
          f"{res.keda_objects} KEDA objects valid against keda-schema.json")
    for inv in INVARIANTS:
        print(f"  holds: {inv}")

    if args.self_test:
        print(f"self-test: {len(BREAKAGES)} broken copies")
        problems = self_test(args.repo_root)
        for p in problems:
            print(f"FAIL self-test: {p}")
        if problems:
            return 1
        print(f"self-test: all {len(BREAKAGES)} broken copies refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
