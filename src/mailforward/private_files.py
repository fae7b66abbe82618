"""Creating files that hold secrets: SRS secrets, DKIM private keys.

One way to do it, so every such file is born right: created exclusively
(an existing secret is never replaced: published records or addresses in
flight depend on it), mode 600 from the first byte, and on disk before we
say it was written.
"""

from __future__ import annotations

import os
from pathlib import Path


def create_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file readable by its owner only.

    Raises ``FileExistsError`` if ``path`` exists and ``OSError`` for any
    other failure; callers word these for their own kind of file.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may have cleared bits; never widened, but be exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
