"""Train: Xception transfer learning on the split manifests, written out as a model bundle.

    {splits}/train.csv, {splits}/val.csv  (columns `path` = image URI, `class7`)
      -> tf.data (bytes read in parallel from S3 or disk, brainscan.preprocessing, cache, prefetch,
         augmentation on train only)
      -> Xception base + global average pooling + dropout + softmax(7)
         stage 1: head only, base frozen (pretrained weights) / whole network (from scratch)
         stage 2: fine-tune the top of the base at a low learning rate
      -> {out}/model.keras, brainscan_model.json, history.json, training_curves.png

The test split is never read here. Early stopping and the best checkpoint use validation only.
"""

from __future__ import annotations

import datetime as dt
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from brainscan import modelstore, storage
from brainscan.config import DEFAULTS, IO_WORKERS, MIN_IMAGE_SIZE
from brainscan.dataset import read_split, splits_fingerprint
from brainscan.labels import CLASS_INDEX, CLASSES
from brainscan.preprocessing import InvalidImageError, check_image_bytes, preprocess_image

# Fine-tuning unfreezes the base from this block on (the exit flow and the last middle block).
FINE_TUNE_FROM = "block13"
# From scratch on a few hundred images an epoch is only ~20 steps: BatchNorm's default
# momentum (0.99) leaves the moving statistics far behind and validation scores at chance.
SCRATCH_BN_MOMENTUM = 0.9
# Above this the preprocessed images are cached in a temporary file instead of in memory.
MEMORY_CACHE_LIMIT = 4 * 1024**3


class TrainingError(RuntimeError):
    """A training run that cannot start or finish; the message says why and what to do."""


@dataclass
class TrainResult:
    out: str
    image_size: int
    base_weights: str
    seed: int
    train_images: int
    val_images: int
    epochs_run: int  # both stages together
    best_epoch: int  # 1-based, counted over both stages
    best_val_loss: float
    best_val_accuracy: float
    class_weights: dict[str, float]
    seconds: float
    history_uri: str
    curves_uri: str
    history: dict = field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("history")
        return out


def _log(message: str) -> None:
    print(f"train: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data

def read_images(paths: list[str], workers: int = IO_WORKERS, desc: str = "read") -> list[bytes]:
    """The bytes of every image, read in parallel (S3 latency, not bandwidth, is the limit).

    Every file is checked to decode: a bad one stops training with its URI, before any epoch.
    """
    def read_one(path: str) -> bytes:
        data = storage.read_bytes(path)
        try:
            check_image_bytes(data)
        except InvalidImageError as err:
            raise TrainingError(f"{path}: {err.reason}") from None
        return data

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(read_one, paths), total=len(paths), desc=desc, unit="img",
                         file=sys.stderr, disable=len(paths) < 50, mininterval=2))


def augmenter(seed: int):
    """Random rotation (~10 degrees), brightness, small zoom and shift; training data only."""
    return keras.Sequential([
        keras.layers.RandomRotation(10 / 360, fill_mode="nearest", seed=seed),
        keras.layers.RandomZoom(0.1, fill_mode="nearest", seed=seed + 1),
        keras.layers.RandomTranslation(0.05, 0.05, fill_mode="nearest", seed=seed + 2),
        # images are already in Xception's [-1, 1]
        keras.layers.RandomBrightness(0.1, value_range=(-1.0, 1.0), seed=seed + 3),
    ], name="augmentation")


def make_dataset(images: list[bytes], labels: np.ndarray, image_size: int, batch_size: int,
                 training: bool, seed: int = DEFAULTS.seed, cache_dir: str | None = None):
    """A batched tf.data pipeline of (preprocessed image, label).

    Decoding happens once (cache); shuffling and augmentation per epoch for training only.
    """
    data = tf.data.Dataset.from_tensor_slices((tf.constant(images, dtype=tf.string),
                                               tf.constant(labels, dtype=tf.int32)))
    data = data.map(lambda raw, label: (preprocess_image(raw, image_size), label),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    cache_bytes = len(images) * image_size * image_size * 3 * 4
    if cache_dir and cache_bytes > MEMORY_CACHE_LIMIT:
        data = data.cache(str(Path(cache_dir) / ("train" if training else "val")))
    else:
        data = data.cache()
    if training:
        data = data.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size)
    if training:
        augment = augmenter(seed)
        data = data.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
    return data.prefetch(tf.data.AUTOTUNE)


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """'Balanced' weights n / (k * count); a class absent from train gets 1.0."""
    counts = np.bincount(labels, minlength=len(CLASSES))
    present = int((counts > 0).sum())
    return {i: (len(labels) / (present * c) if c else 1.0) for i, c in enumerate(counts.tolist())}


# --------------------------------------------------------------------------- model

def _local_weights_file(base_weights: str, tmp: str) -> str:
    if storage.is_s3(base_weights):
        if not storage.exists(base_weights):
            raise TrainingError(f"base weights {base_weights}: no such object")
        local = Path(tmp) / Path(storage.parse_s3(base_weights)[1]).name  # keep the .h5 suffix Keras needs
        local.write_bytes(storage.read_bytes(base_weights))
        return str(local)
    if not Path(base_weights).is_file():
        raise TrainingError(f"base weights {base_weights!r}: no such file (use 'imagenet', 'none' "
                            "or a path / s3:// URI of an Xception .h5 weights file)")
    return base_weights


def build_model(image_size: int, base_weights: str = "imagenet", dropout: float = 0.3,
                bn_momentum: float = SCRATCH_BN_MOMENTUM):
    """Xception base + GAP + dropout + dense softmax(7); returns (model, base)."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size {image_size} is too small: Xception needs at least {MIN_IMAGE_SIZE}")
    from_scratch = base_weights in ("none", None, "")
    with tempfile.TemporaryDirectory() as tmp:
        if from_scratch:
            weights = None
        elif base_weights == "imagenet":
            weights = "imagenet"
        else:
            weights = _local_weights_file(str(base_weights), tmp)
        try:
            base = keras.applications.Xception(include_top=False, weights=weights,
                                               input_shape=(image_size, image_size, 3))
        except Exception as err:  # download failures surface as many exception types
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            if weights == "imagenet":
                raise TrainingError(f"cannot get the ImageNet weights for Xception ({first}); without network "
                                    "use --base-weights none or a weights file (path or s3:// URI)") from None
            raise TrainingError(f"cannot load base weights {base_weights}: {first}") from None
    if from_scratch:
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    inputs = keras.Input((image_size, image_size, 3), name="image")
    features = base(inputs)
    features = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    features = keras.layers.Dropout(dropout, name="dropout")(features)
    # float32 softmax even under mixed precision: float16 probabilities lose the small tail
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax", dtype="float32", name="probabilities")(features)
    return keras.Model(inputs, outputs, name="brainscan_xception"), base


def set_fine_tuning(base, from_block: str = FINE_TUNE_FROM) -> int:
    """Unfreeze the base from `from_block` on; BatchNorm stays frozen (inference mode). Returns trainable layers."""
    base.trainable = True
    unfrozen, reached = 0, False
    for layer in base.layers:
        reached = reached or layer.name.startswith(from_block)
        layer.trainable = reached and not isinstance(layer, keras.layers.BatchNormalization)
        unfrozen += int(layer.trainable)
    return unfrozen


# --------------------------------------------------------------------------- outputs

def plot_curves(history: dict, stage2_start: int | None, best_epoch: int) -> bytes:
    """PNG of loss and accuracy, train vs validation, over both stages."""
    # pyplot needs its headless backend chosen before the import; only when a chart is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy (7 classes)")):
        ax.plot(epochs, history[metric], "o-", label="train")
        ax.plot(epochs, history[f"val_{metric}"], "o-", label="validation")
        if stage2_start:
            ax.axvline(stage2_start - 0.5, color="grey", linestyle="--", label="fine-tuning starts")
        ax.axvline(best_epoch, color="green", linestyle=":", label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("brainscan training curves")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


class _EpochLog:
    """Keras callback factory: one progress line per epoch on stderr."""

    @staticmethod
    def make(stage: str, epochs: int, offset: int):
        class EpochLog(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.monotonic()

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                _log(f"{stage} epoch {epoch + 1}/{epochs} (overall {offset + epoch + 1}): "
                     f"loss {logs.get('loss', float('nan')):.4f} acc {logs.get('accuracy', float('nan')):.3f} "
                     f"val_loss {logs.get('val_loss', float('nan')):.4f} "
                     f"val_acc {logs.get('val_accuracy', float('nan')):.3f} "
                     f"({time.monotonic() - self.started:.1f}s)")

        return EpochLog()


# --------------------------------------------------------------------------- train

def train(splits: str, out: str, image_size: int = DEFAULTS.image_size, epochs: int = DEFAULTS.epochs,
          fine_tune_epochs: int = DEFAULTS.fine_tune_epochs, batch_size: int = DEFAULTS.batch_size,
          base_weights: str = DEFAULTS.base_weights, seed: int = DEFAULTS.seed,
          learning_rate: float = DEFAULTS.learning_rate, fine_tune_learning_rate: float | None = None,
          patience: int = DEFAULTS.patience, dropout: float = 0.3, bn_momentum: float = SCRATCH_BN_MOMENTUM,
          deterministic: bool = True,
          workers: int = IO_WORKERS) -> TrainResult:
    """Train on {splits}/train.csv with {splits}/val.csv for early stopping; write the bundle to out."""
    started = time.monotonic()
    if epochs < 1 or fine_tune_epochs < 0 or batch_size < 1:
        raise ValueError("epochs must be >= 1, fine-tune epochs >= 0 and batch size >= 1")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size {image_size} is too small: Xception needs at least {MIN_IMAGE_SIZE}")
    base_weights = str(base_weights or "none")
    from_scratch = base_weights == "none"
    # Pretrained: the head learns first, then the top of the base at 1/100 the rate.
    # From scratch: all of it learns from the start, then the whole network again at 1/10.
    if fine_tune_learning_rate is None:
        fine_tune_learning_rate = learning_rate / (10 if from_scratch else 100)

    keras.utils.set_random_seed(seed)
    if deterministic:
        try:
            tf.config.experimental.enable_op_determinism()
        except Exception as err:  # older TF or an unsupported device: train anyway
            _log(f"op determinism not available ({err}); results may vary slightly")

    train_frame, val_frame = (read_split(splits, name)[["path", "class7"]] for name in ("train", "val"))
    train_labels = train_frame["class7"].map(CLASS_INDEX).to_numpy(np.int32)
    val_labels = val_frame["class7"].map(CLASS_INDEX).to_numpy(np.int32)
    _log(f"{len(train_frame)} training and {len(val_frame)} validation images from {splits}")
    train_bytes = read_images(train_frame["path"].tolist(), workers, "read train")
    val_bytes = read_images(val_frame["path"].tolist(), workers, "read val")
    weights = class_weights(train_labels)

    gpus = tf.config.list_physical_devices("GPU")
    previous_policy = keras.mixed_precision.global_policy()
    if gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
        strategy = tf.distribute.MirroredStrategy()
        _log(f"{len(gpus)} GPU(s): mixed precision, MirroredStrategy with {strategy.num_replicas_in_sync} replica(s)")
    else:
        strategy = tf.distribute.get_strategy()
        _log("no GPU: training on CPU")

    history: dict[str, list[float]] = {}
    stage2_start = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train_data = make_dataset(train_bytes, train_labels, image_size, batch_size, True, seed, tmp)
            val_data = make_dataset(val_bytes, val_labels, image_size, batch_size, False, seed, tmp)
            with strategy.scope():
                model, base = build_model(image_size, base_weights, dropout, bn_momentum)
                base.trainable = from_scratch  # a frozen random base learns nothing
                model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                              loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            best_path = str(Path(tmp) / "best.weights.h5")
            # One checkpoint callback for both stages: its `best` carries over between fit calls.
            checkpoint = keras.callbacks.ModelCheckpoint(best_path, monitor="val_loss", save_best_only=True,
                                                         save_weights_only=True, verbose=0)

            def run_stage(stage: str, stage_epochs: int):
                offset = len(history.get("loss", []))
                stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience)
                fitted = model.fit(train_data, validation_data=val_data, epochs=stage_epochs,
                                   class_weight=weights, verbose=0, shuffle=False,
                                   callbacks=[checkpoint, stopper, _EpochLog.make(stage, stage_epochs, offset)])
                for key, values in fitted.history.items():
                    history.setdefault(key, []).extend(float(v) for v in values)

            _log(f"stage 1: {'whole network from scratch' if from_scratch else 'head, base frozen'}, "
                 f"lr {learning_rate}, up to {epochs} epochs")
            run_stage("stage 1", epochs)
            if fine_tune_epochs:
                stage2_start = len(history["loss"]) + 1
                model.load_weights(best_path)  # fine-tune from the best point, not the last
                if from_scratch:
                    # Same trainable set: only the rate drops, so the traced train step is reused
                    # (a recompile costs minutes of retracing on CPU).
                    model.optimizer.learning_rate.assign(fine_tune_learning_rate)
                else:
                    with strategy.scope():
                        unfrozen = set_fine_tuning(base)
                        _log(f"stage 2: fine-tuning {unfrozen} base layers from {FINE_TUNE_FROM} on")
                        model.compile(optimizer=keras.optimizers.Adam(fine_tune_learning_rate),
                                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
                _log(f"stage 2: lr {fine_tune_learning_rate}, up to {fine_tune_epochs} epochs")
                run_stage("stage 2", fine_tune_epochs)
            model.load_weights(best_path)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    best_index = int(np.argmin(history["val_loss"]))
    seconds = time.monotonic() - started
    history_doc = {"history": history, "stage2_start_epoch": stage2_start, "best_epoch": best_index + 1,
                   "monitor": "val_loss"}
    metadata = {
        "base_weights": base_weights, "seed": seed, "epochs": epochs, "fine_tune_epochs": fine_tune_epochs,
        "batch_size": batch_size, "learning_rate": learning_rate, "patience": patience,
        "bn_momentum": bn_momentum if from_scratch else None,
        "fine_tune_learning_rate": fine_tune_learning_rate, "splits": splits,
        "dataset_fingerprint": splits_fingerprint(splits), "train_images": len(train_frame),
        "val_images": len(val_frame), "best_epoch": best_index + 1,
        "best_val_loss": history["val_loss"][best_index], "best_val_accuracy": history["val_accuracy"][best_index],
        "preprocessing": "brainscan.preprocessing.preprocess_image (RGB, bilinear resize, xception preprocess_input)",
        "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    modelstore.save_bundle(model, out, image_size, extra_metadata=metadata)
    history_uri = storage.write_json(storage.join(out, "history.json"), history_doc)
    curves_uri = storage.write_bytes(storage.join(out, "training_curves.png"),
                                     plot_curves(history, stage2_start, best_index + 1), "image/png")
    result = TrainResult(
        out=str(out), image_size=image_size, base_weights=base_weights, seed=seed,
        train_images=len(train_frame), val_images=len(val_frame), epochs_run=len(history["loss"]),
        best_epoch=best_index + 1, best_val_loss=history["val_loss"][best_index],
        best_val_accuracy=history["val_accuracy"][best_index],
        class_weights={CLASSES[i]: round(w, 4) for i, w in weights.items()}, seconds=round(seconds, 1),
        history_uri=history_uri, curves_uri=curves_uri, history=history,
    )
    _log(f"best epoch {result.best_epoch}: val_loss {result.best_val_loss:.4f}, "
         f"val_acc {result.best_val_accuracy:.3f}; bundle at {out} ({seconds:.0f}s)")
    return result
