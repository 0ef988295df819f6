"""The trainer: bundle it writes, what it learned, its input pipeline, weights files, S3, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from brainscan import storage
from brainscan.decision import tumor_probability
from brainscan.labels import CLASS_INDEX, CLASSES
from brainscan.preprocessing import preprocess_batch

SIZE = 71


def _split_images(splits: str, name: str, limit_per_class: int | None = None):
    frame = pd.read_csv(storage.join(splits, f"{name}.csv"))
    if limit_per_class:
        frame = frame.groupby("class7", group_keys=False).head(limit_per_class).reset_index(drop=True)
    return frame, [storage.read_bytes(p) for p in frame["path"]]


@pytest.mark.slow
def test_trained_bundle_is_complete_and_detects_tumors(trained_bundle):
    from sklearn.metrics import recall_score, roc_auc_score

    from brainscan.modelstore import load_bundle

    bundle = load_bundle(trained_bundle.uri)
    assert bundle.image_size == SIZE and bundle.classes == CLASSES and bundle.threshold is None
    assert bundle.metadata["base_weights"] == "none" and bundle.metadata["train_images"] > 0
    history = json.loads(storage.read_text(storage.join(trained_bundle.uri, "history.json")))
    assert len(history["history"]["val_loss"]) == trained_bundle.result.epochs_run
    with open(storage.join(trained_bundle.uri, "training_curves.png"), "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"

    # The test split, never read by the trainer: the binary decision must be learned.
    frame, images = _split_images(trained_bundle.splits, "test")
    probabilities = np.asarray(bundle.model(preprocess_batch(images, SIZE), training=False))
    assert probabilities.shape == (len(frame), len(CLASSES))
    tumor_score = tumor_probability(probabilities)
    truth = frame["tumor"].to_numpy()
    auc = roc_auc_score(truth, tumor_score)
    recall = recall_score(truth, tumor_score >= 0.5)
    print(f"trained_bundle on test: ROC-AUC {auc:.3f}, recall@0.5 {recall:.3f}, "
          f"7-class accuracy {np.mean(probabilities.argmax(1) == frame['class7'].map(CLASS_INDEX)):.3f}")
    assert auc >= 0.9, f"tumor ROC-AUC on test {auc:.3f}: the fixture model did not learn"


def test_augmentation_on_train_only_and_data_order_follows_the_seed(eval_splits):
    from components.train import make_dataset

    frame, images = _split_images(eval_splits, "train", limit_per_class=3)
    labels = frame["class7"].map(CLASS_INDEX).to_numpy(np.int32)
    plain = preprocess_batch(images, SIZE)

    def epoch(training: bool, seed: int):
        batches = list(make_dataset(images, labels, SIZE, 8, training=training, seed=seed))
        return np.concatenate([x.numpy() for x, _ in batches]), np.concatenate([y.numpy() for _, y in batches])

    val_x, val_y = epoch(False, 0)
    np.testing.assert_array_equal(val_x, plain)  # validation: the serving pixels, in manifest order
    np.testing.assert_array_equal(val_y, labels)

    train_x, train_y = epoch(True, 0)
    assert sorted(train_y) == sorted(labels) and not np.array_equal(train_y, labels)  # shuffled
    order = [int(np.argmin(np.abs(plain - x).mean(axis=(1, 2, 3)))) for x in train_x]
    assert not np.allclose(train_x, plain[order], atol=1e-3)  # augmented
    assert np.array_equal(epoch(True, 0)[1], train_y)  # same seed, same order
    assert not np.array_equal(epoch(True, 1)[1], train_y)  # another seed, another order


def test_weights_file_loads_into_the_base(tmp_path):
    import keras

    from brainscan.network import TrainingError, build_model

    keras.utils.set_random_seed(7)
    reference = keras.applications.Xception(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    weights_file = tmp_path / "xception_notop.weights.h5"
    reference.save_weights(weights_file)
    keras.utils.set_random_seed(8)  # a different init: only the file can make them equal
    _, base = build_model(SIZE, str(weights_file))
    for mine, theirs in zip(base.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(mine, theirs)

    with pytest.raises(TrainingError, match="no such file"):
        build_model(SIZE, str(tmp_path / "missing.weights.h5"))


def test_imagenet_download_failure_is_one_clear_line(monkeypatch):
    from keras.src.utils import file_utils

    from brainscan.network import TrainingError, build_model

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: [Errno -3] no network")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(TrainingError, match="cannot get the ImageNet weights.*--base-weights none") as info:
        build_model(SIZE, "imagenet")
    assert "\n" not in str(info.value)


def test_bad_input_is_refused_before_training(tmp_path, eval_splits):
    from components.train import TrainingError, train

    with pytest.raises(FileNotFoundError, match="no split manifest"):
        train(str(tmp_path / "nowhere"), str(tmp_path / "out"), image_size=SIZE, base_weights="none")
    with pytest.raises(ValueError, match="at least 71"):
        train(eval_splits, str(tmp_path / "out"), image_size=64, base_weights="none")

    broken = tmp_path / "broken"
    frame, _ = _split_images(eval_splits, "train", limit_per_class=1)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    frame.loc[0, "path"] = str(tmp_path / "corrupt.jpg")
    storage.write_text(str(broken / "train.csv"), frame.to_csv(index=False))
    storage.write_text(str(broken / "val.csv"), frame.iloc[1:].to_csv(index=False))
    with pytest.raises(TrainingError, match="corrupt.jpg"):
        train(str(broken), str(tmp_path / "out"), image_size=SIZE, base_weights="none")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_training_from_s3_splits_with_s3_weights(s3_prefix, eval_splits, tmp_path):
    """Splits, images, base weights and the bundle all in S3; pretrained path: frozen base, then fine-tuning."""
    import keras

    from components.train import train
    from brainscan.modelstore import load_bundle

    for name, per_class in (("train", 2), ("val", 1)):
        frame, images = _split_images(eval_splits, name, limit_per_class=per_class)
        uris = [storage.join(s3_prefix, "images", name, f"{i}.jpg") for i in range(len(frame))]
        for uri, data in zip(uris, images):
            storage.write_bytes(uri, data)
        frame["path"] = uris
        storage.write_text(storage.join(s3_prefix, "splits", f"{name}.csv"), frame.to_csv(index=False))
    base = keras.applications.Xception(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    base.save_weights(tmp_path / "base.weights.h5")
    weights_uri = storage.write_bytes(storage.join(s3_prefix, "weights", "base.weights.h5"),
                                      (tmp_path / "base.weights.h5").read_bytes())

    out = storage.join(s3_prefix, "model")
    result = train(storage.join(s3_prefix, "splits"), out, image_size=SIZE, epochs=1, fine_tune_epochs=1,
                   batch_size=8, base_weights=weights_uri, seed=0)
    assert result.epochs_run == 2 and result.train_images == 14
    for name in ("model.keras", "brainscan_model.json", "history.json", "training_curves.png"):
        assert storage.exists(storage.join(out, name)), name
    bundle = load_bundle(out)
    assert bundle.metadata["base_weights"] == weights_uri and bundle.image_size == SIZE


def test_mixup_and_aux_targets_keep_labels_and_weights_consistent(eval_splits):
    from brainscan.network import class_weights
    from components.train import make_dataset
    from brainscan.labels import HEALTHY_INDICES

    frame, images = _split_images(eval_splits, "train", limit_per_class=3)
    labels = frame["class7"].map(CLASS_INDEX).to_numpy(np.int32)
    weights = class_weights(labels)
    mixed = list(make_dataset(images, labels, SIZE, 8, training=True, seed=0, mixup=0.4, sample_weights=weights,
                              targets="onehot"))
    y = np.concatenate([b[1].numpy() for b in mixed])
    w = np.concatenate([b[2].numpy() for b in mixed])
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)  # soft labels, still distributions
    assert (y.max(axis=1) < 0.999).any(), "mixup mixed nothing"
    assert w.min() >= min(weights.values()) - 1e-5 and w.max() <= max(weights.values()) + 1e-5
    assert list(make_dataset(images, labels, SIZE, 8, training=True, seed=0, mixup=0.4, sample_weights=weights,
                             targets="onehot"))[0][1].numpy().tolist() == mixed[0][1].numpy().tolist()  # seeded

    val = list(make_dataset(images, labels, SIZE, 8, training=False, targets="head"))
    probabilities = np.concatenate([b[1]["probabilities"].numpy() for b in val])
    tumor = np.concatenate([b[1]["tumor"].numpy() for b in val])[:, 0]
    np.testing.assert_array_equal(probabilities.argmax(axis=1), labels)  # validation: never mixed
    np.testing.assert_array_equal(tumor, (~np.isin(labels, HEALTHY_INDICES)).astype(np.float32))


def test_flip_averaging_is_exact_and_loads_without_custom_objects(tmp_path):
    import keras

    from brainscan.network import build_model, with_flip_averaging

    keras.utils.set_random_seed(3)
    model, _ = build_model(SIZE, "none")
    x = np.random.default_rng(0).uniform(-1, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
    tta = with_flip_averaging(model, SIZE)
    expected = (np.asarray(model(x, training=False)) + np.asarray(model(x[:, :, ::-1].copy(), training=False))) / 2
    np.testing.assert_allclose(np.asarray(tta(x, training=False)), expected, atol=1e-6)
    tta.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)  # stock layers only, safe mode
    assert len(loaded.outputs) == 1 and tuple(loaded.outputs[0].shape) == (None, len(CLASSES))
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), expected, atol=1e-6)


@pytest.mark.parametrize("options", [
    dict(crop_to_head=True, lr_schedule="cosine", warmup_epochs=1, weight_decay=0.02, augment_flip=True, mixup=0.2,
         label_smoothing=0.05, tumor_aux="head", monitor="val_tumor_auc", tta_flip=True),
    dict(tumor_aux="softmax", tumor_aux_weight=1.0, fine_tune_epochs=1),
])
def test_recipe_options_train_and_export_one_softmax(tmp_path, eval_splits, options):
    """Every option trains; the bundle keeps the [N, 7] softmax contract and records the recipe."""
    from components.train import train
    from brainscan.modelstore import load_bundle

    small = tmp_path / "splits"
    for name, per_class in (("train", 2), ("val", 1)):
        frame, _ = _split_images(eval_splits, name, limit_per_class=per_class)
        storage.write_text(str(small / f"{name}.csv"), frame.to_csv(index=False))
    kwargs = dict(image_size=SIZE, epochs=2, fine_tune_epochs=0, batch_size=8, base_weights="none", seed=0)
    kwargs.update(options)
    result = train(str(small), str(tmp_path / "out"), **kwargs)
    assert result.epochs_run == 2 + kwargs["fine_tune_epochs"]
    bundle = load_bundle(str(tmp_path / "out"))
    assert len(bundle.model.inputs) == 1 and len(bundle.model.outputs) == 1
    assert bundle.preprocessing == {"crop_to_head": bool(options.get("crop_to_head"))}
    defaults = {"lr_schedule": "constant", "mixup": 0.0, "tumor_aux": "none", "monitor": "val_loss", "tta_flip": False}
    for key, default in defaults.items():
        assert bundle.metadata[key] == options.get(key, default), key
    frame, images = _split_images(eval_splits, "test", limit_per_class=1)
    probabilities = np.asarray(bundle.model(bundle.preprocess(images), training=False))
    assert probabilities.shape == (len(frame), len(CLASSES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_inconsistent_recipe_options_are_refused(tmp_path, eval_splits):
    from components.train import train

    with pytest.raises(ValueError, match="cosine schedule is one stage"):
        train(eval_splits, str(tmp_path / "o"), image_size=SIZE, base_weights="none", lr_schedule="cosine",
              fine_tune_epochs=2)
    with pytest.raises(ValueError, match="tumor_aux"):
        train(eval_splits, str(tmp_path / "o"), image_size=SIZE, base_weights="none", tumor_aux="both")


def test_precise_batchnorm_sets_the_average_of_the_batch_statistics():
    import keras
    import tensorflow as tf

    from brainscan.network import recalibrate_batchnorm

    inputs = keras.Input((4, 4, 2))
    inner = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.BatchNormalization(momentum=0.9, name="bn")])
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inner(inputs)))
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=3.0 * i, size=(5, 4, 4, 2)).astype(np.float32) for i in range(3)]
    data = tf.data.Dataset.from_tensor_slices((np.concatenate(batches), np.zeros(15))).batch(5)
    assert recalibrate_batchnorm(model, data) == 3
    bn = inner.get_layer("bn")
    expected_mean = np.mean([b.mean(axis=(0, 1, 2)) for b in batches], axis=0)
    expected_var = np.mean([b.var(axis=(0, 1, 2)) for b in batches], axis=0)
    np.testing.assert_allclose(np.asarray(bn.moving_mean), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), expected_var, rtol=1e-4)
    assert bn.momentum == 0.9  # restored
