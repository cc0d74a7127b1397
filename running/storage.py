"""Files written so that a crash or a kill mid-write never leaves a half-written file in place."""

import json
import os


class WriteFailed(OSError):
    """A file that could not be written (no space, read-only, quota, permission); the message names file and cause."""


def atomic_write(path, write):
    """write(file) into a temporary file beside `path`, then rename it over `path`.

    A run killed mid-write leaves the previous file intact (rename is atomic on POSIX); a write that fails (disk
    full, quota, read-only) leaves it intact too and raises WriteFailed naming the file and the cause.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise WriteFailed(f"could not write {path}: {err.strerror or err}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path, content):
    atomic_write(path, lambda f: f.write(json.dumps(content, indent=1).encode()))


def probe_writable(folder, n_bytes):
    """Create `folder` and write (then remove) a file of n_bytes there: a folder that cannot take one checkpoint
    is found before a run starts, not at its first save. Raises WriteFailed."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise WriteFailed(f"could not create {folder}: {err.strerror or err}") from None
    path = os.path.join(folder, ".write_probe")
    atomic_write(path, lambda f: f.write(bytes(n_bytes)))
    os.remove(path)
