"""Replace a file whole: a crash leaves the old file or the new one under its name, never a mix.

Every side writes files that a later run trusts (the epsilon ledger, the DP state, quarantine
lists, caches, fetched DICOM, the run history), so the one way to write them lives in the
package every side may import.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write"]


def atomic_write(
    path: Path | str,
    data: bytes | Callable[[BinaryIO], object],
    *,
    durable: bool,
    mode: int = 0o600,
    prefix: str | None = None,
) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename it.

    Args:
        data: the bytes, or a function that writes them to the binary file it is given (for
            ``torch.save``, ``json.dump`` over a text wrapper, ...).
        durable: also survive a power cut: the file is fsynced before the rename and the folder
            after it. Without it a crash still never leaves a partial file under ``path``, but
            the write may be lost (use it for what is cheaply made again: caches, reports).
        mode: the file's permission bits (owner-only by default).
        prefix: the temporary file's name prefix (default ``.<name>.``); a reader that sweeps
            up interrupted writes can look for it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        dir=path.parent, prefix=prefix if prefix is not None else f".{path.name}.", suffix=".tmp"
    )
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes | bytearray | memoryview):
                handle.write(data)
            else:
                data(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if durable:  # the rename itself is only durable once the folder is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
