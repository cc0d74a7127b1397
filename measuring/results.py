"""Dated results files: the Markdown tables a script writes of what it measured, headed by the date, the commit, the
machine and the command, so that a figure in results/ always says where it came from."""

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone

import torch

from reading.file_index import available_cores
from running.storage import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def commit():
    """The repository's short commit hash, '+changes' when tracked files differ from it; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        changed = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def machine(device=None):
    """CPU model, usable cores, Python and torch versions, and the GPU where the device is one."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    described = (
        f"{cpu}, {available_cores()} cores usable, Python {platform.python_version()}, torch {torch.__version__}"
    )
    if device is not None and device.type == "cuda":
        described += f", GPU {torch.cuda.get_device_name(device)}"
    return described


def markdown_table(header, rows):
    """A Markdown table: header is a list of column names, rows lists of cells (written with str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]) + "\n"


STARTED = datetime.now(timezone.utc), commit()  # when the measuring script started, and the code it ran


def measured():
    """'<start> UTC, commit <hash at the start> (<hash> when written, where they differ); written <end> UTC'."""
    (started, at_start), now, at_end = STARTED, datetime.now(timezone.utc), commit()
    written = f" ({at_end} when written)" if at_end != at_start else ""
    return f"{started:%Y-%m-%d %H:%M} UTC, commit {at_start}{written}; written {now:%Y-%m-%d %H:%M} UTC"


def script(path):
    """How the running script is started from the repository root: `bench.py`, or `-m measuring.cluster_methods` for
    a module of a library folder (run with python -m)."""
    parts = os.path.normpath(os.path.relpath(os.path.abspath(path), ROOT)).split(os.sep)
    if len(parts) > 1 and parts[0] != "..":
        return "-m " + ".".join(parts)[: -len(".py")]
    return os.path.basename(path)


def write_results(path, title, body, device=None):
    """Write results/<file>.md: the title, then when, where and how it was measured, then body (Markdown)."""
    header = (
        f"# {title}\n\n"
        f"- measured: {measured()}\n"
        f"- machine: {machine(device)}\n"
        f"- command: `{shlex.join(['python', *script(sys.argv[0]).split(), *sys.argv[1:]])}`\n\n"
    )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: f.write((header + body).encode()))
    return path


def dated_path(directory, name):
    """directory/<YYYY-MM-DD>-<name>.md (UTC date), or <YYYY-MM-DD>-<HHMM>-<name>.md where a measurement of that day
    is already there (never overwritten)."""
    now = datetime.now(timezone.utc)
    path = os.path.join(directory, f"{now:%Y-%m-%d}-{name}.md")
    return path if not os.path.exists(path) else os.path.join(directory, f"{now:%Y-%m-%d-%H%M}-{name}.md")
