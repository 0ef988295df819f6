#!/bin/bash
# Does `brainscan serve` run on a read-only root filesystem with only HOME and TMPDIR writable, as the
# predictor pod has them (brainscan/inferenceservice.py SCRATCH_VOLUMES)? Run as root from the
# repository root, with the project's Python first on PATH (needs unshare and strace):
#   PATH=.venv/bin:$PATH bash infra/checks/read_only_root.sh
# In a private mount namespace it remounts / read-only, puts a tmpfs on HOME and TMPDIR, serves a tiny
# untrained model, sends a predict and an explain, stops the server with SIGTERM, then lists every
# write that failed on the read-only root (EROFS) and what landed in HOME and TMPDIR.
set -euo pipefail
if [ "${1:-}" != "--inside" ]; then
    work=$(mktemp -d /tmp/brainscan-rofs.XXXXXX)
    python -c "
from tests.fixtures.registry import make_tiny_model, TINY_SIZE
from brainscan.modelstore import save_bundle
save_bundle(make_tiny_model(), '$work/model', TINY_SIZE, {'trained_by': 'infra/checks/read_only_root.sh'})" 2>/dev/null
    mkdir -p "$work/home" "$work/tmp" "$work/out"
    rc=0
    unshare --mount --propagation private bash "$0" --inside "$work" "$PWD" "$(command -v python)" || rc=$?
    rm -rf "$work"
    exit $rc
fi
work=$2; repo=$3; python=$4
port=$("$python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
grpc=$("$python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
for dir in home tmp out; do mount -t tmpfs -o size=1g tmpfs "$work/$dir"; done
mount -o remount,bind,ro /
if touch /.rofs-probe 2>/dev/null; then echo "the root filesystem is still writable"; exit 2; fi
cd / && env -i PATH=/usr/bin:/bin HOME="$work/home" TMPDIR="$work/tmp" PYTHONPATH="$repo" PYTHONDONTWRITEBYTECODE=1 \
    strace -f -qq -e trace=openat,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat -e status=failed \
    -o "$work/out/strace.log" "$python" -m cli serve --model "$work/model" --threshold 0.5 \
    --http-port "$port" --grpc-port "$grpc" > "$work/out/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/v2/health/ready" > /dev/null && break; sleep 1; done
cd "$repo" && PYTHONDONTWRITEBYTECODE=1 "$python" - "$port" <<'PY'
import io
import sys

import numpy as np
from PIL import Image

from serving import client

url = f"http://127.0.0.1:{sys.argv[1]}"
image = io.BytesIO()
Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype("uint8")).save(image, "JPEG")
print("predict:", client.predict(url, [image.getvalue()])[0]["label"])
print("explain:", "overlay_png" in client.explain(url, image.getvalue()))
PY
kill -TERM "$server"; wait "$server" || true
failed=$(grep -c EROFS "$work/out/strace.log" || true)
echo "writes refused by the read-only root: $failed"
grep EROFS "$work/out/strace.log" | cut -c1-200 | head -20 || true
echo "written to HOME and TMPDIR:"
(cd "$work" && find home tmp -type f | sed 's/[0-9a-z_]\{8,\}\.py$/<generated>.py/' | sort)
[ "$failed" = 0 ]
