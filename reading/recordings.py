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

from reading.waveforms import (
    COMPONENTS,
    MAX_GAP_SECONDS,
    NOT_REQUESTED,
    UnusableFile,
    choose_components,
    group_by_instrument,
)

# Without windows, a recording longer than this is skipped (never one giant sample that pads a batch to a day):
# 600 s is 6.7 x the shipped 90 s event files, so event archives are untouched and a day file is caught.
MAX_RECORDING_SECONDS = 600.0
TIME_BLOCK_SECONDS = 86400.0  # --split_by time: whole UTC days go to one side
SPLITS = ("file", "station", "network", "time", "dataset")  # dataset: a SeisBench dataset's own split column
DATASET_SPLIT = ("dev", "train")  # the groups of --split_by dataset: its dev traces validate, never drawn at random


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

    def member_rows(self, rows):
        """Positions in the member arrays of the members of recordings `rows` (int array), in order."""
        counts = self.member_offsets[rows + 1] - self.member_offsets[rows]
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(self.member_offsets[rows], counts) + within

    def take(self, rows):
        """The recordings at positions `rows` (bool mask or indices)."""
        rows = np.arange(len(self))[rows]
        counts = self.member_offsets[rows + 1] - self.member_offsets[rows]
        members = self.member_rows(rows)
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
        self.rows = []  # (first file, instrument, family, start, end, rate, whole_file, [file rows]), one by one
        self.chunks = []  # (files, instrument, family, start, end, rate, whole_file): one-file recordings as arrays
        self.partial = {}  # (instrument, family) -> [(component, start, end, rate, file row)]

    def trace_spans(self, k, positions):
        rows = self.index.traces(k)
        starts, ends, rates = (self.index.trace_start[rows], self.index.trace_end[rows], self.index.trace_rate[rows])
        return [(starts[i], ends[i], rates[i]) for i in positions]

    def add_files(self):
        """Every file of the index, grouped by its sequence of trace ids: one choice of components per group.

        Files of one 3-component instrument with one trace per component (event files) are handled as arrays;
        the others (per-channel files, gappy files) one by one.
        """
        index = self.index
        for k in np.flatnonzero(index.error_reason != ""):
            self.skip(k, str(index.error_reason[k]), str(index.error_message[k]))
        names, codes = index.trace_names, index.trace_code
        readable = index.error_reason == ""
        for n in np.unique(index.n_traces[readable]):
            files = np.flatnonzero(readable & (index.n_traces == n))
            rows = index.first_trace[files][:, None] + np.arange(n)  # (files, traces) rows of the trace table
            ids = codes[rows].astype(np.int64)
            if float(len(names)) ** n < 2**62:  # one int64 per file: a far faster unique than rows of n
                _, first, which = np.unique(ids @ len(names) ** np.arange(n), return_index=True, return_inverse=True)
                signatures = ids[first]
            else:
                signatures, which = np.unique(ids, axis=0, return_inverse=True)
            order = np.argsort(which.ravel(), kind="stable")
            bounds = np.cumsum(np.bincount(which.ravel(), minlength=len(signatures)))
            for signature, group in zip(signatures, np.split(order, bounds[:-1])):
                self.add_group(tuple(names[signature].tolist()), files[group], rows[group])

    def add_group(self, seed_ids, files, rows):
        """Files with the same trace ids: files (m,) index rows; rows (m, n_traces) their trace-table rows."""
        chosen, err = choose(seed_ids, self.families)
        if err is not None and err.reason == NOT_REQUESTED:
            self.excluded[err.detail] += len(files)
        elif err is not None and err.reason == "fewer than 3 components":
            for k in files:
                self.add_partial(k, seed_ids)
        elif err is not None:
            for k in files:
                self.skip(k, err.reason, str(err))
        elif any(len(positions) > 1 for positions in chosen[2].values()):
            for k in files:
                self.add_split_file(k, *chosen)
        else:
            instrument, family, positions = chosen
            picked = rows[:, [positions[c][0] for c in COMPONENTS]]  # (m, 3) rows of E, N, Z
            start = self.index.trace_start[picked].max(axis=1)
            end = self.index.trace_end[picked].min(axis=1)
            if self.windowed:  # windows need common data; a whole-file read reports the files that lack it
                for k in files[end <= start]:
                    self.skip(k, "components do not overlap", f"components do not overlap: {instrument}")
                files, start, end, picked = (
                    files[end > start],
                    start[end > start],
                    end[end > start],
                    picked[end > start],
                )
            rate = self.index.trace_rate[picked].min(axis=1)
            self.chunks.append((files, instrument, family, start, end, rate, not self.windowed))

    def add_split_file(self, k, instrument, family, positions):
        """A file with several traces for some component (gaps): its spans of common data."""
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
        """All recordings found, ordered by first file and start."""
        index = self.index
        chunks = self.chunks + [
            (np.array([row[0]]), *row[1:7]) for row in self.rows
        ]  # the one-by-one rows, as chunks of one
        sizes = [len(chunk[0]) for chunk in chunks]
        first = np.concatenate([chunk[0] for chunk in chunks] + [np.zeros(0, np.int64)]).astype(np.int64)
        per_chunk = lambda position, dtype: np.concatenate(  # noqa: E731
            [np.broadcast_to(np.asarray(chunk[position], dtype=dtype), size) for chunk, size in zip(chunks, sizes)]
            + [np.zeros(0, dtype)]
        )
        start, end = per_chunk(3, np.float64), per_chunk(4, np.float64)
        order = np.lexsort((start, first))
        # Members in the order of `chunks`: one file each for the array chunks, a list each for the one-by-one rows.
        one_by_one = np.array([len(row[7]) for row in self.rows], dtype=np.int64)
        counts = np.concatenate([np.ones(sum(sizes[: len(self.chunks)]), np.int64), one_by_one])
        flat = np.concatenate(
            [first[: len(counts) - len(self.rows)], np.array([k for row in self.rows for k in row[7]], dtype=np.int64)]
        )
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        within = np.arange(counts[order].sum()) - np.repeat(np.cumsum(counts[order]) - counts[order], counts[order])
        flat = flat.astype(np.int64)[np.repeat(offsets[order], counts[order]) + within]
        counts = counts[order]
        file_start, file_end = file_spans(index)
        by_recording = np.repeat(np.arange(len(counts)), counts)
        return Recordings(
            files=index.path[first[order]],
            instrument=per_chunk(1, str)[order],
            family=per_chunk(2, str)[order],
            start=start[order],
            end=end[order],
            rate=per_chunk(5, np.float64)[order],
            whole_file=per_chunk(6, bool)[order],
            member_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            member_paths=index.path[flat],
            member_start=file_start[flat],
            member_end=file_end[flat],
            version=np.stack(
                [
                    np.bincount(by_recording, index.size[flat], minlength=len(counts)).astype(np.int64),
                    np.maximum.reduceat(index.mtime_ns[flat], np.cumsum(counts) - counts)
                    if len(flat)
                    else np.zeros(0, np.int64),
                ],
                axis=1,
            ),
        )


def file_spans(index):
    """(first sample, last sample) of each file over all its traces, POSIX s; NaN for files without traces."""
    start, end = np.full(len(index), np.nan), np.full(len(index), np.nan)
    has = index.n_traces > 0
    if has.any():
        start[has] = np.minimum.reduceat(index.trace_start, index.first_trace[has])
        end[has] = np.maximum.reduceat(index.trace_end, index.first_trace[has])
    return start, end


def find_recordings(index, families, skip, excluded, windowed):
    """Recordings of a FileIndex. skip(file row, reason, message) gets every unusable file; excluded counts the
    families of files left out by `families`."""
    finder = RecordingFinder(index, families, skip, excluded, windowed)
    finder.add_files()
    finder.group_partial()
    return finder.recordings()


def window_counts(recordings, seconds, stride):
    """Windows of `seconds` every `stride` s that fit in each recording (int64 per recording)."""
    span = recordings.end - recordings.start + 1 / recordings.rate  # the last sample's interval included
    fits = span + 1e-6 >= seconds
    return np.where(fits, np.floor((span - seconds) / stride + 1e-6) + 1, 0).astype(np.int64)


def window_samples(recordings, seconds, stride):
    """(recording of each window int32, start of each window float64 POSIX s), counted from headers alone."""
    counts = window_counts(recordings, seconds, stride)
    dtype = np.int32 if len(recordings) < 2**31 else np.int64  # 4 bytes a window, not 8
    recording = np.repeat(np.arange(len(recordings), dtype=dtype), counts)
    position = np.arange(len(recording)) - np.repeat(
        np.cumsum(counts) - counts, counts
    )  # window number in its recording
    start = np.repeat(recordings.start, counts) + stride * position
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
        instruments, which = np.unique(recordings.instrument, return_inverse=True)
        per_recording = np.array([".".join(name.split(".")[:parts]) for name in instruments], dtype=str)[which]
    keys, per_recording_codes = np.unique(per_recording, return_inverse=True)
    return keys, per_recording_codes.astype(np.int32)[sample_recording]


def choose_val_groups(keys, codes, val_split, seed):
    """Groups drawn in a seeded random order until about val_split of the samples are in them; a group that
    would overshoot the target by more than the shortfall it fills is passed over. At least one group on
    each side; None with fewer than 2 groups. With one sample per group (the file split of event files) the
    same draw as the per-file split of before --split_by. keys, codes: as sample_groups returns them.
    The groups of --split_by dataset (DATASET_SPLIT) are not drawn: "dev" validates (None when either is empty)."""
    counts = np.bincount(codes[codes >= 0], minlength=len(keys))
    if len(keys) < 2 or (tuple(keys.tolist()) == DATASET_SPLIT and 0 in counts):
        return None
    if tuple(keys.tolist()) == DATASET_SPLIT:
        return ["dev"]
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
