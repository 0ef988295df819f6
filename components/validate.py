"""Validate: a great-expectations suite over the image manifest that ingest wrote.

`validate(data, report_dir)` reads `{data}/manifest.csv`, runs the suite on an ephemeral
great-expectations context (a pandas data source over the manifest DataFrame) and writes
`{report_dir}/validation.json`, `{report_dir}/validation.html` and, when files do not decode,
`{report_dir}/quarantine.csv`. Corrupt files are listed for quarantine, never dropped: what
to do with them is a person's call.

The suite checks that every file decodes (re-read from the store, and the bytes still
match the manifest's sha256), that labels and modality are in their sets and agree with the
path, that sizes and channel modes are in range, that each class has a minimum count and the
classes are balanced within a ratio, and that no image (by sha256) carries two labels.
Exact duplicates are counted and listed; only their share is bounded.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from PIL import Image

# Before great-expectations is imported: no usage statistics call home, and none of the hundreds of
# INFO lines about its own API registry that it logs on import (under kfp's executor, whose root
# logger is at INFO, they would bury the step's log).
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
logging.getLogger("great_expectations").setLevel(logging.WARNING)
import great_expectations as gx  # noqa: E402
import great_expectations.expectations as gxe  # noqa: E402
from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402

from brainscan import storage  # noqa: E402
from brainscan.config import IO_WORKERS, VALIDATION  # noqa: E402
from brainscan.dataset import MANIFEST_COLUMNS, read_manifest  # noqa: E402
from brainscan.labels import CLASSES, MODALITIES, UnknownLabelError, is_tumor, label_from_path
from brainscan.limits import IMAGE_FORMATS  # noqa: E402  (the formats serving accepts too)

log = logging.getLogger(__name__)

IMAGE_MODES = ("L", "LA", "RGB", "RGBA", "P")  # what preprocessing turns into RGB
_OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # in the text of some decode errors
UNKNOWN = "<unknown>"


@dataclass
class ExpectationOutcome:
    name: str  # what it checks, in words
    expectation: str  # the great-expectations type
    success: bool
    observed: Any  # observed value or unexpected count
    offending: list[str] = field(default_factory=list)  # paths (or classes) that broke it


@dataclass
class ValidationResult:
    success: bool
    rows: int
    per_class: dict[str, int]
    expectations: list[ExpectationOutcome]
    corrupt: list[str]  # files that do not decode: listed for quarantine
    duplicate_groups: list[list[str]]  # exact duplicates (same sha256), paths per group
    report_json: str
    report_html: str
    quarantine_csv: str | None

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [e for e in self.expectations if not e.success]

    def failure_message(self, max_files: int = 10) -> str:
        """One line per failed expectation, naming the offending files."""
        lines = []
        for e in self.failed:
            shown = ", ".join(e.offending[:max_files])
            more = f" (+{len(e.offending) - max_files} more)" if len(e.offending) > max_files else ""
            lines.append(f"FAILED {e.name} [{e.expectation}]: observed {e.observed}"
                         + (f"; offending: {shown}{more}" if e.offending else ""))
        if self.quarantine_csv:
            lines.append(f"{len(self.corrupt)} corrupt file(s) listed for quarantine in {self.quarantine_csv}")
        return "\n".join(lines)

    def summary(self) -> dict:
        return {
            "success": self.success,
            "rows": self.rows,
            "per_class": self.per_class,
            "failed": [e.name for e in self.failed],
            "corrupt": len(self.corrupt),
            "duplicates": sum(len(g) - 1 for g in self.duplicate_groups),
            "duplicate_groups": len(self.duplicate_groups),
            "report_json": self.report_json,
            "report_html": self.report_html,
            "quarantine_csv": self.quarantine_csv,
        }


# --------------------------------------------------------------------------- derived columns


def _label_of_path(path: str) -> tuple[str, str]:
    try:
        return label_from_path(path)
    except UnknownLabelError:
        return UNKNOWN, UNKNOWN


def _expected_tumor(class7: str) -> int:
    try:
        return int(is_tumor(class7))
    except UnknownLabelError:
        return -1


def _inspect_file(path: str) -> tuple[bool, str | None, str]:
    """(decodes, sha256 of the stored bytes or None when unreadable, error message) for one stored file."""
    try:
        data = storage.read_bytes(path)
    except Exception as err:  # missing object, unreadable file: reported, not raised
        return False, None, f"unreadable: {type(err).__name__}: {err}"
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode the pixels, not only the header
    except Exception as err:
        # PIL names the buffer it read ("<_io.BytesIO object at 0x...>"): no address in a report that is
        # written once per data version, so that a rerun writes the very same bytes
        return False, digest, f"does not decode: {type(err).__name__}: {_OBJECT_ADDRESS.sub('', str(err))}"
    return True, digest, ""


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) if pd.notna(value) else False


def prepare(manifest: pd.DataFrame, check_files: bool = True, workers: int = IO_WORKERS) -> pd.DataFrame:
    """The manifest plus the columns the suite checks: labels from the path, re-read results."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks column(s) {', '.join(missing)}; expected {', '.join(MANIFEST_COLUMNS)}")
    df = manifest.copy()
    for column in ("mode", "format", "modality", "class7", "sha256", "path"):
        df[column] = df[column].astype("string").str.strip().replace("", pd.NA)
    df["decodable"] = df["decodable"].map(_as_bool)
    labels = df["path"].fillna("").map(_label_of_path)
    df["path_modality"] = labels.map(lambda t: t[0])
    df["path_class7"] = labels.map(lambda t: t[1])
    df["expected_tumor"] = df["class7"].fillna("").map(_expected_tumor)
    df["tumor"] = pd.to_numeric(df["tumor"], errors="coerce")
    df["min_side"] = df[["width", "height"]].apply(pd.to_numeric, errors="coerce").min(axis=1)
    df["max_side"] = df[["width", "height"]].apply(pd.to_numeric, errors="coerce").max(axis=1)
    df["labels_for_sha256"] = df.groupby("sha256")["class7"].transform("nunique").fillna(0).astype(int)
    if check_files:
        # The manifest may be stale: re-read every file (in parallel) and decode it for real.
        from tqdm import tqdm

        paths = df["path"].fillna("").tolist()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            checks = list(tqdm(pool.map(_inspect_file, paths), total=len(paths), desc="re-reading files",
                               unit="img", disable=len(paths) < 50, mininterval=2))
        df["decodes"] = [ok and flag for (ok, _, _), flag in zip(checks, df["decodable"])]
        df["decode_error"] = [error if error else ("" if flag else "manifest: decodable=false")
                              for (_, _, error), flag in zip(checks, df["decodable"])]
        df["sha256_matches"] = [digest is not None and digest == sha
                                for (_, digest, _), sha in zip(checks, df["sha256"].fillna(""))]
    else:
        df["decodes"] = df["decodable"]
        df["decode_error"] = ["" if flag else "manifest: decodable=false" for flag in df["decodable"]]
        df["sha256_matches"] = True
    return df


# --------------------------------------------------------------------------- the suite


def _suite(gx, gxe, *, min_side: int, max_side: int, allow_corrupt: float, max_duplicate_fraction: float):
    """(name, expectation) pairs over the manifest rows."""
    return [
        ("every path is unique", gxe.ExpectColumnValuesToBeUnique(column="path")),
        ("every file decodes", gxe.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True],
                                                                mostly=1.0 - allow_corrupt)),
        ("file bytes match the manifest sha256", gxe.ExpectColumnValuesToBeInSet(column="sha256_matches",
                                                                                  value_set=[True])),
        ("sha256 is a hex digest", gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$")),
        ("sha256 present", gxe.ExpectColumnValuesToNotBeNull(column="sha256")),
        ("class7 in the 7 classes", gxe.ExpectColumnValuesToBeInSet(column="class7", value_set=list(CLASSES))),
        ("class7 present", gxe.ExpectColumnValuesToNotBeNull(column="class7")),
        ("modality in ct/mri", gxe.ExpectColumnValuesToBeInSet(column="modality", value_set=list(MODALITIES))),
        ("class7 agrees with the path", gxe.ExpectColumnPairValuesToBeEqual(column_A="class7",
                                                                            column_B="path_class7")),
        ("modality agrees with the path", gxe.ExpectColumnPairValuesToBeEqual(column_A="modality",
                                                                              column_B="path_modality")),
        ("tumor flag agrees with class7", gxe.ExpectColumnPairValuesToBeEqual(column_A="tumor",
                                                                              column_B="expected_tumor")),
        (f"smaller side at least {min_side} px", gxe.ExpectColumnValuesToBeBetween(column="min_side",
                                                                                   min_value=min_side)),
        (f"larger side at most {max_side} px", gxe.ExpectColumnValuesToBeBetween(column="max_side",
                                                                                 max_value=max_side)),
        ("channel mode in range", gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(IMAGE_MODES))),
        ("format is JPEG or PNG", gxe.ExpectColumnValuesToBeInSet(column="format", value_set=list(IMAGE_FORMATS))),
        ("file size positive", gxe.ExpectColumnValuesToBeBetween(column="bytes", min_value=1)),
        ("no label conflicts (same sha256, two labels)",
         gxe.ExpectColumnValuesToBeBetween(column="labels_for_sha256", min_value=1, max_value=1)),
        (f"exact duplicates at most {max_duplicate_fraction:.0%}",
         gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(column="sha256", min_value=1.0 - max_duplicate_fraction)),
    ]


def _class_suite(gxe, *, min_per_class: int, max_class_ratio: float):
    """(name, expectation) pairs over the per-class count table."""
    return [
        (f"each class at least {min_per_class} images",
         gxe.ExpectColumnValuesToBeBetween(column="count", min_value=min_per_class)),
        (f"class balance: largest class at most {max_class_ratio:g}x each class",
         gxe.ExpectColumnValuesToBeBetween(column="share_of_largest", min_value=1.0 / max_class_ratio)),
    ]


def _run(gx, context, name: str, df: pd.DataFrame, expectations, id_column: str) -> list[ExpectationOutcome]:
    asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    names = {}
    for label, expectation in expectations:
        expectation.meta = {"name": label}
        suite.add_expectation(expectation)
        names[label] = expectation.expectation_type
    result = batch.validate(suite, result_format={"result_format": "COMPLETE",
                                                  "unexpected_index_column_names": [id_column]})
    outcomes = []
    for r in result.results:
        label = (r.expectation_config.meta or {}).get("name", r.expectation_config.type)
        res = r.result or {}
        offending = sorted({str(row.get(id_column)) for row in res.get("unexpected_index_list") or []
                            if isinstance(row, dict)})
        if "observed_value" in res:
            observed = res["observed_value"]
        elif "unexpected_count" in res:
            observed = f"{res['unexpected_count']} of {res.get('element_count')} unexpected"
        else:
            observed = None
        if r.exception_info and r.exception_info.get("raised_exception"):
            observed = f"error: {r.exception_info.get('exception_message')}"
        outcomes.append(ExpectationOutcome(label, r.expectation_config.type, bool(r.success),
                                           _plain(observed), offending))
    return outcomes


def _plain(value):
    """JSON-friendly observed values (numpy scalars, lists of them)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def validate_manifest(manifest: pd.DataFrame, *, check_files: bool = True,
                      min_per_class: int = VALIDATION.min_per_class, max_class_ratio: float = VALIDATION.max_class_ratio,
                      min_side: int = VALIDATION.min_side, max_side: int = VALIDATION.max_side,
                      allow_corrupt: float = VALIDATION.allow_corrupt,
                      max_duplicate_fraction: float = VALIDATION.max_duplicate_fraction,
                      ) -> tuple[list[ExpectationOutcome], pd.DataFrame, pd.DataFrame]:
    """Run the suite; returns (outcomes, prepared manifest, per-class counts)."""
    df = prepare(manifest, check_files=check_files)
    counts = df["class7"].value_counts()
    class_counts = pd.DataFrame({"class7": list(CLASSES), "count": [int(counts.get(c, 0)) for c in CLASSES]})
    largest = max(int(class_counts["count"].max()), 1)
    class_counts["share_of_largest"] = class_counts["count"] / largest

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # our own logs say enough
    suite = _suite(gx, gxe, min_side=min_side, max_side=max_side, allow_corrupt=allow_corrupt,
                   max_duplicate_fraction=max_duplicate_fraction)
    outcomes = _run(gx, context, "manifest", df, suite, "path")
    count_outcome, balance_outcome = _run(
        gx, context, "class_counts", class_counts,
        _class_suite(gxe, min_per_class=min_per_class, max_class_ratio=max_class_ratio), "class7")
    # a person wants the numbers, not "1 of 7 unexpected"
    count_outcome.observed = dict(zip(class_counts["class7"], class_counts["count"].astype(int).tolist()))
    balance_outcome.observed = {"largest/smallest": round(largest / max(int(class_counts["count"].min()), 1), 2)}
    outcomes += [count_outcome, balance_outcome]
    return outcomes, df, class_counts


def validate(data: str, report_dir: str, *, check_files: bool = True, min_per_class: int = VALIDATION.min_per_class,
             max_class_ratio: float = VALIDATION.max_class_ratio, min_side: int = VALIDATION.min_side,
             max_side: int = VALIDATION.max_side, allow_corrupt: float = VALIDATION.allow_corrupt,
             max_duplicate_fraction: float = VALIDATION.max_duplicate_fraction, once: bool = False
             ) -> ValidationResult:
    """Validate `{data}/manifest.csv`; write the JSON and HTML reports (and quarantine list) to report_dir.

    once: report_dir is write-once (under a data version, brainscan.layout): a report already there
    with the same bytes is kept, one with other bytes is never replaced (storage.ImmutableObjectError).

    Thresholds: `min_per_class` images in each class; the largest class at most
    `max_class_ratio` times any other; image sides within [min_side, max_side];
    `allow_corrupt` the fraction of undecodable files tolerated (0: any fails the suite);
    `max_duplicate_fraction` the share of exact-duplicate files tolerated.
    """
    write = storage.write_once if once else storage.write_bytes
    manifest_uri = storage.join(data, "manifest.csv")
    manifest = read_manifest(data, required=())  # the suite itself reports missing columns
    log.info("validate: %d rows from %s", len(manifest), manifest_uri)
    outcomes, df, class_counts = validate_manifest(
        manifest, check_files=check_files, min_per_class=min_per_class, max_class_ratio=max_class_ratio,
        min_side=min_side, max_side=max_side, allow_corrupt=allow_corrupt,
        max_duplicate_fraction=max_duplicate_fraction)

    corrupt_rows = df[~df["decodes"]]
    corrupt = corrupt_rows["path"].fillna("").tolist()
    groups = [sorted(g["path"].tolist()) for _, g in df.dropna(subset=["sha256"]).groupby("sha256") if len(g) > 1]
    groups.sort()
    success = all(o.success for o in outcomes)

    json_uri = storage.join(report_dir, "validation.json")
    html_uri = storage.join(report_dir, "validation.html")
    quarantine_uri = storage.join(report_dir, "quarantine.csv") if corrupt else None
    if quarantine_uri:
        quarantine = corrupt_rows[["path", "sha256", "class7"]].copy()
        quarantine["reason"] = corrupt_rows["decode_error"].values
        write(quarantine_uri, quarantine.to_csv(index=False).encode(), "text/csv")
    per_class = dict(zip(class_counts["class7"], class_counts["count"].astype(int)))
    result = ValidationResult(success, len(df), per_class, outcomes, corrupt, groups, json_uri, html_uri, quarantine_uri)
    report = {
        "manifest": manifest_uri,
        "success": success,
        "rows": len(df),
        "per_class": per_class,
        "thresholds": {"min_per_class": min_per_class, "max_class_ratio": max_class_ratio, "min_side": min_side,
                       "max_side": max_side, "allow_corrupt": allow_corrupt,
                       "max_duplicate_fraction": max_duplicate_fraction, "check_files": check_files},
        "expectations": [o.__dict__ for o in outcomes],
        "corrupt": [{"path": p, "reason": r} for p, r in zip(corrupt, corrupt_rows["decode_error"])],
        "quarantine_csv": quarantine_uri,
        "duplicates": {"files": sum(len(g) - 1 for g in groups), "groups": groups},
    }
    write(json_uri, storage.json_bytes(report), "application/json")
    write(html_uri, _html(report).encode(), "text/html")
    log.info("validate: %s (%d expectations, %d failed)", "passed" if success else "FAILED",
             len(outcomes), len(result.failed))
    return result


# --------------------------------------------------------------------------- the HTML report


def _html(report: dict) -> str:
    esc = html.escape
    ok = report["success"]
    rows = []
    for e in report["expectations"]:
        offending = "<br>".join(esc(p) for p in e["offending"][:50])
        if len(e["offending"]) > 50:
            offending += f"<br>... and {len(e['offending']) - 50} more (see validation.json)"
        rows.append(f"<tr class='{'pass' if e['success'] else 'fail'}'><td>{'PASS' if e['success'] else 'FAIL'}</td>"
                    f"<td>{esc(e['name'])}</td><td><code>{esc(e['expectation'])}</code></td>"
                    f"<td>{esc(str(e['observed']))}</td><td class='files'>{offending}</td></tr>")
    classes = "".join(f"<tr><td>{esc(c)}</td><td>{n}</td></tr>" for c, n in report["per_class"].items())
    corrupt = "".join(f"<li><code>{esc(c['path'])}</code>: {esc(c['reason'])}</li>" for c in report["corrupt"])
    dups = "".join("<li>" + "<br>".join(f"<code>{esc(p)}</code>" for p in g) + "</li>"
                   for g in report["duplicates"]["groups"])
    n_failed = sum(not e["success"] for e in report["expectations"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>brainscan data validation</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }}
tr.pass td:first-child {{ color: #176117; font-weight: bold; }} tr.fail {{ background: #fde8e8; }}
tr.fail td:first-child {{ color: #a11; font-weight: bold; }} td.files {{ font-size: 85%; }}
.banner {{ padding: 0.6em 1em; font-size: 120%; color: white; background: {'#176117' if ok else '#a11'}; }}
</style></head><body>
<h1>brainscan data validation</h1>
<p class="banner">{'PASSED' if ok else f'FAILED: {n_failed} expectation(s)'}: {report['rows']} images in
<code>{esc(report['manifest'])}</code></p>
<h2>Images per class</h2><table><tr><th>class</th><th>images</th></tr>{classes}</table>
<h2>Expectations</h2>
<table><tr><th>result</th><th>check</th><th>expectation</th><th>observed</th><th>offending</th></tr>
{''.join(rows)}</table>
<h2>Corrupt files ({len(report['corrupt'])})</h2>
{f"<p>Listed for quarantine in <code>{esc(str(report['quarantine_csv']))}</code>; nothing was removed.</p><ul>{corrupt}</ul>"
 if report['corrupt'] else '<p>None: every file decodes.</p>'}
<h2>Exact duplicates ({report['duplicates']['files']} extra copies in {len(report['duplicates']['groups'])} groups)</h2>
{f'<ul>{dups}</ul>' if dups else '<p>None.</p>'}
<h2>Thresholds</h2><pre>{esc(json.dumps(report['thresholds'], indent=2))}</pre>
</body></html>
"""
