"""The model and its training recipe in Keras alone: what train() builds, compiles, augments with and saves.

Keras, numpy and brainscan's standard-library modules only, never TensorFlow (not even through
brainscan.preprocessing): the same architecture and recipe train under any Keras backend, e.g.
`KERAS_BACKEND=jax` on a machine that cannot install TensorFlow. components/train.py adds what
needs TensorFlow (the tf.data input: decoding, caching, mixup; devices; the bundle). A runner
that reproduces train()'s recipe calls, in this order:

    check_recipe(...)                                  # brainscan.config: options that fit together
    weights = class_weights(train_labels)              # "balanced" per-class weights
    augment = augmenter(seed, flip=augment_flip)       # applied to training batches only
    model, base = build_model(image_size, base_weights, dropout, bn_momentum)
    base.trainable = base_weights == "none"            # stage 1: the head only on a pretrained base
    targets = target_kind(mixup, label_smoothing, tumor_aux)
    fit_model = with_tumor_head(model) if targets == "head" else model
    rate = learning_rate_schedule(learning_rate, lr_schedule, epochs, warmup_epochs, steps_per_epoch)
    compile_for_training(fit_model, make_optimizer(rate, weight_decay, ema), targets, tumor_aux,
                         tumor_aux_weight, label_smoothing)
    monitored, mode = monitored_metric(monitor, targets)   # early stopping and the best checkpoint
    fit_model.fit(..., class_weight=weights if targets == "sparse" else None,
                  callbacks=recipe_callbacks(model, ema, calibration_data) + [checkpoint, stopper])
    [stage 2: set_fine_tuning(base); compile_for_training(... make_optimizer(fine_tune_rate, ...))]
    saved = export_model(model, image_size, tta_flip)  # one input, one softmax [N, 7]

Targets: "sparse" class indices (Keras class weights), "onehot" float [7] (class weights as
sample weights; mixup mixes both) or "head" ({"probabilities": one-hot, "tumor": [1]}).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import ops

from brainscan.config import MIN_IMAGE_SIZE, MONITORS, TTA_FLIPPED_LAYER
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
