"""Shared test hygiene: every test starts and ends with an empty, unlocked gin config.

An in-process `gembed train` parses and locks gin bindings (e.g. model/tiny.gin's output sizes);
gin-configurable dataclasses would otherwise pick them up in later, unrelated tests.
"""
import gin
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
