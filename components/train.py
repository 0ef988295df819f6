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
augmentation layers, class weights, the saved model's flip averaging) are in
brainscan/network.py, which never imports TensorFlow; this module adds the tf.data input,
devices and the bundle.

Options a recipe can switch on (all off by default, which is the original recipe): the head crop
(recorded in the bundle so serving applies it too), a cosine schedule, AdamW weight decay,
horizontal flips and mixup, label smoothing, an auxiliary tumor loss (a binary head used in
training only, or a binary cross-entropy on the softmax's own P(tumor)), early stopping on the
validation ROC-AUC of P(tumor), and test-time flip averaging baked into the saved model. The
saved model.keras always has one input (float32 [N, S, S, 3], preprocessed) and one output
(softmax [N, 7]).

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
from brainscan.network import (DROPOUT, FINE_TUNE_FROM, SCRATCH_BN_MOMENTUM, TARGETS, TrainingError,
                                               augmenter,
                                               build_model, class_weights, compile_for_training, export_model,
                                               learning_rate_schedule, make_optimizer, monitored_metric,
                                               recipe_callbacks, set_fine_tuning, target_kind, with_short_names,
                                               with_tumor_head)
from brainscan.config import DEFAULTS, IO_WORKERS, MIN_IMAGE_SIZE, check_recipe
from brainscan.dataset import read_split, splits_fingerprint
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

def train(splits: str, out: str, image_size: int = DEFAULTS.image_size, epochs: int = DEFAULTS.epochs,
          fine_tune_epochs: int = DEFAULTS.fine_tune_epochs, batch_size: int = DEFAULTS.batch_size,
          base_weights: str = DEFAULTS.base_weights, seed: int = DEFAULTS.seed,
          learning_rate: float = DEFAULTS.learning_rate, fine_tune_learning_rate: float | None = None,
          patience: int = DEFAULTS.patience, dropout: float = DROPOUT, bn_momentum: float = SCRATCH_BN_MOMENTUM,
          crop_to_head: bool = DEFAULTS.crop_to_head, lr_schedule: str = DEFAULTS.lr_schedule,
          warmup_epochs: int = DEFAULTS.warmup_epochs, weight_decay: float = DEFAULTS.weight_decay,
          augment_flip: bool = DEFAULTS.augment_flip, mixup: float = DEFAULTS.mixup,
          label_smoothing: float = DEFAULTS.label_smoothing, tumor_aux: str = DEFAULTS.tumor_aux,
          tumor_aux_weight: float = DEFAULTS.tumor_aux_weight, monitor: str = DEFAULTS.monitor,
          tta_flip: bool = DEFAULTS.tta_flip, ema: float = DEFAULTS.ema, precise_bn: bool = DEFAULTS.precise_bn,
          callbacks: list | None = None, deterministic: bool = True, workers: int = IO_WORKERS) -> TrainResult:
    """Train on {splits}/train.csv with {splits}/val.csv for early stopping; write the bundle to out.

    The recipe options (brainscan.config.PipelineParams has a line on each; the defaults are the
    original recipe) are built by brainscan/network.py. crop_to_head: preprocessing crops
    to the head (recorded in the bundle). lr_schedule "cosine": stage 1 decays from learning_rate
    to 0 over `epochs` epochs after `warmup_epochs` of linear warm-up (one stage: fine_tune_epochs
    must be 0). weight_decay > 0: AdamW. augment_flip: random left-right flips. mixup: Beta alpha
    (0 = off). tumor_aux "head": a sigmoid tumor head beside the softmax, trained with weight
    tumor_aux_weight and dropped from the saved model; "softmax": that weight times the binary
    cross-entropy of the softmax's P(tumor). monitor: what early stopping and the best checkpoint
    follow ("val_loss", or "val_tumor_auc", the validation ROC-AUC of P(tumor)). tta_flip: the
    saved model averages its softmax over the image and its mirror image. ema: an exponential
    moving average of the weights with this momentum (0 = off) for validation, checkpoints and
    the saved model. precise_bn: before every validation the BatchNorm statistics are recomputed
    over the un-augmented training images (from scratch only).
    callbacks: extra Keras callbacks for every fit (e.g. a study's per-epoch measurements).
    """
    started = time.monotonic()
    if epochs < 1 or fine_tune_epochs < 0 or batch_size < 1:
        raise ValueError("epochs must be >= 1, fine-tune epochs >= 0 and batch size >= 1")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size {image_size} is too small: Xception needs at least {MIN_IMAGE_SIZE}")
    check_recipe(epochs=epochs, fine_tune_epochs=fine_tune_epochs, lr_schedule=lr_schedule,
                 warmup_epochs=warmup_epochs, weight_decay=weight_decay, mixup=mixup,
                 label_smoothing=label_smoothing, tumor_aux=tumor_aux, monitor=monitor, ema=ema)
    base_weights = str(base_weights or "none")
    from_scratch = base_weights == "none"
    # Pretrained: the head learns first, then the top of the base at 1/100 the rate.
    # From scratch: all of it learns from the start, then the whole network again at 1/10.
    if fine_tune_learning_rate is None:
        fine_tune_learning_rate = learning_rate / (10 if from_scratch else 100)
    targets = target_kind(mixup, label_smoothing, tumor_aux)
    monitored, mode = monitored_metric(monitor, targets)

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
    steps_per_epoch = -(-len(train_frame) // batch_size)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train_data = make_dataset(train_bytes, train_labels, image_size, batch_size, True, seed, tmp,
                                      crop_to_head=crop_to_head, flip=augment_flip, mixup=mixup,
                                      sample_weights=None if targets == "sparse" else weights, targets=targets)
            val_data = make_dataset(val_bytes, val_labels, image_size, batch_size, False, seed, tmp,
                                    crop_to_head=crop_to_head, targets=targets)
            # the training images as validation sees them (no augmentation), in larger batches
            calibration_data = make_dataset(train_bytes, train_labels, image_size, max(batch_size, 64), False, seed,
                                            tmp, crop_to_head=crop_to_head, cache_name="calibration") \
                if precise_bn and from_scratch else None
            with strategy.scope():
                model, base = build_model(image_size, fetch_base_weights(base_weights, tmp), dropout, bn_momentum)
                base.trainable = from_scratch  # a frozen random base learns nothing
                fit_model = with_tumor_head(model) if targets == "head" else model
                rate = learning_rate_schedule(learning_rate, lr_schedule, epochs, warmup_epochs, steps_per_epoch)
                compile_for_training(fit_model, make_optimizer(rate, weight_decay, ema), targets, tumor_aux,
                                     tumor_aux_weight, label_smoothing)
            best_path = str(Path(tmp) / "best.weights.h5")
            # One checkpoint callback for both stages: its `best` carries over between fit calls.
            checkpoint = keras.callbacks.ModelCheckpoint(best_path, monitor=monitored, mode=mode,
                                                         save_best_only=True, save_weights_only=True, verbose=0)

            def run_stage(stage: str, stage_epochs: int):
                offset = len(history.get("loss", []))
                stopper = keras.callbacks.EarlyStopping(monitor=monitored, mode=mode, patience=patience)
                # EMA weights / precise BatchNorm statistics are in place before validation and the checkpoint.
                fitted = fit_model.fit(train_data, validation_data=val_data, epochs=stage_epochs,
                                       class_weight=weights if targets == "sparse" else None, verbose=0,
                                       shuffle=False,
                                       callbacks=recipe_callbacks(model, ema, calibration_data)
                                       + [checkpoint, stopper, _EpochLog.make(stage, stage_epochs, offset)]
                                       + list(callbacks or []))
                for key, values in with_short_names(fitted.history).items():
                    history.setdefault(key, []).extend(float(v) for v in values)

            _log(f"stage 1: {'whole network from scratch' if from_scratch else 'head, base frozen'}, "
                 f"lr {learning_rate} ({lr_schedule}), up to {epochs} epochs")
            run_stage("stage 1", epochs)
            if fine_tune_epochs:
                stage2_start = len(history["loss"]) + 1
                fit_model.load_weights(best_path)  # fine-tune from the best point, not the last
                if from_scratch:
                    # Same trainable set: only the rate drops, so the traced train step is reused
                    # (a recompile costs minutes of retracing on CPU).
                    fit_model.optimizer.learning_rate.assign(fine_tune_learning_rate)
                else:
                    with strategy.scope():
                        unfrozen = set_fine_tuning(base)
                        _log(f"stage 2: fine-tuning {unfrozen} base layers from {FINE_TUNE_FROM} on")
                        compile_for_training(fit_model, make_optimizer(fine_tune_learning_rate, weight_decay, ema),
                                             targets, tumor_aux, tumor_aux_weight, label_smoothing)
                _log(f"stage 2: lr {fine_tune_learning_rate}, up to {fine_tune_epochs} epochs")
                run_stage("stage 2", fine_tune_epochs)
            fit_model.load_weights(best_path)
            # The saved model: the softmax alone, uncompiled (no training-only loss or head in it).
            export = export_model(model, image_size, tta_flip)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    scores = np.asarray(history[monitor], dtype=np.float64)
    best_index = int(np.argmin(scores) if mode == "min" else np.argmax(scores))
    seconds = time.monotonic() - started
    history_doc = {"history": history, "stage2_start_epoch": stage2_start, "best_epoch": best_index + 1,
                   "monitor": monitor}
    metadata = {
        "base_weights": base_weights, "seed": seed, "epochs": epochs, "fine_tune_epochs": fine_tune_epochs,
        "batch_size": batch_size, "learning_rate": learning_rate, "patience": patience,
        "bn_momentum": bn_momentum if from_scratch else None,
        "fine_tune_learning_rate": fine_tune_learning_rate, "splits": splits,
        "dataset_fingerprint": splits_fingerprint(splits), "train_images": len(train_frame),
        "val_images": len(val_frame), "best_epoch": best_index + 1,
        "best_val_loss": history["val_loss"][best_index], "best_val_accuracy": history["val_accuracy"][best_index],
        "best_val_tumor_auc": (history.get("val_tumor_auc") or [None] * (best_index + 1))[best_index],
        "dropout": dropout, "lr_schedule": lr_schedule, "warmup_epochs": warmup_epochs,
        "weight_decay": weight_decay, "augment_flip": augment_flip, "mixup": mixup,
        "label_smoothing": label_smoothing, "tumor_aux": tumor_aux,
        "tumor_aux_weight": tumor_aux_weight if tumor_aux != "none" else None, "monitor": monitor,
        "tta_flip": tta_flip, "ema": ema, "precise_bn": bool(precise_bn and from_scratch),
        METADATA_CROP_KEY: bool(crop_to_head),
        "preprocessing": "brainscan.preprocessing.preprocess_image (RGB, "
                         + ("crop to the head, aspect-preserving " if crop_to_head else "")
                         + "bilinear resize, xception preprocess_input)",
        "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    modelstore.save_bundle(export, out, image_size, extra_metadata=metadata)
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
    _log(f"best epoch {result.best_epoch} (by {monitor}): val_loss {result.best_val_loss:.4f}, "
         f"val_acc {result.best_val_accuracy:.3f}; bundle at {out} ({seconds:.0f}s)")
    return result
