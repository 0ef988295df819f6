"""brainscan: brain-tumor detection on CT and MRI scans, as a Kubeflow / MLflow / KServe pipeline.

Shared pieces live here (label schema, storage, local stack, CLI); the pipeline stages live
in the top-level folders `components/`, `pipelines/` and `serving/`, installed as
`components`, `pipelines` and `serving`.
"""

__version__ = "0.1.0"
