"""The index of a data directory: which files there are and what their headers say.

`build_index` finds miniSEED files recursively and reads each one's trace ids with a header-only
read (spread over all cores), stored in `<data_dir>/.stft_index.json` so that a restart re-reads
only files whose size or mtime changed. Choosing which files are usable is the dataset's job.
"""

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor

from storage import write_json_atomic
from waveforms import MINISEED_EXTENSIONS, UnusableFile, read_stream

log = logging.getLogger("file_index")

DEFAULT_DATA_DIR = "data/filtered_waveforms"  # the shipped recordings, relative to the repository root
INDEX_VERSION = 2  # 2: "spans" of each trace
PARALLEL_INDEX_MIN_FILES = 200  # fewer new files are read in this process: a pool would cost more than it saves


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
        traces = read_stream(path, headonly=True)
        record["seed_ids"] = [trace.id for trace in traces]
        # (start, end as POSIX seconds, sampling rate in Hz) of each trace: the length of a sample before reading it
        record["spans"] = [
            [t.stats.starttime.timestamp, t.stats.endtime.timestamp, t.stats.sampling_rate] for t in traces
        ]
    except UnusableFile as err:
        record["error"] = [err.reason, str(err)]
    return record


def is_current(record, stat):
    """A stored header record still describes the file: same size and mtime, well formed."""
    if not isinstance(record, dict) or record.get("size") != stat.st_size or record.get("mtime_ns") != stat.st_mtime_ns:
        return False
    return isinstance(record.get("spans"), list) or isinstance(record.get("error"), list)


def read_headers(paths, processes):
    """header_record of each path, in order; spread over `processes` worker processes when there are many."""
    if processes <= 1 or len(paths) < PARALLEL_INDEX_MIN_FILES:
        return [header_record(path) for path in paths]
    chunksize = max(1, min(256, len(paths) // (8 * processes)))
    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(header_record, paths, chunksize=chunksize))


def load_stored_index(index_path):
    """{relative path: header record} of a stored index; {} when there is none or it is unreadable or foreign."""
    if not os.path.exists(index_path):
        return {}
    try:
        with open(index_path) as f:
            content = json.load(f)
    except (OSError, ValueError):
        log.warning("ignoring unreadable index %s", index_path)
        return {}
    if isinstance(content, dict) and content.get("version") == INDEX_VERSION and isinstance(content.get("files"), dict):
        return content["files"]
    return {}


def build_index(data_dir, extensions=MINISEED_EXTENSIONS, index_path=None, processes=None):
    """{relative path: header record}, reusing the stored index for files whose size and mtime are unchanged.

    New or changed files are read with `processes` worker processes (default: all cores).
    The index is a JSON file (default `<data_dir>/.stft_index.json`); a read-only data_dir
    only costs re-reading headers at the next start.
    """
    index_path = index_path or os.path.join(data_dir, ".stft_index.json")
    stored = load_stored_index(index_path)
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
