"""Every name and default of brainscan, written once (as TFX templates keep theirs in configs.py).

`Recipe` is how a model is trained: train()'s options, their checks, and what the model bundle
records of them; the train step's inputs and `brainscan train`'s options are its fields.
`PipelineParams` is the one parameters object of a pipeline run, the recipe's fields and the
rest: the KFP pipeline takes its fields as parameters (with their help as the one-line
description the Kubeflow UI shows), the local runner runs it, and the CLI turns each field into
an option. `ServeSettings` does the
same for the model server. `PRESETS` are named sets of pipeline parameters (`--preset`).

Standard library only: the CLI reads this module to build its options before any heavy import.
"""

import dataclasses
import os
import typing
from dataclasses import dataclass, field

from brainscan import layout, limits

# ----------------------------------------------------------------------------- names
MODEL_NAME = "brain-tumor"  # MLflow registered model, v2 model name, InferenceService name
CHAMPION_ALIAS = "champion"  # the MLflow alias of the version that is served; moves only once it serves
CANDIDATE_ALIAS = "candidate"  # the MLflow alias of the latest registered version not yet promoted


def champion_uri(name: str = MODEL_NAME) -> str:
    """The MLflow URI of a registered model's deployed version."""
    return f"models:/{name}@{CHAMPION_ALIAS}"


def version_uri(name: str, version: str) -> str:
    """The MLflow URI of one version of a registered model."""
    return f"models:/{name}/{version}"


def version_of(uri: str) -> str:
    """The version of a `models:/NAME/VERSION` URI."""
    return uri.rsplit("/", 1)[-1]


def pinned_version(uri: str) -> tuple[str, str] | None:
    """(NAME, VERSION) of a `models:/NAME/VERSION` URI; None for an alias, s3:// or a path."""
    if not uri.startswith("models:/"):
        return None
    name, _, version = uri[len("models:/"):].rpartition("/")
    return (name, version) if name and version.isdigit() else None


CHAMPION_URI = champion_uri()
EXPERIMENT = "brainscan"  # MLflow experiment of the register runs
KAGGLE_DATASET = "murtozalikhon/brain-tumor-multimodal-image-ct-and-mri"
DEFAULT_SOURCE = f"kaggle:{KAGGLE_DATASET}"
DEFAULT_WORKDIR = ".brainscan"  # local stack, pipeline root, summaries
DEMO_WORKDIR = ".brainscan-demo"
NAMESPACE = "kubeflow-user"  # the Kubeflow profile namespace the manifests in infra/k8s use
S3_SECRET = "brainscan-s3"  # Kubernetes secret of the pipeline steps: a read-write S3 key, MLflow settings
# The predictor's own secret: the same keys, with an S3 key that may only read the model artifacts
# (infra/s3/serving-readonly-policy.json); the predictor never gets the pipeline's.
SERVING_S3_SECRET = "brainscan-s3-readonly"
S3_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
MLFLOW_ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")
SERVING_SERVICE_ACCOUNT = "brainscan-serving"
PIPELINE_IMAGE = "ghcr.io/brainscan/brainscan-pipeline:0.1.0"
SERVING_IMAGE = "ghcr.io/brainscan/brainscan-serving:0.1.0"
# Where a user's registry holds the images: these variables, read when the pipeline is compiled
# (or a run submitted), become the defaults of the pipeline's image parameters below.
PIPELINE_IMAGE_ENV = "BRAINSCAN_PIPELINE_IMAGE"
TRAIN_IMAGE_ENV = "BRAINSCAN_PIPELINE_GPU_IMAGE"
SERVING_IMAGE_ENV = "BRAINSCAN_SERVING_IMAGE"


def default_pipeline_image() -> str:
    return os.environ.get(PIPELINE_IMAGE_ENV) or PIPELINE_IMAGE


def default_train_image() -> str:
    """The training step's (GPU) image: its own variable, else the pipeline image a user set, else ours + -gpu."""
    return os.environ.get(TRAIN_IMAGE_ENV) or os.environ.get(PIPELINE_IMAGE_ENV) or PIPELINE_IMAGE + "-gpu"


def default_serving_image() -> str:
    return os.environ.get(SERVING_IMAGE_ENV) or SERVING_IMAGE


# GPU nodes, as the NVIDIA GPU operator labels and taints them: the training pod and a
# RawDeployment predictor that ask for GPUs go there (a Serverless one cannot: see
# brainscan/inferenceservice.py).
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = ({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},)


def gpu_placement(gpus: int) -> tuple[dict, list]:
    """(node selector, tolerations) of a pod asking for `gpus` GPUs: GPU nodes only when it asks for any."""
    if gpus > 0:
        return dict(GPU_NODE_SELECTOR), [dict(t) for t in GPU_TOLERATIONS]
    return {}, []


# KServe deployment modes, by the names every KServe release accepts; KServe 0.16 renamed them
# (Knative, Standard) and still reads these. The InferenceService carries the name given here.
SERVERLESS = "Serverless"  # Knative: scale to zero, canary revisions; one container port
RAW_DEPLOYMENT = "RawDeployment"  # a plain Deployment + Service (KServe's "Standard")
DEPLOYMENT_MODES = {SERVERLESS: SERVERLESS, "Knative": SERVERLESS, RAW_DEPLOYMENT: RAW_DEPLOYMENT,
                    "Standard": RAW_DEPLOYMENT}


def canonical_deployment_mode(name: str) -> str:
    """The canonical mode for a name (either spelling); ValueError for anything else."""
    if name not in DEPLOYMENT_MODES:
        raise ValueError(f"deployment mode {name!r}: expected one of {', '.join(DEPLOYMENT_MODES)}")
    return DEPLOYMENT_MODES[name]


def check_canary(percent: int | None, deployment_mode: str | None, name: str = "canary_percent",
                 lowest: int = 1) -> None:
    """ValueError unless a canary of `percent` % of the traffic (None: no canary) fits: a share from `lowest`
    to 100, in a deployment mode with revisions to split traffic between. An unknown mode is an error
    whether or not there is a canary; None: the mode is checked later."""
    serverless = deployment_mode is None or canonical_deployment_mode(deployment_mode) == SERVERLESS
    if percent is None:
        return
    if not lowest <= percent <= 100:
        raise ValueError(f"{name} must be within {lowest}..100, got {percent}")
    if not serverless:
        raise ValueError(f"{name} needs deployment_mode Serverless (Knative splits traffic between revisions; "
                         "a RawDeployment has none)")


PIPELINE_NAME = "brainscan-train"
RETRAIN_PIPELINE_NAME = "brainscan-retrain-if-new-data"
# Seconds a KFP API request may wait to connect, and then for each answer, before it fails: an API
# that accepts a connection and never answers must not hold a caller (the retrain watcher) forever.
KFP_TIMEOUT_S = 30.0

# ----------------------------------------------------------------------------- data
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15
MIN_IMAGE_SIZE = 71  # the smallest input Xception accepts
MAX_IMAGE_PIXELS = limits.MAX_IMAGE_PIXELS  # one image's width x height, judged from its header

IO_WORKERS = 16  # parallel reads / uploads: S3 latency, not bandwidth, is the limit

# ----------------------------------------------------------------------------- model and recipe
# The training recipe's choices (Recipe below).
LR_SCHEDULES = ("constant", "cosine")
TUMOR_AUX = ("none", "head", "softmax")  # auxiliary tumor loss: none, a training-only head, the softmax's P(tumor)
MONITORS = ("val_loss", "val_tumor_auc")  # what early stopping and the best checkpoint follow
# A model trained with flip test-time augmentation (`tta_flip`) is saved as one network that
# averages its inner classifier over the image and its mirror image; this layer (the mirrored
# input) marks such a model, and Grad-CAM (brainscan.explain) looks into the inner classifier.
TTA_FLIPPED_LAYER = "tta_flipped"


@dataclass(frozen=True)
class ValidationLimits:
    """What the great-expectations suite accepts (validate step, `brainscan validate`)."""

    min_per_class: int = field(default=20, metadata={"help": "Minimum images in each class."})
    max_class_ratio: float = field(default=5.0, metadata={"help": "Largest class / smallest class, at most."})
    min_side: int = field(default=64, metadata={"help": "Smallest image side allowed (px)."})
    max_side: int = field(default=limits.MAX_IMAGE_SIDE, metadata={"help": "Largest image side allowed (px)."})
    allow_corrupt: float = field(default=0.0, metadata={"help": "Fraction of undecodable files tolerated."})
    max_duplicate_fraction: float = field(default=0.2, metadata={"help": "Fraction of exact duplicates tolerated."})


VALIDATION = ValidationLimits()

# Where a local run tells its steps to deploy to the local model server instead of a cluster
# (an environment variable: configuration, not a pipeline parameter).
LOCAL_DEPLOY_ENV = "BRAINSCAN_LOCAL_DEPLOY_WORKDIR"


def _param(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Recipe:
    """How a model is trained: train()'s options, recorded in the model bundle. The defaults are the
    cluster's original recipe (299 px, ImageNet weights, a frozen base then fine-tuning); each field's
    help, bounds (min, max) and choices are written here once, for the pipeline, the CLI and the checks."""

    image_size: int = _param(299, "Square input size in pixels (Xception accepts 71 and up).", min=MIN_IMAGE_SIZE)
    epochs: int = _param(10, "Stage 1 epochs: the head on a frozen base, or the whole network from scratch.", min=1)
    fine_tune_epochs: int = _param(5, "Stage 2 epochs at a lower learning rate (fine-tuning).", min=0)
    batch_size: int = _param(32, "Images per training step, over all GPUs.", min=1)
    learning_rate: float = _param(1e-3, "Stage 1 learning rate (stage 2 uses a fraction of it).")
    base_weights: str = _param("imagenet", "Xception start: imagenet, none (from scratch), or a path / s3:// URI "
                                           "of an .h5 weights file.")
    seed: int = _param(42, "Seed of the split and of training: same seed, same result.")
    patience: int = _param(4, "Early stopping patience in epochs, on the monitored validation score (monitor).", min=1)
    # The recipe options proper; their defaults are the original recipe.
    crop_to_head: bool = _param(False, "Crop each scan to the head's bounding box before resizing (recorded in the "
                                       "model bundle: evaluation, serving and the registered model crop too).")
    lr_schedule: str = _param("constant", "Stage 1 learning rate: constant, or cosine (decays to 0 after the warm-up; "
                                          "one stage: fine_tune_epochs 0).", choices=LR_SCHEDULES)
    warmup_epochs: int = _param(0, "Epochs of linear learning-rate warm-up before the cosine decay.", min=0)
    weight_decay: float = _param(0.0, "AdamW decoupled weight decay (0: Adam); biases and BatchNorm are not decayed.",
                                 min=0.0)
    augment_flip: bool = _param(False, "Random left-right flips in the training augmentation.")
    mixup: float = _param(0.0, "Mixup of training images, Beta(alpha, alpha) with this alpha (0: off).", min=0.0)
    label_smoothing: float = _param(0.0, "Label smoothing of the 7-class cross-entropy (0: off).", min=0.0, max=0.99)
    tumor_aux: str = _param("none", "Auxiliary tumor loss: none, head (a sigmoid tumor head beside the softmax, "
                                    "training only) or softmax (binary cross-entropy of the softmax's P(tumor)).",
                            choices=TUMOR_AUX)
    tumor_aux_weight: float = _param(0.5, "Weight of the auxiliary tumor loss (tumor_aux head or softmax).", min=0.0)
    monitor: str = _param("val_loss", "What early stopping and the best checkpoint follow: val_loss, or "
                                      "val_tumor_auc (validation ROC-AUC of P(tumor)).", choices=MONITORS)
    tta_flip: bool = _param(False, "Test-time flip averaging baked into the saved model: its softmax is the mean over "
                                   "the scan and its mirror image (twice the inference work).")
    ema: float = _param(0.0, "Momentum of an exponential moving average of the weights used for validation, "
                             "checkpoints and the saved model (0: off; e.g. 0.99).", min=0.0, max=0.999999)
    precise_bn: bool = _param(False, "From scratch: recompute the BatchNorm statistics over the un-augmented training "
                                     "images before every validation.")

    _kind: typing.ClassVar[str] = "recipe option"  # what replace() calls an unknown name

    def __post_init__(self):  # the recipe's checks, in one place: clear errors before anything runs
        for f in dataclasses.fields(Recipe):
            value, bounds = getattr(self, f.name), f.metadata
            if "choices" in bounds and value not in bounds["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(bounds['choices'])}, got {value!r}")
            if "min" in bounds and value < bounds["min"]:
                raise ValueError(f"{f.name} must be at least {bounds['min']}, got {value!r}")
            if "max" in bounds and value > bounds["max"]:
                raise ValueError(f"{f.name} must be at most {bounds['max']}, got {value!r}")
        if self.lr_schedule == "cosine" and self.fine_tune_epochs:
            raise ValueError("the cosine schedule is one stage: set fine-tune epochs to 0")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be fewer than epochs ({self.epochs})")
        # no start weights, however spelled (an empty option or None): "none"
        object.__setattr__(self, "base_weights", str(self.base_weights or "none"))

    @classmethod
    def from_dict(cls, values: typing.Mapping) -> "Recipe":
        """The recipe of those `values` that are its fields (others keep their default; other keys are ignored)."""
        return cls(**{name: values[name] for name in param_names(cls) if name in values})

    @property
    def from_scratch(self) -> bool:
        return self.base_weights == "none"

    def fine_tune_learning_rate(self) -> float:
        """Stage 2's rate. Pretrained: the head learns first, then the top of the base at 1/100 the rate.
        From scratch: all of it learns from the start, then the whole network again at 1/10."""
        return self.learning_rate / (10 if self.from_scratch else 100)

    def metadata(self) -> dict:
        """The recipe as the model bundle records it: every option, those that did not apply as None / False."""
        recorded = {name: getattr(self, name) for name in param_names(Recipe)}
        return {**recorded, "tumor_aux_weight": self.tumor_aux_weight if self.tumor_aux != "none" else None,
                "precise_bn": bool(self.precise_bn and self.from_scratch)}

    def replace(self, **changes):
        unknown = sorted(set(changes) - set(param_names(type(self))))
        if unknown:
            raise ValueError(f"unknown {self._kind}(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PipelineParams(Recipe):
    """The parameters of a pipeline run: the training recipe (Recipe's fields, first) and where the data
    comes from and goes, the gate, and the deployment, with the cluster's defaults (a GPU)."""

    source: str = _param(DEFAULT_SOURCE, "Images: kaggle:OWNER/DATASET (or .../versions/N), an s3:// prefix, a folder or a .zip.")
    bucket: str = _param("brainscan", "S3 bucket for the dataset copy, splits, models and reports.")
    prefix: str = _param("pipeline", "Prefix inside the bucket for this pipeline's data.")
    target_recall: float = _param(0.99, "Recall the threshold promises with 95% confidence, calibrated on the "
                                        "validation split (sample size included).")
    min_recall: float = _param(0.95, "Gate: lowest recall the test split can promise (95% lower bound) to register "
                                     "and deploy the model.")
    min_auc: float = _param(0.95, "Gate: lowest test ROC-AUC to register and deploy the model.")
    gpus: int = _param(1, "GPUs for the training step (0: CPU only, on any node).", min=0)
    namespace: str = _param(NAMESPACE, "Kubernetes namespace of the InferenceService.")
    canary_percent: int = _param(0, "Traffic share for the new model: 0 replaces the served one at once, "
                                    "10 starts a 10 % canary (the champion moves only with all traffic).",
                                    min=0, max=100)
    model_name: str = _param(MODEL_NAME, "MLflow registered model name.")
    deployment_mode: str = _param(SERVERLESS, "KServe deployment mode: Serverless (Knative; canaries, scale to "
                                              "zero) or RawDeployment (Standard: a Deployment, also gRPC, GPU node "
                                              "selector and toleration).")
    serving_gpus: int = _param(1, "GPUs per predictor replica (0: CPU only).", min=0)
    pipeline_image: str = _param(default_pipeline_image(), "Image of every step but training (default: "
                                                   f"${PIPELINE_IMAGE_ENV} at compile time).")
    train_image: str = _param(default_train_image(), f"Image of the training step, the GPU variant (default: ${TRAIN_IMAGE_ENV} "
                                             "at compile time).")
    serving_image: str = _param(default_serving_image(), "KServe predictor image the deploy step rolls out (default: "
                                                 f"${SERVING_IMAGE_ENV} at compile time).")

    _kind: typing.ClassVar[str] = "pipeline parameter"

    def __post_init__(self):  # clear errors before anything runs
        super().__post_init__()
        check_canary(self.canary_percent or None, self.deployment_mode)  # 0: no canary
        layout.check_location(self.bucket, self.prefix)  # the data's place: no `..`, no empty part

    @property
    def recipe(self) -> Recipe:
        """The training recipe of this run (what the train step and `brainscan train` take)."""
        return Recipe.from_dict(self.as_dict())


DEFAULTS = PipelineParams()

# Named parameter sets. "gpu": the cluster defaults above (the recipe options were measured from
# scratch only, so the transfer-learning recipe stays the original one). "cpu": the best recipe 2 CPU
# cores can train from scratch on a few hundred real scans (docs/results/model_study/runs.jsonl,
# grouped 5-fold CV, held-out P(tumor) ROC-AUC on folds 0 and 1: 0.945 / 0.968, flip-averaged
# 0.956 / 0.974, against 0.911 / 0.910 (flip-averaged 0.906 / 0.905) for the two-stage baseline;
# cropping to the head cost CT 0.06); no GPU anywhere, so the CPU image. Its target recall, 0.98, is
# the calibration study's choice on that model (docs/results/calibration_study/: test recall >= 0.97
# in 99.4% of 1,000 resampled halves, median precision 0.82; 0.99 held 99.9% but fell to precision
# 0.80 and specificity 0.38). "demo": `brainscan demo`'s
# tiny model on the synthetic archive, with a gate to match.
PRESETS: dict[str, dict] = {
    "gpu": {},
    "cpu": {"image_size": 96, "epochs": 40, "fine_tune_epochs": 0, "patience": 40, "batch_size": 16,
            "base_weights": "none", "lr_schedule": "cosine", "warmup_epochs": 2, "weight_decay": 0.02,
            "augment_flip": True, "tta_flip": True, "crop_to_head": False, "target_recall": 0.98,
            "gpus": 0, "serving_gpus": 0, "train_image": DEFAULTS.pipeline_image},
    "demo": {"image_size": 71, "epochs": 10, "fine_tune_epochs": 2, "batch_size": 8, "base_weights": "none",
             "patience": 10, "target_recall": 0.95, "min_recall": 0.80, "min_auc": 0.80, "prefix": "demo", "gpus": 0,
             "serving_gpus": 0},
}


def preset(name: str | None, given: dict | None = None) -> PipelineParams:
    """The parameters of a preset (None: the defaults) with those `given` over them."""
    return DEFAULTS.replace(**preset_arguments(name, given))


def preset_arguments(name: str | None, given: dict | None = None) -> dict:
    """The parameters that differ from the defaults: a preset's (None: none), with those `given` over them."""
    if name is not None and name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return {**(PRESETS[name] if name else {}), **(given or {})}


@dataclass(frozen=True)
class ServeSettings:
    """How `brainscan serve` runs: ports, batching, and what one request may hold."""

    host: str = _param("127.0.0.1", "Address to bind (0.0.0.0 only inside a container).")
    http_port: int = _param(8080, "v2 REST port.")
    grpc_port: int = _param(8081, "v2 gRPC port.")
    max_batch_size: int = _param(32, "Most images per batched model call.", min=1)
    max_latency_ms: float = _param(5.0, "Longest wait for a batch to fill, in milliseconds.", min=0.0)
    max_queue: int = _param(1024, "Images allowed to wait for the model; beyond that 503.", min=1)
    max_images: int = _param(64, "Images allowed in one request.", min=1)
    max_image_bytes: int = _param(20 * 1024 * 1024, "Bytes of one encoded image file.", min=1)
    max_pixels: int = _param(MAX_IMAGE_PIXELS, "Width x height of one image, read from its header before decoding.", min=1)
    max_request_bytes: int = _param(64 * 1024 * 1024, "Largest REST body or gRPC message.", min=1)
    # On SIGTERM the server stops listening and answers every request it accepted, waiting up
    # to this long (then cancels): longer than the longest request (a full queue, an explain).
    # The pod's terminationGracePeriodSeconds must exceed it (plus any preStop delay).
    drain_timeout_s: int = _param(120, "Seconds to finish accepted requests after SIGTERM before cancelling them "
                                       "(the longest request: a CPU batch of 64 images, or Grad-CAMs).", min=1)
    runtime: str = _param("auto", "What runs the model: auto (ONNX Runtime on a CPU, TensorFlow on a GPU), "
                                  "onnx, tf (compiled) or keras (eager); each checked against Keras at load.")


def param_names(cls=PipelineParams) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def param_types(cls=PipelineParams) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in param_names(cls)}


def param_help(name: str, cls=PipelineParams) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


def param_field(name: str, cls=PipelineParams) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


# ----------------------------------------------------------------------------- gate, deploy and watch
# How much worse than the champion's test recall and ROC-AUC a candidate may be (the evaluate step's
# gate). The pipeline has no parameter for it: its runs use this; `brainscan evaluate --tolerance` sets it.
CHAMPION_TOLERANCE = 0.02


@dataclass(frozen=True)
class DeploySettings:
    """How a model is rolled out (`brainscan deploy`) and how its pods stop; the pipeline's deploy step uses
    the defaults.

    Drain: the kubelet runs the predictor's preStop wait (`prestop_s`: endpoints and ingress stop sending
    it traffic meanwhile), then sends SIGTERM; the server answers what it accepted within
    `ServeSettings.drain_timeout_s`, and exits. `drain_grace_s`, the pod's terminationGracePeriodSeconds, counts from
    the start of preStop and covers all of it: the server (serving/) and the manifests
    (brainscan/inferenceservice.py) both read these, nothing else sets them."""

    timeout_s: float = _param(600, "Seconds to wait for Ready before rolling back.")
    poll_interval_s: float = _param(5.0, "Seconds between status polls.")
    min_replicas: int = _param(2, "Fewest predictor replicas: 2 keeps one serving through a node drain or a "
                                  "restart (1 or 0 is allowed, without that promise).", min=0)
    max_replicas: int = _param(3, "Most predictor replicas.", min=1)
    prestop_s: int = _param(5, "Seconds a stopping predictor keeps serving before SIGTERM while the "
                               "endpoints and the ingress drop it.", min=0)
    exit_margin_s: int = _param(5, "Seconds left after the last request to flush and exit.", min=0)

    @property
    def drain_grace_s(self) -> int:
        """The predictor pod's terminationGracePeriodSeconds: preStop, then the server's drain, then the exit."""
        return self.prestop_s + ServeSettings().drain_timeout_s + self.exit_margin_s


DEPLOY = DeploySettings()


@dataclass(frozen=True)
class WatchSettings:
    """How the retrain watcher (`brainscan retrain watch`, pipelines/watcher.py) checks the source."""

    interval_s: float = _param(300, "Seconds between checks.", min=1)
    settle_checks: int = _param(2, "Start a run once the same data was seen on this many checks in a row "
                                   "(an upload in progress changes it from check to check).", min=1)
    kfp_timeout_s: float = _param(KFP_TIMEOUT_S, "Seconds a KFP API request may wait to connect, and then for "
                                                 "each answer, before it fails (the next check tries again).", min=0.1)
    heartbeat: str = _param("", "A file the watcher touches at every check and while it reads images: "
                                "`brainscan retrain alive` tells a liveness probe whether it is fresh.")
    # Above the interval plus the longest stretch of a check without progress (S3 and MLflow retries,
    # the KFP requests of a submit at kfp_timeout_s each): a stale heartbeat means a stuck watcher.
    max_age_s: float = _param(900, "`brainscan retrain alive`: seconds the heartbeat may be old before the "
                                   "watcher counts as stuck.", min=1)


WATCH = WatchSettings()
