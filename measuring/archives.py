"""Archives made of the shipped recordings, for bench.py and the tests: event files cut at random offsets, hard links
by the thousand, the recordings joined back to back as an SDS archive, and SDS archives of 1 Hz day files whose
headers alone matter (start-up and window counts at the scale of years).
"""

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import obspy

from reading.file_index import DEFAULT_DATA_DIR, available_cores
from reading.waveforms import DEFAULT_FAMILIES

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), DEFAULT_DATA_DIR)
WINDOW_SECONDS = 70.0  # length of the files make_files writes, as in the archive this tool is built for
FILES_PER_FOLDER = 1000
ARCHIVE_START = obspy.UTCDateTime("2020-01-01")
SDS_DAY = 86400


def shipped_sources():
    """Paths of the shipped files of the default families, sorted."""
    return [
        os.path.join(SHIPPED, name) for name in sorted(os.listdir(SHIPPED)) if name.split(".")[2] in DEFAULT_FAMILIES
    ]


def make_files(n_files, out_dir, processes=None):
    """Write n_files real 3-component windows: shipped recordings cut at random offsets, rewritten as miniSEED."""
    sources = shipped_sources()
    chunks = [
        (sources, out_dir, start, min(start + FILES_PER_FOLDER, n_files))
        for start in range(0, n_files, FILES_PER_FOLDER)
    ]
    with ProcessPoolExecutor(processes or available_cores()) as pool:
        return sum(pool.map(write_folder, chunks))


def write_folder(chunk):
    """Files start..stop-1 into out_dir/<start // FILES_PER_FOLDER>/ (NET.STA.<k>.mseed, k the file number);
    files already there are kept. Returns how many were written."""
    sources, out_dir, start, stop = chunk
    folder = os.path.join(out_dir, f"{start // FILES_PER_FOLDER:03d}")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(start)
    written = 0
    for k in range(start, stop):
        source = sources[k % len(sources)]
        offset = rng.uniform(0, 1)  # drawn for every k: the files do not depend on which ones exist
        path = os.path.join(folder, ".".join(os.path.basename(source).split(".")[:2] + [f"{k:06d}", "mseed"]))
        if os.path.exists(path):
            continue
        stream = obspy.read(source, format="MSEED")
        first = max(trace.stats.starttime for trace in stream)
        room = min(trace.stats.endtime for trace in stream) - first - WINDOW_SECONDS
        begin = first + offset * max(room, 0.0)
        stream.slice(begin, begin + WINDOW_SECONDS).write(path, format="MSEED")
        written += 1
    return written


def make_archive(n_stations, n_days, out_dir, processes=None):
    """SDS archive of n_stations x n_days x 3 day files at 1 Hz (XX.S000..LHZ.D.2020.001, ...); returns files
    written."""
    tasks = [(out_dir, station, day) for station in range(n_stations) for day in range(n_days)]
    with ProcessPoolExecutor(processes or available_cores()) as pool:
        return sum(pool.map(write_archive_day, tasks, chunksize=64))


def write_archive_day(task):
    out_dir, station, day = task
    header = {"network": "XX", "station": f"S{station:03d}", "sampling_rate": 1.0}
    trace = obspy.Trace(np.zeros(SDS_DAY, dtype=np.int32), header=header | {"starttime": ARCHIVE_START + SDS_DAY * day})
    written = 0
    for component in "ENZ":
        trace.stats.channel = f"LH{component}"
        written += write_sds(obspy.Stream([trace]), out_dir, keep=True)
    return written


def make_real_archive(n_days, out_dir, processes=None):
    """SDS archive of one 100 Hz HH instrument (XX.S000..HH?) over n_days days of real samples: the shipped HH
    recordings joined back to back and repeated to fill each day (3 day files a day, about 37 MB). Days already there
    are kept; returns the files written."""
    tasks = [(out_dir, day) for day in range(n_days)]
    with ProcessPoolExecutor(min(processes or available_cores(), max(1, n_days))) as pool:
        return sum(pool.map(write_real_day, tasks))


def write_real_day(task):
    out_dir, day = task
    joined = joined_recording([path for path in shipped_sources() if path.split(".")[-3] == "HH"])
    start = ARCHIVE_START + SDS_DAY * day
    n_samples = SDS_DAY * 100
    for trace in joined:
        trace.data = np.resize(trace.data, n_samples)  # repeated to the length of a day
        trace.stats.update({"network": "XX", "station": "S000", "location": "", "starttime": start})
        trace.stats.channel = "HH" + trace.stats.channel[-1]
    return write_sds(joined, out_dir, keep=True)


def joined_recording(paths, seconds_each=90):
    """One 3-component stream (E, N, Z) of the files `paths` of one instrument at 100 Hz, back to back from the
    first file's start: a continuous recording of real samples."""
    streams = [obspy.read(path, format="MSEED") for path in paths]
    n_samples = int(seconds_each * 100)
    joined = obspy.Stream()
    for component in "ENZ":
        traces = [stream.select(component=component)[0] for stream in streams]
        header = traces[0].stats.copy()
        header.npts = len(traces) * n_samples
        joined.append(obspy.Trace(np.concatenate([t.data[:n_samples] for t in traces]).astype(np.int32), header))
    return joined


def write_sds(stream, root, keep=False):
    """Each trace as day files in SDS layout (YEAR/NET/STA/CHAN.D/NET.STA.LOC.CHAN.D.YEAR.DAY), cut at midnight.
    Returns the number of files written (keep: files already there are kept)."""
    written = 0
    for trace in stream:
        day = obspy.UTCDateTime(trace.stats.starttime.date)
        while day < trace.stats.endtime:
            part = trace.slice(day, day + SDS_DAY - trace.stats.delta)
            s = part.stats
            folder = os.path.join(root, str(day.year), s.network, s.station, f"{s.channel}.D")
            path = os.path.join(
                folder, f"{s.network}.{s.station}.{s.location}.{s.channel}.D.{day.year}.{day.julday:03d}"
            )
            if not (keep and os.path.exists(path)):
                os.makedirs(folder, exist_ok=True)
                part.write(path, format="MSEED", reclen=512)
                written += 1
            day += SDS_DAY
    return written


def shipped_as_sds(root):
    """The shipped files of the default families joined back to back per instrument, as an SDS archive in root."""
    by_instrument = {}
    for name in sorted(os.listdir(SHIPPED)):
        network, station, family = name.split(".")[:3]
        if family in DEFAULT_FAMILIES:
            by_instrument.setdefault((network, station, family), []).append(os.path.join(SHIPPED, name))
    for paths in by_instrument.values():
        write_sds(joined_recording(paths), root)


def link_files(n_files, out_dir):
    """n_files hard links to the shipped files of the default families (folder k // 1000, file NET.STA.<k>.mseed);
    links already there are kept. Returns how many were made."""
    sources = shipped_sources()
    made = 0
    for k in range(n_files):
        source = sources[k % len(sources)]
        folder = os.path.join(out_dir, f"{k // FILES_PER_FOLDER:03d}")
        path = os.path.join(folder, ".".join(os.path.basename(source).split(".")[:2] + [f"{k:06d}", "mseed"]))
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            os.link(source, path)
            made += 1
    return made
