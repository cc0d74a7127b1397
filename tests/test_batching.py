"""One recording, one answer, whatever its batch: length-bucketed batches and per-length model runs (batching.py)."""

import numpy as np
import obspy
import pytest
import torch
from conftest import copy_files, shipped_files
from waveform_files import KNW, PFO, first_seconds, real_stream, scipy_n_time, write

from embedding.poolings import encode_batch
from model import ConvAutoencoder
from reading.batching import LengthBatchSampler, length_groups, reconstruct
from reading.transform import STFTConfig
from stft_dataset import SeismicSTFTDataset, pad_collate


@pytest.fixture
def mixed_dir(tmp_path):
    """Real recordings of 90, 60, 40 and 30 s (two stations; the 30 s one is obspy's BW.RJOB EH? example)."""
    directory = tmp_path / "mixed"
    directory.mkdir()
    write(real_stream(KNW), directory, "a90.mseed")
    write(first_seconds(real_stream(PFO), 60), directory, "b60.mseed")
    write(first_seconds(real_stream(KNW), 40), directory, "c40.mseed")
    write(obspy.read(), directory, "d30.mseed")
    return directory


def trained_like_model():
    """A model in eval mode whose BatchNorm statistics are not the identity, as after training."""
    torch.manual_seed(0)
    model = ConvAutoencoder()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("nperseg, noverlap", [(256, 192), (255, 100), (128, 0)])
def test_time_bins_of_a_sample_count_equal_scipy(nperseg, noverlap):
    stft = STFTConfig(nperseg=nperseg, noverlap=noverlap, nfft=256)
    for n_samples in (nperseg, nperseg + 1, 1000, 1001, 3000, 7001, 9001):
        assert stft.n_time_bins(n_samples) == scipy_n_time(n_samples, nperseg, noverlap, 256)


def test_time_bins_from_headers_equal_the_spectrograms(real_dir, mixed_dir, tmp_path):
    for directory in (real_dir, mixed_dir):
        dataset = SeismicSTFTDataset(str(directory), index_path=tmp_path / f"{len(str(directory))}.json")
        actual = [dataset[i][0].shape[-1] for i in range(len(dataset))]
        assert dataset.time_bins().tolist() == actual
    assert sorted(actual) == [48, 64, 95, 142]  # 30, 40, 60, 90 s


def test_recording_alone_equals_recording_in_a_mixed_batch(mixed_dir, tmp_path):
    dataset = SeismicSTFTDataset(str(mixed_dir), index_path=tmp_path / "index.json")
    model = trained_like_model()
    batch = pad_collate([dataset[i] for i in range(len(dataset))])
    x, mask = batch["spectrogram"], batch["mask"]
    with torch.no_grad():
        together, padded = reconstruct(model, x, mask), model(x)
        vectors, mse, _ = encode_batch(model, x, mask)
        worst_padded = 0.0
        for k in range(len(dataset)):
            alone = dataset[k][0][None]
            n_time = alone.shape[-1]
            assert torch.allclose(together[k, :, :, :n_time], model(alone)[0], atol=1e-5)
            assert (together[k, :, :, n_time:] == 0).all()
            alone_vector, alone_mse, _ = encode_batch(model, alone, torch.ones(1, n_time, dtype=torch.bool))
            np.testing.assert_allclose(vectors[k], alone_vector[0], atol=1e-5)
            np.testing.assert_allclose(mse[k], alone_mse[0], rtol=1e-5)
            worst_padded = max(worst_padded, float((padded[k, :, :, :n_time] - model(alone)[0]).abs().max()))
    assert worst_padded > 1e-2  # the plain padded forward pass is what this guards against


def test_sampler_batches_hold_one_length_and_cover_each_position_once():
    lengths = np.array([142, 95, 142, 64, 142, 95, 142, 142, 64, 10])
    sampler = LengthBatchSampler(lengths, batch_size=2, positions=range(9))
    batches = list(sampler)
    assert all(len(set(lengths[b])) == 1 and len(b) <= 2 for b in batches)
    assert sorted(p for b in batches for p in b) == list(range(9)) and len(sampler) == len(batches) == 5
    assert batches[0] == [3, 8]  # without shuffle: shortest first, in position order


def test_shuffled_sampler_is_a_function_of_seed_and_epoch():
    lengths = np.random.default_rng(1).integers(40, 45, size=200)

    def epoch_batches(seed, epoch):
        sampler = LengthBatchSampler(lengths, batch_size=8, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(3, 1) == epoch_batches(3, 1)
    assert epoch_batches(3, 1) != epoch_batches(3, 2) and epoch_batches(3, 1) != epoch_batches(4, 1)
    assert sorted(p for b in epoch_batches(3, 2) for p in b) == list(range(200))
    assert all(len(set(lengths[b])) == 1 for b in epoch_batches(3, 2))


def test_dataloader_with_the_sampler_gives_unpadded_batches(real_dir, mixed_dir, tmp_path):
    copy_files(shipped_files(("HN",), 3), mixed_dir)
    dataset = SeismicSTFTDataset(str(mixed_dir), index_path=tmp_path / "index.json")
    sampler = LengthBatchSampler(dataset.time_bins(), batch_size=2)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_collate)
    batches = list(loader)
    assert all(b["mask"].all() for b in batches) and sum(len(b["meta"]) for b in batches) == 7


def test_length_groups_of_a_padded_mask():
    mask = torch.arange(6)[None, :] < torch.tensor([6, 3, 6, 2])[:, None]
    assert [(n, rows.tolist()) for n, rows in length_groups(mask)] == [(2, [3]), (3, [1]), (6, [0, 2])]
