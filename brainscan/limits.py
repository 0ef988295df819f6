"""What one image may be before anything decodes it: the limits the model's own code enforces.

Standard library only, and shipped inside the registered MLflow model with the preprocessing
that reads it (brainscan/pyfunc.py), so a model carries no cluster settings (brainscan.config
re-exports the values for the server's and validation's options).
"""

# The image file formats a model reads: training's (validation refuses any other), so serving
# accepts no file the model never saw. Each holds one picture; decoding it allocates what its
# header says, which the pixel limit below bounds before anything is decoded.
IMAGE_FORMATS = ("JPEG", "PNG")

# One pixel limit for validation (training data) and serving: the largest side validation
# accepts, squared, is the most width x height one served image may have (read from its header
# before anything is decoded: decompression bombs). The archive's largest scans are about
# 1,500 px a side.
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
