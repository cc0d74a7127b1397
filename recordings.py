"""Recordings and samples: which 3-component recordings a directory holds, and what one sample of them is.

file_index.FileIndex (headers only) -> Recordings -> samples (numpy arrays; nothing here reads samples).
A recording is one instrument's E, N, Z over one time span:
  - a file that holds all three components (an event file) is one recording;
  - files that each hold one or two components (an SDS archive, a tree of per-channel files) are grouped by
    instrument (network, station, location, band and instrument code) and time, over the spans where all
    three components have data (gaps of up to MAX_GAP_SECONDS bridged), so a span may cross midnight.
A sample is a whole recording (without --window_seconds; one file = one sample for event files), or a
window of W seconds every S seconds of one (with --window_seconds W --window_stride S).
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import obspy

from waveforms import COMPONENTS, MAX_GAP_SECONDS, NOT_REQUESTED, UnusableFile, choose_components, group_by_instrument

# Without windows, a recording longer than this is skipped (never one giant sample that pads a batch to a day):
# 600 s is 6.7 x the shipped 90 s event files, so event archives are untouched and a day file is caught.
MAX_RECORDING_SECONDS = 600.0
TIME_BLOCK_SECONDS = 86400.0  # --split_by time: whole UTC days go to one side
SPLITS = ("file", "station", "network", "time")


def window_problems(window_seconds, window_stride, stft):
    """What is wrong with --window_seconds / --window_stride, one phrase each (train.py and inference.py)."""
    if window_seconds is None:
        return ["--window_stride needs --window_seconds"] if window_stride is not None else []
    problems = []
    if window_seconds * stft.sampling_rate < stft.nperseg:
        problems.append(
            f"--window_seconds {window_seconds:g} is shorter than one STFT segment "
            f"({stft.nperseg} samples = {stft.nperseg / stft.sampling_rate:g} s)"
        )
    if window_stride is not None and window_stride <= 0:
        problems.append(f"--window_stride must be > 0, got {window_stride:g}")
    return problems


@dataclass
class Recordings:
    """One row per recording; members of recording r: member_paths[member_offsets[r]:member_offsets[r + 1]]."""

    files: np.ndarray  # str: first member file (relative path): names the recording in messages and the file split
    instrument: np.ndarray  # str "NET.STA.LOC.HH?"
    family: np.ndarray  # str "HH"
    start: np.ndarray  # float64 POSIX s, first common sample of E, N, Z
    end: np.ndarray  # float64 POSIX s, last common sample
    rate: np.ndarray  # float64 Hz, lowest native sampling rate of its components
    whole_file: np.ndarray  # bool: read as one file, as event files always were (no windows, one 3-component file)
    member_offsets: np.ndarray  # int64 (n + 1)
    member_paths: np.ndarray  # str
    member_start: np.ndarray  # float64 POSIX s: first sample of the member file (so a window reads only its files)
    member_end: np.ndarray  # float64 POSIX s: last sample
    version: np.ndarray  # int64 (n, 2): total size and newest mtime_ns of the members (tells the cache of changes)

    def __len__(self):
        return len(self.files)

    def members(self, r, start=-np.inf, end=np.inf):
        """Relative paths of recording r's files that hold data between start and end (POSIX s)."""
        rows = slice(self.member_offsets[r], self.member_offsets[r + 1])
        overlap = (self.member_start[rows] <= end) & (self.member_end[rows] >= start)
        return self.member_paths[rows][overlap]

    def take(self, rows):
        """The recordings at positions `rows` (bool mask or indices)."""
        rows = np.arange(len(self))[rows]
        counts = self.member_offsets[rows + 1] - self.member_offsets[rows]
        members = np.concatenate(
            [np.arange(self.member_offsets[r], self.member_offsets[r + 1]) for r in rows] + [np.zeros(0, np.int64)]
        )
        per_member = {name: getattr(self, name)[members] for name in ("member_paths", "member_start", "member_end")}
        per_recording = {
            name: getattr(self, name)[rows]
            for name in ("files", "instrument", "family", "start", "end", "rate", "whole_file", "version")
        }
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return Recordings(**per_recording, **per_member, member_offsets=offsets)


def iso(seconds):
    return str(obspy.UTCDateTime(seconds))[:19]


def covered_spans(intervals, tolerance):
    """Union of (start, end) intervals, joining those less than `tolerance` s apart: list of (start, end)."""
    spans = []
    for start, end in sorted(intervals):
        if spans and start - spans[-1][1] <= tolerance:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    return spans


def common_spans(per_component, tolerance):
    """Spans where all three components have data: intersection of each component's covered spans."""
    common = covered_spans(per_component[0], tolerance)
    for intervals in per_component[1:]:
        other = covered_spans(intervals, tolerance)
        common = [[max(a, c), min(b, d)] for a, b in common for c, d in other if max(a, c) < min(b, d)]
    return common


@lru_cache(maxsize=65536)
def choose(seed_ids, families):
    """choose_components, memoised: an archive repeats the same few trace id sets (one per instrument)."""
    try:
        return choose_components(list(seed_ids), families), None
    except UnusableFile as err:
        return None, err


class RecordingFinder:
    """Builds Recordings from a FileIndex; reports skipped files through skip(path, reason, message)."""

    def __init__(self, index, families, skip, excluded, windowed):
        self.index, self.families, self.skip, self.excluded = index, tuple(families), skip, excluded
        self.windowed = windowed
        self.rows = []  # (first file, instrument, family, start, end, rate, whole_file, [file rows])
        self.partial = {}  # (instrument, family) -> [(component, start, end, rate, file row)]

    def trace_spans(self, k, positions):
        rows = self.index.traces(k)
        starts, ends, rates = (self.index.trace_start[rows], self.index.trace_end[rows], self.index.trace_rate[rows])
        return [(starts[i], ends[i], rates[i]) for i in positions]

    def add_file(self, k):
        index = self.index
        if index.error_reason[k]:
            self.skip(k, str(index.error_reason[k]), str(index.error_message[k]))
            return
        seed_ids = index.seed_ids(k)
        chosen, err = choose(seed_ids, self.families)
        if err is not None and err.reason == NOT_REQUESTED:
            self.excluded[err.detail] += 1
        elif err is not None and err.reason == "fewer than 3 components":
            self.add_partial(k, seed_ids)
        elif err is not None:
            self.skip(k, err.reason, str(err))
        else:
            instrument, family, positions = chosen
            spans = [self.trace_spans(k, positions[c]) for c in COMPONENTS]
            rate = min(r for component in spans for _, _, r in component)
            if self.windowed:  # a long gap splits the file: windows on either side of it are used
                for start, end in common_spans([[(s, e) for s, e, _ in c] for c in spans], MAX_GAP_SECONDS + 1 / rate):
                    self.rows.append((k, instrument, family, start, end, rate, False, [k]))
            else:
                start = max(min(s for s, _, _ in component) for component in spans)
                end = min(max(e for _, e, _ in component) for component in spans)
                self.rows.append((k, instrument, family, start, end, rate, True, [k]))

    def add_partial(self, k, seed_ids):
        instruments, positions = group_by_instrument(seed_ids)
        for key, found in instruments.items():
            if key[1] in self.families:
                for component in found:
                    for start, end, rate in self.trace_spans(k, positions[key, component]):
                        self.partial.setdefault(key, []).append((component, start, end, rate, k))

    def group_partial(self):
        """Per-channel files of one instrument -> recordings over the spans where E, N and Z all have data."""
        for (instrument, family), traces in self.partial.items():
            files = sorted({k for *_, k in traces})
            present = {component for component, *_ in traces}
            if len(present) < 3:
                missing = ", ".join(c for c in COMPONENTS if c not in present)
                for k in files:
                    self.skip(
                        k,
                        "fewer than 3 components",
                        f"fewer than 3 components: {instrument}: {len(present)} of 3 components (missing {missing})",
                    )
                continue
            rate = min(r for *_, r, _ in traces)
            per_component = [[(s, e) for c, s, e, _, _ in traces if c == component] for component in COMPONENTS]
            used = set()
            for start, end in common_spans(per_component, MAX_GAP_SECONDS + 1 / rate):
                members = sorted({k for _, s, e, _, k in traces if s <= end and e >= start})
                used.update(members)
                self.rows.append((members[0], instrument, family, start, end, rate, False, members))
            for k in sorted(set(files) - used):
                mine = [(c, s, e) for c, s, e, _, f in traces if f == k]
                here = sorted({c for c, _, _ in mine})
                first, last = min(s for _, s, _ in mine), max(e for _, _, e in mine)
                self.skip(
                    k,
                    "fewer than 3 components",
                    f"fewer than 3 components: {instrument}: only {', '.join(here)} from {iso(first)} to {iso(last)} "
                    "(no file holds the others)",
                )

    def recordings(self):
        index = self.index
        rows = sorted(self.rows, key=lambda row: (index.path[row[0]], row[3]))
        members = [k for row in rows for k in row[7]]
        counts = np.array([len(row[7]) for row in rows], dtype=np.int64)
        return Recordings(
            files=index.path[[row[0] for row in rows]] if rows else np.array([], dtype=str),
            instrument=np.array([row[1] for row in rows], dtype=str),
            family=np.array([row[2] for row in rows], dtype=str),
            start=np.array([row[3] for row in rows], dtype=np.float64),
            end=np.array([row[4] for row in rows], dtype=np.float64),
            rate=np.array([row[5] for row in rows], dtype=np.float64),
            whole_file=np.array([row[6] for row in rows], dtype=bool),
            member_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            member_paths=index.path[members] if members else np.array([], dtype=str),
            member_start=np.array([index.trace_start[index.traces(k)].min() for k in members], dtype=np.float64),
            member_end=np.array([index.trace_end[index.traces(k)].max() for k in members], dtype=np.float64),
            version=np.array(
                [(index.size[row[7]].sum(), index.mtime_ns[row[7]].max()) for row in rows], dtype=np.int64
            ).reshape(-1, 2),
        )


def find_recordings(index, families, skip, excluded, windowed):
    """Recordings of a FileIndex. skip(file row, reason, message) gets every unusable file; excluded counts the
    families of files left out by `families`."""
    finder = RecordingFinder(index, families, skip, excluded, windowed)
    for k in range(len(index)):
        finder.add_file(k)
    finder.group_partial()
    return finder.recordings()


def window_counts(recordings, seconds, stride):
    """Windows of `seconds` every `stride` s that fit in each recording (int64 per recording)."""
    span = recordings.end - recordings.start + 1 / recordings.rate  # the last sample's interval included
    fits = span + 1e-6 >= seconds
    return np.where(fits, np.floor((span - seconds) / stride + 1e-6) + 1, 0).astype(np.int64)


def window_samples(recordings, seconds, stride):
    """(recording of each window int64, start of each window float64 POSIX s), counted from headers alone."""
    counts = window_counts(recordings, seconds, stride)
    recording = np.repeat(np.arange(len(recordings), dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    start = recordings.start[recording] + stride * (np.arange(len(recording)) - first)
    return recording, start


def sample_groups(split_by, recordings, sample_recording, sample_start, sample_seconds):
    """(keys, code of each sample) for a split that keeps each group on one side.

    keys: sorted str array, one per group: the recording's first file (file), "NET.STA" (station), "NET"
    (network), or the UTC day number (time); codes: int64 per sample, an index into keys, or -1 for a sample
    that starts and ends in different days with --split_by time (it overlaps samples of both: used on neither side).
    """
    if split_by == "time":
        first = np.floor(sample_start / TIME_BLOCK_SECONDS).astype(np.int64)
        last = np.floor((sample_start + sample_seconds - 1e-6) / TIME_BLOCK_SECONDS).astype(np.int64)
        days, codes = np.unique(first, return_inverse=True)
        codes = np.where(first == last, codes, -1)
        used = np.unique(codes[codes >= 0])  # days where only crossing samples start hold no group
        return days[used].astype(str), np.searchsorted(used, codes).astype(np.int64) * (codes >= 0) - (codes < 0)
    if split_by == "file":
        per_recording = recordings.files
    else:
        parts = 2 if split_by == "station" else 1
        per_recording = np.array([".".join(name.split(".")[:parts]) for name in recordings.instrument], dtype=str)
    keys, per_recording_codes = np.unique(per_recording, return_inverse=True)
    return keys, per_recording_codes.astype(np.int64)[sample_recording]


def choose_val_groups(keys, codes, val_split, seed):
    """Groups drawn in a seeded random order until about val_split of the samples are in them; a group that
    would overshoot the target by more than the shortfall it fills is passed over. At least one group on
    each side; None with fewer than 2 groups. With one sample per group (the file split of event files) the
    same draw as the per-file split of before --split_by. keys, codes: as sample_groups returns them."""
    counts = np.bincount(codes[codes >= 0], minlength=len(keys))
    if len(keys) < 2:
        return None
    order = np.random.default_rng(seed).permutation(len(keys))
    target = min(max(1, round(counts.sum() * val_split)), counts.sum() - 1)
    chosen, n_val = [], 0
    for g in order.tolist():
        if n_val >= target:
            break
        if n_val + counts[g] - target <= target - n_val:
            chosen.append(g)
            n_val += counts[g]
    chosen = chosen[: len(keys) - 1] or order[:1].tolist()
    return sorted(keys[chosen].tolist())


def in_groups(keys, codes, groups):
    """Bool per sample: its group is one of `groups` (str keys, e.g. a checkpoint's val_groups)."""
    return np.isin(keys, np.array(groups, dtype=str))[codes] & (codes >= 0)
