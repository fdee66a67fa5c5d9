"""INIT_FROM='hf:ORG/NAME[@REVISION]': the Hub model imported once into a cached gembed model
folder, which training then treats like any INIT_FROM model folder.

The folder is $GEMBED_CACHE (else $XDG_CACHE_HOME/gembed, ~/.cache/gembed) /models/
ORG--NAME@REVISION, REVISION being what the name resolved to (a snapshot commit, or a weights
package's version), so a new upstream revision is a new folder. It is written next to its final
place and renamed into it, so a folder there is complete.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

from gembed.cache_home import cache_home
from gembed.convert.hub import resolve
from gembed.convert.importer import import_model
from gembed.model_folder import is_model_folder


def hub_model_folder(spec: str) -> pathlib.Path:
    """The gembed model folder of `hf:ORG/NAME[@REVISION]`, imported with `gembed import`'s
    defaults on first use."""
    model = resolve(spec)
    folder = cache_home() / "models" / f"{model.name.replace('/', '--')}@{model.revision}"
    if is_model_folder(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        import_model(model.path, staging / "model", hub=model)
        os.replace(staging / "model", folder)
    except OSError:
        if not is_model_folder(folder):   # else a concurrent import won the rename
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
