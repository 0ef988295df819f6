"""Every adaptation of kfp (its local runner and its API client) that brainscan needs, in one place (kfp 2.17.0).

kfp.local's public API is `init(runner, pipeline_root, workspace_root, raise_on_error,
enable_caching, cache_root)` and its runners; calling a pipeline then runs it and returns the
pipeline's own outputs, or raises RuntimeError when a task fails. pipelines/local.py uses only
that. What it also needs (each step's output in its own log file, one console line per step as
it finishes, each step's outputs afterwards) kfp.local 2.17.0 has no API for, so it is done
here, each with the kfp behaviour it relies on:

1. Task events (`TaskWatcher`): a task's start and end exist only as the log lines
   "Executing task '<task>'" and "Task '<task>' finished with status <STATUS>" of
   task_dispatcher.run_single_task_implementation, coloured with ANSI codes
   (logging_utils.color_text). A root-logger filter (not a handler: those are replaced per
   task) reads them from the records' text.
2. Output capture (`captured_output`): kfp.local print()s its step subprocesses' output to
   sys.stdout (subprocess_task_handler.run_local_subprocess, indented through
   logging_utils.indented_print) and logs to a root-logger handler on sys.stdout that it
   installs around every task (logging_utils.local_logger_context, which replaces the root
   handlers meanwhile). Neither can be pointed elsewhere, so sys.stdout is redirected for the
   run (contextlib.redirect_stdout), and kfp.local's warnings (e.g. the RuntimeWarning of
   SubprocessTaskHandler.validate_image for a non-"python" image) go to the same place.
3. Task outputs (`new_run_dir`, `task_outputs`): a local run writes each task's outputs to
   <pipeline_root>/<pipeline name>-<timestamp>/<task>/executor_output.json
   (executor_input_utils.construct_local_task_root); only the pipeline's own outputs are
   returned by the call.
4. Request timeouts (`with_request_timeout`): `kfp.Client` has no timeout and its methods pass
   none, so a request to a KFP API that accepts and never answers waits forever. Its generated
   API objects share one `kfp_server_api.ApiClient` (`client._run_api.api_client`), whose
   `rest_client.request(..., _request_timeout=None)` (kfp_server_api/rest.py in kfp-server-api
   2.17.3, which kfp does not pin: checked here too) turns a (connect, read) pair into a urllib3
   timeout; the wrapper fills it in where the caller gave none.

Upgrading kfp: the import below refuses any other version. Re-read the kfp.local and kfp_server_api
files named above, remove each adaptation the new version covers, then change KFP_VERSION (and
KFP_SERVER_API_VERSION).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Iterator, TextIO

from brainscan.versions import require_version

KFP_VERSION = "2.17.0"
KFP_SERVER_API_VERSION = "2.17.3"


def check_version() -> None:
    """Refuse a kfp this module was not written for (its adaptations may silently break)."""
    require_version("kfp", KFP_VERSION, __name__, "kfp.local")
    require_version("kfp-server-api", KFP_SERVER_API_VERSION, __name__, "kfp_server_api.rest")


check_version()

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")


def plain(text: str) -> str:
    """`text` without kfp.local's ANSI colours (its task names, statuses and error messages have them)."""
    return _ANSI.sub("", text)


# --------------------------------------------------------------------------- 1. task events
class TaskWatcher(logging.Filter):
    """A root-logger filter that calls `task_started` / `task_finished` from kfp.local's records."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = plain(str(record.getMessage()))
        if match := _START.search(message):
            self.task_started(match.group(1), record.created)
        elif match := _END.search(message):
            self.task_finished(match.group(1), match.group(2), record.created)
        return True

    def task_started(self, task: str, at: float) -> None:
        """kfp.local starts running `task` (its name in the compiled pipeline, e.g. "ingest-op")."""

    def task_finished(self, task: str, status: str, at: float) -> None:
        """`task` ended with `status` ("SUCCESS" or "FAILURE")."""


# --------------------------------------------------------------------------- 2. output capture
@contextlib.contextmanager
def captured_output(sink: TextIO, watcher: TaskWatcher) -> Iterator[None]:
    """While a kfp.local pipeline runs: everything it prints, logs or warns goes to `sink`, and
    `watcher` sees its task events."""
    root = logging.getLogger()
    root.addFilter(watcher)
    try:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sink.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            yield
    finally:
        root.removeFilter(watcher)


# --------------------------------------------------------------------------- 3. task outputs
def run_dirs(pipeline_root: Path) -> set[Path]:
    """The run folders under a pipeline root (one per local pipeline run)."""
    return set(pipeline_root.glob("*")) if pipeline_root.exists() else set()


def new_run_dir(pipeline_root: Path, before: set[Path]) -> Path | None:
    """The folder of the run that started after `before = run_dirs(pipeline_root)`, if any."""
    new_dirs = sorted(run_dirs(pipeline_root) - before, key=lambda p: p.stat().st_mtime)
    return new_dirs[-1] if new_dirs else None


def task_outputs(run_dir: Path) -> dict[str, dict]:
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


# --------------------------------------------------------------------------- 4. request timeouts
def with_request_timeout(client, connect_s: float, read_s: float):
    """`client` (a kfp.Client) with every request failing after `connect_s` to connect or `read_s`
    waiting for an answer (urllib3 raises; a request that sets its own timeout keeps it)."""
    rest = client._run_api.api_client.rest_client
    request = rest.request

    def request_with_timeout(*args, _request_timeout=None, **kwargs):
        return request(*args, _request_timeout=_request_timeout or (connect_s, read_s), **kwargs)

    rest.request = request_with_timeout
    return client
