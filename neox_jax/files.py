"""Writing output files atomically, with the mode the user's umask gives a new file.

Every writer that must never leave half a file (params and HF exports, preprocessed .bin/.idx pairs, index and id
caches) writes a temporary file beside its target and renames it when complete. `tempfile.mkstemp` creates that
file 0600, and safetensors' writer creates its files 0600 too; renamed as they are, colleagues reading the
outputs on shared storage could not open them. `publish` gives the file the mode a plain `open(path, "w")` would
(0644 under umask 022, 0600 under 077) before the rename. A leaf: imports nothing of its siblings.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (another thread creating a file while
    os.umask is swapped would get the wrong mode), else by setting it and setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """What `open(path, "w")` gives a new file: 0666 less the umask."""
    return 0o666 & ~umask()


def temp_beside(target) -> tuple[int, str]:
    """(open fd, path) of a new temporary file in `target`'s folder (the rename onto it is then atomic)."""
    target = os.fspath(target)
    return tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".tmp",
                            dir=os.path.dirname(target) or ".")


def publish(tmp, target) -> None:
    """Give the complete temporary file `tmp` the umask's mode and rename it onto `target`."""
    os.chmod(tmp, new_file_mode())
    os.replace(tmp, target)


@contextlib.contextmanager
def atomic_path(target):
    """A temporary path beside `target` to write (the file exists, empty); renamed onto `target` with the umask's
    mode when the block completes, removed if it fails."""
    fd, tmp = temp_beside(target)
    os.close(fd)
    try:
        yield pathlib.Path(tmp)
        publish(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
