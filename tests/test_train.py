import json
import os

import numpy as np
import pytest
import torch
from conftest import INCOMPLETE, copy_files, flags, shipped_files
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from waveform_files import nan_samples

import inference
import train
from reading.recordings import choose_val_groups
from reading.transform import STFTConfig
from running import checkpoints, training
from stft_dataset import SeismicSTFTDataset

# --split_by file: these tests count validation files (the default, station, is tested in test_windows.py)
TINY = ["--batch_size", "4", "--num_workers", "0", "--val_split", "0.25", "--split_by", "file"]


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


@pytest.mark.slow
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
    assert checkpoint["model_config"]["size_fit"] == "pad" and checkpoint["args"]["size_fit"] == "pad"
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
    train_a, val_a = split_files(files, 0.2, seed=7)
    train_b, val_b = split_files(files, 0.2, seed=7)
    _, val_c = split_files(files, 0.2, seed=8)
    assert val_a == val_b and train_a == train_b and val_a != val_c
    assert len(val_a) == 10 and not set(val_a) & set(train_a) and len(train_a) + len(val_a) == 50


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(train_dir, tmp_path):
    # On the CPU only: CUDA's bilinear interpolation backward adds with atomics, in no fixed order, so two
    # runs differ in the last bits and rel=1e-5 would flake under --device auto on a GPU machine.
    # A constant learning rate: a 2-epoch run extended to 4 then repeats a 4-epoch one exactly. A one-cycle
    # schedule spans --num_epochs; its interrupted-run case is in test_augment.py.
    fixed = ("--device", "cpu", "--lr_schedule", "constant")
    straight = run(train_dir, tmp_path / "a", "--num_epochs", "4", *fixed)
    first = run(train_dir, tmp_path / "b", "--num_epochs", "2", *fixed)
    resumed = train.main(
        flags(
            resume=os.path.join(first["run_dir"], "last.pt"),
            num_epochs="4",
            num_workers="0",
            device="cpu",
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


@pytest.mark.slow
def test_resume_keeps_the_run_settings_of_the_checkpoint(train_dir, tmp_path, capsys):
    first = run(train_dir, tmp_path, "--num_epochs", "1")
    resumed = train.main(
        flags(resume=os.path.join(first["run_dir"], "last.pt"), num_epochs="2", num_workers="0", nfft="512")
    )
    checkpoint = torch.load(os.path.join(resumed["run_dir"], "last.pt"), weights_only=True)
    assert checkpoint["stft_config"]["nfft"] == 256 and checkpoint["args"]["batch_size"] == 4
    err = capsys.readouterr().err
    assert "--nfft 512 ignored: a resumed run keeps its checkpoint's value 256" in err
    assert "--batch_size" not in err  # not given: nothing to warn about


@pytest.mark.slow
def test_a_run_from_before_size_fit_and_arch_resumes_as_the_seed_model(train_dir, tmp_path):
    first = run(train_dir, tmp_path, "--num_epochs", "1", "--size_fit", "interpolate")
    path = os.path.join(first["run_dir"], "last.pt")
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["args"]["size_fit"], checkpoint["model_config"]["size_fit"]  # as written before the flags
    del checkpoint["args"]["arch"]
    checkpoints.save_checkpoint(checkpoint, path)
    resumed = train.main(flags(resume=path, num_epochs="2", num_workers="0"))
    checkpoint = torch.load(os.path.join(resumed["run_dir"], "last.pt"), weights_only=True)
    assert checkpoint["model_config"]["size_fit"] == "interpolate" and checkpoint["args"]["size_fit"] == "interpolate"
    assert checkpoint["args"]["arch"] == "seed" and checkpoint["model_config"]["features"] == [32, 64, 128, 256]


@pytest.mark.slow
def test_arch_is_stored_in_the_checkpoint_and_kept_on_resume(train_dir, tmp_path, capsys):
    first = run(train_dir, tmp_path, "--num_epochs", "1", "--arch", "stride8")
    path = os.path.join(first["run_dir"], "last.pt")
    resumed = train.main(flags(resume=path, num_epochs="2", num_workers="0", arch="wide"))
    assert "--arch wide ignored: a resumed run keeps its checkpoint's value stride8" in capsys.readouterr().err
    checkpoint = torch.load(os.path.join(resumed["run_dir"], "last.pt"), weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["arch"] == "stride8"
    assert checkpoint["model_config"]["features"] == [32, 64, 128]
    model = checkpoints.model_from_checkpoint(checkpoint)  # what inference.py and embed.py load: no flag needed
    assert model.encode(torch.rand(1, 3, 129, 142)).shape == (1, 128, 17, 18)


@pytest.mark.slow
def test_resume_from_a_moved_directory_with_files_added_and_removed(tmp_path, capsys):
    """The data moved (--data_dir honoured), 2 files were added (they train) and a validation file is gone."""
    data_dir = copy_files(shipped_files(per_family=3), tmp_path / "old")
    first = run(data_dir, tmp_path, "--num_epochs", "1", "--batch_size", "2")
    checkpoint = torch.load(os.path.join(first["run_dir"], "last.pt"), weights_only=True)
    assert checkpoint["global_step"] == 5  # 9 training files in batches of 2
    moved = str(tmp_path / "moved")
    os.rename(data_dir, moved)
    os.remove(os.path.join(moved, checkpoint["val_files"][0]))
    copy_files([shipped_files(("HH", "BH"), per_family=4)[k] for k in (3, 7)], moved)  # the 4th HH and BH files
    train.main(flags(resume=os.path.join(first["run_dir"], "last.pt"), num_epochs="2", num_workers="0", data_dir=moved))
    last = torch.load(os.path.join(first["run_dir"], "last.pt"), weights_only=True)
    assert last["args"]["data_dir"] == moved and last["val_files"] == checkpoint["val_files"]
    assert last["global_step"] == 5 + 6  # 11 training files: the 9 of the split and the 2 added
    assert np.isfinite(last["history"][1]["val_loss"])  # from the 2 validation files left
    assert "1 validation files of this run are no longer in" in capsys.readouterr().err


@pytest.mark.slow
def test_a_few_epochs_make_the_loss_fall_and_beat_the_baseline(train_dir, tmp_path):
    """The model learns: with a learning rate of 0 every other test passes. 9 training files, 3 to validate.

    A coarse STFT (65 frequency x 71 time bins, a quarter of the default's) and batches of 1 make 108 steps cheap.
    On the development machine the best validation MSE falls from 0.050 after epoch 1 to 0.0157 (background-db;
    min-max went from 0.23 to 0.0075), and the model beats the time-mean baseline on the validation files.
    """
    stft = flags(nperseg=128, noverlap=0, nfft=128)
    argv = flags(num_epochs=12, batch_size=1, lr=0.003, save_every=2, keep_checkpoints=0, cache_dir=tmp_path / "cache")
    plain = ["--lr_schedule", "constant", "--spectral_tilt", "0", "--noise_floor", "0"]  # see test_augment.py
    summary = run(train_dir, tmp_path, *argv, *stft, *plain, "--device", "cpu")
    train_losses = [h["train_loss"] for h in summary["history"]]
    assert train_losses[-1] < 0.1 * train_losses[0]
    assert summary["best_val_loss"] < 0.5 * summary["history"][0]["val_loss"]  # 0.050 -> 0.0157
    run_dir = summary["run_dir"]
    last = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)
    assert last["optimizer_state"]["param_groups"][0]["lr"] == 0.003  # --lr reaches Adam
    periodic = {n for n in os.listdir(run_dir) if n.startswith("checkpoint_epoch_")}
    assert periodic == {f"checkpoint_epoch_{epoch}.pt" for epoch in range(2, 13, 2)}  # --keep_checkpoints 0: all
    metrics = inference.main(
        [os.path.join(run_dir, "best_model.pt"), *flags(num_samples=0, num_plots=0, output_dir=tmp_path / "results")]
    )
    assert metrics["num_samples"] == 3
    assert metrics["model"]["mse"]["overall"] < metrics["baseline"]["mse"]["overall"]


def test_data_and_stft_flags_reach_the_run(train_dir, tmp_path):
    """--channels, --extensions and --nperseg/--noverlap/--nfft in a real run: the files used and the shapes."""
    names = sorted(os.listdir(train_dir))
    hh, eh = [n for n in names if ".HH." in n], [n for n in names if ".EH." in n]
    os.rename(os.path.join(train_dir, hh[0]), os.path.join(train_dir, hh[0] + ".seed"))  # read: extension listed
    os.rename(os.path.join(train_dir, eh[0]), os.path.join(train_dir, eh[0] + ".txt"))  # never looked at
    argv = ["--channels", "HH", "BH", "--extensions", ".mseed", ".seed"]
    summary = run(train_dir, tmp_path, *argv, *flags(num_epochs=1, nperseg=128, noverlap=64, nfft=128))
    with open(os.path.join(summary["run_dir"], "config.json")) as f:
        config = json.load(f)
    assert config["dataset"]["usable_files"] == 6  # 3 HH (one of them .seed) and 3 BH
    assert config["dataset"]["excluded_by_family"] == {"HN": 3, "EH": 2}
    checkpoint = torch.load(os.path.join(summary["run_dir"], "last.pt"), weights_only=True)
    assert checkpoint["stft_config"] == {**checkpoint["stft_config"], "nperseg": 128, "noverlap": 64, "nfft": 128}
    assert checkpoint["args"]["channels"] == ["HH", "BH"]
    stft = STFTConfig(nperseg=128, noverlap=64, nfft=128)
    dataset = SeismicSTFTDataset(train_dir, ["HH", "BH"], stft, [".mseed", ".seed"], index_path=tmp_path / "i.json")
    position = {f: i for i, f in enumerate(dataset.files)}
    events = EventAccumulator(summary["log_dir"], size_guidance={"images": 0}).Reload()
    for tag in events.Tags()["images"]:  # rows E, N, Z of 65 frequency bins; input | reconstruction
        file_id = tag.split("_", 1)[1]
        (n_time,) = {dataset[position[f]][0].shape[-1] for f in checkpoint["val_files"] if f.startswith(file_id)}
        image = events.Images(tag)[0]
        assert (image.height, image.width) == (3 * 65, 2 * n_time)


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


@pytest.mark.slow
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


@pytest.mark.parametrize("keep, kept", [(2, [10, 11]), (0, [8, 9, 10, 11])])
def test_prune_keeps_the_newest_checkpoints_by_epoch_number(tmp_path, keep, kept):
    for name in ["last.pt", "best_model.pt"] + [f"checkpoint_epoch_{epoch}.pt" for epoch in (8, 9, 10, 11)]:
        (tmp_path / name).write_bytes(b"")
    checkpoints.prune_checkpoints(str(tmp_path), keep)
    expected = ["last.pt", "best_model.pt"] + [f"checkpoint_epoch_{epoch}.pt" for epoch in kept]
    assert sorted(os.listdir(tmp_path)) == sorted(expected)  # 10 and 11 are newer than 9, whatever the name order


def with_nan_files(tmp_path):
    """4 real HH files and 2 copies of a real one with NaN samples (rejected on a full read only): 6 files."""
    data_dir = copy_files(shipped_files(("HH",), per_family=4), tmp_path / "waveforms")
    nan_names = {f"AZ.KNW.HH.nan{k}.mseed" for k in range(2)}
    for k, name in enumerate(sorted(nan_names)):
        os.replace(nan_samples(copy_files([], tmp_path / f"nan{k}")), os.path.join(data_dir, name))
    return data_dir, nan_names


def seed_for(data_dir, wanted):
    """A --seed whose split (--val_split 0.25: 2 of 6) meets `wanted(validation files)`."""
    files = sorted(os.listdir(data_dir))
    return next(seed for seed in range(1000) if wanted(set(split_files(files, 0.25, seed)[1])))


@pytest.mark.slow
def test_training_batches_whose_files_all_fail_take_no_step(tmp_path):
    data_dir, nan_names = with_nan_files(tmp_path)
    seed = seed_for(data_dir, lambda val: not val & nan_names)  # both NaN files train, alone in their batches
    summary = run(data_dir, tmp_path, *flags(num_epochs=1, batch_size=1, seed=seed))
    assert summary["skipped"] == {"NaN or infinite samples": 2}
    last = torch.load(os.path.join(summary["run_dir"], "last.pt"), weights_only=True)
    assert last["global_step"] == 2 and last["optimizer_state"]["state"][0]["step"] == 2  # the 2 usable files
    assert np.isfinite(last["history"][0]["train_loss"]) and np.isfinite(last["history"][0]["val_loss"])


def test_validation_files_that_all_fail_stop_the_run_with_one_line(tmp_path, capsys):
    data_dir, nan_names = with_nan_files(tmp_path)
    seed = seed_for(data_dir, lambda val: val == nan_names)
    with pytest.raises(SystemExit) as exit_info:
        run(data_dir, tmp_path, *flags(num_epochs=2, seed=seed))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "error: none of the 2 validation files could be read" in captured.err and "Traceback" not in captured.err
    assert "best validation loss" not in captured.out
    (run_name,) = os.listdir(tmp_path / "checkpoints")
    assert not [n for n in os.listdir(tmp_path / "checkpoints" / run_name) if n.endswith(".pt")]


def test_ctrl_c_exits_130_and_prints_the_resume_command(real_dir, tmp_path, monkeypatch, capsys):
    def interrupted(run, epoch, *rest):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        run(real_dir, tmp_path, "--channels", "HH", "--num_epochs", "7")  # 2 files: 1 to train, 1 to validate
    assert exit_info.value.code == 130
    (run_name,) = os.listdir(tmp_path / "checkpoints")
    last = os.path.join(str(tmp_path / "checkpoints"), run_name, "last.pt")
    assert f"continue with: python train.py --resume {last} --num_epochs 7" in capsys.readouterr().err


def split_files(files, val_split, seed):
    """Reproducible train/validation split of relative paths: (train, val), both sorted (--split_by file)."""
    keys = np.array(sorted(files), dtype=str)
    val = set(choose_val_groups(keys, np.arange(len(keys)), val_split, seed))
    return [f for f in files if f not in val], sorted(val)
