"""Every test sees 8 simulated CPU devices, so sharding tests can build (2, 2, 2) meshes."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
