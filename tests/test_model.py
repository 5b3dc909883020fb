import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from tfsweep.model import Mode, build_network, model_fn, training_flops_per_example, usable_precision

TUTORIAL = OmegaConf.create({"name": "cnn", "filters": [32, 64], "kernel_size": 5, "pool_size": 2,
                             "dense_units": 1024, "dropout": 0.4, "num_classes": 10})


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_layer_shapes_are_the_tutorials(precision):
    network = build_network(TUTORIAL, precision)
    shapes = {layer.name: tuple(layer.output.shape) for layer in network.layers}
    assert shapes["conv1"] == (None, 28, 28, 32)
    assert shapes["pool1"] == (None, 14, 14, 32)
    assert shapes["conv2"] == (None, 14, 14, 64)
    assert shapes["pool2"] == (None, 7, 7, 64)
    assert shapes["flatten"] == (None, 7 * 7 * 64)
    assert shapes["dense"] == (None, 1024)
    assert shapes["logits_float32"] == (None, 10)
    logits = network(np.zeros((3, 28, 28), np.float32))
    assert logits.shape == (3, 10) and logits.dtype == tf.float32  # loss in float32 under bfloat16 too
    compute = "bfloat16" if precision == "mixed_bfloat16" else "float32"
    assert network.get_layer("conv1").compute_dtype == compute
    assert network.get_layer("conv1").kernel.dtype == "float32"


def test_training_flops_from_layer_shapes():
    conv1 = 28 * 28 * 32 * 5 * 5 * 1
    conv2 = 14 * 14 * 64 * 5 * 5 * 32
    dense = 3136 * 1024 + 1024 * 10
    assert training_flops_per_example(build_network(TUTORIAL)) == 3 * 2 * (conv1 + conv2 + dense)
    assert 83e6 < training_flops_per_example(build_network(TUTORIAL)) < 84e6


def test_dropout_is_active_only_in_training():
    network = build_network(TUTORIAL)
    features = tf.random.uniform((8, 28, 28), seed=1)
    labels = tf.zeros(8, tf.int32)
    a = model_fn(network, features, labels, Mode.EVAL).predictions["probabilities"]
    b = model_fn(network, features, None, Mode.PREDICT).predictions["probabilities"]
    np.testing.assert_allclose(a, b)
    c = model_fn(network, features, labels, Mode.TRAIN)
    assert not np.allclose(a, c.predictions["probabilities"])


def test_modes_return_what_the_estimator_would():
    network = build_network(TUTORIAL)
    features, labels = tf.random.uniform((4, 28, 28)), tf.constant([0, 1, 2, 3])
    predict = model_fn(network, features, None, Mode.PREDICT)
    assert predict.loss is None
    np.testing.assert_allclose(tf.reduce_sum(predict.predictions["probabilities"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(predict.predictions["classes"],
                                  np.argmax(predict.predictions["probabilities"], axis=1))
    evaluate = model_fn(network, features, labels, Mode.EVAL)
    assert evaluate.loss.shape == () and 1.5 < float(evaluate.loss) < 3.5  # ~ln(10) at initialisation


ZEN3_FLAGS = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n"
ZEN4_FLAGS = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16\n"
XEON_NO_AMX_FLAGS = "vendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16\n"
XEON_AMX_FLAGS = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_mixed_bfloat16_falls_back_to_float32_only_where_bfloat16_is_slower(caplog):
    assert usable_precision("mixed_bfloat16", ZEN4_FLAGS) == "mixed_bfloat16"
    assert usable_precision("mixed_bfloat16", XEON_AMX_FLAGS) == "mixed_bfloat16"
    assert usable_precision("mixed_bfloat16", "Features\t: fp asimd bf16\n") == "mixed_bfloat16"  # no x86 flags
    assert usable_precision("float32", ZEN3_FLAGS) == "float32"
    assert not caplog.records
    with caplog.at_level("WARNING"):
        assert usable_precision("mixed_bfloat16", ZEN3_FLAGS) == "float32"
        assert "AuthenticAMD CPU without amx_bf16 or avx512_bf16" in caplog.text
        caplog.clear()
        assert usable_precision("mixed_bfloat16", XEON_NO_AMX_FLAGS) == "float32"  # AVX-512 BF16 alone: slower
        assert "GenuineIntel CPU without amx_bf16" in caplog.text
