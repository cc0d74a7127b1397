"""Measure the pipeline on this machine: samples/s at each stage, start-up time and peak memory.

    python bench.py                                            # shipped data, 30 s on 2 cores
    python bench.py --make_files 20000 /tmp/bench20k --num_files 2000 --json bench20k.json
                    # first writes 20,000 files cut from the shipped data (those already there are kept)
    python bench.py --link_files 132169 /tmp/links132k --startup_only    # start-up on 132k files
    python bench.py --make_archive 10 365 /tmp/archive                   # also 10.5 million windows
    python bench.py --markdown results/                                  # also results/<date>-bench.md
    python bench.py --seisbench 20000 /tmp/sb20k                # a SeisBench dataset: start-up, samples/s vs files
    python bench.py --search 100000 1000000 --json search.json          # only vector search (docs/search.md)
    python bench.py --embed_windows 100000 1000000 --checkpoint CKPT    # only embed.py on N archive windows

Stages, all over the same files with a warm page cache (every file is read once first). Each figure
is the best of 3 passes, taken in rounds that run every stage once, after a warm-up round that starts
the DataLoader workers; ratios compare figures of the same run only.
  limit       bare loop: read (obspy's miniSEED reader, as the dataset calls it) + spectrogram() (STFT and
              normalisation), one process; also with obspy.read, which looks the reader up on every call
  loader      SeismicSTFTDataset through a DataLoader with 0, 1, 2 workers (persistent, as in train.py);
              ratio = samples/s / (limit x processes doing the work)
  cached      the same through --cache_dir's SpectrogramCache; ratio to the uncached loader, same workers
  bare_step   model forward + backward + Adam step on ready batches; train_loop: train.py's train_epoch on them
  pipeline    train_epoch fed by the cached DataLoader (what an epoch with --cache_dir costs)
  embed       embed.py's encode_batch on the same ready batches (embedding, reconstruction MSE, baseline MSE)
  startup     a new Python process, launch to first batch: cold (no index) and warm (index stored); against
              the 2 s target for a warm start
  cache build files/s of building --cache_dir, against cores x limit (target 0.7)
  windows     the shipped recordings joined back to back per instrument and written as an SDS archive (one
              file per channel and day), read as 90 s windows every 90 s through the DataLoader (0 workers),
              in order and shuffled, against the same 90 s read as whole files ("DataLoader, 0 workers")
With --make_archive, also: a generated SDS archive of 1 Hz day files (LHE/LHN/LHZ, constant samples: only the
headers matter here) counted as 60 s windows every 30 s: windows, start-up cold and warm, memory.
"""

import contextlib
import glob
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial

import numpy as np
import obspy
import torch
from torch.utils.data import DataLoader, Subset

from embedding.poolings import encode_batch
from measuring import bench_embed, bench_search
from measuring.archives import WINDOW_SECONDS, link_files, make_archive, make_files, shipped_as_sds, shipped_sources
from measuring.results import dated_path, machine, markdown_table, write_results
from model import ConvAutoencoder, masked_mse
from reading.file_index import DEFAULT_DATA_DIR, INDEX_NAME, available_cores
from reading.seisbench_data import is_seisbench_dataset, open_dataset, write_tiled_dataset
from reading.transform import STFTConfig, spectrogram
from reading.waveforms import read_miniseed
from running.device import AMP_MODES, loader_options, mixed_precision, model_input, resolve_device
from running.settings import Setting, at_least, parse
from running.training import train_epoch
from stft_dataset import SeismicSTFTDataset, SkipLog, pad_collate

WORKER_COUNTS = (0, 1, 2)
REPEATS = 3  # measured passes per stage; the best one is reported
STEP_BATCHES = 10  # batches in the training-step stages
WARM_STARTUP_TARGET_S = 2.0  # a warm start of a 132k-file archive, launch to first batch
PROBE = "measuring.startup_probe"  # run as a module from the repository root (python -m), as a user runs a script
# fmt: off
SETTINGS = (
    Setting("data_dir", DEFAULT_DATA_DIR, "directory of miniSEED files to measure on"),
    Setting("num_files", 0, "files for the throughput stages, spread over the folder (0 = all)", int,
            check=at_least(0)),
    Setting("batch_size", 32, "spectrograms per batch", int, check=at_least(1)),
    Setting("device", "auto", "device of the training-step stages ('auto', 'cpu', 'cuda')"),
    Setting("amp", "off", "mixed precision of the step stages", choices=AMP_MODES),
    Setting("json", None, "also write the figures to this JSON file", metavar="PATH"),
    Setting("markdown", None, "also write the table to DIR/<date>-bench.md (a dated results file)", metavar="DIR"),
    Setting("make_files", None, f"first write N files of {WINDOW_SECONDS:.0f} s cut from the shipped recordings into "
            "DIR", nargs=2, metavar=("N", "DIR")),
    Setting("make_archive", None, "also write and measure an SDS archive of 1 Hz day files (10 365 DIR: 10.5 M)",
            nargs=3, metavar=("STATIONS", "DAYS", "DIR")),
    Setting("link_files", None, "first make N hard links to the shipped files in DIR, then measure on DIR", nargs=2,
            metavar=("N", "DIR")),
    Setting("seisbench", None, "only measure a SeisBench dataset of N traces written into DIR from the shipped files",
            nargs=2, metavar=("N", "DIR")),
    Setting("seisbench_seconds", None, "length of the traces --seisbench writes (default: whole, 90 s)", float),
    Setting("search", None, "only measure vector search: real embeddings tiled to each N (bench_search.py)", int,
            nargs="+", metavar="N", check=(lambda sizes: min(sizes) >= 1, ">= 1")),
    Setting("checkpoint", None, "model of --embed_windows, and whose embeddings --search tiles (default: random "
            "weights, seed 0)"),
    Setting("search_queries", bench_search.QUERIES, "--search: queries timed and scored", int, check=at_least(1)),
    Setting("search_exact_max_rows", None, "--search: flat (exact) index up to this many rows, IVF beyond "
            "(default: as embed.py, 11,520,000 values / D)", int, check=at_least(1)),
    Setting("search_codes", None, "--search: codes of embeddings of <= 128 values to compare, e.g. SQ8 PQ32 (default: "
            "vector_index's)", nargs="+", metavar="CODES"),
    Setting("embed_windows", None, "only measure embed.py on N windows of a real 100 Hz archive (bench_embed.py)",
            int, nargs="+", metavar="N", check=(lambda sizes: min(sizes) >= 1, ">= 1")),
    Setting("embed_archive", os.path.join(tempfile.gettempdir(), "bench_embed"),
            "--embed_windows: where its archive and outputs are written"),
    Setting("startup_only", False, "measure only the start-up to the first batch, cold and warm", action="store_true"),
)
# fmt: on


def parse_args(argv=None):
    return parse(__doc__, SETTINGS, argv, count_problems)[1]


def count_problems(args):
    """The counts of --make_files, --link_files, --seisbench and --make_archive must be whole numbers."""
    problems = []
    for flag, names in (
        ("make_files", "N"),
        ("link_files", "N"),
        ("seisbench", "N"),
        ("make_archive", "STATIONS and DAYS"),
    ):
        given = getattr(args, flag)
        if given and not all(n.isdigit() for n in given[: len(given) - 1]):
            problems.append(f"--{flag}: {names} must be a whole number")
    return problems


def window_rates(batch_size):
    """Samples/s of 90 s windows of the shipped recordings as SDS day files: in order and shuffled, 0 workers."""
    root = tempfile.mkdtemp(prefix="bench_sds_")
    try:
        shipped_as_sds(root)
        with contextlib.redirect_stderr(io.StringIO()):
            windows = SeismicSTFTDataset(root, window_seconds=90, window_stride=90)
        shuffled = torch.Generator().manual_seed(0)
        rates = best_rates(
            {
                "in order": passing(loader(windows, batch_size, 0)),
                "shuffled": passing(
                    DataLoader(windows, batch_size, shuffle=True, generator=shuffled, collate_fn=pad_collate)
                ),
            }
        )
        return {"windows": len(windows), "windows_in_order": rates["in order"], "windows_shuffled": rates["shuffled"]}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def archive_figures(root):
    """Windows of a generated archive: count, start-up of a new process cold (no index) and warm, memory."""
    figures = {}
    for state in ("cold", "warm"):
        seconds, (n_windows, n_stations, array_bytes, peak_kb, cpu) = run_probe("first_windows", root, state == "cold")
        figures |= {
            f"archive_startup_{state}_s": seconds,
            f"archive_peak_rss_{state}_mb": int(peak_kb) / 1024,
            f"archive_dataset_{state}_cpu_s": float(cpu),
        }
    return figures | {
        "archive_windows": int(n_windows),
        "archive_stations": int(n_stations),
        "archive_window_array_mb": int(array_bytes) / 2**20,
    }


def startup_figures(data_dir):
    """Start-up to the first batch of a new process: cold (no index) and warm; and the files found."""
    figures = {}
    for state in ("cold", "warm"):
        wall, import_cpu, dataset_cpu = startup_seconds(data_dir, cold=state == "cold")
        figures |= {f"startup_{state}_s": wall, f"startup_{state}_import_cpu_s": import_cpu}
        figures[f"startup_{state}_dataset_cpu_s"] = dataset_cpu
    return figures


def best_rates(stages, rounds=REPEATS):
    """{stage: best samples/s}: `rounds` rounds that each run every stage once, after a warm-up round.

    Each stage is a function returning the samples it produced. Rounds interleave the stages, so a
    burst of load from other users of a shared machine slows one pass of each stage rather than
    every pass of one; the best pass counts, as such load only ever slows a pass down.
    """
    best = dict.fromkeys(stages, 0.0)
    for round_number in range(rounds + 1):
        for name, run in stages.items():
            started = time.perf_counter()
            samples = run()
            if round_number:  # round 0 starts workers, fills caches, selects kernels
                best[name] = max(best[name], samples / (time.perf_counter() - started))
    return best


def bare_loop(paths, stft, read=read_miniseed):
    for path in paths:
        stream = read(path)
        n_samples = min(len(trace) for trace in stream[:3])
        spectrogram(np.stack([trace.data[:n_samples].astype(np.float64) for trace in stream[:3]]), stft)
    return len(paths)


def loader(subset, batch_size, workers, device=torch.device("cpu")):
    """A DataLoader as train.py builds it (device.loader_options)."""
    return DataLoader(subset, **loader_options(batch_size, workers, device))


def passing(batches):
    """A stage that takes one pass over a loader and counts the samples."""
    return lambda: sum(len(batch["meta"]) + len(batch["skipped"]) for batch in batches)


def step_stages(batches, cached_loader, device, amp):
    """Stages on the same data: bare forward/backward/step on ready batches, train.py's train_epoch on
    them, train_epoch fed by a cached DataLoader (the whole pipeline), and embed.py's encode_batch on them."""
    autocast, scaler, _ = mixed_precision(amp, device)
    model = ConvAutoencoder().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters())
    ready = [(model_input(b["spectrogram"], device), b["mask"].to(device)) for b in batches]

    def bare_step():
        for x, mask in ready:
            with autocast():
                reconstruction = model(x)
            loss = masked_mse(reconstruction.float(), x, mask)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        synchronize(device)
        return sum(len(x) for x, _ in ready)

    def own_loop(source):
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
            (_, _, samples), _ = train_epoch(model, source, optimizer, scaler, autocast, device, SkipLog(), 1)
        synchronize(device)
        return samples

    def embed():
        model.eval()
        for x, mask in ready:
            with autocast():
                encode_batch(model, x, mask)  # its results come back to the CPU: no synchronize needed
        model.train()
        return sum(len(x) for x, _ in ready)

    return {
        "embed": embed,
        "bare_step": bare_step,
        "train_loop": lambda: own_loop(batches),
        "pipeline": lambda: own_loop(cached_loader),
    }


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def startup_seconds(data_dir, cold):
    """Launch of a new Python process to its first batch (index and DataLoader as train.py uses them):
    (wall seconds, CPU seconds of the imports, CPU seconds of building the dataset from the index)."""
    seconds, (_, import_cpu, dataset_cpu) = run_probe("first_batch", data_dir, cold)
    return seconds, float(import_cpu), float(dataset_cpu)


def run_probe(name, data_dir, cold):
    """python -m measuring.startup_probe NAME DATA_DIR in a new Python process, after removing the index when `cold`:
    (seconds from the launch to the end the probe reports, the other figures it printed, as text)."""
    index = os.path.join(data_dir, INDEX_NAME)
    if cold and os.path.exists(index):
        os.remove(index)
    launched = time.time()
    result = subprocess.run(
        [sys.executable, "-m", PROBE, name, data_dir],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        check=True,
    )
    done, *figures = result.stdout.split()
    return float(done) - launched, figures


def current_rss_mb():
    """Resident memory of this process now (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except OSError:
        return None


def peak_rss_mb(who):
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


def measure(args):
    device = resolve_device(args.device)
    started = time.perf_counter()
    dataset = SeismicSTFTDataset(args.data_dir)
    index_s = time.perf_counter() - started
    if len(dataset) < 2:
        sys.exit(f"error: {len(dataset)} usable files in {args.data_dir}; bench.py needs at least 2")
    chosen = (
        np.linspace(0, len(dataset) - 1, min(args.num_files or len(dataset), len(dataset))).round().astype(np.int64)
    )
    paths = [os.path.join(args.data_dir, dataset.files[i]) for i in chosen]
    for path in paths:  # warm the page cache so that every stage reads the same way
        with open(path, "rb") as f:
            f.read()
    figures = {
        "num_files": len(paths),
        "machine": machine(device),
        "device": str(device),
        "amp": args.amp,
        "batch_size": args.batch_size,
        "index_s": index_s,
        "usable_files_in_dir": len(dataset),
    }
    cache_dir = tempfile.mkdtemp(prefix="bench_cache_")
    try:
        cached_set = build_cache(args.data_dir, cache_dir, chosen, args.batch_size, figures)
        figures |= throughput(Subset(dataset, chosen), Subset(cached_set, chosen), paths, args.batch_size)
        # The step stages are compute-bound: a fixed number of batches measures them as well as all files would.
        stepped = Subset(cached_set, chosen[: STEP_BATCHES * args.batch_size])
        batches = list(loader(stepped, args.batch_size, 0))
        figures |= best_rates(step_stages(batches, loader(stepped, args.batch_size, 2, device), device, args.amp))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    figures["peak_rss_mb"] = {
        "main": peak_rss_mb(resource.RUSAGE_SELF),
        "largest_worker": peak_rss_mb(resource.RUSAGE_CHILDREN),
    }
    figures |= window_rates(args.batch_size)
    figures |= startup_figures(args.data_dir)
    figures["cores"] = available_cores()
    return figures


def build_cache(data_dir, cache_dir, chosen, batch_size, figures):
    """The cached dataset of data_dir; its build time, size per file and RSS over 3 cached epochs of the
    chosen files into figures."""
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        cached_set = SeismicSTFTDataset(data_dir, cache_dir=cache_dir)
    figures["cache_build_s"] = time.perf_counter() - started
    figures["cache_bytes_per_file"] = cache_bytes(cache_dir) / len(cached_set)
    rss = []
    for _ in range(3):  # epochs from the cache: resident memory must not grow
        passing(loader(Subset(cached_set, chosen), batch_size, 0))()
        rss.append(current_rss_mb())
    figures["cached_rss_mb_per_epoch"] = rss
    return cached_set


def throughput(uncached, cached, paths, batch_size):
    """Samples/s of the bare loop (the limit), of the uncached and of the cached DataLoader, per worker count."""
    stft = STFTConfig()
    stages = {
        "limit": lambda: bare_loop(paths, stft),
        "limit_obspy_read": lambda: bare_loop(paths, stft, partial(obspy.read, format="MSEED")),
    }
    stages |= {f"loader {w}": passing(loader(uncached, batch_size, w)) for w in WORKER_COUNTS}
    stages |= {f"cached {w}": passing(loader(cached, batch_size, w)) for w in WORKER_COUNTS}
    rates = best_rates(stages)
    return {
        "limit": rates["limit"],
        "limit_obspy_read": rates["limit_obspy_read"],
        "loader": {str(w): rates[f"loader {w}"] for w in WORKER_COUNTS},
        "cached_loader": {str(w): rates[f"cached {w}"] for w in WORKER_COUNTS},
        "cached": rates["cached 0"],
    }


def cache_bytes(cache_dir):
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(cache_dir)
        for name in names
        if name.endswith(".f16")
    )


def table_rows(f):
    """(stage, samples/s, ratio) of every throughput stage, in the order the table shows them."""
    limit, whole = f["limit"], f["loader"]["0"]
    rows = [
        ("limit: read + STFT, 1 process", f["limit"], "1.00 x limit"),
        (
            "same with obspy.read (plugin lookup per call)",
            f["limit_obspy_read"],
            f"{f['limit_obspy_read'] / limit:.2f} x limit",
        ),
    ]
    for w, value in f["loader"].items():
        processes = max(1, int(w))
        rows.append((f"DataLoader, {w} workers", value, f"{value / (limit * processes):.2f} x limit x {processes}"))
    for w, value in f["cached_loader"].items():
        rows.append((f"cached DataLoader, {w} workers", value, f"{value / f['loader'][w]:.1f} x uncached"))
    for order in ("in_order", "shuffled"):
        value = f[f"windows_{order}"]
        rows.append(
            (f"90 s windows of SDS day files, {order.replace('_', ' ')}", value, f"{value / whole:.2f} x whole files")
        )
    rows.append(("bare forward/backward/step", f["bare_step"], ""))
    for name, key in (
        ("train.py train_epoch, same batches", "train_loop"),
        ("train_epoch + cached DataLoader, 2 workers", "pipeline"),
        ("embedding (embed.py's encode_batch), same batches", "embed"),
    ):
        rows.append((name, f[key], f"{f[key] / f['bare_step']:.2f} x bare step"))
    return rows


def summary_lines(f):
    """The figures beside the table: cache, start-up, archive, memory; one sentence each."""
    build_rate = f["usable_files_in_dir"] / f["cache_build_s"]
    rss = ", ".join(f"{m:.0f}" for m in f["cached_rss_mb_per_epoch"] if m)
    lines = [
        f"cache build: {build_rate:.0f} files/s = {build_rate / (f['cores'] * f['limit']):.2f} x "
        f"({f['cores']} cores x limit); target 0.7",
        f"cache: built in {f['cache_build_s']:.1f} s, {f['cache_bytes_per_file'] / 1e3:.1f} kB per file; "
        f"RSS after cached epochs 1-3: {rss} MB",
        startup_line(f),
    ]
    if "archive_windows" in f:
        lines.append(
            f"archive: {f['archive_windows']:,} windows of 60 s (stride 30 s) on {f['archive_stations']} stations; "
            f"new process to split windows: {f['archive_startup_cold_s']:.2f} s cold, "
            f"{f['archive_startup_warm_s']:.2f} s warm; peak RSS {f['archive_peak_rss_cold_mb']:.0f} MB cold, "
            f"{f['archive_peak_rss_warm_mb']:.0f} MB warm; CPU s of the dataset {f['archive_dataset_cold_cpu_s']:.2f} "
            f"cold, {f['archive_dataset_warm_cpu_s']:.2f} warm; window arrays {f['archive_window_array_mb']:.0f} MB"
        )
    lines.append(
        f"peak RSS: main process {f['peak_rss_mb']['main']:.0f} MB, "
        f"largest worker {f['peak_rss_mb']['largest_worker']:.0f} MB"
    )
    return lines


def describe_run(f):
    return (
        f"{f['num_files']} files of {f['usable_files_in_dir']} usable; {f['machine']}; device {f['device']}, "
        f"amp {f['amp']}, batch {f['batch_size']}"
    )


def print_table(f):
    print(describe_run(f))
    print(f"{'stage':50s} {'samples/s':>10s}  ratio")
    for name, value, ratio in table_rows(f):
        print(f"{name:50s} {value:10.1f}  {ratio}")
    print("\n".join(summary_lines(f)))


def write_markdown(f, directory, args):
    """The table and the figures beside it as a dated results file (-search.md, -embed.md for those stages alone);
    returns its path."""
    if args.search:
        name, title, body = "search", "bench.py --search: the vector index at N rows", bench_search.markdown(f)
    elif args.embed_windows:
        name, title, body = "embed", "bench.py --embed_windows: embed.py on N archive windows", bench_embed.markdown(f)
    else:
        rows = [(stage, f"{value:.1f}", ratio) for stage, value, ratio in table_rows(f)]
        body = describe_run(f) + "\n\n" + markdown_table(["stage", "samples/s", "ratio"], rows) + "\n"
        body += "".join(f"- {line}\n" for line in summary_lines(f))
        name, title = "bench", "bench.py: pipeline throughput, start-up and memory"
    return write_results(dated_path(directory, name), title, body)


def startup_line(f):
    return (
        f"start-up to first batch: {f['startup_cold_s']:.2f} s cold (no index), {f['startup_warm_s']:.2f} s warm "
        f"({f['startup_warm_s'] / WARM_STARTUP_TARGET_S:.2f} x the {WARM_STARTUP_TARGET_S:g} s target); CPU s of "
        f"the imports {f['startup_warm_import_cpu_s']:.2f}, of the dataset from the index "
        f"{f['startup_warm_dataset_cpu_s']:.2f} warm, {f['startup_cold_dataset_cpu_s']:.2f} cold"
    )


def main(argv=None):
    args = parse_args(argv)
    if args.make_files:
        n_files, args.data_dir = int(args.make_files[0]), args.make_files[1]
        started = time.perf_counter()
        written = make_files(n_files, args.data_dir)
        print(
            f"wrote {written} files to {args.data_dir} in {time.perf_counter() - started:.1f} s "
            f"({n_files - written} already there)"
        )
    if args.link_files:
        n_files, args.data_dir = int(args.link_files[0]), args.link_files[1]
        print(f"made {link_files(n_files, args.data_dir)} hard links in {args.data_dir}")
    if not os.path.isdir(args.data_dir):
        sys.exit(f"error: data directory not found: {args.data_dir}")
    if args.search:
        figures = bench_search.search_stage(
            args.search,
            args.data_dir,
            args.checkpoint,
            args.search_exact_max_rows,
            args.search_queries,
            args.search_codes,
        )
    elif args.embed_windows:
        figures = bench_embed.embed_stage(args.embed_windows, args.checkpoint, args.embed_archive)
    elif args.seisbench:
        figures = seisbench_figures(args)
    elif args.startup_only:
        figures = startup_figures(args.data_dir)
        print(startup_line(figures))
    else:
        figures = measure_all(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    if args.markdown and not (args.startup_only or args.seisbench):
        print(f"wrote {write_markdown(figures, args.markdown, args)}")
    return figures


def seisbench_figures(args):
    """--seisbench N DIR: write the dataset (unless DIR holds one); its start-up in this process (seisbench's
    WaveformDataset alone, then SeismicSTFTDataset: open + index) and in a new one to the first batch; unless
    --startup_only, samples/s through a DataLoader (0 workers) against --data_dir's miniSEED files."""
    n_traces, root = int(args.seisbench[0]), args.seisbench[1]
    figures = {"seisbench_traces_asked": n_traces}
    if not is_seisbench_dataset(root):
        started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # WaveformDataWriter's progress bar
            write_tiled_dataset(root, shipped_sources(), n_traces, args.seisbench_seconds)
        figures["seisbench_write_s"] = time.perf_counter() - started
    figures["seisbench_metadata_mb"] = (
        sum(os.path.getsize(p) for p in glob.glob(os.path.join(root, "metadata*.csv"))) / 1e6
    )
    open_dataset(root)  # imports seisbench (seconds) outside the timing
    started = time.perf_counter()
    open_dataset(root)
    figures["seisbench_waveformdataset_s"] = time.perf_counter() - started
    started = time.perf_counter()
    dataset = SeismicSTFTDataset(root)
    figures["seisbench_dataset_s"] = time.perf_counter() - started
    figures |= {"seisbench_samples": len(dataset), "seisbench_peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF)}
    wall, import_cpu, dataset_cpu = startup_seconds(root, cold=False)
    figures |= {"seisbench_startup_s": wall, "seisbench_startup_import_cpu_s": import_cpu}
    figures["seisbench_startup_dataset_cpu_s"] = dataset_cpu
    if not args.startup_only:
        files = SeismicSTFTDataset(args.data_dir)
        n = min(len(files), len(dataset), args.num_files or len(files))
        traces = Subset(dataset, np.linspace(0, len(dataset) - 1, n).round().astype(np.int64))
        shuffled = DataLoader(traces, args.batch_size, shuffle=True, collate_fn=pad_collate)
        stages = {
            "files": loader(Subset(files, np.arange(n)), args.batch_size, 0),
            "traces": loader(traces, args.batch_size, 0),
        }
        stages = {name: passing(batches) for name, batches in {**stages, "shuffled": shuffled}.items()}
        paths = [os.path.join(args.data_dir, f) for f in files.files[:n]]
        keys = dataset.sample_files(traces.indices)
        batches = [keys[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
        stages["files_read_only"] = lambda: sum(1 for path in paths if read_miniseed(path) is not None)
        stages["traces_read_only"] = lambda: sum(
            dataset.traces.prefetch(b) or len(dataset.traces.waiting) for b in batches
        )
        rates = best_rates(stages)
        figures |= {f"seisbench_{name}_per_s": rate for name, rate in rates.items()} | {"seisbench_read": n}
    print_seisbench(figures)
    return figures


def print_seisbench(f):
    print(
        f"SeisBench dataset: {f['seisbench_samples']} samples, metadata {f['seisbench_metadata_mb']:.1f} MB; "
        f"WaveformDataset {f['seisbench_waveformdataset_s']:.1f} s, SeismicSTFTDataset (open + index) "
        f"{f['seisbench_dataset_s']:.1f} s, peak RSS {f['seisbench_peak_rss_mb']:.0f} MB; new process to first batch "
        f"{f['seisbench_startup_s']:.1f} s (CPU s: imports {f['seisbench_startup_import_cpu_s']:.1f}, dataset "
        f"{f['seisbench_startup_dataset_cpu_s']:.1f})"
    )
    if "seisbench_read" in f:
        print(
            f"samples/s, DataLoader 0 workers, {f['seisbench_read']} samples: miniSEED files "
            f"{f['seisbench_files_per_s']:.1f}, SeisBench traces {f['seisbench_traces_per_s']:.1f} in order, "
            f"{f['seisbench_shuffled_per_s']:.1f} shuffled "
            f"({f['seisbench_traces_per_s'] / f['seisbench_files_per_s']:.2f} x the files); reading alone (no "
            f"spectrogram): files {f['seisbench_files_read_only_per_s']:.0f}, traces "
            f"{f['seisbench_traces_read_only_per_s']:.0f} (get_waveforms in batches, obspy Streams)"
        )


def measure_all(args):
    """Every stage on args.data_dir (and the generated archive of --make_archive); prints the table."""
    archive = {}
    if args.make_archive:
        n_stations, n_days, root = int(args.make_archive[0]), int(args.make_archive[1]), args.make_archive[2]
        started = time.perf_counter()
        written = make_archive(n_stations, n_days, root)
        print(f"wrote {written} day files to {root} in {time.perf_counter() - started:.1f} s")
        archive = archive_figures(root)
    figures = measure(args) | archive
    print_table(figures)
    return figures


if __name__ == "__main__":
    main()
