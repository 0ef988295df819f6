"""Model bundles: save and load from a folder and from S3; clear errors for what is not a bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainscan import modelstore, storage
from tests.fixtures.registry import TINY_SIZE, make_tiny_model


def _images(n=4, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, TINY_SIZE, TINY_SIZE, 3)).astype("float32")


def test_local_round_trip_keeps_predictions_and_metadata(tmp_path):
    model = make_tiny_model(seed=3)
    modelstore.save_bundle(model, str(tmp_path / "b"), TINY_SIZE, {"epochs": 2}, threshold=0.25,
                           thresholds={"ct": 0.2, "mri": 0.3})
    bundle = modelstore.load_bundle(str(tmp_path / "b"))
    assert bundle.image_size == TINY_SIZE and bundle.threshold == 0.25
    assert bundle.thresholds == {"ct": 0.2, "mri": 0.3} and bundle.metadata["epochs"] == 2
    probs = bundle.predict(_images())
    assert probs.shape == (4, 7) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(probs, model.predict(_images(), verbose=0), atol=1e-6)


def test_s3_round_trip(s3_prefix, tiny_bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINSCAN_CACHE", str(tmp_path / "cache"))
    local = modelstore.load_bundle(str(tiny_bundle_dir))
    storage.upload_dir(tiny_bundle_dir, s3_prefix + "/model")
    remote = modelstore.load_bundle(s3_prefix + "/model")
    assert remote.uri == s3_prefix + "/model" and remote.threshold is None
    np.testing.assert_allclose(remote.predict(_images()),
                               local.predict(_images()), atol=1e-6)


def test_not_a_bundle_is_a_clear_error(tmp_path, s3_prefix):
    with pytest.raises(modelstore.BundleError, match="no such folder"):
        modelstore.load_bundle(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(modelstore.BundleError, match="not a brainscan model bundle"):
        modelstore.load_bundle(str(tmp_path / "empty"))
    with pytest.raises(modelstore.BundleError, match="not a brainscan model bundle"):
        modelstore.load_bundle(s3_prefix + "/nothing-here")
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "brainscan_model.json").write_text(json.dumps({"classes": ["a", "b"], "image_size": 8}))
    with pytest.raises(modelstore.BundleError, match="classes"):
        modelstore.load_bundle(str(tmp_path / "wrong"))


def test_wrong_input_shape_is_rejected(tiny_bundle_dir):
    bundle = modelstore.load_bundle(str(tiny_bundle_dir))
    with pytest.raises(ValueError, match="expected preprocessed images"):
        bundle.predict(np.zeros((2, 8, 8, 3), dtype="float32"))


def test_saved_model_carries_no_optimizer_state(tmp_path):
    """What serving pulls is the weights only: a model trained with Adam saves without the optimizer's
    variables (twice the weights' size), and predicts the same after loading."""
    import zipfile

    import h5py
    import keras

    from brainscan import bundle

    model = make_tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).random((4, TINY_SIZE, TINY_SIZE, 3), dtype=np.float32)
    model.fit(x, np.arange(4), epochs=1, verbose=0)
    with_state = tmp_path / "with_optimizer.keras"
    model.save(with_state)

    path = bundle.save_model(model, tmp_path)
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as weights, h5py.File(weights) as h5:
        assert "optimizer" not in h5, "optimizer variables were saved with the model"
    assert path.stat().st_size < 0.6 * with_state.stat().st_size
    assert model.optimizer is not None  # the trainer's model is left as it was
    np.testing.assert_allclose(bundle.load_model(tmp_path)(x, training=False), model(x, training=False), atol=1e-6)


def test_bundle_carries_its_preprocessing_options(tmp_path):
    """The trainer's crop choice travels in brainscan_model.json; a bundle without the key: no crop."""
    import io

    from PIL import Image

    from brainscan.preprocessing import preprocess_batch

    picture = np.zeros((60, 90, 3), np.uint8)
    picture[10:50, 30:70] = 140
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "PNG")
    files = [buffer.getvalue()]
    model = make_tiny_model(seed=1)
    modelstore.save_bundle(model, str(tmp_path / "old"), TINY_SIZE, {"epochs": 1})
    modelstore.save_bundle(model, str(tmp_path / "crop"), TINY_SIZE, {"crop_to_head": True})
    old, crop = modelstore.load_bundle(str(tmp_path / "old")), modelstore.load_bundle(str(tmp_path / "crop"))
    assert old.preprocessing == {"crop_to_head": False} and crop.preprocessing == {"crop_to_head": True}
    np.testing.assert_array_equal(old.preprocess(files), preprocess_batch(files, TINY_SIZE))
    np.testing.assert_array_equal(crop.preprocess(files), preprocess_batch(files, TINY_SIZE, crop_to_head=True))
    assert not np.array_equal(old.preprocess(files), crop.preprocess(files))


# ----------------------------------------------------------------------------- the bundle's sha256
def _flip_one_byte(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0x01
    return bytes(changed)


def test_the_digest_covers_every_file_its_name_and_its_bytes(tiny_bundle_dir, tmp_path):
    """brainscan.bundle.digest: one value for the same files wherever they lie; any change of a byte, a
    name or a file set changes it; its own record (brainscan_model.sha256) is not part of it."""
    import hashlib
    import shutil

    from brainscan import bundle

    folder = shutil.copytree(tiny_bundle_dir, tmp_path / "a")
    first = bundle.digest(folder)
    assert first == bundle.digest(shutil.copytree(folder, tmp_path / "b")) and len(first) == 64
    assert bundle.write_digest(folder) == first and bundle.recorded_digest(folder) == first
    assert bundle.digest(folder) == first  # the record itself is left out
    # the definition: sorted relative paths, each with its size and bytes
    expected = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.name != bundle.DIGEST_FILE):
        data = (folder / name).read_bytes()
        expected.update(f"{name}\0{len(data)}\0".encode() + data)
    assert expected.hexdigest() == first
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.txt").write_text("x")
    assert bundle.digest(folder) != first
    (folder / "sub" / "extra.txt").unlink()
    assert bundle.digest(folder) == first
    (folder / bundle.MODEL_FILE).rename(folder / "model2.keras")
    assert bundle.digest(folder) != first


def test_a_bundle_changed_in_s3_is_refused_with_both_digests(s3_prefix, serving_bundle, tmp_path, monkeypatch):
    """One byte of the weights changed in S3 after registration: load_bundle refuses, naming the digest
    recorded at registration and the one found; the unchanged bundle loads."""
    from brainscan import bundle

    monkeypatch.setenv("BRAINSCAN_CACHE", str(tmp_path / "cache"))
    uri = s3_prefix + "/registered"
    storage.upload_dir(serving_bundle, uri)
    expected = bundle.recorded_digest(serving_bundle)
    assert modelstore.load_bundle(uri).uri == uri
    weights = storage.join(uri, bundle.MODEL_FILE)
    storage.write_bytes(weights, _flip_one_byte(storage.read_bytes(weights)))
    with pytest.raises(modelstore.BundleIntegrityError) as refused:
        modelstore.load_bundle(uri)
    found = bundle.digest(storage.download_dir(uri, tmp_path / "as-stored"))
    assert found != expected
    assert str(refused.value) == (f"{uri}: refusing to load: the bundle's files changed since registration "
                                  f"(sha256 expected {expected}, found {found})")


def test_a_bundle_without_a_recorded_digest_loads_with_a_warning(tiny_bundle_dir, caplog):
    """Bundles never registered (a training output) or registered before digests were recorded."""
    import logging

    with caplog.at_level(logging.WARNING, logger="brainscan.bundle"):
        loaded = modelstore.load_bundle(str(tiny_bundle_dir))
    assert loaded.image_size == TINY_SIZE
    assert any("no recorded sha256" in r.getMessage() for r in caplog.records)


def test_weights_swapped_for_another_well_formed_model_are_refused(serving_bundle, tmp_path):
    """Not only corruption: a valid model.keras of other weights (which Keras would load without a word)
    put in place of the registered one is refused before anything is loaded."""
    import shutil

    from brainscan import bundle

    folder = shutil.copytree(serving_bundle, tmp_path / "bundle")
    modelstore.save_bundle(make_tiny_model(seed=4), str(tmp_path / "other"), TINY_SIZE, {})
    shutil.copy2(tmp_path / "other" / bundle.MODEL_FILE, folder / bundle.MODEL_FILE)
    with pytest.raises(modelstore.BundleIntegrityError, match=f"expected {bundle.recorded_digest(folder)}"):
        modelstore.load_bundle(str(folder))
