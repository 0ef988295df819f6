"""Where a profiled model server spent its time: py-spy's raw stacks summed into a few buckets.

    py-spy record --pid PID --duration 20 --rate 100 --threads --format raw --output prof.txt --nonblocking
    .venv/bin/python benchmarks/pyspy_summary.py prof.txt

(py-spy is not a project dependency: `uv pip install py-spy` into the venv.) Only samples of
threads that were running count (py-spy's default); a thread blocked in native code that
releases the GIL (a model call, a decode) counts as running. Each sample lands in the first
bucket whose markers appear in its stack.
"""

from __future__ import annotations

import collections
import sys

BUCKETS = (
    ("model call: eager Keras", ("predict_probabilities", "BrainTumorModel.load.<locals>.<lambda>")),
    ("model call: ONNX Runtime / tf.function", ("ServedModel.predict",)),
    ("image check (Pillow, full decode)", ("check_image_bytes",)),
    ("preprocessing: eager TensorFlow ops", ("preprocess_batch",)),
    ("preprocessing: compiled graph", ("CompiledPreprocessing.__call__",)),
    ("batcher", ("DynamicBatcher",)),
    ("decision and v2 response", ("postprocess", "decide", "to_rest", "InferResponse", "orjson")),
    ("v2 request parsing (JSON, base64)", ("_preprocess_v2", "_image_bytes", "_from_text", "decode_inference_request",
                                            "InferRequest")),
    ("HTTP server (uvicorn, starlette, fastapi, kserve middleware)", ("uvicorn", "starlette", "fastapi",
                                                                     "timing_asgi", "h11", "httptools")),
    ("gRPC server", ("grpc",)),
    ("logging and metrics", ("logging", "prometheus")),
    ("waiting (select, queue get)", ("select (selectors", "thread.py:81", "wait (threading")),
    ("event loop", ("asyncio", "uvloop")),
)


def main(path: str, top: int = 12) -> None:
    buckets: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total = 0
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
        bucket = next((name for name, markers in BUCKETS
                       if any(marker in frame for frame in frames for marker in markers)), "other")
        buckets[bucket] += n
        threads[thread][bucket] += n
        leaves[frames[-1]] += n
    print(f"{total} samples of running threads")
    for name, n in buckets.most_common():
        print(f"  {100 * n / total:5.1f}%  {name}")
    if len(threads) > 1:
        print("by thread (its share of all samples, then its top buckets):")
        for thread, counter in sorted(threads.items(), key=lambda kv: -sum(kv[1].values()))[:8]:
            n = sum(counter.values())
            parts = ", ".join(f"{name} {100 * c / n:.0f}%" for name, c in counter.most_common(3))
            print(f"  {100 * n / total:5.1f}%  {thread[:60]}: {parts}")
    print("top leaf frames:")
    for frame, n in leaves.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame[:140]}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
