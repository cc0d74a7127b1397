"""miniSEED files -> normalised STFT spectrograms, shape (component, freq, time).

Data flow: path -> obspy Stream -> 3-component waveform at 100 Hz (E, N, Z) -> log-magnitude
STFT -> per-component min-max to [0, 1]. The transform lives here only; train.py and
inference.py import it. Files that cannot give a clean 3-component waveform are skipped with
a reason (see `UnusableFile`), never fatal.
"""
import json
import logging
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import obspy
import scipy.signal
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

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


def read_stream(path, headonly=False):
    """obspy.read as miniSEED; a read error or a libmseed warning (damaged record) is UnusableFile."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            stream = obspy.read(path, format="MSEED", headonly=headonly)
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


def build_index(data_dir, extensions=MINISEED_EXTENSIONS, index_path=None):
    """{relative path: header record}, reusing the stored index for files whose size and mtime are unchanged.

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
    index, fresh = {}, 0
    for relpath in find_files(data_dir, extensions):
        path = os.path.join(data_dir, relpath)
        stat = os.stat(path)
        old = stored.get(relpath)
        if is_current(old, stat):
            index[relpath] = old
        else:
            index[relpath] = header_record(path)
            fresh += 1
    if fresh or len(index) != len(stored):
        log.info("indexed %d files (%d read anew) -> %s", len(index), fresh, index_path)
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
    """3-component miniSEED event files -> (spectrogram (3, n_freq, n_time) float32, metadata).

    Files are found recursively under `data_dir`; an index of their headers is kept so that a
    restart does not re-read them. Files whose traces hold no requested family are left out
    (counted in `excluded`); files that are unusable by their headers are recorded in `skips`.
    `__getitem__` returns (None, metadata with "skip_reason") for a file that fails on a full
    read (NaN samples, long gaps, ...), which `pad_collate` drops and reports.
    """

    def __init__(self, data_dir, families=DEFAULT_FAMILIES, stft=STFTConfig(), extensions=MINISEED_EXTENSIONS,
                 index_path=None, skips=None):
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data directory not found: {data_dir}")
        self.data_dir, self.families, self.stft = data_dir, tuple(families), stft
        self.skips = skips if skips is not None else SkipLog()
        self.excluded = Counter()  # families found -> files left out by the channel filter
        self.files = []  # relative paths, the dataset's order
        for relpath, record in build_index(data_dir, extensions, index_path).items():
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
            self.files.append(relpath)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = os.path.join(self.data_dir, self.files[i])
        try:
            waveform, meta = read_waveform(path, self.families, self.stft)
        except UnusableFile as err:
            return None, {"path": path, "skip_reason": err.reason, "message": str(err)}
        except Exception as err:  # one odd file among 100k must not end a run; it is reported like the others
            return None, {"path": path, "skip_reason": "unexpected error", "message": f"{type(err).__name__}: {err}"}
        return torch.from_numpy(spectrogram(waveform, self.stft)), {"path": path, **meta}


def pad_collate(samples):
    """List of (spectrogram, meta) -> batch dict.

    spectrogram: (batch, 3, n_freq, max_time) zero-padded on the time axis; mask: (batch,
    max_time) True on valid time bins; meta: list of dicts; skipped: [(path, reason, message)]
    for samples that failed to load. spectrogram is None when every sample failed.
    """
    kept = [(x, meta) for x, meta in samples if x is not None]
    skipped = [(meta["path"], meta["skip_reason"], meta["message"]) for x, meta in samples if x is None]
    if not kept:
        return {"spectrogram": None, "mask": None, "meta": [], "skipped": skipped}
    lengths = torch.tensor([x.shape[-1] for x, _ in kept])
    time_first = pad_sequence([x.permute(2, 0, 1) for x, _ in kept], batch_first=True)  # (B, T, 3, F)
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    return {"spectrogram": time_first.permute(0, 2, 3, 1).contiguous(), "mask": mask,
            "meta": [meta for _, meta in kept], "skipped": skipped}

