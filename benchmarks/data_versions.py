"""Benchmark: ingest in place against an immutable data version (hashed first, written once), first run and rerun.

Starts its own SeaweedFS (brainscan.local.stack, in a temp dir, stopped at the end), writes a
synthetic archive (brainscan.local.synth) and ingests it twice with each function, each into a
fresh bucket: `ingest(source, dest)` and `ingest_version(source, datasets)`, which reads and hashes
every file once more to name the version, and reuses a complete version on a rerun.

    .venv/bin/python benchmarks/data_versions.py [per_class, default 60]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid

from brainscan import storage
from brainscan.local import stack, synth
from components.ingest import ingest, ingest_version


def main(per_class: int) -> None:
    work = tempfile.mkdtemp(prefix="brainscan-bench-versions-")
    source = synth.generate(os.path.join(work, "source"), per_class=per_class, seed=3)
    info = stack.up(os.path.join(work, "stack"))
    try:
        os.environ.update(info.env())
        storage.reset_clients()
        for name, step in (("ingest", ingest), ("ingest_version", ingest_version)):
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            storage.ensure_bucket(bucket)
            seconds = []
            for _ in range(2):
                started = time.perf_counter()
                result = step(source.out_dir, f"s3://{bucket}/data", progress=False)
                seconds.append(time.perf_counter() - started)
            print(f"{name:15s} {result.files} files, {result.bytes / 1e6:.1f} MB: first {seconds[0]:.2f} s, "
                  f"rerun {seconds[1]:.2f} s (rerun uploaded {result.uploaded})")
    finally:
        stack.down(os.path.join(work, "stack"))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60)
