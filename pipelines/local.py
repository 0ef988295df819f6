"""Run the KFP pipeline on this machine: the project's main local job (and `brainscan demo`).

The very same pipeline function as on a cluster runs through
`kfp.local.SubprocessRunner(use_venv=False)`: every component executes in a subprocess of
this Python environment and inherits its environment variables, so the S3 endpoint and
keys of the local stack (SeaweedFS), the MLflow sqlite tracking URI and the local-deploy
setting (brainscan.config.LOCAL_DEPLOY_ENV) reach every step. After the run the new champion
is already served by the deploy step (local model server); one v2 request goes to it and
`summary.json` records everything.

Quiet by design: each step's KFP executor output goes to `logs/<run start>/<step>.log` in the
work dir; the console gets one line per step (name, status, seconds) and, for a failed step,
its log's path and last lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import pandas as pd
from kfp import local as kfp_local

from brainscan import layout, storage
from brainscan.config import DEFAULT_WORKDIR, LOCAL_DEPLOY_ENV, PipelineParams, champion_uri
from brainscan.evaluation_report import EvaluationReport
from brainscan.local import stack
from pipelines import kfp_compat
from pipelines.pipeline import retrain_pipeline, training_pipeline
from serving.client import predict

log = logging.getLogger(__name__)

# kfp.local names task directories after the component functions; the summary uses step names.
STEP_OF_TASK = {
    "fingerprint-op": "fingerprint", "champion-fingerprint-op": "champion_fingerprint", "ingest-op": "ingest",
    "validate-op": "validate", "split-op": "split", "train-placement-op": "train_placement", "train-op": "train",
    "evaluate-op": "evaluate",
    "register-op": "register", "deploy-op": "deploy",
}
STEP_ORDER = list(STEP_OF_TASK.values())


@dataclass
class StepRecord:
    status: str = "NOT_RUN"
    seconds: float | None = None
    outputs: dict = field(default_factory=dict)
    log_file: str | None = None


def step_line(step: str, record: StepRecord | dict) -> str:
    """The one console line of a step: name, status, seconds."""
    record = asdict(record) if isinstance(record, StepRecord) else record
    seconds = f"{record['seconds']:.1f}s" if record.get("seconds") is not None else "-"
    return f"  {step:<22}{record['status']:<10}{seconds}"


class StepLogs(kfp_compat.TaskWatcher):
    """Routes a kfp.local run's output into one log file per step, and reports each step once.

    The sink of kfp_compat.captured_output while the pipeline runs (everything kfp.local and
    its step subprocesses print), and its task watcher: each task start switches the file.
    """

    def __init__(self, folder: Path, report: Callable[[str], None]):
        super().__init__()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.report = report
        self.started: dict[str, float] = {}
        self.finished: dict[str, tuple[float, str]] = {}
        self.files: dict[str, Path] = {}
        self._out: TextIO = open(self.folder / "pipeline.log", "a")

    def task_started(self, task: str, at: float) -> None:
        self.started[task] = at
        self._switch(self.folder / f"{STEP_OF_TASK.get(task, task)}.log", task)

    def task_finished(self, task: str, status: str, at: float) -> None:
        self.finished[task] = (at, status)
        begin = self.started.get(task, at)
        step = STEP_OF_TASK.get(task, task)
        self.report(step_line(step, StepRecord(status=status, seconds=round(at - begin, 1))))
        if status != "SUCCESS":
            self._out.flush()
            self.report(f"    log: {self.files.get(task)}\n" + _tail(self.files.get(task)))

    def _switch(self, path: Path, task: str) -> None:
        self._out.close()
        self.files[task] = path
        self._out = open(path, "a")

    # the file-like side (kfp.local's stdout during the run)
    def write(self, text: str) -> int:
        return self._out.write(kfp_compat.plain(text))

    def flush(self) -> None:
        self._out.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self._out.close()


def _tail(path: Path | None, lines: int = 12) -> str:
    return "\n".join(f"    | {line}" for line in stack.log_tail(path, lines).splitlines())


def _predict_one(url: str, splits_uri: str, workdir: Path) -> dict:
    """Send one test-split image to the served model (v2 protocol) and return the answer."""
    test = pd.read_csv(storage.open_text(storage.join(splits_uri, "test.csv")))
    row = test.iloc[0]
    image = workdir / ("sample" + Path(str(row["path"])).suffix.lower())
    image.write_bytes(storage.read_bytes(str(row["path"])))
    answer = predict(url, [str(image)])[0]
    return {"image": str(row["path"]), "true_class": str(row["class7"]), "response": answer}


def run_local(params: PipelineParams, workdir: str | os.PathLike = DEFAULT_WORKDIR, only_if_new_data: bool = False,
              predict_sample: bool = True, report: Callable[[str], None] | None = None) -> Path:
    """Run the pipeline locally end to end; returns the path of summary.json.

    only_if_new_data: run the "retrain if new data" pipeline (skips everything after the
    fingerprint check when the champion was trained on this very data). report: where the one
    line per step goes (default: stderr).
    """
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    source = params.source
    if not (storage.is_s3(source) or source.startswith("kaggle:") or Path(source).exists()):
        raise FileNotFoundError(f"source {source!r} does not exist")
    if not (storage.is_s3(source) or source.startswith("kaggle:")):
        params = params.replace(source=str(Path(source).resolve()))

    log.info("starting (or reusing) the local stack in %s", workdir)
    info = stack.up(workdir)
    os.environ.update(info.env())  # the step subprocesses inherit it
    storage.reset_clients()
    storage.ensure_bucket(params.bucket)

    pipeline_root = workdir / "pipeline_root"
    kfp_local.init(runner=kfp_local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    pipeline = retrain_pipeline if only_if_new_data else training_pipeline

    run_name = time.strftime("run-%Y%m%d-%H%M%S")
    steps_log = StepLogs(workdir / "logs" / run_name, report)
    before = kfp_compat.run_dirs(pipeline_root)
    started = time.time()
    error = None
    saved_deploy = os.environ.get(LOCAL_DEPLOY_ENV)
    os.environ[LOCAL_DEPLOY_ENV] = str(workdir)  # the deploy step serves locally, from this work dir
    try:
        # kfp.local's output, warnings included (cluster-only settings ignored, "custom image"
        # hints), belongs to the step it concerns: into its log, not onto the console.
        with kfp_compat.captured_output(steps_log, steps_log):
            pipeline(**params.as_dict())
    except Exception as err:  # a failed step: recorded in the summary, re-raised after writing it
        error = RuntimeError(kfp_compat.plain(str(err)))
    finally:
        steps_log.close()
        if saved_deploy is None:
            os.environ.pop(LOCAL_DEPLOY_ENV, None)
        else:
            os.environ[LOCAL_DEPLOY_ENV] = saved_deploy
    elapsed = time.time() - started

    run_dir = kfp_compat.new_run_dir(pipeline_root, before)
    outputs = kfp_compat.task_outputs(run_dir) if run_dir else {}

    steps: dict[str, StepRecord] = {}
    for task, step in STEP_OF_TASK.items():
        if task not in steps_log.started and task not in outputs:
            continue
        end, status = steps_log.finished.get(task, (None, "SUCCESS" if task in outputs
                                                      else ("FAILURE" if error else "UNKNOWN")))
        begin = steps_log.started.get(task)
        log_file = steps_log.files.get(task)
        steps[step] = StepRecord(status=status, seconds=round(end - begin, 2) if end and begin else None,
                                 outputs=outputs.get(task, {}), log_file=str(log_file) if log_file else None)
    for step in STEP_ORDER:
        if step not in steps and (step != "champion_fingerprint" or only_if_new_data):
            steps[step] = StepRecord(status="SKIPPED" if error is None else "NOT_RUN")

    summary = _summarise(params, steps, elapsed, error, run_dir, info.tracking_uri, only_if_new_data)
    if predict_sample and error is None and summary.get("served_url"):
        try:
            summary["prediction"] = _predict_one(summary["served_url"], summary["splits_uri"], workdir)
        except Exception as err:  # the run itself succeeded; say what went wrong with the request
            summary["prediction"] = {"error": f"{type(err).__name__}: {err}"}

    summary_path = workdir / "runs" / (run_dir.name if run_dir else run_name) / "summary.json"
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    (workdir / "summary.json").write_text(summary_path.read_text())  # the latest run, at a fixed place
    if error is not None:
        raise RuntimeError(f"pipeline failed ({str(error).splitlines()[0]}); summary in {summary_path}")
    return summary_path


def _summarise(params, steps, elapsed, error, run_dir, tracking_uri, only_if_new_data) -> dict:
    def out(step, key, default=None):
        return steps.get(step, StepRecord()).outputs.get(key, default)

    evaluation_uri = None
    evaluation = None
    model_uri = out("train", "Output")
    if model_uri:
        evaluation_uri = layout.evaluation_uri(model_uri)
        try:
            evaluation = EvaluationReport.load(evaluation_uri)
        except Exception:
            evaluation = None
    registered = out("register", "model_uri")
    return {
        "status": "failed" if error else "succeeded",
        "error": str(error) if error else None,
        "pipeline": "retrain-if-new-data" if only_if_new_data else "train",
        "source": params.source,
        "seconds": round(elapsed, 1),
        "steps": {name: asdict(record) for name, record in steps.items()},
        "dataset_fingerprint": out("fingerprint", "Output") or out("ingest", "fingerprint"),
        "data_uri": out("ingest", "data_uri"),
        "splits_uri": out("split", "Output"),
        "trained": "train" in steps and steps["train"].status == "SUCCESS",
        "model_bundle_uri": model_uri,
        "evaluation_uri": evaluation_uri,
        "metrics": evaluation.test if evaluation else None,
        "threshold": evaluation.threshold if evaluation else None,
        "thresholds": evaluation.thresholds if evaluation else None,
        "promise": evaluation.promise.get("statement") if evaluation else None,
        "gate_passed": out("evaluate", "Output"),
        "gate": evaluation.gate if evaluation else None,
        "model_name": params.model_name,
        "model_version": out("register", "version"),
        "model_uri": registered,
        "champion_uri": champion_uri(params.model_name),
        "champion_version": out("deploy", "champion") or None,  # moved by the deploy step once it served
        "tracking_uri": tracking_uri,
        "deployed": steps.get("deploy", StepRecord()).status == "SUCCESS",
        "served_url": out("deploy", "url") or None,
        "params": params.as_dict(),
        "pipeline_root": str(run_dir) if run_dir else None,
    }
