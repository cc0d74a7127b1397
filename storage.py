"""Files written so that a crash or a kill mid-write never leaves a half-written file in place."""

import json
import os


def atomic_write(path, write):
    """write(file) into a temporary file beside `path`, then rename it over `path`.

    A run killed mid-write leaves the previous file intact (rename is atomic on POSIX).
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path, content):
    atomic_write(path, lambda f: f.write(json.dumps(content, indent=1).encode()))
