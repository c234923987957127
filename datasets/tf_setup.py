"""Import TensorFlow for data I/O only: quiet logs, no GPU (torch owns the accelerator)."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")

import tensorflow_datasets as tfds  # noqa: E402

tfds.disable_progress_bar()

__all__ = ["tf", "tfds"]

from absl import logging as _absl_logging  # noqa: E402

_absl_logging.set_verbosity(_absl_logging.ERROR)  # tfds warns about its own tf.bool features
