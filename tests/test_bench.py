"""bench.py on real data: the files --make_files writes, and a run that reports every stage (no timing checks)."""

import json
import os

import pytest

import bench
from stft_dataset import SeismicSTFTDataset


def test_make_files_writes_real_70_s_windows_the_dataset_reads(tmp_path):
    assert bench.make_files(30, str(tmp_path / "made"), processes=2) == 30
    assert bench.make_files(32, str(tmp_path / "made"), processes=2) == 2  # the 30 already there are kept
    dataset = SeismicSTFTDataset(str(tmp_path / "made"))
    assert len(dataset) == 32 and not dataset.skips.files  # all cut from files of the default families
    shapes = {dataset[i][0].shape for i in range(len(dataset))}
    assert shapes == {(3, 129, 111)}  # 70 s at 100 Hz
    assert len({os.path.basename(name).split(".")[1] for name in dataset.files}) > 5  # many stations, not one file


def test_bench_reports_every_stage_as_json(real_dir, tmp_path, capsys):
    path = tmp_path / "bench.json"
    figures = bench.main(["--data_dir", real_dir, "--batch_size", "4", "--json", str(path)])
    with open(path) as f:
        assert json.load(f) == json.loads(json.dumps(figures))
    for key in ("limit", "cached", "bare_step", "train_loop", "embed", "startup_cold_s", "startup_warm_s"):
        assert figures[key] > 0, key
    assert set(figures["loader"]) == {"0", "1", "2"} and min(figures["loader"].values()) > 0
    assert figures["num_files"] == 8 and figures["peak_rss_mb"]["main"] > 0 and "cores" in figures["machine"]
    assert "cached DataLoader, 2 workers" in capsys.readouterr().out


def test_directory_without_usable_files_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="0 usable files"):
        bench.main(["--data_dir", str(tmp_path / "empty")])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num_files", "-1"], "--num_files must be >= 0"),
        (["--batch_size", "0"], "--batch_size >= 1"),
        (["--make_files", "many", "dir"], "N must be a whole number"),
        (["--amp", "fp8"], "invalid choice: 'fp8'"),
        (["--make_files", "10"], "expected 2 arguments"),
    ],
)
def test_bad_flags_are_parse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
