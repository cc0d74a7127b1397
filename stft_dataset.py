"""The dataset: miniSEED files -> normalised STFT spectrograms, shape (component, freq, time), and batches.

Data flow: path -> waveforms.read_waveform (obspy; E, N, Z at 100 Hz) -> transform.spectrogram
(log-magnitude STFT, min-max per component to [0, 1]) -> pad_collate (batch, mask of valid time bins).
Which files exist comes from file_index; with a cache_dir, spectrograms come from spectrogram_cache.
A SeisBench dataset (metadata.csv + waveforms.hdf5) as data_dir is read through seisbench_data instead of files: one
recording per trace, named by its trace_name, through the same checks (waveforms.waveform_of_stream) and transform.
Files that cannot give a clean 3-component waveform are skipped with a reason (see `SkipLog`), never fatal.
"""

import logging
import os
from collections import Counter

import numpy as np
import torch
from obspy import UTCDateTime
from torch.utils.data import Dataset

from reading.file_index import available_cores, build_index
from reading.recordings import (
    MAX_RECORDING_SECONDS,
    find_recordings,
    in_groups,
    sample_groups,
    window_counts,
    window_samples,
)
from reading.seisbench_data import SeisBenchTraces, is_seisbench_dataset
from reading.spectrogram_cache import SpectrogramCache
from reading.transform import STFTConfig, spectrogram
from reading.waveforms import (
    DEFAULT_FAMILIES,
    MINISEED_EXTENSIONS,
    UnusableFile,
    read_recording,
    read_waveform,
    read_windows,
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
    """3-component miniSEED recordings -> (spectrogram (3, n_freq, n_time), metadata), one sample per file or window.

    The spectrogram is float32, or float16 when read from the cache (device.model_input converts on the device).

    Files are found recursively under `data_dir`; an index of their headers is kept so that a restart does
    not re-read them. Event files that hold E, N and Z are one recording each; files that hold one or two
    components (SDS day files, per-channel trees) are grouped into recordings (see recordings.py). Without
    `window_seconds` a sample is a whole recording, and a recording longer than MAX_RECORDING_SECONDS is
    skipped; with it, a sample is a window of `window_seconds` every `window_stride` seconds (numpy arrays
    `sample_recording` and `sample_start`, counted from the headers). Files whose traces hold no requested
    family are left out (counted in `excluded`); files unusable by their headers are recorded in `skips`.
    `__getitem__` returns (None, metadata with "skip_reason") for a sample that fails on a full read (NaN
    samples, long gaps, a dead stretch of a window, ...), which `pad_collate` drops and reports.
    With `cache_dir`, spectrograms are computed once with `processes` workers (default: all cores) and then
    read from a `SpectrogramCache`.
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
        window_seconds=None,
        window_stride=None,
    ):
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data directory not found: {data_dir}")
        self.data_dir, self.families, self.stft = data_dir, tuple(families), stft
        self.window_seconds = window_seconds
        self.window_stride = window_stride or window_seconds
        self.skips = skips if skips is not None else SkipLog()
        self.excluded = Counter()  # families found -> files left out by the channel filter
        self.traces = None  # a SeisBench dataset's traces (seisbench_data.SeisBenchTraces): read instead of files
        if is_seisbench_dataset(data_dir):
            self.traces = SeisBenchTraces(data_dir)
            key = self.traces.key
            recordings = self.traces.recordings(
                self.families, lambda k, *why: self.skip(key[k], *why), self.excluded, window_seconds
            )
        else:
            index = build_index(data_dir, extensions, index_path, processes)
            recordings = find_recordings(
                index, self.families, lambda k, *why: self.skip(index.path[k], *why), self.excluded, window_seconds
            )
        self.recordings = self.windows(recordings) if window_seconds else self.whole(recordings)
        # numpy arrays, not lists of str: DataLoader workers would copy every object they touch.
        self.files = self.recordings.files  # per recording; without windows also per sample
        self.cache = None
        if cache_dir is not None:
            self.cache = SpectrogramCache(cache_dir, self, processes or available_cores())

    def skip(self, relpath, reason, message):
        self.skips.add(os.path.join(self.data_dir, relpath), reason, message)

    def whole(self, recordings):
        """One sample per recording; recordings longer than MAX_RECORDING_SECONDS are skipped."""
        too_long = recordings.end - recordings.start > MAX_RECORDING_SECONDS
        for r in np.flatnonzero(too_long):
            seconds = recordings.end[r] - recordings.start[r]
            for relpath in recordings.members(r):
                self.skip(
                    relpath,
                    "too long without --window_seconds",
                    f"too long without --window_seconds: {recordings.instrument[r]}: {seconds:.0f} s > "
                    f"{MAX_RECORDING_SECONDS:.0f} s; "
                    "cut it into samples with --window_seconds (and --window_stride)",
                )
        recordings = recordings.take(~too_long)
        self.sample_recording = np.arange(len(recordings), dtype=np.int64)
        self.sample_start = recordings.start
        return recordings

    def windows(self, recordings):
        """Windows of every recording, counted from the headers; files of recordings too short for one are skipped."""
        counts = window_counts(recordings, self.window_seconds, self.window_stride)
        with_windows = set(recordings.member_paths[recordings.member_rows(np.flatnonzero(counts))].tolist())
        for r in np.flatnonzero(counts == 0):
            for relpath in recordings.members(r):
                if relpath not in with_windows:
                    seconds = recordings.end[r] - recordings.start[r] + 1 / recordings.rate[r]
                    self.skip(
                        relpath,
                        "shorter than --window_seconds",
                        f"shorter than --window_seconds: {recordings.instrument[r]}: {seconds:.1f} s of common data "
                        f"< {self.window_seconds:g} s",
                    )
        recordings = recordings.take(counts > 0)
        self.sample_recording, self.sample_start = window_samples(recordings, self.window_seconds, self.window_stride)
        return recordings

    def __len__(self):
        return len(self.sample_recording)

    def sample_seconds(self, i):
        """Length of sample i in seconds (from the headers)."""
        if self.window_seconds:
            return self.window_seconds
        r = self.sample_recording[i]
        return self.recordings.end[r] - self.recordings.start[r] + 1 / self.recordings.rate[r]

    def time_bins(self):
        """(N,) STFT time bins of every sample, from the headers before any file is read (batching.py groups samples
        of one length by it). Exact for windows and for recordings at the target sampling rate; for resampled ones
        within a bin, which batching.length_groups absorbs."""
        if self.window_seconds:
            return np.full(len(self), self.stft.n_time_bins(round(self.window_seconds * self.stft.sampling_rate)))
        rec, rate = self.recordings, self.stft.sampling_rate
        n_native = np.round((rec.end - rec.start) * rec.rate).astype(np.int64) + 1
        n_samples = np.where(np.isclose(rec.rate, rate), n_native, (n_native * rate / rec.rate).astype(np.int64))
        return self.stft.n_time_bins(n_samples)[self.sample_recording]

    def groups(self, split_by):
        """(group keys, group code of every sample) for --split_by file, station, network or time (sample_groups), or
        dataset (a SeisBench dataset's split column; no groups for files)."""
        if split_by == "dataset":
            if self.traces is None:
                return np.array([], dtype=str), np.full(len(self), -1, dtype=np.int64)
            keys, codes = self.traces.split_groups(self.recordings.files)
            return keys, codes[self.sample_recording]
        if self.window_seconds:
            seconds = self.window_seconds
        else:
            rec = self.recordings
            seconds = (rec.end - rec.start + 1 / rec.rate)[self.sample_recording]
        return sample_groups(split_by, self.recordings, self.sample_recording, self.sample_start, seconds)

    def split_positions(self, split, split_by, val_groups):
        """Positions of the samples of `split`: 'all', or the 'val' or 'train' side of a run that split by `split_by`
        and kept `val_groups` for validation (checkpoints.data_settings)."""
        if split == "all":
            return np.arange(len(self))
        keys, codes = self.groups(split_by)
        in_val = in_groups(keys, codes, val_groups)
        return np.flatnonzero(in_val if split == "val" else ~in_val & (codes >= 0))

    def sample_files(self, positions):
        """Relative path of the file (the first of its recording) of each sample at `positions`."""
        return self.files[self.sample_recording[positions]]

    def position_of(self, relpath, starttime):
        """Position of the sample of file `relpath` that starts at `starttime` (ISO 8601, as in its metadata), or
        None. A whole file has one sample; a window is found by its start, within half a sample."""
        positions = np.flatnonzero(self.sample_files(np.arange(len(self))) == relpath)
        if len(positions) > 1:
            starts = self.sample_start[positions]
            positions = positions[np.abs(starts - UTCDateTime(starttime).timestamp) < 0.5 / self.stft.sampling_rate]
        return int(positions[0]) if len(positions) else None

    def sample_key(self, i):
        """What names sample i in the cache: the file's relative path, with the start time for a window."""
        r = self.sample_recording[i]
        if self.recordings.whole_file[r]:
            return str(self.files[r])
        return f"{self.files[r]}@{obspy_time(self.sample_start[i])}"

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        """Samples `indices` (a batch): from the cache, or read, the files of one recording decoded once for all of its
        windows."""
        samples = {}
        if self.cache is not None:  # an item whose shard was cut short since the start is read from its file
            samples = {i: item for i in indices if (item := self.cache.item(i)) is not None}
        if self.traces is not None:  # a SeisBench dataset reads a batch's traces in one call
            unread = np.array([self.sample_recording[i] for i in indices if i not in samples], dtype=np.int64)
            self.traces.prefetch(self.files[np.unique(unread)])
        by_recording = {}
        for i in indices:
            if i in samples:
                continue
            r = int(self.sample_recording[i])
            if self.recordings.whole_file[r]:
                samples[i] = self.whole_file_sample(r)
            else:
                by_recording.setdefault(r, []).append(i)
        for r, windows in by_recording.items():
            samples.update(zip(windows, self.window_samples(r, windows)))
        # index: the dataset position; native_rate: the recording's own sampling rate (Hz), no data at and above half
        found = {
            i: {"index": int(i), "native_rate": float(self.recordings.rate[self.sample_recording[i]])} for i in indices
        }
        if self.traces is not None:  # what joins a catalogue to the dataset's metadata
            names = {i: self.traces.names(self.files[self.sample_recording[i]]) for i in indices}
            return [(samples[i][0], {**samples[i][1], **names[i], **found[i]}) for i in indices]
        return [(samples[i][0], {**samples[i][1], **found[i]}) for i in indices]

    def waveform(self, i):
        """(3, n_samples) float64 E, N, Z of sample i in counts, resampled to the STFT's rate, read from its files
        (never the cache): what embed.py's figures draw. Raises UnusableFile where it cannot be read."""
        r = int(self.sample_recording[i])
        if self.recordings.whole_file[r]:
            return self.read_whole_file(r)[0]
        waveform = self.read_window_waveforms(r, [i])[0]
        if isinstance(waveform, UnusableFile):
            raise waveform
        return waveform

    def read_whole_file(self, r):
        """(waveform, meta) of recording r, a file read whole (waveforms.read_waveform); raises UnusableFile."""
        if self.traces is not None:
            return self.traces.read_waveform(self.files[r], self.families, self.stft)
        return read_waveform(os.path.join(self.data_dir, self.files[r]), self.families, self.stft)

    def whole_file_sample(self, r):
        path = os.path.join(self.data_dir, self.files[r])
        try:
            waveform, meta = self.read_whole_file(r)
        except UnusableFile as err:
            return None, {"path": path, "skip_reason": err.reason, "message": str(err)}
        except Exception as err:  # one odd file among 100k must not end a run; it is reported like the others
            return None, {"path": path, "skip_reason": "unexpected error", "message": f"{type(err).__name__}: {err}"}
        native_rate = meta.pop("native_rate")  # the same as the index's rate (recordings.rate), which windows take
        return torch.from_numpy(spectrogram(waveform, self.stft, native_rate)), {"path": path, **meta}

    def read_window_waveforms(self, r, windows):
        """The waveform, or the UnusableFile saying why there is none, of each window (dataset index) of recording r,
        its files read once for all of them."""
        starts = [float(self.sample_start[i]) for i in windows]
        seconds = self.sample_seconds(windows[0])
        paths = [os.path.join(self.data_dir, m) for m in self.recordings.members(r, min(starts), max(starts) + seconds)]
        instrument = str(self.recordings.instrument[r])
        try:
            if self.traces is not None:
                return self.traces.read_windows(self.files[r], instrument, starts, seconds, self.stft)
            if not self.window_seconds:  # a whole recording of per-channel files: read as its one-file layout is
                return [read_recording(paths, instrument, starts[0], self.recordings.end[r], self.stft)]
            return read_windows(paths, instrument, starts, seconds, self.stft)
        except Exception as err:  # one odd file must not end a run
            return [UnusableFile("unexpected error", f"{type(err).__name__}: {err}")] * len(starts)

    def window_samples(self, r, windows):
        """Samples of the windows (dataset indices) of recording r, its files read once for all of them."""
        starts = [float(self.sample_start[i]) for i in windows]
        waveforms = self.read_window_waveforms(r, windows)
        path = os.path.join(self.data_dir, self.files[r])
        instrument = str(self.recordings.instrument[r])
        samples = []
        for start, waveform in zip(starts, waveforms):
            meta = {"path": path, "trace_id": instrument, "family": str(self.recordings.family[r])}
            meta["starttime"] = obspy_time(start)
            if isinstance(waveform, UnusableFile):
                where = f"{path}@{meta['starttime']}" if self.window_seconds else path
                samples.append((None, {"path": where, "skip_reason": waveform.reason, "message": str(waveform)}))
            else:
                samples.append((torch.from_numpy(spectrogram(waveform, self.stft, self.recordings.rate[r])), meta))
        return samples


def obspy_time(seconds):
    """POSIX seconds -> ISO 8601 as obspy writes it (the format of every sample's "starttime")."""
    return str(UTCDateTime(float(seconds)))


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
    if bool((lengths == lengths[0]).all()):  # one length (batching.py's batches, windows): no padding, half the cost
        batch = torch.stack([x for x, _ in kept])
    else:
        batch = torch.zeros(len(kept), *kept[0][0].shape[:-1], int(lengths.max()), dtype=kept[0][0].dtype)
        for k, (x, _) in enumerate(kept):
            batch[k, ..., : x.shape[-1]] = x
    mask = torch.arange(batch.shape[-1])[None, :] < lengths[:, None]
    return {"spectrogram": batch, "mask": mask, "meta": [meta for _, meta in kept], "skipped": skipped}
