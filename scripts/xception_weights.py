"""The headless Xception ImageNet weights file that the pipeline image bakes in (`scripts/images.sh`).

    python scripts/xception_weights.py CACHE_DIR      -> prints "PATH KIND"

KIND `imagenet`: Keras's own file, downloaded once into CACHE_DIR and checked against the md5
that keras.applications.Xception verifies. Where it cannot be downloaded (no internet but the
package registries), KIND `standin`: an untrained Xception's weights saved under the real file
name, in the same legacy HDF5 layout and with the same shapes, so the image build and its smoke
test (tests/images/) run offline through the very same Keras loading code. A stand-in is never
used where the real file can be had.
"""

from __future__ import annotations

import hashlib
import sys
import urllib.request
from pathlib import Path

NAME = "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"
URL = f"https://storage.googleapis.com/tensorflow/keras-applications/xception/{NAME}"
MD5 = "b0042744bf5b25fce3cb969f33bebb97"  # keras.applications.xception's file_hash for this file


def md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - the checksum Keras itself uses for this file, not security
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(folder: Path, timeout: float = 30) -> Path | None:
    """The real file in folder (downloaded if absent); None when it cannot be had."""
    path = folder / NAME
    if path.is_file() and md5(path) == MD5:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    try:
        with urllib.request.urlopen(URL, timeout=timeout) as response, open(partial, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
    except OSError as err:
        print(f"cannot download {URL} ({err}); using a stand-in", file=sys.stderr)
        partial.unlink(missing_ok=True)
        return None
    if md5(partial) != MD5:
        partial.unlink()
        print(f"{URL}: md5 differs from Keras's ({MD5}); using a stand-in", file=sys.stderr)
        return None
    partial.replace(path)
    return path


def standin(folder: Path) -> Path:
    """An untrained headless Xception's weights in the legacy HDF5 layout Keras's applications use."""
    path = folder / NAME
    if path.is_file():
        return path
    # lazy: Keras (and its backend's start-up) and h5py only when a stand-in is built, not for a download
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    folder.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    model = keras.applications.Xception(include_top=False, weights=None)
    partial = path.with_suffix(".part")
    with h5py.File(partial, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    partial.replace(path)
    return path


def main(cache: str) -> None:
    folder = Path(cache)
    real = download(folder / "imagenet")
    if real is not None:
        print(real, "imagenet")
    else:
        print(standin(folder / "standin"), "standin")


if __name__ == "__main__":
    main(sys.argv[1])
