"""Faults of real machines, in short runs on shipped recordings: SIGTERM/SIGUSR1 mid-epoch, saves within an epoch
and exact resumes from them, disk full, damaged checkpoints, files that vanish, damaged cache shards; and a quick
subset of tests/faults.py (which runs every fault in its own process)."""

import errno
import glob
import logging
import os
import shutil
import signal

import faults
import numpy as np
import pytest
import torch
from conftest import copy_files, flags, shipped_files
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import BatchSampler, RandomSampler

import train
from running import storage, training
from running.checkpoints import load_checkpoint, resume_point
from running.preemption import SkipFirst
from stft_dataset import SeismicSTFTDataset

pytestmark = pytest.mark.slow  # fault runs: training runs stopped and resumed

TINY = ["--batch_size", "4", "--num_workers", "0", "--val_split", "0.25", "--split_by", "file", "--device", "cpu"]
TINY += ["--crop_bins", "40", "142"]  # not the default: a resume within an epoch must draw the same crops again
STEPS = 3  # 9 training files in batches of 4


def common(data_dir, base, *extra):
    return [*flags(data_dir=data_dir, checkpoint_dir=base / "c", log_dir=base / "l", num_epochs=2), *TINY, *extra]


def stop_at(monkeypatch, global_step, action):
    """train.train_epoch whose after_step calls action() once the run has done `global_step` steps."""
    original = training.train_epoch

    def train_epoch(*args, **kwargs):
        epoch, after = args[7], args[-1]

        def after_step(step, sums, losses):
            if (epoch - 1) * STEPS + step == global_step:
                action()
            after(step, sums, losses)

        return original(*args[:-1], after_step, **kwargs)

    monkeypatch.setattr(train, "train_epoch", train_epoch)


def history(summary_or_checkpoint):
    return [(h["train_loss"], h["val_loss"]) for h in summary_or_checkpoint["history"]]


def assert_same_losses(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """12 real files: 9 train (3 steps an epoch in batches of 4), 3 validate."""
    return copy_files(shipped_files(per_family=3), tmp_path_factory.mktemp("data") / "train_waveforms")


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """A 2-epoch run (crops and one-cycle, as by default) that nothing interrupts: its summary."""
    return train.main(common(data_dir, tmp_path_factory.mktemp("straight")))


@pytest.fixture(scope="module")
def stopped(data_dir, tmp_path_factory):
    """The same run, with --save_every 1, sent SIGTERM during step 1 of epoch 2: (its folder, exit code, log lines).
    Tests copy the folder before they change anything in it."""
    base, lines = tmp_path_factory.mktemp("stopped"), []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("train").addHandler(handler)
    with pytest.MonkeyPatch.context() as monkeypatch:
        stop_at(monkeypatch, STEPS + 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(SystemExit) as stopped:
            train.main(common(data_dir, base, "--save_every", "1"))
    logging.getLogger("train").removeHandler(handler)
    return base, stopped.value.code, lines


def copy_of(stopped, tmp_path):
    """A copy of the stopped run's folders in tmp_path; its run folder."""
    shutil.copytree(stopped[0], tmp_path, dirs_exist_ok=True)
    return run_dir_of(tmp_path)


def run_dir_of(base):
    (name,) = os.listdir(base / "c")
    return os.path.join(base / "c", name)


def test_sigterm_mid_epoch_saves_the_position_and_resume_repeats_the_losses(data_dir, straight, stopped, tmp_path):
    _, code, lines = stopped
    assert code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler was only the run's
    run_dir = copy_of(stopped, tmp_path)
    last = os.path.join(run_dir, "last.pt")
    stopped_line = "stopped by SIGTERM after step 1 of epoch 2; last.pt saved; continue with: python train.py --resume"
    assert any(line.startswith(stopped_line) for line in lines)
    saved = load_checkpoint(last)
    assert (saved["epoch"], saved["in_epoch"]["epoch"], saved["in_epoch"]["step"]) == (1, 2, 1)
    resumed = train.main(common(data_dir, tmp_path, "--resume", last))
    assert_same_losses(history(straight), history(resumed))
    steps = [e.step for e in EventAccumulator(resumed["log_dir"]).Reload().Scalars("loss/train_step")]
    assert steps == list(range(1, 2 * STEPS + 1))  # every step once, none lost or repeated


def test_sigusr1_stops_the_same_way_with_its_own_exit_code(data_dir, tmp_path, monkeypatch):
    stop_at(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    with pytest.raises(SystemExit) as stopped:
        train.main(common(data_dir, tmp_path))
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert load_checkpoint(os.path.join(run_dir_of(tmp_path), "last.pt"))["in_epoch"]["step"] == 2


def test_a_crash_after_a_save_within_the_epoch_resumes_exactly_with_two_workers(
    data_dir, straight, tmp_path, monkeypatch
):
    """--save_every_steps 2: last.pt at step 2 of epoch 2; a crash at step 3 (as kill -9) loses one step; the resume
    (2 DataLoader workers, against the uninterrupted run's 0) gives the same losses."""

    def crash():
        raise KeyboardInterrupt  # ends the run without a save, as kill -9 would

    stop_at(monkeypatch, STEPS + 3, crash)
    with pytest.raises(SystemExit):
        train.main(common(data_dir, tmp_path, "--save_every_steps", "2", "--num_workers", "2"))
    last = os.path.join(run_dir_of(tmp_path), "last.pt")
    assert load_checkpoint(last)["in_epoch"]["step"] == 2
    monkeypatch.undo()
    resumed = train.main(common(data_dir, tmp_path, "--resume", last, "--num_workers", "2"))
    assert_same_losses(history(straight), history(resumed))


@pytest.mark.parametrize(
    "damage, shown",
    [
        (lambda path: os.truncate(path, os.path.getsize(path) // 3), "RuntimeError: PytorchStreamReader"),
        (lambda path: os.truncate(path, 0), "(0 bytes)"),
        (lambda path: torch.save({"state_dict": {}}, path), "is not a checkpoint of this project"),
    ],
    ids=["truncated", "empty", "foreign"],
)
def test_a_damaged_last_pt_names_the_newest_intact_checkpoint(data_dir, stopped, tmp_path, capsys, damage, shown):
    run_dir = copy_of(stopped, tmp_path)
    damage(os.path.join(run_dir, "last.pt"))
    with pytest.raises(SystemExit) as refused:
        train.main(common(data_dir, tmp_path, "--resume", os.path.join(run_dir, "last.pt")))
    err = capsys.readouterr().err
    intact = os.path.join(run_dir, "checkpoint_epoch_1.pt")
    assert refused.value.code == 2 and shown in err and "Traceback" not in err
    assert f"the newest intact checkpoint there is {intact} (--resume {intact})" in err
    assert resume_point(run_dir, "unused")[0] == intact  # --resume <folder>
    assert resume_point("auto", str(tmp_path / "c"))[0] == intact  # --resume auto: the run written last


def failing_fsync(monkeypatch, fails):
    """os.fsync that raises ENOSPC for files whose name fails(name, number of .pt files synced before) says."""
    real, synced = os.fsync, []

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if fails(name, len(synced)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        synced.extend([name] if ".pt.tmp" in name else [])
        real(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)


def test_disk_full_at_a_save_names_the_file_and_the_newest_intact_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    failing_fsync(monkeypatch, lambda name, pt_files: ".pt.tmp" in name and pt_files == 2)  # epoch 2's first
    with pytest.raises(SystemExit) as failed:
        train.main(common(data_dir, tmp_path))
    run_dir = run_dir_of(tmp_path)
    last = os.path.join(run_dir, "last.pt")
    err = capsys.readouterr().err
    assert failed.value.code == 2 and "Traceback" not in err
    assert f"error: could not write {run_dir}/best_model.pt: No space left on device" in err
    assert f"the newest intact checkpoint is {last}; once there is room: python train.py --resume {last}" in err
    assert load_checkpoint(last)["epoch"] == 1
    assert not [name for name in os.listdir(run_dir) if ".tmp" in name]


def test_a_checkpoint_folder_that_cannot_be_written_stops_the_run_before_training(
    data_dir, tmp_path, monkeypatch, capsys
):
    failing_fsync(monkeypatch, lambda name, pt_files: name.startswith(".write_probe"))
    monkeypatch.setattr(train, "train_epoch", lambda *args: pytest.fail("trained"))
    with pytest.raises(SystemExit) as failed:
        train.main(common(data_dir, tmp_path))
    err = capsys.readouterr().err
    assert failed.value.code == 2
    assert ".write_probe: No space left on device; nothing was trained" in err and "Traceback" not in err


def test_files_that_vanish_or_shrink_during_a_run_are_skipped_with_their_reason(data_dir, tmp_path):
    data_dir = str(shutil.copytree(data_dir, tmp_path / "data"))
    dataset = SeismicSTFTDataset(data_dir)
    os.remove(os.path.join(data_dir, dataset.files[0]))
    path = os.path.join(data_dir, dataset.files[1])
    os.truncate(path, os.path.getsize(path) // 2)
    assert dataset[0][1]["skip_reason"] == "file missing or unreadable"
    assert dataset[1][1]["skip_reason"] == "damaged or truncated miniSEED"
    assert dataset[2][0] is not None


def test_a_damaged_cache_shard_is_computed_again(data_dir, tmp_path, caplog):
    cache_dir = str(tmp_path / "cache")
    built = SeismicSTFTDataset(data_dir, cache_dir=cache_dir, processes=1)
    expected = [built[i][0].numpy() for i in range(len(built))]
    (shard,) = glob.glob(os.path.join(cache_dir, "*", "shard_0.f16"))
    opened = SeismicSTFTDataset(data_dir, cache_dir=cache_dir, processes=1)
    os.truncate(shard, os.path.getsize(shard) // 2)  # cut after this dataset checked it: its file is read instead
    assert opened[len(opened) - 1][0].dtype == torch.float32
    again = SeismicSTFTDataset(data_dir, cache_dir=cache_dir, processes=1)
    assert "cache shard" in caplog.text and "damaged" in caplog.text
    assert all(np.array_equal(again[i][0].numpy(), expected[i]) for i in range(len(again)))
    assert again[0][0].dtype == torch.float16


def test_skip_first_leaves_out_the_first_batches_of_any_batch_order():
    order = BatchSampler(RandomSampler(range(10), generator=torch.Generator().manual_seed(3)), 3, drop_last=False)
    whole = list(BatchSampler(RandomSampler(range(10), generator=torch.Generator().manual_seed(3)), 3, False))
    resumed = SkipFirst(order, skip=2)
    assert list(resumed) == whole[2:] and len(resumed) == len(whole) == 4
    assert list(SkipFirst([[5], [1, 2], [0]], skip=1)) == [[1, 2], [0]]


def test_fault_script_quick_subset():
    """tests/faults.py itself, two faults in their own processes: SIGTERM at a random step, a folder too small."""
    rows = {row["fault"].split(" ")[0]: row for row in faults.main(["--only", "sigterm", "full_before_start"])}
    assert rows["SIGTERM"]["seen"].startswith("exit 143: stopped by SIGTERM after step")
    assert rows["SIGTERM"]["lost"] == "0" and rows["SIGTERM"]["exact"].startswith("yes")
    assert rows["checkpoint"]["seen"].startswith("exit 2: error: could not write")
    assert ".write_probe: No space left on device" in rows["checkpoint"]["seen"]
