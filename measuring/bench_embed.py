"""bench.py --embed_windows N [N ...]: embed.py as a user runs it on N windows of a continuous archive, one new process
per N: wall time, windows/s and peak memory, to show how its cost grows with N.

The archive (archives.make_real_archive, written once into --embed_archive): one 100 Hz HH instrument, real samples
(the shipped HH recordings joined and repeated to fill each day), as SDS day files. For each N, the first
ceil(N x STRIDE / 1 day) days are hard-linked into a folder of their own and embedded in 10 s windows every 2 s (the
window length the read-out is fitted on) with the checkpoint's defaults: `python embed.py CKPT --data_dir DAYS
--window_seconds 10 --window_stride 2 --output_dir OUT`. Peak memory is the child's maximum resident set size
(os.wait4); windows/s is embed.py's own figure (reading, STFT and the model), wall the whole run (index, clusters,
catalogue, figures, projector, atlas included); atlas s is embed.py's own figure for atlas.html and its figures
(embedding/atlas.py), and its share of the wall time.
"""

import json
import math
import os
import re
import subprocess
import sys
import time

from measuring.archives import SDS_DAY, make_real_archive
from measuring.results import markdown_table

WINDOW_SECONDS, STRIDE = 10.0, 2.0
EMBED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "embed.py")
RATE = re.compile(r"embedded (\d+) samples in ([\d.]+) s: (\d+) samples/s")
ATLAS = re.compile(r"atlas written in ([\d.]+) s")


def linked_days(root, n_days):
    """root/days<n_days>: hard links to the day files of the archive's first n_days days (root/archive)."""
    source, folder = os.path.join(root, "archive"), os.path.join(root, f"days{n_days}")
    days = {f".{day:03d}" for day in range(1, n_days + 1)}  # julian days of 2020 from 1 January
    for parent, _, names in os.walk(source):
        for name in names:
            if name[-4:] in days:
                target = os.path.join(folder, os.path.relpath(parent, source), name)
                if not os.path.exists(target):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    os.link(os.path.join(parent, name), target)
    return folder


def run_embed(checkpoint, data_dir, output_dir):
    """(wall s, peak RSS in bytes, embed.py's output) of one embed.py run in a new process."""
    command = [sys.executable, EMBED, checkpoint, "--data_dir", data_dir, "--output_dir", output_dir]
    command += ["--window_seconds", f"{WINDOW_SECONDS:g}", "--window_stride", f"{STRIDE:g}", "--device", "cpu"]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"embed.py failed on {data_dir}:\n{output[-2000:]}")
    return wall, usage.ru_maxrss * 1024, output  # ru_maxrss: kB on Linux


def embed_stage(sizes, checkpoint, root):
    """bench.py's figures of embed.py at each N of sizes: JSON keys embed_* (lists, one entry per N); prints a table."""
    if not checkpoint:
        raise SystemExit("error: --embed_windows needs --checkpoint (a run's best_model.pt)")
    n_days = [math.ceil(n * STRIDE / SDS_DAY) for n in sizes]
    started = time.perf_counter()
    written = make_real_archive(max(n_days), os.path.join(root, "archive"))
    print(f"archive: {written} day files written in {time.perf_counter() - started:.0f} s ({root}/archive)")
    print(f"{'windows':>10} {'days':>5} {'wall s':>8} {'windows/s':>10} {'peak RSS GB':>12} {'bytes/window':>13} "
          f"{'atlas s':>8}")  # fmt: skip
    results = []
    for days in n_days:
        output_dir = os.path.join(root, f"out{days}")
        wall, peak, output = run_embed(checkpoint, linked_days(root, days), output_dir)
        with open(os.path.join(output_dir, "embedding.json")) as f:
            rows = json.load(f)["rows"]
        found = RATE.search(output)
        stored = sum(os.path.getsize(os.path.join(output_dir, name)) for name in os.listdir(output_dir)
                     if os.path.isfile(os.path.join(output_dir, name)))  # fmt: skip
        results.append({"windows": rows, "days": days, "wall_s": wall, "peak_rss": peak, "bytes": stored / rows})
        results[-1]["rate"] = float(found.group(3)) if found else float("nan")
        atlas = ATLAS.search(output)
        results[-1]["atlas_s"] = float(atlas.group(1)) if atlas else float("nan")
        r = results[-1]
        print(f"{rows:>10,} {days:>5} {wall:8.0f} {r['rate']:10.0f} {peak / 1e9:12.2f} {r['bytes']:13.0f} "
              f"{r['atlas_s']:8.1f}", flush=True)  # fmt: skip
    return {
        "embed_windows": [r["windows"] for r in results],
        "embed_days": [r["days"] for r in results],
        "embed_wall_s": [r["wall_s"] for r in results],
        "embed_windows_per_s": [r["rate"] for r in results],
        "embed_peak_rss_bytes": [r["peak_rss"] for r in results],
        "embed_output_bytes_per_window": [r["bytes"] for r in results],
        "embed_atlas_s": [r["atlas_s"] for r in results],
    }


def markdown(f):
    """The results file's body: the table of embed_stage's figures."""
    atlas = f.get("embed_atlas_s", [float("nan")] * len(f["embed_windows"]))  # results of before the atlas have none
    rows = [
        (f"{n:,}", days, f"{wall:.0f}", f"{rate:.0f}", f"{peak / 1e9:.2f}", f"{stored:.0f}", f"{seconds:.1f}",
         f"{100 * seconds / wall:.2f} %")
        for n, days, wall, rate, peak, stored, seconds in zip(
            f["embed_windows"], f["embed_days"], f["embed_wall_s"], f["embed_windows_per_s"],
            f["embed_peak_rss_bytes"], f["embed_output_bytes_per_window"], atlas,
        )
    ]  # fmt: skip
    header = ["windows", "days", "wall s", "windows/s (embed.py)", "peak RSS GB", "output bytes/window", "atlas s",
              "atlas share of wall"]  # fmt: skip
    described = f"{WINDOW_SECONDS:g} s windows every {STRIDE:g} s of one real 100 Hz HH instrument (module docstring)"
    return f"{described}\n\n" + markdown_table(header, rows)
