"""Test set-up: eight fake CPU devices, so sharding is tested for real on one machine."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tempfile  # noqa: E402

import jax  # noqa: E402

# The tests build the same programs many times over (a fresh jit of one train step per
# test): a persistent cache of this process's own turns each repeat into a load. Its own
# directory, not the subprocesses' (tests/compilation_cache.py), so no two processes ever
# write one entry at the same time.
_cache = tempfile.TemporaryDirectory(prefix="pne-jax-tests-in-process-cache-")
jax.config.update("jax_compilation_cache_dir", _cache.name)
