"""ablation.py without training: folds built from the shipped files, per-network means, its errors and tables."""

import json
import os
import re

import obspy
import pytest
from conftest import SHIPPED

import ablation
import train
from embedding.readout import READOUT_DIM
from running import run_data
from stft_dataset import SeismicSTFTDataset


def test_fold_holds_its_networks_out_and_adds_the_foreign_recording(tmp_path):
    train_dir, test_dir = ablation.link_fold(("BK", "CI"), str(tmp_path))
    trained, held_out = set(os.listdir(train_dir)), set(os.listdir(test_dir))
    assert not trained & held_out and "BW.RJOB.EH.20090825T014000.mseed" in held_out
    assert {name.split(".")[0] for name in held_out} == {"BK", "CI", "BW"}
    assert "BK" not in {name.split(".")[0] for name in trained} and len(trained) + len(held_out) == 214 + 1


def test_stations_fold_holds_out_the_default_runs_validation_stations(tmp_path):
    _, args = train.parse_args([])
    dataset = SeismicSTFTDataset(SHIPPED, index_path=tmp_path / "index.npz")
    _, _, val_groups = run_data.split_samples(dataset, args, checkpoint=None)
    assert tuple(val_groups) == ablation.FOLDS["stations"]
    train_dir, test_dir = ablation.link_fold(ablation.FOLDS["stations"], str(tmp_path / "fold"))
    held_out = {ablation.station_of(name) for name in os.listdir(test_dir)}
    assert held_out == {*val_groups, "BW.RJOB"}
    assert not held_out & {ablation.station_of(name) for name in os.listdir(train_dir)}


def test_cut_copies_keep_a_seeded_45_to_90_s_of_each_held_out_file(tmp_path):
    _, test_dir = ablation.link_fold(("PG",), str(tmp_path))
    cut_dir = ablation.cut_copies(test_dir, "cut")
    assert sorted(os.listdir(cut_dir)) == sorted(os.listdir(test_dir))
    durations = []
    for name in sorted(os.listdir(cut_dir)):
        whole, cut = obspy.read(os.path.join(test_dir, name)), obspy.read(os.path.join(cut_dir, name))
        start = min(trace.stats.starttime for trace in whole)
        assert min(trace.stats.starttime for trace in cut) == start
        durations.append(max(trace.stats.endtime for trace in cut) - start)
        if name.startswith("PG"):
            assert ablation.CUTS["cut"][0] - 0.01 <= durations[-1] <= ablation.CUTS["cut"][1]
    assert len(set(durations)) == len(durations)  # a length of its own for each file
    again = ablation.cut_copies(ablation.link_fold(("PG",), str(tmp_path / "again"))[1], "cut")
    assert [obspy.read(os.path.join(again, n))[0].stats.npts for n in sorted(os.listdir(again))] == [
        obspy.read(os.path.join(cut_dir, n))[0].stats.npts for n in sorted(os.listdir(cut_dir))
    ]


def test_30_s_copies_are_48_time_bins_like_the_foreign_recording(tmp_path):
    _, test_dir = ablation.link_fold(("BK",), str(tmp_path))  # no padded ends (PG's are cut off, leaving less)
    whole = SeismicSTFTDataset(test_dir, index_path=tmp_path / "whole.npz")
    dataset = SeismicSTFTDataset(ablation.cut_copies(test_dir, "30 s"), index_path=tmp_path / "index.npz")
    lengths = {dataset[i][0].shape[-1] for i in range(len(dataset))}
    assert len(dataset) == len(whole) and lengths == {48}


def test_means_per_network_and_over_all_files():
    def sample(trace_id, *mse):  # model, time-mean, blur
        return {
            "trace_id": trace_id,
            **{w: {"mse": {"overall": v}} for w, v in zip(("model", "baseline", "blur"), mse)},
        }

    metrics = {"samples": [sample("BK.A..HH?", 1, 2, 3), sample("BK.B..HH?", 3, 4, 5), sample("CI.C..HH?", 5, 6, 7)]}
    groups = ablation.by_network(metrics)
    assert groups["BK"] == {"model": 2, "baseline": 3, "blur": 4, "files": 2}
    assert groups["all"] == {"model": 3, "baseline": 4, "blur": 5, "files": 3}


def test_unknown_lever_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(["--levers", "warp drive"])
    assert exit_info.value.code == 2 and "unknown lever or fold: warp drive" in capsys.readouterr().err


def test_tables_of_a_stored_run(tmp_path, capsys):
    means = {"model": 1.0, "baseline": 2.0, "blur": 4.0, "files": 3}
    row = {"lever": "default", "fold": "NC", "train_s": 1.0, "flags": [], "networks": {"all": means, "NC": means}}
    (tmp_path / "a.json").write_text(json.dumps([row]))
    ablation.main(["--tables", str(tmp_path / "a.json")])
    out = capsys.readouterr().out
    assert "| lever | NC: all | NC: cut | NC: 30 s |" in out and "| default | 0.50 / 0.25 |  |  |" in out  # summary
    assert "| default | NC | all | 3 | 1.00000 | 2.00000 | 4.00000 | 0.50 | 0.25 | 1 |" in out
    assert "| default | NC | NC | 3 |" in out.split("per network")[1]


def test_networks_folds_hold_each_shipped_network_out_alone():
    folds = ablation.parse_args(["--folds", "networks", "NC"]).folds
    assert folds == ["NC", "BK", "CI", "PG", "NN", "NP", "WR", "AZ", "TA"]  # NC once
    shipped = {name.split(".")[0] for name in os.listdir(SHIPPED) if name.endswith(".mseed")}
    assert set(folds) == shipped - {"BG"}  # BG has only DP files, of no default family
    assert all(ablation.FOLDS[fold] == (fold,) for fold in folds)
    assert ablation.parse_args([]).folds == ["stations", "NC", "not-NC"]


def test_tables_go_to_a_dated_results_file_with_their_provenance(tmp_path, capsys):
    means = {"model": 1.0, "baseline": 2.0, "blur": 4.0, "files": 3}
    row = {"lever": "default", "fold": "NC", "train_s": 1.0, "flags": [], "networks": {"all": means}}
    (tmp_path / "a.json").write_text(json.dumps([row]))
    ablation.main(["--tables", str(tmp_path / "a.json"), "--markdown", str(tmp_path / "results")])
    (written,) = os.listdir(tmp_path / "results")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-ablation\.md", written)
    text = (tmp_path / "results" / written).read_text()
    assert re.search(r"- measured: \d{4}-\d\d-\d\d \d\d:\d\d UTC, commit [0-9a-f]{4,}", text) and "- machine: " in text
    assert "| default | NC | all | 3 | 1.00000 | 2.00000 | 4.00000 | 0.50 | 0.25 | 1 |" in text


def representation(event, family, ami, clusters, clear=None):
    """A stored run's representation scores: event/noise and family 5-NN accuracies of (model, time-mean pooling,
    flattened spectrogram, time-mean spectrum), the clusters' AMI with the family and their number; with clear,
    (windows, model, flattened spectrogram, time-mean spectrum) on the clear windows."""
    names = ("model (readout)", "time-mean pooling", "flattened spectrogram, PCA", "time-mean spectrum")
    scores = {f"event/noise: {who}": {"knn_accuracy": v} for who, v in zip(names, event)}
    scores |= {f"family: {who}": {"knn_accuracy": v} for who, v in zip(names[:1] + names[2:], family)}
    if clear:
        scores["clear windows"] = clear[0]
        scores |= {f"clear event/noise: {who}": {"knn_accuracy": v} for who, v in zip(names[:1] + names[2:], clear[1:])}
    return scores | {"cluster AMI with family": ami, "clusters": clusters}


def test_representation_table_per_fold_and_its_mean(tmp_path, capsys):
    means = {"model": 1.0, "baseline": 2.0, "blur": 4.0, "files": 3}
    rows = [
        {"lever": "default", "fold": fold, "train_s": 1.0, "flags": [], "networks": {"all": means},
         "representation": representation(event, (0.5, 0.6, 0.7), ami, k)}
        for fold, event, ami, k in (("NC", (0.9, 0.8, 0.85, 0.7), 0.1, 2), ("not-NC", (0.7, 0.6, 0.8, 0.75), 0.3, 4))
    ]  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(rows))
    ablation.main(["--tables", str(tmp_path / "a.json")])
    out = capsys.readouterr().out.split("the embedding on the held-out files")[1]
    assert (
        "| default | NC | 0.900 | 0.800 | 0.850 | 0.700 | 0.050 | 0.500 | 0.600 | 0.700 | 0.10 (2) | 0.50 | 0.25 |"
        in out
    )
    assert "| default | not-NC | 0.700 | 0.600 | 0.800 | 0.750 | -0.100 |" in out  # the margin over the better one
    assert "| default | mean of 2 | 0.800 | 0.700 | 0.825 | 0.725 | -0.025 | 0.500 | 0.600 | 0.700 | 0.20 (3) |" in out
    assert "event/noise on the clear windows" not in out  # figures stored before labels_clear.csv: no such table


def test_clear_windows_table_beside_runs_stored_before_it(tmp_path, capsys):
    means = {"model": 1.0, "baseline": 2.0, "blur": 4.0, "files": 3}
    rows = [
        {"lever": "default", "fold": fold, "train_s": 1.0, "flags": [], "networks": {"all": means},
         "representation": representation((0.9, 0.8, 0.85, 0.7), (0.5, 0.6, 0.7), 0.1, 2, clear)}
        for fold, clear in (("NC", (280, 0.95, 0.96, 0.9)), ("not-NC", (250, 0.93, 0.9, 0.85)), ("stations", None))
    ]  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(rows))
    ablation.main(["--tables", str(tmp_path / "a.json")])
    out = capsys.readouterr().out.split("event/noise on the clear windows")[1].split("all held-out files")[0]
    assert "| default | NC | 280 | 0.950 | 0.960 | 0.900 | -0.010 |" in out
    assert "| default | not-NC | 250 | 0.930 | 0.900 | 0.850 | 0.030 |" in out
    assert "| default | mean of 2 | 265 | 0.940 | 0.930 | 0.875 | 0.010 |" in out and "stations" not in out


@pytest.mark.slow
def test_representation_scores_from_embed_on_held_out_files(trained, tmp_path):
    _, test_dir = ablation.link_fold(("AZ", "TA", "WR"), str(tmp_path / "fold"))  # 8 files and BW.RJOB (too short)
    scores = ablation.representation_scores(trained[0], test_dir, str(tmp_path / "out"))
    windows = scores["event/noise: model (readout)"]
    assert 0 <= windows["knn_accuracy"] <= 1 and windows["dim"] == READOUT_DIM
    assert scores["event/noise: time-mean pooling"]["dim"] == 256 * 9
    assert scores["event/noise: flattened spectrogram, PCA"]["dim"] == 32  # the read-out's size; 32 rows
    assert -1 <= scores["cluster AMI with family"] <= 1 and scores["clusters"] >= 2
    assert 16 <= scores["clear windows"] <= 32  # the 16 noise windows of the 8 files, and the clear event windows
    clear_baseline = scores["clear event/noise: flattened spectrogram, PCA"]
    assert clear_baseline["dim"] == min(32, scores["clear windows"])  # PCA gives at most one component a window
