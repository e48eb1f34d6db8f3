"""The models: Deep Speaker's ResCNN (Li et al. 2017, with the original implementation's layer names), the
x-vector TDNN, the GRU and ECAPA-TDNN in Keras 3, their layers (the in-graph fbank front end, frame mask,
statistics pooling, masked attentive statistics pooling) and the MODELS registry.

Imports features, losses (the cosine head of the margin losses) and constants only. The checkpoint functions
moved to checkpoints.py; CheckpointError, load_checkpoint, checkpoint_architecture and build_model stay
importable from here for the original's users.
"""

import keras
import numpy as np
from keras import layers, regularizers

from constants import (
    CLIPPED_RELU_MAX,
    ECAPA_BOTTLENECK,
    ECAPA_CHANNELS,
    ECAPA_DILATIONS,
    ECAPA_KERNELS,
    ECAPA_MFA_CHANNELS,
    ECAPA_RES2_SCALE,
    EMBEDDING_SIZE,
    GRU_LAYERS,
    GRU_UNITS,
    L2_WEIGHT_DECAY,
    NFFT,
    NORMALIZE_EPSILON,
    NUM_FBANKS,
    NUM_FRAMES,
    PREEMPHASIS,
    RESCNN_FILTERS,
    SAMPLE_RATE,
    SOFTMAX_DROPOUT,
    STATS_POOLING_EPSILON,
    TDNN_FRAME_LAYERS,
)
from features import frame_length, frame_step, mel_matrix
from losses import CosineHead

CHECKPOINT_NAMES = ('CheckpointError', 'load_checkpoint', 'checkpoint_architecture', 'build_model',
                    'copy_weights_by_name', 'legacy_h5_layer_names', 'weighted_layer_names')


def __getattr__(name: str):
    """`from conv_models import build_model` (and the other CHECKPOINT_NAMES) as in the original layout; read
    from checkpoints.py on first use, which imports this module."""
    if name in CHECKPOINT_NAMES:
        import checkpoints
        return getattr(checkpoints, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


@keras.saving.register_keras_serializable(package='deep_speaker')
class PcmToFbank(layers.Layer):
    """Raw 16 kHz audio (batch, samples) to features.py's normalised fbank (batch, frames, NUM_FBANKS, 1), in-graph.

    Expects audio whose silence is already trimmed (features.trim_silence), at least one 25 ms frame long. Made of
    TensorFlow ops (tf.signal), imported when the layer runs: the models without it build under any Keras backend.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, **kwargs):
        super().__init__(**kwargs)
        self.sample_rate = sample_rate

    def call(self, pcm):
        import tensorflow as tf
        length, step = frame_length(self.sample_rate), frame_step(self.sample_rate)
        emphasised = tf.concat([pcm[:, :1], pcm[:, 1:] - PREEMPHASIS * pcm[:, :-1]], axis=1)
        num_samples = tf.shape(pcm)[1]
        num_frames = 1 + (num_samples - length + step - 1) // step
        padded = tf.pad(emphasised, [[0, 0], [0, (num_frames - 1) * step + length - num_samples]])
        frames = tf.signal.frame(padded, length, step)
        power = tf.square(tf.abs(tf.signal.rfft(frames, [NFFT]))) / NFFT
        energies = tf.matmul(power, tf.constant(mel_matrix(self.sample_rate)))
        energies = tf.where(energies == 0, tf.constant(np.finfo(float).eps, tf.float32), energies)
        mean, variance = tf.nn.moments(energies, axes=[-1], keepdims=True)
        normalised = (energies - mean) / tf.maximum(tf.sqrt(variance), NORMALIZE_EPSILON)
        return tf.expand_dims(normalised, -1)

    def compute_output_shape(self, input_shape):
        return input_shape[0], None, NUM_FBANKS, 1

    def get_config(self):
        return {**super().get_config(), 'sample_rate': self.sample_rate}


@keras.saving.register_keras_serializable(package='deep_speaker')
class FrameMask(layers.Layer):
    """1.0 for real frames, 0.0 for zero padding (a normalised fbank frame is never all zeros): (batch, frames)."""

    def call(self, frames):
        return keras.ops.cast(keras.ops.any(keras.ops.not_equal(frames, 0.0), axis=-1), frames.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape[:2]


def masked_mean_std(x, mask):
    """Mean and standard deviation over time of the unmasked frames: (batch, frames, d), (batch, frames) ->
    (batch, 2 d)."""
    weights = keras.ops.expand_dims(mask, -1)
    count = keras.ops.maximum(keras.ops.sum(weights, axis=1), 1.0)
    mean = keras.ops.sum(x * weights, axis=1) / count
    variance = keras.ops.sum(weights * keras.ops.square(x - keras.ops.expand_dims(mean, 1)), axis=1) / count
    return keras.ops.concatenate([mean, keras.ops.sqrt(variance + STATS_POOLING_EPSILON)], axis=-1)


@keras.saving.register_keras_serializable(package='deep_speaker')
class StatsPooling(layers.Layer):
    """Mean and standard deviation over time of the unmasked frames: (batch, frames, d), (batch, frames) ->
    (batch, 2 d)."""

    def call(self, inputs):
        return masked_mean_std(*inputs)

    def compute_output_shape(self, input_shape):
        return input_shape[0][0], 2 * input_shape[0][-1]


@keras.saving.register_keras_serializable(package='deep_speaker')
class MaskedMean(layers.Layer):
    """Mean over time of the unmasked frames: (batch, frames, d), (batch, frames) -> (batch, d)."""

    def call(self, inputs):
        x, mask = inputs
        weights = keras.ops.expand_dims(mask, -1)
        return keras.ops.sum(x * weights, axis=1) / keras.ops.maximum(keras.ops.sum(weights, axis=1), 1.0)

    def compute_output_shape(self, input_shape):
        return input_shape[0][0], input_shape[0][-1]


@keras.saving.register_keras_serializable(package='deep_speaker')
class GlobalContext(layers.Layer):
    """Each frame with the utterance's masked mean and std appended (ECAPA's context-dependent attention input):
    (batch, frames, d), (batch, frames) -> (batch, frames, 3 d)."""

    def call(self, inputs):
        x, mask = inputs
        stats = keras.ops.expand_dims(masked_mean_std(x, mask), 1)
        return keras.ops.concatenate([x, keras.ops.zeros_like(x[..., :1]) + stats], axis=-1)

    def compute_output_shape(self, input_shape):
        return *input_shape[0][:2], 3 * input_shape[0][-1]


@keras.saving.register_keras_serializable(package='deep_speaker')
class AttentiveStatsPooling(layers.Layer):
    """Attentive statistics pooling (Okabe et al. 2018; per channel as in ECAPA-TDNN): softmax over the unmasked
    frames of the attention logits, then the weighted mean and std of each channel:
    (batch, frames, d) features, (batch, frames, d) logits, (batch, frames) mask -> (batch, 2 d)."""

    def call(self, inputs):
        x, logits, mask = inputs
        valid = keras.ops.expand_dims(mask, -1) > 0
        logits = keras.ops.where(valid, logits, keras.ops.full_like(logits, -1e9))
        alpha = keras.ops.softmax(logits, axis=1) * keras.ops.cast(valid, x.dtype)
        mean = keras.ops.sum(alpha * x, axis=1)
        variance = keras.ops.sum(alpha * keras.ops.square(x), axis=1) - keras.ops.square(mean)
        return keras.ops.concatenate([mean, keras.ops.sqrt(keras.ops.maximum(variance, 0.0) + STATS_POOLING_EPSILON)],
                                     axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape[0][0], 2 * input_shape[0][-1]


@keras.saving.register_keras_serializable(package='deep_speaker')
class ChannelSlice(layers.Layer):
    """Channels [start, stop) of a (batch, frames, d) tensor: a Res2Net group."""

    def __init__(self, start: int, stop: int, **kwargs):
        super().__init__(**kwargs)
        self.start, self.stop = start, stop

    def call(self, x):
        return x[..., self.start:self.stop]

    def compute_output_shape(self, input_shape):
        return *input_shape[:-1], self.stop - self.start

    def get_config(self):
        return {**super().get_config(), 'start': self.start, 'stop': self.stop}


HEADS = ('softmax', 'cosine')  # a dense softmax layer, or losses.CosineHead for the margin losses.


class SpeakerModel:
    """A speaker embedder; the Keras model is `.m`. Subclasses build the utterance-level vector (`body`).

    Input: normalised fbank, shape (batch, frames, 64, 1) (frames: NUM_FRAMES for training crops, any number at
    inference), or with `pcm_input` raw 16 kHz audio (batch, samples). Output: L2-normalised embeddings
    (batch, 512) from the `affine` layer, or with `include_softmax` a classification head over
    num_speakers_softmax speakers: with `head='softmax'` their probabilities (layer `softmax_layer`), with
    `head='cosine'` the cosines of the embedding with each speaker's weight vector (layer `cosine_layer`, for the
    margin losses of losses.py); both float32 (also when built under a mixed_float16 policy, which computes the
    layers before them in float16). `width` scales the layers; 1.0 is the published size.
    """

    name = ''
    width_probe = ('', '', 1)  # (layer, config key, its value at width 1.0): how options_from_config reads width.

    def __init__(self, batch_input_shape=(None, NUM_FRAMES, NUM_FBANKS, 1), include_softmax: bool = False,
                 num_speakers_softmax: int | None = None, pcm_input: bool = False, width: float = 1.0,
                 head: str = 'softmax'):
        if include_softmax and not (num_speakers_softmax and num_speakers_softmax > 1):
            raise ValueError(f'num_speakers_softmax={num_speakers_softmax}: a softmax head needs 2 or more speakers.')
        if head not in HEADS:
            raise ValueError(f'head={head!r}: expected one of {", ".join(HEADS)}.')
        self.include_softmax, self.head = include_softmax, head
        self.width = width
        if pcm_input:
            inputs = keras.Input(batch_shape=(batch_input_shape[0], None), name='input')
            x = PcmToFbank(name='fbank')(inputs)
        else:
            inputs = keras.Input(batch_shape=batch_input_shape, name='input')
            x = inputs
        x = self.body(x)
        if include_softmax:
            x = layers.Dropout(SOFTMAX_DROPOUT, name='dropout')(x)
        x = layers.Dense(EMBEDDING_SIZE, name='affine')(x)
        if include_softmax and head == 'cosine':  # float32 under mixed precision, like the L2 normalisation.
            x = CosineHead(num_speakers_softmax, name='cosine_layer', dtype='float32')(x)
        elif include_softmax:
            x = layers.Dense(num_speakers_softmax, activation='softmax', name='softmax_layer', dtype='float32')(x)
        else:
            x = layers.UnitNormalization(axis=1, name='ln', dtype='float32')(x)
        self.m = keras.Model(inputs, x, name=self.name)

    def keras_model(self) -> keras.Model:
        """The Keras model, `.m`; kept for the users of the original project (`DeepSpeakerModel().keras_model()`)."""
        return self.m

    def get_weights(self) -> list[np.ndarray]:
        """The model's weights without the classification head's (a softmax's kernel and bias, a cosine kernel)."""
        weights = self.m.get_weights()
        return weights[:-len(self.m.layers[-1].weights)] if self.include_softmax else weights

    def scaled(self, units: int) -> int:
        return max(1, int(round(units * self.width)))

    @classmethod
    def options_from_config(cls, layer_configs: dict[str, dict]) -> dict:
        """Constructor arguments that rebuild the architecture of a saved Keras config (layer name -> config)."""
        layer, key, full_size = cls.width_probe
        return {'width': layer_configs[layer][key] / full_size}

    def body(self, fbank):
        """(batch, frames, 64, 1) features to (batch, dims) utterance vectors."""
        raise NotImplementedError

class DeepSpeakerModel(SpeakerModel):
    """ResCNN of Deep Speaker: four stages of a 5x5 stride-2 convolution and three residual blocks, temporal
    average. Filters 64/128/256/512 at width 1.0 (24,185,728 parameters); the first stage gets
    round(64 * width) filters and each later stage twice as many as the one before."""

    name = 'ResCNN'
    width_probe = ('conv64-s', 'filters', RESCNN_FILTERS[0])

    def body(self, fbank):
        base = self.scaled(RESCNN_FILTERS[0])
        self.filters = [base * f // RESCNN_FILTERS[0] for f in RESCNN_FILTERS]
        self.clipped_relu_count = 0
        x = self.cnn_component(fbank)
        x = layers.Reshape((-1, (NUM_FBANKS // 16) * self.filters[-1]), name='reshape')(x)
        return layers.GlobalAveragePooling1D(name='average')(x)

    def clipped_relu(self, inputs):
        relu = layers.ReLU(max_value=CLIPPED_RELU_MAX, name=f'clipped_relu_{self.clipped_relu_count}')(inputs)
        self.clipped_relu_count += 1
        return relu

    @staticmethod
    def conv(filters: int, kernel_size: int, strides: int, name: str) -> layers.Conv2D:
        return layers.Conv2D(filters, kernel_size=kernel_size, strides=strides, padding='same',
                             kernel_initializer='glorot_uniform',
                             kernel_regularizer=regularizers.l2(L2_WEIGHT_DECAY), name=name)

    def identity_block(self, input_tensor, kernel_size: int, filters: int, stage: int, block: int):
        name = f'res{stage}_{block}_branch'
        x = self.conv(filters, kernel_size, 1, name + '_2a')(input_tensor)
        x = layers.BatchNormalization(name=name + '_2a_bn')(x)
        x = self.clipped_relu(x)
        x = self.conv(filters, kernel_size, 1, name + '_2b')(x)
        x = layers.BatchNormalization(name=name + '_2b_bn')(x)
        x = self.clipped_relu(x)
        x = layers.add([x, input_tensor])
        return self.clipped_relu(x)

    def conv_and_res_block(self, inputs, filters: int, stage: int):
        name = f'conv{RESCNN_FILTERS[stage - 1]}-s'
        x = self.conv(filters, 5, 2, name)(inputs)
        x = layers.BatchNormalization(name=name + '_bn')(x)
        x = self.clipped_relu(x)
        for block in range(3):
            x = self.identity_block(x, kernel_size=3, filters=filters, stage=stage, block=block)
        return x

    def cnn_component(self, inputs):
        x = inputs
        for stage, filters in enumerate(self.filters, start=1):
            x = self.conv_and_res_block(x, filters, stage)
        return x


class TdnnModel(SpeakerModel):
    """x-vector TDNN (Snyder et al. 2018): frame layers of 1-D dilated convolutions, each ReLU then batch norm
    (or batch norm then ReLU with `bn_before_relu`), then dropout if any, padding frames zeroed after each layer,
    masked statistics pooling (mean and std).

    Defaults: contexts [t-2..t+2], {t-2,t,t+2}, {t-3,t,t+3}, {t}, {t} of 512, 512, 512, 512, 1500 units
    (4,321,100 parameters with the 512-d segment layer at width 1.0); `frame_layers` overrides them as
    (units, kernel, dilation) tuples, before `width` scales the units (every layer by the ratio the first layer
    was rounded to). A checkpoint reads back as its actual frame layers at width 1.0.
    """

    name = 'TDNN'

    def __init__(self, *args, frame_layers=TDNN_FRAME_LAYERS, dropout: float = 0.0, bn_before_relu: bool = False,
                 **kwargs):
        self.frame_layers, self.dropout, self.bn_before_relu = tuple(map(tuple, frame_layers)), dropout, bn_before_relu
        super().__init__(*args, **kwargs)

    @classmethod
    def options_from_config(cls, layer_configs: dict[str, dict]) -> dict:
        frame_layers = []
        while (config := layer_configs.get(f'tdnn{len(frame_layers) + 1}')) is not None:
            frame_layers.append((config['filters'], config['kernel_size'][0], config['dilation_rate'][0]))
        return {'width': 1.0, 'frame_layers': tuple(frame_layers), 'bn_before_relu': 'tdnn1_relu' in layer_configs}

    def body(self, fbank):
        frames = layers.Reshape((-1, NUM_FBANKS), name='frames')(fbank)
        mask = FrameMask(name='frame_mask')(frames)
        x = frames
        first_units = self.frame_layers[0][0]
        ratio = self.scaled(first_units) / first_units  # one ratio for all layers keeps their proportions.
        for number, (units, kernel, dilation) in enumerate(self.frame_layers, start=1):
            x = layers.Conv1D(max(1, int(round(units * ratio))), kernel, dilation_rate=dilation, padding='same',
                              activation=None if self.bn_before_relu else 'relu',
                              kernel_regularizer=regularizers.l2(L2_WEIGHT_DECAY), name=f'tdnn{number}')(x)
            x = layers.BatchNormalization(name=f'tdnn{number}_bn')(x)
            if self.bn_before_relu:
                x = layers.ReLU(name=f'tdnn{number}_relu')(x)
            if self.dropout:
                x = layers.Dropout(self.dropout, name=f'tdnn{number}_dropout')(x)
            x = layers.Multiply(name=f'tdnn{number}_masked')([x, layers.Reshape((-1, 1))(mask)])
        return StatsPooling(name='stats_pooling')([x, mask])


class GruModel(SpeakerModel):
    """Deep Speaker's GRU model: a 5x5 stride-2 convolution (64 filters), three GRU layers (1024 units at width
    1.0; 22,565,248 parameters), temporal average."""

    name = 'GRU'
    width_probe = ('gru1', 'units', GRU_UNITS)

    def body(self, fbank):
        filters = self.scaled(RESCNN_FILTERS[0])
        x = DeepSpeakerModel.conv(filters, 5, 2, 'conv64-s')(fbank)
        x = layers.BatchNormalization(name='conv64-s_bn')(x)
        x = layers.ReLU(max_value=CLIPPED_RELU_MAX, name='clipped_relu_0')(x)
        x = layers.Reshape((-1, (NUM_FBANKS // 2) * filters), name='reshape')(x)
        for number in range(1, GRU_LAYERS + 1):
            x = layers.GRU(self.scaled(GRU_UNITS), return_sequences=True, name=f'gru{number}')(x)
        return layers.GlobalAveragePooling1D(name='average')(x)


class EcapaModel(SpeakerModel):
    """ECAPA-TDNN (Desplanques et al. 2020): a kernel-5 frame layer of C channels, three SE-Res2Blocks (kernel 3,
    dilations 2, 3, 4; Res2Net scale 8; squeeze-excitation bottleneck 128), each block's input the sum of the
    outputs before it, multi-layer feature aggregation (the three blocks' outputs concatenated, a 1x1 layer of
    1536), attentive statistics pooling with global context (attention bottleneck 128) and batch norm, then the
    512-d affine layer. Every frame layer is a convolution, ReLU, batch norm, and zeroes the padding frames after
    it; squeeze-excitation means, the global context and the attention softmax skip them: a zero-padded utterance
    gives the embedding of the unpadded one, as with the TDNN.

    `channels` C: 1024 (default) or the paper's smaller 512; `width` scales C (rounded to a multiple of 8), 1536 and
    the bottlenecks. Parameters at C=1024, width 1.0 (64 fbanks in, 512-d embedding): 15,561,600 trainable,
    15,590,528 in all with batch norm statistics; the paper's 14.7M (C=1024) and 6.2M (C=512) count trainable
    parameters with 80 MFCCs in, a 192-d embedding and batch norm after it (tests/test_ecapa.py checks the formula
    against both). Against the paper: no batch norm after the embedding layer (the embedding is L2-normalised).
    """

    name = 'ECAPA'
    width_probe = ('conv1', 'filters', ECAPA_CHANNELS)

    def __init__(self, *args, channels: int = ECAPA_CHANNELS, mfa_channels: int = ECAPA_MFA_CHANNELS,
                 bottleneck: int = ECAPA_BOTTLENECK, **kwargs):
        self.channels, self.mfa_channels, self.bottleneck = channels, mfa_channels, bottleneck
        super().__init__(*args, **kwargs)

    @classmethod
    def options_from_config(cls, layer_configs: dict[str, dict]) -> dict:
        return {'width': 1.0, 'channels': layer_configs['conv1']['filters'],
                'mfa_channels': layer_configs['mfa']['filters'],
                'bottleneck': layer_configs['block1_se_squeeze']['units']}

    def body(self, fbank):
        scale = ECAPA_RES2_SCALE
        channels = max(scale, int(round(self.channels * self.width / scale)) * scale)
        frames = layers.Reshape((-1, NUM_FBANKS), name='frames')(fbank)
        mask = FrameMask(name='frame_mask')(frames)
        self.mask, self.mask3 = mask, layers.Reshape((-1, 1), name='frame_mask_3d')(mask)
        x = self.frame_layer(frames, channels, ECAPA_KERNELS[0], 1, 'conv1')
        outputs, block_input = [], x
        for number, dilation in enumerate(ECAPA_DILATIONS, start=1):
            if outputs:
                block_input = layers.Add(name=f'block{number}_input')([x, *outputs])
            outputs.append(self.se_res2_block(block_input, channels, dilation, f'block{number}'))
        x = layers.Concatenate(name='mfa_concat')(outputs)
        x = self.frame_layer(x, self.scaled(self.mfa_channels), 1, 1, 'mfa')
        context = GlobalContext(name='global_context')([x, mask])
        attention = layers.Conv1D(self.scaled(self.bottleneck), 1, activation='tanh', name='attention_hidden')(context)
        attention = layers.Conv1D(x.shape[-1], 1, name='attention_logits')(attention)
        x = AttentiveStatsPooling(name='attentive_pooling')([x, attention, mask])
        return layers.BatchNormalization(name='pooling_bn')(x)

    def frame_layer(self, x, units: int, kernel: int, dilation: int, name: str):
        """Convolution, ReLU, batch norm, padding frames zeroed: (batch, frames, d) -> (batch, frames, units)."""
        x = layers.Conv1D(units, kernel, dilation_rate=dilation, padding='same', activation='relu',
                          kernel_regularizer=regularizers.l2(L2_WEIGHT_DECAY), name=name)(x)
        x = layers.BatchNormalization(name=f'{name}_bn')(x)
        return layers.Multiply(name=f'{name}_masked')([x, self.mask3])

    def se_res2_block(self, inputs, channels: int, dilation: int, name: str):
        """1x1 frame layer, Res2Net dilated convolutions over 8 channel groups (each group's input adds the previous
        group's output), 1x1 frame layer, squeeze-excitation, residual connection."""
        x = self.frame_layer(inputs, channels, 1, 1, f'{name}_conv_in')
        group = channels // ECAPA_RES2_SCALE
        outputs = [ChannelSlice(0, group, name=f'{name}_group0')(x)]
        for i in range(1, ECAPA_RES2_SCALE):
            part = ChannelSlice(i * group, (i + 1) * group, name=f'{name}_group{i}')(x)
            if i > 1:
                part = layers.Add(name=f'{name}_group{i}_sum')([part, outputs[-1]])
            outputs.append(self.frame_layer(part, group, ECAPA_KERNELS[1], dilation, f'{name}_res2_{i}'))
        x = layers.Concatenate(name=f'{name}_res2_concat')(outputs)
        x = self.frame_layer(x, channels, 1, 1, f'{name}_conv_out')
        squeezed = MaskedMean(name=f'{name}_se_mean')([x, self.mask])
        squeezed = layers.Dense(self.scaled(self.bottleneck), activation='relu', name=f'{name}_se_squeeze')(squeezed)
        excitation = layers.Dense(channels, activation='sigmoid', name=f'{name}_se_excite')(squeezed)
        x = layers.Multiply(name=f'{name}_se_scale')([x, layers.Reshape((1, channels))(excitation)])
        return layers.Add(name=f'{name}_residual')([x, inputs])


MODELS: dict[str, type[SpeakerModel]] = {'rescnn': DeepSpeakerModel, 'tdnn': TdnnModel, 'gru': GruModel,
                                         'ecapa': EcapaModel}
