"""Training-time levers: random time crops, offsets, spectral tilts, noise floors and horizontal swaps (augment.py),
the one-cycle learning rate, and that they touch training batches only and repeat exactly in a resumed run. Real
shipped recordings for the runs."""

import os

import numpy as np
import pytest
import torch
from conftest import flags

import train
from model import masked_mse
from reading import augment
from reading.augment import (
    NOMINAL_DECADES,
    batch_rng,
    random_horizontal_swap,
    random_noise_floor,
    random_spectral_tilt,
    random_time_crop,
    random_time_offset,
)
from reading.transform import STFTConfig
from running.training import ONE_CYCLE_WARMUP, one_cycle
from stft_dataset import SeismicSTFTDataset, pad_collate

FREQS = STFTConfig().axes(0)[0]
TINY = flags(batch_size=4, num_workers=0, val_split=0.25, device="cpu", split_by="file")  # counts training files


def real_batch(directory, lengths, normalisation=STFTConfig.normalisation):
    """A padded batch of real spectrograms cut to the given numbers of time bins."""
    dataset = SeismicSTFTDataset(directory, stft=STFTConfig(normalisation=normalisation))
    return pad_collate([(dataset[i][0][:, :, :n], dataset[i][1]) for i, n in enumerate(lengths)])


def normalised(window):
    """The transform's per-component min-max, written out with numpy."""
    low, high = window.min(axis=(1, 2), keepdims=True), window.max(axis=(1, 2), keepdims=True)
    return (window - low) / (high - low)


def test_crop_is_a_window_of_each_sample_normalised_again(real_dir):
    batch = real_batch(real_dir, [142, 120, 90], "min-max")
    x, mask = random_time_crop(
        batch["spectrogram"], batch["mask"], np.random.default_rng(3), 40, 142, normalisation="min-max"
    )
    n_bins = x.shape[-1]
    assert 40 <= n_bins <= 90 and mask.shape == (3, n_bins) and mask.all()  # no longer than the shortest sample
    for k, n_valid in enumerate(batch["mask"].sum(dim=1).tolist()):
        source = batch["spectrogram"][k].numpy()
        windows = [normalised(source[:, :, s : s + n_bins]) for s in range(n_valid - n_bins + 1)]
        matches = [w for w in windows if np.allclose(w, x[k].numpy(), atol=1e-6)]
        assert len(matches) == 1  # exactly one window of the sample's own valid bins, normalised again


def test_crop_draws_repeat_for_a_seed_and_differ_between_epochs(real_dir):
    batch = real_batch(real_dir, [142, 142, 142, 142])
    first = random_time_crop(batch["spectrogram"], batch["mask"], batch_rng(42, 1, 0, 0), 40, 142)[0]
    again = random_time_crop(batch["spectrogram"], batch["mask"], batch_rng(42, 1, 0, 0), 40, 142)[0]
    other = random_time_crop(batch["spectrogram"], batch["mask"], batch_rng(42, 2, 0, 0), 40, 142)[0]
    assert torch.equal(first, again) and (first.shape != other.shape or not torch.equal(first, other))


def test_dead_component_stays_zero_after_a_crop():
    x = torch.rand(1, 3, 129, 60)
    x[0, 1] = 0.0
    cropped, _ = random_time_crop(x, torch.ones(1, 60, dtype=torch.bool), np.random.default_rng(0), 20, 30)
    assert (cropped[0, 1] == 0).all() and torch.isfinite(cropped).all()


@pytest.mark.slow
def test_offset_drops_up_to_max_bins_of_the_shortest_sample_as_a_crop(real_dir):
    batch = real_batch(real_dir, [142, 142, 130])
    lengths = set()
    for step in range(60):
        x, mask = random_time_offset(batch["spectrogram"], batch["mask"], batch_rng(42, 1, 0, step), 15)
        crop, _ = random_time_crop(batch["spectrogram"], batch["mask"], batch_rng(42, 1, 0, step), 115, 130)
        assert torch.equal(x, crop) and mask.all() and mask.shape == (3, x.shape[-1])
        lengths.add(x.shape[-1])
    assert lengths == set(range(115, 131))  # every length modulo 16


def test_tilt_adds_a_response_in_log_frequency_then_normalises_again(real_dir):
    batch = real_batch(real_dir, [142, 120, 90], "min-max")
    x, mask = random_spectral_tilt(
        batch["spectrogram"], batch["mask"], np.random.default_rng(5), 0.3, FREQS, normalisation="min-max"
    )
    tilts = np.random.default_rng(5).uniform(-0.3, 0.3, size=3)
    response = np.log10(np.r_[FREQS[1], FREQS[1:]])[None, :, None]  # (1, F, 1): 0 Hz takes the 0.39 Hz gain
    assert torch.equal(mask, batch["mask"])
    for k, n_valid in enumerate(mask.sum(dim=1).tolist()):
        expected = normalised(batch["spectrogram"][k, :, :, :n_valid].numpy() + tilts[k] * response)
        np.testing.assert_allclose(x[k, :, :, :n_valid].numpy(), expected, atol=1e-6)
        assert (x[k, :, :, n_valid:] == 0).all()  # padding stays zero
    low_high = x[:, :, :20, :90].mean(dim=(1, 2, 3)) - x[:, :, -20:, :90].mean(dim=(1, 2, 3))
    original = batch["spectrogram"]
    before = original[:, :, :20, :90].mean(dim=(1, 2, 3)) - original[:, :, -20:, :90].mean(dim=(1, 2, 3))
    assert np.array_equal(np.sign((low_high - before).numpy()), -np.sign(tilts))  # p > 0 raises the high band


def test_tilt_draws_repeat_for_a_seed_and_keep_dead_components_zero():
    x = torch.rand(4, 3, 129, 60)
    x[2, 0] = 0.0
    mask = torch.ones(4, 60, dtype=torch.bool)
    first, _ = random_spectral_tilt(x, mask, batch_rng(42, 1, 0, 3), 0.15, FREQS, normalisation="min-max")
    again, _ = random_spectral_tilt(x, mask, batch_rng(42, 1, 0, 3), 0.15, FREQS, normalisation="min-max")
    other, _ = random_spectral_tilt(x, mask, batch_rng(42, 2, 0, 3), 0.15, FREQS, normalisation="min-max")
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (first[2, 0] == 0).all() and torch.isfinite(first).all() and first[2, 1].max() == 1.0


def test_noise_floor_adds_power_at_a_random_level_then_normalises_again(real_dir):
    batch = real_batch(real_dir, [142, 120, 90], "min-max")
    x, mask = random_noise_floor(
        batch["spectrogram"], batch["mask"], np.random.default_rng(7), 0.5, normalisation="min-max"
    )
    floors = np.random.default_rng(7).uniform(0.0, 0.5, size=3)
    assert torch.equal(mask, batch["mask"])
    decades, lifted = 2 * NOMINAL_DECADES, []  # decades of power
    for k, n_valid in enumerate(mask.sum(dim=1).tolist()):
        source = batch["spectrogram"][k, :, :, :n_valid].numpy().astype(np.float64)
        power = 10 ** (decades * source) + 10 ** (decades * floors[k])
        np.testing.assert_allclose(x[k, :, :, :n_valid].numpy(), normalised(np.log10(power) / decades), atol=1e-5)
        assert (x[k, :, :, n_valid:] == 0).all()  # padding stays zero
        below = source < floors[k] - 0.05  # bins well under the floor are lifted towards it: their spread shrinks
        lifted.append(below.sum() > 100 and x[k, :, :, :n_valid].numpy()[below].std() < normalised(source)[below].std())
    assert sum(lifted) >= 2


def test_noise_floor_draws_repeat_for_a_seed_and_keep_dead_components_zero():
    x = torch.rand(4, 3, 129, 60)
    x[1, 2] = 0.0
    mask = torch.ones(4, 60, dtype=torch.bool)
    first, _ = random_noise_floor(x, mask, batch_rng(42, 1, 0, 3), 0.5, normalisation="min-max")
    again, _ = random_noise_floor(x, mask, batch_rng(42, 1, 0, 3), 0.5, normalisation="min-max")
    other, _ = random_noise_floor(x, mask, batch_rng(42, 2, 0, 3), 0.5, normalisation="min-max")
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (first[1, 2] == 0).all() and torch.isfinite(first).all() and first[1, 1].max() == 1.0


@pytest.mark.slow
def test_one_cycle_follows_torch_one_cycle_lr():
    """The reference: torch's OneCycleLR (cosine phases) with the same start (peak / 25) and end (peak / 10,000)."""
    steps = 1000
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1.0, total_steps=steps, pct_start=ONE_CYCLE_WARMUP, div_factor=25, final_div_factor=400
    )
    reference = []
    for _ in range(steps):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # torch ends each phase one step early (at step pct_start * steps - 1 and steps - 1): compare on its grid
    ours = [one_cycle(min(step / (ONE_CYCLE_WARMUP * steps - 1), 1) * ONE_CYCLE_WARMUP) for step in range(300)]
    np.testing.assert_allclose(ours, reference[:300], rtol=1e-6)
    decay = [
        one_cycle(ONE_CYCLE_WARMUP + (step - 299) / (steps - 300) * (1 - ONE_CYCLE_WARMUP))
        for step in range(299, steps)
    ]
    np.testing.assert_allclose(decay, reference[299:], rtol=1e-6)


def test_one_cycle_rises_to_the_peak_then_decays():
    factors = [one_cycle(p) for p in np.linspace(0, 1, 101)]
    assert factors[0] == pytest.approx(1 / 25) and one_cycle(ONE_CYCLE_WARMUP) == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(1e-4)
    peak = int(ONE_CYCLE_WARMUP * 100)
    assert np.all(np.diff(factors[: peak + 1]) > 0) and np.all(np.diff(factors[peak:]) < 0)


def test_horizontal_swap_exchanges_e_and_n_of_the_drawn_samples(real_dir):
    batch = real_batch(real_dir, [142, 142, 142, 142, 142, 142, 142, 142])
    x = batch["spectrogram"]
    swapped, mask = random_horizontal_swap(x, batch["mask"], batch_rng(42, 1, 0, 3), 0.5)
    again, _ = random_horizontal_swap(x, batch["mask"], batch_rng(42, 1, 0, 3), 0.5)
    assert torch.equal(swapped, again) and torch.equal(mask, batch["mask"])
    exchanged = [torch.equal(swapped[k], x[k, [1, 0, 2]]) for k in range(len(x))]
    kept = [torch.equal(swapped[k], x[k]) for k in range(len(x))]
    assert all(a != b for a, b in zip(exchanged, kept))  # each sample one or the other (E and N differ in real data)
    assert 0 < sum(exchanged) < len(x)  # this seed swaps some, not all
    assert torch.equal(random_horizontal_swap(x, mask, batch_rng(42, 1, 0, 3), 0.0)[0], x)
    assert torch.equal(random_horizontal_swap(x, mask, batch_rng(42, 1, 0, 3), 1.0)[0], x[:, [1, 0, 2]])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, lever",
    [
        ("random_time_crop", ["--crop_bins", "20", "30"]),
        ("random_time_offset", ["--offset_bins", "15"]),
        ("random_spectral_tilt", ["--spectral_tilt", "0.3"]),
        ("random_noise_floor", ["--noise_floor", "0.3"]),
        ("random_horizontal_swap", ["--horizontal_swap", "0.5"]),
    ],
)
def test_augmentation_reaches_training_batches_only(train_dir, tmp_path, monkeypatch, name, lever):
    seen = []
    original = getattr(augment, name)

    def recording(x, mask, *args):
        seen.append(x.shape[0])
        return original(x, mask, *args)

    monkeypatch.setattr(augment, name, recording)
    common = flags(checkpoint_dir=tmp_path / "c", log_dir=tmp_path / "l", data_dir=train_dir)
    summary = train.main([*common, *TINY, "--num_epochs", "2", *lever])
    assert sum(seen) == 2 * 9  # 9 training files per epoch; the 3 validation files never
    plain = train.main([*common, *TINY, "--num_epochs", "2", "--spectral_tilt", "0", "--noise_floor", "0"])  # none
    assert sum(seen) == 2 * 9 and plain["history"][0]["train_loss"] != summary["history"][0]["train_loss"]
    assert plain["history"][0]["val_loss"] != summary["history"][0]["val_loss"]  # trained on other batches


@pytest.mark.slow
def test_learning_rate_follows_one_cycle_and_constant_stays(train_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = flags(checkpoint_dir=tmp_path / "c", data_dir=train_dir, lr="0.004")
    cycle = train.main([*common, *TINY, "--num_epochs", "3", "--log_dir", str(tmp_path / "a")])
    constant = train.main(
        [*common, *TINY, "--num_epochs", "3", "--lr_schedule", "constant", "--log_dir", str(tmp_path / "b")]
    )
    rates = [e.value for e in EventAccumulator(cycle["log_dir"]).Reload().Scalars("learning_rate")]
    steps = 3 * 3  # 9 training files in batches of 4, per epoch
    assert rates == pytest.approx([0.004 * one_cycle((3 * epoch - 1) / steps) for epoch in (1, 2, 3)], rel=1e-5)
    assert [e.value for e in EventAccumulator(constant["log_dir"]).Reload().Scalars("learning_rate")] == pytest.approx(
        [0.004] * 3
    )


AUGMENTATIONS = [
    ["--crop_bins", "40", "142", "--spectral_tilt", "0.15"],
    ["--offset_bins", "15", "--noise_floor", "0.3", "--horizontal_swap", "0.5"],
]


@pytest.mark.slow
@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_interrupted_augmented_one_cycle_run_resumes_exactly(train_dir, tmp_path, monkeypatch, augmentation):
    augmented = [*TINY, *augmentation]
    straight = train.main([*flags(data_dir=train_dir, checkpoint_dir=tmp_path / "a", log_dir=tmp_path / "la"),
                           *augmented, "--num_epochs", "4"])  # fmt: skip
    original_save = train.save

    def killed_after_epoch_2(run, epoch, improved):
        original_save(run, epoch, improved)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save", killed_after_epoch_2)
    common = [*flags(data_dir=train_dir, checkpoint_dir=tmp_path / "b", log_dir=tmp_path / "lb"), *augmented]
    with pytest.raises(SystemExit) as stopped:
        train.main([*common, "--num_epochs", "4"])
    assert stopped.value.code == 130
    monkeypatch.undo()
    (run,) = os.listdir(tmp_path / "b")
    resumed = train.main([*common, "--num_epochs", "4", "--resume", str(tmp_path / "b" / run / "last.pt")])
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    for a, b in zip(straight["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_within_band_fills_the_rows_above_nyquist_as_the_transform_does():
    # A real 40 Hz recording's spectrogram: its rows above 20 Hz copy the last below; a tilt changes them, within_band
    # makes them copies again and normalises as the transform would; a 100 Hz recording in the batch is unchanged.
    stft = STFTConfig()
    n_valid = stft.bins_below_nyquist(40.0)
    rng = np.random.default_rng(0)
    log_magnitude = rng.normal(size=(2, 3, stft.n_freq, 30))
    log_magnitude[0, :, n_valid:] = log_magnitude[0, :, n_valid - 1 : n_valid]
    x = torch.from_numpy(augment.rescale(torch.from_numpy(log_magnitude)).numpy()).float()
    mask = torch.ones(2, 30, dtype=torch.bool)
    tilted = x.clone()
    tilted[0, :, n_valid:] += torch.linspace(0, 3, stft.n_freq - n_valid)[None, :, None]  # beyond the valid range
    banded, rows = augment.within_band(tilted, mask, torch.tensor([n_valid, stft.n_freq]))
    assert rows[0].sum() == n_valid and rows[1].all()
    torch.testing.assert_close(banded[0], x[0])  # the transform's own spectrogram again
    torch.testing.assert_close(banded[1], tilted[1])
    untouched, all_rows = augment.within_band(x, mask, torch.tensor([stft.n_freq] * 2))
    assert untouched is x and all_rows.all()


def test_the_band_loss_leaves_the_rows_above_nyquist_out():
    target = torch.rand(2, 3, 129, 20)
    reconstruction = target.clone()
    reconstruction[0, :, 60:] += 1.0  # wrong only where there is no data
    mask = torch.ones(2, 20, dtype=torch.bool)
    rows = torch.arange(129)[None] < torch.tensor([60, 129])[:, None]
    assert masked_mse(reconstruction, target, mask, rows) == 0.0
    assert masked_mse(reconstruction, target, mask) > 0.1
    torch.testing.assert_close(masked_mse(reconstruction, target, mask, torch.ones(2, 129, dtype=torch.bool)),
                               masked_mse(reconstruction, target, mask))  # fmt: skip


def test_a_run_with_the_band_trains_on_real_40_and_50_hz_recordings(tmp_path):
    data_dir = os.path.join(os.path.dirname(__file__), "data", "exotic", "waveforms")
    run = flags(data_dir=data_dir, num_epochs=1, batch_size=2, num_workers=0, val_split=0.5)
    summary = train.main(run + flags(checkpoint_dir=tmp_path / "c", log_dir=tmp_path / "l") + ["--nyquist_band"])
    checkpoint = torch.load(os.path.join(summary["run_dir"], "best_model.pt"), weights_only=True)
    assert checkpoint["args"]["nyquist_band"] is True and np.isfinite(checkpoint["best_val_loss"])
