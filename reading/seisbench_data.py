"""SeisBench datasets as input: a folder of metadata.csv + waveforms.hdf5 (or the chunked layout), read through
seisbench's own `seisbench.data.WaveformDataset` on the local path (nothing is downloaded).

metadata (one row per trace) -> Recordings (one per usable trace, named by its trace_name) -> get_waveforms (the
traces of a batch in one call, native sampling rate) -> obspy Stream with channel codes from trace_channel and the
component_order -> waveforms.waveform_of_stream / windows_of_stream: the same component choice (1/2 as N/E),
resampling to 100 Hz, trimming and checks as a miniSEED file, so a trace of NaN, of zeros, too short or of
2 components is skipped with its trace name and the same reason. Also here: `write_dataset`, which writes the
shipped recordings as a SeisBench dataset with seisbench's WaveformDataWriter (tests, bench.py --seisbench).
"""

import os

import numpy as np
import obspy
import pandas as pd

from reading.recordings import Recordings
from reading.waveforms import (
    DEFAULT_FAMILIES,
    NOT_REQUESTED,
    UnusableFile,
    choose_components,
    read_stream,
    waveform_of_stream,
    windows_of_stream,
)

# Channel family of traces without a trace_channel: kept whatever --channels asks for (their family is unknown).
UNKNOWN_FAMILY = "??"
# --split_by dataset: the metadata `split` column -> group; "dev" validates, "test" (and any other) is used by neither.
DATASET_SPLIT_GROUPS = ("dev", "train")
PLACEHOLDER = "N.S.L"  # stands for a trace's NET.STA.LOC while one choice of components is made for many traces


def is_seisbench_dataset(path):
    """A folder holding metadata.csv and waveforms.hdf5, or chunks metadata<chunk>.csv beside waveforms<chunk>.hdf5."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    metadata = {name[8:-4] for name in names if name.startswith("metadata") and name.endswith(".csv")}
    waveforms = {name[9:-5] for name in names if name.startswith("waveforms") and name.endswith(".hdf5")}
    return bool(metadata & waveforms)


def open_dataset(path):
    """seisbench.data.WaveformDataset of a local folder: (trace, component, sample) arrays in the dataset's own
    component letters, native sampling rate, missing components left out (not zero-filled as SeisBench's default)."""
    import seisbench.data  # imported here: 2-5 s that a miniSEED run does not pay

    dataset = seisbench.data.WaveformDataset(
        path, name=dataset_name(path), component_order="ZNE", dimension_order="NCW", missing_components="ignore"
    )
    letters = str(dataset.data_format.get("component_order", ""))
    for order in dataset.metadata["trace_component_order"].dropna().unique():
        letters += "".join(c for c in str(order) if c not in letters)
    dataset.component_order = letters  # every letter any trace holds ("ZNE", "Z12", ...), each trace's own in order
    return dataset


def dataset_name(path):
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


def text_column(metadata, name, default=""):
    """A metadata column as a numpy str array ("" for missing values), or `default` throughout without the column."""
    if name not in metadata.columns:
        return np.full(len(metadata), default, dtype=object).astype(str)
    values = metadata[name]
    if pd.api.types.is_float_dtype(values) and np.all(values.dropna() % 1 == 0):  # codes read as numbers: 12, not 12.0
        values = values.astype("Int64")
    return values.astype(object).where(values.notna(), default).to_numpy(dtype=object).astype(str)


def start_times(metadata):
    """trace_start_time as POSIX s (float64); 0 (1970) where it is missing or unreadable."""
    if "trace_start_time" not in metadata.columns:
        return np.zeros(len(metadata))
    times = pd.to_datetime(metadata["trace_start_time"], utc=True, errors="coerce", format="ISO8601")
    seconds = times.to_numpy(dtype="datetime64[ns]").astype(np.int64) / 1e9
    return np.where(times.isna().to_numpy(), 0.0, seconds)


def trace_lengths(dataset, metadata):
    """Samples per trace: the trace_npts column, else the length in a bucketed trace_name ("bucket0$3,:3,:9001",
    as WaveformDataWriter names them), else the shape of the trace's array in the HDF5 file (slow: one lookup each)."""
    if "trace_npts" in metadata.columns and metadata["trace_npts"].notna().all():
        return metadata["trace_npts"].to_numpy(dtype=np.int64)
    axis = 1 + dataset.data_format["dimension_order"].index("W")  # location: trace in block, then its dimensions
    lengths = np.array([length_in_name(name, axis) for name in metadata["trace_name"].astype(str).tolist()])
    missing = np.flatnonzero(np.isnan(lengths))
    if len(missing):
        import h5py  # a dependency of seisbench

        chunks, _, paths = dataset._chunks_with_paths()  # the waveform file of each chunk, as seisbench finds them
        files = {chunk: h5py.File(path, "r") for chunk, path in zip(chunks, paths)}
        try:
            names, chunk_of = metadata["trace_name"].to_numpy(), metadata["trace_chunk"].to_numpy()
            for row in missing:
                lengths[row] = files[chunk_of[row]]["data"][str(names[row])].shape[axis - 1]
        finally:
            for f in files.values():
                f.close()
    return lengths.astype(np.int64)


def length_in_name(trace_name, axis):
    """Samples of a bucketed trace from its name: "bucket0$3,:3,:9001", axis 2 -> 9001.0; NaN for other names."""
    parts = trace_name.partition("$")[2].split(",")
    found = parts[axis] if len(parts) > axis else ""
    return float(found[1:]) if found[:1] == ":" and found[1:].isdigit() else np.nan


class SeisBenchTraces:
    """An open SeisBench dataset: numpy columns of its traces (one row per metadata row) and their waveforms as obspy
    Streams. A trace is named by its `key`: the trace_name, "<chunk>/<trace_name>" in a chunked dataset."""

    def __init__(self, path):
        self.path, self.name = path, dataset_name(path)
        self.dataset = open_dataset(path)
        metadata = self.dataset.metadata
        self.chunk = text_column(metadata, "trace_chunk")
        self.trace_name = text_column(metadata, "trace_name")
        chunked = len(np.unique(self.chunk)) > 1 or self.chunk[0:1].tolist() not in ([], [""])
        self.key = np.char.add(np.char.add(self.chunk, "/"), self.trace_name) if chunked else self.trace_name
        self.network = text_column(metadata, "station_network_code")
        self.station = text_column(metadata, "station_code")
        self.location = text_column(metadata, "station_location_code")
        family = pd.Series(text_column(metadata, "trace_channel")).str[:2]
        self.family = family.where(family.str.len() == 2, UNKNOWN_FAMILY).to_numpy(dtype=str)
        order = self.dataset.component_order
        own = text_column(metadata, "trace_component_order", str(self.dataset.data_format.get("component_order", "")))
        orders, which = np.unique(own, return_inverse=True)
        self.components = np.array(["".join(c for c in order if c in letters) for letters in orders], dtype=str)[which]
        self.rate = metadata["trace_sampling_rate_hz"].to_numpy(dtype=np.float64)
        self.start = start_times(metadata)
        self.npts = trace_lengths(self.dataset, metadata)
        self.sorted_rows = np.argsort(self.key, kind="stable")
        self.sorted_keys = self.key[self.sorted_rows]
        self.waiting = {}  # row -> Stream read ahead for the batch being assembled (prefetch)

    def __len__(self):
        return len(self.key)

    def rows_of(self, keys):
        """Metadata rows of trace keys (an array)."""
        return self.sorted_rows[np.searchsorted(self.sorted_keys, np.asarray(keys, dtype=str))]

    def instruments(self, rows):
        """ "NET.STA.LOC.FF?" of rows."""
        instrument = self.network[rows]
        for part in (self.station[rows], self.location[rows], self.family[rows]):
            instrument = np.char.add(np.char.add(instrument, "."), part)
        return np.char.add(instrument, "?")

    def names(self, key):
        """What joins a catalogue row to the dataset's metadata: trace_name, trace_chunk, dataset."""
        row = self.rows_of([key])[0]
        return {"trace_name": str(self.trace_name[row]), "trace_chunk": str(self.chunk[row]), "dataset": self.name}

    def column(self, keys, name):
        """Values of metadata column `name` for trace keys (a pandas Series in the order of keys)."""
        return self.dataset.metadata[name].iloc[self.rows_of(keys)].reset_index(drop=True)

    def labels(self, keys, name):
        """(values, present) of metadata column `name` for trace keys: floats for a numeric column, else str; present
        is False where the value is missing (NaN)."""
        values = self.column(keys, name)
        present = values.notna().to_numpy()
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            return values.astype(float).tolist(), present
        return values.astype(str).tolist(), present

    def recordings(self, families, skip, excluded, windowed):
        """Recordings of the usable traces, in metadata order: one per trace, named by its key. skip(row, reason,
        message) gets the traces unusable by their metadata; excluded counts the families left out by `families`."""
        usable = self.rate > 0
        for row in np.flatnonzero(~usable):
            instrument = self.instruments([row])[0]
            skip(row, "invalid sampling rate", f"invalid sampling rate: {instrument}: {self.rate[row]} Hz")
        first = np.zeros(len(self), dtype=bool)
        first[np.unique(self.key, return_index=True)[1]] = True
        for row in np.flatnonzero(~first):
            skip(row, "duplicate trace_name", f"duplicate trace_name: {self.key[row]} names an earlier trace too")
        usable &= first
        combinations = pd.Series(np.char.add(np.char.add(self.family, "|"), self.components))
        for combination, rows in combinations[usable].groupby(combinations[usable]).groups.items():
            family, letters = combination.split("|")
            seed_ids = [f"{PLACEHOLDER}.{family}{c}" for c in letters]
            try:
                choose_components(seed_ids, (*families, UNKNOWN_FAMILY))
            except UnusableFile as err:
                usable[rows] = False
                if err.reason == NOT_REQUESTED:
                    excluded[err.detail] += len(rows)
                    continue
                for row, instrument in zip(rows, self.instruments(rows)):
                    skip(row, err.reason, str(err).replace(f"{PLACEHOLDER}.{family}?", instrument))
        rows = np.flatnonzero(usable)
        end = self.start[rows] + (self.npts[rows] - 1) / self.rate[rows]
        mtimes = {chunk: os.stat(path).st_mtime_ns for chunk, path in zip(*self.waveform_files())}
        version = np.stack([self.npts[rows], np.array([mtimes[c] for c in self.chunk[rows]], dtype=np.int64)], axis=1)
        return Recordings(
            files=self.key[rows],
            instrument=self.instruments(rows),
            family=self.family[rows],
            start=self.start[rows],
            end=end,
            rate=self.rate[rows],
            whole_file=np.full(len(rows), not windowed),
            member_offsets=np.arange(len(rows) + 1, dtype=np.int64),
            member_paths=self.key[rows],
            member_start=self.start[rows],
            member_end=end,
            version=version.astype(np.int64).reshape(-1, 2),
        )

    def waveform_files(self):
        """(chunks, waveform file of each) as seisbench finds them."""
        chunks, _, paths = self.dataset._chunks_with_paths()
        return chunks, [str(path) for path in paths]

    def split_groups(self, keys):
        """(group keys, code per trace key) of --split_by dataset: the metadata `split` column, "train" and "dev";
        -1 for "test" and any other value (used on neither side), and for every trace without the column."""
        groups = np.array(DATASET_SPLIT_GROUPS, dtype=str)
        if "split" not in self.dataset.metadata.columns:
            return groups, np.full(len(keys), -1, dtype=np.int64)
        split = self.column(keys, "split").astype(str).str.strip().str.lower().to_numpy(dtype=str)
        codes = np.searchsorted(groups, split)
        known = np.isin(split, groups)
        return groups, np.where(known, codes, -1).astype(np.int64)

    def prefetch(self, keys):
        """Read the traces `keys` ahead, one get_waveforms call per number of components (SeisBench reads a list of
        traces far faster than one at a time: one metadata lookup, one open of the HDF5 file)."""
        self.waiting = {}
        rows = self.rows_of(keys)
        for n in np.unique(np.char.str_len(self.components[rows])):
            chosen = rows[np.char.str_len(self.components[rows]) == n]
            try:
                data = self.dataset.get_waveforms(chosen.tolist())  # (traces, components, longest trace's samples)
            except Exception:  # one trace spoils the call: each is read alone, and fails alone
                continue
            for row, waveform in zip(chosen.tolist(), data):
                self.waiting[row] = self.stream(row, waveform)

    def stream(self, row, waveform=None):
        """Trace `row` as an obspy Stream: one Trace per component, channel FAMILY + letter, the header from the
        metadata; waveform: (components, samples) as get_waveforms gave it (read now when None)."""
        if waveform is None:
            try:
                waveform = self.dataset.get_waveforms(int(row))
            except Exception as err:
                raise UnusableFile("unreadable trace", f"{self.key[row]}: {type(err).__name__}: {err}") from None
        header = {
            "network": self.network[row],
            "station": self.station[row],
            "location": self.location[row],
            "sampling_rate": self.rate[row],
            "starttime": obspy.UTCDateTime(self.start[row]),
        }
        family = self.family[row]
        return obspy.Stream(
            [
                obspy.Trace(np.ascontiguousarray(component[: self.npts[row]]), {**header, "channel": family + letter})
                for component, letter in zip(waveform, self.components[row])
            ]
        )

    def take_stream(self, key):
        row = int(self.rows_of([key])[0])
        stream = self.waiting.pop(row, None)
        return stream if stream is not None else self.stream(row)

    def read_waveform(self, key, families, stft):
        """Trace -> ((3, n_samples) float64 E, N, Z at stft.sampling_rate, metadata), as waveforms.read_waveform."""
        return waveform_of_stream(self.take_stream(key), (*families, UNKNOWN_FAMILY), stft)

    def read_windows(self, key, instrument, starts, seconds, stft):
        """Windows of a trace, as waveforms.read_windows."""
        try:
            stream = self.take_stream(key)
        except UnusableFile as err:
            return [err] * len(starts)
        return windows_of_stream(stream, instrument, starts, seconds, stft)


# --- writing SeisBench datasets (tests, bench.py --seisbench, docs/seisbench.md) ----------------------------------

DATA_FORMAT = {"dimension_order": "CW", "measurement": "velocity", "unit": "counts", "instrument_response": "none"}


def recording_of_file(path, families=DEFAULT_FAMILIES):
    """A 3-component miniSEED file -> (metadata dict, {component letter: samples at the native rate}) over the span
    that its E, N and Z share; UnusableFile for a file a SeisBench trace cannot hold (gaps, 1/2 codes, ...)."""
    stream = read_stream(path)
    instrument, family, picks = choose_components([trace.id for trace in stream], families)
    if any(len(rows) != 1 or stream[rows[0]].stats.channel[-1] != c for c, rows in picks.items()):
        raise UnusableFile("not one trace per E, N, Z component", instrument)
    traces = {c: stream[rows[0]] for c, rows in picks.items()}
    start = max(trace.stats.starttime for trace in traces.values())
    end = min(trace.stats.endtime for trace in traces.values())
    for trace in traces.values():
        if trace.stats.starttime != start or trace.stats.endtime != end:
            trace.trim(start, end)
    n_samples = min(trace.stats.npts for trace in traces.values())
    network, station, location, _ = instrument.split(".")
    metadata = {
        "trace_name": os.path.splitext(os.path.basename(path))[0],
        "station_network_code": network,
        "station_code": station,
        "station_location_code": location,
        "trace_channel": family,
        "trace_sampling_rate_hz": traces["Z"].stats.sampling_rate,
        "trace_start_time": str(start),
    }
    return metadata, {c: trace.data[:n_samples] for c, trace in traces.items()}


def write_dataset(out_dir, traces, component_order="ZNE", chunk="", dtype=np.float64):
    """Write (metadata, {letter: samples}) pairs as a SeisBench dataset with seisbench's WaveformDataWriter:
    out_dir/metadata<chunk>.csv and waveforms<chunk>.hdf5 (a chunk name makes the chunked layout). Each trace is stored
    in `component_order`, leaving out the letters it lacks (its trace_component_order says which it holds)."""
    import seisbench.data

    os.makedirs(out_dir, exist_ok=True)
    metadata_path = os.path.join(out_dir, f"metadata{chunk}.csv")
    with seisbench.data.WaveformDataWriter(metadata_path, os.path.join(out_dir, f"waveforms{chunk}.hdf5")) as writer:
        writer.data_format = {**DATA_FORMAT, "component_order": component_order}
        for metadata, components in traces:
            letters = "".join(c for c in component_order if c in components)
            waveform = np.stack([np.asarray(components[c], dtype=dtype) for c in letters])
            writer.add_trace({**metadata, "trace_component_order": letters}, waveform)
    if chunk:
        with open(os.path.join(out_dir, "chunks"), "a") as f:
            f.write(chunk + "\n")
    return out_dir


# Columns a generated dataset carries beyond what this project reads, so that metadata.csv is about as wide as
# STEAD's (the start-up cost is mostly reading it): name -> value of trace k.
FILLER_COLUMNS = {
    "station_latitude_deg": lambda k: round(32 + (k % 997) * 0.01, 4),
    "station_longitude_deg": lambda k: round(-122 + (k % 991) * 0.01, 4),
    "station_elevation_m": lambda k: k % 1500,
    "trace_p_arrival_sample": lambda k: 3000 + k % 200,
    "trace_p_status": lambda k: "manual",
    "trace_p_weight": lambda k: 0.5 + (k % 5) / 10,
    "trace_s_arrival_sample": lambda k: 4000 + k % 300,
    "trace_s_status": lambda k: "manual",
    "trace_s_weight": lambda k: 0.5 + (k % 3) / 10,
    "trace_coda_end_sample": lambda k: 7000 + k % 900,
    "trace_snr_db": lambda k: f"[{10 + k % 30}.1 {12 + k % 25}.3 {9 + k % 20}.7]",
    "source_id": lambda k: f"ev{k // 3:08d}",
    "source_latitude_deg": lambda k: round(33 + (k % 983) * 0.01, 4),
    "source_longitude_deg": lambda k: round(-121 + (k % 977) * 0.01, 4),
    "source_depth_km": lambda k: round(2 + (k % 197) * 0.1, 2),
    "source_magnitude_type": lambda k: "ml",
    "source_magnitude_author": lambda k: "NC",
    "source_mechanism_strike_dip_rake": lambda k: "",
    "source_distance_deg": lambda k: round((k % 887) * 0.002, 4),
    "source_distance_km": lambda k: round((k % 887) * 0.2, 2),
    "path_back_azimuth_deg": lambda k: round((k * 37) % 360, 1),
    "trace_polarity": lambda k: "undecidable",
}


def tiled_traces(paths, n_traces, seconds=None, seed=0):
    """n_traces (metadata, components) pairs cut from the recordings `paths` in turn: the first `seconds` s of each
    (None: all of it), a new day for each round over them; split 70 % train, 10 % dev, 20 % test as STEAD's;
    trace_category "earthquake_local" or "noise"; source_magnitude drawn from 0.5 to 5; other columns filled in."""
    recordings = [recording_of_file(path) for path in paths]
    rng = np.random.default_rng(seed)
    for k in range(n_traces):
        metadata, components = recordings[k % len(recordings)]
        rate = metadata["trace_sampling_rate_hz"]
        start = obspy.UTCDateTime(metadata["trace_start_time"]) + 86400 * (k // len(recordings))
        n_samples = round(seconds * rate) if seconds else None
        metadata = {**metadata, "trace_name": f"trace{k:07d}", "trace_start_time": str(start)}
        metadata["split"] = "train" if k % 10 < 7 else "dev" if k % 10 == 7 else "test"
        metadata["trace_category"] = "noise" if k % 4 == 3 else "earthquake_local"
        metadata["source_magnitude"] = round(float(rng.uniform(0.5, 5.0)), 2)
        metadata.update({name: value(k) for name, value in FILLER_COLUMNS.items()})
        yield metadata, {c: samples[:n_samples] for c, samples in components.items()}


def write_tiled_dataset(out_dir, paths, n_traces, seconds=None, chunk_size=100_000):
    """A dataset of n_traces tiled from `paths` (tiled_traces), float32 as SeisBench datasets mostly are; over
    chunk_size traces it is chunked ("00000", "00001", ...: metadata<chunk>.csv beside waveforms<chunk>.hdf5)."""
    traces = tiled_traces(paths, n_traces, seconds)
    if n_traces <= chunk_size:
        return write_dataset(out_dir, traces, dtype=np.float32)
    for first in range(0, n_traces, chunk_size):
        part = (next(traces) for _ in range(min(chunk_size, n_traces - first)))
        write_dataset(out_dir, part, chunk=f"{first // chunk_size:05d}", dtype=np.float32)
    return out_dir


# The shipped recordings have their P arrival at about 30 s (data/README.md): one noise and one event trace of each.
EVENT_NOISE_SECONDS = {"noise": (5.0, 25.0), "earthquake_local": (28.0, 48.0)}


def event_noise_traces(paths):
    """(metadata, components) of a noise trace (5-25 s) and an event trace (28-48 s) of each recording: STEAD's
    trace_category, trace_snr_db of the event trace (Z power over the noise trace's, dB; NaN for noise, as STEAD
    leaves it), and a split by recording: 7 in 10 train, 1 dev, 2 test."""
    for k, path in enumerate(paths):
        try:
            metadata, components = recording_of_file(path)
        except UnusableFile:
            continue
        rate, start = metadata["trace_sampling_rate_hz"], obspy.UTCDateTime(metadata["trace_start_time"])
        cut = {name: slice(round(a * rate), round(b * rate)) for name, (a, b) in EVENT_NOISE_SECONDS.items()}
        power = {name: np.var(components["Z"][part].astype(np.float64)) for name, part in cut.items()}
        split = "train" if k % 10 < 7 else "dev" if k % 10 == 7 else "test"
        for name, part in cut.items():
            snr = 10 * np.log10(power[name] / power["noise"]) if name != "noise" and power["noise"] > 0 else np.nan
            trace = {**metadata, "trace_name": f"{metadata['trace_name']}_{name}", "split": split}
            trace |= {"trace_start_time": str(start + part.start / rate), "trace_category": name}
            yield trace | {"trace_snr_db": round(float(snr), 2)}, {c: s[part] for c, s in components.items()}


def main(argv=None):
    """python -m reading.seisbench_data OUTPUT_DIR: the shipped recordings as a SeisBench dataset."""
    import argparse

    from reading.file_index import DEFAULT_DATA_DIR, find_files

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("output_dir", help="folder the dataset is written to (metadata.csv, waveforms.hdf5)")
    parser.add_argument(
        "--data_dir", default=DEFAULT_DATA_DIR, help=f"miniSEED event files (default {DEFAULT_DATA_DIR})"
    )
    parser.add_argument("--channels", nargs="+", default=list(DEFAULT_FAMILIES), help="families taken (default: 4)")
    args = parser.parse_args(argv)
    paths = [os.path.join(args.data_dir, name) for name in find_files(args.data_dir)]
    wanted = []
    for path in paths:
        try:
            choose_components([trace.id for trace in read_stream(path, headonly=True)], tuple(args.channels))
            wanted.append(path)
        except UnusableFile:
            continue
    write_dataset(args.output_dir, event_noise_traces(wanted))
    with open(os.path.join(args.output_dir, "metadata.csv")) as f:
        print(f"{args.output_dir}: {sum(1 for _ in f) - 1} traces (noise and earthquake_local)")


if __name__ == "__main__":
    main()
