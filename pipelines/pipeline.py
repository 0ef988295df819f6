"""The KFP v2 pipelines: the training DAG and its "retrain if new data" variant.

    fingerprint -> ingest -> validate -> split -> train -> evaluate -> If(gate passed) -> register -> deploy

The same pipeline functions run on a Kubeflow cluster (compiled YAML) and locally
(`kfp.local.SubprocessRunner`, see `pipelines/local.py`). The Kubernetes settings (GPU,
secrets, node selection) are platform config that the local runner ignores.

Where data lives (bucket/prefix on the store):
    {prefix}/dataset/...                 ingest output + validation report (one copy per source)
    {prefix}/splits/<fingerprint>/...    split CSVs (a pure function of the data)
    {prefix}/runs/<run id>/model/...     the model bundle and its evaluation of this run
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects.

import os

from kfp import compiler, dsl, kubernetes

from brainscan.pipelines import components as c

PIPELINE_NAME = "brainscan-train"
RETRAIN_PIPELINE_NAME = "brainscan-retrain-if-new-data"

# Kubernetes settings of the cluster; overridable at compile time.
SECRET_NAME = os.environ.get("BRAINSCAN_SECRET", "brainscan-s3")
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")


def _with_credentials(task: dsl.PipelineTask, mlflow: bool = False) -> dsl.PipelineTask:
    """S3 (and MLflow) settings from the Kubernetes secret, as environment variables."""
    keys = S3_ENV + (MLFLOW_ENV if mlflow else ())
    return kubernetes.use_secret_as_env(task, secret_name=SECRET_NAME, secret_key_to_env={k: k for k in keys})


def _resources(task: dsl.PipelineTask, cpu: str, memory: str) -> dsl.PipelineTask:
    return task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)


def _train_and_deploy(source, fingerprint, bucket, prefix, image_size, epochs, fine_tune_epochs, batch_size,
                      base_weights, seed, patience, target_recall, min_recall, min_auc, gpus, namespace, canary_percent,
                      model_name, local, workdir) -> None:
    """The shared body of both pipelines, from ingest to deploy."""
    ingest = c.ingest_op(source=source, bucket=bucket, prefix=prefix, source_fingerprint=fingerprint)
    ingest.set_display_name("ingest")
    # Cached: the cache key holds the source's fingerprint, so new or relabelled images re-run it.
    ingest.set_caching_options(True).set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2,
                                               backoff_max_duration="10m")
    _resources(_with_credentials(ingest), "1", "2Gi")

    validate = c.validate_op(data_uri=ingest.outputs["data_uri"], fingerprint=ingest.outputs["fingerprint"])
    validate.set_display_name("validate").set_caching_options(True)
    _resources(_with_credentials(validate), "1", "4Gi")

    split = c.split_op(data_uri=ingest.outputs["data_uri"], fingerprint=ingest.outputs["fingerprint"],
                       val=0.15, test=0.15, seed=seed).after(validate)
    split.set_display_name("split").set_caching_options(True)
    _resources(_with_credentials(split), "1", "2Gi")

    train = c.train_op(splits_uri=split.outputs["Output"], bucket=bucket, prefix=prefix,
                       run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, image_size=image_size, epochs=epochs,
                       fine_tune_epochs=fine_tune_epochs, batch_size=batch_size, base_weights=base_weights, seed=seed,
                       patience=patience, gpus=gpus)
    # Never cached: a new run is asked for to get a new model (seeds, code, base weights may differ).
    train.set_display_name("train").set_caching_options(False)
    train.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
    kubernetes.add_node_selector(train, *GPU_NODE_LABEL)
    kubernetes.add_toleration(train, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    _resources(_with_credentials(train), "4", "16Gi")

    evaluate = c.evaluate_op(model_uri=train.outputs["Output"], splits_uri=split.outputs["Output"],
                             target_recall=target_recall, min_recall=min_recall, min_auc=min_auc,
                             model_name=model_name)
    evaluate.set_display_name("evaluate").set_caching_options(False)
    _resources(_with_credentials(evaluate, mlflow=True), "2", "8Gi")

    with dsl.If(evaluate.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a pipeline condition)
        register = c.register_op(model_uri=train.outputs["Output"], model_name=model_name,
                                 pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, fingerprint=ingest.outputs["fingerprint"])
        register.set_display_name("register").set_caching_options(False)
        _resources(_with_credentials(register, mlflow=True), "1", "2Gi")

        deploy = c.deploy_op(model_uri=register.outputs["Output"], namespace=namespace,
                             canary_percent=canary_percent, local=local, workdir=workdir)
        deploy.set_display_name("deploy").set_caching_options(False)
        deploy.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2, backoff_max_duration="10m")
        _resources(_with_credentials(deploy, mlflow=True), "500m", "1Gi")


@dsl.pipeline(name=PIPELINE_NAME,
              description="Brain CT/MRI tumor detector: ingest, validate, split, train (Xception), evaluate, "
                          "and register + deploy when the recall-first gate passes.")
def training_pipeline(
    source: str = "s3://brainscan-data/raw",
    bucket: str = "brainscan",
    prefix: str = "pipeline",
    image_size: int = 299,
    epochs: int = 10,
    fine_tune_epochs: int = 5,
    batch_size: int = 32,
    base_weights: str = "imagenet",
    seed: int = 42,
    patience: int = 4,
    target_recall: float = 0.99,
    min_recall: float = 0.95,
    min_auc: float = 0.95,
    gpus: int = 1,
    namespace: str = "kubeflow-user",
    canary_percent: int = 0,
    model_name: str = "brain-tumor",
    local: bool = False,
    workdir: str = ".brainscan",
):
    """Train, gate and deploy the tumor detector. canary_percent 0 = replace the serving model at once."""
    fingerprint = c.fingerprint_op(source=source)
    fingerprint.set_display_name("fingerprint").set_caching_options(False)
    _resources(_with_credentials(fingerprint), "500m", "1Gi")
    _train_and_deploy(source, fingerprint.output, bucket, prefix, image_size, epochs, fine_tune_epochs, batch_size,
                      base_weights, seed, patience, target_recall, min_recall, min_auc, gpus, namespace, canary_percent,
                      model_name, local, workdir)


@dsl.pipeline(name=RETRAIN_PIPELINE_NAME,
              description="For a recurring run: retrain only when the source's dataset fingerprint differs "
                          "from the champion model's.")
def retrain_pipeline(
    source: str = "s3://brainscan-data/raw",
    bucket: str = "brainscan",
    prefix: str = "pipeline",
    image_size: int = 299,
    epochs: int = 10,
    fine_tune_epochs: int = 5,
    batch_size: int = 32,
    base_weights: str = "imagenet",
    seed: int = 42,
    patience: int = 4,
    target_recall: float = 0.99,
    min_recall: float = 0.95,
    min_auc: float = 0.95,
    gpus: int = 1,
    namespace: str = "kubeflow-user",
    canary_percent: int = 0,
    model_name: str = "brain-tumor",
    local: bool = False,
    workdir: str = ".brainscan",
):
    """Check the data first; the rest of the DAG runs only when it changed."""
    fingerprint = c.fingerprint_op(source=source)
    fingerprint.set_display_name("fingerprint").set_caching_options(False)
    _resources(_with_credentials(fingerprint), "500m", "1Gi")
    champion = c.champion_fingerprint_op(model_name=model_name)
    champion.set_display_name("champion fingerprint").set_caching_options(False)
    _resources(_with_credentials(champion, mlflow=True), "500m", "1Gi")
    with dsl.If(fingerprint.output != champion.output, name="data-changed"):
        _train_and_deploy(source, fingerprint.output, bucket, prefix, image_size, epochs, fine_tune_epochs,
                          batch_size, base_weights, seed, patience, target_recall, min_recall, min_auc, gpus, namespace,
                          canary_percent, model_name, local, workdir)


PIPELINES = {"train": training_pipeline, "retrain": retrain_pipeline}


def compile_pipeline(out, which: str = "train") -> str:
    """Write the pipeline YAML to upload in the Kubeflow UI; returns its path."""
    if which not in PIPELINES:
        raise ValueError(f"unknown pipeline {which!r}; expected one of {', '.join(PIPELINES)}")
    compiler.Compiler().compile(PIPELINES[which], package_path=str(out))
    return str(out)
