"""The one-machine stack: SeaweedFS, MLflow, the predictor and MLServer on 127.0.0.1, and synthetic data.

For development, tests and `brainscan demo`; nothing on a cluster imports it.
"""
