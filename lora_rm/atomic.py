"""Writing files so that a crash never leaves half of one: a temporary name beside the target, then os.replace."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[str]:
    """Yield a temporary file name beside target and rename it onto target only if the write finished."""
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        try:
            yield tmp
        except (OSError, SafetensorError) as error:  # a full disk says "No space left on device" but not where
            raise OSError(f"writing {target} failed: {error}") from error
        # mkstemp (and safetensors' own temporary file) make 0600; other nodes of a shared filesystem must read it
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(target: Path, value: object) -> None:
    """Strict JSON (a NaN refused, never written as the non-standard NaN), atomically."""
    text = json.dumps(value, indent=2, allow_nan=False)
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text + "\n")


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask alone must set one to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
