"""embed.py --labels --groups and its protocol (representation.grouped_*), on real per-channel recordings of
landslides and avalanches (tests/data/exotic, from ../shared/data/exotic_events) and on built cases."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

import embed
from embedding.representation import grouped_chance, grouped_label_scores, grouped_neighbours

EXOTIC = os.path.join(os.path.dirname(__file__), "data", "exotic")


def test_grouped_neighbours_leave_out_every_row_sharing_a_group():
    # Row 0's nearest rows (1, 2) are of its event or its network and hold its label; the only others hold another.
    features = np.array([[0.0], [0.1], [0.2], [5.0], [6.0], [7.0]])
    event = np.array(["e1", "e1", "e2", "e3", "e4", "e5"])
    network = np.array(["A", "A", "A", "B", "B", "C"])
    labels = ["flow", "flow", "flow", "fall", "fall", "fall"]
    found = grouped_neighbours(features, [event, network], k=2)
    assert found[0].tolist() == [3, 4]  # 1 (same event) and 2 (same network) are left out, though nearest
    assert found[3].tolist() == [5, 2]  # 4 is of its network
    assert grouped_neighbours(features, [event], k=2)[0].tolist() == [2, 3]  # event alone: 2 is kept
    assert (grouped_neighbours(features, [np.array(["A"] * 6)], k=2) == -1).all()  # nothing left: no neighbour
    scores = grouped_label_scores(features, labels, {"eventid": event, "network": network}, seed=0, k=2)
    # Network A's rows (flow) can only be voted for by B's (fall): all wrong; B's and C's are right (a tie of 5 and 2
    # goes to the nearer, 5). Balanced: recall 0 of flow, 1 of fall.
    assert scores["knn_accuracy"] == pytest.approx(0.5) and scores["balanced_accuracy"] == pytest.approx(0.5)
    assert scores["ami_labels"] == pytest.approx(1.0) and set(scores) >= {"ami_eventid", "ami_network"}
    event_only = grouped_label_scores(features, labels, {"eventid": event}, seed=0, k=2)
    assert event_only["knn_accuracy"] == 1.0  # with the network allowed, it votes for its own kind


def test_grouped_chance_is_the_prior_rule():
    chance = grouped_chance(["a", "a", "a", "b"], {"eventid": None})
    assert chance == {"knn_accuracy": 0.75, "balanced_accuracy": 0.5, "ami_labels": 0.0, "ami_eventid": 0.0}


@pytest.fixture
def exotic(tmp_path):
    """The real per-channel files and a labels CSV that names only each recording's Z file (not its first)."""
    shutil.copytree(os.path.join(EXOTIC, "waveforms"), tmp_path / "waveforms")
    with open(os.path.join(EXOTIC, "labels.csv"), newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["seed_id"].endswith("Z")]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "path": row["path"][len("waveforms/") :]} for row in rows)
    return tmp_path


@pytest.mark.slow
def test_embed_groups_on_real_per_channel_files(trained, exotic, capsys):
    argv = [trained[0], "--data_dir", str(exotic / "waveforms"), "--output_dir", str(exotic / "out"), "--device"]
    argv += ["cpu", "--num_anomalies", "0", "--projector_points", "0", "--clusters", "2"]
    summary = embed.main(argv + ["--labels", str(exotic / "labels.csv"), "--groups", "eventid", "network"])
    result = summary["labels"]
    # 6 stations, 3 files each, at 40, 50 and 100 Hz: every recording indexed and labelled by its Z file alone
    assert summary["rows"] == result["recordings"] == 6
    assert result["counts"] == {"avalanche": 2, "fall": 2, "flow": 2}
    assert result["groups_held"] == {"eventid": 3, "network": 5}
    assert list(result["scores"]) == ["model (readout)", "flattened spectrogram, PCA", "time-mean spectrum"]
    for scores in result["scores"].values():  # each row keeps 4 neighbours (the other 2 events, other networks)
        assert scores["scored"] == 6
        assert 0 <= scores["balanced_accuracy"] <= 1 and {"ami_labels", "ami_eventid", "ami_network"} <= set(scores)
    assert result["chance"]["balanced_accuracy"] == pytest.approx(1 / 3)
    with open(exotic / "out" / "labels.json") as f:
        assert json.load(f)["groups"] == ["eventid", "network"]
    out = capsys.readouterr().out
    assert "neighbours sharing eventid or network left out" in out and "AMI network" in out


def test_groups_name_a_missing_column(trained, exotic, capsys):
    argv = [trained[0], "--data_dir", str(exotic / "waveforms"), "--output_dir", str(exotic / "out"), "--device"]
    argv += ["cpu", "--labels", str(exotic / "labels.csv"), "--groups", "volcano"]
    with pytest.raises(SystemExit):
        embed.main(argv)
    assert "--groups volcano: not a column of" in capsys.readouterr().err
