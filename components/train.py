"""Train: Xception transfer learning on the split manifests, written out as a model bundle.

    {splits}/train.csv, {splits}/val.csv  (columns `path` = image URI, `class7`)
      -> tf.data (bytes read in parallel from S3 or disk, brainscan.preprocessing [optionally
         cropped to the head], cache, prefetch, augmentation [and mixup] on train only)
      -> Xception base + global average pooling + dropout + softmax(7)
         stage 1: head only, base frozen (pretrained weights) / whole network (from scratch),
                  at a constant learning rate or on a cosine schedule (one stage)
         stage 2: fine-tune the top of the base at a low learning rate
      -> {out}/model.keras, brainscan_model.json, history.json, training_curves.png

The network and the recipe's Keras pieces (model, optimizer, schedule, losses, metrics,
augmentation layers, class weights, the two fit stages, the saved model's flip averaging) are in
brainscan/network.py, which never imports TensorFlow; this module adds the tf.data input,
devices and the bundle: train() = load_data, fit (the stages on this machine's devices),
bundle_metadata.

Options a recipe (brainscan.config.Recipe) can switch on (all off by default, which is the
original recipe): the head crop
(recorded in the bundle so serving applies it too), a cosine schedule, AdamW weight decay,
horizontal flips and mixup, label smoothing, an auxiliary tumor loss (a binary head used in
training only, or a binary cross-entropy on the softmax's own P(tumor)), early stopping on the
validation ROC-AUC of P(tumor), and test-time flip averaging baked into the saved model. The
saved model.keras always has one input (float32 [N, S, S, 3], preprocessed) and one output
(softmax [N, 7]).

The test split is never read here. Early stopping and the best checkpoint use validation only.
"""

from __future__ import annotations

import contextlib
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
from brainscan.config import DEFAULTS, IO_WORKERS, Recipe
from brainscan.network import (DROPOUT, SCRATCH_BN_MOMENTUM, TARGETS, Fitted, TrainingError, augmenter,
                               class_weights, export_model, fit_stages, target_kind, training_model,
                               with_short_names)
from brainscan.dataset import read_split, splits_data_uri, splits_fingerprint
from brainscan.labels import CLASS_INDEX, CLASSES, HEALTHY_INDICES
from brainscan.preprocessing import METADATA_CROP_KEY, InvalidImageError, check_image_bytes, preprocess_image

# Above this the preprocessed images are cached in a temporary file instead of in memory.
MEMORY_CACHE_LIMIT = 4 * 1024**3


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


def make_dataset(images: list[bytes], labels: np.ndarray, image_size: int, batch_size: int,
                 training: bool, seed: int = DEFAULTS.seed, cache_dir: str | None = None,
                 crop_to_head: bool = False, flip: bool = False, mixup: float = 0.0,
                 sample_weights: dict[int, float] | None = None, targets: str = "sparse",
                 cache_name: str | None = None):
    """A batched tf.data pipeline of (preprocessed image, label[, sample weight]).

    Decoding happens once (cache); shuffling and augmentation per epoch for training only.
    targets: "sparse" (class index), "onehot" (float [7]; mixup mixes it) or "head" (a dict:
    "probabilities" one-hot and "tumor" its P(tumor), for the auxiliary binary head).
    sample_weights (per class) are yielded as a third element (mixed along with the images).
    Mixup (Beta(mixup, mixup) per image, partner from the same batch) on training data only.
    """
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    if (mixup or sample_weights) and targets == "sparse":
        raise ValueError("mixup and per-sample weights need one-hot targets")
    data = tf.data.Dataset.from_tensor_slices((tf.constant(images, dtype=tf.string),
                                               tf.constant(labels, dtype=tf.int32)))
    data = data.map(lambda raw, label: (preprocess_image(raw, image_size, crop_to_head), label),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    cache_bytes = len(images) * image_size * image_size * 3 * 4
    if cache_dir and cache_bytes > MEMORY_CACHE_LIMIT:
        data = data.cache(str(Path(cache_dir) / (cache_name or ("train" if training else "val"))))
    else:
        data = data.cache()
    if training:
        data = data.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size)
    if training:
        augment = augmenter(seed, flip)
        data = data.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
    if targets == "sparse":
        return data.prefetch(tf.data.AUTOTUNE)

    class_weight = tf.constant([(sample_weights or {}).get(i, 1.0) for i in range(len(CLASSES))], tf.float32)
    healthy = tf.constant([1.0 if i in HEALTHY_INDICES else 0.0 for i in range(len(CLASSES))], tf.float32)
    generator = tf.random.Generator.from_seed(seed + 5)

    def to_targets(x, label):
        y = tf.one_hot(label, len(CLASSES), dtype=tf.float32)
        w = tf.gather(class_weight, label)
        if training and mixup:
            n = tf.shape(x)[0]
            # lam ~ Beta(mixup, mixup), as the ratio of two gamma draws
            g1 = tf.random.stateless_gamma([n], seed=generator.uniform_full_int([2], dtype=tf.int32), alpha=mixup)
            g2 = tf.random.stateless_gamma([n], seed=generator.uniform_full_int([2], dtype=tf.int32), alpha=mixup)
            lam = g1 / (g1 + g2 + 1e-12)
            partner = tf.argsort(generator.uniform([n]))
            x = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * tf.gather(x, partner)
            y = lam[:, None] * y + (1 - lam[:, None]) * tf.gather(y, partner)
            w = lam * w + (1 - lam) * tf.gather(w, partner)
        if targets == "head":
            y = {"probabilities": y, "tumor": 1.0 - tf.reduce_sum(y * healthy, axis=-1, keepdims=True)}
        return (x, y, w) if sample_weights is not None else (x, y)

    # One call at a time: the mixup generator's draws then follow the batch order (reproducible).
    data = data.map(to_targets, num_parallel_calls=None)
    return data.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- model

def fetch_base_weights(base_weights: str, tmp: str) -> str:
    """An s3:// weights file copied to tmp (architecture.build_model reads local files); anything else as given."""
    if not storage.is_s3(base_weights):
        return base_weights
    if not storage.exists(base_weights):
        raise TrainingError(f"base weights {base_weights}: no such object")
    local = Path(tmp) / Path(storage.parse_s3(base_weights)[1]).name  # keep the .h5 suffix Keras needs
    local.write_bytes(storage.read_bytes(base_weights))
    return str(local)


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
                logs = with_short_names(logs or {})
                auc = logs.get("val_tumor_auc")
                _log(f"{stage} epoch {epoch + 1}/{epochs} (overall {offset + epoch + 1}): "
                     f"loss {logs.get('loss', float('nan')):.4f} acc {logs.get('accuracy', float('nan')):.3f} "
                     f"val_loss {logs.get('val_loss', float('nan')):.4f} "
                     f"val_acc {logs.get('val_accuracy', float('nan')):.3f} "
                     + (f"val_tumor_auc {auc:.4f} " if auc is not None else "")
                     + f"({time.monotonic() - self.started:.1f}s)")

        return EpochLog()


# --------------------------------------------------------------------------- train

@dataclass
class TrainingData:
    """The train and val splits in memory: each image's bytes and class index, and the class weights."""

    train_images: list[bytes]
    train_labels: np.ndarray
    val_images: list[bytes]
    val_labels: np.ndarray
    class_weights: dict[int, float]


def load_data(splits: str, workers: int = IO_WORKERS) -> TrainingData:
    """{splits}/train.csv and val.csv read in (every image checked to decode); the test split is never read."""
    train_frame, val_frame = (read_split(splits, name)[["path", "class7"]] for name in ("train", "val"))
    train_labels = train_frame["class7"].map(CLASS_INDEX).to_numpy(np.int32)
    val_labels = val_frame["class7"].map(CLASS_INDEX).to_numpy(np.int32)
    _log(f"{len(train_frame)} training and {len(val_frame)} validation images from {splits}")
    train_images = read_images(train_frame["path"].tolist(), workers, "read train")
    val_images = read_images(val_frame["path"].tolist(), workers, "read val")
    return TrainingData(train_images, train_labels, val_images, val_labels, class_weights(train_labels))


@contextlib.contextmanager
def device_strategy():
    """The tf.distribute strategy over this machine's GPUs (mixed precision while it lasts), or the CPU."""
    gpus = tf.config.list_physical_devices("GPU")
    previous_policy = keras.mixed_precision.global_policy()
    if gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
        strategy = tf.distribute.MirroredStrategy()
        _log(f"{len(gpus)} GPU(s): mixed precision, MirroredStrategy with {strategy.num_replicas_in_sync} replica(s)")
    else:
        strategy = tf.distribute.get_strategy()
        _log("no GPU: training on CPU")
    try:
        yield strategy
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def fit(data: TrainingData, recipe: Recipe, *, dropout: float, bn_momentum: float, fine_tune_learning_rate: float,
        callbacks: list) -> tuple[Fitted, keras.Model]:
    """The recipe's fit stages (brainscan.network.fit_stages) on tf.data input; returns them and the model to save."""
    targets = target_kind(recipe.mixup, recipe.label_smoothing, recipe.tumor_aux)
    weights = data.class_weights
    with device_strategy() as strategy, tempfile.TemporaryDirectory() as tmp:
        train_data = make_dataset(data.train_images, data.train_labels, recipe.image_size, recipe.batch_size, True,
                                  recipe.seed, tmp, crop_to_head=recipe.crop_to_head, flip=recipe.augment_flip,
                                  mixup=recipe.mixup, sample_weights=None if targets == "sparse" else weights,
                                  targets=targets)
        val_data = make_dataset(data.val_images, data.val_labels, recipe.image_size, recipe.batch_size, False,
                                recipe.seed, tmp, crop_to_head=recipe.crop_to_head, targets=targets)
        # the training images as validation sees them (no augmentation), in larger batches
        calibration_data = make_dataset(data.train_images, data.train_labels, recipe.image_size,
                                        max(recipe.batch_size, 64), False, recipe.seed, tmp,
                                        crop_to_head=recipe.crop_to_head, cache_name="calibration") \
            if recipe.precise_bn and recipe.from_scratch else None
        steps_per_epoch = -(-len(data.train_labels) // recipe.batch_size)
        with strategy.scope():
            training = training_model(recipe, fetch_base_weights(recipe.base_weights, tmp), steps_per_epoch,
                                      dropout, bn_momentum)
        fitted = fit_stages(training, recipe, train_data, val_data, str(Path(tmp) / "best.weights.h5"),
                            fine_tune_learning_rate=fine_tune_learning_rate,
                            class_weight=weights if targets == "sparse" else None, calibration_data=calibration_data,
                            callbacks=callbacks, epoch_log=_EpochLog.make, scope=strategy.scope, log=_log,
                            verbose=0, shuffle=False)
        # The saved model: the softmax alone, uncompiled (no training-only loss or head in it).
        return fitted, export_model(training.model, recipe.image_size, recipe.tta_flip)


def bundle_metadata(recipe: Recipe, splits: str, data: TrainingData, fitted: Fitted, *, dropout: float,
                    bn_momentum: float, fine_tune_learning_rate: float) -> dict:
    """What the bundle records of a training: the recipe, the network's settings, the data, the best epoch."""
    return {
        **recipe.metadata(), "dropout": dropout, "bn_momentum": bn_momentum if recipe.from_scratch else None,
        "fine_tune_learning_rate": fine_tune_learning_rate, "splits": splits,
        "dataset_fingerprint": splits_fingerprint(splits), "data_uri": splits_data_uri(splits),
        "train_images": len(data.train_labels),
        "val_images": len(data.val_labels), "best_epoch": fitted.best_epoch,
        "best_val_loss": fitted.at_best("val_loss"), "best_val_accuracy": fitted.at_best("val_accuracy"),
        "best_val_tumor_auc": fitted.at_best("val_tumor_auc"),
        METADATA_CROP_KEY: bool(recipe.crop_to_head),  # where evaluation and serving read the crop from
        "preprocessing": "brainscan.preprocessing.preprocess_image (RGB, "
                         + ("crop to the head, aspect-preserving " if recipe.crop_to_head else "")
                         + "bilinear resize, xception preprocess_input)",
        "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def train(splits: str, out: str, recipe: Recipe | None = None, *, dropout: float = DROPOUT,
          bn_momentum: float = SCRATCH_BN_MOMENTUM, fine_tune_learning_rate: float | None = None,
          callbacks: list | None = None, deterministic: bool = True, workers: int = IO_WORKERS,
          **recipe_options) -> TrainResult:
    """Train on {splits}/train.csv with {splits}/val.csv for early stopping; write the bundle to out.

    recipe: a brainscan.config.Recipe (its fields have a line each; the defaults are the original
    recipe), changed by any of its fields given as keywords (`train(splits, out, epochs=3)`).
    dropout, bn_momentum (BatchNorm from scratch): the network's settings. fine_tune_learning_rate:
    stage 2's rate (default: recipe.fine_tune_learning_rate()). callbacks: extra Keras callbacks for
    every fit (e.g. a study's per-epoch measurements).
    """
    started = time.monotonic()
    recipe = (recipe or Recipe()).replace(**recipe_options)  # checked: Recipe refuses what does not fit
    if fine_tune_learning_rate is None:
        fine_tune_learning_rate = recipe.fine_tune_learning_rate()
    keras.utils.set_random_seed(recipe.seed)
    if deterministic:
        try:
            tf.config.experimental.enable_op_determinism()
        except Exception as err:  # older TF or an unsupported device: train anyway
            _log(f"op determinism not available ({err}); results may vary slightly")

    data = load_data(splits, workers)
    fitted, export = fit(data, recipe, dropout=dropout, bn_momentum=bn_momentum,
                         fine_tune_learning_rate=fine_tune_learning_rate, callbacks=list(callbacks or []))
    seconds = time.monotonic() - started
    metadata = bundle_metadata(recipe, splits, data, fitted, dropout=dropout, bn_momentum=bn_momentum,
                               fine_tune_learning_rate=fine_tune_learning_rate)
    modelstore.save_bundle(export, out, recipe.image_size, extra_metadata=metadata)
    history_uri = storage.write_json(storage.join(out, "history.json"), {
        "history": fitted.history, "stage2_start_epoch": fitted.stage2_start, "best_epoch": fitted.best_epoch,
        "monitor": recipe.monitor})
    curves_uri = storage.write_bytes(storage.join(out, "training_curves.png"),
                                     plot_curves(fitted.history, fitted.stage2_start, fitted.best_epoch), "image/png")
    result = TrainResult(
        out=str(out), image_size=recipe.image_size, base_weights=recipe.base_weights, seed=recipe.seed,
        train_images=len(data.train_labels), val_images=len(data.val_labels),
        epochs_run=len(fitted.history["loss"]), best_epoch=fitted.best_epoch,
        best_val_loss=fitted.at_best("val_loss"), best_val_accuracy=fitted.at_best("val_accuracy"),
        class_weights={CLASSES[i]: round(w, 4) for i, w in data.class_weights.items()}, seconds=round(seconds, 1),
        history_uri=history_uri, curves_uri=curves_uri, history=fitted.history,
    )
    _log(f"best epoch {result.best_epoch} (by {recipe.monitor}): val_loss {result.best_val_loss:.4f}, "
         f"val_acc {result.best_val_accuracy:.3f}; bundle at {out} ({seconds:.0f}s)")
    return result
