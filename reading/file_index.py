"""The index of a data directory: which files there are and what their headers say.

`build_index` finds miniSEED files recursively (SDS day files, which have no extension, too) and
reads each one's traces with a header-only read (spread over all cores): trace id, start, end and
sampling rate, so that windows can be counted without reading samples. The index is columnar, numpy
arrays in `<data_dir>/.stft_index.npz` (one row per file, one row per trace), so a start on 132k files
loads it in one call instead of parsing 132k JSON records; a restart re-reads only files whose size
or mtime changed. Choosing which files are usable is the dataset's job (recordings.py).
"""

import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields

import numpy as np

from reading.waveforms import MINISEED_EXTENSIONS, UnusableFile, read_stream
from running.storage import atomic_write

log = logging.getLogger("file_index")

DEFAULT_DATA_DIR = "data/filtered_waveforms"  # the shipped recordings, relative to the repository root
INDEX_NAME = ".stft_index.npz"
INDEX_VERSION = 2  # 2: columnar, with trace start, end and sampling rate
PARALLEL_INDEX_MIN_FILES = 200  # fewer new files are read in this process: a pool would cost more than it saves
# SDS day files (NET.STA.LOC.CHAN.TYPE.YEAR.DAY, SeisComP's layout, as obspy's SDS client names them) have no extension.
SDS_FILE_NAME = re.compile(r"[^.]*\.[^.]*\.[^.]*\.[^.]+\.[A-Z]\.\d{4}\.\d{3}", re.IGNORECASE)


@dataclass
class FileIndex:
    """Columns of a directory's index: one row per file (path ... n_traces), one per trace (trace_code ... trace_rate).

    The traces of file k are rows first_trace[k] to first_trace[k] + n_traces[k] - 1.

    Times are POSIX seconds (float64, UTC); end is the time of the last sample.
    """

    path: np.ndarray  # str, relative to data_dir, sorted
    size: np.ndarray  # int64 bytes
    mtime_ns: np.ndarray  # int64
    error_reason: np.ndarray  # str, "" when the headers read cleanly
    error_message: np.ndarray  # str
    first_trace: np.ndarray  # int64
    n_traces: np.ndarray  # int64
    trace_names: np.ndarray  # str "NET.STA.LOC.CHA", sorted and unique: trace ids are stored as codes into it
    trace_code: np.ndarray  # int32 per trace
    trace_start: np.ndarray  # float64 s
    trace_end: np.ndarray  # float64 s
    trace_rate: np.ndarray  # float64 Hz

    def __len__(self):
        return len(self.path)

    @property
    def trace_id(self):
        return self.trace_names[self.trace_code]

    def traces(self, k):
        """Row range of file k's traces."""
        return range(int(self.first_trace[k]), int(self.first_trace[k] + self.n_traces[k]))

    def seed_ids(self, k):
        return tuple(self.trace_names[self.trace_code[self.traces(k)]].tolist())


FILE_COLUMNS = ("path", "size", "mtime_ns", "error_reason", "error_message", "first_trace", "n_traces")


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_waveform_file(name, extensions):
    return name.lower().endswith(extensions) or SDS_FILE_NAME.fullmatch(name) is not None


def find_files(data_dir, extensions=MINISEED_EXTENSIONS):
    """Relative paths (sorted) of files under data_dir (recursive) with a listed extension, or SDS day files."""
    extensions = tuple(e.lower() for e in extensions)
    top = os.path.join(data_dir, "")
    found = []
    for root, dirs, files in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        prefix = os.path.join(root, "")[len(top) :]  # os.path.relpath costs more than the walk
        found += [prefix + f for f in files if is_waveform_file(f, extensions)]
    return sorted(found)


def header_record(path):
    """What a header-only read tells about one file: its traces (id, start, end, rate) or why it is unusable."""
    stat = os.stat(path)
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "error": ("", ""), "traces": []}
    try:
        stream = read_stream(path, headonly=True)
        record["traces"] = [
            (t.id, t.stats.starttime.timestamp, t.stats.endtime.timestamp, t.stats.sampling_rate) for t in stream
        ]
    except UnusableFile as err:
        record["error"] = (err.reason, str(err))
    return record


def read_headers(paths, processes):
    """header_record of each path, in order; spread over `processes` worker processes when there are many."""
    if processes <= 1 or len(paths) < PARALLEL_INDEX_MIN_FILES:
        return [header_record(path) for path in paths]
    chunksize = max(1, min(256, len(paths) // (8 * processes)))
    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(header_record, paths, chunksize=chunksize))


def index_from_records(relpaths, records):
    """FileIndex of header records (header_record's dicts), in the order given."""
    traces = [trace for record in records for trace in record["traces"]]
    names, codes = np.unique(np.array([trace[0] for trace in traces], dtype=str), return_inverse=True)
    n_traces = np.array([len(record["traces"]) for record in records], dtype=np.int64)
    return FileIndex(
        path=np.array(relpaths, dtype=str),
        size=np.array([record["size"] for record in records], dtype=np.int64),
        mtime_ns=np.array([record["mtime_ns"] for record in records], dtype=np.int64),
        error_reason=np.array([record["error"][0] for record in records], dtype=str),
        error_message=np.array([record["error"][1] for record in records], dtype=str),
        first_trace=np.cumsum(n_traces) - n_traces,
        n_traces=n_traces,
        trace_names=names,
        trace_code=codes.astype(np.int32).ravel(),
        trace_start=np.array([trace[1] for trace in traces], dtype=np.float64),
        trace_end=np.array([trace[2] for trace in traces], dtype=np.float64),
        trace_rate=np.array([trace[3] for trace in traces], dtype=np.float64),
    )


def records_of(index, rows):
    """header_record dicts of index rows (to merge a stored index with files read anew)."""
    return [
        {
            "size": int(index.size[k]),
            "mtime_ns": int(index.mtime_ns[k]),
            "error": (str(index.error_reason[k]), str(index.error_message[k])),
            "traces": list(
                zip(
                    index.trace_names[index.trace_code[index.traces(k)]].tolist(),
                    index.trace_start[index.traces(k)].tolist(),
                    index.trace_end[index.traces(k)].tolist(),
                    index.trace_rate[index.traces(k)].tolist(),
                )
            ),
        }
        for k in rows
    ]


def load_stored_index(index_path):
    """The stored FileIndex, or None when there is none, or it is unreadable, foreign or of another version."""
    if not os.path.exists(index_path):
        return None
    try:
        with np.load(index_path, allow_pickle=False) as stored:
            if int(stored["version"]) != INDEX_VERSION:
                return None
            return FileIndex(**{field.name: stored[field.name] for field in fields(FileIndex)})
    except Exception as err:  # truncated or foreign file: zipfile, OSError, KeyError, ValueError ...
        log.warning("ignoring unreadable index %s (%s)", index_path, type(err).__name__)
        return None


def store_index(index, index_path):
    columns = {field.name: getattr(index, field.name) for field in fields(FileIndex)}
    atomic_write(index_path, lambda f: np.savez(f, version=INDEX_VERSION, **columns))


def build_index(data_dir, extensions=MINISEED_EXTENSIONS, index_path=None, processes=None):
    """FileIndex of data_dir, reusing the stored index for files whose size and mtime are unchanged.

    New or changed files are read with `processes` worker processes (default: all cores).
    The index is stored at `index_path` (default `<data_dir>/.stft_index.npz`); a read-only
    data_dir only costs re-reading headers at the next start.
    """
    index_path = index_path or os.path.join(data_dir, INDEX_NAME)
    stored = load_stored_index(index_path)
    relpaths = find_files(data_dir, extensions)
    top = os.path.join(data_dir, "")
    stats = [os.stat(top + relpath) for relpath in relpaths]
    size = np.array([stat.st_size for stat in stats], dtype=np.int64)
    mtime_ns = np.array([stat.st_mtime_ns for stat in stats], dtype=np.int64)
    if (
        stored is not None
        and len(stored) == len(relpaths)
        and np.array_equal(stored.path, np.array(relpaths, dtype=str))
        and np.array_equal(stored.size, size)
        and np.array_equal(stored.mtime_ns, mtime_ns)
    ):
        return stored  # the usual warm start: nothing to merge
    row_of = {} if stored is None else {path: k for k, path in enumerate(stored.path.tolist())}
    current = [
        row_of.get(relpath)
        if row_of.get(relpath) is not None
        and stored.size[row_of[relpath]] == size[k]
        and stored.mtime_ns[row_of[relpath]] == mtime_ns[k]
        else None
        for k, relpath in enumerate(relpaths)
    ]
    fresh = [k for k, row in enumerate(current) if row is None]
    new_records = iter(
        read_headers([os.path.join(data_dir, relpaths[k]) for k in fresh], processes or available_cores())
    )
    kept = iter(records_of(stored, [row for row in current if row is not None]) if stored is not None else [])
    records = [next(new_records) if row is None else next(kept) for row in current]
    index = index_from_records(relpaths, records)
    log.info("indexed %d files (%d read anew) -> %s", len(index), len(fresh), index_path)
    try:
        store_index(index, index_path)
    except OSError as err:
        log.warning("could not store the index (%s); headers will be read again next time", err)
    return index
