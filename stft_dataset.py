"""The dataset: miniSEED files -> normalised STFT spectrograms, shape (component, freq, time), and batches.

Data flow: path -> waveforms.read_waveform (obspy; E, N, Z at 100 Hz) -> transform.spectrogram
(log-magnitude STFT, min-max per component to [0, 1]) -> pad_collate (batch, mask of valid time bins).
Which files exist comes from file_index; with a cache_dir, spectrograms come from spectrogram_cache.
Files that cannot give a clean 3-component waveform are skipped with a reason (see `SkipLog`), never fatal.
"""

import logging
import os
from collections import Counter

import numpy as np
import torch
from torch.utils.data import Dataset

from file_index import available_cores, build_index
from spectrogram_cache import SpectrogramCache
from transform import STFTConfig, spectrogram
from waveforms import (
    DEFAULT_FAMILIES,
    MINISEED_EXTENSIONS,
    NOT_REQUESTED,
    UnusableFile,
    choose_components,
    read_waveform,
)

log = logging.getLogger("stft_dataset")


class SkipLog:
    """Unusable files: each logged once with its reason, counted by reason."""

    def __init__(self):
        self.files = {}  # path -> (reason, full message)

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

    The spectrogram is float32, or float16 when read from the cache (runtime.model_input converts on the device).

    Files are found recursively under `data_dir`; an index of their headers is kept so that a
    restart does not re-read them. Files whose traces hold no requested family are left out
    (counted in `excluded`); files that are unusable by their headers are recorded in `skips`.
    `__getitem__` returns (None, metadata with "skip_reason") for a file that fails on a full
    read (NaN samples, long gaps, ...), which `pad_collate` drops and reports.
    With `cache_dir`, spectrograms are computed once with `processes` workers (default: all
    cores) and then read from a `SpectrogramCache`.
    """

    def __init__(
        self,
        data_dir,
        families=DEFAULT_FAMILIES,
        stft=STFTConfig(),
        extensions=MINISEED_EXTENSIONS,
        index_path=None,
        skips=None,
        cache_dir=None,
        processes=None,
    ):
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data directory not found: {data_dir}")
        self.data_dir, self.families, self.stft = data_dir, tuple(families), stft
        self.skips = skips if skips is not None else SkipLog()
        self.excluded = Counter()  # families found -> files left out by the channel filter
        usable = self.usable_files(build_index(data_dir, extensions, index_path, processes))
        # One numpy array, not a list of str: DataLoader workers would copy every object they touch.
        self.files = np.array([relpath for relpath, _, _ in usable], dtype=str)
        self.n_samples = np.array([n for _, _, n in usable], dtype=np.int64)  # common samples at stft.sampling_rate
        self.cache = None
        if cache_dir is not None:
            versions = np.array([version for _, version, _ in usable], dtype=np.int64).reshape(-1, 2)
            self.cache = SpectrogramCache(cache_dir, self, versions, processes or available_cores())

    def usable_files(self, index):
        """[(relative path, (size, mtime_ns), samples)] of the indexed files with a requested 3-component instrument."""
        usable = []
        for relpath, record in index.items():
            path = os.path.join(self.data_dir, relpath)
            if "error" in record:
                self.skips.add(path, *record["error"])
                continue
            try:
                _, _, picks = choose_components(record["seed_ids"], self.families)
            except UnusableFile as err:
                if err.reason == NOT_REQUESTED:
                    self.excluded[err.detail] += 1
                else:
                    self.skips.add(path, err.reason, str(err))
                continue
            n_samples = common_samples(record["spans"], picks, self.stft.sampling_rate)
            usable.append((relpath, (record["size"], record["mtime_ns"]), n_samples))
        return usable

    def time_bins(self):
        """(N,) time bins of each file's spectrogram, known from the headers before any file is read (batching.py
        groups files of one length by it). Estimated: gaps and resampling can shift it by a bin, which
        batching.length_groups absorbs."""
        return np.array([self.stft.n_time(int(n)) for n in self.n_samples], dtype=np.int64)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        item = self.cache.item(i) if self.cache is not None else None
        if item is not None:
            return item
        path = os.path.join(self.data_dir, self.files[i])
        try:
            waveform, meta = read_waveform(path, self.families, self.stft)
        except UnusableFile as err:
            return None, {"path": path, "skip_reason": err.reason, "message": str(err)}
        except Exception as err:  # one odd file among 100k must not end a run; it is reported like the others
            return None, {"path": path, "skip_reason": "unexpected error", "message": f"{type(err).__name__}: {err}"}
        return torch.from_numpy(spectrogram(waveform, self.stft)), {"path": path, **meta}


def common_samples(spans, picks, sampling_rate):
    """Samples at `sampling_rate` of the span that the chosen components share, from the header spans.

    spans: [(start, end, sampling rate)] per trace (file_index); picks: {component: [trace positions]}.
    """
    starts = [min(spans[i][0] for i in positions) for positions in picks.values()]
    ends = [max(spans[i][1] for i in positions) for positions in picks.values()]
    return max(0, int(round((min(ends) - max(starts)) * sampling_rate)) + 1)


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
        batch[k, ..., : x.shape[-1]] = x
    mask = torch.arange(batch.shape[-1])[None, :] < lengths[:, None]
    return {"spectrogram": batch, "mask": mask, "meta": [meta for _, meta in kept], "skipped": skipped}
