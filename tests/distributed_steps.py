"""Run as a process by test_distribute.py (logical devices must be configured before TensorFlow initialises, once
per process): splits the CPU into 2 logical devices, then trains one step on the same data with a MirroredStrategy
over both and with no strategy, for the softmax and the triplet phase, and writes to OUT (argv[1]) an .npz of
the weights before and after each step and those of checkpoints moved between strategies and replica counts (the
mirrored softmax step is taken by a single-device checkpoint loaded under 2 replicas).

Every step uses SGD: its update is the gradient times the learning rate, so a gradient scaled by the number of
replicas would show (Adam would hide it). Dropout is off (rate 0): its masks are random on each device. The
distributed steps compute in float64 on crops of SHORT_FRAMES frames: in float32 the batch statistics of the
ResCNN's near-constant channels (E[x^2] - E[x]^2 over a few crops at width 0.0625) differ between the two
summation orders by enough to move one SGD step by about 1 %, which would hide a real error.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # noqa: E402

CPU = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from batcher import TripletBatcher  # noqa: E402
from conv_models import DeepSpeakerModel, TdnnModel  # noqa: E402
from distribute import make_strategy, synchronize_batch_norm, unsharded, whole_blocks  # noqa: E402
from triplet_loss import deep_speaker_loss  # noqa: E402

WIDTH = 0.0625
SHORT_FRAMES = 16  # crop length of the float64 steps (the ResCNN takes any number of frames).
PER_REPLICA = 6  # crops: 2 triplets per replica.
SPEAKERS = 4
LEARNING_RATE = 0.5


def compiled(strategy, build, loss, initial: list | None) -> keras.Model:
    with strategy.scope():
        model = build()
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss=loss)
    if initial is not None:
        model.set_weights(initial)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    synchronize_batch_norm(model, strategy)
    return model


def stepped(model: keras.Model, dataset: tf.data.Dataset) -> list[np.ndarray]:
    model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    return model.get_weights()


def regrouped(blocks: list[np.ndarray]) -> np.ndarray:
    """[a0; p0; n0], [a1; p1; n1] -> [a0; a1; p0; p1; n0; n1]: the same triplets as one single-device block."""
    thirds = [np.split(block, 3) for block in blocks]
    return np.concatenate([part for i in range(3) for part in (t[i] for t in thirds)])


def main(out: str) -> None:
    rng = np.random.default_rng(0)
    mirrored, single = make_strategy('mirrored', 10.0), make_strategy('none', 10.0)
    assert mirrored.num_replicas_in_sync == 2, mirrored.num_replicas_in_sync
    results = {}
    keras.config.set_floatx('float64')
    shape = (None, SHORT_FRAMES, 64, 1)

    # Softmax phase: a global batch of 2 x PER_REPLICA crops, split contiguously over the replicas.
    x = rng.normal(size=(2 * PER_REPLICA, SHORT_FRAMES, 64, 1))
    y = rng.integers(0, SPEAKERS, size=2 * PER_REPLICA).astype(np.int32)

    def softmax_model():
        return DeepSpeakerModel(shape, include_softmax=True, num_speakers_softmax=SPEAKERS, width=WIDTH).m

    reference = compiled(single, softmax_model, 'sparse_categorical_crossentropy', None)
    results['softmax_initial'] = reference.get_weights()
    reference.save(f'{out}.single.keras')
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(2 * PER_REPLICA)
    results['softmax_single'] = stepped(reference, data)
    # The mirrored model is the single-device checkpoint loaded under the mirrored strategy (2 replicas), as a
    # resume across a change of replicas does: its step is compared with the single-device one. It is then saved
    # and loaded with no strategy.
    with mirrored.scope():
        distributed = keras.saving.load_model(f'{out}.single.keras')
    synchronize_batch_norm(distributed, mirrored)
    results['single_loaded_mirrored'] = distributed.get_weights()
    results['softmax_mirrored'] = stepped(distributed, unsharded(data))
    distributed.save(f'{out}.mirrored.keras')
    results['mirrored_loaded_single'] = keras.saving.load_model(f'{out}.mirrored.keras').get_weights()

    # Triplet phase, on the TDNN: two per-replica [a; p; n] blocks joined by whole_blocks (as train.py joins
    # triplet_dataset's blocks) against the same triplets as one block.
    kx = rng.normal(size=(40, SHORT_FRAMES, 64, 1))
    ky = np.repeat(np.arange(SPEAKERS), 10).astype(np.int32)
    batcher = TripletBatcher(kx, ky, seed=5)
    blocks = [batcher.get_batch(PER_REPLICA)[0].astype(np.float64) for _ in range(2)]
    block_stream = tf.data.Dataset.from_tensor_slices((np.stack(blocks), np.zeros((2, PER_REPLICA))))

    def short_triplet_model():  # the TDNN (batch norm too): a mirrored ResCNN step takes ~36 s to trace here.
        return TdnnModel(shape, width=WIDTH).m

    reference = compiled(single, short_triplet_model, deep_speaker_loss, None)
    results['triplet_initial'] = reference.get_weights()
    one_block = regrouped(blocks)
    results['triplet_single'] = stepped(reference, tf.data.Dataset.from_tensor_slices(
        (one_block, np.zeros(len(one_block)))).batch(len(one_block)))
    distributed = compiled(mirrored, short_triplet_model, deep_speaker_loss, results['triplet_initial'])
    results['triplet_mirrored'] = stepped(distributed, whole_blocks(block_stream, 2))

    flat = {}
    for key, value in results.items():
        if isinstance(value, list):
            flat.update({f'{key}/{i}': w for i, w in enumerate(value)})
        else:
            flat[key] = value
    np.savez(out, **flat)


if __name__ == '__main__':
    main(sys.argv[1])
