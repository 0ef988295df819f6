"""serving.runtime: the served model call and preprocessing give Keras-on-preprocess_batch's
answers (within 1e-5) whichever runtime runs the model, refuse the same bad images with the
same messages, and a runtime that disagrees with Keras is never used. Serving only loads the
model.onnx that registration wrote: it never converts, and never imports tf2onnx or onnx.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.serving import ACCEPTED_FORMATS, IMAGE_FORMATS, as_registered, declaring_size, refused_images

TOLERANCE = 1e-5
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bundle(serving_bundle):
    from brainscan.modelstore import load_bundle

    return load_bundle(str(serving_bundle))


@pytest.fixture
def bundle_without_onnx(serving_bundle, tmp_path):
    """The same bundle as a version registered before model.onnx was shipped: no ONNX file, no sha256."""
    from brainscan.bundle import DIGEST_FILE, ONNX_FILE
    from brainscan.modelstore import load_bundle

    folder = shutil.copytree(serving_bundle, tmp_path / "old-bundle")
    (folder / ONNX_FILE).unlink()
    (folder / DIGEST_FILE).unlink()
    return load_bundle(str(folder))


def _reference(bundle, images):
    from brainscan.preprocessing import preprocess_batch

    x = preprocess_batch(images, bundle.image_size)
    return x, bundle.predict(x)


@pytest.mark.parametrize("runtime", ["onnx", "tf", "keras"])
def test_served_outputs_equal_keras_on_preprocess_batch(bundle, serving_images, runtime):
    from serving.runtime import ServedModel

    x_ref, p_ref = _reference(bundle, serving_images)
    assert p_ref.std(axis=1).min() > 1e-3  # a model whose classes differ, or the comparison says little
    served = ServedModel(bundle, runtime)
    assert served.runtime.name == runtime
    x = served.preprocess(serving_images)
    np.testing.assert_allclose(x, x_ref, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(served.predict(x), p_ref, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(served.predict(x_ref), p_ref, atol=TOLERANCE, rtol=0)
    for n in (1, 3):  # every batch size goes through the same graph
        np.testing.assert_allclose(served.predict(x_ref[:n]), p_ref[:n], atol=TOLERANCE, rtol=0)
    assert served.predict(x_ref[:0]).shape == (0, 7)


@pytest.fixture(scope="module")
def crop_tta_bundle(tmp_path_factory):
    """A bundle as the cpu preset writes one (flip averaging baked into model.keras), also cropping to the
    head, registered (its model.onnx runs the two passes)."""
    from brainscan.network import with_flip_averaging
    from brainscan.modelstore import load_bundle, save_bundle
    from tests.fixtures.registry import TINY_SIZE, make_tiny_model

    folder = tmp_path_factory.mktemp("crop_tta") / "bundle"
    model = with_flip_averaging(make_tiny_model(seed=3), TINY_SIZE)
    save_bundle(model, str(folder), TINY_SIZE, {"crop_to_head": True, "tta_flip": True})
    return load_bundle(str(as_registered(folder)))


@pytest.mark.parametrize("runtime", ["onnx", "tf"])
def test_a_cropping_flip_averaging_bundle_is_served_as_it_was_trained(crop_tta_bundle, serving_images, runtime):
    """The compiled preprocessing applies the bundle's own options (its head crop) and the runtimes run the
    two-pass model: both equal Keras on the bundle's preprocessing."""
    from serving.runtime import ServedModel
    from brainscan.preprocessing import preprocess_batch

    bundle = crop_tta_bundle
    x_ref = bundle.preprocess(serving_images)
    assert np.abs(x_ref - preprocess_batch(serving_images, bundle.image_size)).max() > 0.1  # the crop matters
    p_ref = bundle.predict(x_ref)
    served = ServedModel(bundle, runtime)
    x = served.preprocess(serving_images)
    np.testing.assert_allclose(x, x_ref, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(served.predict(x), p_ref, atol=TOLERANCE, rtol=0)


def test_auto_runs_the_bundles_onnx_model_on_a_cpu(bundle):
    from brainscan.bundle import ONNX_FILE
    from serving.runtime import load_runtime, onnx_file

    path = bundle.local_dir / ONNX_FILE
    stamp = path.stat().st_mtime_ns
    runtime = load_runtime(bundle, "auto")
    assert runtime.name == "onnx" and "onnxruntime" in runtime.description
    assert runtime.max_abs_diff <= TOLERANCE
    assert onnx_file(bundle) == path and path.stat().st_mtime_ns == stamp  # loaded as registered, not converted


def test_a_bundle_without_onnx_is_served_by_tensorflow_with_a_warning(bundle_without_onnx, serving_images, caplog):
    """An older version (no model.onnx) keeps working on compiled TensorFlow; serving never converts it."""
    import logging

    from brainscan.bundle import BundleError, ONNX_FILE
    from serving.runtime import ServedModel, load_runtime

    x_ref, p_ref = _reference(bundle_without_onnx, serving_images)
    with caplog.at_level(logging.WARNING, logger="serving.runtime"):
        served = ServedModel(bundle_without_onnx, "auto")
    assert served.runtime.name == "tf"
    assert any(f"no {ONNX_FILE} in the bundle" in r.getMessage() and "compiled TensorFlow" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    np.testing.assert_allclose(served.predict(x_ref), p_ref, atol=TOLERANCE, rtol=0)
    assert not (bundle_without_onnx.local_dir / ONNX_FILE).exists()  # nothing converted meanwhile
    with pytest.raises(BundleError, match=f"no {ONNX_FILE} in the bundle.*--runtime tf"):
        load_runtime(bundle_without_onnx, "onnx")  # asked for explicitly: a clear refusal


SERVE_AND_LIST_MODULES = textwrap.dedent("""
    import json, sys
    from serving.model import BrainTumorModel
    model = BrainTumorModel(sys.argv[1])
    assert model.load()
    print(json.dumps({"runtime": model.served.runtime.name,
                      "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("tf2onnx", "onnx"))}))
""")


@pytest.mark.parametrize("with_onnx", [True, False])
def test_serving_never_imports_tf2onnx_or_onnx(serving_bundle, bundle_without_onnx, with_onnx):
    """What the serving image lacks: the model server loads a bundle (with model.onnx, or an older one on
    TensorFlow) in a fresh process without importing the converter or the onnx package."""
    folder = serving_bundle if with_onnx else bundle_without_onnx.local_dir
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-c", SERVE_AND_LIST_MODULES, str(folder)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"runtime": "onnx" if with_onnx else "tf", "imported": []}, report


def test_a_runtime_that_disagrees_with_keras_is_refused(bundle, monkeypatch):
    from serving import runtime as served_runtime

    probe = served_runtime._probe(bundle.image_size)
    reference = bundle.predict(probe)
    off = served_runtime.Runtime("off", lambda x: bundle.predict(x) + 1e-4, "off by 1e-4")
    with pytest.raises(ValueError, match="differs from Keras"):
        served_runtime.verified(off, reference, probe)
    nan = served_runtime.Runtime("nan", lambda x: np.full((len(x), 7), np.nan, np.float32), "NaN")
    with pytest.raises(ValueError, match="differs from Keras"):
        served_runtime.verified(nan, reference, probe)

    # "auto" moves on to compiled TensorFlow when the ONNX runtime cannot be had or is wrong ...
    monkeypatch.setattr(served_runtime, "onnx_runtime", lambda b: off)
    assert served_runtime.load_runtime(bundle, "auto").name == "tf"
    # ... and an explicit choice fails loudly instead.
    with pytest.raises(ValueError, match="differs from Keras"):
        served_runtime.load_runtime(bundle, "onnx")
    with pytest.raises(ValueError, match="unknown runtime"):
        served_runtime.load_runtime(bundle, "tensorrt")


def test_compiled_preprocessing_refuses_what_preprocess_batch_refuses(bundle, serving_images):
    from serving.runtime import CompiledPreprocessing
    from brainscan.preprocessing import InvalidImageError, preprocess_batch

    compiled = CompiledPreprocessing(bundle.image_size)
    bad = {"text": b"hello, I am text", "truncated png": serving_images[0][: len(serving_images[0]) // 2],
           **{f"{fmt} claiming 30000x30000": declaring_size(fmt, 30000, 30000) for fmt in IMAGE_FORMATS},
           **{f"{fmt} over max_pixels": declaring_size(fmt, 1100, 1000) for fmt in IMAGE_FORMATS},
           **{name: image for name, (image, _) in refused_images().items()}}
    for name, data in bad.items():
        files = [serving_images[1], data]
        with pytest.raises(InvalidImageError) as ours:
            compiled(files, max_pixels=1_000_000)
        with pytest.raises(InvalidImageError) as theirs:
            preprocess_batch(files, bundle.image_size, max_pixels=1_000_000)
        assert ours.value.index == 1 and str(ours.value) == str(theirs.value), name
    for fmt in ACCEPTED_FORMATS:  # every accepted format, decoded alike
        honest = declaring_size(fmt, 8, 8)
        np.testing.assert_allclose(compiled([honest]), preprocess_batch([honest], bundle.image_size),
                                   atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_xception_through_onnx_runtime_equals_keras(tmp_path, serving_images):
    """The served architecture itself (the demo's 71 px Xception), weights moved off their
    initial values so the seven probabilities differ."""
    from brainscan.network import build_model
    from serving.runtime import ServedModel
    from brainscan.modelstore import load_bundle, save_bundle

    model, _ = build_model(71, base_weights="none")
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) if w.ndim > 1 else w
                       for w in model.get_weights()])
    save_bundle(model, str(tmp_path / "bundle"), 71, {})
    bundle = load_bundle(str(as_registered(tmp_path / "bundle")))
    x_ref, p_ref = _reference(bundle, serving_images)
    assert p_ref.std(axis=1).min() > 1e-3
    served = ServedModel(bundle, "onnx")
    np.testing.assert_allclose(served.predict(served.preprocess(serving_images)), p_ref, atol=TOLERANCE, rtol=0)


# --------------------------------------------------------------------------- the decode pool's size
def _cgroup(root, files: dict[str, str]):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "max 100000"}, None),  # cgroup v2, no limit
    ({"cpu.max": "150000 100000"}, 1.5),  # cgroup v2, 1500m
    ({"cpu.max": "50000 100000"}, 0.5),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),  # cgroup v1, no limit
    ({"cpu,cpuacct/cpu.cfs_quota_us": "200000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 2.0),
    ({}, None),  # no cgroup files at all (not Linux, not a container)
])
def test_the_cpu_limit_is_read_from_the_cgroup(tmp_path, files, limit):
    from brainscan.cpus import cgroup_cpu_limit

    assert cgroup_cpu_limit(_cgroup(tmp_path, files)) == limit


def test_the_decode_pool_follows_the_pods_cpu_limit_not_the_nodes_cores(tmp_path, monkeypatch):
    import os

    from brainscan import cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a 64-core node
    assert cpus.cpu_count(_cgroup(tmp_path / "v2", {"cpu.max": "150000 100000"})) == 2  # 1500m: rounded up
    assert cpus.cpu_count(_cgroup(tmp_path / "tiny", {"cpu.max": "10000 100000"})) == 1  # 100m: still one
    assert cpus.cpu_count(_cgroup(tmp_path / "none", {"cpu.max": "max 100000"})) == 64
    assert cpus.cpu_count(_cgroup(tmp_path / "v1", {"cpu/cpu.cfs_quota_us": "400000",
                                                    "cpu/cpu.cfs_period_us": "100000"})) == 4
    # the server's decode pool is sized by it
    monkeypatch.setattr(cpus, "CGROUP_ROOT", str(_cgroup(tmp_path / "pod", {"cpu.max": "300000 100000"})))
    from serving.model import BrainTumorModel

    assert BrainTumorModel("unused").decoders._max_workers == 3
