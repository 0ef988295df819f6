"""The KFP v2 lightweight components: one thin wrapper per step of `components`.

Each component body imports and calls the step function (KFP ships only the function's
source to the container, so every import lives inside the body) and turns its result into
typed outputs: plain values that the next step needs (URIs, the gate decision) and
artifacts that the Kubeflow UI renders (`Dataset`, `Model`, `Metrics`,
`ClassificationMetrics`, `HTML`).

The data itself stays where the steps put it (S3 on a cluster or the local stack); the
artifacts carry its URI in their metadata and a small JSON/HTML copy for the UI.

Images: every step runs on the project's pipeline image, training on its GPU variant. The
pipeline sets them from its `pipeline_image` / `train_image` parameters (KFP resolves the
image when the step starts), whose defaults come from the environment at compile time
(brainscan.config); `base_image` here is only the fallback for a component used on its own.

Local runs (pipelines/local.py) set brainscan.config.LOCAL_DEPLOY_ENV for the steps they
start: the deploy step then (re)starts the local model server instead of a cluster rollout.
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects.

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Metrics, Model, Output

from brainscan.config import PIPELINE_IMAGE

# The image already holds brainscan and kfp (pinned lock): nothing is pip-installed at run time.
_COMMON = dict(base_image=PIPELINE_IMAGE, install_kfp_package=False)


@dsl.component(**_COMMON)
def ingest_op(source: str, bucket: str, prefix: str, source_fingerprint: str, dataset: Output[Dataset]) -> NamedTuple(
        "IngestOutputs", [("data_uri", str), ("fingerprint", str)]):
    """Copy the raw images into an immutable data version named by their fingerprint (checksummed,
    write-once, the manifest last) and write its manifest; returns the version's URI.

    `source_fingerprint` keys KFP's cache: the same images and labels, the same data version. Ingest
    refuses a source whose fingerprint is no longer this one, so a cached output never names other data.
    """
    import collections
    import json

    from brainscan import layout
    from components.ingest import ingest_version

    result = ingest_version(source, layout.datasets_uri(bucket, prefix), expected_fingerprint=source_fingerprint)
    dataset_uri = result.dest
    summary = result.summary() if hasattr(result, "summary") else dict(vars(result))
    with open(dataset.path, "w") as handle:
        json.dump(summary, handle, indent=2, sort_keys=True, default=str)
    dataset.metadata.update({"uri": dataset_uri, "source": source, "fingerprint": result.fingerprint,
                             "files": int(summary.get("files", 0))})
    outputs = collections.namedtuple("IngestOutputs", ["data_uri", "fingerprint"])
    return outputs(dataset_uri, result.fingerprint)


@dsl.component(**_COMMON)
def validate_op(data_uri: str, fingerprint: str, report: Output[HTML], metrics: Output[Metrics]) -> str:
    """Run the great-expectations suite; a failed suite fails the run (nothing is trained on bad data).

    `fingerprint` keys the cache: the same data is validated once. The report is written once, inside
    the data version, in a folder named by the validation settings.
    """
    import dataclasses

    from brainscan import layout, storage
    from brainscan.config import VALIDATION
    from components.validate import validate

    report_dir = layout.validation_uri(data_uri, dataclasses.asdict(VALIDATION))
    result = validate(data_uri, report_dir, once=True)
    with open(report.path, "w") as handle:
        handle.write(storage.read_text(storage.join(report_dir, "validation.html")))
    report.metadata["uri"] = storage.join(report_dir, "validation.html")
    metrics.log_metric("images", float(result.rows))
    metrics.log_metric("expectations_failed", float(len(result.failed)))
    if not result.success:
        raise RuntimeError("validation failed:\n" + result.failure_message())
    return report_dir


@dsl.component(**_COMMON)
def split_op(data_uri: str, fingerprint: str, val: float, test: float, seed: int, splits: Output[Dataset]) -> str:
    """Stratified train/val/test split; duplicates never cross splits. Written once, inside the data
    version: the same data, seed and fractions, the same split."""
    import json

    from brainscan import layout
    from components.split import split

    splits_uri = layout.splits_uri(data_uri, seed, val, test)

    result = split(data_uri, splits_uri, val=val, test=test, seed=seed, once=True)
    with open(splits.path, "w") as handle:
        json.dump(result.summary(), handle, indent=2, sort_keys=True, default=str)
    splits.metadata.update({"uri": splits_uri, **{f"rows_{k}": int(v) for k, v in result.counts.items()}})
    return splits_uri


@dsl.component(**_COMMON)
def train_placement_op(gpus: int) -> NamedTuple("Placement", [("node_selector", dict), ("tolerations", list)]):
    """Where the training pod may run: GPU nodes (their label and taint) when it asks for GPUs, any node
    otherwise. The pipeline hands both to the train step's pod spec (kfp-kubernetes *_json settings)."""
    import collections

    from components.placement import train_placement

    node_selector, tolerations = train_placement(gpus)
    return collections.namedtuple("Placement", ["node_selector", "tolerations"])(node_selector, tolerations)


# The recipe's fields are listed here once more, as KFP needs them: it builds the step's inputs from
# this signature at compile time, and its executor in the container re-reads the signature of this
# function's shipped *source text*; a signature built from Recipe (`__signature__` over `**recipe`)
# would not travel with that text. tests/code/test_pipeline_compile.py holds these names and types
# equal to brainscan.config.Recipe's fields; the body takes them by name (Recipe.from_dict(locals())).
@dsl.component(**_COMMON)
def train_op(splits_uri: str, bucket: str, prefix: str, run_id: str, image_size: int, epochs: int, fine_tune_epochs: int,
             batch_size: int, learning_rate: float, base_weights: str, seed: int, patience: int,
             crop_to_head: bool, lr_schedule: str, warmup_epochs: int, weight_decay: float, augment_flip: bool,
             mixup: float, label_smoothing: float, tumor_aux: str, tumor_aux_weight: float, monitor: str,
             tta_flip: bool, ema: float, precise_bn: bool, gpus: int,
             model: Output[Model], metrics: Output[Metrics]) -> str:
    """Xception transfer learning: frozen base, then fine-tuning (or one stage from scratch), with the
    recipe (brainscan.config.Recipe, one input per field); writes a model bundle at model_uri.

    `gpus` is what the pipeline requested for this step (the resource limit); recorded with the model.
    """
    import json

    import tensorflow as tf

    from brainscan import layout
    from brainscan.config import Recipe

    recipe = Recipe.from_dict(locals())  # this step's inputs that are Recipe fields
    visible = len(tf.config.list_physical_devices("GPU"))
    print(f"train: {gpus} GPU(s) requested, {visible} visible")

    from components.train import train

    model_uri = layout.model_uri(bucket, prefix, run_id)
    result = train(splits_uri, model_uri, recipe)
    summary = result.summary() if hasattr(result, "summary") else dict(vars(result))
    with open(model.path, "w") as handle:
        json.dump(summary, handle, indent=2, sort_keys=True, default=str)
    model.metadata.update({"uri": model_uri, "image_size": image_size, "framework": "keras", "gpus": visible})
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))
    return model_uri


@dsl.component(**_COMMON)
def evaluate_op(model_uri: str, splits_uri: str, target_recall: float, min_recall: float,
                min_auc: float, model_name: str, metrics: Output[Metrics],
                classification: Output[ClassificationMetrics], report: Output[HTML]) -> bool:
    """Recall-first evaluation on the test split, threshold from validation; returns whether the gate passed.

    The gate compares with the current champion (if any) so that a worse model never replaces it.
    """
    import base64
    import html

    from brainscan import layout, storage
    from brainscan.config import champion_uri
    from components.evaluate import evaluate

    evaluation_uri = layout.evaluation_uri(model_uri)
    # A missing champion (first run) is a note in the report, not an error. The champion tolerance is
    # brainscan.config's default: the pipeline has no parameter for it.
    evaluation = evaluate(model_uri, splits_uri, evaluation_uri, target_recall=target_recall,
                          min_recall=min_recall, min_auc=min_auc, champion=champion_uri(model_name))

    for key, value in evaluation.test.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(f"test_{key}", float(value))
    metrics.log_metric("threshold", float(evaluation.threshold))

    # The Kubeflow UI draws these two from ClassificationMetrics.
    classification.log_confusion_matrix(list(evaluation.classes),
                                        [[int(n) for n in row] for row in evaluation.confusion_matrix])
    roc = evaluation.curves.get("roc", [])
    if roc:
        classification.log_roc_curve([p["fpr"] for p in roc], [p["tpr"] for p in roc],
                                     [p["threshold"] for p in roc])

    passed = evaluation.passed
    images = []
    for name in ("confusion_matrix.png", "roc_curve.png", "pr_curve.png"):
        uri = storage.join(evaluation_uri, name)
        if storage.exists(uri):
            encoded = base64.b64encode(storage.read_bytes(uri)).decode()
            images.append(f'<figure><img src="data:image/png;base64,{encoded}"><figcaption>{name}</figcaption></figure>')
    # The gate's reason and the promise are text (they quote model names, URIs, numbers): escaped, so the
    # Kubeflow UI shows them as written and never runs markup that came in with them.
    with open(report.path, "w") as handle:
        handle.write(f"<h1>Evaluation: gate {'passed' if passed else 'FAILED'}</h1>"
                     f"<p><b>{html.escape(str(evaluation.promise.get('statement', '')))}</b></p>"
                     f"<p>{html.escape(str(evaluation.gate.get('reason', '')))}</p>" + "".join(images))
    metrics.metadata["gate_passed"] = passed
    return passed


@dsl.component(**_COMMON)
def register_op(model_uri: str, model_name: str, pipeline_run: str, fingerprint: str,
                registered: Output[Model]) -> NamedTuple("Registered", [("model_uri", str), ("version", str)]):
    """Register the model in MLflow as the `candidate` (champion moves at deploy); returns
    `models:/NAME/VERSION` and the version."""
    import collections

    from brainscan import layout
    from brainscan.config import CANDIDATE_ALIAS
    from components.register import register

    # The dataset fingerprint tag comes from the evaluation report; `fingerprint` orders this step after ingest's.
    result = register(model_uri, layout.evaluation_uri(model_uri), name=model_name, pipeline_run=pipeline_run)
    if not result.registered:
        raise RuntimeError(result.reason)
    registered_uri = result.model_uri
    registered.metadata.update({"uri": registered_uri, "source_uri": model_uri, "version": int(result.version),
                                "alias": CANDIDATE_ALIAS, "run_id": result.run_id, "threshold": result.threshold,
                                "dataset_fingerprint": fingerprint})
    with open(registered.path, "w") as handle:
        handle.write(registered_uri)
    return collections.namedtuple("Registered", ["model_uri", "version"])(registered_uri, str(result.version))


@dsl.component(**_COMMON)
def deploy_op(model_name: str, version: str, namespace: str, canary_percent: int, image: str, deployment_mode: str,
              gpus: int) -> NamedTuple("Deployed", [("url", str), ("champion", str)]):
    """Roll version `version` of `model_name` out (the KServe InferenceService on a cluster; in a local run, the
    local model server) and, once it serves all traffic, make it the champion; returns its URL and the
    champion's version ("" when a canary left the champion where it was)."""
    import collections
    import os

    from components.deploy import deploy
    from brainscan.config import LOCAL_DEPLOY_ENV, version_uri

    local_workdir = os.environ.get(LOCAL_DEPLOY_ENV)
    result = deploy(version_uri(model_name, version), namespace=namespace, canary_percent=canary_percent or None,
                    image=image, gpus=gpus, deployment_mode=deployment_mode, local=bool(local_workdir),
                    workdir=local_workdir or ".", promote=True)
    if not result.ready:
        raise RuntimeError(f"deploy failed: {result.message}")
    return collections.namedtuple("Deployed", ["url", "champion"])(result.url or "", result.champion or "")


@dsl.component(**_COMMON)
def fingerprint_op(source: str) -> str:
    """The source's dataset fingerprint (sha256 of its sorted `sha256,class7` lines), read in place."""
    from components.fingerprint import source_fingerprint

    return source_fingerprint(source)


@dsl.component(**_COMMON)
def champion_fingerprint_op(model_name: str) -> str:
    """The dataset fingerprint tag of the champion model version ("none" when there is no champion)."""
    from components.fingerprint import champion_fingerprint

    fingerprint, version = champion_fingerprint(model_name)
    print(f"champion of {model_name}: version {version}, data {fingerprint}")
    return fingerprint or "none"
