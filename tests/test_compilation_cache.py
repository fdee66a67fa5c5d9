"""Where the CLI's persistent compilation cache goes, and where it stays off."""
import jax

from gembed import compilation_cache


def enabled_dir(environ, monkeypatch):
    """What `enable(environ)` returns, with the config update it makes recorded, not applied."""
    updates = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.__setitem__(name, value))
    path = compilation_cache.enable(environ)
    assert updates == ({} if path is None else {"jax_compilation_cache_dir": str(path)})
    return path


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert enabled_dir({**cpu, "XDG_CACHE_HOME": str(tmp_path)}, monkeypatch) == tmp_path / "gembed" / "jax"
    gembed_cache = {**cpu, "XDG_CACHE_HOME": str(tmp_path), "GEMBED_CACHE": str(tmp_path / "g")}
    assert enabled_dir(gembed_cache, monkeypatch) == tmp_path / "g" / "jax"
    assert enabled_dir({**cpu, "JAX_COMPILATION_CACHE_DIR": str(tmp_path)}, monkeypatch) == tmp_path
    assert enabled_dir({**cpu, "GEMBED_COMPILATION_CACHE": "0"}, monkeypatch) is None


def test_cache_stays_off_for_several_cpu_devices_in_one_process(monkeypatch, tmp_path):
    eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
             "JAX_COMPILATION_CACHE_DIR": str(tmp_path)}
    assert enabled_dir({**eight, "JAX_PLATFORMS": "cpu"}, monkeypatch) is None
    assert enabled_dir({**eight, "JAX_PLATFORMS": "cuda"}, monkeypatch) == tmp_path
    one = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path)}
    assert enabled_dir(one, monkeypatch) == tmp_path
