"""The pipeline image, run as KFP runs it: UID 1000, the compiled pipeline's own commands.

- The baked ImageNet weights load through Keras's own `Xception(weights="imagenet")` with no
  network at all: Keras resolves its cache to $KERAS_HOME (writable by the user) and finds the file.
- The contract between the compiled YAML and the image: the fingerprint, ingest, validate and split
  steps run with the command, args and image that `brainscan pipeline compile` wrote, an executor
  input built as the KFP driver builds it (output parameters under /tmp/kfp/outputs, artifacts
  under minio://mlpipeline/... which the launcher maps to /minio/... on an emptyDir), the S3
  secret's keys as variables, against the local stack on 127.0.0.1; each writes its outputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml

from brainscan import storage
from tests.fixtures.images import PIPELINE_IMAGE, env_file, images_enabled, owned_dir

pytestmark = pytest.mark.skipif(images_enabled() is not None, reason=images_enabled() or "")

WEIGHTS = "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"

LOAD_WEIGHTS = textwrap.dedent(f"""
    import json, os, socket
    import h5py, keras, numpy as np
    from keras.src.utils import file_utils

    def reachable(host, port):
        try:
            socket.create_connection((host, port), timeout=3).close()
            return True
        except OSError:
            return False

    assert not reachable("storage.googleapis.com", 443) and not reachable("1.1.1.1", 443), "network reachable"
    home = os.environ["KERAS_HOME"]
    baked = os.path.join(home, "models", "{WEIGHTS}")
    genuine = not os.path.exists(os.path.join(home, "models", "UNVERIFIED"))  # the build checked its md5
    if not genuine:
        # A stand-in (no internet here to fetch the real file): same name, layout and shapes, other
        # numbers. Only Keras's md5 comparison is told to accept it; the rest is Keras's own path.
        file_utils.validate_file = lambda *args, **kwargs: True
    resolved = []
    get_file = file_utils.get_file
    file_utils.get_file = lambda *a, **k: resolved.append(get_file(*a, **k)) or resolved[-1]

    model = keras.applications.Xception(weights="imagenet", include_top=False)

    with h5py.File(baked, "r") as weights:  # the loaded numbers are the file's
        group = weights["block1_conv1"]
        name = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]][0]
        kernel = group[name][()]
    print(json.dumps({{"uid": os.getuid(), "keras_home": home, "writable": os.access(home, os.W_OK),
                       "resolved": resolved, "genuine": genuine,
                       "same_kernel": bool(np.allclose(model.get_layer("block1_conv1").kernel.numpy(), kernel)),
                       "tmp_keras": os.path.exists("/tmp/.keras")}}))
""")


def test_baked_imagenet_weights_load_for_uid_1000_with_no_network(pipeline_container):
    proc = pipeline_container.run(["python", "-c", LOAD_WEIGHTS], network=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    baked = f"{result['keras_home']}/models/{WEIGHTS}"
    assert result["uid"] == 1000 and result["writable"], result  # else Keras uses /tmp/.keras and downloads
    assert result["resolved"] == [baked], result  # Keras's cache lookup found the baked file...
    assert result["same_kernel"] and not result["tmp_keras"], result  # ...loaded it, and fell back to nothing
    if not result["genuine"]:
        print("stand-in weights (the real file cannot be downloaded here): Keras's md5 check was bypassed")


# --------------------------------------------------------------------------- compiled steps in the image
MINIO_ROOT = "minio://mlpipeline/v2/artifacts"  # KFP's default pipeline root (SeaweedFS behind it now)
PLACEHOLDER = re.compile(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}")


def _parameter(value_type: str, text: str):
    return text if value_type == "STRING" else json.loads(text)


def _as_protojson(value):
    """A parameter value as the Go driver writes it into the executor input (protojson: a whole number,
    stored as a double, prints as 42, not 42.0)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _as_protojson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_protojson(v) for v in value]
    return value


class CompiledPipeline:
    """Runs tasks of a compiled pipeline YAML the way the KFP driver and launcher would, one pod each."""

    def __init__(self, path: Path, arguments: dict, container, work: Path, env: Path):
        self.spec = next(yaml.safe_load_all(path.read_text()))
        defaults = {name: p.get("defaultValue") for name, p in self.spec["root"]["inputDefinitions"]["parameters"].items()}
        self.arguments = {**defaults, **arguments}
        self.container, self.work, self.env = container, work, env
        self.run_id = uuid.uuid4().hex[:12]
        self.outputs: dict[str, dict] = {}
        self.volumes: dict[str, str] = {}

    def _inputs(self, task: dict) -> dict:
        values = {}
        for name, source in task.get("inputs", {}).get("parameters", {}).items():
            if "componentInputParameter" in source:
                values[name] = self.arguments[source["componentInputParameter"]]
            elif "taskOutputParameter" in source:
                producer = source["taskOutputParameter"]
                values[name] = self.outputs[producer["producerTask"]][producer["outputParameterKey"]]
            else:
                constant = source["runtimeValue"]["constant"]
                values[name] = PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), m.group(0))), constant) \
                    if isinstance(constant, str) else constant
        return values

    def run(self, task_name: str, volumes: dict[str, str]) -> dict:
        task = self.spec["root"]["dag"]["tasks"][task_name]
        component = self.spec["components"][task["componentRef"]["name"]]
        executor = self.spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
        values = self._inputs(task)
        image = PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), executor["image"])
        assert image == PIPELINE_IMAGE, f"{task_name} would run {image}"

        minio = owned_dir(self.work / "minio")  # the launcher's emptyDir at /minio
        outputs_dir = owned_dir(self.work / task_name / "kfp")  # /tmp/kfp of this task's pod
        task_root = f"{MINIO_ROOT}/brainscan-train/{self.run_id}/{task_name}/{uuid.uuid4().hex[:8]}"
        local_root = task_root.replace("minio://", "/minio/")
        output_defs = component.get("outputDefinitions", {})
        executor_input = {
            "inputs": {"parameterValues": {name: _as_protojson(values[name])
                                           for name in component.get("inputDefinitions", {}).get("parameters", {})}},
            "outputs": {
                "parameters": {name: {"outputFile": f"/tmp/kfp/outputs/{name}"}
                               for name in output_defs.get("parameters", {})},
                "artifacts": {name: {"artifacts": [{"name": name, "type": spec["artifactType"], "metadata": {},
                                                    "uri": f"{task_root}/{name}"}]}
                              for name, spec in output_defs.get("artifacts", {}).items()},
                "outputFile": f"{local_root}/output_metadata.json",
            },
        }
        # the launcher creates the output folders (as the step's user) before it starts the command
        task_dir = minio / local_root.removeprefix("/minio/")
        for path in [*reversed(task_dir.relative_to(minio).parents), task_dir.relative_to(minio)]:
            owned_dir(minio / path)
        owned_dir(outputs_dir / "outputs")
        args = [json.dumps(executor_input) if arg == "{{$}}" else arg for arg in executor["args"]]
        proc = self.container.run([*executor["command"], *args], env=self.env, timeout=900,
                                  volumes={str(minio): "/minio", str(outputs_dir): "/tmp/kfp", **volumes})
        assert proc.returncode == 0, f"{task_name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

        # as the launcher collects them: the executor output file first, else the parameter's own file
        metadata = json.loads((task_dir / "output_metadata.json").read_text())
        result = {}
        for name, spec in output_defs.get("parameters", {}).items():
            if name in metadata.get("parameterValues", {}):
                result[name] = metadata["parameterValues"][name]
            else:
                result[name] = _parameter(spec["parameterType"], (outputs_dir / "outputs" / name).read_text())
        for name, spec in output_defs.get("artifacts", {}).items():
            path = task_dir / name
            result[name] = {"path": path, "metadata": metadata["artifacts"][name]["artifacts"][0].get("metadata", {})}
            if spec["artifactType"]["schemaTitle"] in ("system.Metrics", "system.ClassificationMetrics"):
                assert result[name]["metadata"], f"{task_name}: no {name} in the executor output"  # metadata only
            else:
                assert path.is_file() and path.stat().st_size > 0, f"{task_name}: no {name} artifact at {path}"
        self.outputs[task_name] = result
        return result


@pytest.fixture(scope="module")
def compiled_pipeline(tmp_path_factory) -> Path:
    """`brainscan pipeline compile` as a user would, with this image as the pipeline image."""
    out = tmp_path_factory.mktemp("compiled") / "brainscan-train.yaml"
    env = {**os.environ, "BRAINSCAN_PIPELINE_IMAGE": PIPELINE_IMAGE}
    subprocess.run([str(Path(sys.executable).parent / "brainscan"), "pipeline", "compile", "--out", str(out)],
                   check=True, env=env, capture_output=True, text=True, timeout=300)
    return out


def test_compiled_steps_run_in_the_image_and_write_their_outputs(pipeline_container, compiled_pipeline, s3_stack,
                                                                  synthetic_archive, tmp_path):
    from pipelines.pipeline import S3_ENV
    from pipelines.watcher import source_fingerprint

    work = owned_dir(tmp_path / "pods")
    bucket = f"smoke-{uuid.uuid4().hex[:10]}"
    storage.ensure_bucket(bucket)
    secret = env_file(work, {key: value for key, value in s3_stack.env().items() if key in S3_ENV})
    pipeline = CompiledPipeline(compiled_pipeline, {"source": "/data/archive", "bucket": bucket, "prefix": "smoke"},
                                pipeline_container, work, secret)
    copy = Path(shutil.copytree(synthetic_archive.out_dir, work / "archive"))  # readable by the step's user
    copy.chmod(0o755)
    archive = {str(copy): "/data/archive:ro"}

    fingerprint = pipeline.run("fingerprint-op", archive)["Output"]
    assert fingerprint == source_fingerprint(str(synthetic_archive.out_dir))

    ingest = pipeline.run("ingest-op", archive)
    assert ingest["data_uri"] == f"s3://{bucket}/smoke/dataset/{fingerprint}" and ingest["fingerprint"] == fingerprint
    assert storage.exists(storage.join(ingest["data_uri"], "manifest.csv"))
    summary = json.loads(ingest["dataset"]["path"].read_text())
    assert summary["files"] == synthetic_archive.files
    assert ingest["dataset"]["metadata"]["uri"] == ingest["data_uri"]

    validate = pipeline.run("validate-op", {})
    assert validate["Output"].startswith(storage.join(ingest["data_uri"], "validation") + "/")
    assert storage.exists(storage.join(validate["Output"], "validation.json"))
    assert "<" in validate["report"]["path"].read_text()[:200]  # the HTML report the UI shows
    assert validate["metrics"]["metadata"]["images"] == synthetic_archive.files

    split = pipeline.run("split-op", {})
    assert split["Output"].startswith(storage.join(ingest["data_uri"], "splits") + "/")
    for name in ("train.csv", "val.csv", "test.csv"):
        assert storage.exists(storage.join(split["Output"], name)), name
    assert sum(split["splits"]["metadata"][f"rows_{part}"] for part in ("train", "val", "test")) > 0
