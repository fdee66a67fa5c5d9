"""Writing a whole output folder (`gembed export`, `gembed soup`) without clobbering anything.

A non-empty `--output` is refused unless `overwrite`; the folder is written into a temporary
sibling `.NAME.*.partial` and renamed into place when complete, so a crash at any point leaves the
old folder (or none) at NAME, never a mix. Files get the permissions the umask gives new files
(0644 under the usual 022), the folder those of new folders.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Sequence

from gembed.errors import GembedUserError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output(output: str | os.PathLike, overwrite: bool,
                 sources: Sequence[pathlib.Path] = ()) -> pathlib.Path:
    """The resolved `output` after refusing a file, a non-empty folder (without `overwrite`), or
    a folder that is, holds or lies in one of the `sources` being read."""
    output = pathlib.Path(output).resolve()
    if output.exists() and not output.is_dir():
        raise GembedUserError(f"{output}: --output is a file; name a folder.")
    for source in sources:
        source = pathlib.Path(source).resolve()
        if output == source or output in source.parents or source in output.parents:
            raise GembedUserError(f"{output}: --output overlaps the input {source}; choose a "
                                  f"separate folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise GembedUserError(f"{output}: --output exists and is not empty; choose a new folder "
                              f"or pass --overwrite to replace it.")
    return output


def write_folder(output: pathlib.Path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Runs `write(tmp)` on a fresh temporary sibling of `output`, then puts it in output's place
    (the old folder is removed only once the new one is there). Returns `output`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial",
                                        dir=output.parent))
    try:
        write(tmp)
        mask = _umask()
        for path in tmp.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if output.is_dir() and any(output.iterdir()):
            old = tmp.with_name(tmp.name.replace(".partial", ".old"))
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
