"""`gigatrain launch k8s`: the manifests, checked against the fields of the upstream APIs.

SCHEMAS below is a transcription of the parts of the APIs the manifests use: Kubeflow's
PyTorchJob (kubeflow.org/v1, training-operator pkg/apis/kubeflow.org/v1), JobSet
(jobset.x-k8s.io/v1alpha2, api/jobset/v1alpha2/jobset_types.go), and the core/v1 and
batch/v1 objects inside them. Each object lists its required fields and every field it
may have, so a misspelt or misplaced key fails as the API server would reject it.
"""

import json
import re
from pathlib import Path

import pytest

from helpers import REPO
from gigatrain.cli import run
from gigatrain.config import load_config
from gigatrain.launch import k8s

CONFIG = REPO / "configs" / "tiny.toml"
DNS_1035 = {"pattern": r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"}
DNS_1123 = {"pattern": r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"}
STRING, INT, BOOL = {"type": str}, {"type": int}, {"type": bool}
QUANTITY = {"type": (str, int)}


def obj(required=(), **properties) -> dict:
    return {"type": dict, "required": set(required), "properties": properties}


def mapping(values: dict) -> dict:
    return {"type": dict, "values": values}


def array(items: dict, min_items: int = 0) -> dict:
    return {"type": list, "items": items, "min_items": min_items}


def enum(*choices) -> dict:
    return {"enum": choices}


def const(value) -> dict:
    return {"enum": (value,)}


OBJECT_META = obj(["name"], name=DNS_1035, namespace=DNS_1123, labels=mapping(STRING), annotations=mapping(STRING))
ENV_VAR = obj(["name"], name=STRING, value=STRING, valueFrom=mapping({}))
CONTAINER = obj(
    ["name", "image"], name=DNS_1123, image=STRING, command=array(STRING), args=array(STRING), env=array(ENV_VAR),
    workingDir=STRING,
    ports=array(obj(["containerPort"], containerPort=INT, name={"pattern": r"[a-z0-9-]{1,15}"},
                    protocol=enum("TCP", "UDP", "SCTP"))),
    resources=obj([], limits=mapping(QUANTITY), requests=mapping(QUANTITY)),
    volumeMounts=array(obj(["name", "mountPath"], name=STRING, mountPath=STRING, readOnly=BOOL, subPath=STRING)),
    imagePullPolicy=enum("Always", "IfNotPresent", "Never"),
)
VOLUME = obj(["name"], name=DNS_1123, configMap=obj(["name"], name=STRING, items=array(mapping(STRING))),
             emptyDir=obj([], medium=enum("", "Memory"), sizeLimit=QUANTITY),
             persistentVolumeClaim=obj(["claimName"], claimName=STRING, readOnly=BOOL))
POD_SPEC = obj(["containers"], containers=array(CONTAINER, min_items=1), volumes=array(VOLUME),
               restartPolicy=enum("Always", "OnFailure", "Never"), subdomain=DNS_1123, hostname=DNS_1123,
               nodeSelector=mapping(STRING), tolerations=array(mapping({})), serviceAccountName=STRING,
               terminationGracePeriodSeconds=INT)
POD_TEMPLATE = obj(["spec"], metadata=obj([], labels=mapping(STRING), annotations=mapping(STRING)), spec=POD_SPEC)
CONFIG_MAP = obj(["apiVersion", "kind", "metadata"], apiVersion=const("v1"), kind=const("ConfigMap"),
                 metadata=OBJECT_META, data=mapping(STRING))

# Kubeflow training operator, kubeflow.org/v1.
REPLICA_SPEC = obj(["template"], replicas=INT, template=POD_TEMPLATE,
                   restartPolicy=enum("Always", "OnFailure", "Never", "ExitCode"))
ELASTIC_POLICY = obj([], minReplicas=INT, maxReplicas=INT, rdzvBackend=enum("c10d", "etcd", "etcd-v2"), rdzvPort=INT,
                     rdzvHost=STRING, rdzvId=STRING, rdzvConf=array(obj([], key=STRING, value=STRING)),
                     standalone=BOOL, nProcPerNode=INT, maxRestarts=INT, metrics=array(mapping({})))
RUN_POLICY = obj([], cleanPodPolicy=enum("All", "Running", "None"), ttlSecondsAfterFinished=INT,
                 activeDeadlineSeconds=INT, backoffLimit=INT, schedulingPolicy=mapping({}), suspend=BOOL,
                 managedBy=STRING)
PYTORCH_JOB = obj(
    ["apiVersion", "kind", "metadata", "spec"], apiVersion=const("kubeflow.org/v1"), kind=const("PyTorchJob"),
    metadata=OBJECT_META,
    spec=obj(["pytorchReplicaSpecs"], runPolicy=RUN_POLICY, elasticPolicy=ELASTIC_POLICY,
             pytorchReplicaSpecs=obj([], Master=REPLICA_SPEC, Worker=REPLICA_SPEC),
             nprocPerNode={"type": str}),  # *string upstream: "auto", "cpu", "gpu" or a number
)

# JobSet, jobset.x-k8s.io/v1alpha2, around a batch/v1 Job.
JOB_SPEC = obj(["template"], parallelism=INT, completions=INT, completionMode=enum("NonIndexed", "Indexed"),
               backoffLimit=INT, activeDeadlineSeconds=INT, ttlSecondsAfterFinished=INT, template=POD_TEMPLATE)
REPLICATED_JOB = obj(["name", "template"], name=DNS_1123, groupName=STRING, replicas=INT,
                     template=obj(["spec"], metadata=mapping({}), spec=JOB_SPEC), dependsOn=array(mapping(STRING)))
JOBSET = obj(
    ["apiVersion", "kind", "metadata", "spec"], apiVersion=const("jobset.x-k8s.io/v1alpha2"), kind=const("JobSet"),
    metadata=OBJECT_META,
    spec=obj(["replicatedJobs"], replicatedJobs=array(REPLICATED_JOB, min_items=1),
             network=obj([], enableDNSHostnames=BOOL, subdomain=DNS_1123, publishNotReadyAddresses=BOOL),
             successPolicy=obj(["operator"], operator=enum("All", "Any"), targetReplicatedJobs=array(STRING)),
             failurePolicy=obj([], maxRestarts=INT, restartStrategy=enum("Recreate", "BlockingRecreate", "InPlaceRestart"),
                               rules=array(mapping({}))),
             suspend=BOOL, managedBy=STRING, ttlSecondsAfterFinished=INT, coordinator=mapping({})),
)
# torchft's Lighthouse: an apps/v1 Deployment and a core/v1 Service.
DEPLOYMENT = obj(["apiVersion", "kind", "metadata", "spec"], apiVersion=const("apps/v1"), kind=const("Deployment"),
                 metadata=OBJECT_META,
                 spec=obj(["selector", "template"], replicas=INT, selector=obj([], matchLabels=mapping(STRING)),
                          template=POD_TEMPLATE))
SERVICE = obj(["apiVersion", "kind", "metadata"], apiVersion=const("v1"), kind=const("Service"), metadata=OBJECT_META,
              spec=obj([], selector=mapping(STRING), type=enum("ClusterIP", "NodePort", "LoadBalancer"),
                       ports=array(obj(["port"], name=STRING, port=INT, targetPort={"type": (int, str)},
                                       protocol=enum("TCP", "UDP", "SCTP")))))
LIST = obj(["apiVersion", "kind", "items"], apiVersion=const("v1"), kind=const("List"), items=array(mapping({})))


def errors(value, schema: dict, path: str = "$") -> list[str]:
    """Where `value` breaks `schema`, as 'path: what' lines (empty when it conforms)."""
    if "enum" in schema:
        return [] if value in schema["enum"] else [f"{path}: {value!r} is not one of {schema['enum']}"]
    if "pattern" in schema:
        ok = isinstance(value, str) and re.fullmatch(schema["pattern"], value)
        return [] if ok else [f"{path}: {value!r} does not match {schema['pattern']}"]
    expected = schema["type"]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        return [f"{path}: {value!r} is not {expected}"]
    found = []
    if expected is list:
        if len(value) < schema["min_items"]:
            found.append(f"{path}: needs at least {schema['min_items']} item(s)")
        for i, item in enumerate(value):
            found += errors(item, schema["items"], f"{path}[{i}]")
    elif expected is dict and "values" in schema:
        if schema["values"]:
            for key, item in value.items():
                found += errors(item, schema["values"], f"{path}.{key}")
    elif expected is dict:
        found += [f"{path}: missing {key}" for key in sorted(schema["required"] - value.keys())]
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}: unknown field {key}")
            else:
                found += errors(item, schema["properties"][key], f"{path}.{key}")
    return found


def test_schema_check_catches_what_the_api_server_would_reject():
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "Bad_Name"},
           "spec": {"pytorchReplicaSpecs": {"Worker": {"replicas": "2", "template": {"spec": {"containers": []}}}},
                    "elasticPolicy": {"rdzvBackend": "zookeeper", "maxRestart": 3}, "nprocPerNode": 8}}
    assert errors(job, PYTORCH_JOB) == [
        "$.metadata.name: 'Bad_Name' does not match [a-z]([-a-z0-9]{0,61}[a-z0-9])?",
        "$.spec.pytorchReplicaSpecs.Worker.replicas: '2' is not <class 'int'>",
        "$.spec.pytorchReplicaSpecs.Worker.template.spec.containers: needs at least 1 item(s)",
        "$.spec.elasticPolicy.rdzvBackend: 'zookeeper' is not one of ('c10d', 'etcd', 'etcd-v2')",
        "$.spec.elasticPolicy: unknown field maxRestart",
        "$.spec.nprocPerNode: 8 is not <class 'str'>"]


def launch(capsys, *args: str) -> tuple[int, str, str]:
    code = run(["launch", "k8s", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def manifest(capsys, kind: str, *extra: str, nodes: int = 4, gpus: int = 8) -> tuple[dict, dict, str]:
    """(the ConfigMap, the job, stderr) of a rendered manifest, checked against the schemas."""
    code, out, err = launch(capsys, "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--kind", kind,
                            "--image", "registry.example/gigatrain:1.0", str(CONFIG), "--train.batch_size=64", *extra)
    assert code == 0, err
    document = json.loads(out)
    assert errors(document, LIST) == []
    config_map, job = document["items"]
    assert errors(config_map, CONFIG_MAP) == []
    assert errors(job, PYTORCH_JOB if kind == "pytorchjob" else JOBSET) == []
    return config_map, job, err


def torchrun_flags(command: list[str]) -> tuple[dict[str, str], list[str]]:
    """torchrun's --flag=value options, and what follows them (-m gigatrain train ...)."""
    assert command[0] == "torchrun"
    module = command.index("-m")
    return dict(flag.removeprefix("--").split("=", 1) for flag in command[1:module]), command[module:]


def check_config_reaches_the_pod(config_map: dict, pod_spec: dict, train_args: list[str], tmp_path: Path) -> None:
    """The command's config path is a file of the ConfigMap mounted in the pod, and that file
    with the command's overrides is the config `gigatrain train` gets here."""
    assert train_args[:3] == ["-m", "gigatrain", "train"]
    config_path, overrides = Path(train_args[3]), train_args[4:]
    [container] = pod_spec["containers"]
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    [volume] = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"] and mount["readOnly"] is True
    in_pod = tmp_path / config_path.name
    in_pod.write_text(config_map["data"][config_path.name])
    assert in_pod.read_text() == CONFIG.read_text()
    assert load_config(in_pod, overrides) == load_config(CONFIG, overrides)


def test_pytorchjob(capsys, tmp_path):
    config_map, job, _ = manifest(capsys, "pytorchjob", "--max-restarts", "2", "--run.name=Big Run")
    spec, name = job["spec"], job["metadata"]["name"]
    assert name == "gigatrain-big-run" and config_map["metadata"]["name"] == "gigatrain-big-run-config"
    # The operator's webhook: a Worker spec whenever elasticPolicy is set, Master (if any) exactly 1.
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4 and worker["restartPolicy"] == "OnFailure"
    elastic = spec["elasticPolicy"]
    assert elastic == {"rdzvBackend": "c10d", "rdzvPort": 29500, "rdzvId": name, "minReplicas": 4, "maxReplicas": 4,
                       "maxRestarts": 2}
    assert spec["nprocPerNode"] == "8"
    [container] = worker["template"]["spec"]["containers"]
    assert container["name"] == "pytorch" and container["image"] == "registry.example/gigatrain:1.0"
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 8}}
    assert {"name": "PYTHONUNBUFFERED", "value": "1"} in container["env"]
    # Eviction leaves time to checkpoint.
    assert worker["template"]["spec"]["terminationGracePeriodSeconds"] > 100
    # The operator finds the rendezvous port by this port name; the command says the same.
    assert {"containerPort": 29500, "name": "pytorchjob-port"} in container["ports"]
    flags, train_args = torchrun_flags(container["command"])
    assert flags == {"nnodes": "4", "nproc-per-node": spec["nprocPerNode"], "rdzv-backend": elastic["rdzvBackend"],
                     "rdzv-endpoint": f"{name}-worker-0:{elastic['rdzvPort']}", "rdzv-id": elastic["rdzvId"],
                     "max-restarts": str(elastic["maxRestarts"])}
    assert train_args[4:] == ["--train.batch_size=64", "--run.name=Big Run"]
    check_config_reaches_the_pod(config_map, worker["template"]["spec"], train_args, tmp_path)


def test_jobset(capsys, tmp_path):
    config_map, job, _ = manifest(capsys, "jobset", "--max-restarts", "5", "--port", "29601", "--namespace", "ml",
                                  "--train.batch_size=48", nodes=3)
    spec, name = job["spec"], job["metadata"]["name"]
    assert job["metadata"]["namespace"] == config_map["metadata"]["namespace"] == "ml"
    assert spec["failurePolicy"] == {"maxRestarts": 5}
    assert spec["network"]["enableDNSHostnames"] is True
    [replicated] = spec["replicatedJobs"]
    job_spec = replicated["template"]["spec"]
    assert replicated["replicas"] == 1
    # One indexed pod per node; a failed pod fails the Job at once and the JobSet restarts all.
    assert (job_spec["parallelism"], job_spec["completions"], job_spec["completionMode"], job_spec["backoffLimit"]) == \
        (3, 3, "Indexed", 0)
    pod_spec = job_spec["template"]["spec"]
    assert pod_spec["restartPolicy"] == "Never" and pod_spec["subdomain"] == spec["network"]["subdomain"]
    [container] = pod_spec["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    flags, train_args = torchrun_flags(container["command"])
    # Pod 0's DNS name: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>
    head = f"{name}-{replicated['name']}-0-0.{spec['network']['subdomain']}"
    assert flags == {"nnodes": "3", "nproc-per-node": "8", "rdzv-backend": "c10d", "rdzv-endpoint": f"{head}:29601",
                     "rdzv-id": name, "max-restarts": "5"}
    assert {"containerPort": 29601, "name": "rendezvous"} in container["ports"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod_spec["volumes"]
    check_config_reaches_the_pod(config_map, pod_spec, train_args, tmp_path)


@pytest.mark.parametrize("kind", ["pytorchjob", "jobset"])
def test_cpu_pods_and_a_volume_for_the_run(capsys, kind):
    _, job, err = manifest(capsys, kind, "--cpu", "--volume", "train-data:/mnt/data", "--run.dir=/mnt/data/runs/a",
                           nodes=2, gpus=4)
    assert err == ""  # run.dir is on the volume: no warning
    if kind == "pytorchjob":
        pod_spec = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    else:
        pod_spec = job["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    [container] = pod_spec["containers"]
    assert container["resources"] == {"requests": {"cpu": "4"}, "limits": {"cpu": "4"}}
    assert container["command"][-1] == "--train.device=cpu"
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/mnt/data"]
    assert {"name": mount["name"], "persistentVolumeClaim": {"claimName": "train-data"}} in pod_spec["volumes"]


def test_a_run_dir_off_the_volumes_is_warned_about(capsys):
    _, _, err = manifest(capsys, "pytorchjob", "--run.dir=runs/a")
    assert err.startswith("gigatrain: warning: run.dir 'runs/a' is not on a --volume") and err.count("\n") == 1


def test_default_name_fits_the_pod_names(capsys):
    _, job, _ = manifest(capsys, "jobset", f"--run.name={'x' * 80}", nodes=16, gpus=1)
    name = job["metadata"]["name"]
    assert len(f"{name}-node-0-15") == 63 and errors(name, DNS_1035) == []


@pytest.mark.parametrize("args, words", [
    (["--nodes", "0", "--gpus-per-node", "8"], ["--nodes=0"]),
    (["--nodes", "2", "--gpus-per-node", "-8"], ["--gpus-per-node=-8"]),
    (["--nodes", "2", "--gpus-per-node", "8", "--kind", "mpijob"], ["--kind", "mpijob"]),
    (["--nodes", "2", "--gpus-per-node", "8", "--namespace", "ML_team"], ["--namespace", "ML_team"]),
    (["--nodes", "2", "--gpus-per-node", "8", "--job-name", "Train_1"], ["job name", "Train_1"]),
    (["--nodes", "2", "--gpus-per-node", "8", "--job-name", "a" * 60], ["too long", "63"]),
    (["--nodes", "2", "--gpus-per-node", "8", "--image", "my image"], ["--image", "my image"]),
    (["--nodes", "2", "--gpus-per-node", "8", "--volume", "data"], ["--volume", "CLAIM:/absolute/mount/path"]),
    (["--nodes", "2", "--gpus-per-node", "8", "--volume", "data:relative/path"], ["--volume", "data:relative/path"]),
    (["--nodes", "2", "--gpus-per-node", "8", "--model.preset=huge"], ["model.preset", "tiny"]),
    (["--nodes", "2", "--gpus-per-node", "8", "--parallel.dp_shard=4"], ["dp_shard=4", "16"]),
    (["--nodes", "2", "--gpus-per-node", "8", "--parallel.dp_shard=16", "--train.batch_size=24"], ["train.batch_size=24"]),
])
def test_bad_input_is_one_line_exit_2(capsys, args, words):
    code, out, err = launch(capsys, str(CONFIG), "--train.batch_size=64", *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]


def test_missing_config_is_one_line_exit_2(capsys):
    code, _, err = launch(capsys, "--nodes", "1", "--gpus-per-node", "1", "no/such.toml")
    assert code == 2 and err.strip() == "gigatrain: error: config file 'no/such.toml' does not exist; " \
                                        "pass an existing TOML file (see configs/)"


def test_out_writes_a_file(capsys, tmp_path):
    out = tmp_path / "k8s" / "job.json"
    code, stdout, _ = launch(capsys, "--nodes", "1", "--gpus-per-node", "1", "--out", str(out), str(CONFIG))
    assert code == 0 and stdout.strip() == f"wrote {out}; start it with: kubectl apply -f {out}"
    assert json.loads(out.read_text())["items"][1]["kind"] == "PyTorchJob"
    assert k8s.CONFIG_DIR == "/etc/gigatrain"


@pytest.mark.parametrize("kind", ["pytorchjob", "jobset"])
def test_replica_groups_each_a_job_of_their_own_with_the_lighthouse(capsys, kind, tmp_path):
    """fault.recovery=replica: the Lighthouse (a Deployment and its Service), then one job per
    replica group with nodes / R pods, told its group and the Lighthouse's address."""
    code, out, err = launch(capsys, "--nodes", "4", "--gpus-per-node", "8", "--kind", kind, "--image", "reg/gt:1",
                            str(CONFIG), "--train.batch_size=64", "--fault.recovery=replica", "--run.name=ft")
    assert code == 0, err
    document = json.loads(out)
    assert errors(document, LIST) == []
    config_map, deployment, service, *jobs = document["items"]
    assert errors(deployment, DEPLOYMENT) == [] and errors(service, SERVICE) == []
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"] == service["spec"]["selector"]
    [lighthouse] = pod["spec"]["containers"]
    assert lighthouse["command"] == ["torchft_lighthouse", "--min_replicas", "1", "--quorum_tick_ms", "100",
                                     "--join_timeout_ms", "10000", "--bind", "[::]:29510"]
    assert service["spec"]["ports"][0]["port"] == 29510
    url = f"http://{service['metadata']['name']}:29510"
    assert [job["metadata"]["name"] for job in jobs] == ["gigatrain-ft-r0", "gigatrain-ft-r1"]
    for group, job in enumerate(jobs):
        assert errors(job, PYTORCH_JOB if kind == "pytorchjob" else JOBSET) == []
        if kind == "pytorchjob":
            worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
            pods, pod_spec = worker["replicas"], worker["template"]["spec"]
        else:
            job_spec = job["spec"]["replicatedJobs"][0]["template"]["spec"]
            pods, pod_spec = job_spec["parallelism"], job_spec["template"]["spec"]
        assert pods == 2
        [container] = pod_spec["containers"]
        assert {"name": "TORCHFT_LIGHTHOUSE", "value": url} in container["env"]
        assert {"name": "REPLICA_GROUP_ID", "value": str(group)} in container["env"]
        flags, train_args = torchrun_flags(container["command"])
        assert flags["nnodes"] == "2" and flags["rdzv-id"] == job["metadata"]["name"]
        assert flags["rdzv-endpoint"].startswith(job["metadata"]["name"] + "-")
        assert train_args[-2:] == ["--fault.replica_groups=2", f"--fault.replica_id={group}"]
        check_config_reaches_the_pod(config_map, pod_spec, train_args, tmp_path)
