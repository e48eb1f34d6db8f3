"""One inference function for every embedding pass (mining history, evaluation, trial lists): crops through a
model in graph mode, chunk by chunk, with no gradient state, so that a pass never holds more than a chunk's
activations of a layer or two."""

import keras
import numpy as np

from constants import INFERENCE_BATCH_SIZE


def embed_crops(model: keras.Model, crops: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Embeddings of crops (n, frames, NUM_FBANKS, 1) float32 (an array or a memory map, read a chunk at a time):
    float32 (n, dims).

    Runs `batch_size` crops at a time (default constants.INFERENCE_BATCH_SIZE) through the model's compiled
    predict function (training=False, no gradient tape). Unlike an eager `model(crops)`, which keeps every
    layer's output until the call returns (about 4 GB for 500 crops through the ResCNN at width 0.25), the graph
    frees each activation after its last use, so memory grows with `batch_size` times the largest layer output,
    not the whole network. With `batch_size` at most the training batch a pass needs less than a training step,
    which holds every activation of its batch for the gradients. Results depend on `batch_size` only by float
    round-off (oneDNN picks kernels by batch size; 64, 96 and 500 agree bit for bit on this project's CPU).
    """
    batch_size = batch_size or INFERENCE_BATCH_SIZE
    if len(crops) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    chunks = [model.predict_on_batch(np.asarray(crops[start:start + batch_size], dtype=np.float32))
              for start in range(0, len(crops), batch_size)]
    return np.concatenate(chunks).astype(np.float32, copy=False)
