"""The read-out (readout.py): fitted when a run ends, stored in best_model.pt, used by embed.py without flags; on real
recordings, with the session's trained checkpoint."""

import os
import shutil

import numpy as np
import pytest
import torch
from conftest import copy_files, flags, shipped_files
from waveform_files import KNW, real_stream, write

import embed
import train
from embedding.poolings import encode_batch, pooled_features
from embedding.readout import READOUT_DIM, READOUT_POOLING, READOUT_SAMPLE, band_rows, fit_readout, window_bins
from embedding.representation import fit_sample
from model import ARCHS, ModelConfig
from reading.augment import random_noise_floor
from reading.transform import STFTConfig, spectrogram
from reading.waveforms import DEFAULT_FAMILIES, read_waveform
from running.checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint
from stft_dataset import SeismicSTFTDataset


def training_positions(checkpoint, dataset):
    validation = set(checkpoint["val_files"])
    return [i for i, f in enumerate(dataset.sample_files(np.arange(len(dataset)))) if f not in validation]


def test_run_stores_the_readout_of_its_training_samples(trained):
    path, data_dir = trained
    checkpoint = load_checkpoint(path)
    stored = checkpoint["readout"]
    assert stored["rows"] == 3  # of 9: the latent rows of the bins below 18.75 Hz
    assert stored["pooling"] == READOUT_POOLING and stored["projection"].shape == (READOUT_DIM, 256 * 3 * 2)
    model = model_from_checkpoint(checkpoint).eval()
    dataset = SeismicSTFTDataset(data_dir)
    training = np.sort(training_positions(checkpoint, dataset))
    positions = training[fit_sample(len(training), 42, READOUT_SAMPLE)]  # as train.py draws them
    windows = window_bins(dataset.stft)
    pooled = pooled_features(model, dataset, positions, 4, "cpu", READOUT_POOLING, windows, rows=3)
    assert (
        stored["fitted_on"] == len(pooled) == len(positions) * (1 + 16)
    )  # each 90 s file whole and in 16 windows of 10 s
    again = fit_readout(pooled, seed=42, rows=3).to_dict()  # the same fit from the same samples: deterministic
    for key in ("mean", "scale", "projection"):
        torch.testing.assert_close(again[key], stored[key])
    embedded = model.readout(torch.from_numpy(pooled)).numpy()
    np.testing.assert_allclose(embedded.mean(axis=0), 0, atol=1e-3)  # whitened: centred, unit variance
    np.testing.assert_allclose(embedded.std(axis=0), 1, rtol=1e-2)


@pytest.mark.slow
def test_a_finished_run_resumed_fits_the_same_readout(trained, tmp_path):
    path, data_dir = trained
    run_dir = shutil.copytree(os.path.dirname(path), tmp_path / "checkpoints" / "run")
    before = load_checkpoint(run_dir / "best_model.pt")["readout"]
    os.remove(run_dir / "best_model.pt")  # stopped before the read-out was stored: best_model.pt of the last epoch
    shutil.copy(run_dir / "last.pt", run_dir / "best_model.pt")
    argv = ["--data_dir", data_dir, "--num_epochs", "1", "--batch_size", "4", "--num_workers", "0", "--val_split"]
    train.main(argv + ["0.5", "--resume", str(run_dir), "--log_dir", str(tmp_path / "logs")])
    after = load_checkpoint(run_dir / "best_model.pt")["readout"]
    for key in ("mean", "scale", "projection"):
        torch.testing.assert_close(after[key], before[key])


def test_the_readout_reads_the_band_below_20_hz_alone(trained):
    """What a recording holds above 18.75 Hz (where a 40 Hz BH trace holds no data) leaves its read-out embedding as
    it is; the whole-band time-mean pooling moves."""
    assert (
        band_rows(STFTConfig(), ModelConfig()) == 3
        and band_rows(STFTConfig(), ModelConfig(features=ARCHS["stride8"])) == 6
    )
    path, data_dir = trained
    model = model_from_checkpoint(load_checkpoint(path)).eval()
    x = SeismicSTFTDataset(data_dir)[0][0][None]
    edge = x.clone()
    edge[:, :, 48:] = x[:, :, 47:48]  # bin 47: 18.36 Hz, the last that rows 0-2 see
    mask = torch.ones(1, x.shape[-1], dtype=torch.bool)
    readout, edge_readout = (encode_batch(model, v, mask)[0] for v in (x, edge))
    np.testing.assert_allclose(edge_readout, readout, atol=1e-5)
    pooled, edge_pooled = (encode_batch(model, v, mask, "time-mean")[0] for v in (x, edge))
    assert np.abs(edge_pooled - pooled).max() > 0.01


def test_checkpoint_without_readout_embeds_with_time_mean(trained, tmp_path, capsys):
    path, data_dir = trained
    old = {k: v for k, v in load_checkpoint(path).items() if k != "readout"}  # as runs before the read-out wrote it
    save_checkpoint(old, tmp_path / "old.pt")
    argv = [str(tmp_path / "old.pt"), "--data_dir", data_dir, "--projector_points", "0", "--num_anomalies", "0"]
    summary = embed.main(argv + ["--output_dir", str(tmp_path / "out"), "--clusters", "2"])
    assert summary["dim"] == 256 * 9  # time-mean pooling
    with pytest.raises(SystemExit):
        embed.main(argv + ["--output_dir", str(tmp_path / "out2"), "--pooling", "readout"])
    assert "has no read-out" in capsys.readouterr().err


@pytest.mark.slow
def test_removing_the_event_moves_the_embedding_more_than_a_noise_floor(tmp_path):
    """A model trained 40 epochs on 12 real files; on 8 others (2 per family): each one's 20 s around its P arrival
    (at about 30 s), the same with what follows 29 s replaced by the station's noise of 4-20 s, and the first with a
    noise floor of up to 0.1 of the log range added (a noisier site): removing the event must move the read-out
    embedding further than the floor does. It did so for 5 of the 8 files while the read-out read the whole band
    (BK.BKS twice and BK.PACP.BH moved further with the floor); for all 8 since it reads the band below 20 Hz."""
    names = shipped_files(per_family=5)
    train_dir = copy_files([n for i, n in enumerate(names) if i % 5 < 3], tmp_path / "train")
    test_dir = copy_files([n for i, n in enumerate(names) if i % 5 >= 3], tmp_path / "test")
    run = flags(data_dir=train_dir, num_epochs=40, batch_size=4, num_workers=0, checkpoint_dir=tmp_path / "ck")
    summary = train.main(run + flags(log_dir=tmp_path / "logs"))
    model = model_from_checkpoint(load_checkpoint(os.path.join(summary["run_dir"], "best_model.pt"))).eval()
    stft = STFTConfig()
    moved = {}
    for name in sorted(os.listdir(test_dir)):
        waveform, _ = read_waveform(os.path.join(test_dir, name), DEFAULT_FAMILIES, stft)  # (3, 9001) at 100 Hz
        event = waveform[:, 2500:4500]
        removed = event.copy()
        removed[:, 400:] = waveform[:, 400:2000]
        x, without = (torch.from_numpy(spectrogram(w, stft))[None] for w in (event, removed))
        mask = torch.ones(1, x.shape[-1], dtype=torch.bool)
        floor, _ = random_noise_floor(x, mask, np.random.default_rng(0), 0.1)
        e, r, f = (encode_batch(model, v, mask)[0][0] for v in (x, without, floor))
        moved[name] = (np.linalg.norm(r - e), np.linalg.norm(f - e))
    assert len(moved) == 8 and all(removed > floor for removed, floor in moved.values()), moved


def test_bins_above_a_recordings_nyquist_repeat_its_edge(tmp_path):
    """A real HH file decimated to 40 Hz (as a BH trace is recorded) and read back at 100 Hz: the bins at and above
    20 Hz hold no data; they repeat the last bin below it and take no part in the min-max."""
    stream = real_stream(KNW)
    stream.decimate(2).resample(40.0)
    write(stream, tmp_path, "AZ.KNW.HH.40Hz.mseed")
    dataset = SeismicSTFTDataset(str(tmp_path))
    x = dataset[0][0].numpy()
    stft = STFTConfig()
    n_valid = stft.bins_below_nyquist(40.0)
    assert n_valid == 52  # 0 ... 19.92 Hz in steps of 100 / 256 Hz
    np.testing.assert_array_equal(x[:, n_valid:], np.repeat(x[:, n_valid - 1 : n_valid], 129 - n_valid, axis=1))
    assert x[:, :n_valid].min() == 0 and x[:, :n_valid].max() == 1
    assert stft.bins_below_nyquist(None) == stft.bins_below_nyquist(200.0) == 129
    plain = spectrogram(np.random.default_rng(0).normal(size=(3, 2000)), stft)
    assert np.array_equal(plain, spectrogram(np.random.default_rng(0).normal(size=(3, 2000)), stft, 100.0))
