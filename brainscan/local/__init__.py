"""The machine-local stack: SeaweedFS and MLflow on 127.0.0.1, the predictor and MLServer as
background processes, and the offline synthetic archive. For development, tests and `brainscan demo`;
nothing on a cluster imports it."""
