"""Windows of long and continuous recordings: SDS archives and longer files built from the shipped recordings.

Each check compares a window with a direct scipy.signal.stft of the same samples, cut from the recording that
was written, so a window that starts one sample off, or reads the wrong day file, fails.
"""

import csv
import json
import os

import numpy as np
import obspy
import pytest
import torch
from conftest import SHIPPED, flags
from waveform_files import reference_spectrogram

import embed
import inference
import similar
import train
from measuring import archives
from reading import waveforms
from reading.recordings import MAX_RECORDING_SECONDS, choose_val_groups
from running import run_data
from stft_dataset import SeismicSTFTDataset, pad_collate

GDXB = sorted(name for name in os.listdir(SHIPPED) if name.startswith("NC.GDXB.HH."))  # 15 real 90 s files, 100 Hz
OMMB = sorted(name for name in os.listdir(SHIPPED) if name.startswith("NN.OMMB.HH."))  # 6 of another station
MIDNIGHT = obspy.UTCDateTime("2016-09-03T00:00:00")


def joined(names, start):
    """One 3-component recording (E, N, Z, int32) of the shipped 90 s files `names` back to back from `start`."""
    stream = archives.joined_recording([os.path.join(SHIPPED, name) for name in names])
    for trace in stream:
        trace.stats.starttime = start
    return stream


def samples_of(stream):
    """(3, n) float64 samples in E, N, Z order."""
    return np.stack([stream.select(component=c)[0].data.astype(np.float64) for c in "ENZ"])


def write_sds(stream, root):
    """Per-channel day files in SDS layout, cut at midnight (archives.write_sds); returns their paths."""
    archives.write_sds(stream, root)
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names if ".D." in name)


def assert_windows_match(dataset, samples, first_sample, seconds, stride):
    """Every window of the dataset equals the documented transform of the samples it covers."""
    n = int(seconds * 100)
    for i in range(len(dataset)):
        x, meta = dataset[i]
        begin = first_sample + int(round(stride * 100)) * i
        expected = reference_spectrogram(samples[:, begin : begin + n])
        assert x.shape[-1] == dataset.time_bins()[i] == expected.shape[-1]
        np.testing.assert_allclose(x.numpy(), expected, atol=2e-5)


@pytest.fixture
def sds_root(tmp_path):
    """Real recordings of NC.GDXB (6 files back to back, 9 min) as an SDS archive, crossing midnight."""
    stream = joined(GDXB[:6], MIDNIGHT - 200)
    write_sds(stream, str(tmp_path / "sds"))
    return str(tmp_path / "sds"), stream


def test_sds_windows_cross_midnight_and_match_scipy(sds_root, tmp_path):
    root, stream = sds_root
    assert len(os.listdir(os.path.join(root, "2016", "NC", "GDXB", "HHZ.D"))) == 2  # day 246 and day 247
    dataset = SeismicSTFTDataset(root, index_path=str(tmp_path / "i.npz"), window_seconds=60, window_stride=45)
    assert len(dataset) == (540 - 60) // 45 + 1 and not dataset.skips.files
    assert len(dataset.recordings) == 1 and len(dataset.recordings.members(0)) == 6  # 3 channels x 2 days
    crossing = [
        i for i in range(len(dataset)) if dataset.sample_start[i] < MIDNIGHT.timestamp < dataset.sample_start[i] + 60
    ]
    assert crossing  # windows that need both day files
    assert_windows_match(dataset, samples_of(stream), 0, 60, 45)
    assert dataset[0][1]["starttime"] == str(MIDNIGHT - 200) and dataset[0][1]["trace_id"] == "NC.GDXB..HH?"


def test_a_longer_file_is_cut_into_windows_that_match_scipy(tmp_path):
    stream = joined(GDXB[:3], MIDNIGHT)
    directory = tmp_path / "long"
    directory.mkdir()
    stream.write(str(directory / "NC.GDXB.HH.long.mseed"), format="MSEED")
    dataset = SeismicSTFTDataset(str(directory), window_seconds=30, window_stride=20)
    assert len(dataset) == (270 - 30) // 20 + 1
    assert_windows_match(dataset, samples_of(stream), 0, 30, 20)


def test_one_file_is_decoded_once_for_all_its_windows_in_a_batch(tmp_path, monkeypatch):
    stream = joined(GDXB[:3], MIDNIGHT)
    stream.write(str(tmp_path / "NC.GDXB.HH.long.mseed"), format="MSEED")
    dataset = SeismicSTFTDataset(str(tmp_path), window_seconds=30, window_stride=20)
    reads = []
    original = waveforms.read_stream
    monkeypatch.setattr(
        waveforms, "read_stream", lambda *args, **kwargs: reads.append(args) or original(*args, **kwargs)
    )
    batch = pad_collate(dataset.__getitems__([0, 3, 7, 11]))
    assert batch["spectrogram"].shape[0] == 4 and len(reads) == 1


def test_long_file_without_windows_is_skipped_with_the_flag_to_use(tmp_path):
    directory = tmp_path / "mixed"
    directory.mkdir()
    joined(GDXB[:8], MIDNIGHT).write(str(directory / "NC.GDXB.HH.12min.mseed"), format="MSEED")  # 720 s
    for name in OMMB[:2]:
        obspy.read(os.path.join(SHIPPED, name)).write(str(directory / name), format="MSEED")
    dataset = SeismicSTFTDataset(str(directory))
    assert len(dataset) == 2 and max(dataset.time_bins()[i] for i in range(2)) == 142  # nothing pads to 12 min
    reason, message = dataset.skips.files[str(directory / "NC.GDXB.HH.12min.mseed")]
    assert reason == "too long without --window_seconds" and "--window_seconds" in message
    assert f"{MAX_RECORDING_SECONDS:.0f} s" in message
    windowed = SeismicSTFTDataset(str(directory), window_seconds=90, window_stride=90)
    assert len(windowed) == 8 + 2 and not windowed.skips.files


def test_gap_nan_and_dead_stretch_skip_only_their_windows(tmp_path):
    stream = joined(GDXB[:4], MIDNIGHT)  # 360 s
    stream = stream.cutout(MIDNIGHT + 100, MIDNIGHT + 105)  # a 5 s gap in every component: two recordings
    for trace in stream:
        trace.data = trace.data.astype(np.float64)
    stream.select(component="N")[0].data[300:1500] = 0.0  # 12 s dead on N, inside the first window
    late = stream.select(component="Z")[-1]
    late.data[(250 - 105) * 100] = np.nan  # one NaN sample at 250 s
    directory = tmp_path / "flawed"
    directory.mkdir()
    stream.write(str(directory / "NC.GDXB.HH.flawed.mseed"), format="MSEED", encoding="FLOAT64")
    dataset = SeismicSTFTDataset(str(directory), window_seconds=20, window_stride=20)
    starts = dataset.sample_start - MIDNIGHT.timestamp
    assert len(dataset.recordings) == 2  # split at the gap, from the headers
    assert starts.tolist() == [0, 20, 40, 60, 80, *range(105, 345, 20)]  # no window over the gap
    batch = pad_collate(dataset.__getitems__(list(range(len(dataset)))))
    reasons = {path.split("@")[1]: reason for path, reason, _ in batch["skipped"]}
    assert reasons == {str(MIDNIGHT): "dead stretch", str(MIDNIGHT + 245): "NaN or infinite samples"}
    assert len(batch["meta"]) == len(dataset) - 2


def test_station_missing_a_component_on_a_day_is_counted(sds_root, tmp_path):
    root, _ = sds_root
    other = joined(OMMB[:2], MIDNIGHT + 3600)
    paths = [p for p in write_sds(other.select(component="Z") + other.select(component="N"), root) if "OMMB" in p]
    dataset = SeismicSTFTDataset(root, index_path=str(tmp_path / "i.npz"), window_seconds=60, window_stride=45)
    assert dataset.skips.counts() == {"fewer than 3 components": 2}
    assert len(paths) == 2 and "missing E" in dataset.skips.files[paths[0]][1]
    assert set(dataset.recordings.instrument) == {"NC.GDXB..HH?"}


def test_split_by_station_and_time_keep_groups_and_overlaps_apart(tmp_path):
    root = str(tmp_path / "sds")
    write_sds(joined(GDXB[:6], MIDNIGHT - 200), root)
    write_sds(joined(OMMB[:6], MIDNIGHT - 100), root)
    dataset = SeismicSTFTDataset(root, window_seconds=60, window_stride=30)
    keys, codes = dataset.groups("station")
    assert keys.tolist() == ["NC.GDXB", "NN.OMMB"] and np.bincount(codes).tolist() == [17, 17]
    val = choose_val_groups(keys, codes, 0.2, 0)
    assert len(val) == 1  # one station each side
    days, codes = dataset.groups("time")
    day = int(MIDNIGHT.timestamp // 86400)
    assert days.tolist() == [str(day - 1), str(day)]
    crossing = (dataset.sample_start < MIDNIGHT.timestamp) & (dataset.sample_start + 60 > MIDNIGHT.timestamp)
    assert crossing.any() and np.array_equal(codes == -1, crossing)  # a window over midnight sits on neither side
    before = dataset.sample_start + 60 <= MIDNIGHT.timestamp
    assert np.all(codes[before] == 0) and np.all(codes[~before & ~crossing] == 1)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--window_seconds", "1"], "shorter than one STFT segment"),
        (["--window_seconds", "30", "--window_stride", "0"], "--window_stride must be > 0"),
        (["--window_stride", "10"], "--window_stride needs --window_seconds"),
        (["--window_seconds", "100000"], "longer than every usable recording"),
    ],
)
def test_bad_window_flags_give_one_line(sds_root, tmp_path, capsys, extra, message):
    root, _ = sds_root
    with pytest.raises(SystemExit) as stop:
        train.main(
            ["--data_dir", root, "--checkpoint_dir", str(tmp_path / "c"), "--log_dir", str(tmp_path / "l"), *extra]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)


def test_sds_tree_without_a_complete_station_is_one_line(tmp_path, capsys):
    root = str(tmp_path / "sds")
    stream = joined(GDXB[:2], MIDNIGHT)
    write_sds(stream.select(component="Z"), root)
    with pytest.raises(SystemExit) as stop:
        train.main(["--data_dir", root, "--checkpoint_dir", str(tmp_path / "c"), "--window_seconds", "30"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and "0 usable windows" in err and "1 fewer than 3 components" in err


def run_windowed(root, tmp_path, *extra):
    argv = ["--data_dir", root, "--checkpoint_dir", str(tmp_path / "c"), "--log_dir", str(tmp_path / "l")]
    argv += flags(window_seconds=60, window_stride=30, batch_size=4, num_workers=0, device="cpu", split_by="station")
    argv += ["--lr_schedule", "constant"]  # one-cycle spans --num_epochs: a 1-epoch run would follow another schedule
    return train.main(argv + list(extra))


@pytest.mark.slow
def test_windowed_sds_trains_resumes_exactly_and_evaluates_from_the_checkpoint(tmp_path):
    root = str(tmp_path / "sds")
    write_sds(joined(GDXB[:4], MIDNIGHT - 100), root)
    write_sds(joined(OMMB[:4], MIDNIGHT + 50), root)
    straight = run_windowed(root, tmp_path / "a", "--num_epochs", "2")
    first = run_windowed(root, tmp_path / "b", "--num_epochs", "1")
    last = os.path.join(first["run_dir"], "last.pt")
    resumed = run_windowed(root, tmp_path / "b", "--num_epochs", "2", "--resume", last)
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["args"]["window_seconds"] == 60 and checkpoint["args"]["split_by"] == "station"
    assert len(checkpoint["val_groups"]) == 1 and checkpoint["val_groups"][0] in ("NC.GDXB", "NN.OMMB")
    with open(os.path.join(first["run_dir"], "config.json")) as f:
        assert json.load(f)["dataset"]["usable_files"] == 2 * ((360 - 60) // 30 + 1)
    metrics = inference.main([last, "--output_dir", str(tmp_path / "out"), "--num_samples", "0", "--device", "cpu"])
    station = checkpoint["val_groups"][0]
    assert metrics["num_samples"] == (360 - 60) // 30 + 1  # every window of the validation station, none other
    assert {s["trace_id"].rsplit(".", 2)[0] for s in metrics["samples"]} == {station}
    assert len({s["starttime"] for s in metrics["samples"]}) == metrics["num_samples"]
    out = tmp_path / "emb"
    argv = [last, "--output_dir", str(out), "--device", "cpu", "--clusters", "2", "--split", "val"]
    summary = embed.main(argv + ["--projector_points", "0", "--num_anomalies", "1"])
    with open(out / "catalog.csv") as f:
        rows = list(csv.DictReader(f))
    worst = next(row for row in rows if row["anomaly_rank"] == "1")  # named by its day file and its start
    day, start = os.path.basename(worst["path"]), worst["starttime"][:19].replace("-", "").replace(":", "")
    assert [n for n in os.listdir(out) if n.startswith("anomaly_")] == [f"anomaly_1_{day}_{start}.png"]
    assert summary["rows"] == len(rows) == metrics["num_samples"] == len(np.load(out / "embeddings.npy"))
    assert len({row["starttime"] for row in rows}) == len(rows) and {row["duration_s"] for row in rows} == {"60.0"}
    found = similar.main([str(out), "3", "-k", "2", "--output", str(tmp_path / "s.png")])
    assert len(found) == 2 and os.path.getsize(tmp_path / "s.png") > 0  # the neighbours' windows were read back
    query = os.path.basename(rows[3]["path"]) + "_" + rows[3]["starttime"][:19].replace("-", "").replace(":", "")
    assert (out / f"similar_{query}.csv").exists()  # the table is named by the window, not its day file alone


def test_default_split_keeps_every_station_on_one_side_of_shipped_events(real_dir):
    _, args = train.parse_args(["--data_dir", real_dir])
    assert args.split_by == "station"
    dataset = SeismicSTFTDataset(real_dir)
    train_indices, val_indices, val_groups = run_data.split_samples(dataset, args, None)
    keys, codes = dataset.groups("station")
    assert set(keys[codes[val_indices]]) == set(val_groups) and not set(keys[codes[train_indices]]) & set(val_groups)
    assert len(train_indices) + len(val_indices) == len(dataset) == 8


def test_the_cache_stores_windows(sds_root, tmp_path, monkeypatch):
    root, _ = sds_root
    settings = {"index_path": str(tmp_path / "i.npz"), "window_seconds": 60, "window_stride": 45}
    uncached = SeismicSTFTDataset(root, **settings)
    reference = [uncached[i] for i in range(len(uncached))]
    cached = SeismicSTFTDataset(root, cache_dir=str(tmp_path / "cache"), processes=2, **settings)
    monkeypatch.setattr(waveforms, "read_stream", None)  # nothing is read from here on
    again = SeismicSTFTDataset(root, cache_dir=str(tmp_path / "cache"), processes=2, **settings)
    assert len(again) == len(reference) == 11
    for (x, meta), (y, cached_meta) in zip(reference, again):
        assert y.dtype == torch.float16 and meta == cached_meta
        np.testing.assert_allclose(y.float().numpy(), x.numpy(), atol=2.5e-4)
    assert cached.cache.folder == again.cache.folder
    other = SeismicSTFTDataset(
        root, index_path=settings["index_path"], window_seconds=30, cache_dir=str(tmp_path / "cache")
    )
    assert other.cache.folder != again.cache.folder  # another window length never reads these windows
