"""Helpers shared by the model tests (not a test module)."""

import keras
import numpy as np

from constants import NUM_FBANKS


def randomise(model: keras.Model, seed: int) -> None:
    """Gives every weight of `model` random values, so that no weight keeps its initial value.

    He-scaled kernels and BatchNormalization scales near 1 keep the activations' spread through the 60 layers, so
    that embeddings still depend clearly on the input (small random scales everywhere would make them constant).
    """
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if 'variance' in variable.name or 'gamma' in variable.name:
            value = rng.uniform(0.5, 1.5, shape)
        elif 'kernel' in variable.name:
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        variable.assign(value.astype(np.float32))


def features(rng: np.random.Generator, batch: int, frames: int) -> np.ndarray:
    """Random normalised-fbank-like input: (batch, frames, NUM_FBANKS, 1) float32."""
    return rng.standard_normal((batch, frames, NUM_FBANKS, 1)).astype(np.float32)


def predict(model: keras.Model, x) -> np.ndarray:
    """The model's output in inference mode, as numpy."""
    return keras.ops.convert_to_numpy(model(x, training=False))
