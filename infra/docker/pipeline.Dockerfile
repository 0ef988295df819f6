# The image every KFP pipeline step runs in (the `pipeline_image` / `train_image` parameters of the
# compiled pipeline; brainscan.config.PipelineParams).
#
# Build from the repository root:
#   docker build -f infra/docker/pipeline.Dockerfile -t REGISTRY/brainscan-pipeline:TAG .
#   docker build -f infra/docker/pipeline.Dockerfile --build-arg TENSORFLOW_GPU=true \
#       -t REGISTRY/brainscan-pipeline:TAG-gpu .          # the training step's GPU image
#
# The headless ImageNet Xception weights (what transfer learning loads) are baked in at build
# time, into $KERAS_HOME/models, owned by the image's user (UID 1000, group 0 for clusters that
# pick a random UID in group 0): Keras uses $KERAS_HOME only where it may write there, and would
# otherwise fall back to /tmp/.keras and download again. Training on the cluster never needs the
# internet. The file comes from, in this order:
#   - the build context: infra/docker/weights/xception_weights_tf_dim_ordering_tf_kernels_notop.h5
#     (air-gapped builds: copy the file there first; its md5 is checked by Keras below);
#   - --build-arg XCEPTION_WEIGHTS_URL=https://mirror.example/...h5 (an internal mirror);
#   - Keras's own download (storage.googleapis.com) when neither is given.
# XCEPTION_WEIGHTS_CHECK=keras (default) loads them once through Keras, which verifies the md5;
# `none` skips that, only for a local stand-in file that cannot match (scripts/dev.sh images),
# and leaves $KERAS_HOME/models/UNVERIFIED in the image to say so.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# GPU variant: infra/docker/pipeline-gpu.lock, tensorflow[and-cuda] at tensorflow-cpu's version, ships
# CUDA and cuDNN as pip wheels, so the slim base works on GPU nodes (the driver comes from the NVIDIA
# container toolkit). Every lock carries hashes: pip refuses any file that does not match.
ARG TENSORFLOW_GPU=false

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    KERAS_HOME=/opt/keras

WORKDIR /app

# Never run as root: a fixed UID (PodSecurity "restricted", runAsNonRoot).
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin brainscan

# The pip cache is a build cache mount: reused by the next build where pip can cache, never in the image.
COPY requirements.lock infra/docker/pipeline-gpu.lock /tmp/locks/
# --no-deps: the lock is the whole tree, and pip's hash mode would refuse the extras that
# dependencies ask for (kserve's uvicorn[standard]); pip check then proves the tree complete.
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "$TENSORFLOW_GPU" = "true" ]; then \
        lock=/tmp/locks/pipeline-gpu.lock; \
    else \
        lock=/tmp/locks/requirements.lock; \
    fi \
    && pip install --require-hashes --no-deps -r "$lock" \
    && pip check \
    && rm -r /tmp/locks

ARG XCEPTION_WEIGHTS_URL=""
ARG XCEPTION_WEIGHTS_CHECK=keras
COPY infra/docker/weights/ /tmp/weights/
RUN set -eu; \
    name=xception_weights_tf_dim_ordering_tf_kernels_notop.h5; \
    mkdir -p "$KERAS_HOME/models"; \
    if [ -f "/tmp/weights/$name" ]; then \
        cp "/tmp/weights/$name" "$KERAS_HOME/models/$name"; \
    elif [ -n "$XCEPTION_WEIGHTS_URL" ]; then \
        python -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
            "$XCEPTION_WEIGHTS_URL" "$KERAS_HOME/models/$name"; \
    fi; \
    rm -rf /tmp/weights; \
    if [ "$XCEPTION_WEIGHTS_CHECK" = "keras" ]; then \
        python -c "import keras; keras.applications.Xception(weights='imagenet', include_top=False)"; \
    else \
        echo "$name: not checked against Keras's md5 (a stand-in?)" > "$KERAS_HOME/models/UNVERIFIED"; \
    fi; \
    test -s "$KERAS_HOME/models/$name"; \
    chown -R 1000:0 "$KERAS_HOME"; \
    chmod -R g=u "$KERAS_HOME"

# The project itself, without touching the pinned dependencies, from a copy of the sources that is
# removed again: sources in the working directory would shadow the installed package for
# `python -m ...` (how KFP starts every step), which then misses components & co.
COPY pyproject.toml README.md /tmp/src/
COPY brainscan /tmp/src/brainscan
COPY components /tmp/src/components
COPY serving /tmp/src/serving
COPY pipelines /tmp/src/pipelines
COPY cli /tmp/src/cli
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps /tmp/src \
    && rm -rf /tmp/src
USER 1000

CMD ["brainscan", "--help"]
