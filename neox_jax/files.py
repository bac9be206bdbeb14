"""Writing output files atomically, with the mode the user's umask gives a new file.

Every writer that must never leave half a file (params and HF exports, preprocessed .bin/.idx pairs, index and id
caches) writes a temporary file beside its target and renames it when complete. `tempfile.mkstemp` creates that
file 0600, and safetensors' writer creates its files 0600 too; renamed as they are, colleagues reading the
outputs on shared storage could not open them. `publish` gives the file the mode a plain `open(path, "w")` would
(0644 under umask 022, 0600 under 077) before the rename.

A temporary file's name holds the host and process that write it (`out.bin.HOST-PID.XXXXXXXX.tmp`), so a later run
can tell the leftovers of a writer that was killed (`kill -9`, a lost node) from the files of one still writing:
`remove_stale_temps`. Whether an output may replace an existing file is `check_new`'s one rule (the scripts'
--overwrite). A leaf but for `errors`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import re
import socket
import tempfile
from typing import Iterable

from neox_jax import errors


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


def _writer_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def temp_beside(target) -> tuple[int, str]:
    """(open fd, path) of a new temporary file in `target`'s folder (the rename onto it is then atomic), named for
    this host and process."""
    target = os.fspath(target)
    return tempfile.mkstemp(prefix=f"{os.path.basename(target)}.{_writer_tag()}.", suffix=".tmp",
                            dir=os.path.dirname(target) or ".")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder, stem: str) -> list[str]:
    """Remove the temporary files in `folder` whose names start with `stem` and whose writer, a process of this host,
    is gone (killed before it could rename or remove them); returns their names. A file of a live writer, of
    another host (shared storage: its process cannot be seen from here) or of an older naming is left alone."""
    folder = os.fspath(folder) or "."
    pattern = re.compile(rf"{re.escape(stem)}.*\.{re.escape(socket.gethostname())}-(\d+)\.\w+\.tmp")
    removed = []
    for name in sorted(os.listdir(folder)):
        match = pattern.fullmatch(name)
        if match and int(match[1]) != os.getpid() and not _alive(int(match[1])):
            with contextlib.suppress(FileNotFoundError):  # another run cleaning up at the same time
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed


def check_new(paths: Iterable, flag: str, overwrite: bool = False) -> None:
    """Refuse to replace an existing output file unless `overwrite` (the scripts' --overwrite): results already
    written are not lost to a repeated or mistyped command. `flag` names where the path came from."""
    for path in paths:
        if not overwrite and os.path.exists(path):
            raise errors.InputError(f"{flag} {os.fspath(path)}: the file exists; choose a new name, or pass "
                                    "--overwrite to replace it")


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


@contextlib.contextmanager
def exclusive(path):
    """Wait for, then hold, an flock on the file `path` (created if missing) for the block: the processes of one
    host that build the same file take turns. The kernel releases it when the holder dies, kill -9 included."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
