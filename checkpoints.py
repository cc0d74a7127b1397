"""Checkpoints: the one writer and the one reader of the checkpoint dict, atomic saves, pruning.

A checkpoint holds plain data only (state dicts, numbers, strings, lists, dicts), so it loads with
torch.load(weights_only=True):
  model_state, optimizer_state, scaler_state   state dicts (weights always of the plain model)
  model_config, stft_config                     ModelConfig and STFTConfig as dicts
  args                                          train.py's resolved flags (data_dir, channels, extensions, ...)
  run_name, val_files                           the run and its validation files (relative to data_dir)
  val_groups                                    what args["split_by"] put on the validation side (files, "NET.STA",
                                                "NET" or UTC day numbers); absent in runs of before --split_by
  epoch, global_step, best_val_loss, best_epoch, history   where the run stands
Scripts rebuild the model with `model_from_checkpoint` and the data pipeline with `data_settings`.
"""

import os
from dataclasses import asdict

import torch

from model import ConvAutoencoder, ModelConfig
from storage import atomic_write
from transform import STFTConfig

CHECKPOINT_KEYS = ("model_state", "model_config", "stft_config")


def new_run_state():
    """Where a new run stands: epoch, global_step, best_val_loss, best_epoch, history."""
    return {"epoch": 0, "global_step": 0, "best_val_loss": float("inf"), "best_epoch": 0, "history": []}


RUN_STATE_KEYS = tuple(new_run_state())


def checkpoint_dict(state, model, optimizer, scaler, stft, args, run_name, val_files, val_groups=None):
    """The checkpoint of a run: its state (RUN_STATE_KEYS), weights, optimizer and the settings to rebuild it.

    args: train.py's flags as a dict (vars(args)); val_files: relative paths; val_groups: the validation groups.
    """
    return {
        **state,
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scaler_state": scaler.state_dict(),
        "model_config": model.config.to_dict(),
        "stft_config": asdict(stft),
        "args": args,
        "run_name": run_name,
        "val_files": val_files,
        "val_groups": val_files if val_groups is None else val_groups,
    }


def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, device="cpu"):
    """torch.load(weights_only=True) of a checkpoint of this project; ValueError names what is wrong."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as err:
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"{path} is not a loadable checkpoint ({type(err).__name__}: {first_line})") from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in CHECKPOINT_KEYS):
        raise ValueError(f"{path} is not a checkpoint of this project (needs keys {', '.join(CHECKPOINT_KEYS)})")
    return checkpoint


def clean_state_dict(state_dict):
    """Weights saved from a DDP-wrapped ("module.") or torch.compile'd ("_orig_mod.") model -> plain keys."""

    def plain(key):
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        return key

    return {plain(key): value for key, value in state_dict.items()}


def model_from_checkpoint(checkpoint, device="cpu"):
    model = ConvAutoencoder(ModelConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(clean_state_dict(checkpoint["model_state"]))
    return model.to(device)


def data_settings(checkpoint):
    """What a script needs to read data as the run did: data_dir, families, extensions, stft (STFTConfig),
    window_seconds, window_stride (None: one sample per file), split_by and val_groups (its validation side)."""
    args = checkpoint["args"]
    return {
        "data_dir": args["data_dir"],
        "families": args["channels"],
        "extensions": args["extensions"],
        "stft": STFTConfig(**checkpoint["stft_config"]),
        "window_seconds": args.get("window_seconds"),
        "window_stride": args.get("window_stride"),
        "split_by": args.get("split_by", "file"),  # runs of before --split_by split by file
        "val_groups": checkpoint.get("val_groups", checkpoint.get("val_files")),
    }


def restore(checkpoint, model, optimizer, scaler):
    """Weights, optimizer and scaler from the checkpoint (if any); returns the run state to continue from."""
    if not checkpoint:
        return new_run_state()
    model.load_state_dict(clean_state_dict(checkpoint["model_state"]))
    optimizer.load_state_dict(checkpoint["optimizer_state"])
    if scaler.is_enabled() and "scaler_state" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler_state"])
    return {key: checkpoint[key] for key in RUN_STATE_KEYS}


def save_epoch_checkpoints(checkpoint, run_dir, epoch, improved, save_every, keep):
    """best_model.pt when improved, checkpoint_epoch_N.pt every `save_every` epochs (newest `keep` kept), last.pt."""
    if improved:
        save_checkpoint(checkpoint, os.path.join(run_dir, "best_model.pt"))
    if epoch % save_every == 0:
        save_checkpoint(checkpoint, os.path.join(run_dir, f"checkpoint_epoch_{epoch}.pt"))
        prune_checkpoints(run_dir, keep)
    save_checkpoint(checkpoint, os.path.join(run_dir, "last.pt"))  # written last: resume from here


def prune_checkpoints(run_dir, keep):
    """Remove periodic checkpoints beyond the newest `keep` (0 keeps all), ordered by epoch number."""
    periodic = sorted(
        (int(name[len("checkpoint_epoch_") : -3]), name)
        for name in os.listdir(run_dir)
        if name.startswith("checkpoint_epoch_") and name.endswith(".pt")
    )
    for _, name in periodic[:-keep] if keep else []:
        os.remove(os.path.join(run_dir, name))
