"""Where a pipeline run keeps its data in the object store: every URI of that layout is built here.

    s3://{bucket}/{prefix}/dataset/...                          ingest's copy of the source (one per source)
    s3://{bucket}/{prefix}/dataset/validation/...               the validation report of that data
    s3://{bucket}/{prefix}/splits/<fingerprint>-seed<seed>/...  split CSVs (a pure function of the data and seed)
    s3://{bucket}/{prefix}/runs/<run id>/model/...              the model bundle one run trained
    s3://{bucket}/{prefix}/runs/<run id>/evaluation/...         its evaluation report, plots and explanations

What lies inside each folder is its step's business (brainscan.dataset, brainscan.bundle,
brainscan.evaluation_report). Standard library only: the KFP component bodies import it in the step's
container.
"""

from __future__ import annotations

FINGERPRINT_CHARS = 16  # of the dataset fingerprint in a split's folder name: unique enough, still readable


def folder_of(uri: str) -> str:
    """The folder (URI prefix) holding an object or a folder."""
    return str(uri).rsplit("/", 1)[0]


def _run_root(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix.strip('/')}"


def dataset_uri(bucket: str, prefix: str) -> str:
    """Ingest's copy of the source: images, manifest.csv, ingest.json."""
    return f"{_run_root(bucket, prefix)}/dataset"


def validation_uri(data_uri: str) -> str:
    """The validation report of a dataset, inside it."""
    return f"{data_uri.rstrip('/')}/validation"


def splits_uri(data_uri: str, fingerprint: str, seed: int) -> str:
    """The split of a dataset with one seed, beside the dataset: the same data and seed, the same folder."""
    return f"{folder_of(data_uri)}/splits/{fingerprint[:FINGERPRINT_CHARS]}-seed{seed}"


def model_uri(bucket: str, prefix: str, run_id: str) -> str:
    """The model bundle a pipeline run trains."""
    return f"{_run_root(bucket, prefix)}/runs/{run_id}/model"


def evaluation_uri(model_uri: str) -> str:
    """The evaluation of a run's model: beside the bundle, in the same run folder."""
    return f"{folder_of(model_uri)}/evaluation"
