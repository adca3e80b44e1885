"""The deploy files (deploy/) stay right, checked as the tools that read them would:
- `deploy/cluster.yaml` against the schema the installed Ray validates cluster files with
  (`ray/autoscaler/ray-schema.json`), plus the cross-field rules Ray adds to it;
- `deploy/rayjob.yaml` against KubeRay's `RayJob` v1 CRD schema (tests/data/, v1.7.0-rc.0), with
  an unknown key an error anywhere the schema lists the properties (the API server drops or
  refuses such a key: a misspelled field would be lost in silence);
- the training commands they run (rayjob.yaml's entrypoint, the `ray job submit` commands of
  cluster.yaml and deploy/README.md) parsed by our own command-line parser: every flag exists, every
  config file exists and loads, and the run joins the cluster it is submitted to; rayjob.yaml's
  config file is one the Dockerfile copies into the image, where its entrypoint runs;
- the versions the Dockerfile names equal pyproject.toml's pins, it installs the `gpu` extra, and
  every image tag and rayVersion matches the project's version and Ray pin.
Each check is a function returning its errors; the negative tests feed it a mutated copy.
A Ray cluster whose autoscaler grows it for a run is tested in tests/test_autoscaling_cluster.py."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RAYJOB_SCHEMA = Path(__file__).with_name("data") / "kuberay_rayjob_v1_schema.json"
TRAIN = ["python", "-m", "odpo_vllm.train"]


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def schema_errors(validator: jsonschema.protocols.Validator, document) -> list[str]:
    """Every violation, each prefixed with where it is (`spec/rayClusterSpec/...`)."""
    return [f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
            for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]


# ---------------------------------------------------------------------------------------- cluster.yaml
def ray_cluster_schema() -> dict:
    """The schema of the installed Ray (read from the package, not copied: it moves with the pin)."""
    (package,) = importlib.util.find_spec("ray").submodule_search_locations  # without importing ray
    return json.loads((Path(package) / "autoscaler" / "ray-schema.json").read_text())


def cluster_errors(config: dict) -> list[str]:
    errors = schema_errors(jsonschema.Draft7Validator(ray_cluster_schema()), config)
    # the rules `ray up` checks beside the schema (ray.autoscaler._private.util.validate_config)
    types = config.get("available_node_types") or {}
    if types and config.get("head_node_type") not in types:
        errors.append(f"head_node_type: {config.get('head_node_type')!r} is not one of available_node_types")
    min_workers = sum(node.get("min_workers", 0) for node in types.values() if isinstance(node, dict))
    if isinstance(config.get("max_workers"), int) and min_workers > config["max_workers"]:
        errors.append(f"max_workers: {config['max_workers']} is below the node types' min_workers ({min_workers})")
    return errors


# ---------------------------------------------------------------------------------------- rayjob.yaml
def closed(schema):
    """The CRD schema with unknown keys made errors: a structural CRD schema lists an object's
    fields without forbidding others (the API server prunes them, or refuses them under strict
    field validation), so `additionalProperties: false` goes wherever `properties` are listed and
    the schema neither maps free keys (`additionalProperties`) nor keeps unknown fields
    (`x-kubernetes-preserve-unknown-fields`). `nullable` (OpenAPI's) becomes JSON Schema's null type."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: (({name: closed(sub) for name, sub in value.items()}) if key == "properties" else closed(value))
           for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def rayjob_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(closed(json.loads(RAYJOB_SCHEMA.read_text())))


def rayjob_errors(document: dict, validator: jsonschema.Draft7Validator | None = None) -> list[str]:
    errors = schema_errors(validator or rayjob_validator(), document)
    # the schema types these as plain strings; the stored schema is the v1 one
    if document.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: {document.get('apiVersion')!r}, the stored schema is ray.io/v1's")
    if document.get("kind") != "RayJob":
        errors.append(f"kind: {document.get('kind')!r}, not RayJob")
    return errors


# ---------------------------------------------------------------------------------------- the training commands
def commands_in_text(text: str) -> list[str]:
    """The `python -m odpo_vllm.train ...` commands a file shows: in `#` comments with `\\`
    continuations (cluster.yaml) or in backquotes (README), from `python` to the end."""
    text = re.sub(r"\\\n\s*#?", " ", text)  # a continued line, in a comment or not
    found = re.findall(r"`([^`]*python -m odpo_vllm\.train[^`]*)`", text)
    found += [line for line in re.findall(r"#\s*(.*python -m odpo_vllm\.train.*)", text) if "`" not in line]
    return [re.sub(r"\s+", " ", command[command.index("python -m"):]).strip() for command in found]


def option_strings() -> set[str]:
    from odpo_vllm.train import _parser

    return {option for action in _parser()._actions for option in action.option_strings}


def entrypoint_errors(command: str, root: Path = ROOT) -> list[str]:
    """What would stop `command` on the cluster before it trains. Paths are taken relative to
    `root`: the job's working directory is the repository (image WORKDIR, `--working-dir .`)."""
    from odpo_vllm.train import parse_args

    words = shlex.split(command)
    if words[:3] != TRAIN:
        return [f"{command!r}: does not start with {' '.join(TRAIN)}"]
    argv, known = words[3:], option_strings()
    errors = [f"{word.split('=')[0]}: no such flag of odpo_vllm.train" for word in argv
              if word.startswith("-") and word.split("=")[0] not in known | {"--config"}]
    if "--config" in argv:
        at = argv.index("--config") + 1
        path = root / argv[at] if at < len(argv) else None
        if path is None or not path.is_file():
            errors.append(f"--config {argv[at] if path else ''}: no such file in the repository")
        else:
            argv[at] = str(path)
    if errors:
        return errors
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):  # argparse prints its reason, then exits with 2
            _, args, _ = parse_args(argv)  # as `main` would, without building the trainer
    except SystemExit as stop:  # the message names the flag or the config file's key
        reason = usage.getvalue().strip().splitlines()[-1:] or [str(stop)]
        return [f"{command!r}: {reason[0]}"]
    if args.placement not in ("dedicated", "colocated") or args.ray_address != "auto":
        # a job that does not join its cluster starts a Ray of its own inside the head's container
        errors.append(f"{command!r}: placement {args.placement!r} at ray_address {args.ray_address!r}; a deploy "
                      "run joins the cluster it is submitted to (a Ray placement, ray_address auto)")
    return errors


def deploy_commands() -> dict[str, list[str]]:
    return {"rayjob.yaml (entrypoint)": [load_yaml(DEPLOY / "rayjob.yaml")["spec"]["entrypoint"]],
            "cluster.yaml": commands_in_text((DEPLOY / "cluster.yaml").read_text()),
            "README.md": commands_in_text((DEPLOY / "README.md").read_text())}


def copied_into_image(dockerfile: str) -> list[str]:
    """The repository paths the Dockerfile copies to the same place under its WORKDIR
    (`COPY a b ./`, `COPY a ./a`)."""
    paths = []
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, dest = line.split()[1:]
            paths += [source.rstrip("/") for source in sources if dest in (".", "./", f"./{source}")]
    return paths


def image_errors(command: str, dockerfile: str) -> list[str]:
    """The config file of a command run inside the image is in the image: a RayJob's entrypoint
    runs in the head container's working directory (the Dockerfile's WORKDIR), where only what
    the Dockerfile copied exists, unless the job's runtime env uploads a working_dir."""
    words = shlex.split(command)
    if "--config" not in words:
        return []
    config, copied = words[words.index("--config") + 1], copied_into_image(dockerfile)
    if any(config == path or config.startswith(f"{path}/") for path in copied):
        return []
    return [f"--config {config}: not in the image (the Dockerfile copies {copied} into its WORKDIR)"]


# ---------------------------------------------------------------------------------------- versions
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def gpu_pins(meta: dict) -> dict[str, str]:
    """name -> version of every `==` pin a GPU install gets: the dependencies and the `gpu` extra."""
    pins = {}
    for line in meta["dependencies"] + meta["optional-dependencies"]["gpu"]:
        requirement = Requirement(line)
        exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if exact:
            pins[requirement.name.lower()] = exact[0]
    return pins


def dockerfile_errors(text: str, meta: dict) -> list[str]:
    pins, errors = gpu_pins(meta), []
    extras = re.findall(r'pip install[^\n]*? -e "?\.\[([^\]]*)\]', text)  # `pip install -e ".[gpu]"`
    if not any("gpu" in names.split(",") for names in extras):
        errors.append(f"pip install: the Dockerfile must install the project with the gpu extra (extras: {extras})")
    # every "<package> <version>" or "<package>==<version>" it names, against the pin
    for name, version in re.findall(r"\b([A-Za-z][\w.-]*?)(?:\[[\w,]+\])?(?: |==)(\d+\.\d+(?:\.\d+)?)\b", text):
        if name.lower() in pins and pins[name.lower()] != version:
            errors.append(f"{name} {version}: pyproject.toml pins {name.lower()}=={pins[name.lower()]}")
    python = re.search(r"python(3\.\d+) -m venv", text)
    if not python or python[1] not in SpecifierSet(meta["requires-python"]):
        errors.append(f"python: the venv's {python and python[1]} is not {meta['requires-python']} (requires-python)")
    return errors


def images(cluster: dict, rayjob: dict) -> dict[str, str]:
    """Where each deploy file names the image, and the name."""
    found = {"cluster.yaml docker.image": cluster["docker"]["image"]}
    groups = [("headGroupSpec", rayjob["spec"]["rayClusterSpec"]["headGroupSpec"])]
    groups += [(f"workerGroupSpecs[{g['groupName']}]", g) for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    for where, group in groups:
        for container in group["template"]["spec"]["containers"]:
            found[f"rayjob.yaml {where} {container['name']}"] = container["image"]
    return found


def version_errors(dockerfile: str, cluster: dict, rayjob: dict, meta: dict) -> list[str]:
    """The image tag is the project's version everywhere, and KubeRay starts the Ray we pin."""
    tag = f"odpo-vllm:{meta['version']}"
    found = images(cluster, rayjob)
    found["Dockerfile (docker build -t)"] = (re.search(r"docker build .*-t (\S+)", dockerfile) or [None, None])[1]
    errors = [f"{where}: image {image!r}, not {tag!r}" for where, image in found.items() if image != tag]
    ray_pin = gpu_pins(meta)["ray"]
    if rayjob["spec"]["rayClusterSpec"].get("rayVersion") != ray_pin:
        errors.append(f"rayVersion: {rayjob['spec']['rayClusterSpec'].get('rayVersion')!r}, Ray is pinned at {ray_pin}")
    return errors


# ---------------------------------------------------------------------------------------- the files as they are
def test_cluster_yaml_is_a_valid_ray_cluster_file():
    assert cluster_errors(load_yaml(DEPLOY / "cluster.yaml")) == []


def test_rayjob_yaml_is_a_valid_kuberay_rayjob():
    assert rayjob_errors(load_yaml(DEPLOY / "rayjob.yaml")) == []


def test_deploy_training_commands_parse():
    commands = deploy_commands()
    assert all(commands.values()), commands  # each file still shows its command
    for where, found in commands.items():
        for command in found:
            assert entrypoint_errors(command) == [], (where, command)


def test_rayjob_entrypoint_finds_its_config_in_the_image():
    spec = load_yaml(DEPLOY / "rayjob.yaml")["spec"]
    assert "working_dir" not in (yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {})  # else it would come with it
    assert image_errors(spec["entrypoint"], (DEPLOY / "Dockerfile").read_text()) == []


def test_dockerfile_and_images_match_pyproject():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    meta = project()
    assert dockerfile_errors(dockerfile, meta) == []
    assert version_errors(dockerfile, load_yaml(DEPLOY / "cluster.yaml"), load_yaml(DEPLOY / "rayjob.yaml"), meta) == []
    # the versions named are checked, so the Dockerfile must still name some
    assert {"torch", "vllm"} <= {name.lower() for name in re.findall(r"\b(torch|vLLM) \d", dockerfile)}


# ------------------------------------------------------------------------------ each check catches a wrong field
def mutated(path: Path, change) -> dict:
    document = copy.deepcopy(load_yaml(path))
    change(document)
    return document


def joined(errors: list[str]) -> str:
    assert errors, "the check found nothing wrong"
    return "\n".join(errors)


@pytest.mark.parametrize("change, expected", [
    (lambda c: c["docker"].update(imagee="x"), r"docker: .*'imagee' was unexpected"),
    (lambda c: c.update(max_worker=2), r"\(top\): .*'max_worker' was unexpected"),
    (lambda c: c.update(max_workers="two"), r"max_workers: 'two' is not of type 'integer'"),
    (lambda c: c["available_node_types"]["gpu_node"].update(min_worker=2), r"available_node_types/gpu_node: .*'min_worker'"),
    (lambda c: c["available_node_types"]["gpu_node"].pop("node_config"),
     r"available_node_types/gpu_node: 'node_config' is a required"),
    (lambda c: c.update(head_node_type="cpu_head"), r"head_node_type: 'cpu_head' is not one of available_node_types"),
    (lambda c: c.update(max_workers=1), r"max_workers: 1 is below the node types' min_workers \(2\)"),
])
def test_cluster_check_names_a_wrong_field(change, expected):
    assert re.search(expected, joined(cluster_errors(mutated(DEPLOY / "cluster.yaml", change))))


def spec(job: dict) -> dict:
    return job["spec"]


def worker(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


@pytest.fixture(scope="module")
def closed_rayjob_schema():
    return rayjob_validator()  # once for the parametrized cases


@pytest.mark.parametrize("change, expected", [
    (lambda j: spec(j).update(backofLimit=2), r"^spec: .*'backofLimit' was unexpected"),
    (lambda j: spec(j)["rayClusterSpec"].update(rayversion="2.60.0"), r"^spec/rayClusterSpec: .*'rayversion'"),
    (lambda j: worker(j).update(replicas="2"), r"workerGroupSpecs/0/replicas: '2' is not of type 'integer'"),
    (lambda j: worker(j).pop("groupName"), r"workerGroupSpecs/0: 'groupName' is a required property"),
    # inside the pod template (Kubernetes' own PodSpec, which the CRD spells out)
    (lambda j: worker(j)["template"]["spec"]["containers"][0]["resources"].update(limit={}),
     r"containers/0/resources: .*'limit' was unexpected"),
    (lambda j: worker(j)["template"]["spec"]["containers"][0]["resources"]["limits"].update(memory="512 GB"),
     r"containers/0/resources/limits/memory: '512 GB' does not match"),
    (lambda j: spec(j)["rayClusterSpec"].update(autoscalerOptions={"version": "v3"}),
     r"autoscalerOptions/version: 'v3' is not one of \['v1', 'v2'\]"),
    (lambda j: j.update(apiVersion="ray.io/v1alpha1"), r"apiVersion: 'ray.io/v1alpha1'"),
])
def test_rayjob_check_names_a_wrong_field(change, expected, closed_rayjob_schema):
    errors = rayjob_errors(mutated(DEPLOY / "rayjob.yaml", change), closed_rayjob_schema)
    assert re.search(expected, joined(errors), re.MULTILINE)


def test_closed_schema_keeps_free_maps_and_preserved_fields():
    """Maps of free keys (labels, resource limits) and preserve-unknown objects stay open."""
    schema = closed({"type": "object", "properties": {
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "raw": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-preserve-unknown-fields": True},
        "maybe": {"type": "string", "nullable": True}}})
    validator = jsonschema.Draft7Validator(schema)
    assert schema_errors(validator, {"labels": {"any": "x"}, "raw": {"b": 1}, "maybe": None}) == []
    assert re.search(r"'other' was unexpected", joined(schema_errors(validator, {"other": 1})))


CONFIG = "examples/configs/dedicated_multinode.yaml"


@pytest.mark.parametrize("command, expected", [
    (f"python -m odpo_vllm.train --config {CONFIG} --resume_from_checkpointt auto",
     r"--resume_from_checkpointt: no such flag"),
    ("python -m odpo_vllm.train --config examples/configs/no_such.yaml",
     r"--config examples/configs/no_such.yaml: no such file"),
    (f"python -m odpo_vllm.train --config {CONFIG} --placement in_process", r"placement 'in_process' at ray_address 'auto'"),
    (f"python -m odpo_vllm.train --config {CONFIG} --max_steps many",
     r"argument --max_steps/--max-steps: invalid int value: 'many'"),
    (f"python -m odpo_vllm.trainer --config {CONFIG}", r"does not start with python -m odpo_vllm.train"),
])
def test_entrypoint_check_names_a_wrong_flag_or_file(command, expected):
    assert re.search(expected, joined(entrypoint_errors(command)))


def test_entrypoint_check_loads_the_config_file(tmp_path):
    """A config file with a key the trainer does not know fails as `--config` would."""
    config = yaml.safe_load((ROOT / CONFIG).read_text())
    config["ray_num_engine"] = 2
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "bad.yaml").write_text(yaml.safe_dump(config))
    errors = entrypoint_errors("python -m odpo_vllm.train --config examples/bad.yaml", root=tmp_path)
    assert re.search(r"unknown keys \['ray_num_engine'\]", joined(errors))


def test_image_check_names_a_config_the_dockerfile_does_not_copy():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    without = "".join(line for line in dockerfile.splitlines(keepends=True) if not line.startswith("COPY examples"))
    errors = image_errors(f"python -m odpo_vllm.train --config {CONFIG}", without)
    assert re.search(rf"--config {CONFIG}: not in the image \(the Dockerfile copies \[", joined(errors))
    assert copied_into_image('COPY a b/ ./\nCOPY c ./c\nCOPY d /elsewhere\n') == ["a", "b", "c"]


def test_commands_are_found_in_comments_and_backquotes():
    text = ("# ray job submit --address http://h:8265 -- \\\n#     python -m odpo_vllm.train --config a.yaml\n"
            "then `ray job submit --address http://HEAD:8265\n  -- python -m odpo_vllm.train --config b.yaml --x 1`.")
    assert commands_in_text(text) == ["python -m odpo_vllm.train --config b.yaml --x 1",
                                      "python -m odpo_vllm.train --config a.yaml"]


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.replace("vLLM 0.32.0", "vLLM 0.31.0"), r"vLLM 0.31.0: pyproject.toml pins vllm==0.32.0"),
    (lambda d: d.replace("torch 2.13.0", "torch 2.12.1"), r"torch 2.12.1: pyproject.toml pins torch==2.13.0"),
    (lambda d: d.replace('".[gpu]"', '".[cpu]"'), r"pip install: the Dockerfile must install the project with the gpu"),
    (lambda d: d + 'RUN pip install "deepspeed==0.18.0"\n', r"deepspeed 0.18.0: pyproject.toml pins deepspeed==0.19.8"),
    (lambda d: d.replace("python3.11", "python3.10"), r"python: the venv's 3.10 is not >=3.11"),
])
def test_dockerfile_check_names_a_wrong_pin(change, expected):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(expected, joined(dockerfile_errors(change(dockerfile), project())))


def test_version_check_names_a_wrong_image_or_ray_version():
    dockerfile, meta = (DEPLOY / "Dockerfile").read_text(), project()
    cluster = mutated(DEPLOY / "cluster.yaml", lambda c: c["docker"].update(image="odpo-vllm:0.0.9"))
    job = mutated(DEPLOY / "rayjob.yaml", lambda j: spec(j)["rayClusterSpec"].update(rayVersion="2.59.0"))
    worker(job)["template"]["spec"]["containers"][0]["image"] = "odpo-vllm:latest"
    errors = joined(version_errors(dockerfile.replace("-t odpo-vllm:0.1.0", "-t odpo-vllm:dev"), cluster, job, meta))
    assert "cluster.yaml docker.image: image 'odpo-vllm:0.0.9'" in errors
    assert "rayjob.yaml workerGroupSpecs[gpu] ray-worker: image 'odpo-vllm:latest'" in errors
    assert "Dockerfile (docker build -t): image 'odpo-vllm:dev'" in errors
    assert "rayVersion: '2.59.0', Ray is pinned at 2.60.0" in errors
