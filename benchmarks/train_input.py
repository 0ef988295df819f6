"""Is the tf.data input pipeline ever the bottleneck? Training images/second, two ways, same model:

  (a) from S3 split manifests through brainscan's training input (parallel S3 reads, decode,
      preprocess, cache, shuffle, augmentation, prefetch), S3 reads and decoding included;
  (b) from in-memory tensors (already preprocessed arrays; the same augmentation).

A local SeaweedFS (brainscan.local.stack) in a temporary folder stands in for S3; it is stopped at the end.
Synthetic images (brainscan.local.synth), so nothing depends on a dataset being present.

    .venv/bin/python benchmarks/train_input.py [--image-size 96] [--per-class 20] [--epochs 2]

Prints both rates and their ratio (a)/(b); the aim is 0.9 or better.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--per-class", type=int, default=20, help="images per class (7 classes)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    # after the arguments are read: --help answers without loading TensorFlow
    import keras
    import tensorflow as tf

    from brainscan import storage

    from brainscan.local import stack, synth
    from brainscan.network import augmenter, build_model
    from components.train import make_dataset, read_images
    from brainscan.dataset import read_split
    from brainscan.labels import CLASS_INDEX, label_from_path
    from brainscan.preprocessing import preprocess_batch

    size, batch = args.image_size, args.batch_size
    with tempfile.TemporaryDirectory(prefix="brainscan-bench-") as tmp:
        info = stack.up(Path(tmp) / "stack")
        os.environ.update(info.env())
        storage.reset_clients()
        try:
            archive = synth.generate(Path(tmp) / "archive", per_class=args.per_class, seed=0)
            files = sorted(p for p in (Path(archive.out_dir) / "Dataset").rglob("*") if p.is_file())
            rows = []
            for i, path in enumerate(files):
                uri = storage.write_bytes(f"s3://bench/images/{i:05d}{path.suffix}", path.read_bytes())
                rows.append(f"{uri},{label_from_path(path.as_posix())[1]}")
            storage.write_text("s3://bench/splits/train.csv", "path,class7\n" + "\n".join(rows) + "\n")
            n = len(rows)
            print(f"{n} images at {size}x{size} uploaded to local SeaweedFS; {args.epochs} epochs each way, "
                  f"batch {batch}", file=sys.stderr)

            keras.utils.set_random_seed(0)
            model, _ = build_model(size, "none")  # from scratch: the whole network trains
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
            # In-memory tensors: the same pixels, preprocessed up front (not timed).
            frame = read_split("s3://bench/splits", "train")
            labels = frame["class7"].map(CLASS_INDEX).to_numpy(np.int32)
            memory_x = preprocess_batch([p.read_bytes() for p in files], size)
            aug = augmenter(0)

            def memory_dataset():
                data = tf.data.Dataset.from_tensor_slices((memory_x, labels)).shuffle(n, seed=0).batch(batch)
                return data.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)\
                    .prefetch(tf.data.AUTOTUNE)

            # Warm-up: trace the train step once so neither timing pays for it.
            model.fit(memory_dataset().take(2), epochs=1, verbose=0, shuffle=False)

            started = time.perf_counter()
            model.fit(memory_dataset(), epochs=args.epochs, verbose=0, shuffle=False)
            memory_rate = n * args.epochs / (time.perf_counter() - started)

            started = time.perf_counter()
            frame = read_split("s3://bench/splits", "train")
            images = read_images(frame["path"].tolist())
            s3_data = make_dataset(images, frame["class7"].map(CLASS_INDEX).to_numpy(np.int32), size, batch,
                                   training=True, seed=0)
            model.fit(s3_data, epochs=args.epochs, verbose=0, shuffle=False)
            s3_rate = n * args.epochs / (time.perf_counter() - started)
        finally:
            stack.down(Path(tmp) / "stack")
    print(f"(a) from S3 manifests via tf.data : {s3_rate:8.1f} images/s (S3 reads and decoding included)")
    print(f"(b) from in-memory tensors        : {memory_rate:8.1f} images/s")
    print(f"ratio (a)/(b)                     : {s3_rate / memory_rate:8.2f}  (aim >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
