"""Build a labelled event-versus-noise set from real event files: 10 s windows before and after the P arrival.

    python event_noise_windows.py --output_dir /tmp/event_noise                       # from the shipped data
    python embed.py checkpoints/<run>/best_model.pt --data_dir /tmp/event_noise --labels /tmp/event_noise/labels.csv

The shipped windows (data/README.md) have their P arrival at about 30 s: the windows 5-15 s and 15-25 s after a
file's start are taken as noise, 30-40 s and 40-50 s as event. Each window is written as its own miniSEED file
(the traces as they are, not resampled) under <output_dir>/<label>/, and labels.csv lists path,label,source.
A window holds exactly 10 s of samples (1,000 at 100 Hz), as embed.py cuts a window of 10 s from a longer recording
(waveforms.cut_window), so that a window file read whole gives the same spectrogram as the same 10 s cut by a
windowed run; obspy's slice keeps both ends (1,001), and that one sample changes the last three time bins of the STFT.
Files that cannot give a clean 3-component waveform of a requested family are skipped with their reason.

Not every event window shows its event: a small event, or the coda at 40-50 s, can stay at the level of the noise.
labels.csv gives each window's `snr`: the RMS of the vertical component, band-passed to SNR_BAND, over the RMS of
the same in the file's noise windows (5-25 s). labels_clear.csv lists the noise windows and only the event windows
with an snr of at least CLEAR_SNR: the set on which "event" means an event stands out of the noise.
"""

import csv
import io
import logging
import os

import numpy as np
import obspy

from reading.file_index import DEFAULT_DATA_DIR, find_files
from reading.transform import STFTConfig
from reading.waveforms import (
    DEFAULT_FAMILIES,
    MINISEED_EXTENSIONS,
    NOT_REQUESTED,
    UnusableFile,
    choose_components,
    read_stream,
    read_waveform,
)
from running.settings import RunError, Setting, parse
from running.storage import atomic_write
from stft_dataset import SkipLog

log = logging.getLogger("event_noise_windows")
WINDOWS = {"noise": ((5, 15), (15, 25)), "event": ((30, 40), (40, 50))}  # seconds after each file's start
LAST_WINDOW_END = max(end for windows in WINDOWS.values() for _, end in windows)
SNR_BAND = (2.0, 10.0)  # Hz: where a local event stands out of the microseismic noise
CLEAR_SNR = 2.0  # an event window with at least this snr is in labels_clear.csv
COLUMNS = ("path", "label", "source", "snr")


SETTINGS = (
    Setting("data_dir", DEFAULT_DATA_DIR, "directory of event files with the P arrival at about 30 s"),
    Setting("output_dir", None, "where the windows and labels.csv are written (required)", required=True),
    Setting("channels", list(DEFAULT_FAMILIES), "channel families to use", nargs="+"),
    Setting("files_from", None, "text file of paths relative to --data_dir to use, one a line (default: every file)"),
)


def parse_args(argv=None):
    return parse(__doc__, SETTINGS, argv)


def main(argv=None):
    """Write the windows; returns the rows of labels.csv."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser, args = parse_args(argv)
    try:
        return write_windows(args)
    except (FileNotFoundError, RunError) as err:
        parser.exit(2, f"error: {err}\n")


def source_files(args):
    if not os.path.isdir(args.data_dir):
        raise RunError(f"data directory not found: {args.data_dir}")
    files = find_files(args.data_dir, MINISEED_EXTENSIONS)
    if args.files_from:
        with open(args.files_from) as f:
            wanted = {line.strip() for line in f if line.strip()}
        files = [relpath for relpath in files if relpath in wanted]
    if not files:
        raise RunError(f"no miniSEED files to use in {args.data_dir}")
    return files


def exact_window(stream, start, seconds):
    """The traces of `stream` from the sample nearest `start` (UTCDateTime), round(seconds * rate) samples each."""
    window = stream.slice(start, start + seconds)
    for trace in window:
        trace.data = trace.data[: int(round(seconds * trace.stats.sampling_rate))]
    return window


def band_rms(trace, start, seconds):
    """RMS of a band-passed trace over `seconds` from `start` (UTCDateTime)."""
    data = exact_window(obspy.Stream([trace]), start, seconds)[0].data
    return float(np.sqrt(np.mean(np.square(data, dtype=np.float64))))


def signal_to_noise(vertical, start):
    """{(begin, end): snr} of each window in WINDOWS from `start`: the vertical component's RMS in SNR_BAND (below
    0.45 times its sampling rate) over the same in the noise windows together; inf where that is zero, NaN where the
    sampling rate leaves no band."""
    trace = vertical.copy().merge(fill_value=0)[0]
    trace.data = trace.data.astype(np.float64)
    trace.detrend("demean")
    windows = [window for windows in WINDOWS.values() for window in windows]
    freqmax = min(SNR_BAND[1], 0.45 * trace.stats.sampling_rate)
    if freqmax <= SNR_BAND[0]:
        return dict.fromkeys(windows, np.nan)
    trace.filter("bandpass", freqmin=SNR_BAND[0], freqmax=freqmax, corners=4, zerophase=True)
    rms = {(b, e): band_rms(trace, start + b, e - b) for b, e in windows}
    noise = np.sqrt(np.mean([rms[window] ** 2 for window in WINDOWS["noise"]]))
    return {window: value / noise if noise > 0 else np.inf for window, value in rms.items()}


def write_windows(args):
    skips, rows, left_out = SkipLog(), [], 0
    for relpath in source_files(args):
        path = os.path.join(args.data_dir, relpath)
        try:
            read_waveform(path, args.channels, STFTConfig())  # the same checks as training: skip what it would skip
            stream = read_stream(path)
        except UnusableFile as err:
            if err.reason == NOT_REQUESTED:
                left_out += 1
            else:
                skips.add(path, err.reason, str(err))
            continue
        _, _, picks = choose_components([trace.id for trace in stream], args.channels)
        vertical = obspy.Stream([stream[i] for i in picks["Z"]])
        stream.traces = [stream[i] for positions in picks.values() for i in positions]
        start, end = max(trace.stats.starttime for trace in stream), min(trace.stats.endtime for trace in stream)
        if end - start < LAST_WINDOW_END:
            skips.add(path, "too short for the windows", f"{end - start:.1f} s of 3 components < {LAST_WINDOW_END} s")
            continue
        snr = signal_to_noise(vertical, start)
        stem = os.path.splitext(os.path.basename(relpath))[0]
        for label, windows in WINDOWS.items():
            os.makedirs(os.path.join(args.output_dir, label), exist_ok=True)
            for begin, end in windows:
                name = os.path.join(label, f"{stem}.{begin:02d}-{end:02d}s.mseed")
                window = exact_window(stream, start + begin, end - begin)
                atomic_write(os.path.join(args.output_dir, name), lambda f, w=window: w.write(f, format="MSEED"))
                rows.append({"path": name, "label": label, "source": relpath, "snr": f"{snr[begin, end]:.3f}"})
    if not rows:
        raise RunError(f"no usable files in {args.data_dir} (skipped: {skips.describe()})")
    write_labels(os.path.join(args.output_dir, "labels.csv"), rows)
    clear = [row for row in rows if row["label"] == "noise" or float(row["snr"]) >= CLEAR_SNR]
    write_labels(os.path.join(args.output_dir, "labels_clear.csv"), clear)
    unclear = len(rows) - len(clear)
    print(f"{len(rows)} windows of {len(rows) // 4} files in {args.output_dir}")
    print(f"event windows with snr < {CLEAR_SNR:g} ({SNR_BAND[0]:g}-{SNR_BAND[1]:g} Hz), not in labels_clear.csv: "
          f"{unclear} of {len(rows) // 2}")  # fmt: skip
    print(f"left out by --channels: {left_out} files; skipped files: {skips.describe()}")
    return rows


def write_labels(path, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


if __name__ == "__main__":
    main()
