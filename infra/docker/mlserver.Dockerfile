# KServe's runtime for `modelFormat: mlflow` (MLServer + mlserver-mlflow), able to run brainscan's
# registered MLflow model: the stock MLServer image has no TensorFlow. The model brings its own
# code (code_paths); this image brings only its requirements. ServingRuntime:
# infra/k8s/base/serving-runtime-mlserver.yaml; InferenceService: infra/k8s/examples/.
#
# Build from the repository root:
#   docker build -f infra/docker/mlserver.Dockerfile -t REGISTRY/brainscan-mlserver:TAG .
# BASE_IMAGE: best pinned by digest (python:3.11-slim@sha256:...), as scripts/images.sh does.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# The registered model's requirements (brainscan.pyfunc.REQUIREMENTS) at requirements.lock's versions,
# then MLServer and its MLflow runtime at brainscan/local/mlserver-requirements.txt's pins: one lock,
# every package pinned and hashed (`bash scripts/dev.sh lock` compiles it).
COPY infra/docker/mlserver.lock /tmp/mlserver.lock
# --no-deps: the lock is the whole tree, and pip's hash mode would refuse the extras that
# dependencies ask for (kserve's uvicorn[standard]); pip check then proves the tree complete.
RUN pip install --no-cache-dir --require-hashes --no-deps -r /tmp/mlserver.lock \
    && pip check \
    && rm /tmp/mlserver.lock \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin mlserver
USER 1000

# KServe mounts the model at /mnt/models and sets MLSERVER_MODEL_* (name, implementation, URI).
EXPOSE 8080 9000
CMD ["mlserver", "start", "/mnt/models"]
