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
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import pandas as pd
from kfp import local as kfp_local

from brainscan import storage

from brainscan.local import stack
from brainscan.config import DEFAULT_WORKDIR, LOCAL_DEPLOY_ENV, PipelineParams, champion_uri, version_of
from brainscan import layout
from brainscan.evaluation_report import EvaluationReport
from pipelines.pipeline import retrain_pipeline, training_pipeline
from serving.client import predict

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")

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


class StepLogs(logging.Filter):
    """Routes a kfp.local run's output into one log file per step, and reports each step once.

    It stands in for sys.stdout while the pipeline runs (kfp.local prints its subprocesses'
    output there and points its own log handler at it) and filters the root logger, where
    kfp.local's "Executing task" / "finished with status" records say which step is running.
    A filter, not a handler: kfp.local swaps the root handlers while it runs.
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

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", str(record.getMessage()))
        if match := _START.search(message):
            task = match.group(1)
            self.started[task] = record.created
            self._switch(self.folder / f"{STEP_OF_TASK.get(task, task)}.log", task)
        elif match := _END.search(message):
            task, status = match.group(1), match.group(2)
            self.finished[task] = (record.created, status)
            begin = self.started.get(task, record.created)
            step = STEP_OF_TASK.get(task, task)
            self.report(step_line(step, StepRecord(status=status, seconds=round(record.created - begin, 1))))
            if status != "SUCCESS":
                self._out.flush()
                self.report(f"    log: {self.files.get(task)}\n" + _tail(self.files.get(task)))
        return True

    def _switch(self, path: Path, task: str) -> None:
        self._out.close()
        self.files[task] = path
        self._out = open(path, "a")

    # the file-like side (sys.stdout during the run)
    def write(self, text: str) -> int:
        return self._out.write(_ANSI.sub("", text))

    def flush(self) -> None:
        self._out.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self._out.close()


def _tail(path: Path | None, lines: int = 12) -> str:
    return "\n".join(f"    | {line}" for line in stack.log_tail(path, lines).splitlines())


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
    root_logger = logging.getLogger()
    root_logger.addFilter(steps_log)
    before = set(pipeline_root.glob("*")) if pipeline_root.exists() else set()
    started = time.time()
    error = None
    saved_stdout, saved_deploy = sys.stdout, os.environ.get(LOCAL_DEPLOY_ENV)
    os.environ[LOCAL_DEPLOY_ENV] = str(workdir)  # the deploy step serves locally, from this work dir
    sys.stdout = steps_log
    try:
        with warnings.catch_warnings():
            # kfp.local's warnings (cluster-only settings ignored, "custom image" hints) belong
            # to the step they concern: into its log, not onto the console.
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: steps_log.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            pipeline(**params.as_dict())
    except Exception as err:  # a failed step: recorded in the summary, re-raised after writing it
        error = RuntimeError(_ANSI.sub("", str(err)))
    finally:
        sys.stdout = saved_stdout
        root_logger.removeFilter(steps_log)
        steps_log.close()
        if saved_deploy is None:
            os.environ.pop(LOCAL_DEPLOY_ENV, None)
        else:
            os.environ[LOCAL_DEPLOY_ENV] = saved_deploy
    elapsed = time.time() - started

    new_dirs = sorted(set(pipeline_root.glob("*")) - before, key=lambda p: p.stat().st_mtime)
    run_dir = new_dirs[-1] if new_dirs else None
    outputs = _task_outputs(run_dir) if run_dir else {}

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
    registered = out("register", "Output")
    version = version_of(registered) if registered else None
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
        "model_version": version,
        "model_uri": registered,
        "champion_uri": champion_uri(params.model_name),
        "tracking_uri": tracking_uri,
        "deployed": steps.get("deploy", StepRecord()).status == "SUCCESS",
        "served_url": out("deploy", "Output") or None,
        "params": params.as_dict(),
        "pipeline_root": str(run_dir) if run_dir else None,
    }
