"""Shared test hygiene: every test starts and ends with an empty, unlocked gin config.

An in-process `gembed train` parses and locks gin bindings (e.g. model/tiny.gin's output sizes);
gin-configurable dataclasses would otherwise pick them up in later, unrelated tests.

Tests compare against float64 references, PyTorch and other runs of other shapes, so they run at
JAX's float32 matmul precision, here and in the commands they start: ModelConfig.matmul_precision
"auto" resolves to float32 then (bfloat16 inputs are tested on their own, in
tests/test_matmul_precision.py and the sentence-transformers parity test).
"""
import os

import gin
import jax
import pytest

from gembed import compilation_cache, xla_cpu_flags


@pytest.fixture(autouse=True)
def clean_gin_config():
    gin.clear_config()
    yield
    gin.clear_config()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over ~20 s on a 2-core CPU (deselect with "
                                       "-m 'not slow')")
    compilation_cache.enable()   # compiled fixtures are reused by later test sessions
    # as the CLI does: no libtpu probe at JAX's start (the [aot] extra installs libtpu, and the
    # probe aborts or prints warnings in subprocesses while this process holds libtpu)
    xla_cpu_flags.pin_cpu_platform()
    os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "float32"
    jax.config.update("jax_default_matmul_precision", "float32")
