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

# The largest file ingest takes in (bytes): an image at the pixel limit stored uncompressed, four
# bytes a pixel (RGBA, the widest mode validation accepts), plus 1 MiB of headers and metadata.
# No image the pixel limit admits is larger; a bigger file is refused before it is read.
MAX_IMAGE_BYTES = MAX_IMAGE_PIXELS * 4 + 1024 * 1024
