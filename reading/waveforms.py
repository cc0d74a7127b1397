"""Reading miniSEED files and choosing one instrument's E, N, Z components.

path -> obspy Stream -> (3, n_samples) float64 waveform at the target sampling rate, in E, N, Z
order. A file that cannot give a clean 3-component waveform raises `UnusableFile` with a short
reason (counted by the scripts) and a detail that names what is wrong.
"""

import math
import os
import warnings
from collections import defaultdict
from functools import partial
from importlib.metadata import entry_points

import numpy as np
import obspy

from reading.transform import DEAD_RELATIVE_LEVEL

COMPONENTS = ("E", "N", "Z")  # channel 0, 1, 2 of every spectrogram
# Unrotated horizontals: 1 is taken as N, 2 as E (the SEED convention for 1/2 orientation codes).
COMPONENT_CODES = {"E": "E", "N": "N", "Z": "Z", "1": "N", "2": "E"}
DEFAULT_FAMILIES = ("HH", "HN", "EH", "BH")
MINISEED_EXTENSIONS = (".mseed", ".miniseed", ".ms", ".msd")
NOT_REQUESTED = "channel family not requested"  # a filter, not a defect: counted apart from skips
FILE_GONE = "file missing or unreadable"  # removed, moved or locked after the index listed it
NO_SIGNAL = "no signal"  # every component constant: a recording of zeros
EDGE_SAMPLES = 1  # native samples a window may lack at each end by rounding alone (cut_window)
MAX_GAP_SECONDS = 1.0  # gaps up to this long inside one component are interpolated over
# A window with a component constant this long (a dead channel, zeros filled in by a datalogger) is skipped.
DEAD_STRETCH_SECONDS = 10.0
# A file's ends where a component is constant this long (padding to a fixed length, not a recording) are cut off.
DEAD_END_SECONDS = 1.0


class UnusableFile(Exception):
    """A file that cannot give a 3-component waveform. `reason` is a short category for counts."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def miniseed_reader():
    """The reader obspy registers for format "MSEED", looked up once.

    obspy.read(path, format="MSEED") calls this same function but looks the plugin up again on
    every call, which costs more than reading a 3-trace event file (0.8 of 1.1 ms here).
    """
    found = [ep for ep in entry_points(group="obspy.plugin.waveform.MSEED") if ep.name == "readFormat"]
    return found[0].load() if found else partial(obspy.read, format="MSEED")


read_miniseed = miniseed_reader()


def read_stream(path, headonly=False, starttime=None, endtime=None):
    """Read a file as miniSEED; a read error or a libmseed warning (damaged record) is UnusableFile.

    starttime, endtime (UTCDateTime): decode only the records that overlap them (libmseed's selection), so a
    window of a day file costs the window's records, not the day's; an empty selection is then no error.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            stream = read_miniseed(path, headonly=headonly, starttime=starttime, endtime=endtime)
        except (FileNotFoundError, PermissionError) as err:  # e.g. removed or moved while a run goes on
            raise UnusableFile(FILE_GONE, f"{type(err).__name__}: {err.strerror}") from None
        except Exception as err:  # obspy raises many types for broken input
            reason = "empty file" if os.path.getsize(path) == 0 else "not readable as miniSEED"
            raise UnusableFile(reason, f"{type(err).__name__}: {str(err).splitlines()[0]}") from None
    if caught:
        raise UnusableFile("damaged or truncated miniSEED", str(caught[0].message).splitlines()[0])
    if len(stream) == 0 and starttime is None:
        raise UnusableFile("no traces")
    return stream


def group_by_instrument(seed_ids):
    """Trace ids ("NET.STA.LOC.CHA") -> (instruments, positions).

    instruments: {(instrument id, family): {component: {codes}}}; positions: {(key, component): [trace positions]}.
    """
    instruments = defaultdict(lambda: defaultdict(set))
    positions = defaultdict(list)
    for position, seed_id in enumerate(seed_ids):
        network, station, location, channel = seed_id.split(".")
        family, code = channel[:2], channel[2:]
        key = (f"{network}.{station}.{location}.{family}?", family)
        if code in COMPONENT_CODES:
            instruments[key][COMPONENT_CODES[code]].add(code)
            positions[key, COMPONENT_CODES[code]].append(position)
    return instruments, positions


def choose_components(seed_ids, families):
    """Pick one instrument's E, N, Z traces from a file's trace ids ("NET.STA.LOC.CHA").

    Returns (instrument id "NET.STA.LOC.HH?", family, {component: [trace positions]}).
    Raises UnusableFile when no requested family has all three components, or when the
    choice is ambiguous (two complete instruments, or both E/N and 1/2 for one component).
    """
    instruments, positions = group_by_instrument(seed_ids)
    wanted = {key: found for key, found in instruments.items() if key[1] in families}
    if not wanted:
        present = sorted({family for _, family in instruments}) or ["none with E/N/Z/1/2 codes"]
        raise UnusableFile(NOT_REQUESTED, ", ".join(present))
    for (instrument, _), found in wanted.items():
        doubled = [component for component, codes in found.items() if len(codes) > 1]
        if doubled:
            codes = "/".join(sorted(found[doubled[0]]))
            raise UnusableFile("unresolvable mixture", f"{instrument}: both {codes} for {doubled[0]}")
    complete = [key for key, found in wanted.items() if len(found) == 3]
    if len(complete) > 1:
        names = ", ".join(key[0] for key in complete)
        raise UnusableFile("unresolvable mixture", f"several 3-component instruments: {names}")
    if not complete:
        instrument, found = max(wanted.items(), key=lambda item: len(item[1]))
        missing = ", ".join(c for c in COMPONENTS if c not in found)
        raise UnusableFile(
            "fewer than 3 components", f"{instrument[0]}: {len(found)} of 3 components (missing {missing})"
        )
    key = complete[0]
    return key[0], key[1], {c: positions[key, c] for c in COMPONENTS}


def merge_component(traces, name, sampling_rate):
    """Traces of one component -> one float64 trace at `sampling_rate`; small gaps interpolated."""
    for trace in traces:  # traces of a stream read for this call alone: changed in place
        if trace.data.dtype.kind not in "iu" and not np.all(np.isfinite(trace.data)):  # integers are always finite
            raise UnusableFile("NaN or infinite samples", name)
        if trace.stats.sampling_rate <= 0:
            raise UnusableFile("invalid sampling rate", f"{name}: {trace.stats.sampling_rate} Hz")
        trace.data = trace.data.astype(np.float64)
    if len(traces) > 1:  # the common case, one trace per component, needs no merge
        stream = obspy.Stream(traces)
        gaps = [gap[6] for gap in stream.get_gaps()]
        if gaps and max(gaps) > MAX_GAP_SECONDS:
            raise UnusableFile("gap too long", f"{name}: {max(gaps):.2f} s gap (limit {MAX_GAP_SECONDS} s)")
        try:
            stream.merge(method=1, fill_value="interpolate")
        except Exception as err:  # e.g. differing sampling rates within one channel
            raise UnusableFile("unmergeable traces", f"{name}: {err}") from None
        traces = stream.traces
    trace = traces[0]
    if not same_rate(trace.stats.sampling_rate, sampling_rate):
        trace.resample(sampling_rate)  # FFT-based; 40 Hz BH and 200 Hz HH become 100 Hz
    return trace


def same_rate(rate, target):
    """Whether a sampling rate is taken as the target one (no resampling): np.isclose's tolerance, 1e-5 relative, at a
    30th of its cost per call on scalars."""
    return math.isclose(rate, target, rel_tol=1e-5, abs_tol=1e-8)


def span_ns(trace):
    """(first, last) sample times of a trace in integer ns: obspy's endtime builds a UTCDateTime on every access."""
    first = trace.stats.starttime.ns
    return first, first + round((trace.stats.npts - 1) * 1e9 / trace.stats.sampling_rate)


def read_waveform(path, families, stft):
    """File -> ((3, n_samples) float64 waveform in E, N, Z order, metadata dict).

    `stft` (transform.STFTConfig) gives the sampling rate to resample to and the shortest usable length.
    """
    return waveform_of_stream(read_stream(path), families, stft)


def waveform_of_stream(stream, families, stft):
    """obspy Stream (of a file, or of a SeisBench trace) -> ((3, n_samples) float64 waveform in E, N, Z order,
    metadata dict): one instrument's components chosen, merged, resampled, trimmed and checked (UnusableFile)."""
    instrument, family, picks = choose_components([trace.id for trace in stream], families)
    native_rate = min(stream[i].stats.sampling_rate for positions in picks.values() for i in positions)
    traces = [
        merge_component([stream[i] for i in picks[c]], instrument[:-1] + c, stft.sampling_rate) for c in COMPONENTS
    ]
    spans = [span_ns(trace) for trace in traces]
    start, end = max(first for first, _ in spans), min(last for _, last in spans)
    if end <= start:
        raise UnusableFile("components do not overlap", instrument)
    for trace, (first, last) in zip(traces, spans):
        if first != start or last != end:  # trim is slow even when it cuts nothing
            trace.trim(obspy.UTCDateTime(ns=start), obspy.UTCDateTime(ns=end))
    n_samples = min(trace.stats.npts for trace in traces)
    waveform = np.stack([trace.data[:n_samples] for trace in traces])
    first, stop = alive_span(waveform, round(DEAD_END_SECONDS * stft.sampling_rate))
    if stop - first < stft.nperseg:
        cut = f" ({n_samples - stop + first} constant at the ends cut off)" if stop - first < n_samples else ""
        raise UnusableFile(
            "too short for one STFT window", f"{stop - first} common samples{cut} < nperseg={stft.nperseg}"
        )
    # One dead component is kept (the transform makes it zeros); three leave nothing to learn from.
    if np.all(np.ptp(waveform, axis=1) <= DEAD_RELATIVE_LEVEL * np.abs(waveform).max(axis=1)):
        raise UnusableFile(NO_SIGNAL, f"{instrument}: every component constant (all zeros or one held value)")
    meta = {"trace_id": instrument, "family": family}
    meta["starttime"] = str(obspy.UTCDateTime(ns=start) + first / stft.sampling_rate)
    meta["native_rate"] = float(native_rate)  # Hz, before resampling: transform.spectrogram's band
    return waveform[:, first:stop], meta


def alive_span(waveform, min_run):
    """(first, end) samples of a (3, n) waveform without the constant stretches of `min_run` samples or more at its
    ends: zeros or a held value that pad an event file to a fixed length. Left in, log10(|STFT| + eps) of such a
    stretch sets the minimum of the min-max scaling, and the recording itself is squeezed into the top of [0, 1].
    A component constant throughout (dead) cuts nothing: the transform makes it zeros."""
    first, end = 0, waveform.shape[1]
    for component in waveform:
        if np.any(component[:min_run] != component[0]) and np.any(component[-min_run:] != component[-1]):
            continue  # the common case: neither end holds one value for min_run samples, nothing to cut
        changes = np.flatnonzero(np.diff(component))  # sample i differs from sample i + 1
        if len(changes) == 0:
            continue
        lead, trail = changes[0] + 1, len(component) - 1 - changes[-1]  # samples in the constant run at each end
        first = max(first, lead if lead >= min_run else 0)
        end = min(end, len(component) - trail if trail >= min_run else len(component))
    return int(first), int(end)


def longest_run(flags):
    """(start index, length) of the longest run of True in a 1-d bool array; (0, 0) where there is none."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts, ends = (edges == 1).nonzero()[0], (edges == -1).nonzero()[0]
    if not len(starts):
        return 0, 0
    longest = int(np.argmax(ends - starts))
    return int(starts[longest]), int(ends[longest] - starts[longest])


def merged_span(traces, name):
    """Traces of one component -> one float64 trace; gaps left masked (each window judges its own)."""
    stream = obspy.Stream([trace.copy() for trace in traces])
    for trace in stream:
        if trace.stats.sampling_rate <= 0:
            raise UnusableFile("invalid sampling rate", f"{name}: {trace.stats.sampling_rate} Hz")
        trace.data = trace.data.astype(np.float64)
    if len(stream) > 1:
        try:
            stream.merge(method=1, fill_value=None)  # overlaps resolved, gaps masked
        except Exception as err:  # e.g. differing sampling rates within one channel
            raise UnusableFile("unmergeable traces", f"{name}: {err}") from None
    return stream[0]


def cut_window(trace, start, seconds, name, sampling_rate):
    """`seconds` s of a merged trace from `start` (POSIX s) -> exactly round(seconds * sampling_rate) float64 samples.

    Gaps up to MAX_GAP_SECONDS are interpolated; a longer gap, missing data or NaN samples raise UnusableFile. Where
    components start off each other's sample grid (one file per channel), rounding alone may leave the window up to
    EDGE_SAMPLES native samples short at an end, and the resampled count may differ from the target by a sample or
    two: the ends are then repeated or trimmed, never the window refused.
    """
    rate, n_samples = trace.stats.sampling_rate, int(round(seconds * sampling_rate))
    first = int(round((start - trace.stats.starttime.timestamp) * rate))
    last = first + int(round(seconds * rate))  # one past the window's last native sample
    if first < -EDGE_SAMPLES or last > trace.stats.npts + EDGE_SAMPLES:
        span = f"data {trace.stats.starttime} to {trace.stats.endtime}"
        window = f"window {obspy.UTCDateTime(start)} + {seconds:g} s"
        raise UnusableFile("no data over the window", f"{name}: {span}, {window}")
    data = trace.data[max(first, 0) : min(last, trace.stats.npts)]
    missing = np.ma.getmaskarray(data)
    data = np.ma.getdata(data)
    if missing.any():
        gap_start, gap_length = longest_run(missing)
        if gap_length > MAX_GAP_SECONDS * rate:
            at = obspy.UTCDateTime(trace.stats.starttime.timestamp + (max(first, 0) + gap_start) / rate)
            raise UnusableFile(
                "gap too long", f"{name}: {gap_length / rate:.2f} s gap from {at} (limit {MAX_GAP_SECONDS} s)"
            )
        positions = np.arange(len(data))
        data = np.interp(positions, positions[~missing], data[~missing])
    if not np.all(np.isfinite(data)):
        raise UnusableFile("NaN or infinite samples", name)
    if not same_rate(rate, sampling_rate):
        data = obspy.Trace(data.copy(), header={"sampling_rate": rate}).resample(sampling_rate).data
    return fit_length(data, n_samples, int(round((max(first, 0) - first) * sampling_rate / rate)))


def fit_length(data, n_samples, lacking_at_start):
    """`data` repeated at its ends (at its start for the `lacking_at_start` output samples the window began before
    the data) or trimmed at its end to exactly n_samples; what is added is at most EDGE_SAMPLES native samples' worth
    plus the resampling's rounding, as cut_window allows."""
    short = n_samples - len(data)
    if short <= 0:
        return data[:n_samples]
    before = min(short, lacking_at_start)
    return np.pad(data, (before, short - before), mode="edge")


def read_recording(paths, instrument, start, end, stft):
    """A whole recording of `instrument` from the files `paths` that hold one or two of its components each (a tree of
    per-channel files) -> (3, n) float64 waveform in E, N, Z order, or the UnusableFile that keeps it out.

    Read as waveform_of_stream reads the same traces written to one 3-component file (each whole component resampled,
    then cut to the common span), so that both layouts of a recording give the same spectrogram, not two cuts that
    differ near the noise floor. Traces wholly outside start..end (POSIX s, the recording's common span from the
    headers) by more than MAX_GAP_SECONDS are left out: across such a gap they belong to the file's other recording.
    """
    prefix = instrument[:-1]  # "NET.STA.LOC.HH"
    try:
        stream = obspy.Stream()
        for path in paths:
            stream += read_stream(path)
        low, high = (start - MAX_GAP_SECONDS) * 1e9, (end + MAX_GAP_SECONDS) * 1e9  # a bridged gap's traces are kept
        picked = [t for t in stream if t.id.startswith(prefix) and span_ns(t)[0] <= high and span_ns(t)[1] >= low]
        return waveform_of_stream(obspy.Stream(picked), (prefix.split(".")[3],), stft)[0]
    except UnusableFile as err:
        return err


def read_windows(paths, instrument, starts, seconds, stft):
    """Windows of one instrument's E, N, Z: `seconds` s from each of `starts` (POSIX s), from the files `paths`.

    Each file is decoded once, for the records that the windows need, whatever the number of windows;
    windows may cross from one file to the next (midnight in an SDS archive). Returns one entry per
    start: a (3, round(seconds * sampling_rate)) float64 waveform in E, N, Z order, or the UnusableFile
    that keeps that window out (a gap, NaN samples, a dead stretch); the other windows are still given.
    """
    try:
        stream = obspy.Stream()
        selection = {
            "starttime": obspy.UTCDateTime(min(starts) - 1),
            "endtime": obspy.UTCDateTime(max(starts) + seconds + 1),
        }
        for path in paths:
            stream += read_stream(path, **selection)
    except UnusableFile as err:
        return [err] * len(starts)
    return windows_of_stream(stream, instrument, starts, seconds, stft)


def windows_of_stream(stream, instrument, starts, seconds, stft):
    """Windows of `instrument`'s E, N, Z in an obspy Stream (of files, or of a SeisBench trace), as read_windows."""
    try:
        prefix = instrument[:-1]  # "NET.STA.LOC.HH"
        picked = [trace for trace in stream if trace.id.startswith(prefix)]
        _, _, positions = choose_components([trace.id for trace in picked], (prefix.split(".")[3],))
        traces = [merged_span([picked[i] for i in positions[c]], prefix + c) for c in COMPONENTS]
    except UnusableFile as err:
        return [err] * len(starts)
    return [window_of(traces, start, seconds, prefix, stft) for start in starts]


def window_of(traces, start, seconds, prefix, stft):
    """(3, n) waveform of one window of merged E, N, Z traces, or the UnusableFile that keeps it out."""
    try:
        waveform = np.stack(
            [cut_window(trace, start, seconds, prefix + c, stft.sampling_rate) for trace, c in zip(traces, COMPONENTS)]
        )
    except UnusableFile as err:
        return err
    limit = min(DEAD_STRETCH_SECONDS * stft.sampling_rate, waveform.shape[1]) - 1  # equal neighbours in a row
    dead = [c for c, component in zip(COMPONENTS, waveform) if longest_run(np.diff(component) == 0)[1] >= limit]
    if dead:
        return UnusableFile(
            "dead stretch", f"{prefix}{'/'.join(dead)}: constant for {DEAD_STRETCH_SECONDS:g} s or more in the window"
        )
    return waveform
