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
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath

from gigatrain.launch import Job, LaunchError, require_match

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


def _pod_suffix(kind: str, nodes: int) -> str:
    return f"-worker-{nodes - 1}" if kind == "pytorchjob" else f"-{REPLICATED_JOB}-0-{nodes - 1}"


def default_name(run_name: str, kind: str, nodes: int) -> str:
    """gigatrain-<run name> as a DNS label, shortened so that its pod names fit."""
    name = k8s_name("gigatrain-" + run_name)
    return name[: 63 - len(_pod_suffix(kind, nodes))].rstrip("-")


def check_name(name: str, kind: str, nodes: int) -> None:
    """Pods and services are named `<name>-worker-<i>` (PyTorchJob) or `<name>-node-0-<i>`
    (JobSet) and must stay DNS labels of at most 63 characters."""
    require_match("job name", name, DNS_1035, "use lowercase letters, digits and '-', starting with a letter")
    suffix = _pod_suffix(kind, nodes)
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


def container(job: Job, kind: str, image: str, volumes: list[tuple[str, str]]) -> dict:
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
                    {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(SHUTDOWN_S)}],
            "ports": [port],
            "resources": resources,
            "volumeMounts": mounts}


def pod_volumes(job: Job, volumes: list[tuple[str, str]]) -> list[dict]:
    # /dev/shm is 64 MiB in a container by default; NCCL and torch's shared tensors need more.
    return [{"name": "config", "configMap": {"name": f"{job.name}-config"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            *({"name": f"volume-{i}", "persistentVolumeClaim": {"claimName": claim}}
              for i, (claim, _) in enumerate(volumes))]


def pod_template(job: Job, kind: str, image: str, volumes: list[tuple[str, str]], **spec) -> dict:
    """The pod each node runs: the kind's own `spec` fields, then the grace period, the container
    and the volumes."""
    return {"metadata": {"labels": _labels(job)},
            "spec": {**spec, "terminationGracePeriodSeconds": GRACE_S,
                     "containers": [container(job, kind, image, volumes)],
                     "volumes": pod_volumes(job, volumes)}}


def config_map(job: Job, namespace: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{job.name}-config", "namespace": namespace, "labels": _labels(job)},
            "data": {CONFIG_FILE: job.config_text}}


def _labels(job: Job) -> dict:
    return {"app.kubernetes.io/name": "gigatrain", "app.kubernetes.io/instance": job.name}


def pytorchjob(job: Job, image: str, namespace: str, volumes: list[tuple[str, str]]) -> dict:
    pod = pod_template(job, "pytorchjob", image, volumes)
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


def jobset(job: Job, image: str, namespace: str, volumes: list[tuple[str, str]]) -> dict:
    pod = pod_template(job, "jobset", image, volumes,
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


def render(job: Job, *, kind: str = "pytorchjob", image: str, namespace: str = "default",
           volumes: list[tuple[str, str]] = ()) -> str:
    """The manifest as JSON: a List of the ConfigMap and the job."""
    if kind not in KINDS:
        raise LaunchError(f"--kind {kind!r} is not valid; choose one of: {', '.join(KINDS)}")
    check_name(job.name, kind, job.nodes)
    require_match("--namespace", namespace, DNS_1123, "use a namespace name (lowercase letters, digits and '-')")
    if not image or any(c.isspace() for c in image):
        raise LaunchError(f"--image {image!r} is not valid; pass a container image reference such as registry/gigatrain:tag")
    volumes = list(volumes)
    build = pytorchjob if kind == "pytorchjob" else jobset
    manifest = {"apiVersion": "v1", "kind": "List",
                "items": [config_map(job, namespace), build(job, image, namespace, volumes)]}
    return json.dumps(manifest, indent=2) + "\n"
