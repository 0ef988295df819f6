"""The train placement step: where the training pod may run, from the GPUs it asks for.

Pod-spec settings cannot depend on a pipeline parameter's value, so the pipeline runs this step
first and hands its outputs to the train step's pod (kfp-kubernetes' *_json settings).
"""

from __future__ import annotations

from brainscan.config import gpu_placement


def train_placement(gpus: int) -> tuple[dict, list]:
    """(node selector, tolerations) of the training pod: GPU nodes when it asks for GPUs, any node otherwise."""
    node_selector, tolerations = gpu_placement(gpus)
    print(f"train: {gpus} GPU(s): node selector {node_selector}, tolerations {tolerations}")
    return node_selector, tolerations
