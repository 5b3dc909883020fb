"""The final model as an MLflow pyfunc: 28x28 images in, digit classes out.

MLflow logs this file itself ("models from code"), so a logged model needs only MLflow, Keras and NumPy
to load, not this project.
"""

import mlflow
import numpy as np


class DigitClassifier(mlflow.pyfunc.PythonModel):
    """Wraps the trained Keras network; accepts pixels in [0, 1] or [0, 255], shape [n, 28, 28]."""

    def load_context(self, context):
        import keras

        self.network = keras.saving.load_model(context.artifacts["network"], compile=False)

    def predict(self, context, model_input, params=None):
        images = np.asarray(model_input, dtype=np.float32).reshape(-1, 28, 28)
        if images.max(initial=0.0) > 1.0:
            images = images / 255.0
        logits = self.network.predict(images, verbose=0)
        return np.argmax(logits, axis=1).astype(np.int32)


mlflow.models.set_model(DigitClassifier())
