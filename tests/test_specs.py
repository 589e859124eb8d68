"""The shipped specs: every job under jobs/ loads and is documented with its commands; the paper specs
carry the EigenDamage protocol; the cluster configs (Ray launcher, KubeRay) parse, match the installed
Ray version, keep token authentication on and hold no secret. Static checks only: fast."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from raykfe.config import load_config
from raykfe.sweep import trial_grid

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
CLUSTERS = ROOT / "clusters"
JOB_SPECS = sorted(p.name for p in JOBS.glob("*.yaml"))
LAUNCHERS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
KUBERAY = {"kuberay-raycluster.yaml": "RayCluster", "kuberay-rayjob.yaml": "RayJob"}
PAPER = {  # spec -> (model, dataset)
    "cifar10-vgg19.yaml": ("vgg19_bn", "cifar10"),
    "cifar100-vgg19.yaml": ("vgg19_bn", "cifar100"),
    "cifar10-resnet32.yaml": ("wide_resnet32", "cifar10"),
    "cifar100-resnet32.yaml": ("wide_resnet32", "cifar100"),
    "cifar10-vgg19-sweep.yaml": ("vgg19_bn", "cifar10"),
}
RAY_VERSION = ray.__version__


def _raw(path: Path):
    return yaml.safe_load(path.read_text())


def _is_sweep(name: str) -> bool:
    return "sweep" in (_raw(JOBS / name) or {})


# ------------------------------------------------------------------------------------------- jobs


def test_the_expected_specs_are_there() -> None:
    want = {"digits.yaml", "digits-sweep.yaml", "imagenet-resnet50.yaml", "imagenet-vit_b_16.yaml",
            "imagenet-convnext_tiny.yaml", *PAPER}
    assert want <= set(JOB_SPECS)


@pytest.mark.parametrize("name", JOB_SPECS)
def test_job_spec_loads_and_is_documented(name: str) -> None:
    cfg = load_config(JOBS / name)
    assert cfg.name == name.removesuffix(".yaml")
    readme = (JOBS / "README.md").read_text()
    assert f"`{name}`" in readme, f"jobs/README.md does not list {name}"
    verb = "sweep" if _is_sweep(name) else "prune"
    local = re.compile(rf"`raykfe {verb} -c jobs/{re.escape(name)}(?: [^`]*)?`")
    submit = re.compile(
        rf"`RAY_AUTH_MODE=token ray job submit --address http://\S+:8265 --working-dir \. -- "
        rf"raykfe {verb} -c jobs/{re.escape(name)} output\.uri=\S+`"
    )
    assert local.search(readme), f"jobs/README.md has no local command for {name}"
    assert submit.search(readme), f"jobs/README.md has no `ray job submit` command for {name}"


def test_every_command_in_the_readme_names_an_existing_spec() -> None:
    readme = (JOBS / "README.md").read_text()
    named = set(re.findall(r"raykfe (?:prune|sweep) -c jobs/(\S+?\.yaml)", readme))
    assert named and named <= set(JOB_SPECS)
    assert "downloads nothing" in readme or "never downloads" in readme


@pytest.mark.parametrize("name", [n for n in JOB_SPECS if "sweep" in n])
def test_sweep_specs_have_a_grid(name: str) -> None:
    assert _is_sweep(name)
    grid = trial_grid(load_config(JOBS / name))
    assert grid
    assert len({(t["method"], t["target"], t["lr"]) for t in grid}) == len(grid)


def test_the_paper_sweep_covers_methods_targets_and_lrs() -> None:
    grid = trial_grid(load_config(JOBS / "cifar10-vgg19-sweep.yaml"))
    assert {t["method"] for t in grid} == {"eigendamage", "kron-obd", "kron-obs", "c-obd"}
    fractions = sorted({float(t["target"].split(":")[1]) for t in grid})
    assert len(fractions) >= 3 and 0.4 <= fractions[0] and fractions[-1] <= 0.9
    assert all(t["target"].startswith("flops:") for t in grid)
    assert len({t["lr"] for t in grid}) >= 2


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_specs_follow_the_protocol(name: str) -> None:
    cfg = load_config(JOBS / name)
    model, dataset = PAPER[name]
    assert (cfg.model.name, cfg.data.name, cfg.model.weights) == (model, dataset, None)
    assert cfg.data.augment is True and cfg.data.image_size == 32 and cfg.data.root
    b = cfg.base
    assert (b.epochs, b.lr, b.momentum, b.batch_size, b.weight_decay) == (200, 0.1, 0.9, 128, 2e-4)
    assert (tuple(b.milestones), b.gamma) == ((0.5, 0.75), 0.1)
    f = cfg.finetune
    assert (f.epochs, f.lr, f.weight_decay, f.momentum) == (150, 1e-3, 1e-4, 0.9)
    assert (cfg.stats.fisher, cfg.stats.conv_mode, cfg.stats.max_batches) == ("true", "patch", None)
    assert cfg.prune.method == "eigendamage" and cfg.prune.n_rounds == 1
    kind, _, frac = cfg.prune.target.partition(":")
    assert kind == "flops" and 0.4 <= float(frac) <= 0.9
    assert cfg.ray.use_gpu is True and cfg.device == "cuda" and cfg.ray.workers >= 2
    assert cfg.output.uri.startswith("s3://YOUR-BUCKET/raykfe/")
    header = (JOBS / name).read_text().split("\nname:")[0]
    assert "final" in header.lower() and "validation" in header.lower() and "output.uri=" in header


@pytest.mark.parametrize("arch", ["resnet50", "vit_b_16", "convnext_tiny"])
def test_imagenet_spec(arch: str) -> None:
    cfg = load_config(JOBS / f"imagenet-{arch}.yaml")
    assert (cfg.model.name, cfg.data.name, cfg.data.image_size) == (arch, "imagefolder", 224)
    assert cfg.model.weights and cfg.model.weights.endswith(".safetensors")
    assert cfg.data.root and cfg.stats.max_batches is not None
    assert cfg.prune.target.startswith("flops:")
    assert cfg.ray.use_gpu and cfg.device == "cuda"


# ------------------------------------------------------------------------------------- no secrets

SECRET_PATTERNS = [
    (re.compile(r"AKIA[0-9A-Z]{16}"), "an AWS access key id"),
    (re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}"), "an AWS secret key value"),
    (re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])"), "a 64-hex-digit token"),
    (re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[A-Za-z0-9]{16,}"), "a Ray auth token value"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\"private_key\"\s*:"), "a service-account key file"),
    (re.compile(r"(?i)(?:password|passwd|secret|token)\s*:\s*['\"]?[A-Za-z0-9/+_\-]{24,}"), "a literal secret"),
]


@pytest.mark.parametrize("path", sorted([*CLUSTERS.glob("*"), *JOBS.glob("*")]), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_secret_looking_literals(path: Path) -> None:
    text = path.read_text()
    for pattern, what in SECRET_PATTERNS:
        match = pattern.search(text)
        assert match is None, f"{path.name} holds {what}: {match.group(0)[:12]}..."


# --------------------------------------------------------------------------- cluster launcher YAMLs


@pytest.fixture(scope="module", params=LAUNCHERS)
def launcher(request):
    return request.param, _raw(CLUSTERS / request.param)


def test_launcher_shape(launcher) -> None:
    name, cfg = launcher
    assert cfg["cluster_name"]
    provider = cfg["provider"]
    assert provider["type"] == ("aws" if name.startswith("aws") else "gcp")
    assert provider.get("region") and (provider.get("availability_zone") or provider["type"] == "aws")
    if provider["type"] == "gcp":
        assert provider.get("project_id")
    assert cfg["max_workers"] >= 1 and cfg["idle_timeout_minutes"] > 0
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_types, f"{name} has no GPU worker type"
    for key, node in gpu_types.items():
        assert key != cfg["head_node_type"] and node.get("max_workers", 0) >= 1
        if provider["type"] == "gcp":
            acc = node["node_config"]["guestAccelerators"]
            assert acc[0]["acceleratorType"].startswith("nvidia-") and acc[0]["acceleratorCount"] >= 1
        else:
            assert node["node_config"]["InstanceType"].split(".")[0] in ("g4dn", "g5", "g6", "p3", "p4d", "p5")


def test_launcher_passes_rays_own_schema(launcher) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher[1]))


def test_launcher_image_matches_installed_ray(launcher) -> None:
    image = launcher[1]["docker"]["image"]
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray" and tag.startswith(f"{RAY_VERSION}-") and "gpu" in tag


def test_launcher_installs_raykfe_and_keeps_auth_on(launcher) -> None:
    _, cfg = launcher
    assert any("pip install" in c and ("raykfe" in c) for c in cfg["setup_commands"])
    assert any(f"=={RAY_VERSION}" in c for c in cfg["setup_commands"])  # pip must not move Ray
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
        assert not any("RAY_AUTH_MODE=disabled" in c for c in cfg[key])
        assert any("auth_token" in c and "exit 1" in c for c in cfg[key]), f"{key}: no check for the token"
    # the token reaches the nodes as a file copied from the user's machine, never as a literal
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "--dashboard-host=0.0.0.0" not in " ".join(cfg["head_start_ray_commands"])


# ------------------------------------------------------------------------------------ KubeRay


def _docs(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((CLUSTERS / name).read_text()) if d is not None]
    assert len(docs) == 1
    return docs


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _containers(doc: dict) -> list[tuple[str, dict]]:
    spec = _cluster_spec(doc)
    out = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in spec["workerGroupSpecs"]:
        out += [(group["groupName"], c) for c in group["template"]["spec"]["containers"]]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        out += [("submitter", c) for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]]
    return out


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _from_secret(entry: dict) -> bool:
    ref = entry.get("valueFrom", {}).get("secretKeyRef", {})
    return "value" not in entry and bool(ref.get("name")) and bool(ref.get("key"))


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_manifest_shape_and_version(name: str) -> None:
    (doc,) = _docs(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == KUBERAY[name]
    assert doc["metadata"]["name"]
    spec = _cluster_spec(doc)
    assert str(spec["rayVersion"]) == RAY_VERSION
    for _, c in _containers(doc):
        assert c["image"].startswith(f"rayproject/ray:{RAY_VERSION}-py311")
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group.get("maxReplicas", group.get("replicas", 0)) >= 1
        for c in group["template"]["spec"]["containers"]:
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {})


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_auth_and_credentials_come_from_secrets(name: str) -> None:
    (doc,) = _docs(name)
    for role, c in _containers(doc):
        env = _env(c)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{role}: RAY_AUTH_MODE=token missing"
        assert "RAY_AUTH_TOKEN" in env and _from_secret(env["RAY_AUTH_TOKEN"]), f"{role}: token not from a Secret"
        if role != "submitter":
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert key in env and _from_secret(env[key]), f"{role}: {key} not from a Secret"
        for key, entry in env.items():  # anything secret-like is a secretKeyRef, never a literal
            if re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|CREDENTIAL", key):
                assert _from_secret(entry), f"{role}: {key} is not taken from a Secret"
    spec = _cluster_spec(doc)
    autoscaler_env = {e["name"]: e for e in spec.get("autoscalerOptions", {}).get("env", [])}
    if spec.get("enableInTreeAutoscaling"):
        assert autoscaler_env["RAY_AUTH_MODE"]["value"] == "token" and _from_secret(autoscaler_env["RAY_AUTH_TOKEN"])


def test_rayjob_entrypoint_is_a_raykfe_command_on_a_shipped_spec() -> None:
    (doc,) = _docs("kuberay-rayjob.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "raykfe" and argv[1] in ("prune", "sweep")
    spec = argv[argv.index("-c") + 1]
    assert spec.startswith("jobs/") and (ROOT / spec).is_file()
    overrides = [a for a in argv[2:] if "=" in a]
    cfg = load_config(ROOT / spec, overrides)  # the overrides are valid keys and values
    assert cfg.output.uri.startswith(("s3://", "gs://"))
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert runtime_env.get("working_dir") and any("raykfe" in p for p in runtime_env.get("pip", []))
    workers = sum(g.get("replicas", 0) for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert workers >= cfg.ray.workers  # one GPU pod per Train worker


def test_clusters_readme_documents_every_file_and_the_secrets() -> None:
    readme = (CLUSTERS / "README.md").read_text()
    for name in [*LAUNCHERS, *KUBERAY]:
        assert f"`{name}`" in readme
    assert "## A single machine" in readme
    assert "kubectl create secret generic raykfe-ray-auth" in readme
    assert "kubectl create secret generic raykfe-object-store" in readme
    assert "RAY_AUTH_TOKEN" in readme and "~/.ray/auth_token" in readme
    for name in KUBERAY:  # the Secrets the manifests reference are the ones the README creates
        refs = {
            e["valueFrom"]["secretKeyRef"]["name"]
            for _, c in _containers(_docs(name)[0])
            for e in c.get("env", [])
            if "valueFrom" in e
        }
        assert refs and all(f"secret generic {r}" in readme for r in refs)
