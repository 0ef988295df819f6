"""The predictor: a KServe model server speaking the Open Inference Protocol (v2) for `brain-tumor`."""
