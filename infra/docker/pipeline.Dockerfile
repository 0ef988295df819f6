# The image every KFP pipeline step runs in (`base_image` of the components in pipelines/).
#
# Build from the repository root:
#   docker build -f infra/docker/pipeline.Dockerfile -t REGISTRY/brainscan-pipeline:TAG .
#   docker build -f infra/docker/pipeline.Dockerfile --build-arg TENSORFLOW_GPU=true \
#       -t REGISTRY/brainscan-pipeline:TAG-gpu .          # the training step's GPU image
#
# The ImageNet Xception weights are downloaded once, here, at build time, into $KERAS_HOME:
# training on the cluster then never needs the internet (clusters often have none).
FROM python:3.11-slim

# GPU variant: tensorflow[and-cuda] ships CUDA and cuDNN as pip wheels, so the slim base
# works on GPU nodes (the driver comes from the NVIDIA container toolkit).
ARG TENSORFLOW_GPU=false
ARG TENSORFLOW_VERSION=2.21.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    KERAS_HOME=/opt/keras

WORKDIR /app

COPY requirements.lock /app/requirements.lock
RUN if [ "$TENSORFLOW_GPU" = "true" ]; then \
        grep -v '^tensorflow-cpu==' requirements.lock > /tmp/requirements.txt \
        && echo "tensorflow[and-cuda]==${TENSORFLOW_VERSION}" >> /tmp/requirements.txt; \
    else \
        cp requirements.lock /tmp/requirements.txt; \
    fi \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Bake the ImageNet weights into the Keras cache ($KERAS_HOME/models/...), readable by any
# UID: KFP may run steps under an arbitrary user. Both files: the full network and the
# headless one (include_top=False) that transfer learning loads.
RUN mkdir -p "$KERAS_HOME" \
    && python -c "import keras; keras.applications.Xception(weights='imagenet')" \
    && python -c "import keras; keras.applications.Xception(weights='imagenet', include_top=False)" \
    && ls "$KERAS_HOME"/models/xception_weights_tf_dim_ordering_tf_kernels.h5 \
          "$KERAS_HOME"/models/xception_weights_tf_dim_ordering_tf_kernels_notop.h5 \
    && chmod -R a+rX "$KERAS_HOME"

COPY pyproject.toml README.md /app/
COPY brainscan /app/brainscan
COPY components /app/components
COPY serving /app/serving
COPY pipelines /app/pipelines
# Never run as root (fixed UID 1000).
RUN pip install --no-cache-dir --no-deps /app \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin brainscan
USER 1000

CMD ["brainscan", "--help"]
