"""Strict JAX settings for every test (the equinox habit)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
