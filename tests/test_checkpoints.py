"""checkpoints.py: the round trip with weights_only, foreign files refused, and old checkpoints filled in."""

from dataclasses import asdict

import numpy as np
import pytest
import torch

from model import ConvAutoencoder, ModelConfig
from reading.transform import STFTConfig
from running.checkpoints import BEFORE_FLAG, filled_in, load_checkpoint, model_from_checkpoint, save_checkpoint


def test_checkpoints_before_size_fit_load_as_interpolate(tmp_path):
    old = {"in_channels": 3, "features": [32, 64, 128, 256]}  # model_config as written before the field
    path = str(tmp_path / "old.pt")
    model = ConvAutoencoder(ModelConfig(size_fit="interpolate"))
    save_checkpoint({"model_state": model.state_dict(), "model_config": old, "stft_config": asdict(STFTConfig())}, path)
    assert model_from_checkpoint(load_checkpoint(path)).config.size_fit == "interpolate"
    assert ModelConfig.from_dict(filled_in({"model_config": old})["model_config"]).size_fit == "interpolate"


def test_filled_in_gives_old_runs_what_they_did_and_keeps_what_is_there():
    old = {"model_config": ModelConfig().to_dict(), "args": {"data_dir": "d", "lr": 0.1}, "val_files": ["a.mseed"]}
    checkpoint = filled_in(old)
    assert checkpoint["args"] == {**BEFORE_FLAG, "data_dir": "d", "lr": 0.1}
    assert checkpoint["args"]["split_by"] == "file" and checkpoint["args"]["arch"] == "seed"
    assert checkpoint["val_groups"] == ["a.mseed"] and checkpoint["in_epoch"] is None and checkpoint["epoch"] == 0
    assert checkpoint["model_config"]["size_fit"] == "pad"  # written: kept
    assert filled_in(checkpoint) == checkpoint


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = ConvAutoencoder(ModelConfig())
    model.train()
    model(torch.rand(4, 3, 129, 64))  # move BatchNorm running statistics away from their initial values
    model.eval()
    x = torch.rand(2, 3, 129, 111)
    path = str(tmp_path / "model.pt")
    save_checkpoint(
        {
            "model_state": model.state_dict(),
            "model_config": model.config.to_dict(),
            "stft_config": asdict(STFTConfig()),
        },
        path,
    )
    restored = model_from_checkpoint(torch.load(path, weights_only=True)).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), restored(x).numpy())


def test_foreign_checkpoints_are_refused_with_a_reason(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        load_checkpoint(str(text))
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        load_checkpoint(str(other))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing.pt"))
