#!/usr/bin/env python
"""Model-quality study: train recipes through the project's own train(), score held-out images
through the project's own bundle loading and preprocessing, and tabulate honest figures.

Two designs:

  cv     StratifiedGroupKFold (5 folds, seed 42) over all images of a split folder's train, val and
         test CSVs, stratified by class7, grouped by the split's `group` column (duplicates and
         near-duplicates never cross folds). For fold k: held-out = fold k; of the other images one
         sixth (again by group) is the validation set early stopping and checkpoints follow, the rest
         trains (~467 / ~93 / 140 images). Every image is held out exactly once: out-of-fold scores.
  split  the pipeline's own split: train on train.csv, early-stop on val.csv, score val and test
         (the test figures are the honest ones; val is reported but was used for checkpointing).

Every run appends one JSON line (config, every train() argument, seconds, load average, epochs,
held-out metrics with and without test-time flip averaging) to RUNS and writes its per-image
scores. `report` turns RUNS into a markdown table, a JSON summary and a PNG chart.

  python -m scripts.model_study run --splits SPLITS --design cv --config baseline --folds 0 1 2 3 4
  python -m scripts.model_study run --splits SPLITS --design split --config cpu --seeds 0 1 2
  python -m scripts.model_study report --work WORK

(from the checkout's root: `scripts` is a package there, beside the brainscan it imports)

SPLITS: a folder with a pipeline run's train/val/test.csv whose `path` column names local image
files (the runs in RESULTS used the real sample's split, seed 42, fingerprint 6417725b...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from brainscan.config import preset
from brainscan.decision import tumor_probability
from brainscan.labels import CLASS_INDEX, CLASSES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "model_study"
RUNS = RESULTS / "runs.jsonl"
# Where a study's folds, bundles and per-image scores go (the split folder is always given).
DEFAULT_WORK = ".brainscan-study"
N_FOLDS = 5
INNER_VAL_FOLDS = 6  # one sixth of the non-held-out images validates
FOLD_SEED = 42
MIN_PRECISION = 0.80

# The recipes. Every train() argument a recipe sets is recorded with each run.
COMMON = dict(base_weights="none", batch_size=16, learning_rate=1e-3, dropout=0.3, bn_momentum=0.9)


def preset_recipe(name: str) -> dict:
    """The train() arguments a pipeline preset (brainscan.config.PRESETS) trains with: its Recipe but the seed."""
    recipe = preset(name).recipe.as_dict()
    recipe.pop("seed")  # every run sets its own
    return dict(COMMON, **recipe)


CONFIGS: dict[str, dict] = {
    # the documented best run so far (docs/results/real_sample_scratch_96px, second run)
    "baseline": dict(COMMON, image_size=96, epochs=30, fine_tune_epochs=6, patience=8),
    # one cosine stage, flips, AdamW; the screening variants override single keys (--set)
    "cosine96": dict(COMMON, image_size=96, epochs=40, fine_tune_epochs=0, patience=40, lr_schedule="cosine",
                     warmup_epochs=2, weight_decay=0.02, augment_flip=True),
    # what `--preset cpu` trains: cosine96 with the flip averaging baked into the saved model
    "cpu": preset_recipe("cpu"),
}


def log(message: str) -> None:
    print(f"study: {message}", file=sys.stderr, flush=True)


def load_average() -> float:
    return float(os.getloadavg()[0])


# ----------------------------------------------------------------------------- folds
def all_images(splits: str) -> pd.DataFrame:
    frames = [pd.read_csv(Path(splits) / f"{name}.csv").assign(pipeline_split=name) for name in ("train", "val", "test")]
    return pd.concat(frames, ignore_index=True)


def cv_folds(frame: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(train, val, held-out) row indices per fold; groups never cross any of the three."""
    # lazy: scikit-learn, only where folds and metrics are computed
    from sklearn.model_selection import StratifiedGroupKFold

    outer = StratifiedGroupKFold(n_splits=N_FOLDS, shuffle=True, random_state=FOLD_SEED)
    folds = []
    for k, (rest, held_out) in enumerate(outer.split(frame, frame["class7"], frame["group"])):
        inner = StratifiedGroupKFold(n_splits=INNER_VAL_FOLDS, shuffle=True, random_state=FOLD_SEED + k)
        fit, val = next(inner.split(frame.iloc[rest], frame["class7"].iloc[rest], frame["group"].iloc[rest]))
        folds.append((rest[fit], rest[val], held_out))
    return folds


def write_fold_splits(frame: pd.DataFrame, fold: int, folder: Path) -> Path:
    train, val, held_out = cv_folds(frame)[fold]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val), ("test", held_out)):
        frame.iloc[rows].drop(columns=["pipeline_split"]).to_csv(folder / f"{name}.csv", index=False)
    return folder


# ----------------------------------------------------------------------------- metrics
def recall_at_precision(y: np.ndarray, score: np.ndarray, min_precision: float = MIN_PRECISION) -> float:
    """The best recall any threshold reaches while precision stays >= min_precision."""
    # lazy: scikit-learn, only where folds and metrics are computed
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(y, score)
    ok = precision >= min_precision
    return float(recall[ok].max()) if ok.any() else 0.0


def metrics(frame: pd.DataFrame, probabilities: np.ndarray) -> dict:
    # lazy: scikit-learn, only where folds and metrics are computed
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = frame["tumor"].to_numpy().astype(int)
    score = tumor_probability(probabilities)
    out = {"n": int(len(y)), "roc_auc": float(roc_auc_score(y, score)),
           "pr_auc": float(average_precision_score(y, score)),
           "accuracy7": float(np.mean(probabilities.argmax(1) == frame["class7"].map(CLASS_INDEX).to_numpy())),
           "recall_at_p80": recall_at_precision(y, score)}
    for modality in ("ct", "mri"):
        mask = (frame["modality"] == modality).to_numpy()
        out[f"roc_auc_{modality}"] = float(roc_auc_score(y[mask], score[mask]))
    return out


def score_bundle(bundle_dir: str, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Softmax [N, 7] through load_bundle + the bundle's own preprocessing; also on mirrored images
    (a bundle trained with tta_flip averages over both already: then the two agree)."""
    from brainscan.modelstore import load_bundle  # lazy: TensorFlow's start-up, only where bundles are scored

    bundle = load_bundle(bundle_dir)
    x = bundle.preprocess([Path(path).read_bytes() for path in frame["path"]])
    plain = bundle.predict(x)
    mirrored = bundle.predict(np.ascontiguousarray(x[:, :, ::-1, :]))
    return plain, mirrored


def score_frame(frame: pd.DataFrame, probabilities: np.ndarray, **columns) -> pd.DataFrame:
    out = frame[["path", "class7", "modality", "tumor"]].copy()
    for key, value in columns.items():
        out[key] = value
    out["p_tumor"] = tumor_probability(probabilities)
    for i, name in enumerate(CLASSES):
        out[f"p_{name}"] = probabilities[:, i]
    return out


# ----------------------------------------------------------------------------- per-epoch tracking
def held_out_tracker(frame: pd.DataFrame, image_size: int, crop_to_head: bool):
    """A Keras callback scoring the held-out images after every epoch (plain and flip-averaged).

    For the analysis of checkpoint rules only (which epoch would val_loss / val AUC / the last
    epoch pick, and how good is it on held-out images): the reported figures come from the bundle.
    """
    # lazy: Keras, scikit-learn and TensorFlow (preprocessing) start-up; only --track needs them
    import keras
    from sklearn.metrics import roc_auc_score

    from brainscan.preprocessing import preprocess_batch

    x = preprocess_batch([Path(p).read_bytes() for p in frame["path"]], image_size, crop_to_head=crop_to_head)
    y = frame["tumor"].to_numpy()
    ct = (frame["modality"] == "ct").to_numpy()

    class Tracker(keras.callbacks.Callback):
        epochs: list[dict] = []

        seconds = 0.0

        def on_epoch_end(self, epoch, logs=None):
            started = time.monotonic()

            def predict(images):
                parts = []
                for i in range(0, len(images), 64):
                    out = self.model(images[i:i + 64], training=False)
                    parts.append(np.asarray(out["probabilities"] if isinstance(out, dict) else out))
                return np.concatenate(parts)

            plain = predict(x)
            averaged = (plain + predict(np.ascontiguousarray(x[:, :, ::-1]))) / 2
            row = {"epoch": len(self.epochs) + 1, **{k: float(v) for k, v in (logs or {}).items()}}
            for tag, probs in (("", plain), ("_tta", averaged)):
                p = tumor_probability(probs)
                row[f"held_out_auc{tag}"] = float(roc_auc_score(y, p))
                row[f"held_out_auc_ct{tag}"] = float(roc_auc_score(y[ct], p[ct]))
                row[f"held_out_auc_mri{tag}"] = float(roc_auc_score(y[~ct], p[~ct]))
            self.epochs.append(row)
            Tracker.seconds += time.monotonic() - started

    Tracker.epochs, Tracker.seconds = [], 0.0
    return Tracker()


# ----------------------------------------------------------------------------- runs
def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def recipe(config: str, overrides: list[str]) -> dict:
    params = dict(CONFIGS[config])
    for item in overrides:
        key, _, value = item.partition("=")
        params[key] = parse_value(value)
    return params


def run_one(design: str, config: str, name: str, params: dict, seed: int, fold: int | None,
            splits: str, work: Path, keep: bool, track: bool = False) -> dict:
    from components.train import train  # lazy: TensorFlow's start-up; `report` does not train

    run_id = f"{design}-{name}-seed{seed}" + (f"-fold{fold}" if fold is not None else "")
    run_dir = work / "runs" / run_id
    if design == "cv":
        frame = all_images(splits)
        fold_splits = write_fold_splits(frame, fold, work / "folds" / f"fold{fold}")
        held_out = pd.read_csv(fold_splits / "test.csv")
        train_splits = str(fold_splits)
    else:
        train_splits = splits
        held_out = pd.concat([pd.read_csv(Path(splits) / f"{n}.csv").assign(part=n) for n in ("val", "test")],
                             ignore_index=True)
    bundle_dir = run_dir / "bundle"
    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    tracker = held_out_tracker(held_out, params["image_size"], bool(params.get("crop_to_head"))) if track else None
    load_before = load_average()
    wall = time.monotonic()
    result = train(train_splits, str(bundle_dir), seed=seed, callbacks=[tracker] if tracker else None, **params)
    wall = time.monotonic() - wall
    load_after = load_average()
    plain, mirrored = score_bundle(str(bundle_dir), held_out)
    averaged = (plain + mirrored) / 2
    record = {
        "run_id": run_id, "design": design, "config": config, "name": name, "seed": seed, "fold": fold,
        "params": params, "train_seconds": round(result.seconds - (tracker.seconds if tracker else 0.0), 1),
        "tracking_seconds": round(tracker.seconds, 1) if tracker else 0.0, "wall_seconds": round(wall, 1),
        "load_before": load_before, "load_after": load_after, "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
        "train_images": result.train_images, "val_images": result.val_images,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tracked_epochs": tracker.epochs if tracker is not None else None,
    }
    parts = {"held_out": np.ones(len(held_out), bool)}
    if design == "split":
        parts = {"test": (held_out["part"] == "test").to_numpy(), "val": (held_out["part"] == "val").to_numpy(),
                 "held_out": np.ones(len(held_out), bool)}
    for part, mask in parts.items():
        record[part] = metrics(held_out[mask], plain[mask])
        record[f"{part}_tta"] = metrics(held_out[mask], averaged[mask])
    scores = score_frame(held_out, plain, fold=fold if fold is not None else -1, seed=seed,
                         **({"part": held_out["part"]} if "part" in held_out else {}))
    scores_tta = score_frame(held_out, averaged, fold=fold if fold is not None else -1, seed=seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    scores.to_csv(run_dir / "scores.csv", index=False)
    scores_tta.to_csv(run_dir / "scores_tta.csv", index=False)
    (run_dir / "record.json").write_text(json.dumps(record, indent=2))
    if not keep:
        shutil.rmtree(bundle_dir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RUNS, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    main = record.get("test", record["held_out"])
    log(f"{run_id}: {record['train_seconds']:.0f}s (+{record['tracking_seconds']:.0f}s tracking), load {load_before:.2f}->{load_after:.2f}, {result.epochs_run} epochs "
        f"(best {result.best_epoch}); held-out AUC {main['roc_auc']:.4f} (CT {main['roc_auc_ct']:.3f}, "
        f"MRI {main['roc_auc_mri']:.3f}), acc7 {main['accuracy7']:.3f}, recall@P80 {main['recall_at_p80']:.3f}; "
        f"with flip TTA AUC {record.get('test_tta', record['held_out_tta'])['roc_auc']:.4f}")
    return record


# ----------------------------------------------------------------------------- report
def read_runs(path: Path = RUNS) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _spread(values) -> str:
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if len(values) == 0:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ({values.min():.3f}-{values.max():.3f})"


def oof_scores(runs: list[dict], work: Path, tta: bool = False) -> pd.DataFrame | None:
    """The out-of-fold scores of a complete 5-fold CV (one run per fold), or None."""
    if sorted(r["fold"] for r in runs) != list(range(N_FOLDS)):
        return None
    frames = []
    for r in sorted(runs, key=lambda r: r["fold"]):
        path = work / "runs" / r["run_id"] / ("scores_tta.csv" if tta else "scores.csv")
        if not path.exists():
            return None
        frames.append(pd.read_csv(path))
    return pd.concat(frames, ignore_index=True)


def pooled_oof(runs: list[dict], work: Path, tta: bool = False) -> dict | None:
    """Metrics over the pooled out-of-fold scores of a complete 5-fold CV (one seed per fold)."""
    # lazy: scikit-learn, only where folds and metrics are computed
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores = oof_scores(runs, work, tta)
    if scores is None:
        return None
    y, p = scores["tumor"].to_numpy(), scores["p_tumor"].to_numpy()
    out = {"n": int(len(y)), "roc_auc": float(roc_auc_score(y, p)), "pr_auc": float(average_precision_score(y, p)),
           "recall_at_p80": recall_at_precision(y, p)}
    for modality in ("ct", "mri"):
        mask = (scores["modality"] == modality).to_numpy()
        out[f"roc_auc_{modality}"] = float(roc_auc_score(y[mask], p[mask]))
    return out


def report(work: Path) -> None:
    runs = read_runs()
    if not runs:
        log("no runs yet")
        return
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["design"], r["name"]), []).append(r)
    lines = ["# Model study: runs", "",
             "Generated by `python -m scripts.model_study report` from `runs.jsonl` (one line per training run).",
             "Held-out figures: cv = the fold's 140 held-out images (never trained on, never used for early",
             "stopping); split = the pipeline split's 105 test images. P(tumor) = 1 - P(ct_healthy) - P(mri_healthy).",
             "recall@P80 = the best recall any threshold reaches on the held-out images with precision >= 0.80.",
             "Values: mean (min-max) over runs. `load` = 1-minute load average before / after training (2 cores).", "",
             "## Per configuration", "",
             "| design | config | runs | train s | epochs | ROC-AUC | CT AUC | MRI AUC | PR-AUC | acc7 | recall@P80 | ROC-AUC flip-TTA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for (design, name), rs in groups.items():
        part = "test" if design == "split" else "held_out"
        m = [r[part] for r in rs]
        t = [r[f"{part}_tta"] for r in rs]
        row = {"design": design, "name": name, "runs": len(rs), "params": rs[0]["params"],
               "train_seconds": [r["train_seconds"] for r in rs], "epochs_run": [r["epochs_run"] for r in rs],
               "metrics": {k: [x[k] for x in m] for k in m[0]}, "metrics_tta": {k: [x[k] for x in t] for k in t[0]}}
        if design == "cv":
            row["pooled_oof"] = pooled_oof(rs, work)
            row["pooled_oof_tta"] = pooled_oof(rs, work, tta=True)
            for tta in (False, True):
                scores = oof_scores(rs, work, tta)
                if scores is not None:
                    scores.to_csv(RESULTS / f"oof_scores_{name}{'_tta' if tta else ''}.csv", index=False)
        summary.append(row)
        lines.append(f"| {design} | {name} | {len(rs)} | {_spread(row['train_seconds'])} | {_spread(row['epochs_run'])} | "
                     f"{_spread(row['metrics']['roc_auc'])} | {_spread(row['metrics']['roc_auc_ct'])} | "
                     f"{_spread(row['metrics']['roc_auc_mri'])} | {_spread(row['metrics']['pr_auc'])} | "
                     f"{_spread(row['metrics']['accuracy7'])} | {_spread(row['metrics']['recall_at_p80'])} | "
                     f"{_spread(row['metrics_tta']['roc_auc'])} |")
    pooled = [row for row in summary if row.get("pooled_oof")]
    if pooled:
        lines += ["", "## Complete 5-fold CVs: pooled out-of-fold scores (all 700 images)", "",
                  "| config | ROC-AUC | CT AUC | MRI AUC | PR-AUC | recall@P80 | ROC-AUC flip-TTA | recall@P80 flip-TTA |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in pooled:
            o, ot = row["pooled_oof"], row["pooled_oof_tta"]
            lines.append(f"| {row['name']} | {o['roc_auc']:.3f} | {o['roc_auc_ct']:.3f} | {o['roc_auc_mri']:.3f} | "
                         f"{o['pr_auc']:.3f} | {o['recall_at_p80']:.3f} | {ot['roc_auc']:.3f} | {ot['recall_at_p80']:.3f} |")
    tracked = [r for r in runs if r.get("tracked_epochs")]
    if tracked:
        lines += ["", "## Checkpoint rules (runs with per-epoch held-out tracking)", "",
                  "Held-out ROC-AUC of P(tumor) (plain / flip-averaged) at the epoch each rule picks: the lowest",
                  "validation loss (what train() does), the highest validation P(tumor) ROC-AUC, the last epoch.", "",
                  "| run | epochs | best val_loss: epoch, AUC | best val AUC: epoch, AUC | last epoch AUC | best possible |",
                  "|---|---|---|---|---|---|"]
        for r in tracked:
            ep = r["tracked_epochs"]
            loss_key = "val_loss"
            auc_key = "val_tumor_auc" if "val_tumor_auc" in ep[0] else "val_probabilities_tumor_auc"
            by_loss = min(range(len(ep)), key=lambda i: ep[i][loss_key])
            by_auc = max(range(len(ep)), key=lambda i: (ep[i][auc_key], i))

            def at(i):
                return f"{ep[i]['held_out_auc']:.3f} / {ep[i]['held_out_auc_tta']:.3f}"

            best = max(e["held_out_auc"] for e in ep)
            lines.append(f"| {r['run_id']} | {len(ep)} | {by_loss + 1}: {at(by_loss)} | {by_auc + 1}: {at(by_auc)} | "
                         f"{at(len(ep) - 1)} | {best:.3f} |")
    lines += ["", "## Every run", "",
              "| run | train s | load before/after | epochs (best) | ROC-AUC | CT | MRI | PR-AUC | acc7 | recall@P80 | TTA AUC |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        part = "test" if r["design"] == "split" else "held_out"
        m, t = r[part], r[f"{part}_tta"]
        lines.append(f"| {r['run_id']} | {r['train_seconds']:.0f} | {r['load_before']:.2f}/{r['load_after']:.2f} | "
                     f"{r['epochs_run']} ({r['best_epoch']}) | {m['roc_auc']:.3f} | {m['roc_auc_ct']:.3f} | "
                     f"{m['roc_auc_mri']:.3f} | {m['pr_auc']:.3f} | {m['accuracy7']:.3f} | {m['recall_at_p80']:.3f} | "
                     f"{t['roc_auc']:.3f} |")
    lines += ["", "## Recipes (train() arguments besides seed)", ""]
    for row in summary:
        lines.append(f"- `{row['design']}/{row['name']}`: `{json.dumps(row['params'], sort_keys=True)}`")
    (RESULTS / "runs.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    chart(summary)
    log(f"wrote {RESULTS / 'runs.md'}, summary.json, auc_by_config.png")


def chart(summary: list[dict]) -> None:
    # pyplot needs its headless backend chosen before the import; only when a chart is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    fig, axes = plt.subplots(1, 3, figsize=(15, 0.5 * len(summary) + 2), sharey=True)
    labels = [f"{row['design']}/{row['name']} (n={row['runs']})" for row in summary]
    for ax, key, title in zip(axes, ("roc_auc", "roc_auc_ct", "roc_auc_mri"), ("ROC-AUC pooled", "CT", "MRI")):
        for i, row in enumerate(summary):
            values = row["metrics"][key]
            ax.scatter(values, [i] * len(values), color="tab:blue", alpha=0.6, s=25)
            ax.plot([min(values), max(values)], [i, i], color="tab:blue", alpha=0.4)
            ax.scatter([np.mean(values)], [i], color="black", marker="|", s=300)
        ax.axvline(0.95, color="red", linestyle="--", linewidth=1)
        ax.set_title(f"held-out {title} (dots: runs; bar: mean)")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(labels)), labels)
    fig.tight_layout()
    fig.savefig(RESULTS / "auc_by_config.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and score")
    run.add_argument("--design", choices=("cv", "split"), default="cv")
    run.add_argument("--config", required=True, choices=sorted(CONFIGS))
    run.add_argument("--name", help="name in the tables (default: config + overrides)")
    run.add_argument("--set", nargs="*", default=[], help="train() overrides, key=value")
    run.add_argument("--folds", nargs="*", type=int, default=[0], help="cv folds to run (seed = fold unless --seeds)")
    run.add_argument("--seeds", nargs="*", type=int, help="training seeds (split: one run each; cv: one per fold)")
    run.add_argument("--keep", action="store_true", help="keep the bundles")
    run.add_argument("--track", action="store_true",
                     help="score the held-out images after every epoch (checkpoint-rule analysis; slower)")
    rep = sub.add_parser("report", help="tables and chart from runs.jsonl")
    for p in (run, rep):
        p.add_argument("--splits", required=p is run, help="a pipeline run's split folder (train/val/test CSVs)")
        p.add_argument("--work", default=DEFAULT_WORK, help="folds, bundles and per-image scores")
    args = parser.parse_args()
    work = Path(args.work)
    if args.command == "report":
        report(work)
        return
    params = recipe(args.config, args.set)
    name = args.name or "+".join([args.config] + args.set)
    if args.design == "cv":
        seeds = args.seeds or args.folds
        for fold, seed in zip(args.folds, seeds):
            run_one("cv", args.config, name, params, seed, fold, args.splits, work, args.keep, args.track)
    else:
        for seed in args.seeds or [0]:
            run_one("split", args.config, name, params, seed, None, args.splits, work, args.keep, args.track)


if __name__ == "__main__":
    main()
