"""Every test sees 8 simulated CPU devices, so sharding tests can build (2, 2, 2) meshes."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow (seqio, tfds) must never grab an accelerator that JAX wants.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
