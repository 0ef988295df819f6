"""The model and its training recipe in Keras alone: what train() builds, compiles, augments with and saves.

Keras, numpy and brainscan's standard-library modules only, never TensorFlow (not even through
brainscan.preprocessing): the same architecture and recipe train under any Keras backend, e.g.
`KERAS_BACKEND=jax` on a machine that cannot install TensorFlow. components/train.py adds what
needs TensorFlow (the tf.data input: decoding, caching, mixup; devices; the bundle).

A runner that trains a recipe as train() does (scripts/gpu_study.py under JAX, for one):

    recipe = Recipe(...)                        # brainscan.config: checked when made
    weights = class_weights(train_labels)       # "balanced" per-class weights
    augment = augmenter(seed, flip=recipe.augment_flip)  # applied to training batches only
    training = training_model(recipe, base_weights_file, steps_per_epoch)  # stage 1, compiled
    fitted = fit_stages(training, recipe, train_data, val_data, best_path,
                        class_weight=weights if training.targets == "sparse" else None)
    saved = export_model(training.model, recipe.image_size, recipe.tta_flip)  # one softmax [N, 7]

The data follows `training.targets` (target_kind): "sparse" class indices (Keras class weights),
"onehot" float [7] (class weights as sample weights; mixup mixes both) or "head"
({"probabilities": one-hot, "tumor": [1]}).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
from keras import ops

from brainscan.config import MIN_IMAGE_SIZE, MONITORS, TTA_FLIPPED_LAYER, Recipe
from brainscan.labels import CLASSES, HEALTHY_INDICES

# Fine-tuning unfreezes the base from this block on (the exit flow and the last middle block).
FINE_TUNE_FROM = "block13"
# From scratch on a few hundred images an epoch is only ~20 steps: BatchNorm's default
# momentum (0.99) leaves the moving statistics far behind and validation scores at chance.
SCRATCH_BN_MOMENTUM = 0.9
DROPOUT = 0.3
TARGETS = ("sparse", "onehot", "head")
# Excluded from AdamW's weight decay: biases and BatchNorm's scale and offset.
NO_DECAY = ("bias", "gamma", "beta")


class TrainingError(RuntimeError):
    """A training run that cannot start or finish; the message says why and what to do."""


# ----------------------------------------------------------------------------- data-side pieces
def class_weights(labels: np.ndarray) -> dict[int, float]:
    """'Balanced' weights n / (k * count); a class absent from train gets 1.0."""
    counts = np.bincount(labels, minlength=len(CLASSES))
    present = int((counts > 0).sum())
    return {i: (len(labels) / (present * c) if c else 1.0) for i, c in enumerate(counts.tolist())}


def augmenter(seed: int, flip: bool = False):
    """Random rotation (~10 degrees), brightness, small zoom and shift [, horizontal flip]; training data only."""
    flips = [keras.layers.RandomFlip("horizontal", seed=seed + 4)] if flip else []
    return keras.Sequential(flips + [
        keras.layers.RandomRotation(10 / 360, fill_mode="nearest", seed=seed),
        keras.layers.RandomZoom(0.1, fill_mode="nearest", seed=seed + 1),
        keras.layers.RandomTranslation(0.05, 0.05, fill_mode="nearest", seed=seed + 2),
        # images are already in Xception's [-1, 1]
        keras.layers.RandomBrightness(0.1, value_range=(-1.0, 1.0), seed=seed + 3),
    ], name="augmentation")


def target_kind(mixup: float = 0.0, label_smoothing: float = 0.0, tumor_aux: str = "none") -> str:
    """The targets a recipe trains on: the original recipe keeps sparse labels and Keras class weights;
    anything that mixes labels or adds a second target uses one-hot targets with sample weights."""
    if tumor_aux == "head":
        return "head"
    return "onehot" if (mixup or label_smoothing or tumor_aux == "softmax") else "sparse"


# ----------------------------------------------------------------------------- the network
def build_model(image_size: int, base_weights: str = "imagenet", dropout: float = DROPOUT,
                bn_momentum: float = SCRATCH_BN_MOMENTUM):
    """Xception base + GAP + dropout + dense softmax(7); returns (model, base).

    base_weights: "imagenet", "none" (from scratch) or a local .h5 weights file (train() fetches
    an s3:// one first).
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size {image_size} is too small: Xception needs at least {MIN_IMAGE_SIZE}")
    from_scratch = base_weights in ("none", None, "")
    if from_scratch:
        weights = None
    elif base_weights == "imagenet":
        weights = "imagenet"
    elif Path(base_weights).is_file():
        weights = str(base_weights)
    else:
        raise TrainingError(f"base weights {base_weights!r}: no such file (use 'imagenet', 'none' "
                            "or a path / s3:// URI of an Xception .h5 weights file)")
    try:
        base = keras.applications.Xception(include_top=False, weights=weights, input_shape=(image_size, image_size, 3))
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


def with_tumor_head(model):
    """The training model of tumor_aux "head": the softmax plus a sigmoid tumor head on the pooled
    features (outputs {"probabilities", "tumor"}); export_model drops the head again."""
    tumor = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="tumor")(
        model.get_layer("dropout").output)
    return keras.Model(model.inputs, {"probabilities": model.outputs[0], "tumor": tumor}, name="brainscan_xception_aux")


# ----------------------------------------------------------------------------- optimisation
def learning_rate_schedule(learning_rate: float, lr_schedule: str = "constant", epochs: int = 1,
                           warmup_epochs: int = 0, steps_per_epoch: int = 1):
    """Stage 1's rate: the constant, or a cosine decay to 0 over the epochs after a linear warm-up
    from a tenth of the peak (warmup_epochs > 0)."""
    if lr_schedule == "constant":
        return learning_rate
    if lr_schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}")
    return keras.optimizers.schedules.CosineDecay(
        learning_rate / 10 if warmup_epochs else learning_rate,
        decay_steps=(epochs - warmup_epochs) * steps_per_epoch,
        warmup_target=learning_rate if warmup_epochs else None, warmup_steps=warmup_epochs * steps_per_epoch)


def make_optimizer(learning_rate, weight_decay: float = 0.0, ema: float = 0.0):
    """Adam, or AdamW with decoupled weight decay (biases and BatchNorm excluded); with ema > 0 the
    optimizer keeps an exponential moving average of the weights (recipe_callbacks swaps it in)."""
    averaging = dict(use_ema=True, ema_momentum=ema) if ema else {}
    if weight_decay:
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay, **averaging)
        optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
        return optimizer
    return keras.optimizers.Adam(learning_rate, **averaging)


def tumor_auc_metric(name: str = "tumor_auc"):
    """ROC-AUC of P(tumor) = 1 - P(healthy classes), for sparse or one-hot 7-class targets."""
    healthy = list(HEALTHY_INDICES)

    class TumorAUC(keras.metrics.AUC):
        def update_state(self, y_true, y_pred, sample_weight=None):
            score = 1.0 - ops.sum(ops.take(ops.convert_to_tensor(y_pred), healthy, axis=-1), axis=-1)
            y_true = ops.convert_to_tensor(y_true)
            if len(y_true.shape) == 2 and y_true.shape[-1] == len(CLASSES):  # one-hot (mixup: soft)
                truth = ops.cast(ops.sum(ops.take(y_true, healthy, axis=-1), axis=-1) < 0.5, "float32")
            else:
                label = ops.reshape(ops.cast(y_true, "int32"), [-1])
                truth = ops.cast(ops.logical_and(label != healthy[0], label != healthy[1]), "float32")
            return super().update_state(truth, score)

    return TumorAUC(name=name, num_thresholds=1000)


def tumor_aux_softmax_loss(weight: float, label_smoothing: float = 0.0):
    """7-class cross-entropy + weight x binary cross-entropy of the softmax's own P(tumor)."""
    healthy = list(HEALTHY_INDICES)
    cross_entropy = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, reduction=None)

    def loss(y_true, y_pred):
        truth = 1.0 - ops.sum(ops.take(y_true, healthy, axis=-1), axis=-1)
        score = ops.clip(1.0 - ops.sum(ops.take(y_pred, healthy, axis=-1), axis=-1), 1e-7, 1 - 1e-7)
        binary = -(truth * ops.log(score) + (1.0 - truth) * ops.log(1.0 - score))
        return cross_entropy(y_true, y_pred) + weight * binary

    return loss


def compile_for_training(fit_model, optimizer, targets: str = "sparse", tumor_aux: str = "none",
                         tumor_aux_weight: float = 0.5, label_smoothing: float = 0.0) -> None:
    """Compile with the recipe's loss and metrics (accuracy and tumor_auc, the P(tumor) ROC-AUC)."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    if targets == "head":
        fit_model.compile(
            optimizer=optimizer,
            loss={"probabilities": keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
                  "tumor": keras.losses.BinaryCrossentropy()},
            loss_weights={"probabilities": 1.0, "tumor": tumor_aux_weight},
            metrics={"probabilities": ["accuracy", tumor_auc_metric()]})
        return
    if targets == "sparse":
        loss = "sparse_categorical_crossentropy"
    elif tumor_aux == "softmax":
        loss = tumor_aux_softmax_loss(tumor_aux_weight, label_smoothing)
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    fit_model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy", tumor_auc_metric()])


def monitored_metric(monitor: str = "val_loss", targets: str = "sparse") -> tuple[str, str]:
    """(the Keras log key early stopping and the checkpoint watch, "min" or "max")."""
    if monitor not in MONITORS:
        raise ValueError(f"monitor must be one of {', '.join(MONITORS)}, got {monitor!r}")
    mode = "min" if monitor == "val_loss" else "max"
    if targets == "head" and monitor != "val_loss":  # Keras prefixes the softmax's metrics with its output name
        return "val_probabilities_" + monitor[len("val_"):], mode
    return monitor, mode


def with_short_names(logs: dict) -> dict:
    """With the auxiliary head Keras names the softmax's metrics probabilities_*: add the plain names."""
    out = dict(logs)
    for key, value in logs.items():
        for prefix, short in (("probabilities_", ""), ("val_probabilities_", "val_")):
            if key.startswith(prefix) and not key.endswith("_loss"):
                out.setdefault(short + key[len(prefix):], value)
    return out


# ----------------------------------------------------------------------------- BatchNorm, EMA
def batchnorm_layers(model) -> list:
    """Every BatchNormalization layer of a model, nested models included."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found.extend(batchnorm_layers(layer))
    return found


def recalibrate_batchnorm(model, images) -> int:
    """Precise BatchNorm: every trainable BN layer's moving mean and variance become the average of
    its batch statistics over `images` (an iterable of batches x or (x, ...): the un-augmented
    training images), instead of the momentum average of the last few augmented batches. Returns
    the batches used.

    From scratch with ~30 steps an epoch and momentum 0.9 the moving statistics follow the last
    ~10 batches; the validation and test scores then jump from epoch to epoch even at a learning
    rate near zero. Runs eagerly (the momentum is changed batch by batch: a cumulative mean).
    """
    layers = [layer for layer in batchnorm_layers(model) if layer.trainable]
    momenta = [layer.momentum for layer in layers]
    batches = 0
    try:
        for batch in images:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            batches += 1
            for layer in layers:
                layer.momentum = (batches - 1) / batches  # the first batch replaces, later ones average in
            model(x, training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return batches


class PreciseBatchNorm(keras.callbacks.Callback):
    """recalibrate_batchnorm(model, data) at the start of every validation."""

    def __init__(self, model, data):
        super().__init__()
        self.target, self.data = model, data

    def on_test_begin(self, logs=None):
        recalibrate_batchnorm(self.target, self.data)


def recipe_callbacks(model, ema: float = 0.0, calibration_data=None) -> list:
    """The recipe's callbacks, to go before the checkpoint and early stopping: with EMA the averaged
    weights are swapped in for every validation and checkpoint; with calibration_data (precise_bn)
    the BatchNorm statistics are recomputed over it before every validation."""
    callbacks = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if ema else []
    if calibration_data is not None:
        callbacks.append(PreciseBatchNorm(model, calibration_data))
    return callbacks


# ----------------------------------------------------------------------------- the fit stages
@dataclass
class TrainingModel:
    """A recipe's networks: `model` the softmax (what is saved), `base` its Xception base, `fit` what Keras
    fits (the model, or the model with the tumor head), and the `targets` it is compiled for."""

    model: keras.Model
    base: keras.Model
    fit: keras.Model
    targets: str


def compile_recipe(training: TrainingModel, recipe: Recipe, learning_rate) -> None:
    """Compile the fit model with the recipe's optimizer, loss and metrics at this learning rate (or schedule)."""
    compile_for_training(training.fit, make_optimizer(learning_rate, recipe.weight_decay, recipe.ema),
                         training.targets, recipe.tumor_aux, recipe.tumor_aux_weight, recipe.label_smoothing)


def training_model(recipe: Recipe, base_weights_file: str, steps_per_epoch: int, dropout: float = DROPOUT,
                   bn_momentum: float = SCRATCH_BN_MOMENTUM) -> TrainingModel:
    """Stage 1's networks, compiled: the head on a frozen pretrained base, or all of it from scratch.

    base_weights_file: "none", "imagenet" or a local weights file (train() fetches an s3:// one first).
    """
    model, base = build_model(recipe.image_size, base_weights_file, dropout, bn_momentum)
    base.trainable = recipe.from_scratch  # a frozen random base learns nothing
    targets = target_kind(recipe.mixup, recipe.label_smoothing, recipe.tumor_aux)
    training = TrainingModel(model, base, with_tumor_head(model) if targets == "head" else model, targets)
    compile_recipe(training, recipe, learning_rate_schedule(recipe.learning_rate, recipe.lr_schedule, recipe.epochs,
                                                            recipe.warmup_epochs, steps_per_epoch))
    return training


@dataclass
class Fitted:
    """What the fit stages did: every epoch's logs (plain metric names) over both stages."""

    history: dict[str, list[float]]
    stage2_start: int | None  # the first fine-tuning epoch (1-based); None: one stage
    best_epoch: int  # 1-based over both stages, by the recipe's monitor

    def at_best(self, key: str) -> float | None:
        """A logged value at the best epoch (None when it was not logged)."""
        values = self.history.get(key)
        return values[self.best_epoch - 1] if values else None


def _quiet(message: str) -> None:
    pass


def fit_stages(training: TrainingModel, recipe: Recipe, train_data, val_data, best_path: str, *,
               fine_tune_learning_rate: float | None = None, class_weight: dict | None = None,
               calibration_data=None, callbacks: list | tuple = (),
               epoch_log: Callable[[str, int, int], keras.callbacks.Callback] | None = None,
               scope: Callable = contextlib.nullcontext, log: Callable[[str], None] = _quiet,
               **fit_options) -> Fitted:
    """Stage 1 (`recipe.epochs`), then stage 2 (`recipe.fine_tune_epochs`, fine-tuning from stage 1's best
    weights); early stopping and the best checkpoint (at best_path) follow `recipe.monitor` on val_data.
    Ends with the best weights loaded into `training`.

    fine_tune_learning_rate: stage 2's rate (default: recipe.fine_tune_learning_rate()). class_weight:
    Keras class weights (sparse targets only). calibration_data: the un-augmented training images
    (precise_bn). callbacks: extra ones for every fit; epoch_log(stage, stage epochs, epochs before it)
    makes a per-stage one. scope: what recompiling runs under (a tf.distribute strategy's scope).
    fit_options go to every Model.fit (verbose, shuffle, batch_size ...).
    """
    monitored, mode = monitored_metric(recipe.monitor, training.targets)
    # One checkpoint callback for both stages: its `best` carries over between fit calls.
    checkpoint = keras.callbacks.ModelCheckpoint(best_path, monitor=monitored, mode=mode, save_best_only=True,
                                                 save_weights_only=True, verbose=0)
    history: dict[str, list[float]] = {}

    def run_stage(stage: str, stage_epochs: int) -> None:
        offset = len(history.get("loss", []))
        stopper = keras.callbacks.EarlyStopping(monitor=monitored, mode=mode, patience=recipe.patience)
        # EMA weights / precise BatchNorm statistics are in place before validation and the checkpoint.
        stage_callbacks = (recipe_callbacks(training.model, recipe.ema, calibration_data) + [checkpoint, stopper]
                           + ([epoch_log(stage, stage_epochs, offset)] if epoch_log else []) + list(callbacks))
        fitted = training.fit.fit(train_data, validation_data=val_data, epochs=stage_epochs,
                                  class_weight=class_weight, callbacks=stage_callbacks, **fit_options)
        for key, values in with_short_names(fitted.history).items():
            history.setdefault(key, []).extend(float(v) for v in values)

    log(f"stage 1: {'whole network from scratch' if recipe.from_scratch else 'head, base frozen'}, "
        f"lr {recipe.learning_rate} ({recipe.lr_schedule}), up to {recipe.epochs} epochs")
    run_stage("stage 1", recipe.epochs)
    stage2_start = None
    if recipe.fine_tune_epochs:
        stage2_start = len(history["loss"]) + 1
        rate = recipe.fine_tune_learning_rate() if fine_tune_learning_rate is None else fine_tune_learning_rate
        training.fit.load_weights(best_path)  # fine-tune from the best point, not the last
        if recipe.from_scratch:
            # Same trainable set: only the rate drops, so the traced train step is reused
            # (a recompile costs minutes of retracing on CPU).
            training.fit.optimizer.learning_rate.assign(rate)
        else:
            with scope():
                unfrozen = set_fine_tuning(training.base)
                log(f"stage 2: fine-tuning {unfrozen} base layers from {FINE_TUNE_FROM} on")
                compile_recipe(training, recipe, rate)
        log(f"stage 2: lr {rate}, up to {recipe.fine_tune_epochs} epochs")
        run_stage("stage 2", recipe.fine_tune_epochs)
    training.fit.load_weights(best_path)
    scores = np.asarray(history[recipe.monitor], dtype=np.float64)
    best_index = int(np.argmin(scores) if mode == "min" else np.argmax(scores))
    return Fitted(history, stage2_start, best_index + 1)


# ----------------------------------------------------------------------------- the saved model
def with_flip_averaging(model, image_size: int):
    """A model whose softmax is the mean of `model` on x and on x flipped left-right.

    Built from stock Keras layers only (the flip is a fixed permutation matrix on the width axis),
    so model.keras loads anywhere without custom objects; one input, one output as before. The
    mirrored input is the layer named brainscan.config.TTA_FLIPPED_LAYER (Grad-CAM looks for it).
    """
    inputs = keras.Input((image_size, image_size, 3), name="image")
    width_last = keras.layers.Permute((1, 3, 2), name="tta_width_last", dtype="float32")(inputs)
    reverse = keras.layers.Dense(image_size, use_bias=False, trainable=False, name="tta_reverse_width",
                                 dtype="float32")
    flipped = keras.layers.Permute((1, 3, 2), name=TTA_FLIPPED_LAYER, dtype="float32")(reverse(width_last))
    reverse.set_weights([np.eye(image_size, dtype=np.float32)[::-1]])
    outputs = keras.layers.Average(name="probabilities", dtype="float32")([model(inputs), model(flipped)])
    return keras.Model(inputs, outputs, name="brainscan_xception_tta")


def export_model(model, image_size: int, tta_flip: bool = False):
    """The model to save: the softmax alone (no training-only head or loss), optionally flip-averaged."""
    export = keras.Model(model.input, model.output, name="brainscan_xception")
    return with_flip_averaging(export, image_size) if tta_flip else export
