"""Cluster configs (cluster/): Ray's own validation of the launcher configs, the GPU memory of every worker type
against what its comment claims (recomputed with igpt.train.plan), the dashboard binding, the fields KubeRay needs, and
the runtime environment as Ray reads it.

Validation is Ray's: ``prepare_config`` (merges the provider's defaults.yaml, as ``ray up`` does) then
``validate_config`` (the JSON schema ``ray/autoscaler/ray-schema.json`` through ``jsonschema``, plus Ray's checks
on node types). Neither imports a cloud SDK; ``ray up`` continues with the provider's bootstrap, which needs
boto3 / google-api-python-client and credentials, so that step is not run here.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from igpt import cli
from igpt.config import DeepSpeedConfig, ModelConfig, OptimConfig
from igpt.recipes import recipe
from igpt.train import deepspeed_config
from igpt.train.plan import PlanInput, plan
from igpt.train.pretrain_job import PretrainJobConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
SIZES = ("S", "M", "L", "XL")

# GPU memory as nvidia-smi reports it (MiB / 1024), and whether the GPU computes in bf16.
GPUS = {
    "A10G": (23028 / 1024, True),
    "L4": (23034 / 1024, True),
    "A100-40GB": (40960 / 1024, True),
    "A100-80GB": (81920 / 1024, True),
    "H100-80GB": (81559 / 1024, True),
    "T4": (15360 / 1024, False),
}
# Instance / machine type -> (GPU, GPUs, vCPUs, memory GiB), from the AWS and GCE machine-type tables.
INSTANCES = {
    "g5.12xlarge": ("A10G", 4, 48, 192),
    "g5.48xlarge": ("A10G", 8, 192, 768),
    "p4d.24xlarge": ("A100-40GB", 8, 96, 1152),
    "p4de.24xlarge": ("A100-80GB", 8, 96, 1152),
    "p5.48xlarge": ("H100-80GB", 8, 192, 2048),
    "g4dn.12xlarge": ("T4", 4, 48, 192),
    "g2-standard-48": ("L4", 4, 48, 192),
    "a2-highgpu-8g": ("A100-40GB", 8, 96, 680),
    "a2-ultragpu-8g": ("A100-80GB", 8, 96, 1360),
    "a3-highgpu-8g": ("H100-80GB", 8, 208, 1872),
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------- memory claims


def size_fits(claim: str, gpu: str, n_gpus: int) -> bool:
    """Does ``claim`` ("L" or "L+ckpt": the size with its cluster/deepspeed preset, "+ckpt" adding activation
    checkpointing) fit ``n_gpus`` x ``gpu``? The DeepSpeed config is the one igpt generates for the run."""
    size, _, option = claim.partition("+")
    assert size in SIZES and option in ("", "ckpt"), f"bad claim {claim!r}"
    mem_gib, has_bf16 = GPUS[gpu]
    rec = recipe(size)  # the recipe's batch and micro batch, as the run and `igpt plan` take them
    conf, model_over = deepspeed_config.build(DeepSpeedConfig(preset=rec.preset, micro_batch=rec.micro_batch),
                                              OptimConfig(global_batch=rec.global_batch),
                                              world_size=n_gpus, on_gpu=True)
    precision = ("bf16" if conf.get("bf16", {}).get("enabled") else
                 "fp16" if conf.get("fp16", {}).get("enabled") else "fp32")
    if precision == "bf16" and not has_bf16:
        return False
    zero = conf["zero_optimization"]
    p = PlanInput(ModelConfig.from_name(size), gpus=n_gpus, gpu_mem_gib=mem_gib, zero_stage=zero["stage"],
                  precision=precision, offload_optimizer="offload_optimizer" in zero,
                  offload_params="offload_param" in zero, micro_batch=conf["train_micro_batch_size_per_gpu"],
                  activation_checkpointing=bool(model_over.get("activation_checkpointing")) or option == "ckpt")
    return plan(p).fits


def test_size_check_tells_fitting_from_not_fitting():
    assert size_fits("S", "A10G", 4) and size_fits("XL", "H100-80GB", 8)
    assert not size_fits("XL", "A10G", 4)  # ZeRO-3 over 4 GPUs: 29 GiB of states alone
    assert not size_fits("L", "A100-40GB", 8) and size_fits("L+ckpt", "A100-40GB", 8)  # 44 GiB vs 8.5
    assert not size_fits("M", "L4", 4) and size_fits("M+ckpt", "L4", 4)
    assert not size_fits("S", "T4", 4)  # the presets train in bf16, which a T4 does not have


def launcher_claims(text: str) -> dict[str, list[str]]:
    """"# fits: ..." comment lines, by the node type (two-space key under available_node_types) they sit in."""
    claims: dict[str, list[str]] = {}
    current, inside = None, False
    for line in text.splitlines():
        if re.match(r"available_node_types:\s*$", line):
            inside = True
        elif inside and re.match(r"[^\s#]", line):
            inside = False
        elif inside and (m := re.match(r"  ([\w.-]+):\s*$", line)):
            current = m.group(1)
        elif inside and current and (m := re.match(r"\s+#\s*fits:(.*)$", line)):
            claims.setdefault(current, []).extend(m.group(1).split())
    return claims


def group_claims(text: str) -> dict[str, list[str]]:
    """"# fits: ..." comment lines of a KubeRay manifest, by the worker group they follow."""
    claims: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"\s*-?\s*groupName:\s*(\S+)", line):
            current = m.group(1)
        elif current and (m := re.match(r"\s*#\s*fits:(.*)$", line)):
            claims.setdefault(current, []).extend(m.group(1).split())
    return claims


def test_claim_parsers_read_the_comments():
    text = "x: 1\navailable_node_types:\n  a:\n    # fits: S M+ckpt\n    resources: {}\n  b:\n    # fits: XL\nz: 2\n"
    assert launcher_claims(text) == {"a": ["S", "M+ckpt"], "b": ["XL"]}
    assert group_claims("- groupName: g\n  # fits: L\n- groupName: h\n") == {"g": ["L"]}


# ---------------------------------------------------------------------------------------- launcher configs


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_config_passes_rays_validation(cloud):
    config = load(LAUNCHERS[cloud])
    assert config["provider"]["type"] == cloud
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # raises on any schema or node-type error
    # the merge kept our node types and commands, not the provider's defaults
    assert set(prepared["available_node_types"]) == set(config["available_node_types"])
    assert prepared["head_node_type"] == config["head_node_type"] == "head"


def test_rays_validation_rejects_broken_configs():
    config = prepare_config(load(LAUNCHERS["aws"]))
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_h100_8x"]["resources"]["GPU"] = 7.5  # resources are integers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = copy.deepcopy(config)
    bad["available_node_types"]["head"]["node_confg"] = {}  # a typo is an unknown property
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = copy.deepcopy(config)
    bad["head_node_type"] = "gpu_a100"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(bad)


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_gpu_worker_types_fit_the_sizes_their_comments_claim(cloud):
    config = load(LAUNCHERS[cloud])
    claims = launcher_claims(LAUNCHERS[cloud].read_text())
    gpu_types = {k: v for k, v in config["available_node_types"].items() if v["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) >= 3
    claimed = set()
    for name, node in gpu_types.items():
        node_config = node["node_config"]
        instance = node_config.get("InstanceType") or node_config.get("machineType")
        assert instance in INSTANCES, (name, instance)
        gpu, n_gpus, vcpus, _ = INSTANCES[instance]
        assert node["resources"]["GPU"] == n_gpus, (name, "GPU count differs from the instance's")
        assert node["resources"]["CPU"] == vcpus, (name, "CPU count differs from the instance's")
        assert claims.get(name), f"{name}: no '# fits:' comment"
        for claim in claims[name]:
            assert size_fits(claim, gpu, n_gpus), f"{cloud} {name} ({n_gpus} x {gpu}) claims {claim}, igpt plan says no"
            claimed.add(claim.partition("+")[0])
    assert claimed == set(SIZES), f"sizes no GPU type can train: {set(SIZES) - claimed}"
    # every worker type's node count adds up within the cluster's limit
    assert sum(v.get("max_workers", 0) for v in config["available_node_types"].values()) <= config["max_workers"]


def _ray_start(commands: list[str], head: bool) -> list[str]:
    starts = [shlex.split(c.split(";")[-1]) for c in commands if "ray start" in c]
    assert len(starts) == 1, commands
    args = starts[0]
    assert ("--head" in args) == head
    return args


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_head_is_cpu_only_dashboard_local_and_token_auth_on(cloud):
    config = load(LAUNCHERS[cloud])
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    args = _ray_start(config["head_start_ray_commands"], head=True)
    hosts = [a.split("=", 1)[1] for a in args if a.startswith("--dashboard-host=")]
    hosts += [args[i + 1] for i, a in enumerate(args) if a == "--dashboard-host"]
    assert hosts == ["127.0.0.1"]
    assert not any("0.0.0.0" in c for c in config["head_start_ray_commands"])
    worker_args = _ray_start(config["worker_start_ray_commands"], head=False)
    for a in (args, worker_args):
        assert "RAY_AUTH_MODE=token" in a
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_nodes_install_the_project_with_setup_sh(cloud):
    config = load(LAUNCHERS[cloud])
    assert config["file_mounts"].get("~/igpt") == "."
    assert any(re.search(r"cd ~/igpt && .*\./setup\.sh", c) for c in config["setup_commands"])
    assert any("igpt/.venv/bin" in c and ".bashrc" in c for c in config["setup_commands"])
    assert "/.venv" in config["rsync_exclude"]  # each node builds its own (CPU or CUDA torch)
    assert not any(e.strip("/") in ("igpt", "cluster", "pipelines") for e in config["rsync_exclude"])


# ---------------------------------------------------------------------------------------- KubeRay manifests


def _quantity_gib(q: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "Ti": 1024.0, "G": 1e9 / 2**30, "M": 1e6 / 2**30}
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if q.endswith(u):
            return float(q[: -len(u)]) * f
    return float(q) / 2**30


def check_cluster_spec(spec: dict, claims: dict[str, list[str]]) -> dict[str, tuple[str, int, int]]:
    """The fields KubeRay needs; returns each GPU group's (GPU, GPUs per pod, maxReplicas)."""
    assert spec["rayVersion"] == ray.__version__
    assert spec.get("authOptions", {}).get("mode") == "token"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    groups = [("head", head)] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    gpu_groups = {}
    for name, group in groups:
        containers = group["template"]["spec"]["containers"]
        assert containers, name
        ray_container = containers[0]
        assert ray_container["image"] and ray_container["resources"]["limits"], name
        assert ray.__version__ in ray_container["image"], (name, "image tag should name the Ray version")
        mounts = {m["mountPath"] for m in ray_container.get("volumeMounts", [])}
        assert {"/mnt/igpt", "/dev/shm"} <= mounts, name
        if name == "head":
            continue
        assert isinstance(group["rayStartParams"], dict) and group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        limits = ray_container["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) == 0:
            continue
        instance = group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        assert instance in INSTANCES, (name, instance)
        gpu, n_gpus, vcpus, mem_gib = INSTANCES[instance]
        assert int(limits["nvidia.com/gpu"]) == n_gpus, (name, "a GPU pod takes the whole node")
        assert float(limits["cpu"]) <= vcpus and _quantity_gib(limits["memory"]) <= mem_gib, name
        assert claims.get(name), f"{name}: no '# fits:' comment"
        for claim in claims[name]:
            assert size_fits(claim, gpu, n_gpus), f"{name} ({n_gpus} x {gpu}) claims {claim}, igpt plan says no"
        gpu_groups[name] = (gpu, n_gpus, group["maxReplicas"])
    return gpu_groups


def test_kuberay_raycluster():
    path = CLUSTER / "kuberay" / "raycluster.yaml"
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    gpu_groups = check_cluster_spec(doc["spec"], group_claims(path.read_text()))
    assert len(gpu_groups) >= 3
    assert {c.partition("+")[0] for cs in group_claims(path.read_text()).values() for c in cs} == set(SIZES)
    assert doc["spec"]["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "127.0.0.1"


def test_kuberay_rayjob_runs_pretraining_that_fits_its_workers():
    path = CLUSTER / "kuberay" / "rayjob.yaml"
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.pretrain"]
    cfg = cli.parse(PretrainJobConfig, argv[3:])  # the project's own parser: unknown flags or bad values fail
    assert cfg.scaling.use_gpu and cfg.deepspeed.preset in (None, cfg.model.size)  # None: the recipe's
    gpu_groups = check_cluster_spec(spec["rayClusterSpec"], group_claims(path.read_text()))
    assert sum(n * replicas for _, n, replicas in gpu_groups.values()) >= cfg.scaling.workers
    gpus = {gpu for gpu, _, _ in gpu_groups.values()}
    assert len(gpus) == 1
    assert size_fits(cfg.model.size + ("+ckpt" if cfg.model.activation_checkpointing else ""), gpus.pop(),
                     cfg.scaling.workers)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    ray.runtime_env.RuntimeEnv(**runtime_env)
    assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"} & set(runtime_env.get("env_vars", {}))


# ------------------------------------------------------------------------------------------- README commands


def test_readme_cluster_commands_use_the_pipelines_flags():
    """Each `ray job submit ... -- python -m pipelines.<stage>` line of "Run on a cluster" parses with the parser
    that stage builds (its config class, ``pipelines.JOBS``; flags only: the paths live on the cluster)."""
    from pipelines import JOBS

    section = (ROOT / "README.md").read_text().split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    shell_vars: dict[str, str] = {}
    for k, v in re.findall(r"\b([A-Z])=(\S+)", section):  # S=/mnt/igpt; P=$S/palettes/...
        shell_vars[k] = re.sub(r"\$([A-Z])\b", lambda m: shell_vars[m.group(1)], v)
    commands = [c for c in section.replace("\\\n", " ").splitlines() if "ray job submit" in c]
    assert all("--address http://127.0.0.1:8265" in c for c in commands)
    checked = set()
    for command in commands:
        command = re.sub(r"\$([A-Z])\b", lambda m: shell_vars[m.group(1)], command)
        argv = shlex.split(command.split(" -- ", 1)[1])
        assert argv[:2] == ["python", "-m"] and argv[2].startswith("pipelines."), command
        module_name, config = JOBS[argv[2].split(".", 1)[1]]  # the job's config class, from the dispatcher
        config_class = getattr(importlib.import_module(module_name), config)
        cli.build_parser(config_class).parse_args(argv[3:])  # SystemExit on an unknown flag or a bad value
        checked.add(argv[2].split(".", 1)[1])
    assert {"fit_palette", "quantize", "pretrain", "study"} <= checked


# ------------------------------------------------------------------------------------- runtime environment


def test_runtime_env_is_accepted_by_ray_and_ships_the_code_not_the_venv():
    from ray._private.runtime_env.packaging import _get_excludes

    data = load(CLUSTER / "runtime_env.yaml")
    env = ray.runtime_env.RuntimeEnv(**data)
    assert env.working_dir() == "."
    assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"} & set(env.env_vars())
    excluded = _get_excludes(ROOT, data["excludes"])  # Ray's matcher for working_dir uploads
    for p in (".venv/bin/python", "runs/train/x/step_00000001", "data/imagenet/x.jpg", ".git/HEAD",
              "igpt/__pycache__/model.cpython-311.pyc"):
        assert excluded(ROOT / p) or any(excluded(ROOT / q) for q in Path(p).parents if str(q) != "."), p
    for p in ("igpt/data/cifar10_sample.parquet", "cluster/deepspeed/S.json", "pipelines/pretrain.py",
              "igpt/model/gpt.py"):
        assert not any(excluded(ROOT / q) for q in [Path(p), *Path(p).parents] if str(q) != "."), p
