"""Measure the pipeline on this machine: samples/s at each stage, start-up time and peak memory.

    python bench.py                                            # shipped data, 30 s on 2 cores
    python bench.py --make_files 20000 /tmp/bench20k --num_files 2000 --json bench20k.json
                    # first writes 20,000 files cut from the shipped data (those already there are kept)
    python bench.py --link_files 132169 /tmp/links132k --startup_only    # start-up on 132k files
    python bench.py --make_archive 10 365 /tmp/archive                   # also 10.5 million windows
    python bench.py --search 100000 1000000 --json search.json          # only vector search (docs/search.md)

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
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import numpy as np
import obspy
import torch
from torch.utils.data import DataLoader, Subset

import bench_search
from embedding import encode_batch
from file_index import DEFAULT_DATA_DIR, INDEX_NAME, available_cores
from model import ConvAutoencoder, masked_mse
from runtime import loader_options, mixed_precision, model_input, resolve_device, script_parser
from stft_dataset import SeismicSTFTDataset, SkipLog, pad_collate
from training import train_epoch
from transform import STFTConfig, spectrogram
from waveforms import DEFAULT_FAMILIES, read_miniseed

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), DEFAULT_DATA_DIR)
WINDOW_SECONDS = 70.0  # length of the files --make_files writes, as in the archive this tool is built for
FILES_PER_FOLDER = 1000
WORKER_COUNTS = (0, 1, 2)
REPEATS = 3  # measured passes per stage; the best one is reported
STEP_BATCHES = 10  # batches in the training-step stages
WARM_STARTUP_TARGET_S = 2.0  # a warm start of a 132k-file archive, launch to first batch
FIRST_BATCH = """
import sys, time
from torch.utils.data import DataLoader
from stft_dataset import SeismicSTFTDataset, pad_collate
imported = time.process_time()
dataset = SeismicSTFTDataset(sys.argv[1])
indexed = time.process_time()
next(iter(DataLoader(dataset, batch_size=32, shuffle=True, num_workers=2, collate_fn=pad_collate)))
print(time.time(), len(dataset), imported, indexed - imported)
"""


FIRST_WINDOWS = """
import resource, sys, time
from stft_dataset import SeismicSTFTDataset
imported = time.process_time()
dataset = SeismicSTFTDataset(sys.argv[1], families=("LH",), window_seconds=60, window_stride=30)
keys, codes = dataset.groups("station")
cpu = time.process_time() - imported
arrays = dataset.sample_recording.nbytes + dataset.sample_start.nbytes + codes.nbytes
print(time.time(), len(dataset), len(keys), arrays, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, cpu)
"""
ARCHIVE_START = obspy.UTCDateTime("2020-01-01")
SDS_DAY = 86400


def parse_args(argv=None):
    parser = script_parser(__doc__)
    add = parser.add_argument
    add("--data_dir", default=DEFAULT_DATA_DIR, help="directory of miniSEED files to measure on")
    add("--num_files", type=int, default=0, help="files for the throughput stages, spread over the folder (0 = all)")
    add("--batch_size", type=int, default=32, help="spectrograms per batch")
    add("--device", default="auto", help="device of the training-step stages ('auto', 'cpu', 'cuda')")
    add("--amp", choices=("off", "auto", "bf16", "fp16"), default="off", help="mixed precision of the step stages")
    add("--json", metavar="PATH", help="also write the figures to this JSON file")
    add(
        "--make_files",
        nargs=2,
        metavar=("N", "DIR"),
        help=f"first write N files of {WINDOW_SECONDS:.0f} s cut "
        "from the shipped recordings into DIR (files already "
        "there are kept), then measure on DIR",
    )
    add(
        "--make_archive",
        nargs=3,
        metavar=("STATIONS", "DAYS", "DIR"),
        help="also write an SDS archive of STATIONS stations x DAYS days of 1 Hz day files into DIR (those already "
        "there are kept) and measure windows of it (10 365 DIR: 10.5 million windows; default: off)",
    )
    add(
        "--link_files",
        nargs=2,
        metavar=("N", "DIR"),
        help="first make N hard links to the shipped files in DIR (1,000 per folder; seconds, not minutes, for "
        "132k files), then measure on DIR; default: off",
    )
    add(
        "--startup_only",
        action="store_true",
        help="measure only the start-up to the first batch, cold and warm (default: every stage)",
    )
    add(
        "--search",
        nargs="+",
        type=int,
        metavar="N",
        help="measure only vector search (bench_search.py): the index of real embeddings tiled to each N; default: off",
    )
    add("--checkpoint", help="model whose embeddings --search tiles; None: random weights (seed 0)")
    add(
        "--search_queries",
        type=int,
        default=bench_search.QUERIES,
        help="--search: queries timed and scored (%(default)s)",
    )
    add(
        "--search_exact_max_rows",
        type=int,
        default=bench_search.vector_index.EXACT_MAX_ROWS,
        help="--search: flat (exact) index up to this many rows, IVF-PQ beyond (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.search and (min(args.search) < 1 or args.search_queries < 1):
        parser.error("--search N: every N must be >= 1, and --search_queries too")
    if args.link_files and not args.link_files[0].isdigit():
        parser.error("--link_files N DIR: N must be a whole number")
    if args.make_archive and not all(n.isdigit() for n in args.make_archive[:2]):
        parser.error("--make_archive STATIONS DAYS DIR: STATIONS and DAYS must be whole numbers")
    if args.num_files < 0 or args.batch_size < 1:
        parser.error("--num_files must be >= 0 and --batch_size >= 1")
    if args.make_files and not args.make_files[0].isdigit():
        parser.error("--make_files N DIR: N must be a whole number")
    return args


def make_files(n_files, out_dir, processes=None):
    """Write n_files real 3-component windows: shipped recordings cut at random offsets, rewritten as miniSEED."""
    sources = [
        os.path.join(SHIPPED, name) for name in sorted(os.listdir(SHIPPED)) if name.split(".")[2] in DEFAULT_FAMILIES
    ]
    chunks = [
        (sources, out_dir, start, min(start + FILES_PER_FOLDER, n_files))
        for start in range(0, n_files, FILES_PER_FOLDER)
    ]
    with ProcessPoolExecutor(processes or available_cores()) as pool:
        return sum(pool.map(write_folder, chunks))


def write_folder(chunk):
    """Files start..stop-1 into out_dir/<start // FILES_PER_FOLDER>/ (NET.STA.<k>.mseed, k the file number);
    files already there are kept. Returns how many were written."""
    sources, out_dir, start, stop = chunk
    folder = os.path.join(out_dir, f"{start // FILES_PER_FOLDER:03d}")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(start)
    written = 0
    for k in range(start, stop):
        source = sources[k % len(sources)]
        offset = rng.uniform(0, 1)  # drawn for every k: the files do not depend on which ones exist
        path = os.path.join(folder, ".".join(os.path.basename(source).split(".")[:2] + [f"{k:06d}", "mseed"]))
        if os.path.exists(path):
            continue
        stream = obspy.read(source, format="MSEED")
        first = max(trace.stats.starttime for trace in stream)
        room = min(trace.stats.endtime for trace in stream) - first - WINDOW_SECONDS
        begin = first + offset * max(room, 0.0)
        stream.slice(begin, begin + WINDOW_SECONDS).write(path, format="MSEED")
        written += 1
    return written


def make_archive(n_stations, n_days, out_dir, processes=None):
    """SDS archive of n_stations x n_days x 3 day files at 1 Hz (XX.S000..LHZ.D.2020.001, ...); returns files
    written."""
    tasks = [(out_dir, station, day) for station in range(n_stations) for day in range(n_days)]
    with ProcessPoolExecutor(processes or available_cores()) as pool:
        return sum(pool.map(write_archive_day, tasks, chunksize=64))


def write_archive_day(task):
    out_dir, station, day = task
    header = {"network": "XX", "station": f"S{station:03d}", "sampling_rate": 1.0}
    trace = obspy.Trace(np.zeros(SDS_DAY, dtype=np.int32), header=header | {"starttime": ARCHIVE_START + SDS_DAY * day})
    written = 0
    for component in "ENZ":
        trace.stats.channel = f"LH{component}"
        written += write_sds(obspy.Stream([trace]), out_dir, keep=True)
    return written


def joined_recording(paths, seconds_each=90):
    """One 3-component stream (E, N, Z) of the files `paths` of one instrument at 100 Hz, back to back from the
    first file's start: a continuous recording of real samples."""
    streams = [obspy.read(path, format="MSEED") for path in paths]
    n_samples = int(seconds_each * 100)
    joined = obspy.Stream()
    for component in "ENZ":
        traces = [stream.select(component=component)[0] for stream in streams]
        header = traces[0].stats.copy()
        header.npts = len(traces) * n_samples
        joined.append(obspy.Trace(np.concatenate([t.data[:n_samples] for t in traces]).astype(np.int32), header))
    return joined


def write_sds(stream, root, keep=False):
    """Each trace as day files in SDS layout (YEAR/NET/STA/CHAN.D/NET.STA.LOC.CHAN.D.YEAR.DAY), cut at midnight.
    Returns the number of files written (keep: files already there are kept)."""
    written = 0
    for trace in stream:
        day = obspy.UTCDateTime(trace.stats.starttime.date)
        while day < trace.stats.endtime:
            part = trace.slice(day, day + SDS_DAY - trace.stats.delta)
            s = part.stats
            folder = os.path.join(root, str(day.year), s.network, s.station, f"{s.channel}.D")
            path = os.path.join(
                folder, f"{s.network}.{s.station}.{s.location}.{s.channel}.D.{day.year}.{day.julday:03d}"
            )
            if not (keep and os.path.exists(path)):
                os.makedirs(folder, exist_ok=True)
                part.write(path, format="MSEED", reclen=512)
                written += 1
            day += SDS_DAY
    return written


def shipped_as_sds(root):
    """The shipped files of the default families joined back to back per instrument, as an SDS archive in root."""
    by_instrument = {}
    for name in sorted(os.listdir(SHIPPED)):
        network, station, family = name.split(".")[:3]
        if family in DEFAULT_FAMILIES:
            by_instrument.setdefault((network, station, family), []).append(os.path.join(SHIPPED, name))
    for paths in by_instrument.values():
        write_sds(joined_recording(paths), root)


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
        index = os.path.join(root, INDEX_NAME)
        if state == "cold" and os.path.exists(index):
            os.remove(index)
        launched = time.time()
        result = subprocess.run(
            [sys.executable, "-c", FIRST_WINDOWS, root],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            check=True,
        )
        done, n_windows, n_stations, array_bytes, peak_kb, cpu = result.stdout.split()
        figures |= {
            f"archive_startup_{state}_s": float(done) - launched,
            f"archive_peak_rss_{state}_mb": int(peak_kb) / 1024,
            f"archive_dataset_{state}_cpu_s": float(cpu),
        }
    return figures | {
        "archive_windows": int(n_windows),
        "archive_stations": int(n_stations),
        "archive_window_array_mb": int(array_bytes) / 2**20,
    }


def link_files(n_files, out_dir):
    """n_files hard links to the shipped files of the default families (folder k // 1000, file NET.STA.<k>.mseed);
    links already there are kept. Returns how many were made."""
    sources = [
        os.path.join(SHIPPED, name) for name in sorted(os.listdir(SHIPPED)) if name.split(".")[2] in DEFAULT_FAMILIES
    ]
    made = 0
    for k in range(n_files):
        source = sources[k % len(sources)]
        folder = os.path.join(out_dir, f"{k // FILES_PER_FOLDER:03d}")
        path = os.path.join(folder, ".".join(os.path.basename(source).split(".")[:2] + [f"{k:06d}", "mseed"]))
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            os.link(source, path)
            made += 1
    return made


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
    """A DataLoader as train.py builds it (runtime.loader_options)."""
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
    if cold:
        with_index = os.path.join(data_dir, INDEX_NAME)
        if os.path.exists(with_index):
            os.remove(with_index)
    launched = time.time()
    result = subprocess.run(
        [sys.executable, "-c", FIRST_BATCH, data_dir],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        check=True,
    )
    done, _, import_cpu, dataset_cpu = result.stdout.split()
    return float(done) - launched, float(import_cpu), float(dataset_cpu)


def current_rss_mb():
    """Resident memory of this process now (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except OSError:
        return None


def peak_rss_mb(who):
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


def machine(device):
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    described = (
        f"{cpu}, {available_cores()} cores usable, Python {platform.python_version()}, torch {torch.__version__}"
    )
    if device.type == "cuda":
        described += f", GPU {torch.cuda.get_device_name(device)}"
    return described


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


def print_table(f):
    limit = f["limit"]
    rows = [
        ("limit: read + STFT, 1 process", f["limit"], "1.00 x limit"),
        (
            "same with obspy.read (plugin lookup per call)",
            f["limit_obspy_read"],
            f"{f['limit_obspy_read'] / limit:.2f} x limit",
        ),
    ]
    for w, value in f["loader"].items():
        rows.append(
            (f"DataLoader, {w} workers", value, f"{value / (limit * max(1, int(w))):.2f} x limit x {max(1, int(w))}")
        )
    for w, value in f["cached_loader"].items():
        rows.append((f"cached DataLoader, {w} workers", value, f"{value / f['loader'][w]:.1f} x uncached"))
    rows += [
        ("bare forward/backward/step", f["bare_step"], ""),
        ("train.py train_epoch, same batches", f["train_loop"], f"{f['train_loop'] / f['bare_step']:.2f} x bare step"),
        (
            "train_epoch + cached DataLoader, 2 workers",
            f["pipeline"],
            f"{f['pipeline'] / f['bare_step']:.2f} x bare step",
        ),
        (
            "embedding (embed.py's encode_batch), same batches",
            f["embed"],
            f"{f['embed'] / f['bare_step']:.2f} x bare step",
        ),
    ]
    rows.insert(
        len(rows) - 3,
        (
            "90 s windows of SDS day files, in order",
            f["windows_in_order"],
            f"{f['windows_in_order'] / f['loader']['0']:.2f} x whole files",
        ),
    )
    rows.insert(
        len(rows) - 3,
        (
            "90 s windows of SDS day files, shuffled",
            f["windows_shuffled"],
            f"{f['windows_shuffled'] / f['loader']['0']:.2f} x whole files",
        ),
    )
    print(
        f"{f['num_files']} files of {f['usable_files_in_dir']} usable; {f['machine']}; device {f['device']}, "
        f"amp {f['amp']}, batch {f['batch_size']}"
    )
    print(f"{'stage':50s} {'samples/s':>10s}  ratio")
    for name, value, ratio in rows:
        print(f"{name:50s} {value:10.1f}  {ratio}")
    build_rate = f["usable_files_in_dir"] / f["cache_build_s"]
    print(
        f"cache build: {build_rate:.0f} files/s = {build_rate / (f['cores'] * limit):.2f} x "
        f"({f['cores']} cores x limit); target 0.7"
    )
    print(
        f"cache: built in {f['cache_build_s']:.1f} s, {f['cache_bytes_per_file'] / 1e3:.1f} kB per file; "
        f"RSS after cached epochs 1-3: {', '.join(f'{m:.0f}' for m in f['cached_rss_mb_per_epoch'] if m)} MB"
    )
    print_startup(f)
    if "archive_windows" in f:
        print(
            f"archive: {f['archive_windows']:,} windows of 60 s (stride 30 s) on {f['archive_stations']} stations; "
            f"new process to split windows: {f['archive_startup_cold_s']:.2f} s cold, "
            f"{f['archive_startup_warm_s']:.2f} s warm; peak RSS {f['archive_peak_rss_cold_mb']:.0f} MB cold, "
            f"{f['archive_peak_rss_warm_mb']:.0f} MB warm; CPU s of the dataset {f['archive_dataset_cold_cpu_s']:.2f} "
            f"cold, {f['archive_dataset_warm_cpu_s']:.2f} warm; "
            f"window arrays {f['archive_window_array_mb']:.0f} MB"
        )
    print(
        f"peak RSS: main process {f['peak_rss_mb']['main']:.0f} MB, "
        f"largest worker {f['peak_rss_mb']['largest_worker']:.0f} MB"
    )


def print_startup(f):
    print(
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
            args.search, args.data_dir, args.checkpoint, args.search_exact_max_rows, args.search_queries
        )
    elif args.startup_only:
        figures = startup_figures(args.data_dir)
        print_startup(figures)
    else:
        figures = measure_all(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


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
