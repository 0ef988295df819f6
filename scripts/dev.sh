#!/usr/bin/env bash
# The project's two entry points on a fresh machine (only Python 3.11 needed):
#   bash scripts/dev.sh demo   -> the main job: the whole pipeline on the local stack
#   bash scripts/dev.sh test   -> the test suite
# Both create .venv from the pinned lock file first (skipped when it is up to date). And:
#   bash scripts/dev.sh images -> build the pipeline and serving images with buildah and
#                                 smoke-test them as UID 1000 (scripts/images.sh; root)
#   bash scripts/dev.sh lock   -> recompile every lock file (see lock() below), with hashes
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
VENV=.venv
STAMP="$VENV/.brainscan-lock.sha256"

bootstrap() {
    local want
    want=$(cat requirements.lock pyproject.toml scripts/dev.sh | sha256sum | cut -d' ' -f1)
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
        return
    fi
    echo "[setup] creating $VENV from requirements.lock" >&2
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check uv==0.9.30
    # Bytecode compiled once here: where PYTHONDONTWRITEBYTECODE is set, every process (each
    # pipeline step, server and CLI call) would otherwise compile TensorFlow & co. from source
    # (measured: importing tensorflow, mlflow, keras, kfp, great_expectations 28 s -> 10 s).
    "$VENV/bin/uv" pip install --quiet --compile-bytecode --require-hashes --python "$VENV/bin/python" -r requirements.lock
    "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" --no-deps -e .
    echo "$want" > "$STAMP"
}

# Every lock carries sha256 hashes (pip and uv then refuse any file that does not match) and is
# compiled under requirements.lock's versions (-c) wherever it shares packages with it: one pin per
# package. Recompiling keeps the versions already pinned (uv prefers the output file's).
lock() {
    local uv="$VENV/bin/uv" tmp
    local hashed=(--quiet --generate-hashes --python-version 3.11)
    "$uv" pip compile "${hashed[@]}" requirements.in -o requirements.lock
    "$uv" pip compile "${hashed[@]}" requirements-serving.in -c requirements.lock -o requirements-serving.lock
    tmp=$(mktemp -d)
    # GPU images: tensorflow[and-cuda] at tensorflow-cpu's version, resolved for Linux x86_64 (CUDA wheels)
    sed 's/^tensorflow-cpu\b/tensorflow[and-cuda]/' requirements.in > "$tmp/requirements.in"
    sed 's/^tensorflow-cpu\b/tensorflow[and-cuda]/' requirements-serving.in > "$tmp/requirements-serving.in"
    local gpu=("${hashed[@]}" -c requirements.lock --python-platform x86_64-manylinux_2_28)
    "$uv" pip compile "${gpu[@]}" "$tmp/requirements.in" -o infra/docker/pipeline-gpu.lock
    "$uv" pip compile "${gpu[@]}" "$tmp/requirements-serving.in" -o infra/docker/serving-gpu.lock
    # MLServer's image: the registered model's requirements at this lock's versions, plus MLServer's
    # pins; resolved on their own (MLServer needs an older uvloop than requirements.lock's).
    "$VENV/bin/python" -W ignore -c 'import re; from brainscan import pyfunc
pins = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", open("requirements.lock").read(), re.M))
print(*(f"{name}=={pins[name]}" for name in pyfunc.REQUIREMENTS if name in pins), sep="\n")' \
        > "$tmp/model-requirements.txt"
    "$uv" pip compile "${hashed[@]}" "$tmp/model-requirements.txt" brainscan/local/mlserver-requirements.txt \
        -o infra/docker/mlserver.lock
    rm -rf "$tmp"
}

cmd="${1:-}"
shift || true
case "$cmd" in
    setup)
        bootstrap ;;
    demo)
        bootstrap
        exec "$VENV/bin/brainscan" demo "$@" ;;
    test)
        bootstrap
        # tests/e2e runs the whole pipeline through kfp.local (several minutes on 2 cores);
        # BRAINSCAN_E2E=0 leaves it out for a quicker round.
        extra=()
        if [[ "${BRAINSCAN_E2E:-1}" == "0" ]]; then extra+=(--ignore=tests/e2e); fi
        # pytest exits 5 when nothing was collected: that is a failure here, not a pass.
        exec "$VENV/bin/python" -m pytest -ra --durations=25 "${extra[@]}" "$@" ;;
    images)
        bootstrap
        exec bash scripts/images.sh "$@" ;;
    lock)
        bootstrap
        lock ;;
    *)
        echo "usage: bash scripts/dev.sh {setup|demo|test|images|lock} [args...]" >&2
        exit 2 ;;
esac
