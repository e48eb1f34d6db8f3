"""Classification losses of the softmax (pre-training) phase and the cosine head the margin losses need.

- softmax: the original recipe, a dense layer with softmax and Keras' sparse categorical cross-entropy.
- amsoftmax: additive margin softmax (AM-softmax / CosFace, Wang et al. 2018): logits s * cos(theta_j) for every
  class j but the target y, whose logit is s * (cos(theta_y) - m).
- aamsoftmax: additive angular margin softmax (AAM-softmax / ArcFace, Deng et al. 2019): the target's logit is
  s * cos(theta_y + m); where theta_y + m would pass pi (cos(theta_y) <= cos(pi - m)) it is s * (cos(theta_y) -
  m sin(m)), which keeps the logit decreasing in theta_y (ArcFace's and SpeechBrain's choice).

cos(theta_j) is the cosine between the embedding and class j's weight vector: CosineHead's output. The margin is
applied to the target class only, inside the loss (it needs the labels), so the model's output stays the plain
cosines: its argmax is the predicted speaker. LOSSES is the registry of the three, by command-line name.

Imports keras and constants only.
"""

import math

import keras
from keras import ops

from constants import (
    AAM_SOFTMAX_MARGIN,
    AM_SOFTMAX_MARGIN,
    MARGIN_RANGE,
    MARGIN_SCALE,
    NORMALIZE_EPSILON,
    SCALE_RANGE,
)


class LossOptionError(ValueError):
    """A margin or scale out of its range: `option` ('margin' or 'scale'), the value and the accepted `limit`."""

    def __init__(self, option: str, value: float, limit: str):
        super().__init__(f'{option} {value:g} out of range: expected {limit}.')
        self.option, self.value, self.limit = option, value, limit


@keras.saving.register_keras_serializable(package='deep_speaker')
class CosineHead(keras.layers.Layer):
    """Cosine of each embedding with each class's weight vector, both L2-normalised: (batch, dims) ->
    (batch, num_classes), values in [-1, 1]. No bias."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes

    def build(self, input_shape):
        self.kernel = self.add_weight(name='kernel', shape=(input_shape[-1], self.num_classes),
                                      initializer='glorot_uniform')

    def call(self, embeddings):
        x = embeddings / ops.maximum(ops.norm(embeddings, axis=-1, keepdims=True), NORMALIZE_EPSILON)
        w = self.kernel / ops.maximum(ops.norm(self.kernel, axis=0, keepdims=True), NORMALIZE_EPSILON)
        return ops.matmul(x, w)

    def compute_output_shape(self, input_shape):
        return *input_shape[:-1], self.num_classes

    def get_config(self):
        return {**super().get_config(), 'num_classes': self.num_classes}


class MarginSoftmaxLoss(keras.losses.Loss):
    """Cross-entropy of `logits`: s times the cosines (batch, classes), the target's replaced by target_cosine."""

    default_margin, default_scale = 0.0, MARGIN_SCALE

    def __init__(self, margin: float | None = None, scale: float | None = None, name: str | None = None, **kwargs):
        super().__init__(name=name or type(self).__name__, **kwargs)
        self.margin = self.default_margin if margin is None else float(margin)
        self.scale = self.default_scale if scale is None else float(scale)
        check_range('margin', self.margin, *MARGIN_RANGE, low_open=False, high_open=True)
        check_range('scale', self.scale, *SCALE_RANGE, low_open=False, high_open=False)

    def target_cosine(self, cosine):
        """The target class's cosine with the margin applied (elementwise)."""
        raise NotImplementedError

    def logits(self, y_true, cosines):
        """Scaled logits (batch, classes) of `cosines` with the margin on the class `y_true` (batch,) only."""
        target = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), 'int32'), ops.shape(cosines)[-1])
        return self.scale * ops.where(target > 0, self.target_cosine(cosines), cosines)

    def call(self, y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(y_true, self.logits(y_true, y_pred), from_logits=True)

    def get_config(self):
        return {**super().get_config(), 'margin': self.margin, 'scale': self.scale}


@keras.saving.register_keras_serializable(package='deep_speaker')
class AmSoftmaxLoss(MarginSoftmaxLoss):
    """AM-softmax: target logit s (cos(theta_y) - m)."""

    default_margin = AM_SOFTMAX_MARGIN

    def target_cosine(self, cosine):
        return cosine - self.margin


@keras.saving.register_keras_serializable(package='deep_speaker')
class AamSoftmaxLoss(MarginSoftmaxLoss):
    """AAM-softmax: target logit s cos(theta_y + m), or s (cos(theta_y) - m sin(m)) past theta_y = pi - m."""

    default_margin = AAM_SOFTMAX_MARGIN

    def target_cosine(self, cosine):
        cosine = ops.clip(cosine, -1.0, 1.0)
        sine = ops.sqrt(ops.maximum(1.0 - ops.square(cosine), 0.0))
        shifted = cosine * math.cos(self.margin) - sine * math.sin(self.margin)
        return ops.where(cosine > math.cos(math.pi - self.margin), shifted,
                         cosine - self.margin * math.sin(self.margin))


# The original recipe's loss is Keras' own, so its checkpoints are those of the original project.
LOSSES: dict[str, type[keras.losses.Loss]] = {'softmax': keras.losses.SparseCategoricalCrossentropy,
                                              'amsoftmax': AmSoftmaxLoss, 'aamsoftmax': AamSoftmaxLoss}


def head_of(name: str) -> str:
    """The classification head the loss `name` trains (conv_models.HEADS): 'cosine' for the margin losses,
    else 'softmax' (a dense layer with softmax)."""
    return 'cosine' if issubclass(LOSSES[name], MarginSoftmaxLoss) else 'softmax'


def check_range(option: str, value: float, low: float, high: float, low_open: bool, high_open: bool) -> None:
    """LossOptionError unless low <= value <= high (< where open)."""
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or math.isnan(value):
        raise LossOptionError(option, value, f'{low:g} {"<" if low_open else "<="} {option} '
                                             f'{"<" if high_open else "<="} {high:g}')


def classification_loss(name: str, margin: float | None = None, scale: float | None = None) -> keras.losses.Loss:
    """The loss `name` (a key of LOSSES) with its margin and scale (None: the loss's default). LossOptionError for a
    margin or scale out of range, or given to plain softmax, which has none."""
    if head_of(name) == 'softmax':
        for option, value in (('margin', margin), ('scale', scale)):
            if value is not None:
                raise LossOptionError(option, value, 'no value: plain softmax has no margin or scale (use amsoftmax '
                                                     'or aamsoftmax)')
        return LOSSES[name]()
    return LOSSES[name](margin, scale)
