"""The spectrogram cache: each file's spectrogram computed once, then read back through numpy memmaps.

Folder `<cache_dir>/<key>/`, the key hashing every setting that changes a spectrogram (STFT,
normalisation, families, data directory), so a new --nfft never reads stale data:
  shard_N.f16   float16 spectrograms (3, n_freq, n_time) back to back; written once, never changed
                or removed (the space of files changed since stays used: delete the folder to reclaim it)
  manifest.npz  one row per file: size and mtime it was computed from, shard, offset, n_time,
                metadata, or why the file is unusable (those are not retried until they change)
Files that are new or changed since the manifest go into a new shard. Writers hold a file
lock; DataLoader workers only read, each mapping the shards itself.
"""

import hashlib
import json
import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

import numpy as np
import torch
from filelock import FileLock

from reading.transform import DEAD_RELATIVE_LEVEL, NORMALISATIONS
from reading.waveforms import MAX_GAP_SECONDS
from running.storage import atomic_write, write_json_atomic

log = logging.getLogger("spectrogram_cache")

WINDOW_KEY = re.compile(r"@\d{4}-\d\d-\d\dT[\d:.]+Z$")  # the start time in a window's key "<path>@<start>"
SHARD_BATCH = 64  # samples read together while building a shard
CACHE_VERSION = 5  # raise when read_waveform() or spectrogram() change what they return (5: bins above Nyquist)
MANIFEST_FIELDS = {
    "path": str,
    "shard": np.int32,
    "offset": np.int64,
    "n_time": np.int32,
    "trace_id": str,
    "family": str,
    "starttime": str,
    "skip_reason": str,
    "message": str,
}


def cache_key(dataset):
    """(folder name, settings): everything that changes what a cached spectrogram holds."""
    settings = {
        "cache_version": CACHE_VERSION,
        "data_dir": os.path.abspath(dataset.data_dir),
        "families": sorted(dataset.families),
        # the normalisation has its own entry: caches made before STFTConfig had the field keep their key
        "stft": {k: v for k, v in asdict(dataset.stft).items() if k != "normalisation"},
        "window_seconds": dataset.window_seconds,
        "max_gap_seconds": MAX_GAP_SECONDS,
        "dead_relative_level": DEAD_RELATIVE_LEVEL,
        "normalisation": NORMALISATIONS[dataset.stft.normalisation],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16], settings


def empty_manifest():
    return {field: np.empty(0, dtype) for field, dtype in MANIFEST_FIELDS.items()} | {
        "version": np.empty((0, 2), np.int64)
    }


def manifest_row(relpath, meta):
    """A manifest row of an item that could not be stored (yet): metadata, or why the file is unusable."""
    return {
        "path": relpath,
        "shard": -1,
        "offset": 0,
        "n_time": 0,
        "trace_id": meta.get("trace_id", ""),
        "family": meta.get("family", ""),
        "starttime": meta.get("starttime", ""),
        "skip_reason": meta.get("skip_reason", ""),
        "message": meta.get("message", ""),
    }


def write_shard(shard_path, shard, dataset, keys, positions):
    """Spectrograms of dataset[positions] into a new shard file, in order; returns their manifest rows.

    Samples are read SHARD_BATCH at a time (dataset.__getitems__), so the windows of one file are decoded together.
    """
    rows = []

    def write(f):
        offset = 0
        for begin in range(0, len(positions), SHARD_BATCH):
            batch = positions[begin : begin + SHARD_BATCH].tolist()
            for key, (x, meta) in zip(keys[begin : begin + SHARD_BATCH], dataset.__getitems__(batch)):
                row = manifest_row(key, meta)
                if x is not None:
                    f.write(x.numpy().astype(np.float16).tobytes())
                    row.update(shard=shard, offset=offset, n_time=x.shape[-1])
                    offset += x.numel()
                rows.append(row)

    atomic_write(shard_path, write)
    return rows


class SpectrogramCache:
    """A dataset's spectrograms, computed once and then read through numpy memmaps (see the module docstring).

    Rows are keyed by dataset.sample_key (a file's relative path, "<path>@<start>" for a window); the
    size and mtime_ns of each sample's files tell changed files.
    """

    def __init__(self, cache_dir, dataset, processes):
        keys = np.array([dataset.sample_key(i) for i in range(len(dataset))], dtype=str)
        versions = dataset.recordings.version[dataset.sample_recording]
        key, settings = cache_key(dataset)
        self.folder = os.path.join(cache_dir, key)
        self.data_dir, self.n_freq = dataset.data_dir, dataset.stft.n_freq
        os.makedirs(self.folder, exist_ok=True)
        with FileLock(os.path.join(self.folder, "lock")):
            if not os.path.exists(os.path.join(self.folder, "settings.json")):  # for people: what the key stands for
                write_json_atomic(os.path.join(self.folder, "settings.json"), settings)
            manifest = self.without_damaged_shards(self.load_manifest())
            stale = self.stale_files(manifest, keys, versions)
            if stale:
                manifest = self.extend(manifest, dataset, keys, stale, versions, processes)
        self.manifest = manifest
        row_of = {path: row for row, path in enumerate(manifest["path"])}
        self.rows = np.array([row_of[key] for key in keys], dtype=np.int64)  # dataset index -> row
        self.shards = {}  # shard number -> memmap, opened lazily in each process

    @staticmethod
    def stale_files(manifest, files, versions):
        """Positions of the files that the manifest lacks or holds for another size or mtime."""
        row_of = {path: row for row, path in enumerate(manifest["path"])}
        return [
            i
            for i, (path, version) in enumerate(zip(files, versions))
            if path not in row_of or tuple(manifest["version"][row_of[path]]) != tuple(version)
        ]

    def load_manifest(self):
        """The stored manifest, or an empty one (no cache yet, or one that cannot be read: rebuilt)."""
        path = os.path.join(self.folder, "manifest.npz")
        if os.path.exists(path):
            try:
                with np.load(path) as stored:
                    return {field: stored[field] for field in (*MANIFEST_FIELDS, "version")}
            except Exception as err:  # truncated or foreign file: zipfile, OSError, KeyError, ...
                log.warning(
                    "rebuilding the cache in %s: manifest unreadable (%s: %s)", self.folder, type(err).__name__, err
                )
        return empty_manifest()

    def without_damaged_shards(self, manifest):
        """The manifest less the rows of shards that are missing or shorter than it says: those files are computed
        again. Damage that keeps a shard's size is not looked for (a checksum per read costs more than the read)."""
        ends = 2 * (manifest["offset"] + 3 * self.n_freq * manifest["n_time"].astype(np.int64))  # bytes, per row
        damaged = []
        for shard in np.unique(manifest["shard"][manifest["shard"] >= 0]):
            path = os.path.join(self.folder, f"shard_{shard}.f16")
            needed = int(ends[manifest["shard"] == shard].max())
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size is None or size < needed:
                damaged.append(shard)
                found = "missing" if size is None else f"{size} of {needed} bytes"
                log.warning("cache shard %s damaged (%s): its spectrograms are computed again", path, found)
        keep = ~np.isin(manifest["shard"], damaged)
        return {field: values[keep] for field, values in manifest.items()}

    def extend(self, manifest, dataset, keys, stale, versions, processes):
        """Compute the stale samples' spectrograms into new shards, one per process; returns the new manifest."""
        # New numbers every time: a running process may still read older shards through its own manifest.
        numbers = [int(name[6:-4]) for name in os.listdir(self.folder) if re.fullmatch(r"shard_\d+\.f16", name)]
        first = max(numbers, default=-1) + 1
        parts = [part for part in np.array_split(np.array(stale), max(1, min(processes, len(stale)))) if len(part)]
        jobs = [
            (os.path.join(self.folder, f"shard_{first + j}.f16"), first + j, dataset, keys[part], part)
            for j, part in enumerate(parts)
        ]
        log.info("caching %d spectrograms with %d processes in %s", len(stale), len(jobs), self.folder)
        if len(jobs) == 1:
            rows = write_shard(*jobs[0])
        else:  # each process writes its own shard: no spectrogram crosses between processes
            with ProcessPoolExecutor(len(jobs)) as pool:
                rows = [row for part in pool.map(write_shard, *zip(*jobs)) for row in part]
        fresh = set(keys[stale])
        keep = np.array([path not in fresh for path in manifest["path"]], dtype=bool)
        merged = {
            field: np.concatenate([manifest[field][keep], np.array([row[field] for row in rows], dtype=dtype)])
            for field, dtype in MANIFEST_FIELDS.items()
        }
        merged["version"] = np.concatenate([manifest["version"][keep], versions[np.concatenate(parts)]])
        atomic_write(os.path.join(self.folder, "manifest.npz"), lambda f: np.savez(f, **merged))
        used = {row["shard"] for row in rows}
        for shard_path, shard, *_ in jobs:
            if shard not in used:  # every sample of this part was unusable
                os.remove(shard_path)
        return merged

    def __getstate__(self):
        return {**self.__dict__, "shards": {}}  # a worker maps the shards itself; never pickle mapped data

    def item(self, i):
        """Dataset item i: (spectrogram (3, n_freq, n_time) float16, metadata), as SeismicSTFTDataset gives it;
        None when its shard has been cut short since the start (the dataset then reads the file)."""
        row = self.rows[i]
        m = self.manifest
        key = str(m["path"][row])
        if m["skip_reason"][row]:
            return None, {
                "path": os.path.join(self.data_dir, key),
                "skip_reason": str(m["skip_reason"][row]),
                "message": str(m["message"][row]),
            }
        shard, offset, n_time = int(m["shard"][row]), int(m["offset"][row]), int(m["n_time"][row])
        if shard not in self.shards:
            self.shards[shard] = np.memmap(os.path.join(self.folder, f"shard_{shard}.f16"), dtype=np.float16, mode="r")
        values = self.shards[shard][offset : offset + 3 * self.n_freq * n_time]
        if values.size != 3 * self.n_freq * n_time:  # the shard was cut short after this run checked it
            return None
        values = values.reshape(3, self.n_freq, n_time)
        meta = {
            "path": os.path.join(self.data_dir, WINDOW_KEY.sub("", key)),
            "trace_id": str(m["trace_id"][row]),
            "family": str(m["family"][row]),
            "starttime": str(m["starttime"][row]),
        }
        return torch.from_numpy(np.array(values)), meta
