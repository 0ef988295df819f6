"""Explanations: Grad-CAM heat maps and LIME super-pixels over a bundle's predictions.

Grad-CAM uses the last 4-D activation of the network (for Xception: the output of the
convolutional base, block14_sepconv2_act), weighted by the gradient of one class score.
`gradcam_overlay(bundle, image_bytes)` is what the model server calls: one image in, a PNG out;
evaluation writes overlays of test images with `gradcam` and `lime_png`. Not a pipeline step:
a view on a model that serving and evaluation share.
"""

from __future__ import annotations

import io
import weakref
from typing import Sequence

import numpy as np

from brainscan.config import TTA_FLIPPED_LAYER
from brainscan.labels import CLASSES


# ----------------------------------------------------------------------------- Grad-CAM
def _last_conv_path(model):
    """(nested model or None, layer) of the last layer with a 4-D output.

    Looks at the top level first; if the 4-D part is hidden inside a nested model (e.g.
    Xception built with pooling="avg"), looks inside the last nested model that has one.
    """
    import keras  # TensorFlow's import costs seconds: only when a model is explained

    for layer in reversed(model.layers):
        shape = getattr(layer, "output", None)
        shape = getattr(shape, "shape", None)
        if shape is not None and len(shape) == 4 and not isinstance(layer, keras.layers.InputLayer):
            return None, layer
    for layer in reversed(model.layers):
        if isinstance(layer, keras.Model):
            for inner in reversed(layer.layers):
                shape = getattr(getattr(inner, "output", None), "shape", None)
                if shape is not None and len(shape) == 4 and not isinstance(inner, keras.layers.InputLayer):
                    return layer, inner
    raise ValueError(f"model {model.name!r} has no 4-D (convolutional) layer for Grad-CAM")


class _GradCam:
    """Callable x -> (conv activations, class probabilities), built once per model."""

    def __init__(self, model):
        import keras  # see _last_conv_path

        nested, layer = _last_conv_path(model)
        self.layer_name = layer.name
        self.forward = self.chain = None
        if nested is None and not isinstance(layer, keras.Model):
            self.forward = keras.Model(model.inputs, [layer.output, model.output])
            return
        # The conv part sits in a nested model (the project's Xception base is one layer of the
        # outer model): run the outer layers in order, taking the activation from the base.
        if nested is None:
            base, inner = layer, layer  # the nested model's own output is the last conv activation
        else:
            base, inner = nested, keras.Model(nested.inputs, [layer.output, nested.outputs[0]])
        self.chain = [(inner if l is base else l, l is base) for l in model.layers
                      if not isinstance(l, keras.layers.InputLayer)]
        self.pair = nested is not None

    def __call__(self, x):
        if self.forward is not None:
            conv, probs = self.forward(x, training=False)
            return conv, probs
        conv = None
        for layer, is_base in self.chain:
            if is_base:
                out = layer(x, training=False)
                conv, x = out if self.pair else (out, out)
            else:
                x = layer(x, training=False)
        return conv, x


_CAMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _explained_model(model):
    """The model Grad-CAM looks into: a flip-averaging (test-time augmentation) model is explained
    through its inner network on the image as given (the mirrored pass is left out)."""
    import keras  # see _last_conv_path

    if any(layer.name == TTA_FLIPPED_LAYER for layer in model.layers):
        return next(layer for layer in model.layers if isinstance(layer, keras.Model))
    return model


def _gradcam_for(model) -> _GradCam:
    """Built once per model and cached: building the grad model costs more than one image."""
    cam = _CAMS.get(model)
    if cam is None:
        cam = _CAMS[model] = _GradCam(_explained_model(model))
    return cam


def shown_image(bundle, image_bytes: bytes, preprocessed: np.ndarray):
    """What a heat map is drawn over: the scan itself, or for a bundle that crops to the head the
    model's own (cropped) input, which is the frame the heat map was computed on."""
    return preprocessed if bundle.preprocessing.get("crop_to_head") else image_bytes


def gradcam(model, images: np.ndarray, class_indices: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heat maps in [0, 1] of shape [N, h, w] (the conv grid) and the probabilities [N, 7].

    images: preprocessed float32 [N, S, S, 3]; class_indices: the class to explain per image
    (default: the predicted one).
    """
    import tensorflow as tf  # see _last_conv_path

    cam = _gradcam_for(model)
    x = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
    with tf.GradientTape() as tape:
        conv, probs = cam(x)
        tape.watch(conv)
        conv = tf.cast(conv, tf.float32)
        probs = tf.cast(probs, tf.float32)
        if class_indices is None:
            chosen = tf.argmax(probs, axis=1, output_type=tf.int32)
        else:
            chosen = tf.constant(list(class_indices), dtype=tf.int32)
        score = tf.gather(probs, chosen, axis=1, batch_dims=1)
    grads = tape.gradient(score, conv)
    if grads is None:
        raise ValueError(f"no gradient reaches layer {cam.layer_name!r}")
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # one weight per channel
    heat = tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1)).numpy()
    peak = heat.reshape(len(heat), -1).max(axis=1).reshape(-1, 1, 1)
    heat = np.where(peak > 0, heat / np.maximum(peak, 1e-12), 0.0)
    return heat.astype(np.float32), probs.numpy()


def _as_rgb_uint8(image) -> np.ndarray:
    """Encoded bytes, a uint8 array or a preprocessed [-1, 1] float array -> uint8 RGB [H, W, 3]."""
    from PIL import Image  # the drawing libraries only where a picture is drawn

    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as img:
            return np.asarray(img.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.dtype != np.uint8:
        # Xception preprocess_input maps [0, 255] to [-1, 1]; undo it for display.
        array = np.clip((array.astype(np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    return array[..., :3]


def overlay_png(image, heatmap: np.ndarray, alpha: float = 0.45, max_side: int = 512,
                title: str | None = None) -> bytes:
    """PNG bytes: the image with the heat map (jet colours) blended over it."""
    # the drawing libraries only where a picture is drawn
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    rgb = Image.fromarray(_as_rgb_uint8(image))
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side))
    elif max(rgb.size) < 256:  # small scans: enlarge so the heat map and caption are readable
        scale = 256 / max(rgb.size)
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.BICUBIC)
    heat = Image.fromarray(np.uint8(np.clip(heatmap, 0, 1) * 255)).resize(rgb.size, Image.BILINEAR)
    coloured = colormaps["jet"](np.asarray(heat) / 255.0)[..., :3]
    blended = (1 - alpha) * np.asarray(rgb, dtype=np.float32) / 255.0 + alpha * coloured
    out = Image.fromarray(np.uint8(np.clip(blended, 0, 1) * 255))
    if title:
        ImageDraw.Draw(out).text((4, 4), title, fill=(255, 255, 255))
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()


def gradcam_overlay(bundle, image_bytes: bytes, class_index: int | None = None) -> bytes:
    """One encoded image in, a Grad-CAM overlay PNG out (the class explained: predicted or given)."""
    x = bundle.preprocess([image_bytes])  # the model's own input (its crop, if any)
    heat, probs = gradcam(bundle.model, x, None if class_index is None else [class_index])
    shown = int(np.argmax(probs[0])) if class_index is None else int(class_index)
    return overlay_png(shown_image(bundle, image_bytes, x[0]), heat[0], title=f"{CLASSES[shown]} {probs[0, shown]:.2f}")


# ----------------------------------------------------------------------------- LIME
def lime_png(bundle, image: np.ndarray, num_samples: int = 150, num_features: int = 6, seed: int = 0) -> bytes:
    """LIME super-pixels that support the predicted class of one preprocessed image (`bundle`: a
    brainscan.modelstore.ModelBundle), as a PNG."""
    # LIME and scikit-image load slowly and only evaluation draws these
    from lime import lime_image
    from PIL import Image
    from skimage.segmentation import mark_boundaries

    # LIME segments and perturbs a [0, 1] image; the model wants Xception's [-1, 1].
    display = (np.asarray(image, dtype=np.float64) + 1.0) / 2.0

    def classify(batch: np.ndarray) -> np.ndarray:
        return bundle.predict((np.asarray(batch, dtype=np.float32) * 2.0) - 1.0)

    explainer = lime_image.LimeImageExplainer(random_state=seed)
    explanation = explainer.explain_instance(display, classify, top_labels=1, hide_color=0,
                                             num_samples=num_samples, batch_size=50, random_seed=seed)
    label = explanation.top_labels[0]
    shown, mask = explanation.get_image_and_mask(label, positive_only=True, num_features=num_features,
                                                 hide_rest=False)
    marked = mark_boundaries(np.clip(shown, 0, 1), mask, color=(1, 1, 0))
    out = Image.fromarray(np.uint8(np.clip(marked, 0, 1) * 255))
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()
