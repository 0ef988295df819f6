#!/usr/bin/env bash
# `bash scripts/dev.sh images`: build the project's images with buildah and smoke-test them.
#
#   localhost/brainscan-pipeline:dev   infra/docker/pipeline.Dockerfile (every KFP step)
#   localhost/brainscan-serving:dev    infra/docker/serving.Dockerfile  (the KServe predictor)
#
# Each is built on its base pinned by digest (resolved here when the base is named by tag; the
# labels org.opencontainers.image.base.name/.digest say which), and gets an SBOM, CycloneDX JSON of
# its Python and Debian packages (cyclonedx-py run inside the image; scripts/sbom.py), written to
# $BRAINSCAN_SBOM_DIR (default build/sbom/IMAGE.cdx.json). BRAINSCAN_REQUIRE_BASE_DIGEST=1 refuses
# a base named by tag only (release builds: BRAINSCAN_BASE_IMAGE=python:3.11-slim@sha256:...).
#
# Then tests/images/ runs them as UID 1000 (`buildah run --isolation chroot --user 1000`): the
# baked ImageNet weights load with no network at all, the compiled pipeline's own container
# command for ingest, validate and split writes its outputs against the local stack, and the
# serving image serves a registered model (S3 + MLflow) to tritonclient over HTTP and gRPC.
#
# Needs root and buildah (installed with apt when missing; mmdebstrap too). The base is
# python:3.11-slim when it can be pulled, else a local stand-in built with mmdebstrap from
# Debian 12's own python3.11 (same contract: `python`/`pip` of Python 3.11 on PATH, in a venv at
# /usr/local so pip may install; PEP 668 leaves Debian's system Python alone). BRAINSCAN_BASE_IMAGE
# names another base. Caches outside the repository, under $BRAINSCAN_IMAGE_CACHE (default
# ~/.cache/brainscan-images): the base tarball, the weights file, build logs; buildah keeps its
# layer cache (--layers) in its own storage, so a second run rebuilds only what changed. (The
# Dockerfiles' pip cache mount stays empty on these machines: pip caches nothing behind their
# egress proxy. Downloads are not the slow part here; installing is.)
set -euo pipefail
cd "$(dirname "$0")/.."

PIPELINE_TAG="${BRAINSCAN_PIPELINE_TAG:-localhost/brainscan-pipeline:dev}"
SERVING_TAG="${BRAINSCAN_SERVING_TAG:-localhost/brainscan-serving:dev}"
CACHE="${BRAINSCAN_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/brainscan-images}"
UPSTREAM_BASE=docker.io/library/python:3.11-slim
STANDIN_BASE=localhost/brainscan-base:python3.11-bookworm
HOST_CA=/etc/ssl/certs/ca-certificates.crt
PYTHON=.venv/bin/python
SBOM_DIR="${BRAINSCAN_SBOM_DIR:-build/sbom}"

# The stand-in base, written once: its hash names the cached tarball and labels the image.
STANDIN_RECIPE=(
    --variant=minbase --include=python3.11,python3.11-venv,ca-certificates
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    # as Debian's -slim images: no manuals, translations or docs but the copyright files
    --dpkgopt=path-exclude=/usr/share/man/* --dpkgopt=path-exclude=/usr/share/locale/*
    --dpkgopt=path-exclude=/usr/share/doc/* --dpkgopt=path-include=/usr/share/doc/*/copyright
    --skip=output/dev
    # python3.11's venv at /usr/local: /usr/local/bin/python, pip, as in python:3.11-slim
    --customize-hook='chroot "$1" python3.11 -m venv /usr/local'
    # pip trusts the system CA store (pip 24.2+ in python:3.11-slim does so through truststore)
    --customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" > "$1/etc/pip.conf"'
    bookworm
)

started=$SECONDS
log() { printf '[images +%ss] %s\n' "$((SECONDS - started))" "$*" >&2; }
die() { log "error: $*"; exit 1; }

ensure_tools() {
    local missing=()
    command -v buildah >/dev/null || missing+=(buildah)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    [[ ${#missing[@]} -eq 0 ]] && return
    [[ $(id -u) -eq 0 ]] || die "${missing[*]} missing: install them (apt-get install ${missing[*]}) or run as root"
    log "installing ${missing[*]} with apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

standin_base() {
    local key tar ctr
    key=$(printf '%s\n' "${STANDIN_RECIPE[@]}" | sha256sum | cut -c1-16)
    if buildah inspect --type image "$STANDIN_BASE" >/dev/null 2>&1 \
            && [[ $(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "brainscan.base.recipe"}}' \
                    "$STANDIN_BASE") == "$key" ]]; then
        log "base: $STANDIN_BASE (built before)"
        return
    fi
    tar="$CACHE/base/bookworm-python3.11-$key.tar"
    if [[ ! -s "$tar" ]]; then
        log "base: mmdebstrap Debian 12 + python3.11 -> $tar"
        mkdir -p "$CACHE/base"
        mmdebstrap --quiet --format=tar "${STANDIN_RECIPE[@]}" "$tar.part" >"$CACHE/logs/base.log" 2>&1 \
            || { tail -n 20 "$CACHE/logs/base.log" >&2; die "mmdebstrap failed (log: $CACHE/logs/base.log)"; }
        mv "$tar.part" "$tar"
    fi
    log "base: importing $tar as $STANDIN_BASE"
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$tar" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
        --cmd python3 --label brainscan.base.recipe="$key" \
        --label org.opencontainers.image.description="local stand-in for python:3.11-slim (Debian 12 python3.11)" "$ctr"
    buildah commit --quiet --rm "$ctr" "$STANDIN_BASE" >/dev/null
    log "base: $STANDIN_BASE"
}

choose_base() {
    if [[ -n "${BRAINSCAN_BASE_IMAGE:-}" ]]; then
        BASE="$BRAINSCAN_BASE_IMAGE"
    elif buildah inspect --type image "$UPSTREAM_BASE" >/dev/null 2>&1 \
            || timeout 120 buildah pull --quiet "$UPSTREAM_BASE" >/dev/null 2>&1; then
        BASE="$UPSTREAM_BASE"
    else
        log "base: $UPSTREAM_BASE cannot be pulled here; a local stand-in instead"
        standin_base
        BASE="$STANDIN_BASE"
        return
    fi
    log "base: $BASE"
}

pin_base() {  # BASE by digest: the build names exactly what it was built on
    if [[ $BASE != *@sha256:* && ${BRAINSCAN_REQUIRE_BASE_DIGEST:-0} == 1 ]]; then
        die "base $BASE is named by tag only (BRAINSCAN_REQUIRE_BASE_DIGEST=1): give NAME@sha256:..."
    fi
    buildah inspect --type image "$BASE" >/dev/null 2>&1 || buildah pull --quiet "$BASE" >/dev/null \
        || die "base $BASE cannot be found or pulled"
    BASE_DIGEST=$(buildah inspect --type image --format '{{.FromImageDigest}}' "$BASE")
    [[ $BASE_DIGEST == sha256:* ]] || die "no digest for base $BASE"
    if [[ $BASE == *@sha256:* && ${BASE##*@} != "$BASE_DIGEST" ]]; then
        die "base $BASE resolved to $BASE_DIGEST"
    fi
    BASE_NAME=${BASE%@*}
    BASE="$BASE_NAME@$BASE_DIGEST"
    log "base pinned: $BASE"
}

bake_weights() {  # the weights file into the pipeline image's build context
    local path kind
    read -r path kind < <(TF_CPP_MIN_LOG_LEVEL=3 "$PYTHON" scripts/xception_weights.py "$CACHE/weights" \
                          2>"$CACHE/logs/weights.log" | tail -n 1)
    [[ -s "$path" ]] || die "no Xception weights file"
    cp -f "$path" infra/docker/weights/
    WEIGHTS_CHECK=$([[ $kind == imagenet ]] && echo keras || echo none)
    export BRAINSCAN_WEIGHTS_KIND=$kind
    log "weights: $kind ($path)"
}

build() {  # dockerfile tag [build args...]
    local dockerfile=$1 tag=$2
    shift 2
    local args=(--isolation chroot --layers --network host --build-arg "BASE_IMAGE=$BASE"
                --label "org.opencontainers.image.base.name=$BASE_NAME"
                --label "org.opencontainers.image.base.digest=$BASE_DIGEST" "$@")
    # pip in the build trusts what this host trusts (a TLS-inspecting proxy's CA, say): the
    # host's bundle is mounted over the image's for the RUN steps only, never copied into it.
    [[ -s $HOST_CA ]] && args+=(--volume "$HOST_CA:$HOST_CA:ro")
    local logfile="$CACHE/logs/$(basename "$dockerfile" .Dockerfile).log"
    log "building $tag from $dockerfile (log: $logfile)"
    buildah bud "${args[@]}" -f "$dockerfile" -t "$tag" . >"$logfile" 2>&1 \
        || { tail -n 40 "$logfile" >&2; die "building $tag failed (whole log: $logfile)"; }
}

sbom() {  # tag: $SBOM_DIR/NAME.cdx.json, the image's own packages (read inside the image)
    local tag=$1 name ctr site digest work
    name=$(basename "${tag%:*}")
    site=$("$PYTHON" -c 'import cyclonedx_py, pathlib; print(pathlib.Path(cyclonedx_py.__file__).parents[1])')
    digest=$(buildah inspect --type image --format '{{.FromImageDigest}}' "$tag")
    work=$(mktemp -d)
    ctr=$(buildah from --pull-never "$tag")
    # cyclonedx-py from this venv, mounted read-only and put on sys.path of its own process only
    # (appended: the image's packages win), reading the interpreter the image runs.
    buildah run --isolation chroot --volume "$site:/opt/sbom-tool:ro" "$ctr" -- python -c \
        'import runpy, sys; sys.path.append("/opt/sbom-tool"); sys.argv = ["cyclonedx-py", *sys.argv[1:], sys.executable]; runpy.run_module("cyclonedx_py", run_name="__main__")' \
        environment --output-reproducible -o - > "$work/python.cdx.json"
    buildah run --isolation chroot "$ctr" -- dpkg-query -W -f '${Package}\t${Version}\t${Architecture}\n' > "$work/dpkg.tsv"
    buildah rm "$ctr" >/dev/null
    mkdir -p "$SBOM_DIR"
    "$PYTHON" -m scripts.sbom --python "$work/python.cdx.json" --dpkg "$work/dpkg.tsv" --image "$tag" \
        --digest "$digest" --base "$BASE_NAME" --base-digest "$BASE_DIGEST" -o "$SBOM_DIR/$name.cdx.json" >&2
    rm -rf "$work"
}

[[ -x $PYTHON ]] || die "$PYTHON missing: run through \`bash scripts/dev.sh images\`"
ensure_tools
mkdir -p "$CACHE/logs"
choose_base
pin_base
bake_weights
build infra/docker/pipeline.Dockerfile "$PIPELINE_TAG" --build-arg "XCEPTION_WEIGHTS_CHECK=$WEIGHTS_CHECK"
build infra/docker/serving.Dockerfile "$SERVING_TAG"
sbom "$PIPELINE_TAG"
sbom "$SERVING_TAG"
log "built in $((SECONDS - started))s:"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -F -e "$PIPELINE_TAG" -e "$SERVING_TAG" -e "$BASE" >&2 || true

if [[ ${BRAINSCAN_IMAGES_SMOKE:-1} == 0 ]]; then
    log "smoke tests skipped (BRAINSCAN_IMAGES_SMOKE=0)"
    exit 0
fi
log "smoke tests (tests/images) as UID 1000"
BRAINSCAN_IMAGES=1 BRAINSCAN_SBOM_DIR="$SBOM_DIR" BRAINSCAN_PIPELINE_IMAGE_UNDER_TEST="$PIPELINE_TAG" BRAINSCAN_SERVING_IMAGE_UNDER_TEST="$SERVING_TAG" \
    "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" tests/images "$@"
log "images built and smoke-tested in $((SECONDS - started))s"
