#!/usr/bin/env python
"""The `--preset gpu` recipe (299 px, from scratch) trained on a lent GPU machine, on the same
cross-validation folds as scripts/model_study.py, so its held-out figures sit beside the CPU ones.

The lent machine has Keras, JAX and CUDA but no TensorFlow and no package index, and only 64 MiB
travel to it. So the work is split in two:

  here   `pack`: every image of the study's split folder preprocessed by brainscan's own
         preprocess_batch (TensorFlow) at S px, quantised to uint8 ((x + 1) * 127.5, at most
         0.004 from the float input), one channel where all three are equal, with labels and
         each fold's train / val / held-out roles, into one compressed .npz.
  there  `train` (KERAS_BACKEND=jax): the recipe's network and its two fit stages from
         brainscan/network.py (Keras only: training_model and fit_stages, as components/train.py),
         on the packed arrays (augmentation per batch outside the compiled step, see
         augmented_batches; always from scratch); every run's held-out softmax, plain and
         flip-averaged, into OUT/scores.npz (rewritten after each run, so a run cut off by the
         device's time limit loses only itself), plus the model call's throughput at batch 1-64.
         Back here, `report` scores them with scripts/model_study.py's metrics.

  python -m scripts.gpu_study pack --splits RUN/splits --size 299 --out .gpu/data299.npz
  KERAS_BACKEND=jax python -m scripts.gpu_study train --data .gpu/data299.npz --out $OUT \
      --plan gpu-preset:0:0 cpu-preset:0:0 ...
  python -m scripts.gpu_study report --splits RUN/splits --scores OUT/scores.npz

(from the checkout's root, here and there: `scripts` is a package beside the brainscan it imports)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from brainscan.config import Recipe
from brainscan.labels import CLASS_INDEX
from scripts import model_study

RESULTS = model_study.RESULTS


def log(message: str) -> None:
    print(f"gpu_study: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- here: pack
def pack(splits: str, size: int, out: Path) -> None:
    from brainscan.preprocessing import preprocess_batch  # lazy: TensorFlow, here only (the lent machine has none)

    frame = model_study.all_images(splits)
    folds = model_study.cv_folds(frame)
    roles = np.full((len(folds), len(frame)), -1, dtype=np.int8)  # 0 train, 1 val, 2 held out
    for k, (train, val, held) in enumerate(folds):
        roles[k, train], roles[k, val], roles[k, held] = 0, 1, 2
    images = np.zeros((len(frame), size, size, 3), dtype=np.uint8)
    worst = 0.0
    for start in range(0, len(frame), 32):
        paths = frame["path"].iloc[start:start + 32]
        batch = preprocess_batch([Path(p).read_bytes() for p in paths], size)
        quantised = np.clip(np.rint((batch + 1.0) * 127.5), 0, 255).astype(np.uint8)
        worst = max(worst, float(np.abs(quantised / 127.5 - 1.0 - batch).max()))
        images[start:start + len(paths)] = quantised
        log(f"preprocessed {start + len(paths)}/{len(frame)}")
    grey = bool((images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all())
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images[..., :1] if grey else images, grey=grey,
                        labels=frame["class7"].map(CLASS_INDEX).to_numpy(np.int32),
                        tumor=frame["tumor"].to_numpy(np.int32), modality=frame["modality"].to_numpy(str),
                        sha256=frame["sha256"].to_numpy(str), roles=roles, size=size)
    log(f"{out}: {len(frame)} images at {size} px, grey={grey}, largest quantisation error {worst:.4f}, "
        f"{out.stat().st_size / 1e6:.1f} MB")


# ----------------------------------------------------------------------------- there: train
def recipes() -> dict[str, dict]:
    """The recipes trained here, from scripts/model_study.py's own: "gpu-preset" is `--preset gpu`
    (the cluster defaults; trained from scratch, the only start without ImageNet weights),
    "cpu-recipe-299" the `--preset cpu` recipe at the cluster's 299 px."""
    return {"gpu-preset": model_study.preset_recipe("gpu"),
            "cpu-recipe-299": dict(model_study.CONFIGS["cpu"], image_size=299),
            "cpu-preset": model_study.CONFIGS["cpu"],
            "baseline-96": model_study.CONFIGS["baseline"]}


def augmented_batches(images, labels, class_weights, batch_size, augment, seed):
    """Shuffled, augmented training batches with class weights as sample weights.

    The augmentation runs eagerly per batch, outside the compiled train step: inside it, Keras's
    RandomRotation / RandomZoom / RandomTranslation make a JAX train step on the H100 58x slower
    (2,142 ms against 36.8 ms at 96 px, batch 16; measured on the lent machine), as train() on
    TensorFlow keeps them in tf.data.
    """
    import keras  # lazy: Keras and its backend (JAX there) start up only where the study trains

    sample_weight = np.array([class_weights[int(label)] for label in labels], dtype=np.float32)

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.order = np.random.default_rng(seed).permutation(len(labels))
            self.epoch = 0

        def __len__(self):
            return -(-len(labels) // batch_size)

        def __getitem__(self, index):
            rows = self.order[index * batch_size:(index + 1) * batch_size]
            return (np.asarray(augment(images[rows], training=True)), labels[rows], sample_weight[rows])

        def on_epoch_end(self):
            self.epoch += 1
            self.order = np.random.default_rng(seed + self.epoch).permutation(len(labels))

    return Batches()


def fit_one(data: dict, fold: int, recipe_name: str, params: dict, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train params on fold's train rows, checkpoint on its val rows; held-out softmax (plain, flip-averaged).

    From scratch whatever params say (the lent machine cannot download ImageNet weights), on sparse
    labels with the class weights as sample weights (augmented_batches).
    """
    # lazy: Keras and its backend (JAX there) start up only where the study trains
    import keras

    from brainscan import network

    recipe = Recipe.from_dict(params).replace(base_weights="none")
    if network.target_kind(recipe.mixup, recipe.label_smoothing, recipe.tumor_aux) != "sparse":
        raise ValueError(f"{recipe_name}: mixup, label smoothing and tumor_aux need one-hot targets, not packed here")
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy("mixed_float16")  # as components/train.py on a GPU
    size = recipe.image_size
    roles, labels = data["roles"][fold], data["labels"]

    def images(rows):
        raw = data["images"][rows].astype(np.float32) / 127.5 - 1.0
        return np.repeat(raw, 3, axis=-1) if raw.shape[-1] == 1 else raw

    train_rows, val_rows, held_rows = (np.flatnonzero(roles == r) for r in (0, 1, 2))
    x_train, x_val, x_held = images(train_rows), images(val_rows), images(held_rows)
    y_train, y_val = labels[train_rows], labels[val_rows]
    steps_per_epoch = -(-len(train_rows) // recipe.batch_size)
    training = network.training_model(recipe, "none", steps_per_epoch, params.get("dropout", network.DROPOUT),
                                      params.get("bn_momentum", network.SCRATCH_BN_MOMENTUM))
    train_batches = augmented_batches(x_train, y_train, network.class_weights(y_train), recipe.batch_size,
                                      network.augmenter(seed, flip=recipe.augment_flip), seed)
    started = time.monotonic()
    fitted = network.fit_stages(training, recipe, train_batches, (x_val, y_val),
                                f"/tmp/best-{recipe_name}-{fold}-{seed}.weights.h5", log=log, verbose=2,
                                batch_size=recipe.batch_size)
    seconds = time.monotonic() - started
    plain = training.model.predict(x_held, batch_size=64, verbose=0)
    tta = network.with_flip_averaging(training.model, size).predict(x_held, batch_size=64, verbose=0)
    keras.mixed_precision.set_global_policy("float32")
    run = {"recipe": recipe_name, "fold": fold, "seed": seed, "params": params, "train_seconds": round(seconds, 1),
           "epochs_run": len(fitted.history.get("loss", [])), "best_epoch": fitted.best_epoch,
           "best_val_loss": fitted.at_best("val_loss")}
    return plain, tta, run


def model_call_throughput(sizes=(96, 299), batches=(1, 8, 32, 64), repeats: int = 30) -> list[dict]:
    """Images/s of the served graph's forward pass (float32, compiled predict_on_batch) on this device."""
    # lazy: Keras and its backend (JAX there) start up only where the study trains
    import keras

    from brainscan.network import build_model

    keras.mixed_precision.set_global_policy("float32")
    rows = []
    for size in sizes:
        model, _ = build_model(size, "none")
        for batch in batches:
            x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
            for _ in range(3):
                model.predict_on_batch(x)
            started = time.perf_counter()
            for _ in range(repeats):
                np.asarray(model.predict_on_batch(x))
            seconds = (time.perf_counter() - started) / repeats
            rows.append({"image_size": size, "batch": batch, "ms_per_call": round(seconds * 1e3, 2),
                         "images_per_s": round(batch / seconds, 1)})
            log(f"model call {size} px batch {batch}: {rows[-1]}")
    return rows


def train(data_paths: list[Path], out: Path, plan: list[str], deadline_s: float, throughput: bool = True) -> None:
    # lazy: JAX and its Keras backend are the lent machine's, not this one's
    import jax
    import keras

    jax.config.update("jax_compilation_cache_dir", "/tmp/jax-cache")  # same graph, next fold: no recompile
    started = time.monotonic()
    data = {int(d["size"]): d for d in (dict(np.load(path)) for path in data_paths)}
    out.mkdir(parents=True, exist_ok=True)
    device = {"backend": keras.backend.backend(), "keras": keras.__version__, "jax": jax.__version__,
              "devices": [str(d) for d in jax.devices()]}
    log(f"device {device}")
    if throughput:
        rows = model_call_throughput()
        (out / "gpu_throughput.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    all_recipes, results = recipes(), {}
    for item in plan:  # "RECIPE:FOLD:SEED", in priority order
        recipe, fold, seed = item.split(":")
        if time.monotonic() - started > deadline_s:
            log(f"deadline: {item} and later not started")
            break
        log(f"start {item} at {time.monotonic() - started:.0f} s")
        params = all_recipes[recipe]
        sized = data[params["image_size"]]
        plain, tta, run = fit_one(sized, int(fold), recipe, params, int(seed))
        run["device"] = device
        name = f"{recipe}-f{fold}-s{seed}"
        held = np.flatnonzero(sized["roles"][int(fold)] == 2)
        results.update({f"{name}/sha256": sized["sha256"][held], f"{name}/plain": plain, f"{name}/tta": tta,
                        f"{name}/run": np.array(json.dumps(run))})
        np.savez_compressed(out / "scores.npz", **results)  # one file, rewritten: what is done comes back
        log(f"done {name}: {run['train_seconds']} s, best epoch {run['best_epoch']}/{run['epochs_run']}")


# ----------------------------------------------------------------------------- here: report
def report(scores: Path, splits: str) -> list[dict]:
    """Held-out metrics of every run in train's scores.npz, by scripts/model_study.py's own metrics; appended to RUNS."""
    frame = model_study.all_images(splits).set_index("sha256", drop=False)
    data = np.load(scores)
    rows = []
    for name in sorted({key.split("/")[0] for key in data.files}):
        run = json.loads(str(data[f"{name}/run"]))
        held = frame.loc[data[f"{name}/sha256"]]
        run.update(run_id=f"gpu-{name}", design="cv", name=run["recipe"],
                   held_out=model_study.metrics(held, data[f"{name}/plain"]),
                   held_out_tta=model_study.metrics(held, data[f"{name}/tta"]))
        rows.append(run)
        log(f"{run['run_id']}: ROC-AUC {run['held_out']['roc_auc']:.3f} (flips {run['held_out_tta']['roc_auc']:.3f}), "
            f"{run['train_seconds']} s")
    with open(RESULTS / "gpu_runs.jsonl", "a") as sink:
        for run in rows:
            sink.write(json.dumps(run) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--splits", required=True, help="a pipeline run's split folder (train/val/test CSVs)")
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, nargs="+", required=True, help="packed .npz files, one per image size")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--plan", nargs="+", required=True, help="RECIPE:FOLD:SEED items, in priority order")
    t.add_argument("--deadline", type=float, default=420, help="start no run after this many seconds")
    t.add_argument("--no-throughput", dest="throughput", action="store_false", help="skip the model-call timings")
    r = sub.add_parser("report")
    r.add_argument("--scores", type=Path, required=True)
    r.add_argument("--splits", required=True, help="the split folder the data was packed from")
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.splits, args.size, args.out)
    elif args.command == "train":
        train(args.data, args.out, args.plan, args.deadline, args.throughput)
    else:
        report(args.scores, args.splits)


if __name__ == "__main__":
    main()
