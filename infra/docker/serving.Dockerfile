# The KServe predictor image: `brainscan serve` (a kserve.ModelServer) on the model at $MODEL_URI.
#
# Build from the repository root:
#   docker build -f infra/docker/serving.Dockerfile -t REGISTRY/brainscan-serving:TAG .
# The InferenceService (brainscan/inferenceservice.py) sets MODEL_URI and the S3 / MLflow
# environment; the image holds no model and no credentials.
#
# Lean: it installs requirements-serving.lock (what `brainscan serve` imports: kserve, TensorFlow,
# the MLflow client and boto3), not the development lock: no kfp, great-expectations, awscli,
# MLflow server or test tools. `scripts/dev.sh images` builds it and serves a registered model
# from it as UID 1000 (tests/images/).
#
# GPU: the same Dockerfile with --build-arg TENSORFLOW_GPU=true installs infra/docker/serving-gpu.lock:
# tensorflow[and-cuda] at tensorflow-cpu's version (pip wheels that carry CUDA and cuDNN); the node's
# NVIDIA driver comes in through the NVIDIA container toolkit, so the slim Python base stays the same.
# Every lock carries hashes: pip refuses any file that does not match (--require-hashes).
# BASE_IMAGE: any Debian-like image whose `python`/`pip` are Python 3.11, best pinned by digest
# (python:3.11-slim@sha256:...); scripts/images.sh resolves the base to its digest before building
# and builds a local stand-in where the registry's python:3.11-slim cannot be pulled.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TENSORFLOW_GPU=false

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /app

# Dependencies first (their own layer): the serving lock pins (and hashes) the whole tree at
# requirements.lock's versions. The pip cache is a build cache mount: reused by the next build where pip can cache,
# never in the image.
COPY requirements-serving.lock infra/docker/serving-gpu.lock /tmp/locks/
# --no-deps: the lock is the whole tree, and pip's hash mode would refuse the extras that
# dependencies ask for (kserve's uvicorn[standard]); pip check then proves the tree complete.
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "$TENSORFLOW_GPU" = "true" ]; then \
        lock=/tmp/locks/serving-gpu.lock; \
    else \
        lock=/tmp/locks/requirements-serving.lock; \
    fi \
    && pip install --require-hashes --no-deps -r "$lock" \
    && pip check \
    && rm -r /tmp/locks

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
    && rm -rf /tmp/src \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin brainscan
# Never run as root: a fixed UID so PodSecurity "restricted" and runAsNonRoot accept the image.
USER 1000

# http (REST, v1 and v2 Open Inference Protocol, /metrics) and grpc (v2, h2c).
EXPOSE 8080 8081

ENV MODEL_URI=""
# JSON form with a shell so $MODEL_URI expands at start; exec keeps the server as PID 1
# so it gets SIGTERM from Kubernetes and drains.
CMD ["sh", "-c", "exec brainscan serve --host 0.0.0.0 --model \"$MODEL_URI\""]
