"""The KFP v2 pipelines: the training DAG and its "retrain if new data" variant.

    fingerprint -> ingest -> validate -> split -> train -> evaluate -> If(gate passed) -> register -> deploy

The same pipeline functions run on a Kubeflow cluster (compiled YAML) and locally
(`kfp.local.SubprocessRunner`, see `pipelines/local.py`). Their parameters are the fields of
brainscan.config.PipelineParams, with its defaults and its one-line help as the description
the Kubeflow UI shows. The Kubernetes settings (GPU, secrets, node selection) are platform
config that the local runner ignores.

Where a run's data lives on the store (bucket/prefix): brainscan/layout.py.
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects.

import inspect
import os
from types import SimpleNamespace

from kfp import compiler, dsl, kubernetes

from brainscan.config import (DEFAULTS, GPU_RESOURCE, MLFLOW_ENV_KEYS, PIPELINE_NAME, RETRAIN_PIPELINE_NAME,
                              S3_ENV_KEYS, S3_SECRET, TEST_FRACTION, VAL_FRACTION, Recipe, param_help, param_names,
                              param_types)
from pipelines import ops as c

# Kubernetes settings of the cluster; overridable at compile time.
SECRET_NAME = os.environ.get("BRAINSCAN_SECRET", S3_SECRET)
S3_ENV = S3_ENV_KEYS
MLFLOW_ENV = MLFLOW_ENV_KEYS
# Every step's pod: the labels infra/k8s/base/network-policies.yaml selects (no ingress; egress to
# DNS, Kubeflow's services, MLflow and the Kubernetes API), and the images' non-root user.
STEP_LABELS = {"app.kubernetes.io/name": "brainscan", "app.kubernetes.io/component": "pipeline-step"}
STEP_UID = 1000


def _with_credentials(task: dsl.PipelineTask, mlflow: bool = False) -> dsl.PipelineTask:
    """S3 (and MLflow) settings from the Kubernetes secret, as environment variables."""
    keys = S3_ENV + (MLFLOW_ENV if mlflow else ())
    return kubernetes.use_secret_as_env(task, secret_name=SECRET_NAME, secret_key_to_env={k: k for k in keys})


def _resources(task: dsl.PipelineTask, cpu: str, memory: str, image) -> dsl.PipelineTask:
    """Requests and limits, and the step's image: a pipeline parameter, resolved by KFP when the step starts.
    Also the pod's labels and user. kfp-kubernetes 2.17 sets no read-only root filesystem (its security
    context has the user and group only; no privilege escalation, no capabilities and RuntimeDefault
    seccomp are KFP's own defaults, its docstring says) and cannot leave out the service-account token,
    which KFP's launcher in the pod needs to read the artifact store's secret."""
    task.set_container_image(image)
    for key, value in STEP_LABELS.items():
        kubernetes.add_pod_label(task, key, value)
    kubernetes.set_security_context(task, run_as_user=STEP_UID, run_as_non_root=True)
    return task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)


def _train_and_deploy(p, fingerprint) -> None:
    """The shared body of both pipelines, from ingest to deploy (`p`: the pipeline's parameters)."""
    ingest = c.ingest_op(source=p.source, bucket=p.bucket, prefix=p.prefix, source_fingerprint=fingerprint)
    ingest.set_display_name("ingest")
    # Cached: the cache key holds the source's fingerprint, so new or relabelled images re-run it.
    ingest.set_caching_options(True).set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2,
                                               backoff_max_duration="10m")
    _resources(_with_credentials(ingest), "1", "2Gi", p.pipeline_image)

    validate = c.validate_op(data_uri=ingest.outputs["data_uri"], fingerprint=ingest.outputs["fingerprint"])
    validate.set_display_name("validate").set_caching_options(True)
    _resources(_with_credentials(validate), "1", "4Gi", p.pipeline_image)

    split = c.split_op(data_uri=ingest.outputs["data_uri"], fingerprint=ingest.outputs["fingerprint"],
                       val=VAL_FRACTION, test=TEST_FRACTION, seed=p.seed).after(validate)
    split.set_display_name("split").set_caching_options(True)
    _resources(_with_credentials(split), "1", "2Gi", p.pipeline_image)

    # The training recipe (every brainscan.config.Recipe field), under its own names.
    train = c.train_op(splits_uri=split.outputs["Output"], bucket=p.bucket, prefix=p.prefix,
                       run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, gpus=p.gpus,
                       **{name: getattr(p, name) for name in param_names(Recipe)})
    # Never cached: a new run is asked for to get a new model (seeds, code, base weights may differ).
    train.set_display_name("train").set_caching_options(False)
    train.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(p.gpus)
    # GPU nodes only when it asks for GPUs (gpus=0: any node): node selector and tolerations come
    # from a step that reads `gpus`, as pod-spec settings cannot depend on a parameter's value.
    placement = c.train_placement_op(gpus=p.gpus)
    placement.set_display_name("train placement").set_caching_options(False)
    _resources(placement, "100m", "512Mi", p.pipeline_image)
    kubernetes.add_node_selector_json(train, placement.outputs["node_selector"])
    kubernetes.add_toleration_json(train, placement.outputs["tolerations"])
    _resources(_with_credentials(train), "4", "16Gi", p.train_image)

    evaluate = c.evaluate_op(model_uri=train.outputs["Output"], splits_uri=split.outputs["Output"],
                             target_recall=p.target_recall, min_recall=p.min_recall, min_auc=p.min_auc,
                             model_name=p.model_name)
    evaluate.set_display_name("evaluate").set_caching_options(False)
    _resources(_with_credentials(evaluate, mlflow=True), "2", "8Gi", p.pipeline_image)

    with dsl.If(evaluate.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a pipeline condition)
        register = c.register_op(model_uri=train.outputs["Output"], model_name=p.model_name,
                                 pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, fingerprint=ingest.outputs["fingerprint"])
        register.set_display_name("register").set_caching_options(False)
        # 6Gi: the ONNX conversion child peaks at 4.0 GiB next to the step's own 1.1 GiB (71 px Xception)
        _resources(_with_credentials(register, mlflow=True), "1", "6Gi", p.pipeline_image)

        # the version, not the alias: the deploy step promotes it to champion once it serves
        deploy = c.deploy_op(model_name=p.model_name, version=register.outputs["version"], namespace=p.namespace,
                             canary_percent=p.canary_percent, image=p.serving_image,
                             deployment_mode=p.deployment_mode, gpus=p.serving_gpus)
        deploy.set_display_name("deploy").set_caching_options(False)
        deploy.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2, backoff_max_duration="10m")
        _resources(_with_credentials(deploy, mlflow=True), "500m", "1Gi", p.pipeline_image)


def _fingerprint(p) -> dsl.PipelineTask:
    fingerprint = c.fingerprint_op(source=p.source)
    fingerprint.set_display_name("fingerprint").set_caching_options(False)
    _resources(_with_credentials(fingerprint), "500m", "1Gi", p.pipeline_image)
    return fingerprint


def parameterised(name: str, description: str):
    """`dsl.pipeline` over a body taking the PipelineParams: KFP sees one parameter per field, with its
    default and its help (the docstring's Args, which KFP turns into each input's description)."""
    names, types = param_names(), param_types()

    def decorate(body):
        def pipeline_function(*values):  # KFP calls it positionally, in signature order
            body(SimpleNamespace(**dict(zip(names, values))))

        pipeline_function.__name__ = pipeline_function.__qualname__ = body.__name__
        pipeline_function.__signature__ = inspect.Signature([
            inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=getattr(DEFAULTS, n),
                              annotation=types[n]) for n in names])
        pipeline_function.__annotations__ = {n: types[n] for n in names}
        pipeline_function.__doc__ = (f"{description}\n\nArgs:\n"
                                     + "".join(f"    {n}: {param_help(n)}\n" for n in names))
        return dsl.pipeline(name=name, description=description)(pipeline_function)

    return decorate


@parameterised(PIPELINE_NAME, "Brain CT/MRI tumor detector: ingest, validate, split, train (Xception), evaluate, "
                              "and register + deploy when the recall-first gate passes.")
def training_pipeline(p) -> None:
    _train_and_deploy(p, _fingerprint(p).output)


@parameterised(RETRAIN_PIPELINE_NAME, "For a recurring run: retrain only when the source's dataset fingerprint "
                                      "differs from the champion model's.")
def retrain_pipeline(p) -> None:
    fingerprint = _fingerprint(p)
    champion = c.champion_fingerprint_op(model_name=p.model_name)
    champion.set_display_name("champion fingerprint").set_caching_options(False)
    _resources(_with_credentials(champion, mlflow=True), "500m", "1Gi", p.pipeline_image)
    with dsl.If(fingerprint.output != champion.output, name="data-changed"):
        _train_and_deploy(p, fingerprint.output)


PIPELINES = {"train": training_pipeline, "retrain": retrain_pipeline}


def compile_pipeline(out, which: str = "train") -> str:
    """Write the pipeline YAML to upload in the Kubeflow UI; returns its path."""
    if which not in PIPELINES:
        raise ValueError(f"unknown pipeline {which!r}; expected one of {', '.join(PIPELINES)}")
    compiler.Compiler().compile(PIPELINES[which], package_path=str(out))
    return str(out)
