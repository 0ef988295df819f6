"""The compiled pipeline YAML that users upload in the Kubeflow UI: DAG, parameters, cluster settings."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from pipelines.pipeline import compile_pipeline

STEPS = ["ingest-op", "validate-op", "split-op", "train-op", "evaluate-op", "register-op", "deploy-op"]


def _load(path):
    spec, platform = yaml.safe_load_all(open(path))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def train_yaml(tmp_path_factory):
    return _load(compile_pipeline(tmp_path_factory.mktemp("yaml") / "train.yaml"))


@pytest.fixture(scope="module")
def retrain_yaml(tmp_path_factory):
    return _load(compile_pipeline(tmp_path_factory.mktemp("yaml") / "retrain.yaml", "retrain"))


def _all_tasks(spec) -> dict:
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_dag_order_and_gate(train_yaml):
    spec, _ = train_yaml
    tasks = _all_tasks(spec)
    assert set(STEPS) <= set(tasks)
    deps = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert "fingerprint-op" in deps["ingest-op"]
    assert "ingest-op" in deps["validate-op"]
    assert {"validate-op", "ingest-op"} <= deps["split-op"]
    assert "split-op" in deps["train-op"]
    assert "train-op" in deps["evaluate-op"]
    assert "register-op" in deps["deploy-op"]
    # register and deploy live only inside the condition on evaluate's gate decision
    root = spec["root"]["dag"]["tasks"]
    assert "register-op" not in root and "deploy-op" not in root
    (condition,) = [t for t in root.values() if "triggerPolicy" in t]
    assert condition["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--evaluate-op-Output'] == true"
    inner = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"register-op", "deploy-op"}


def test_deploy_gets_the_registered_version_to_promote(train_yaml):
    """Register hands deploy the version it created (not the alias): deploy serves it, then promotes it."""
    spec, _ = train_yaml
    deploy = _all_tasks(spec)["deploy-op"]["inputs"]["parameters"]
    assert deploy["version"] == {"taskOutputParameter": {"producerTask": "register-op", "outputParameterKey": "version"}}
    assert deploy["model_name"] == {"componentInputParameter": "pipelinechannel--model_name"}
    register_outputs = spec["components"]["comp-register-op"]["outputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in register_outputs.items()} == {"model_uri": "STRING", "version": "STRING"}
    deploy_outputs = spec["components"]["comp-deploy-op"]["outputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in deploy_outputs.items()} == {"url": "STRING", "champion": "STRING"}


def test_parameters_have_ui_defaults(train_yaml):
    spec, _ = train_yaml
    params = spec["root"]["inputDefinitions"]["parameters"]
    expected = {"source": "kaggle:murtozalikhon/brain-tumor-multimodal-image-ct-and-mri", "bucket": "brainscan",
                "prefix": "pipeline", "image_size": 299,
                "epochs": 10, "fine_tune_epochs": 5, "base_weights": "imagenet", "target_recall": 0.99,
                "min_recall": 0.95, "min_auc": 0.95, "gpus": 1, "namespace": "kubeflow-user", "canary_percent": 0,
                "model_name": "brain-tumor"}
    for name, default in expected.items():
        assert params[name]["defaultValue"] == default, name
        assert params[name]["isOptional"] is True
    # Only what a cluster user sets, each with the one line the Kubeflow UI shows.
    assert not {"local", "workdir"} & set(params)
    assert all(p.get("description") for p in params.values()), [n for n, p in params.items() if not p.get("description")]


def test_cli_local_runner_and_pipeline_share_one_parameter_list(train_yaml, retrain_yaml):
    """brainscan.config.PipelineParams is the one definition: names, defaults and help agree everywhere."""
    import typer.main

    from brainscan.config import DEFAULTS, PipelineParams, param_help, param_names

    fields = param_names()
    for spec, _ in (train_yaml, retrain_yaml):
        params = spec["root"]["inputDefinitions"]["parameters"]
        assert sorted(params) == sorted(fields)
        for name in fields:
            assert params[name]["defaultValue"] == getattr(DEFAULTS, name), name
            assert params[name]["description"] == param_help(name), name
    command = typer.main.get_command(app).commands["pipeline"].commands["run"]
    options = {p.name: p for p in command.params}
    for name in fields:
        assert options[name].show_default == str(getattr(DEFAULTS, name)), name
        assert options[name].help == param_help(name), name
    import inspect

    from pipelines import local
    assert inspect.signature(local.run_local).parameters["params"].annotation in (PipelineParams, "PipelineParams")


def test_artifact_outputs_for_the_ui(train_yaml):
    spec, _ = train_yaml
    def outputs(component):
        return {name: a["artifactType"]["schemaTitle"]
                for name, a in spec["components"][component]["outputDefinitions"].get("artifacts", {}).items()}
    assert outputs("comp-ingest-op") == {"dataset": "system.Dataset"}
    assert outputs("comp-validate-op") == {"report": "system.HTML", "metrics": "system.Metrics"}
    assert outputs("comp-train-op") == {"model": "system.Model", "metrics": "system.Metrics"}
    assert outputs("comp-evaluate-op") == {"metrics": "system.Metrics",
                                           "classification": "system.ClassificationMetrics", "report": "system.HTML"}
    assert outputs("comp-register-op") == {"registered": "system.Model"}


def test_training_runs_on_gpu_nodes_without_cache(train_yaml):
    spec, kube = train_yaml
    container = spec["deploymentSpec"]["executors"]["exec-train-op"]["container"]
    accelerator = container["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/gpu"
    assert accelerator["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus']}}"
    assert container["resources"]["resourceCpuRequest"] and container["resources"]["resourceMemoryRequest"]
    tasks = _all_tasks(spec)
    assert tasks["train-op"]["cachingOptions"].get("enableCache", False) is False
    assert tasks["ingest-op"]["cachingOptions"]["enableCache"] is True
    assert tasks["validate-op"]["cachingOptions"]["enableCache"] is True
    for step in ("evaluate-op", "register-op", "deploy-op"):
        assert tasks[step]["cachingOptions"].get("enableCache", False) is False, step
    # CPU steps do not ask for GPUs
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-ingest-op"]["container"]["resources"]


def test_training_placement_follows_gpus(train_yaml):
    """GPU nodes (label and taint) only when training asks for GPUs: `gpus=0` runs on any node. Pod-spec
    settings cannot read a parameter's value, so a step computes them and the train pod takes its outputs."""
    from pipelines import ops as c

    spec, kube = train_yaml
    train = kube["exec-train-op"]
    from_placement = {"taskOutputParameter": {"producerTask": "train-placement-op", "outputParameterKey": "node_selector"}}
    assert train["nodeSelector"] == {"nodeSelectorJson": from_placement}
    assert train["tolerations"] == [{"tolerationJson": {"taskOutputParameter": {
        "producerTask": "train-placement-op", "outputParameterKey": "tolerations"}}}]
    tasks = _all_tasks(spec)
    assert tasks["train-placement-op"]["inputs"]["parameters"]["gpus"] == {"componentInputParameter": "gpus"}
    assert "train-placement-op" in tasks["train-op"]["dependentTasks"]
    outputs = spec["components"]["comp-train-placement-op"]["outputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in outputs.items()} == {"node_selector": "STRUCT", "tolerations": "LIST"}
    # what the step returns (its own function, as the executor calls it)
    gpu = c.train_placement_op.python_func(gpus=2)
    assert gpu.node_selector == {"nvidia.com/gpu.present": "true"}
    assert gpu.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    cpu = c.train_placement_op.python_func(gpus=0)
    assert cpu.node_selector == {} and cpu.tolerations == []


def test_retries_with_backoff_on_ingest_and_deploy(train_yaml):
    spec, _ = train_yaml
    tasks = _all_tasks(spec)
    for step in ("ingest-op", "deploy-op"):
        policy = tasks[step]["retryPolicy"]
        assert policy["maxRetryCount"] >= 2 and policy["backoffFactor"] >= 2 and policy["backoffDuration"]
    assert "retryPolicy" not in tasks["train-op"]


def test_credentials_come_from_the_secret(train_yaml):
    _, kube = train_yaml
    for step in STEPS:
        envs = {e["envVar"] for s in kube[f"exec-{step}"]["secretAsEnv"] for e in s["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= envs, step
        assert all(s["secretName"] == "brainscan-s3" for s in kube[f"exec-{step}"]["secretAsEnv"])
    for step in ("evaluate-op", "register-op", "deploy-op"):
        envs = {e["envVar"] for s in kube[f"exec-{step}"]["secretAsEnv"] for e in s["keyToEnv"]}
        assert "MLFLOW_TRACKING_URI" in envs, step


def _image_placeholder(param: str) -> str:
    return f"{{{{$.inputs.parameters['pipelinechannel--{param}']}}}}"


def test_components_are_thin_wrappers_on_the_project_image(train_yaml):
    """Every step runs the project image named by a pipeline parameter (KFP resolves it when the step
    starts), training its GPU variant; the defaults are the project's images."""
    spec, _ = train_yaml
    executors = spec["deploymentSpec"]["executors"]
    for step in STEPS:
        container = executors[f"exec-{step}"]["container"]
        source = container["command"][-1]
        module = step.removesuffix("-op")
        assert f"from components.{module} import" in source, step
        assert "pip install" not in " ".join(container["command"]), "the image holds every dependency"
    images = {name: e["container"]["image"] for name, e in executors.items()}
    assert images.pop("exec-train-op") == _image_placeholder("train_image")
    assert set(images.values()) == {_image_placeholder("pipeline_image")}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["pipeline_image"]["defaultValue"] == "ghcr.io/brainscan/brainscan-pipeline:0.1.0"
    assert params["train_image"]["defaultValue"] == "ghcr.io/brainscan/brainscan-pipeline:0.1.0-gpu"
    assert params["serving_image"]["defaultValue"] == "ghcr.io/brainscan/brainscan-serving:0.1.0"


def test_images_are_pipeline_parameters_defaulting_to_the_environment(tmp_path):
    """$BRAINSCAN_*_IMAGE at compile time become the defaults; a run may name other images; the deploy step
    rolls out the serving image parameter (with the deployment mode and predictor GPUs)."""
    import os

    out = tmp_path / "custom.yaml"
    code = f"from pipelines.pipeline import compile_pipeline; compile_pipeline({str(out)!r})"
    env = {"BRAINSCAN_PIPELINE_IMAGE": "registry.example/bs:1", "BRAINSCAN_PIPELINE_GPU_IMAGE": "registry.example/bs:1-gpu",
           "BRAINSCAN_SERVING_IMAGE": "registry.example/bs-serving:1"}
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, **env})
    spec, _ = _load(out)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["pipeline_image"]["defaultValue"] == "registry.example/bs:1"
    assert params["train_image"]["defaultValue"] == "registry.example/bs:1-gpu"
    assert params["serving_image"]["defaultValue"] == "registry.example/bs-serving:1"
    deploy = _all_tasks(spec)["deploy-op"]["inputs"]["parameters"]
    assert deploy["image"] == {"componentInputParameter": "pipelinechannel--serving_image"}
    assert deploy["deployment_mode"] == {"componentInputParameter": "pipelinechannel--deployment_mode"}
    assert deploy["gpus"] == {"componentInputParameter": "pipelinechannel--serving_gpus"}
    # only BRAINSCAN_PIPELINE_IMAGE set: training runs on it too (a user's registry, no -gpu twin assumed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRAINSCAN_")}
    subprocess.run([sys.executable, "-c", code], check=True, env={**env, "BRAINSCAN_PIPELINE_IMAGE": "r.example/bs:2"})
    params = _load(out)[0]["root"]["inputDefinitions"]["parameters"]
    assert params["train_image"]["defaultValue"] == params["pipeline_image"]["defaultValue"] == "r.example/bs:2"


def test_deploy_step_hands_image_mode_and_gpus_to_the_inference_service(monkeypatch):
    """deploy_op's own function, as the executor runs it: the parameters reach the InferenceService builder."""
    from components import deploy as deploy_mod
    from pipelines import ops as c

    seen = {}

    def fake_deploy(model_uri, **kwargs):
        seen.update(kwargs, model_uri=model_uri)
        return deploy_mod.DeployResult(model_uri=model_uri, target="cluster", name="brain-tumor", namespace="ns",
                                       action="created", ready=True, url="http://brain-tumor.ns", promoted=True,
                                       champion="3")

    monkeypatch.setattr(deploy_mod, "deploy", fake_deploy)
    monkeypatch.delenv("BRAINSCAN_LOCAL_DEPLOY_WORKDIR", raising=False)
    out = c.deploy_op.python_func(model_name="brain-tumor", version="3", namespace="ns", canary_percent=0,
                                  image="registry.example/bs-serving:1", deployment_mode="RawDeployment", gpus=0)
    assert (out.url, out.champion) == ("http://brain-tumor.ns", "3")
    assert seen == {"model_uri": "models:/brain-tumor/3", "namespace": "ns", "canary_percent": None,
                    "image": "registry.example/bs-serving:1", "gpus": 0, "deployment_mode": "RawDeployment",
                    "local": False, "workdir": ".", "promote": True}


def test_pipeline_parameters_reject_an_unknown_mode_or_a_raw_canary():
    from brainscan.config import DEFAULTS

    assert DEFAULTS.replace(deployment_mode="Standard").deployment_mode == "Standard"
    with pytest.raises(ValueError, match="deployment mode 'Kubernetes'"):
        DEFAULTS.replace(deployment_mode="Kubernetes")
    with pytest.raises(ValueError, match="canary_percent needs deployment_mode Serverless"):
        DEFAULTS.replace(deployment_mode="RawDeployment", canary_percent=10)


def test_retrain_pipeline_skips_everything_when_data_unchanged(retrain_yaml):
    spec, _ = retrain_yaml
    root = spec["root"]["dag"]["tasks"]
    (condition_name,) = [name for name, t in root.items() if "triggerPolicy" in t]
    condition = root[condition_name]
    assert set(root) == {"fingerprint-op", "champion-fingerprint-op", condition_name}
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--fingerprint-op-Output'] != "
        "inputs.parameter_values['pipelinechannel--champion-fingerprint-op-Output']")
    assert set(STEPS) <= set(_all_tasks(spec))


def test_cli_compile(tmp_path):
    out = tmp_path / "sub" / "pipeline.yaml"
    result = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out)
    spec, _ = _load(out)
    assert spec["pipelineInfo"]["name"] == "brainscan-train"


def test_cli_run_local_hands_every_option_to_the_local_run(tmp_path, monkeypatch):
    """`pipeline run --local` options reach the run as PipelineParams; the summary's path is the last line."""
    import json

    from brainscan.config import PipelineParams
    from pipelines import local

    seen = {}

    def fake_run_local(params, workdir, only_if_new_data=False):
        seen.update(params=params, workdir=workdir, only_if_new_data=only_if_new_data)
        path = tmp_path / "summary.json"
        steps = {name: {"status": "SUCCESS", "seconds": 1.0} for name in sorted(local.STEP_ORDER)}
        path.write_text(json.dumps({"steps": steps, "trained": True, "gate": {"reason": "min_recall"}}))
        return path

    monkeypatch.setattr(local, "run_local", fake_run_local)
    options = ["--image-size", "96", "--epochs", "7", "--fine-tune-epochs", "3", "--batch-size", "4",
               "--base-weights", "none", "--seed", "5", "--patience", "2", "--target-recall", "0.97",
               "--min-recall", "0.9", "--min-auc", "0.85", "--model-name", "m", "--bucket", "b", "--prefix", "p"]
    result = CliRunner().invoke(app, ["pipeline", "run", "--local", "--source", "src", "--workdir", str(tmp_path),
                                      "--retrain-if-new-data", *options])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-1] == str(tmp_path / "summary.json")
    assert seen["only_if_new_data"] is True and seen["params"].source == "src"
    assert seen["params"] == PipelineParams(source="src", image_size=96, epochs=7, fine_tune_epochs=3, batch_size=4,
                                            base_weights="none", seed=5, patience=2, target_recall=0.97,
                                            min_recall=0.9, min_auc=0.85, model_name="m", bucket="b", prefix="p")
    # A preset sets the defaults; what is given on the command line wins.
    result = CliRunner().invoke(app, ["pipeline", "run", "--local", "--source", "src", "--workdir", str(tmp_path),
                                      "--preset", "cpu", "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert seen["params"].epochs == 3 and seen["params"].base_weights == "none" and seen["params"].gpus == 0
    bad = CliRunner().invoke(app, ["pipeline", "run", "--local", "--source", "src", "--preset", "tpu"])
    assert bad.exit_code == 1 and "unknown preset 'tpu'" in bad.output


def test_step_logs_go_to_files_and_the_console_gets_one_line_per_step(tmp_path):
    """kfp.local's executor output lands in one log file per step; a failed step shows its log's path and tail."""
    import logging

    from pipelines.local import StepLogs

    lines = []
    logs = StepLogs(tmp_path / "logs", lines.append)
    root = logging.getLogger()
    root.addFilter(logs)
    handler = logging.StreamHandler(logs)  # as kfp.local points its handler at sys.stdout
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        logging.info("Executing task 'ingest-op'")
        logs.write("ingest: 700 files uploaded\n")
        logging.info("Task 'ingest-op' finished with status \x1b[92mSUCCESS\x1b[0m")
        logging.info("Executing task 'train-op'")
        logs.write("Traceback (most recent call last):\nTrainingError: no GPU\n")
        logging.info("Task 'train-op' finished with status FAILURE")
    finally:
        root.removeHandler(handler)
        root.removeFilter(logs)
        root.setLevel(level)
        logs.close()
    assert "ingest: 700 files uploaded" in (tmp_path / "logs" / "ingest.log").read_text()
    assert "TrainingError: no GPU" in (tmp_path / "logs" / "train.log").read_text()
    assert "TrainingError" not in (tmp_path / "logs" / "ingest.log").read_text()
    assert lines[0].split()[:2] == ["ingest", "SUCCESS"] and lines[1].split()[:2] == ["train", "FAILURE"]
    assert str(tmp_path / "logs" / "train.log") in lines[2] and "TrainingError: no GPU" in lines[2]
    assert len(lines) == 3


def test_kfp_local_output_is_captured_for_the_run_only(tmp_path):
    """What kfp.local prints, logs (through its handler on sys.stdout) or warns reaches the sink."""
    import io
    import logging
    import sys
    import warnings

    from pipelines import kfp_compat

    class Watcher(kfp_compat.TaskWatcher):
        def __init__(self):
            super().__init__()
            self.events = []

        def task_started(self, task, at):
            self.events.append(("started", task))

        def task_finished(self, task, status, at):
            self.events.append(("finished", task, status))

    sink, watcher, root = io.StringIO(), Watcher(), logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    try:
        with kfp_compat.captured_output(sink, watcher):
            handler = logging.StreamHandler(sys.stdout)  # what kfp.local installs around each task
            root.addHandler(handler)
            try:
                logging.info("Executing task \x1b[96m'split-op'\x1b[0m")
                print("split: 3 files")
                warnings.warn("custom image", RuntimeWarning)
                logging.info("Task \x1b[96m'split-op'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m")
            finally:
                root.removeHandler(handler)
    finally:
        root.setLevel(level)
    assert watcher.events == [("started", "split-op"), ("finished", "split-op", "SUCCESS")]
    assert "split: 3 files" in sink.getvalue() and "RuntimeWarning: custom image" in sink.getvalue()
    assert watcher not in root.filters and sys.stdout is not sink


def test_kfp_adaptations_refuse_another_kfp_version(monkeypatch):
    from importlib import metadata

    from pipelines import kfp_compat

    kfp_compat.check_version()  # the installed one is the one it was written for
    monkeypatch.setattr(metadata, "version", lambda name: "2.18.0")
    with pytest.raises(ImportError, match=r"written for kfp 2\.17\.0, found 2\.18\.0.*re-check"):
        kfp_compat.check_version()


def test_cli_run_without_local_says_where_cluster_runs_go():
    result = CliRunner().invoke(app, ["pipeline", "run", "--source", "src"])
    assert result.exit_code != 0
    assert "--local" in result.output and "pipeline submit" in result.output


def test_every_train_parameter_reaches_train_under_its_own_name(train_yaml, monkeypatch):
    """brainscan.config.Recipe's fields (the recipe options included): pipeline parameter -> train step input
    of the same name -> train()'s Recipe with the pipeline's default; `brainscan train` has an option for
    each and takes a preset."""
    import inspect

    from components import train as train_module
    from brainscan.config import DEFAULTS, PRESETS, Recipe, param_names

    TRAIN_PARAMS = param_names(Recipe)
    spec, _ = train_yaml
    inputs = _all_tasks(spec)["train-op"]["inputs"]["parameters"]
    for name in TRAIN_PARAMS:
        assert inputs[name]["componentInputParameter"] == name, name
    signature = inspect.signature(Recipe).parameters  # train(splits, out, recipe: Recipe)
    for name in TRAIN_PARAMS:
        assert signature[name].default == getattr(DEFAULTS, name), name

    seen = {}

    class Result:  # what the command prints from
        epochs_run = best_epoch = 1
        seconds = best_val_loss = best_val_accuracy = 0.0
        out = curves_uri = "x"

    monkeypatch.setattr(train_module, "train", lambda splits, out, recipe: seen.update(recipe.as_dict()) or Result())
    result = CliRunner().invoke(app, ["train", "--splits", "s", "--out", "o", "--preset", "cpu", "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert seen == {**{n: getattr(DEFAULTS, n) for n in TRAIN_PARAMS}, **{k: v for k, v in PRESETS["cpu"].items()
                                                                            if k in TRAIN_PARAMS}, "epochs": 3}
    result = CliRunner().invoke(app, ["train", "--splits", "s", "--out", "o", "--lr-schedule", "cosine",
                                      "--augment-flip", "--weight-decay", "0.01"])
    assert result.exit_code == 1 and "cosine schedule is one stage" in result.output  # default fine-tune epochs
    result = CliRunner().invoke(app, ["train", "--splits", "s", "--out", "o", "--lr-schedule", "cosine",
                                      "--fine-tune-epochs", "0", "--augment-flip", "--tta-flip"])
    assert result.exit_code == 0, result.output
    assert seen["lr_schedule"] == "cosine" and seen["augment_flip"] is True and seen["tta_flip"] is True


def test_the_train_step_takes_every_recipe_field_under_its_own_name_and_type():
    """KFP needs train_op's signature written out (it ships the function's source text): it lists
    exactly Recipe's fields, with Recipe's types, besides the step's own inputs."""
    import inspect
    import typing

    from brainscan.config import Recipe, param_names, param_types
    from pipelines.ops import train_op

    own = {"splits_uri", "bucket", "prefix", "run_id", "gpus", "model", "metrics"}
    signature = inspect.signature(train_op.python_func).parameters
    recipe_inputs = [name for name in signature if name not in own]
    assert recipe_inputs == param_names(Recipe)
    hints = typing.get_type_hints(train_op.python_func)
    assert {name: hints[name] for name in recipe_inputs} == param_types(Recipe)


def test_the_cpu_preset_is_the_measured_recipe():
    from brainscan.config import DEFAULTS, preset

    cpu = preset("cpu")
    assert (cpu.image_size, cpu.epochs, cpu.fine_tune_epochs, cpu.patience, cpu.batch_size) == (96, 40, 0, 40, 16)
    assert (cpu.base_weights, cpu.lr_schedule, cpu.warmup_epochs, cpu.weight_decay) == ("none", "cosine", 2, 0.02)
    assert cpu.augment_flip and cpu.tta_flip and not cpu.crop_to_head
    assert cpu.target_recall == 0.98  # the calibration study's choice (docs/results/calibration_study)
    assert (cpu.gpus, cpu.serving_gpus, cpu.train_image) == (0, 0, DEFAULTS.pipeline_image)
    assert preset("gpu") == DEFAULTS  # the cluster's transfer-learning recipe stays the original one
    with pytest.raises(ValueError, match="cosine schedule is one stage"):
        cpu.replace(fine_tune_epochs=2)


def test_register_has_the_memory_for_the_onnx_conversion(train_yaml):
    """Registration converts the model to ONNX (brainscan/onnx_export.py): a child that peaked at 4.0 GiB
    next to the step's own 1.1 GiB for the 71 px Xception (measured; see docs/serving.md)."""
    spec, _ = train_yaml
    resources = spec["deploymentSpec"]["executors"]["exec-register-op"]["container"]["resources"]
    limit = resources["resourceMemoryLimit"]
    assert limit.endswith("Gi") and float(limit.removesuffix("Gi")) >= 5.5, resources
