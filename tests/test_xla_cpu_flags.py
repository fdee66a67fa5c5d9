"""gembed's XLA:CPU flags: added to XLA_FLAGS on import, never over a flag the user set."""
import os

import gembed  # noqa: F401  (its import adds the flags to this process's XLA_FLAGS)
from gembed.xla_cpu_flags import TUNED_FLAGS, add_tuned_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type"


def test_tuned_flags_are_appended_to_the_users_flags():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    add_tuned_flags(environ)
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {YNN}=-individual_dot"
    assert TUNED_FLAGS == {YNN[2:]: "-individual_dot"}
    assert f"{YNN}=" in os.environ["XLA_FLAGS"]


def test_a_flag_the_user_set_is_kept():
    environ = {"XLA_FLAGS": f"{YNN}=+eltwise"}
    add_tuned_flags(environ)
    assert environ == {"XLA_FLAGS": f"{YNN}=+eltwise"}
    empty = {}
    add_tuned_flags(empty)
    assert empty == {"XLA_FLAGS": f"{YNN}=-individual_dot"}
