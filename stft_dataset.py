"""miniSEED files -> normalised STFT spectrograms, shape (component, freq, time).

Data flow: path -> obspy Stream -> 3-component waveform at 100 Hz (E, N, Z) -> log-magnitude
STFT -> per-component min-max to [0, 1]. The transform lives here only; train.py and
inference.py import it. Files that cannot give a clean 3-component waveform are skipped with
a reason (see `UnusableFile`), never fatal.
"""
import hashlib
import json
import logging
import os
import re
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import entry_points

import numpy as np
import obspy
import scipy.signal
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

log = logging.getLogger("stft_dataset")

COMPONENTS = ("E", "N", "Z")  # channel 0, 1, 2 of every spectrogram
# Unrotated horizontals: 1 is taken as N, 2 as E (the SEED convention for 1/2 orientation codes).
COMPONENT_CODES = {"E": "E", "N": "N", "Z": "Z", "1": "N", "2": "E"}
DEFAULT_FAMILIES = ("HH", "HN", "EH", "BH")
MINISEED_EXTENSIONS = (".mseed", ".miniseed", ".ms", ".msd")
NOT_REQUESTED = "channel family not requested"  # a filter, not a defect: counted apart from skips
MAX_GAP_SECONDS = 1.0  # gaps up to this long inside one component are interpolated over
# Below one count in an int32 full scale (1 / 2**31 > 1e-10), so any real variation of integer data counts as alive.
DEAD_RELATIVE_LEVEL = 1e-10
INDEX_VERSION = 1
CACHE_VERSION = 1  # raise when read_waveform() or spectrogram() change what they return
MANIFEST_FIELDS = {"path": str, "shard": np.int32, "offset": np.int64, "n_time": np.int32, "trace_id": str,
                   "family": str, "starttime": str, "skip_reason": str, "message": str}
PARALLEL_INDEX_MIN_FILES = 200  # fewer new files are read in this process: a pool would cost more than it saves


@dataclass(frozen=True)
class STFTConfig:
    """Settings of the transform; stored in every checkpoint. Same meaning as scipy.signal.stft."""

    sampling_rate: float = 100.0  # Hz; every waveform is resampled to it first
    nperseg: int = 256  # samples per window (2.56 s at 100 Hz)
    noverlap: int = 192  # samples shared by neighbouring windows (hop 64 samples = 0.64 s)
    nfft: int = 256  # FFT length: nfft // 2 + 1 frequency bins, 0 to sampling_rate / 2
    eps: float = 1e-10  # added to |STFT| before log10 so that silent bins stay finite

    def __post_init__(self):
        if not 0 <= self.noverlap < self.nperseg:
            raise ValueError(f"need 0 <= noverlap < nperseg, got noverlap={self.noverlap}, nperseg={self.nperseg}")
        if self.nfft < self.nperseg:
            raise ValueError(f"need nfft >= nperseg, got nfft={self.nfft}, nperseg={self.nperseg}")
        if self.sampling_rate <= 0 or self.eps <= 0:
            raise ValueError("sampling_rate and eps must be positive")

    @property
    def n_freq(self):
        return self.nfft // 2 + 1

    def axes(self, n_time):
        """Frequencies (Hz) and window-centre times (s) of a spectrogram, as scipy.signal.stft gives them."""
        freqs = np.fft.rfftfreq(self.nfft, d=1.0 / self.sampling_rate)
        times = np.arange(n_time) * (self.nperseg - self.noverlap) / self.sampling_rate
        return freqs, times


class UnusableFile(Exception):
    """A file that cannot give a 3-component waveform. `reason` is a short category for counts."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def spectrogram(waveform, stft):
    """(3, n_samples) waveform -> (3, n_freq, n_time) float32 in [0, 1].

    Demean, |scipy.signal.stft|, log10(. + eps), then min-max per component. A constant
    (dead) component, also one constant only up to float rounding, becomes all zeros, never NaN.
    """
    level = np.abs(waveform).max(axis=-1)
    waveform = waveform - waveform.mean(axis=-1, keepdims=True)
    # Dead: constant up to float rounding (e.g. left by FFT resampling), which min-max would blow up to [0, 1].
    dead = np.abs(waveform).max(axis=-1) <= DEAD_RELATIVE_LEVEL * level
    _, _, coefficients = scipy.signal.stft(
        waveform, fs=stft.sampling_rate, nperseg=stft.nperseg, noverlap=stft.noverlap, nfft=stft.nfft, axis=-1
    )
    log_magnitude = np.log10(np.abs(coefficients) + stft.eps)  # (3, freq, time)
    low = log_magnitude.min(axis=(1, 2), keepdims=True)
    span = log_magnitude.max(axis=(1, 2), keepdims=True) - low
    scaled = (log_magnitude - low) / np.where(span > 0, span, 1.0)
    scaled[dead] = 0.0
    return scaled.astype(np.float32)


def miniseed_reader():
    """The reader obspy registers for format "MSEED", looked up once.

    obspy.read(path, format="MSEED") calls this same function but looks the plugin up again on
    every call, which costs more than reading a 3-trace event file (0.8 of 1.1 ms here).
    """
    found = [ep for ep in entry_points(group="obspy.plugin.waveform.MSEED") if ep.name == "readFormat"]
    return found[0].load() if found else partial(obspy.read, format="MSEED")


read_miniseed = miniseed_reader()


def read_stream(path, headonly=False):
    """Read a file as miniSEED; a read error or a libmseed warning (damaged record) is UnusableFile."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            stream = read_miniseed(path, headonly=headonly)
        except Exception as err:  # obspy raises many types for broken input
            reason = "empty file" if os.path.getsize(path) == 0 else "not readable as miniSEED"
            raise UnusableFile(reason, f"{type(err).__name__}: {str(err).splitlines()[0]}") from None
    if caught:
        raise UnusableFile("damaged or truncated miniSEED", str(caught[0].message).splitlines()[0])
    if len(stream) == 0:
        raise UnusableFile("no traces")
    return stream


def choose_components(seed_ids, families):
    """Pick one instrument's E, N, Z traces from a file's trace ids ("NET.STA.LOC.CHA").

    Returns (instrument id "NET.STA.LOC.HH?", family, {component: [trace positions]}).
    Raises UnusableFile when no requested family has all three components, or when the
    choice is ambiguous (two complete instruments, or both E/N and 1/2 for one component).
    """
    instruments = defaultdict(lambda: defaultdict(set))  # (id, family) -> component -> {code}
    positions = defaultdict(list)
    for position, seed_id in enumerate(seed_ids):
        network, station, location, channel = seed_id.split(".")
        family, code = channel[:2], channel[2:]
        key = (f"{network}.{station}.{location}.{family}?", family)
        if code in COMPONENT_CODES:
            instruments[key][COMPONENT_CODES[code]].add(code)
            positions[key, COMPONENT_CODES[code]].append(position)
    wanted = {key: found for key, found in instruments.items() if key[1] in families}
    if not wanted:
        present = sorted({family for _, family in instruments}) or ["none with E/N/Z/1/2 codes"]
        raise UnusableFile(NOT_REQUESTED, ", ".join(present))
    for (instrument, _), found in wanted.items():
        doubled = [component for component, codes in found.items() if len(codes) > 1]
        if doubled:
            raise UnusableFile("unresolvable mixture", f"{instrument}: both {'/'.join(sorted(found[doubled[0]]))} for {doubled[0]}")
    complete = [key for key, found in wanted.items() if len(found) == 3]
    if len(complete) > 1:
        raise UnusableFile("unresolvable mixture", f"several 3-component instruments: {', '.join(k[0] for k in complete)}")
    if not complete:
        instrument, found = max(wanted.items(), key=lambda item: len(item[1]))
        missing = ", ".join(c for c in COMPONENTS if c not in found)
        raise UnusableFile("fewer than 3 components", f"{instrument[0]}: {len(found)} of 3 components (missing {missing})")
    key = complete[0]
    return key[0], key[1], {c: positions[key, c] for c in COMPONENTS}


def merge_component(traces, name, sampling_rate):
    """Traces of one component -> one float64 trace at `sampling_rate`; small gaps interpolated."""
    stream = obspy.Stream(traces)  # traces of a stream read for this call alone: changed in place
    for trace in stream:
        if not np.all(np.isfinite(trace.data)):
            raise UnusableFile("NaN or infinite samples", name)
        if trace.stats.sampling_rate <= 0:
            raise UnusableFile("invalid sampling rate", f"{name}: {trace.stats.sampling_rate} Hz")
        trace.data = trace.data.astype(np.float64)
    if len(stream) > 1:  # the common case, one trace per component, needs no merge
        gaps = [gap[6] for gap in stream.get_gaps()]
        if gaps and max(gaps) > MAX_GAP_SECONDS:
            raise UnusableFile("gap too long", f"{name}: {max(gaps):.2f} s gap (limit {MAX_GAP_SECONDS} s)")
        try:
            stream.merge(method=1, fill_value="interpolate")
        except Exception as err:  # e.g. differing sampling rates within one channel
            raise UnusableFile("unmergeable traces", f"{name}: {err}") from None
    trace = stream[0]
    if not np.isclose(trace.stats.sampling_rate, sampling_rate):
        trace.resample(sampling_rate)  # FFT-based; 40 Hz BH and 200 Hz HH become 100 Hz
    return trace


def read_waveform(path, families, stft):
    """File -> ((3, n_samples) float64 waveform in E, N, Z order, metadata dict)."""
    stream = read_stream(path)
    instrument, family, picks = choose_components([trace.id for trace in stream], families)
    traces = [merge_component([stream[i] for i in picks[c]], instrument[:-1] + c, stft.sampling_rate) for c in COMPONENTS]
    start = max(trace.stats.starttime for trace in traces)
    end = min(trace.stats.endtime for trace in traces)
    if end <= start:
        raise UnusableFile("components do not overlap", instrument)
    for trace in traces:
        if trace.stats.starttime != start or trace.stats.endtime != end:  # trim is slow even when it cuts nothing
            trace.trim(start, end)
    n_samples = min(trace.stats.npts for trace in traces)
    if n_samples < stft.nperseg:
        raise UnusableFile("too short for one STFT window", f"{n_samples} common samples < nperseg={stft.nperseg}")
    waveform = np.stack([trace.data[:n_samples] for trace in traces])
    return waveform, {"trace_id": instrument, "family": family, "starttime": str(start)}


def find_files(data_dir, extensions=MINISEED_EXTENSIONS):
    """Relative paths of files under data_dir (recursive) whose extension is listed, sorted."""
    extensions = tuple(e.lower() for e in extensions)
    found = []
    for root, dirs, files in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(root, f), data_dir) for f in files if f.lower().endswith(extensions)]
    return sorted(found)


def header_record(path):
    """What a header-only read tells about one file: its traces or why it is unusable."""
    stat = os.stat(path)
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        record["seed_ids"] = [trace.id for trace in read_stream(path, headonly=True)]
    except UnusableFile as err:
        record["error"] = [err.reason, str(err)]
    return record


def is_current(record, stat):
    """A stored header record still describes the file: same size and mtime, well formed."""
    return (isinstance(record, dict) and record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns
            and (isinstance(record.get("seed_ids"), list) or isinstance(record.get("error"), list)))


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def read_headers(paths, processes):
    """header_record of each path, in order; spread over `processes` worker processes when there are many."""
    if processes <= 1 or len(paths) < PARALLEL_INDEX_MIN_FILES:
        return [header_record(path) for path in paths]
    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(header_record, paths, chunksize=max(1, min(256, len(paths) // (8 * processes)))))


def build_index(data_dir, extensions=MINISEED_EXTENSIONS, index_path=None, processes=None):
    """{relative path: header record}, reusing the stored index for files whose size and mtime are unchanged.

    New or changed files are read with `processes` worker processes (default: all cores).
    The index is a JSON file (default `<data_dir>/.stft_index.json`); a read-only data_dir
    only costs re-reading headers at the next start.
    """
    index_path = index_path or os.path.join(data_dir, ".stft_index.json")
    stored = {}
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                content = json.load(f)
            if isinstance(content, dict) and content.get("version") == INDEX_VERSION and isinstance(content.get("files"), dict):
                stored = content["files"]
        except (OSError, ValueError):
            log.warning("ignoring unreadable index %s", index_path)
    index, fresh = {}, []
    for relpath in find_files(data_dir, extensions):
        old = stored.get(relpath)
        if is_current(old, os.stat(os.path.join(data_dir, relpath))):
            index[relpath] = old
        else:
            index[relpath] = None  # keeps the sorted order; filled below
            fresh.append(relpath)
    records = read_headers([os.path.join(data_dir, relpath) for relpath in fresh], processes or available_cores())
    index.update(zip(fresh, records))
    if fresh or len(index) != len(stored):
        log.info("indexed %d files (%d read anew) -> %s", len(index), len(fresh), index_path)
        try:
            write_json_atomic(index_path, {"version": INDEX_VERSION, "files": index})
        except OSError as err:
            log.warning("could not store the index (%s); headers will be read again next time", err)
    return index


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


class SkipLog:
    """Unusable files: each logged once with its reason, counted by reason."""

    def __init__(self):
        self.files = {}  # path -> full message

    def add(self, path, reason, message):
        if path not in self.files:
            self.files[path] = (reason, message)
            log.warning("skipping %s: %s", path, message)

    def add_batch(self, skipped):
        """The (path, reason, message) list that pad_collate returns with each batch."""
        for path, reason, message in skipped:
            self.add(path, reason, message)

    def counts(self):
        return dict(Counter(reason for reason, _ in self.files.values()).most_common())

    def describe(self):
        """One line for the end of a run: "2 fewer than 3 components, 1 empty file" or "none"."""
        return ", ".join(f"{n} {reason}" for reason, n in self.counts().items()) or "none"

    def summary(self):
        return {"counts": self.counts(), "files": {p: m for p, (_, m) in sorted(self.files.items())}}


class SeismicSTFTDataset(Dataset):
    """3-component miniSEED event files -> (spectrogram (3, n_freq, n_time), metadata).

    The spectrogram is float32, or float16 when read from the cache (train.py converts on the device).

    Files are found recursively under `data_dir`; an index of their headers is kept so that a
    restart does not re-read them. Files whose traces hold no requested family are left out
    (counted in `excluded`); files that are unusable by their headers are recorded in `skips`.
    `__getitem__` returns (None, metadata with "skip_reason") for a file that fails on a full
    read (NaN samples, long gaps, ...), which `pad_collate` drops and reports.
    With `cache_dir`, spectrograms are computed once with `processes` workers (default: all
    cores) and then read from a `SpectrogramCache`.
    """

    def __init__(self, data_dir, families=DEFAULT_FAMILIES, stft=STFTConfig(), extensions=MINISEED_EXTENSIONS,
                 index_path=None, skips=None, cache_dir=None, processes=None):
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data directory not found: {data_dir}")
        self.data_dir, self.families, self.stft = data_dir, tuple(families), stft
        self.skips = skips if skips is not None else SkipLog()
        self.excluded = Counter()  # families found -> files left out by the channel filter
        usable = []
        for relpath, record in build_index(data_dir, extensions, index_path, processes).items():
            path = os.path.join(data_dir, relpath)
            if "error" in record:
                self.skips.add(path, *record["error"])
                continue
            try:
                choose_components(record["seed_ids"], self.families)
            except UnusableFile as err:
                if err.reason == NOT_REQUESTED:
                    self.excluded[err.detail] += 1
                else:
                    self.skips.add(path, err.reason, str(err))
                continue
            usable.append((relpath, record["size"], record["mtime_ns"]))
        # One numpy array, not a list of str: DataLoader workers would copy every object they touch.
        self.files = np.array([relpath for relpath, _, _ in usable], dtype=str)
        self.cache = None
        if cache_dir is not None:
            versions = np.array([(size, mtime) for _, size, mtime in usable], dtype=np.int64).reshape(-1, 2)
            self.cache = SpectrogramCache(cache_dir, self, versions, processes or available_cores())

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        if self.cache is not None:
            return self.cache.item(i)
        path = os.path.join(self.data_dir, self.files[i])
        try:
            waveform, meta = read_waveform(path, self.families, self.stft)
        except UnusableFile as err:
            return None, {"path": path, "skip_reason": err.reason, "message": str(err)}
        except Exception as err:  # one odd file among 100k must not end a run; it is reported like the others
            return None, {"path": path, "skip_reason": "unexpected error", "message": f"{type(err).__name__}: {err}"}
        return torch.from_numpy(spectrogram(waveform, self.stft)), {"path": path, **meta}


class SpectrogramCache:
    """A dataset's spectrograms, computed once and then read through numpy memmaps.

    Folder `<cache_dir>/<key>/`, the key hashing every setting that changes a spectrogram (STFT,
    normalisation, families, data directory), so a new --nfft never reads stale data:
      shard_N.f16   float16 spectrograms (3, n_freq, n_time) back to back; written once, never changed
                    or removed (the space of files changed since stays used: delete the folder to reclaim it)
      manifest.npz  one row per file: size and mtime it was computed from, shard, offset, n_time,
                    metadata, or why the file is unusable (those are not retried until they change)
    Files that are new or changed since the manifest go into a new shard. Writers hold a file
    lock; DataLoader workers only read, each mapping the shards itself.
    """

    def __init__(self, cache_dir, dataset, versions, processes):
        key, settings = cache_key(dataset)
        self.folder = os.path.join(cache_dir, key)
        self.data_dir, self.n_freq = dataset.data_dir, dataset.stft.n_freq
        os.makedirs(self.folder, exist_ok=True)
        with FileLock(os.path.join(self.folder, "lock")):
            if not os.path.exists(os.path.join(self.folder, "settings.json")):  # for people: what the key stands for
                write_json_atomic(os.path.join(self.folder, "settings.json"), settings)
            manifest = self.load_manifest()
            row_of = {path: row for row, path in enumerate(manifest["path"])}
            stale = [i for i, (path, version) in enumerate(zip(dataset.files, versions))
                     if path not in row_of or tuple(manifest["version"][row_of[path]]) != tuple(version)]
            if stale:
                manifest = self.extend(manifest, dataset, stale, versions, processes)
                row_of = {path: row for row, path in enumerate(manifest["path"])}
        self.manifest = manifest
        self.rows = np.array([row_of[path] for path in dataset.files], dtype=np.int64)  # dataset index -> row
        self.shards = {}  # shard number -> memmap, opened lazily in each process

    def load_manifest(self):
        """The stored manifest, or an empty one (no cache yet, or one that cannot be read: rebuilt)."""
        path = os.path.join(self.folder, "manifest.npz")
        if os.path.exists(path):
            try:
                with np.load(path) as stored:
                    return {field: stored[field] for field in (*MANIFEST_FIELDS, "version")}
            except Exception as err:  # truncated or foreign file: zipfile, OSError, KeyError, ...
                log.warning("rebuilding the cache in %s: manifest unreadable (%s: %s)", self.folder, type(err).__name__, err)
        empty = {field: np.empty(0, dtype) for field, dtype in MANIFEST_FIELDS.items()}
        return empty | {"version": np.empty((0, 2), np.int64)}

    def extend(self, manifest, dataset, stale, versions, processes):
        """Compute the stale files' spectrograms into a new shard; returns the new manifest."""
        # A new number every time: a running process may still read older shards through its own manifest.
        numbers = [int(name[6:-4]) for name in os.listdir(self.folder) if re.fullmatch(r"shard_\d+\.f16", name)]
        shard = max(numbers, default=-1) + 1
        rows = {field: [] for field in MANIFEST_FIELDS}
        workers = min(processes, len(stale)) if processes > 1 else 0
        loader = DataLoader(Subset(dataset, stale), batch_size=None, num_workers=workers)

        def write(f):
            offset = 0
            progress = tqdm(loader, desc=f"caching {len(stale)} spectrograms", unit="file", dynamic_ncols=True)
            for relpath, (x, meta) in zip(dataset.files[stale], progress):  # the loader keeps the order
                row = {"path": relpath, "shard": -1, "offset": 0, "n_time": 0,
                       "trace_id": meta.get("trace_id", ""), "family": meta.get("family", ""),
                       "starttime": meta.get("starttime", ""), "skip_reason": meta.get("skip_reason", ""),
                       "message": meta.get("message", "")}
                if x is not None:
                    f.write(x.numpy().astype(np.float16).tobytes())
                    row.update(shard=shard, offset=offset, n_time=x.shape[-1])
                    offset += x.numel()
                for field, value in row.items():
                    rows[field].append(value)

        atomic_write(os.path.join(self.folder, f"shard_{shard}.f16"), write)
        fresh = set(dataset.files[stale])
        keep = np.array([path not in fresh for path in manifest["path"]], dtype=bool)
        merged = {field: np.concatenate([manifest[field][keep], np.array(rows[field], dtype=dtype)])
                  for field, dtype in MANIFEST_FIELDS.items()}
        merged["version"] = np.concatenate([manifest["version"][keep], versions[stale]])
        atomic_write(os.path.join(self.folder, "manifest.npz"), lambda f: np.savez(f, **merged))
        if shard not in rows["shard"]:  # every new file was unusable
            os.remove(os.path.join(self.folder, f"shard_{shard}.f16"))
        return merged

    def __getstate__(self):
        return {**self.__dict__, "shards": {}}  # a worker maps the shards itself; never pickle mapped data

    def item(self, i):
        """Dataset item i: (spectrogram (3, n_freq, n_time) float16, metadata), as SeismicSTFTDataset gives it."""
        row = self.rows[i]
        m = self.manifest
        path = os.path.join(self.data_dir, str(m["path"][row]))
        if m["skip_reason"][row]:
            return None, {"path": path, "skip_reason": str(m["skip_reason"][row]), "message": str(m["message"][row])}
        shard, offset, n_time = int(m["shard"][row]), int(m["offset"][row]), int(m["n_time"][row])
        if shard not in self.shards:
            self.shards[shard] = np.memmap(os.path.join(self.folder, f"shard_{shard}.f16"), dtype=np.float16, mode="r")
        values = self.shards[shard][offset:offset + 3 * self.n_freq * n_time].reshape(3, self.n_freq, n_time)
        meta = {"path": path, "trace_id": str(m["trace_id"][row]), "family": str(m["family"][row]),
                "starttime": str(m["starttime"][row])}
        return torch.from_numpy(np.array(values)), meta


def cache_key(dataset):
    """(folder name, settings): everything that changes what a cached spectrogram holds."""
    settings = {"cache_version": CACHE_VERSION, "data_dir": os.path.abspath(dataset.data_dir),
                "families": sorted(dataset.families), "stft": asdict(dataset.stft), "max_gap_seconds": MAX_GAP_SECONDS,
                "dead_relative_level": DEAD_RELATIVE_LEVEL, "normalisation": "log10 |STFT|, min-max per component"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16], settings


def pad_collate(samples):
    """List of (spectrogram, meta) -> batch dict.

    spectrogram: (batch, 3, n_freq, max_time), zero-padded on the time axis, in the samples' dtype
    (float16 from the cache: half the bytes to move to workers and the GPU, where it is converted); mask: (batch,
    max_time) True on valid time bins; meta: list of dicts; skipped: [(path, reason, message)]
    for samples that failed to load. spectrogram is None when every sample failed.
    """
    kept = [(x, meta) for x, meta in samples if x is not None]
    skipped = [(meta["path"], meta["skip_reason"], meta["message"]) for x, meta in samples if x is None]
    if not kept:
        return {"spectrogram": None, "mask": None, "meta": [], "skipped": skipped}
    lengths = torch.tensor([x.shape[-1] for x, _ in kept])
    batch = torch.zeros(len(kept), *kept[0][0].shape[:-1], int(lengths.max()), dtype=kept[0][0].dtype)
    for k, (x, _) in enumerate(kept):
        batch[k, ..., :x.shape[-1]] = x
    mask = torch.arange(batch.shape[-1])[None, :] < lengths[:, None]
    return {"spectrogram": batch, "mask": mask, "meta": [meta for _, meta in kept], "skipped": skipped}
