# The KServe predictor image: `brainscan serve` (a kserve.ModelServer) on the model at $MODEL_URI.
#
# Build from the repository root:
#   docker build -f infra/docker/serving.Dockerfile -t REGISTRY/brainscan-serving:TAG .
# The InferenceService (serving/inferenceservice.py) sets MODEL_URI and the S3 / MLflow
# environment; the image holds no model and no credentials.
#
# GPU: the same Dockerfile with --build-arg TENSORFLOW_GPU=true swaps tensorflow-cpu for
# tensorflow[and-cuda] (pip wheels that carry CUDA and cuDNN); the node's NVIDIA driver comes
# in through the NVIDIA container toolkit, so the slim Python base stays the same.
FROM python:3.11-slim

ARG TENSORFLOW_GPU=false
ARG TENSORFLOW_VERSION=2.21.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /app

# Dependencies first (their own layer): the lock pins the whole tree.
COPY requirements.lock /app/requirements.lock
RUN if [ "$TENSORFLOW_GPU" = "true" ]; then \
        grep -v '^tensorflow-cpu==' requirements.lock > /tmp/requirements.txt \
        && echo "tensorflow[and-cuda]==${TENSORFLOW_VERSION}" >> /tmp/requirements.txt; \
    else \
        cp requirements.lock /tmp/requirements.txt; \
    fi \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY pyproject.toml README.md /app/
COPY brainscan /app/brainscan
COPY components /app/components
COPY serving /app/serving
COPY pipelines /app/pipelines
# The project itself, without touching the pinned dependencies. Never run as root: a fixed
# UID so PodSecurity "restricted" and runAsNonRoot accept the image.
RUN pip install --no-cache-dir --no-deps /app \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin brainscan
USER 1000

# http (REST, v1 and v2 Open Inference Protocol) and grpc (v2, h2c).
EXPOSE 8080 8081

ENV MODEL_URI=""
# JSON form with a shell so $MODEL_URI expands at start; exec keeps the server as PID 1
# so it gets SIGTERM from Kubernetes and drains.
CMD ["sh", "-c", "exec brainscan serve --host 0.0.0.0 --model \"$MODEL_URI\""]
