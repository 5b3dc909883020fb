"""The final model as an MLflow pyfunc: 28x28 images in, digit classes out.

MLflow logs this file itself ("models from code"), so a logged model needs only MLflow, Keras and NumPy
to load, not this project.
"""

import mlflow
import numpy as np

IMAGE_SIZE = 28
SHAPES = f"[n, {IMAGE_SIZE}, {IMAGE_SIZE}], [n, {IMAGE_SIZE}, {IMAGE_SIZE}, 1] or [n, {IMAGE_SIZE * IMAGE_SIZE}]"


def as_images(model_input) -> np.ndarray:
    """`model_input` as float32 images [n, 28, 28] in [0, 1].

    Integer pixels (uint8 as in the IDX files, or the integers of a JSON request) are 0-255; float
    pixels may be in [0, 1] or [0, 255]. Raise ValueError in one line, naming the shapes accepted.
    """
    pixels = np.asarray(model_input)
    shape = pixels.shape
    if pixels.ndim == 4 and shape[-1] == 1:
        pixels = pixels[..., 0]
    elif pixels.ndim == 2 and shape[1] == IMAGE_SIZE * IMAGE_SIZE:
        pixels = pixels.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    if pixels.ndim != 3 or pixels.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images of shape {SHAPES}, got an array of shape {list(shape)}")
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise ValueError(f"expected integer or float pixels, got {pixels.dtype}")
    images = pixels.astype(np.float32)
    if np.issubdtype(pixels.dtype, np.integer) or images.max(initial=0.0) > 1.0:
        images /= 255.0
    return images


class DigitClassifier(mlflow.pyfunc.PythonModel):
    """Wraps the trained Keras network; see `as_images` for the inputs it takes."""

    def load_context(self, context):
        import keras

        self.network = keras.saving.load_model(context.artifacts["network"], compile=False)

    # The type hint tells MLflow the input arrives as it was sent (no conversion, no schema to infer
    # from it); `as_images` checks it.
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        logits = self.network.predict(as_images(model_input), verbose=0)
        return np.argmax(logits, axis=1).astype(np.int32)


mlflow.models.set_model(DigitClassifier())
