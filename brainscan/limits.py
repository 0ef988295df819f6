"""What one image may be before anything decodes it: the limits the model's own code enforces.

Standard library only, and shipped inside the registered MLflow model with the preprocessing
that reads it (brainscan/pyfunc.py), so a model carries no cluster settings (brainscan.config
re-exports the value for the server's and validation's options).
"""

# The image file formats a model reads: training's (validation refuses any other), so serving
# accepts no file the model never saw. Each holds one picture; decoding it allocates what its
# header says, which the pixel limit below bounds before anything is decoded.
IMAGE_FORMATS = ("JPEG", "PNG")

# Width x height of one image, read from its header before anything is decoded (decompression
# bombs); the archive's largest scans are about 1,500 px a side.
MAX_IMAGE_PIXELS = 40_000_000
