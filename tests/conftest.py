"""Test-wide setup: 8 CPU devices stand in for accelerator chips in sharding tests, and one
persistent compilation cache serves the session and every run it starts."""
import atexit
import os
import shutil
import tempfile

# Must be set before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The end-to-end tests start `python -m epo_jax.main` (and sft, the launcher, notebooks) many times
# on the same tiny models; each process would compile the same update, score pass and sampler
# programs again. JAX's persistent cache, in a folder of this session's that the started processes
# inherit through the environment, compiles each once. A cached executable is the one compiled, so
# results are unchanged; every test still traces and lowers its programs. (Programs with a host
# callback, such as the update and its progress count, are never cached: JAX compiles them each time.)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="epo_jax_tests_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
