"""The model function of the tutorial: the network, built from params, and what each mode computes."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import keras
import tensorflow as tf
from omegaconf import DictConfig

from tfsweep.config import Precision
from tfsweep.cpu import read_cpuinfo
from tfsweep.data import IMAGE_SIZE

log = logging.getLogger(__name__)

# The x86 instructions that make oneDNN's bfloat16 kernels pay, by vendor. On AMD, AVX-512 BF16 does:
# ~2x float32's steps/s on Zen 4 and Zen 5. On an Intel Xeon (family 6 model 207) with AVX-512 BF16 but
# no AMX, bfloat16 ran at ~0.7x float32's steps/s (fast preset 12.4 vs 16.9; a batch-128 sweep trial
# 205 vs 139 s), so there only AMX counts.
BFLOAT16_FLAGS = {"AuthenticAMD": {"avx512_bf16", "amx_bf16"}, "GenuineIntel": {"amx_bf16"}}


def usable_precision(precision: str, cpuinfo: str | None = None) -> str:
    """`precision`, except `mixed_bfloat16` on an x86 CPU whose bfloat16 is slower than float32, which
    gets float32.

    Without bfloat16 instructions it is emulated: the fast preset ran at 0.6 steps/s on a 2-core AMD EPYC
    Zen 3 (AVX2 only), against ~36 steps/s on a Zen 4 with AVX-512 BF16. float32 weights are kept either
    way, so checkpoints move between the two.
    """
    if precision != Precision.mixed_bfloat16:
        return precision
    cpu = read_cpuinfo(cpuinfo)
    if not cpu["flags"]:
        return precision  # not x86: no flags line to judge by
    fast = BFLOAT16_FLAGS.get(cpu["vendor"], set().union(*BFLOAT16_FLAGS.values()))
    if fast & cpu["flags"]:
        return precision
    log.warning("trainer.precision=mixed_bfloat16, but bfloat16 is slower than float32 on this %s CPU without "
                "%s: training in float32", cpu["vendor"] or "x86", " or ".join(sorted(fast)))
    return Precision.float32


class Mode(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"
    PREDICT = "predict"


def build_network(params: DictConfig, precision: str = Precision.float32) -> keras.Model:
    """conv 32@5x5 -> pool -> conv 64@5x5 -> pool -> dense 1024 -> dropout -> logits, as the tutorial.

    With `mixed_bfloat16` the layers compute in bfloat16 and keep float32 weights; the logits are
    cast back to float32 so that softmax and the loss are computed in full precision.
    """
    policy = keras.DTypePolicy(precision)
    inputs = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE), name="images")          # [batch, 28, 28]
    net = keras.layers.Reshape((IMAGE_SIZE, IMAGE_SIZE, 1), dtype=policy)(inputs)  # [batch, 28, 28, 1]
    for i, filters in enumerate(params.filters, start=1):
        net = keras.layers.Conv2D(filters, params.kernel_size, padding="same", activation="relu",
                                  dtype=policy, name=f"conv{i}")(net)  # [batch, 28, 28, 32] / [batch, 14, 14, 64]
        net = keras.layers.MaxPooling2D(params.pool_size, strides=params.pool_size,
                                        dtype=policy, name=f"pool{i}")(net)  # [batch, 14, 14, 32] / [batch, 7, 7, 64]
    net = keras.layers.Flatten(dtype=policy, name="flatten")(net)  # [batch, 7 * 7 * 64]
    net = keras.layers.Dense(params.dense_units, activation="relu", dtype=policy, name="dense")(net)  # [batch, 1024]
    net = keras.layers.Dropout(params.dropout, dtype=policy, name="dropout")(net)  # [batch, 1024]
    logits = keras.layers.Dense(params.num_classes, dtype=policy, name="logits")(net)  # [batch, 10]
    logits = keras.layers.Activation("linear", dtype="float32", name="logits_float32")(logits)  # [batch, 10]
    return keras.Model(inputs, logits, name=params.name)


@dataclass
class EstimatorSpec:
    """What the model function returns for one mode: predictions always, the loss unless predicting."""

    predictions: dict[str, tf.Tensor]
    loss: tf.Tensor | None = None


def model_fn(network: keras.Model, features: tf.Tensor, labels: tf.Tensor | None, mode: Mode) -> EstimatorSpec:
    """Run the network in `mode`: dropout is active only in TRAIN."""
    logits = network(features, training=mode == Mode.TRAIN)
    predictions = {"classes": tf.argmax(logits, axis=1, output_type=tf.int32),
                   "probabilities": tf.nn.softmax(logits, name="softmax_tensor")}
    if mode == Mode.PREDICT:
        return EstimatorSpec(predictions)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
    return EstimatorSpec(predictions, loss)


def training_flops_per_example(network: keras.Model) -> int:
    """Multiply-adds x 2 of the forward pass, x 3 for forward + backward, from the layer shapes."""
    forward = 0
    for layer in network.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, out_channels = layer.output.shape
            kh, kw = layer.kernel_size
            forward += 2 * height * width * out_channels * kh * kw * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            forward += 2 * layer.input.shape[-1] * layer.units
    return 3 * forward
