"""Benchmark: `brainscan ingest` against `aws s3 sync` uploading the same folder of small images.

Starts its own SeaweedFS (brainscan.local.stack, in a temp dir, stopped at the end), writes a folder of
small images in the archive layout, and uploads it with both tools, each run into a fresh prefix,
as command-line processes (start-up counts for both). brainscan also hashes and decodes every
image and writes the manifest; sync only copies. Prints files/s and MB/s and the ratio end to end,
and after start-up (each tool's time for a one-file folder subtracted), since interpreter start-up
is a large share of a few hundred small files.

    .venv/bin/python benchmarks/ingest.py [--files 400] [--repeats 3] [--workers 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from brainscan.local import stack

LAYOUT = [
    ("Brain Tumor CT scan Images", "Healthy", "ct_healthy"),
    ("Brain Tumor CT scan Images", "Tumor", "ct_tumor"),
    ("Brain Tumor MRI images", "Healthy", "mri_healthy"),
    ("Brain Tumor MRI images", "Tumor", "glioma"),
    ("Brain Tumor MRI images", "Tumor", "meningioma"),
    ("Brain Tumor MRI images", "Tumor", "pituitary"),
    ("Brain Tumor MRI images", "Tumor", "tumor"),
]


def write_images(root: Path, files: int, seed: int = 0) -> tuple[int, int]:
    """`files` small JPEG/PNG images (64-192 px, smooth noise) in the archive layout; (files, bytes)."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(files):
        modality, group, stem = LAYOUT[i % len(LAYOUT)]
        folder = root / "Dataset" / modality / group
        folder.mkdir(parents=True, exist_ok=True)
        side = int(rng.integers(64, 193))
        small = rng.integers(0, 255, size=(side // 8 + 1, side // 8 + 1), dtype=np.uint8)
        image = Image.fromarray(small).resize((side, side), Image.BILINEAR)
        path = folder / f"{stem} ({i // len(LAYOUT) + 1}).{'png' if i % 5 == 0 else 'jpg'}"
        image.save(path, format="PNG" if i % 5 == 0 else "JPEG", quality=90)
        total += path.stat().st_size
    return files, total


def timed(command: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="brainscan-bench-") as tmp:
        tmp = Path(tmp)
        files, nbytes = write_images(tmp / "images", args.files)
        print(f"folder: {files} images, {nbytes / 1e6:.2f} MB", file=sys.stderr)
        info = stack.up(tmp / "stack")
        try:
            env = {**os.environ, **info.env()}
            # Both tools are Python programs; as installed normally they run from bytecode caches. This
            # machine sets PYTHONDONTWRITEBYTECODE and the venv has no __pycache__, so every start would
            # compile both from source: give both a cache in the temp dir (the warm-up fills it).
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
            # Warm up: the bucket and SeaweedFS's first volumes exist before either tool is timed.
            subprocess.run([str(bin_dir / "aws"), "s3", "mb", "s3://bench"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            subprocess.run([str(bin_dir / "aws"), "s3", "sync", "--only-show-errors", str(tmp / "images"),
                            "s3://bench/warm-up"], env=env, check=True)
            subprocess.run([str(bin_dir / "brainscan"), "ingest", "--source", str(tmp / "images"), "--dest",
                            "s3://bench/warm-up-brainscan", "--no-progress"], env=env, check=True,
                           capture_output=True)
            write_images(tmp / "one", 1, seed=1)  # one image: what each tool costs before the first file
            times: dict[tuple[str, str], list[float]] = {}
            for run in range(args.repeats):
                for folder in ("images", "one"):
                    seconds, out = timed([str(bin_dir / "brainscan"), "ingest", "--source", str(tmp / folder),
                                          "--dest", f"s3://bench/brainscan-{folder}-{run}", "--workers",
                                          str(args.workers), "--no-progress", "--json"], env)
                    summary = json.loads(out.strip().splitlines()[-1])
                    assert summary["uploaded"] == summary["files"], summary
                    times.setdefault(("brainscan ingest", folder), []).append(seconds)
                    seconds, _ = timed([str(bin_dir / "aws"), "s3", "sync", "--only-show-errors", str(tmp / folder),
                                        f"s3://bench/sync-{folder}-{run}/images"], env)
                    times.setdefault(("aws s3 sync", folder), []).append(seconds)
                print(f"run {run + 1}: brainscan ingest {times['brainscan ingest', 'images'][-1]:.2f}s, "
                      f"aws s3 sync {times['aws s3 sync', 'images'][-1]:.2f}s", file=sys.stderr)
        finally:
            stack.down(tmp / "stack")

    rows = {}
    for name in ("brainscan ingest", "aws s3 sync"):
        seconds = statistics.median(times[name, "images"])
        startup = statistics.median(times[name, "one"])
        # After start-up: the files beyond the first over the time beyond the one-file run.
        marginal = (files - 1) / max(seconds - startup, 1e-3)
        rows[name] = (files / seconds, nbytes / 1e6 / seconds, marginal)
        print(f"{name:17s} median {seconds:6.2f}s  {files / seconds:7.1f} files/s  {nbytes / 1e6 / seconds:6.2f} MB/s"
              f"   (one-file run {startup:5.2f}s; after start-up {marginal:7.1f} files/s)")
    ratio = rows["brainscan ingest"][0] / rows["aws s3 sync"][0]
    marginal_ratio = rows["brainscan ingest"][2] / rows["aws s3 sync"][2]
    print(f"throughput ratio brainscan / sync: {ratio:.2f}x end to end, {marginal_ratio:.2f}x after start-up "
          f"({files} files, {nbytes / 1e6:.2f} MB, {args.repeats} runs each, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f})")

if __name__ == "__main__":
    main()
