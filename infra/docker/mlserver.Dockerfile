# KServe's runtime for `modelFormat: mlflow` (MLServer + mlserver-mlflow), able to run brainscan's
# registered MLflow model: the stock MLServer image has no TensorFlow. The model brings its own
# code (code_paths); this image brings only its requirements. ServingRuntime:
# infra/k8s/base/serving-runtime-mlserver.yaml; InferenceService: infra/k8s/examples/.
#
# Build from the repository root:
#   docker build -f infra/docker/mlserver.Dockerfile -t REGISTRY/brainscan-mlserver:TAG .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

COPY requirements.lock brainscan/local/mlserver-requirements.txt /tmp/
# The registered model's requirements (brainscan.pyfunc.REQUIREMENTS) at the lock's versions,
# then MLServer and its MLflow runtime.
RUN grep -E '^(mlflow|keras|tensorflow-cpu|numpy|pandas|pillow|h5py|protobuf)==' /tmp/requirements.lock \
        > /tmp/model-requirements.txt \
    && pip install --no-cache-dir -r /tmp/model-requirements.txt -r /tmp/mlserver-requirements.txt \
    && rm /tmp/requirements.lock /tmp/model-requirements.txt /tmp/mlserver-requirements.txt \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin mlserver
USER 1000

# KServe mounts the model at /mnt/models and sets MLSERVER_MODEL_* (name, implementation, URI).
EXPOSE 8080 9000
CMD ["mlserver", "start", "/mnt/models"]
