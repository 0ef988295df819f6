"""Run the KFP pipeline on this machine: the project's main local job (and `brainscan demo`).

The very same pipeline function as on a cluster runs through
`kfp.local.SubprocessRunner(use_venv=False)`: every component executes in a subprocess of
this Python environment and inherits its environment variables, so the S3 endpoint and
keys of the local stack (SeaweedFS) and the MLflow sqlite tracking URI reach every step.
After the run: the new champion is already served by the deploy step (local model server);
one v2 request goes to it and `summary.json` records everything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from brainscan import stack, storage

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")

# kfp.local names task directories after the component functions; the summary uses step names.
STEP_OF_TASK = {
    "fingerprint-op": "fingerprint", "champion-fingerprint-op": "champion_fingerprint", "ingest-op": "ingest",
    "validate-op": "validate", "split-op": "split", "train-op": "train", "evaluate-op": "evaluate",
    "register-op": "register", "deploy-op": "deploy",
}
STEP_ORDER = list(STEP_OF_TASK.values())


@dataclass
class LocalRunParams:
    image_size: int = 299
    epochs: int = 10
    fine_tune_epochs: int = 5
    batch_size: int = 32
    base_weights: str = "imagenet"
    seed: int = 42
    patience: int = 4
    target_recall: float = 0.99
    min_recall: float = 0.95
    min_auc: float = 0.95
    canary_percent: int = 0
    model_name: str = "brain-tumor"
    bucket: str = "brainscan"
    prefix: str = "local"


@dataclass
class StepRecord:
    status: str = "NOT_RUN"
    seconds: float | None = None
    outputs: dict = field(default_factory=dict)


class _TaskTimer(logging.Filter):
    """Collects per-task start/end times from kfp.local's log lines.

    A filter on the root logger, not a handler: kfp.local swaps the root handlers while it runs.
    """

    def __init__(self):
        super().__init__()
        self.started: dict[str, float] = {}
        self.finished: dict[str, tuple[float, str]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", str(record.getMessage()))
        if match := _START.search(message):
            self.started[match.group(1)] = record.created
        elif match := _END.search(message):
            self.finished[match.group(1)] = (record.created, match.group(2))
        return True


def _task_outputs(run_dir: Path) -> dict[str, dict]:
    """Parameter outputs and artifact metadata of every task that ran, from executor_output.json."""
    outputs = {}
    for path in sorted(run_dir.glob("*/executor_output.json")):
        data = json.loads(path.read_text())
        values = dict(data.get("parameterValues", {}))
        for name, entry in data.get("artifacts", {}).items():
            for artifact in entry.get("artifacts", []):
                values[name] = {"path": artifact.get("uri"), **artifact.get("metadata", {})}
        outputs[path.parent.name] = values
    return outputs


def _predict_one(url: str, splits_uri: str, workdir: Path) -> dict:
    """Send one test-split image to the served model (v2 protocol) and return the answer."""
    import pandas as pd

    from brainscan.serving.client import predict

    test = pd.read_csv(storage.open_text(storage.join(splits_uri, "test.csv")))
    row = test.iloc[0]
    image = workdir / ("sample" + Path(str(row["path"])).suffix.lower())
    image.write_bytes(storage.read_bytes(str(row["path"])))
    answer = predict(url, [str(image)])
    answer = answer.summary() if hasattr(answer, "summary") else answer
    if isinstance(answer, list):
        answer = answer[0]
    return {"image": str(row["path"]), "true_class": str(row["class7"]),
            "response": answer if isinstance(answer, dict) else str(answer)}


def run_local(source: str, workdir: str | os.PathLike = ".brainscan", params: LocalRunParams | None = None,
              only_if_new_data: bool = False, predict: bool = True) -> Path:
    """Run the pipeline locally end to end; returns the path of summary.json.

    only_if_new_data: run the "retrain if new data" pipeline (skips everything after the
    fingerprint check when the champion was trained on this very data).
    """
    from kfp import local as kfp_local

    from brainscan.pipelines.pipeline import retrain_pipeline, training_pipeline

    params = params or LocalRunParams()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if not (storage.is_s3(source) or Path(source).exists()):
        raise FileNotFoundError(f"source {source!r} does not exist")
    source = source if storage.is_s3(source) else str(Path(source).resolve())

    log.info("starting (or reusing) the local stack in %s", workdir)
    info = stack.up(workdir)
    os.environ.update(info.env())  # the step subprocesses inherit it
    storage.reset_clients()
    storage.ensure_bucket(params.bucket)

    pipeline_root = workdir / "pipeline_root"
    kfp_local.init(runner=kfp_local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    pipeline = retrain_pipeline if only_if_new_data else training_pipeline
    arguments = {key: value for key, value in asdict(params).items()}
    arguments.update(source=source, gpus=0, namespace="local", local=True, workdir=str(workdir))

    timer = _TaskTimer()
    root_logger = logging.getLogger()
    root_logger.addFilter(timer)
    before = set(pipeline_root.glob("*")) if pipeline_root.exists() else set()
    started = time.time()
    error = None
    try:
        pipeline(**arguments)
    except Exception as err:  # a failed step: recorded in the summary, re-raised after writing it
        error = RuntimeError(_ANSI.sub("", str(err)))
    finally:
        root_logger.removeFilter(timer)
    elapsed = time.time() - started

    new_dirs = sorted(set(pipeline_root.glob("*")) - before, key=lambda p: p.stat().st_mtime)
    run_dir = new_dirs[-1] if new_dirs else None
    outputs = _task_outputs(run_dir) if run_dir else {}

    steps: dict[str, StepRecord] = {}
    for task, step in STEP_OF_TASK.items():
        if task not in timer.started and task not in outputs:
            continue
        end, status = timer.finished.get(task, (None, "SUCCESS" if task in outputs else ("FAILURE" if error else "UNKNOWN")))
        begin = timer.started.get(task)
        steps[step] = StepRecord(status=status, seconds=round(end - begin, 2) if end and begin else None,
                                 outputs=outputs.get(task, {}))
    for step in STEP_ORDER:
        if step not in steps and (step != "champion_fingerprint" or only_if_new_data):
            steps[step] = StepRecord(status="SKIPPED" if error is None else "NOT_RUN")

    summary = _summarise(source, params, steps, elapsed, error, run_dir, info.tracking_uri, only_if_new_data)
    if predict and error is None and summary.get("served_url"):
        try:
            summary["prediction"] = _predict_one(summary["served_url"], summary["splits_uri"], workdir)
        except Exception as err:  # the run itself succeeded; say what went wrong with the request
            summary["prediction"] = {"error": f"{type(err).__name__}: {err}"}

    run_name = run_dir.name if run_dir else time.strftime("run-%Y%m%d-%H%M%S")
    summary_path = workdir / "runs" / run_name / "summary.json"
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    (workdir / "summary.json").write_text(summary_path.read_text())  # the latest run, at a fixed place
    if error is not None:
        raise RuntimeError(f"pipeline failed ({error}); summary in {summary_path}")
    return summary_path


def _summarise(source, params, steps, elapsed, error, run_dir, tracking_uri, only_if_new_data) -> dict:
    def out(step, key, default=None):
        return steps.get(step, StepRecord()).outputs.get(key, default)

    evaluation_uri = None
    evaluation = None
    model_uri = out("train", "Output")
    if model_uri:
        evaluation_uri = f"{model_uri.rsplit('/', 1)[0]}/evaluation"
        try:
            evaluation = storage.read_json(storage.join(evaluation_uri, "evaluation.json"))
        except Exception:
            evaluation = None
    registered = out("register", "Output")
    version = registered.rsplit("/", 1)[-1] if registered else None
    gate = (evaluation or {}).get("gate")
    return {
        "status": "failed" if error else "succeeded",
        "error": str(error) if error else None,
        "pipeline": "retrain-if-new-data" if only_if_new_data else "train",
        "source": source,
        "seconds": round(elapsed, 1),
        "steps": {name: asdict(record) for name, record in steps.items()},
        "dataset_fingerprint": out("fingerprint", "Output") or out("ingest", "fingerprint"),
        "data_uri": out("ingest", "data_uri"),
        "splits_uri": out("split", "Output"),
        "trained": "train" in steps and steps["train"].status == "SUCCESS",
        "model_bundle_uri": model_uri,
        "evaluation_uri": evaluation_uri,
        "metrics": (evaluation or {}).get("test"),
        "threshold": (evaluation or {}).get("threshold"),
        "gate_passed": out("evaluate", "Output"),
        "gate": gate,
        "model_name": params.model_name,
        "model_version": version,
        "model_uri": registered,
        "champion_uri": f"models:/{params.model_name}@champion",
        "tracking_uri": tracking_uri,
        "deployed": steps.get("deploy", StepRecord()).status == "SUCCESS",
        "served_url": out("deploy", "Output") or None,
        "params": asdict(params),
        "pipeline_root": str(run_dir) if run_dir else None,
    }
