"""The CLI's XLA:CPU flags: never set by importing gembed, never over a flag the user set, only for
tested jaxlib versions on a CPU without bfloat16 dot instructions, and not with the opt-out."""
import os
import subprocess
import sys

import pytest

from gembed import xla_cpu_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type"


def test_importing_gembed_leaves_xla_flags_alone():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", "import os, gembed; print(os.environ.get('XLA_FLAGS'))"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_flags_are_appended_to_the_users_and_never_replace_them(monkeypatch):
    monkeypatch.setattr(xla_cpu_flags, "jaxlib_version", lambda: "0.10.2")
    monkeypatch.setattr(xla_cpu_flags, "cpu_multiplies_bfloat16", lambda: False)
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    assert xla_cpu_flags.apply(environ)
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {YNN}=-individual_dot"
    own = {"XLA_FLAGS": f"{YNN}=+eltwise", "JAX_PLATFORMS": "cpu"}
    xla_cpu_flags.apply(own)
    assert own["XLA_FLAGS"] == f"{YNN}=+eltwise"


def test_no_flags_for_untested_jaxlib_other_platforms_bfloat16_cpus_or_opt_out(monkeypatch):
    monkeypatch.setattr(xla_cpu_flags, "jaxlib_version", lambda: "0.10.2")
    monkeypatch.setattr(xla_cpu_flags, "cpu_multiplies_bfloat16", lambda: False)
    for environ in ({"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "cpu", "GEMBED_XLA_CPU_TUNING": "0"}):
        assert not xla_cpu_flags.apply(environ) and "XLA_FLAGS" not in environ
    monkeypatch.setattr(xla_cpu_flags, "cpu_multiplies_bfloat16", lambda: True)
    environ = {"JAX_PLATFORMS": "cpu"}
    assert not xla_cpu_flags.apply(environ) and "XLA_FLAGS" not in environ
    monkeypatch.setattr(xla_cpu_flags, "cpu_multiplies_bfloat16", lambda: False)
    monkeypatch.setattr(xla_cpu_flags, "jaxlib_version", lambda: "99.0")
    environ = {"JAX_PLATFORMS": "cpu"}
    assert not xla_cpu_flags.apply(environ) and "XLA_FLAGS" not in environ


def test_cpu_platform_is_pinned_only_when_jax_runs_on_the_cpu_and_the_user_chose_nothing(monkeypatch):
    monkeypatch.setattr(xla_cpu_flags, "runs_on_cpu", lambda environ: True)
    environ = {}
    assert xla_cpu_flags.pin_cpu_platform(environ) and environ == {"JAX_PLATFORMS": "cpu"}
    chosen = {"JAX_PLATFORMS": "tpu,cpu"}
    assert not xla_cpu_flags.pin_cpu_platform(chosen) and chosen == {"JAX_PLATFORMS": "tpu,cpu"}
    monkeypatch.setattr(xla_cpu_flags, "runs_on_cpu", lambda environ: False)
    environ = {}
    assert not xla_cpu_flags.pin_cpu_platform(environ) and environ == {}


def test_the_cli_pin_keeps_libtpu_unloaded_though_jax_was_imported_first():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    if not xla_cpu_flags.runs_on_cpu(env):
        pytest.skip("JAX runs on an accelerator here: nothing is pinned")
    script = ("import jax, gembed.cli; from gembed import xla_cpu_flags; "
              "pinned = xla_cpu_flags.pin_cpu_platform(); platform = jax.devices()[0].platform; "
              "print(pinned, platform, 'libtpu' in open('/proc/self/maps').read())")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["True", "cpu", "False"]
    assert "TPU" not in out.stderr
