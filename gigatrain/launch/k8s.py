"""Kubernetes manifests: a Kubeflow PyTorchJob or a JobSet, with the config in a ConfigMap.

The manifest is a `v1/List` of two objects, written as JSON (which is YAML, and which
`kubectl apply -f` reads): a ConfigMap holding the config TOML exactly as written, mounted
read-only at CONFIG_DIR in every pod, and the job. Each pod is one node: a container
running torchrun with `--nproc-per-node` processes, meeting the other pods through a c10d
rendezvous on the first pod. Overrides go on the command line, as with Slurm.

PyTorchJob (Kubeflow training operator): Worker replicas only, with an elasticPolicy. The
operator's webhook requires a Worker spec whenever elasticPolicy is set and a Master to be
exactly one pod, so "Master + Worker" could not express one node; the operator names the
first pod's service `<job>-worker-0`, which is also its own default rendezvous host.

JobSet: one replicated Job of `nodes` indexed pods with DNS hostnames
`<jobset>-node-0-<i>.<jobset>`; the rendezvous is on pod 0.

With fault.recovery=replica the List also holds torchft's Lighthouse (a one-pod Deployment and
its Service `<job>-lighthouse`), and one job per replica group, `<job>-r<i>`, each with
nodes / R pods, its own rendezvous and restarts, TORCHFT_LIGHTHOUSE pointing at the Service
and `--fault.replica_groups=R --fault.replica_id=i`: a failed group's pods restart alone while
the other groups train on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import PurePosixPath

from gigatrain.launch import (LIGHTHOUSE_PORT, Job, LaunchError, lighthouse_args, replica_groups, replica_overrides,
                              require_match)

KINDS = ("pytorchjob", "jobset")
CONFIG_DIR = "/etc/gigatrain"
CONFIG_FILE = "config.toml"
REPLICATED_JOB = "node"
CONTAINER = "pytorch"  # the training operator looks for a container of this name
# On eviction or pre-emption the kubelet sends SIGTERM and waits GRACE_S before SIGKILL;
# torchrun forwards the SIGTERM and waits SHUTDOWN_S for the workers' checkpoint (Slurm's values).
SHUTDOWN_S = 100
GRACE_S = 120
DNS_1035 = r"[a-z]([-a-z0-9]*[a-z0-9])?"
DNS_1123 = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


def k8s_name(text: str) -> str:
    """A DNS-1035 label from a run name: lowercase, runs of other characters as '-'."""
    name = "".join(c if c.isalnum() and c.isascii() else "-" for c in text.lower())
    name = "-".join(part for part in name.split("-") if part)
    if not name or not name[0].isalpha():
        name = "gt-" + name
    return name


def _pod_suffix(kind: str, nodes: int, groups: int = 1) -> str:
    """The longest pod name's tail: `-r<last group>` with replica groups, then the pod's own."""
    group = f"-r{groups - 1}" if groups > 1 else ""
    per_group = nodes // groups
    return group + (f"-worker-{per_group - 1}" if kind == "pytorchjob" else f"-{REPLICATED_JOB}-0-{per_group - 1}")


def default_name(run_name: str, kind: str, nodes: int, groups: int = 1) -> str:
    """gigatrain-<run name> as a DNS label, shortened so that its pod names fit."""
    name = k8s_name("gigatrain-" + run_name)
    return name[: 63 - len(_pod_suffix(kind, nodes, groups))].rstrip("-")


def check_name(name: str, kind: str, nodes: int, groups: int = 1) -> None:
    """Pods and services are named `<name>-worker-<i>` (PyTorchJob) or `<name>-node-0-<i>`
    (JobSet), with `-r<group>` after the name for replica groups, and must stay DNS labels of
    at most 63 characters."""
    require_match("job name", name, DNS_1035, "use lowercase letters, digits and '-', starting with a letter")
    suffix = _pod_suffix(kind, nodes, groups)
    if len(name) + len(suffix) > 63:
        raise LaunchError(f"job name {name!r} is too long: its pod names ({name}{suffix}) must fit in 63 characters; "
                          f"pass a shorter --job-name")


def parse_volume(text: str) -> tuple[str, str]:
    """'CLAIM:/mount/path' -> (claim, path): a PersistentVolumeClaim every pod mounts."""
    claim, sep, path = text.partition(":")
    if not sep or not PurePosixPath(path).is_absolute():
        raise LaunchError(f"--volume {text!r} is not valid; write CLAIM:/absolute/mount/path")
    require_match("volume claim", claim, DNS_1123 + r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", "use a PersistentVolumeClaim name")
    return claim, path


def _rendezvous_host(job: Job, kind: str) -> str:
    if kind == "pytorchjob":
        return f"{job.name}-worker-0"
    return f"{job.name}-{REPLICATED_JOB}-0-0.{job.name}"


def command(job: Job, kind: str) -> list[str]:
    """torchrun with every rendezvous setting spelled out, so a pod's command says what it does
    (the training operator's PET_* variables say the same; arguments take precedence)."""
    return ["torchrun",
            f"--nnodes={job.nodes}",
            f"--nproc-per-node={job.procs_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={_rendezvous_host(job, kind)}:{job.port}",
            f"--rdzv-id={job.name}",
            f"--max-restarts={job.max_restarts}",
            *job.train_args(f"{CONFIG_DIR}/{CONFIG_FILE}")]


def container(job: Job, kind: str, image: str, volumes: list[tuple[str, str]], env: tuple[dict, ...] = ()) -> dict:
    if job.cpu:
        resources = {"requests": {"cpu": str(job.procs_per_node)}, "limits": {"cpu": str(job.procs_per_node)}}
    else:
        resources = {"limits": {"nvidia.com/gpu": job.procs_per_node}}
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    mounts += [{"name": f"volume-{i}", "mountPath": path} for i, (_, path) in enumerate(volumes)]
    port = {"containerPort": job.port, "name": "pytorchjob-port" if kind == "pytorchjob" else "rendezvous"}
    return {"name": CONTAINER,
            "image": image,
            "command": command(job, kind),
            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"},
                    {"name": "OMP_NUM_THREADS", "value": "1"},
                    # On SIGTERM (eviction), torchrun waits this long for its workers' checkpoint.
                    {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(SHUTDOWN_S)}, *env],
            "ports": [port],
            "resources": resources,
            "volumeMounts": mounts}


def pod_volumes(job: Job, volumes: list[tuple[str, str]], config_name: str | None = None) -> list[dict]:
    # /dev/shm is 64 MiB in a container by default; NCCL and torch's shared tensors need more.
    return [{"name": "config", "configMap": {"name": config_name or f"{job.name}-config"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            *({"name": f"volume-{i}", "persistentVolumeClaim": {"claimName": claim}}
              for i, (claim, _) in enumerate(volumes))]


def pod_template(job: Job, kind: str, image: str, volumes: list[tuple[str, str]], group: dict | None = None,
                 **spec) -> dict:
    """The pod each node runs: the kind's own `spec` fields, then the grace period, the container
    and the volumes. `group`: a replica group's environment and the whole job's ConfigMap."""
    group = group or {}
    return {"metadata": {"labels": _labels(job)},
            "spec": {**spec, "terminationGracePeriodSeconds": GRACE_S,
                     "containers": [container(job, kind, image, volumes, group.get("env", ()))],
                     "volumes": pod_volumes(job, volumes, group.get("config_name"))}}


def config_map(job: Job, namespace: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{job.name}-config", "namespace": namespace, "labels": _labels(job)},
            "data": {CONFIG_FILE: job.config_text}}


def _labels(job: Job) -> dict:
    return {"app.kubernetes.io/name": "gigatrain", "app.kubernetes.io/instance": job.name}


def pytorchjob(job: Job, image: str, namespace: str, volumes: list[tuple[str, str]], group: dict | None = None) -> dict:
    pod = pod_template(job, "pytorchjob", image, volumes, group)
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": job.name, "namespace": namespace, "labels": _labels(job)},
            "spec": {"nprocPerNode": str(job.procs_per_node),
                     "elasticPolicy": {"rdzvBackend": "c10d", "rdzvPort": job.port, "rdzvId": job.name,
                                       "minReplicas": job.nodes, "maxReplicas": job.nodes,
                                       "maxRestarts": job.max_restarts},
                     # Keep finished pods for their logs; the run's state is in the run directory.
                     "runPolicy": {"cleanPodPolicy": "None"},
                     "pytorchReplicaSpecs": {"Worker": {"replicas": job.nodes, "restartPolicy": "OnFailure",
                                                        "template": pod}}}}


def jobset(job: Job, image: str, namespace: str, volumes: list[tuple[str, str]], group: dict | None = None) -> dict:
    pod = pod_template(job, "jobset", image, volumes, group,
                       subdomain=job.name,  # the JobSet's headless service: <pod hostname>.<jobset>
                       restartPolicy="Never")  # a failed pod fails its Job; the JobSet restarts them all
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": job.name, "namespace": namespace, "labels": _labels(job)},
            "spec": {"failurePolicy": {"maxRestarts": job.max_restarts},
                     "network": {"enableDNSHostnames": True, "subdomain": job.name, "publishNotReadyAddresses": True},
                     "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1,
                                         "template": {"spec": {"parallelism": job.nodes, "completions": job.nodes,
                                                               "completionMode": "Indexed", "backoffLimit": 0,
                                                               "template": pod}}}]}}


def lighthouse(job: Job, image: str, namespace: str) -> list[dict]:
    """torchft's Lighthouse: a one-pod Deployment (restarted by Kubernetes if it fails) and the
    Service `<job>-lighthouse` the replica groups reach it at."""
    name = f"{job.name}-lighthouse"
    labels = {**_labels(job), "app.kubernetes.io/component": "lighthouse"}
    pod = {"metadata": {"labels": labels},
           "spec": {"containers": [{"name": "lighthouse", "image": image, "command": lighthouse_args(),
                                    "ports": [{"containerPort": LIGHTHOUSE_PORT, "name": "lighthouse"}],
                                    "resources": {"requests": {"cpu": "1"}}}]}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": name, "namespace": namespace, "labels": labels},
                  "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": pod}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace, "labels": labels},
               "spec": {"selector": labels,
                        "ports": [{"name": "lighthouse", "port": LIGHTHOUSE_PORT, "targetPort": LIGHTHOUSE_PORT}]}}
    return [deployment, service]


def lighthouse_url(job: Job) -> str:
    return f"http://{job.name}-lighthouse:{LIGHTHOUSE_PORT}"


def render(job: Job, *, kind: str = "pytorchjob", image: str, namespace: str = "default",
           volumes: list[tuple[str, str]] = ()) -> str:
    """The manifest as JSON: a List of the ConfigMap and the job (with fault.recovery=replica:
    the Lighthouse's Deployment and Service, and one job per replica group)."""
    if kind not in KINDS:
        raise LaunchError(f"--kind {kind!r} is not valid; choose one of: {', '.join(KINDS)}")
    groups = replica_groups(job.cfg)
    check_name(job.name, kind, job.nodes, groups)
    require_match("--namespace", namespace, DNS_1123, "use a namespace name (lowercase letters, digits and '-')")
    if not image or any(c.isspace() for c in image):
        raise LaunchError(f"--image {image!r} is not valid; pass a container image reference such as registry/gigatrain:tag")
    volumes = list(volumes)
    build = pytorchjob if kind == "pytorchjob" else jobset
    items = [config_map(job, namespace)]
    if groups == 1:
        items.append(build(job, image, namespace, volumes))
    else:
        items += lighthouse(job, image, namespace)
        for group in range(groups):
            member = dataclasses.replace(job, name=f"{job.name}-r{group}", nodes=job.nodes // groups,
                                         overrides=job.overrides + replica_overrides(group, groups))
            env = ({"name": "TORCHFT_LIGHTHOUSE", "value": lighthouse_url(job)},
                   {"name": "REPLICA_GROUP_ID", "value": str(group)})
            items.append(build(member, image, namespace, volumes, {"env": env, "config_name": f"{job.name}-config"}))
    manifest = {"apiVersion": "v1", "kind": "List", "items": items}
    return json.dumps(manifest, indent=2) + "\n"
