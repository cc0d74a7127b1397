"""train.py --positive_weight: pairs of one event folder and their contrastive term (running/positives.py)."""

import os

import numpy as np
import pytest
import torch
from conftest import flags

import train
from running.positives import PairSampler, band_summary, contrastive_loss, folder_codes

EXOTIC = os.path.join(os.path.dirname(__file__), "data", "exotic", "waveforms")  # 3 real events, 2 stations each


def test_folder_codes_group_the_files_of_one_event_folder():
    paths = ["1/AV.SPCG..BHZ.mseed", "118/UW.STOR..BHZ.mseed", "1/AV.SPCP..BHZ.mseed", "flat.mseed"]
    codes = folder_codes(paths)
    assert codes[0] == codes[2] and len(set(codes.tolist())) == 3


def test_pairs_share_a_folder_and_cover_every_sample_each_epoch():
    codes = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])  # odd folders, a folder of one
    sampler = PairSampler(codes, seed=7)
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) == 2 * (2 + 1 + 1 + 2)
        pairs = np.array(order).reshape(-1, 2)
        assert (codes[pairs[:, 0]] == codes[pairs[:, 1]]).all()
        assert set(order) == set(range(len(codes)))
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert first != list(sampler)  # another order each epoch, the same for a seed and epoch
    sampler.set_epoch(1)
    assert first == list(sampler)


def test_processes_take_disjoint_pairs_of_equal_count():
    codes = np.repeat(np.arange(7), 2)  # 7 pairs over 2 processes: one repeated to even out
    shares = [PairSampler(codes, 2, rank, seed=1) for rank in (0, 1)]
    orders = [list(share) for share in shares]
    assert len(orders[0]) == len(orders[1]) == len(shares[0]) == 8
    assert set(orders[0]) | set(orders[1]) == set(range(14))


def test_band_summary_leaves_padding_out():
    latent = torch.rand(1, 4, 5, 6)
    padded = torch.cat([latent, torch.full((1, 4, 5, 3), 9.0)], dim=3)
    mask = torch.arange(9 * 16)[None] < 6 * 16
    expected = band_summary(latent, torch.ones(1, 6 * 16, dtype=torch.bool), 2, 16)
    torch.testing.assert_close(band_summary(padded, mask, 2, 16), expected)
    assert expected.shape == (1, 2 * 4 * 2)


def test_contrastive_loss_is_low_when_positives_agree_and_high_when_they_do_not():
    torch.manual_seed(0)
    anchors = torch.randn(4, 16)
    codes = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    agree = torch.repeat_interleave(anchors, 2, dim=0) + 0.01 * torch.randn(8, 16)
    disagree = torch.randn(8, 16)
    assert contrastive_loss(agree, codes) < 0.1 < np.log(7) * 0.5 < contrastive_loss(disagree, codes)
    features = disagree.clone().requires_grad_()
    contrastive_loss(features, codes).backward()
    assert features.grad.abs().sum() > 0
    assert contrastive_loss(features, torch.arange(8)) == 0.0  # no positives: no term, still in the graph


def test_odd_batch_size_is_refused():
    with pytest.raises(SystemExit):
        train.parse_args(["--positive_weight", "0.1", "--batch_size", "3"])


def test_a_run_with_positives_trains_on_real_events_at_two_stations(tmp_path, monkeypatch):
    seen = []
    original = train.train_epoch

    def recording(*args, **kwargs):  # the batches train_epoch sees: pairs of one event folder
        loader = args[1]
        for batch in loader:
            seen.append([os.path.dirname(meta["path"]) for meta in batch["meta"]])
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", recording)
    run = flags(data_dir=EXOTIC, num_epochs=1, batch_size=2, num_workers=0, val_split=0.3, split_by="file")
    summary = train.main(run + flags(checkpoint_dir=tmp_path / "c", log_dir=tmp_path / "l", positive_weight=0.5))
    checkpoint = torch.load(os.path.join(summary["run_dir"], "best_model.pt"), weights_only=True)
    assert checkpoint["args"]["positive_weight"] == 0.5 and np.isfinite(checkpoint["best_val_loss"])
    assert seen and all(len(set(folders)) == 1 for folders in seen)
    assert np.isfinite(checkpoint["history"][0]["train_loss"])


def test_a_flat_folder_is_refused_rather_than_collapsed_and_leaves_no_run_folder(train_dir, tmp_path, capsys):
    run = flags(data_dir=train_dir, num_epochs=1, batch_size=2, num_workers=0, positive_weight=0.1)
    with pytest.raises(SystemExit):
        train.main(run + flags(checkpoint_dir=tmp_path / "c", log_dir=tmp_path / "l"))
    assert "are in one folder" in capsys.readouterr().err
    assert not any((tmp_path / "c").glob("*")), "a refused run leaves no run folder behind"
