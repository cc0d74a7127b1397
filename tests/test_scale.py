"""Scale-out paths of train.py on CPU: DistributedDataParallel under torchrun (gloo), mixed precision,
torch.compile, and the helpers behind them. Real shipped recordings throughout."""

import json
import os
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import ROOT, copy_files, flags, shipped_files
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Subset
from waveform_files import nan_samples

import inference
import train
from model import ConvAutoencoder
from running import training
from running.checkpoints import clean_state_dict, model_from_checkpoint
from running.device import mixed_precision
from running.distributed import epoch_seed, sum_over_processes
from stft_dataset import SeismicSTFTDataset, SkipLog, pad_collate

PROCESSES = 2
DDP_FILES = 20  # real HH files: 4 validation (val_split 0.2) + 16 training = 8 per process
CPU = torch.device("cpu")


def torchrun(probe_dir, *argv):
    """tests/ddp_probe.py (train.main with a record of the files each process read) in 2 processes."""
    os.makedirs(probe_dir, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(PROCESSES),
        os.path.join("tests", "ddp_probe.py"),
        *argv,
        "--split_by",  # these tests count validation files
        "file",
        "--num_workers",
        "0",
        "--device",
        "cpu",
    ]
    result = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "PROBE_DIR": str(probe_dir)}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"torchrun exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def recorded(probe_dir, data_dir, rank, epoch, suffix=""):
    """Relative paths (as in val_files.txt) of the samples one process read in one epoch, in order."""
    with open(os.path.join(probe_dir, f"rank{rank}_epoch{epoch}{suffix}.txt")) as f:
        return [os.path.relpath(path, data_dir) for path in f.read().split()]


def event_files(directory):
    return [name for name in os.listdir(directory) if name.startswith("events.out.tfevents")]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One epoch under torchrun with 2 processes; what it left on disk, read before anything resumes it."""
    base = tmp_path_factory.mktemp("ddp")
    names = shipped_files(("HH",), per_family=DDP_FILES)
    assert len(names) == DDP_FILES, f"only {len(names)} HH files shipped in data/filtered_waveforms"
    data_dir = copy_files(names, base / "waveforms")
    checkpoint_dir, log_dir, probe_dir = base / "checkpoints", base / "logs", base / "probe"
    torchrun(
        probe_dir,
        "--data_dir",
        data_dir,
        "--num_epochs",
        "1",
        "--batch_size",
        "4",
        "--checkpoint_dir",
        str(checkpoint_dir),
        "--log_dir",
        str(log_dir),
    )
    runs = os.listdir(checkpoint_dir)
    run_dir = os.path.join(checkpoint_dir, runs[0])
    with open(os.path.join(run_dir, "val_files.txt")) as f:
        val_files = f.read().split()
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    return {
        "names": names,
        "data_dir": data_dir,
        "checkpoint_dir": checkpoint_dir,
        "log_dir": log_dir,
        "probe_dir": probe_dir,
        "runs": runs,
        "log_runs": os.listdir(log_dir),
        "run_dir": run_dir,
        "run_files": sorted(os.listdir(run_dir)),
        "val_files": val_files,
        "config": config,
        "events": event_files(os.path.join(log_dir, runs[0])) if os.listdir(log_dir) == runs else [],
        "best": torch.load(os.path.join(run_dir, "best_model.pt"), weights_only=True),
        "last": torch.load(os.path.join(run_dir, "last.pt"), weights_only=True),
        "train": [recorded(probe_dir, data_dir, rank, 1) for rank in range(PROCESSES)],
        "val": [recorded(probe_dir, data_dir, rank, 1, "_val") for rank in range(PROCESSES)],
        "evaluated_states": [
            torch.load(os.path.join(probe_dir, f"rank{rank}_epoch1_model.pt"), weights_only=True)
            for rank in range(PROCESSES)
        ],
    }


@pytest.fixture(scope="module")
def ddp_resumed(ddp_run):
    """The same run continued for a second epoch, again with 2 processes."""
    probe_dir = ddp_run["probe_dir"].parent / "probe_resumed"
    torchrun(probe_dir, "--resume", os.path.join(ddp_run["run_dir"], "last.pt"), "--num_epochs", "2")
    return {
        "probe_dir": probe_dir,
        "train": [recorded(probe_dir, ddp_run["data_dir"], rank, 2) for rank in range(PROCESSES)],
        "last": torch.load(os.path.join(ddp_run["run_dir"], "last.pt"), weights_only=True),
    }


def assert_one_share_per_process(shares, train_files):
    """Each process trains on its own 8 files; together they cover every training file once."""
    assert [len(share) for share in shares] == [len(train_files) // PROCESSES] * PROCESSES
    assert all(len(set(share)) == len(share) for share in shares)
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(train_files)


@pytest.mark.slow
def test_ddp_processes_train_on_disjoint_halves_of_the_training_files(ddp_run):
    config = ddp_run["config"]
    assert config["processes"] == PROCESSES
    assert config["dataset"]["usable_files"] == DDP_FILES and config["skipped"] == {}
    val_files = ddp_run["val_files"]
    assert len(val_files) == 4 and set(val_files) <= set(ddp_run["names"])
    assert_one_share_per_process(ddp_run["train"], sorted(set(ddp_run["names"]) - set(val_files)))


@pytest.mark.slow
def test_ddp_validation_evaluates_every_validation_file_once(ddp_run):
    shares = ddp_run["val"]
    assert [len(share) for share in shares] == [2, 2]
    assert sorted(shares[0] + shares[1]) == sorted(ddp_run["val_files"])


@pytest.mark.slow
def test_ddp_only_rank_zero_writes_one_run_folder(ddp_run):
    assert len(ddp_run["runs"]) == 1 and ddp_run["log_runs"] == ddp_run["runs"]
    assert len(ddp_run["events"]) == 1
    assert [n for n in ddp_run["run_files"] if n.endswith(".pt")] == ["best_model.pt", "last.pt"]
    assert {"config.json", "val_files.txt", "skipped_files.json"} <= set(ddp_run["run_files"])
    last = ddp_run["last"]
    assert last["epoch"] == 1 and last["val_files"] == ddp_run["val_files"]
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in last["model_state"])
    assert np.isfinite(last["history"][0]["train_loss"]) and np.isfinite(last["history"][0]["val_loss"])


@pytest.mark.slow
def test_ddp_processes_validate_the_model_that_is_saved(ddp_run):
    """Every process validates exactly the saved weights, BatchNorm statistics included (rank 0's, broadcast)."""
    saved = ddp_run["best"]["model_state"]
    for rank, state in enumerate(ddp_run["evaluated_states"]):
        for key, value in saved.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=f"rank {rank}: {key}")


@pytest.mark.slow
def test_ddp_validation_loss_equals_a_single_process_evaluation(ddp_run):
    """best_model.pt after epoch 1 holds the weights its best_val_loss was measured with."""
    best = ddp_run["best"]
    assert best["epoch"] == best["best_epoch"] == 1
    model = model_from_checkpoint(best)
    dataset = SeismicSTFTDataset(ddp_run["data_dir"], ["HH"])
    position = {f: i for i, f in enumerate(dataset.files)}
    sums = np.zeros(2)
    for share in ddp_run["val"]:  # the same batches as the processes formed (padding changes the output)
        loader = DataLoader(Subset(dataset, [position[f] for f in share]), batch_size=4, collate_fn=pad_collate)
        sums += sum_over_processes(training.evaluate(model, loader, nullcontext, CPU, SkipLog()), CPU)
    assert training.mean_loss(*sums) == pytest.approx(best["best_val_loss"], rel=1e-5)


@pytest.mark.slow
def test_ddp_resume_continues_the_same_run(ddp_run, ddp_resumed):
    last = ddp_resumed["last"]
    assert last["epoch"] == 2 and [h["epoch"] for h in last["history"]] == [1, 2]
    assert last["history"][0] == ddp_run["last"]["history"][0]
    assert os.listdir(ddp_run["checkpoint_dir"]) == ddp_run["runs"]
    assert os.listdir(ddp_run["log_dir"]) == ddp_run["runs"]
    with open(os.path.join(ddp_run["run_dir"], "config.json")) as f:
        assert json.load(f)["processes"] == PROCESSES
    assert_one_share_per_process(ddp_resumed["train"], sorted(set(ddp_run["names"]) - set(ddp_run["val_files"])))
    assert ddp_resumed["train"][0] != ddp_run["train"][0]  # sampler.set_epoch: a new order each epoch


@pytest.mark.slow
def test_ddp_checkpoint_counts_the_optimizer_steps_it_took(ddp_run):
    assert ddp_run["last"]["global_step"] == 8 // 4  # per process: 8 training files in batches of 4


@pytest.mark.slow
def test_ddp_resume_keeps_the_tensorboard_history(ddp_run, ddp_resumed):
    events = EventAccumulator(os.path.join(ddp_run["log_dir"], ddp_run["runs"][0])).Reload()
    assert [e.step for e in events.Scalars("loss/val")] == [1, 2]
    assert [e.step for e in events.Scalars("loss/train_step")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_ddp_survives_batches_with_no_usable_file(tmp_path):
    """Batches of one file, 4 of them with NaN samples: a process whose batch is empty must still join
    the gradient all-reduce, or the two processes fall out of step and hang."""
    data_dir = copy_files(shipped_files(("HH",), per_family=8), tmp_path / "waveforms")
    for k in range(4):
        os.replace(nan_samples(copy_files([], tmp_path / f"nan{k}")), os.path.join(data_dir, f"AZ.KNW.HH.nan{k}.mseed"))
    # --seed 47 puts all 4 in the training half of one process: it has 4 empty batches, the other none.
    torchrun(
        tmp_path / "probe",
        "--data_dir",
        data_dir,
        "--num_epochs",
        "1",
        "--batch_size",
        "1",
        "--val_split",
        "0.25",
        "--seed",
        "47",
        "--checkpoint_dir",
        str(tmp_path / "checkpoints"),
        "--log_dir",
        str(tmp_path / "logs"),
    )
    trained = [recorded(tmp_path / "probe", data_dir, rank, 1) for rank in range(PROCESSES)]
    assert sorted(len(files) for files in trained) == [1, 5]  # usable files trained on, of 5 batches each
    (run,) = os.listdir(tmp_path / "checkpoints")
    with open(tmp_path / "checkpoints" / run / "skipped_files.json") as f:
        assert json.load(f)["counts"] == {"NaN or infinite samples": 4}  # gathered from both processes
    assert np.isfinite(torch.load(tmp_path / "checkpoints" / run / "last.pt", weights_only=True)["best_val_loss"])


@pytest.fixture(scope="module")
def amp_dir(tmp_path_factory):
    """8 real HH files: 6 to train, 2 to validate."""
    return copy_files(shipped_files(("HH",), per_family=8), tmp_path_factory.mktemp("amp") / "waveforms")


def run_amp(data_dir, tmp_path, *extra):
    return train.main(
        [
            "--data_dir",
            data_dir,
            "--batch_size",
            "4",
            "--num_workers",
            "0",
            "--val_split",
            "0.25",
            "--device",
            "cpu",
            "--checkpoint_dir",
            str(tmp_path / "checkpoints"),
            "--log_dir",
            str(tmp_path / "logs"),
            *extra,
        ]
    )


@pytest.mark.slow
def test_bf16_trains_with_finite_losses_close_to_fp32_and_no_scaler(amp_dir, tmp_path):
    summary = run_amp(amp_dir, tmp_path, "--num_epochs", "1", "--amp", "bf16")
    assert np.isfinite(summary["history"][0]["train_loss"]) and np.isfinite(summary["history"][0]["val_loss"])
    fp32 = run_amp(amp_dir, tmp_path / "fp32", "--num_epochs", "1")
    # bf16 rounds to 0.4 % per value, but the losses are means over 10^5 bins: 0.002 % (train) and 0.07 % (val,
    # after 2 steps) apart on this machine; 0.5 % leaves room for other CPUs and still fails a broken bf16 path.
    for key in ("train_loss", "val_loss"):
        assert summary["history"][0][key] == pytest.approx(fp32["history"][0][key], rel=5e-3), key
    checkpoint = torch.load(os.path.join(summary["run_dir"], "last.pt"), weights_only=True)
    assert "scale" not in checkpoint["scaler_state"]
    with open(os.path.join(summary["run_dir"], "config.json")) as f:
        assert json.load(f)["amp"] == "bf16"


@pytest.mark.slow
def test_fp16_uses_a_gradient_scaler_that_resume_restores(amp_dir, tmp_path):
    first = run_amp(amp_dir, tmp_path, "--num_epochs", "1", "--amp", "fp16")
    last = os.path.join(first["run_dir"], "last.pt")
    checkpoint = torch.load(last, weights_only=True)
    assert isinstance(checkpoint["scaler_state"]["scale"], float) and checkpoint["scaler_state"]["scale"] > 0
    assert np.isfinite(first["history"][0]["train_loss"])
    # A scale the scaler cannot reach by itself in 2 epochs from its initial 65536 (it grows every 2000 steps).
    checkpoint["scaler_state"]["scale"] = 1024.0
    torch.save(checkpoint, last)
    resumed = run_amp(amp_dir, tmp_path, "--num_epochs", "2", "--amp", "fp16", "--resume", last)
    assert resumed["run_dir"] == first["run_dir"] and [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert np.isfinite(resumed["history"][1]["train_loss"]) and np.isfinite(resumed["history"][1]["val_loss"])
    scale = torch.load(last, weights_only=True)["scaler_state"]["scale"]
    assert 0 < scale <= 1024.0


@pytest.mark.parametrize(
    "amp, name, output_dtype, scaled",
    [
        ("off", "off", torch.float32, False),
        ("auto", "bf16", torch.bfloat16, False),  # CPU: bf16, never the fp16 scaler
        ("bf16", "bf16", torch.bfloat16, False),
        ("fp16", "fp16", torch.float16, True),
    ],
)
def test_mixed_precision_on_cpu(amp, name, output_dtype, scaled):
    autocast, scaler, resolved = mixed_precision(amp, CPU)
    assert resolved == name and scaler.is_enabled() == scaled
    if amp == "off":
        assert autocast is nullcontext
    with autocast():
        assert ConvAutoencoder()(torch.rand(1, 3, 129, 142)).dtype == output_dtype


@pytest.mark.slow
def test_compiled_training_saves_plain_weights_that_inference_loads(tmp_path, monkeypatch):
    data_dir = copy_files(shipped_files(("HH",), per_family=8), tmp_path / "waveforms")  # all 142 time bins
    compiled = []
    real_compile = torch.compile

    def spy(model, *args, **kwargs):
        compiled.append(model)
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    argv = flags(
        data_dir=data_dir, num_epochs="1", batch_size="4", num_workers="0", val_split="0.5", device="cpu"
    )  # one batch of 4 to train, one of 4 to validate
    summary = train.main(
        [*argv, "--compile", "--checkpoint_dir", str(tmp_path / "a"), "--log_dir", str(tmp_path / "la")]
    )
    assert len(compiled) == 1 and isinstance(compiled[0], ConvAutoencoder)
    checkpoint = torch.load(os.path.join(summary["run_dir"], "best_model.pt"), weights_only=True)
    assert not any("_orig_mod." in key or key.startswith("module.") for key in checkpoint["model_state"])
    model_from_checkpoint(checkpoint)  # strict load_state_dict: raises on any renamed key
    metrics = inference.main(
        [
            os.path.join(summary["run_dir"], "best_model.pt"),
            "--num_samples",
            "0",
            "--num_plots",
            "0",
            "--output_dir",
            str(tmp_path / "results"),
        ]
    )
    assert metrics["num_samples"] == 4 and np.isfinite(metrics["model"]["mse"]["overall"])
    # The compiled model is the same network: the same loss as without --compile on the one training batch.
    plain = train.main([*argv, "--checkpoint_dir", str(tmp_path / "b"), "--log_dir", str(tmp_path / "lb")])
    assert len(compiled) == 1
    assert summary["history"][0]["train_loss"] == pytest.approx(plain["history"][0]["train_loss"], rel=1e-5)
    # After one Adam step only loosely: the conv biases ahead of BatchNorm get gradients of pure rounding noise,
    # which Adam's first step turns into +-lr whichever way the kernels round (6e-4 apart here).
    assert summary["history"][0]["val_loss"] == pytest.approx(plain["history"][0]["val_loss"], rel=1e-2)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_clean_state_dict_strips_wrapper_prefixes(prefix):
    torch.manual_seed(0)
    source = ConvAutoencoder()
    source(torch.rand(2, 3, 129, 142))  # a training step's BatchNorm statistics: buffers must carry over too
    source.eval()
    wrapped = {prefix + key: value for key, value in source.state_dict().items()}
    cleaned = clean_state_dict(wrapped)
    assert list(cleaned) == list(source.state_dict())
    target = ConvAutoencoder().eval()
    target.load_state_dict(cleaned)
    x = torch.rand(2, 3, 129, 142)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_clean_state_dict_keeps_prefixes_inside_key_names():
    state = {"encoder.module.weight": torch.zeros(1), "_orig_mod.decoder._orig_mod.bias": torch.ones(1)}
    assert list(clean_state_dict(state)) == ["encoder.module.weight", "decoder._orig_mod.bias"]


def test_epoch_seed_is_reproducible_and_differs_across_processes_and_epochs():
    seeds = {(epoch, rank): epoch_seed(42, epoch, rank) for epoch in range(1, 6) for rank in range(4)}
    assert len(set(seeds.values())) == len(seeds)
    assert seeds == {(epoch, rank): epoch_seed(42, epoch, rank) for epoch, rank in seeds}
    assert epoch_seed(43, 1, 0) != seeds[1, 0]
    assert all(isinstance(seed, int) and 0 <= seed < 2**32 for seed in seeds.values())


@pytest.mark.slow
def test_each_epoch_seeds_torch_with_its_epoch_seed(real_dir, tmp_path, monkeypatch):
    """What DataLoader workers and random draws start from in each epoch: what a resumed run repeats."""
    seeds = []
    real_train_epoch = train.train_epoch

    def spy(*args, **kwargs):
        seeds.append(torch.initial_seed())
        return real_train_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", spy)
    argv = flags(data_dir=real_dir, num_epochs=2, seed=5, num_workers=0, val_split=0.5, device="cpu")
    train.main([*argv, "--channels", "HH", *flags(checkpoint_dir=tmp_path / "c", log_dir=tmp_path / "l")])
    assert seeds == [epoch_seed(5, 1, 0), epoch_seed(5, 2, 0)]  # 2 HH files: 1 trains
