import json
import os

import numpy as np
import pytest
import torch
from conftest import INCOMPLETE, copy_files, flags
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import checkpoints
import train
import training

TINY = ["--batch_size", "4", "--num_workers", "0", "--val_split", "0.25"]


def run(data_dir, tmp_path, *extra):
    argv = [
        "--data_dir",
        data_dir,
        "--checkpoint_dir",
        str(tmp_path / "checkpoints"),
        "--log_dir",
        str(tmp_path / "logs"),
        *TINY,
        *extra,
    ]
    return train.main(argv)


def test_run_writes_checkpoints_config_and_split(train_dir, tmp_path):
    summary = run(train_dir, tmp_path, "--num_epochs", "3", "--save_every", "1", "--keep_checkpoints", "2")
    run_dir = summary["run_dir"]
    assert sorted(n for n in os.listdir(run_dir) if n.endswith(".pt")) == [
        "best_model.pt",
        "checkpoint_epoch_2.pt",
        "checkpoint_epoch_3.pt",
        "last.pt",
    ]
    checkpoint = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)
    assert checkpoint["epoch"] == 3 and len(checkpoint["history"]) == 3
    assert checkpoint["stft_config"]["nperseg"] == 256 and checkpoint["model_config"]["features"] == [32, 64, 128, 256]
    with open(os.path.join(run_dir, "val_files.txt")) as f:
        val_files = f.read().split()
    assert val_files == checkpoint["val_files"] and len(val_files) == 3  # 25 % of 12 files
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config["dataset"] == {"usable_files": 12, "train_files": 9, "val_files": 3, "excluded_by_family": {}}
    assert config["args"]["num_epochs"] == 3 and "torch" in config["versions"]
    best = torch.load(os.path.join(run_dir, "best_model.pt"), weights_only=True)
    assert best["val_files"] == val_files
    assert best["best_val_loss"] == min(h["val_loss"] for h in checkpoint["history"])
    assert np.isfinite(summary["best_val_loss"])


def test_split_is_reproducible_from_the_seed():
    files = [f"f{i}.mseed" for i in range(50)]
    train_a, val_a = train.split_files(files, 0.2, seed=7)
    train_b, val_b = train.split_files(files, 0.2, seed=7)
    _, val_c = train.split_files(files, 0.2, seed=8)
    assert val_a == val_b and train_a == train_b and val_a != val_c
    assert len(val_a) == 10 and not set(val_a) & set(train_a) and len(train_a) + len(val_a) == 50


def test_tensorboard_events_hold_the_expected_tags(train_dir, tmp_path):
    summary = run(train_dir, tmp_path, "--num_epochs", "2")
    events = EventAccumulator(summary["log_dir"], size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/train_step", "loss/train", "loss/val", "learning_rate", "hparam/best_val_loss"} <= scalars
    assert [e.step for e in events.Scalars("loss/val")] == [1, 2]
    assert len(events.Scalars("loss/train_step")) == 2 * 3  # 9 training files in batches of 4
    images = events.Tags()["images"]
    assert len(images) == 3 and all(tag.startswith("reconstruction/") for tag in images)  # the 3 validation files
    assert len(events.Images(images[0])) == 2
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    assert (
        start.hparams["lr"].number_value == pytest.approx(training.LR) and start.hparams["batch_size"].number_value == 4
    )


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(train_dir, tmp_path):
    # A constant learning rate: a 2-epoch run extended to 4 then repeats a 4-epoch one exactly. A one-cycle
    # schedule spans --num_epochs; its interrupted-run case is in test_augment.py.
    constant = ("--lr_schedule", "constant")
    straight = run(train_dir, tmp_path / "a", "--num_epochs", "4", *constant)
    first = run(train_dir, tmp_path / "b", "--num_epochs", "2", *constant)
    resumed = train.main(
        flags(
            resume=os.path.join(first["run_dir"], "last.pt"),
            num_epochs="4",
            num_workers="0",
            checkpoint_dir=str(tmp_path / "b" / "checkpoints"),
        )
    )
    assert resumed["run_dir"] == first["run_dir"] and resumed["log_dir"] == first["log_dir"]
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    for a, b in zip(straight["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    events = EventAccumulator(resumed["log_dir"]).Reload()
    assert [e.step for e in events.Scalars("loss/val")] == [1, 2, 3, 4]


def test_resume_keeps_the_run_settings_of_the_checkpoint(train_dir, tmp_path):
    first = run(train_dir, tmp_path, "--num_epochs", "1")
    resumed = train.main(
        flags(resume=os.path.join(first["run_dir"], "last.pt"), num_epochs="2", num_workers="0", nfft="512")
    )
    checkpoint = torch.load(os.path.join(resumed["run_dir"], "last.pt"), weights_only=True)
    assert checkpoint["stft_config"]["nfft"] == 256 and checkpoint["args"]["batch_size"] == 4


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    checkpoints.save_checkpoint({"epoch": 1}, path)

    def dies_halfway(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_unusable_files_are_skipped_counted_and_reported(train_dir, tmp_path, capsys):
    copy_files(os.listdir(INCOMPLETE), train_dir, source=INCOMPLETE)
    open(os.path.join(train_dir, "empty.mseed"), "w").close()
    summary = run(train_dir, tmp_path, "--num_epochs", "1")
    assert summary["skipped"] == {"fewer than 3 components": 2, "empty file": 1}
    with open(os.path.join(summary["run_dir"], "skipped_files.json")) as f:
        skipped = json.load(f)
    assert skipped["counts"] == summary["skipped"] and len(skipped["files"]) == 3
    out = capsys.readouterr().out
    assert "skipped files: 2 fewer than 3 components, 1 empty file" in out
    assert "left out by --channels: 1 SH" in out  # the real SH file is filtered, not counted as bad


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--val_split", "1.5"], "--val_split must be between 0 and 1"),
        (["--noverlap", "300"], "noverlap < nperseg"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "device"),
        (["--resume", "missing.pt"], "missing.pt"),
    ],
)
def test_bad_arguments_give_a_clear_error(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--checkpoint_dir", str(tmp_path)] + flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_empty_data_directory_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data_dir", str(tmp_path / "empty"), "--checkpoint_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "0 usable files" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "checkpoints")
