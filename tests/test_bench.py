"""bench.py on real data: the files --make_files writes, and a run that reports every stage (no timing checks)."""

import json
import os

import pytest

import bench
from measuring import archives, bench_embed, results
from stft_dataset import SeismicSTFTDataset


def test_make_files_writes_real_70_s_windows_the_dataset_reads(tmp_path):
    assert archives.make_files(30, str(tmp_path / "made"), processes=2) == 30
    assert archives.make_files(32, str(tmp_path / "made"), processes=2) == 2  # the 30 already there are kept
    dataset = SeismicSTFTDataset(str(tmp_path / "made"))
    assert len(dataset) == 32 and not dataset.skips.files  # all cut from files of the default families
    shapes = {dataset[i][0].shape for i in range(len(dataset))}
    assert shapes == {(3, 129, 111)}  # 70 s at 100 Hz
    assert len({os.path.basename(name).split(".")[1] for name in dataset.files}) > 5  # many stations, not one file


@pytest.mark.slow
def test_bench_reports_every_stage_as_json(real_dir, tmp_path, capsys):
    path = tmp_path / "bench.json"
    archive = ["--make_archive", "2", "2", str(tmp_path / "archive")]
    figures = bench.main(["--data_dir", real_dir, "--batch_size", "4", "--json", str(path), *archive])
    with open(path) as f:
        assert json.load(f) == json.loads(json.dumps(figures))
    keys = ("limit", "cached", "bare_step", "train_loop", "embed", "startup_cold_s", "startup_warm_s")
    for key in (*keys, "windows_in_order", "windows_shuffled", "archive_startup_cold_s", "archive_startup_warm_s"):
        assert figures[key] > 0, key
    assert set(figures["loader"]) == {"0", "1", "2"} and min(figures["loader"].values()) > 0
    assert figures["num_files"] == 8 and figures["peak_rss_mb"]["main"] > 0 and "cores" in figures["machine"]
    assert figures["archive_windows"] == 2 * ((2 * 86400 - 60) // 30 + 1) and figures["archive_stations"] == 2
    assert figures["windows"] == 163  # every shipped 90 s file of the default families, as one window each
    out = capsys.readouterr().out
    assert "cached DataLoader, 2 workers" in out and "90 s windows of SDS day files, shuffled" in out


def test_directory_without_usable_files_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="0 usable files"):
        bench.main(["--data_dir", str(tmp_path / "empty")])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num_files", "-1"], "--num_files must be >= 0"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--make_files", "many", "dir"], "N must be a whole number"),
        (["--amp", "fp8"], "invalid choice: 'fp8'"),
        (["--make_files", "10"], "expected 2 arguments"),
    ],
)
def test_bad_flags_are_parse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_make_archive_writes_sds_day_files_that_join_across_midnight(tmp_path):
    root = str(tmp_path / "archive")
    assert archives.make_archive(2, 3, root, processes=2) == 2 * 3 * 3
    assert archives.make_archive(2, 3, root, processes=2) == 0  # kept
    dataset = SeismicSTFTDataset(root, families=("LH",), window_seconds=60, window_stride=30)
    assert len(dataset.recordings) == 2 and not dataset.skips.files  # one recording per station over 3 days
    assert len(dataset) == 2 * ((3 * 86400 - 60) // 30 + 1)


@pytest.mark.slow
def test_link_files_and_startup_only(tmp_path, capsys):
    figures = bench.main(["--link_files", "300", str(tmp_path / "links"), "--startup_only"])
    assert {"startup_cold_s", "startup_warm_s", "startup_warm_dataset_cpu_s"} <= set(figures)
    assert min(figures.values()) > 0
    assert len(SeismicSTFTDataset(str(tmp_path / "links"))) == 300
    assert archives.link_files(300, str(tmp_path / "links")) == 0  # kept
    assert "s warm" in capsys.readouterr().out


@pytest.mark.slow  # writes 2 days of real 100 Hz samples (75 MB) and runs embed.py twice in new processes
def test_embed_windows_runs_embed_py_per_n_on_a_real_archive(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_embed, "STRIDE", 3600.0)  # 24 windows a day, not 43,200
    argv = ["--embed_windows", "20", "30", "--checkpoint", trained[0], "--embed_archive", str(tmp_path)]
    figures = bench.main(argv + ["--markdown", str(tmp_path / "results")])
    assert figures["embed_days"] == [1, 2] and figures["embed_windows"] == [24, 48]  # windows cross midnight
    assert all(peak > 100e6 for peak in figures["embed_peak_rss_bytes"])  # torch alone is more
    assert all(rate > 0 for rate in figures["embed_windows_per_s"] + figures["embed_output_bytes_per_window"])
    assert all(0 < seconds < wall for seconds, wall in zip(figures["embed_atlas_s"], figures["embed_wall_s"]))
    one_day = SeismicSTFTDataset(str(tmp_path / "days1"), window_seconds=10, window_stride=3600)
    assert len(one_day) == 24 and one_day.recordings.instrument.tolist() == ["XX.S000..HH?"]
    x, meta = one_day[23]
    assert x.shape == (3, 129, 17) and meta["starttime"] == "2020-01-01T23:00:00.000000Z"
    (written,) = (tmp_path / "results").iterdir()
    assert written.name.endswith("-embed.md") and "| 48 | 2 |" in written.read_text()


def test_embed_windows_needs_a_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="needs --checkpoint"):
        bench.main(["--embed_windows", "10", "--embed_archive", str(tmp_path)])


def test_dated_results_files_are_never_overwritten(tmp_path):
    first = results.dated_path(tmp_path, "bench")
    assert first.endswith("-bench.md") and results.dated_path(tmp_path, "bench") == first  # nothing there yet
    open(first, "w").close()
    second = results.dated_path(tmp_path, "bench")
    assert (
        second != first
        and second.endswith("-bench.md")
        and os.path.basename(second)[:10] == os.path.basename(first)[:10]
    )


def test_results_name_the_commit_the_measurement_started_at(tmp_path, monkeypatch):
    """A results file written after the code changed names the commit the script ran, and the later one."""
    started = results.STARTED
    monkeypatch.setattr(results, "commit", lambda: "abc1234+changes")
    path = results.write_results(tmp_path / "r.md", "t", "body\n")
    text = path.read_text()
    assert f"- measured: {started[0]:%Y-%m-%d %H:%M} UTC, commit {started[1]} (abc1234+changes when written)" in text
    monkeypatch.setattr(results, "commit", lambda: started[1])
    assert f"commit {started[1]}; written " in results.write_results(tmp_path / "s.md", "t", "body\n").read_text()
