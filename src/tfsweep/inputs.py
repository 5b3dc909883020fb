"""Input functions: `(features, labels)` batches per split as tf.data pipelines.

The images stay uint8 in memory; each batch is gathered by index and scaled to [0, 1] on the fly, so
shuffling moves only indices. The training order is a function of the seed alone, which makes a
resumed run see exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
PREFETCH = 2  # batches ready ahead of the training step


def _batches_of(indices: tf.data.Dataset, images: np.ndarray, labels: np.ndarray | None) -> tf.data.Dataset:
    images_t = tf.convert_to_tensor(images)
    labels_t = None if labels is None else tf.convert_to_tensor(labels)

    def gather(idx):
        features = tf.cast(tf.gather(images_t, idx), tf.float32) / 255.0  # [batch, 28, 28]
        return features if labels_t is None else (features, tf.gather(labels_t, idx))

    # No tf.data autotuning: deleting an iterator joins the autotuner's thread, which sleeps for up to a
    # minute between rounds, and a sweep trial sat idle for up to 20 s at its end. Without it, AUTOTUNE
    # maps on one call per core, and a gather of a few hundred images is far ahead of a training step.
    options = tf.data.Options()
    options.autotune.enabled = False
    return (indices.map(gather, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(PREFETCH)
            .with_options(options))


def train_input_fn(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                   shuffle_buffer: int, start_step: int = 0) -> tf.data.Dataset:
    """Endless shuffled training batches, starting at global step `start_step`."""
    indices = (tf.data.Dataset.range(len(images))
               .shuffle(min(shuffle_buffer, len(images)), seed=seed, reshuffle_each_iteration=True)
               .repeat()
               .batch(batch_size, drop_remainder=True)
               .skip(start_step))
    return _batches_of(indices, images, labels)


def eval_input_fn(images: np.ndarray, labels: np.ndarray | None, batch_size: int) -> tf.data.Dataset:
    """One pass over a split in order; with `labels=None` it yields features only (for predict)."""
    indices = tf.data.Dataset.range(len(images)).batch(batch_size)
    return _batches_of(indices, images, labels)
