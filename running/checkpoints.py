"""Checkpoints: the one writer and the one reader of the checkpoint dict, atomic saves, pruning.

A checkpoint holds plain data only (state dicts, numbers, strings, lists, dicts), so it loads with
torch.load(weights_only=True):
  model_state, optimizer_state, scaler_state   state dicts (weights always of the plain model)
  model_config, stft_config                     ModelConfig and STFTConfig as dicts
  args                                          train.py's resolved flags (data_dir, channels, extensions, ...)
  run_name, val_files                           the run and its validation files (relative to data_dir)
  val_groups                                    what args["split_by"] put on the validation side (files, "NET.STA",
                                                "NET" or UTC day numbers)
  epoch, global_step, best_val_loss, best_epoch, history   where the run stands (after its last whole epoch)
  in_epoch                                      None, or where a save in the middle of an epoch stood: the epoch,
                                                its batches done, their error sums and rank 0's step losses
Scripts rebuild the model with `model_from_checkpoint` and the data pipeline with `data_settings`. A checkpoint
written before a setting or key existed is read as one written today: `filled_in` (applied by `load_checkpoint`)
adds what that run did, the one place that knows.
"""

import io
import os
from dataclasses import asdict

import torch

from embedding.readout import Readout
from model import ConvAutoencoder, ModelConfig
from reading.recordings import window_problems
from reading.transform import STFTConfig
from running.settings import RunError
from running.storage import atomic_write

CHECKPOINT_KEYS = ("model_state", "model_config", "stft_config")
# What runs written before a train.py setting existed did: filled_in() gives their checkpoints these values.
BEFORE_FLAG = {
    "lr_schedule": "constant",
    "crop_bins": [0, 0],
    "offset_bins": 0,
    "weight_decay": 0.0,
    "split_by": "file",
    "spectral_tilt": 0.0,
    "noise_floor": 0.0,
    "horizontal_swap": 0.0,
    "nyquist_band": False,  # every row in the loss
    "positive_weight": 0.0,  # no contrastive term
    "size_fit": "interpolate",  # the seed model's resizing, also in model_config
    "arch": "seed",
    "window_seconds": None,  # one sample per file
    "window_stride": None,
    "normalisation": "min-max",  # also in stft_config: log10 |STFT| min-max per component
}


def new_run_state():
    """Where a new run stands: epoch, global_step, best_val_loss, best_epoch, history, in_epoch."""
    return {
        "epoch": 0,
        "global_step": 0,
        "best_val_loss": float("inf"),
        "best_epoch": 0,
        "history": [],
        "in_epoch": None,  # {"epoch", "step", "sums", "step_losses"} in a checkpoint written mid-epoch
    }


RUN_STATE_KEYS = tuple(new_run_state())


def checkpoint_dict(state, model, optimizer, scaler, stft, args, run_name, val_files, val_groups):
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
        "val_groups": val_groups,
    }


def save_checkpoint(checkpoint, path):
    """Atomic save; storage.WriteFailed names the file and the cause (torch.save into a file would hide it)."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def filled_in(checkpoint):
    """The checkpoint as this version writes it: what a run of before a setting or key lacks is what that run did
    (BEFORE_FLAG in args and model_config; its validation files as its validation groups; a new run's state)."""
    fresh = new_run_state()
    val_files = checkpoint.get("val_files", [])
    return {
        **{key: fresh[key] for key in RUN_STATE_KEYS},
        **checkpoint,
        "args": {**BEFORE_FLAG, **checkpoint.get("args", {})},
        "model_config": {"size_fit": BEFORE_FLAG["size_fit"], **checkpoint["model_config"]},
        "stft_config": {"normalisation": BEFORE_FLAG["normalisation"], **checkpoint.get("stft_config", {})},
        "val_files": val_files,
        "val_groups": checkpoint.get("val_groups", val_files),
    }


def load_checkpoint(path, device="cpu"):
    """torch.load(weights_only=True) of a checkpoint of this project, filled_in; ValueError names what is wrong."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as err:
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path} is not a loadable checkpoint (0 bytes)") from None
        first_line = str(err).splitlines()[0].split(". ")[0] if str(err) else ""  # torch adds paragraphs of advice
        raise ValueError(f"{path} is not a loadable checkpoint ({type(err).__name__}: {first_line})") from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in CHECKPOINT_KEYS):
        raise ValueError(f"{path} is not a checkpoint of this project (needs keys {', '.join(CHECKPOINT_KEYS)})")
    return filled_in(checkpoint)


def clean_state_dict(state_dict):
    """Weights saved from a DDP-wrapped ("module.") or torch.compile'd ("_orig_mod.") model -> plain keys."""

    def plain(key):
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        return key

    return {plain(key): value for key, value in state_dict.items()}


def model_from_checkpoint(checkpoint, device="cpu"):
    """The model of a checkpoint, on `device`; model.readout is its read-out (readout.py), None where it has none."""
    model = ConvAutoencoder(ModelConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(clean_state_dict(checkpoint["model_state"]))
    model.readout = Readout.from_dict(checkpoint["readout"]) if checkpoint.get("readout") else None
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
        "window_seconds": args["window_seconds"],
        "window_stride": args["window_stride"],
        "split_by": args["split_by"],
        "val_groups": checkpoint["val_groups"],
    }


def chosen_windows(args, settings):
    """(window_seconds, window_stride): the flags of settings.window_settings, else the checkpoint's (data_settings);
    a new --window_seconds without --window_stride strides by its own length. RunError if they do not fit the STFT."""
    window_seconds = args.window_seconds or settings["window_seconds"]
    window_stride = args.window_stride or (settings["window_stride"] if not args.window_seconds else None)
    problems = window_problems(window_seconds, window_stride, settings["stft"])
    if problems:
        raise RunError("; ".join(problems))
    return window_seconds, window_stride


def restore(checkpoint, model, optimizer, scaler):
    """Weights, optimizer and scaler from the checkpoint (if any); returns the run state to continue from."""
    if not checkpoint:
        return new_run_state()
    model.load_state_dict(clean_state_dict(checkpoint["model_state"]))
    optimizer.load_state_dict(checkpoint["optimizer_state"])
    if scaler.is_enabled() and "scaler_state" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler_state"])
    return {key: checkpoint[key] for key in RUN_STATE_KEYS}


def resume_settings(args, checkpoint, keys, defaults):
    """Take the run-defining settings `keys` from the checkpoint; warn where the command line set another value.

    defaults: {name: the flag's default}; a --data_dir other than its default is honoured (the data may have moved).
    Returns the names of the settings given on the command line and ignored.
    """
    saved, ignored = checkpoint["args"], []
    for key in keys:
        given, kept = getattr(args, key), saved.get(key)
        if given != defaults[key] and given != kept:
            ignored.append(f"--{key} {given} ignored: a resumed run keeps its checkpoint's value {kept}")
        setattr(args, key, kept)
    if args.data_dir == defaults["data_dir"]:
        args.data_dir = saved["data_dir"]
    return ignored


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


def progress(checkpoint):
    """(whole epochs, batches of the next one) a checkpoint has trained: orders checkpoints of one run."""
    in_epoch = checkpoint.get("in_epoch")
    return checkpoint["epoch"], in_epoch["step"] if in_epoch else 0


def newest_intact(run_dir):
    """(path, checkpoint) of the loadable checkpoint in run_dir that has trained furthest (on a tie: last.pt, then
    checkpoint_epoch_N.pt, then best_model.pt), or (None, None) when none loads."""
    names = sorted(name for name in os.listdir(run_dir) if name.endswith(".pt")) if os.path.isdir(run_dir) else []
    best_key, best = None, (None, None)
    for name in names:
        try:
            checkpoint = load_checkpoint(os.path.join(run_dir, name))
        except (OSError, ValueError):
            continue
        key = (progress(checkpoint), 2 if name == "last.pt" else int(name.startswith("checkpoint_epoch_")))
        if best_key is None or key > best_key:
            best_key, best = key, (os.path.join(run_dir, name), checkpoint)
    return best


def newest_run_dir(checkpoint_dir):
    """The run folder under checkpoint_dir whose newest checkpoint was written last, or None."""
    if not os.path.isdir(checkpoint_dir):
        return None

    def written(run_dir):
        return max((entry.stat().st_mtime for entry in os.scandir(run_dir) if entry.name.endswith(".pt")), default=0)

    runs = [entry.path for entry in os.scandir(checkpoint_dir) if entry.is_dir() and written(entry.path)]
    return max(runs, key=written, default=None)


def resume_point(resume, checkpoint_dir):
    """--resume PATH -> (checkpoint path, checkpoint). PATH: a checkpoint file; a run folder (its newest intact
    checkpoint); or 'auto' (that of the run under checkpoint_dir written last). A file that does not load raises
    ValueError naming the newest intact checkpoint beside it."""
    if resume == "auto" or os.path.isdir(resume):
        run_dir = newest_run_dir(checkpoint_dir) if resume == "auto" else resume
        path, checkpoint = newest_intact(run_dir) if run_dir else (None, None)
        if checkpoint is None:
            where = run_dir or f"a run folder under {checkpoint_dir}"
            raise FileNotFoundError(f"--resume {resume}: no loadable checkpoint in {where}")
        return path, checkpoint
    try:
        return resume, load_checkpoint(resume)
    except ValueError as err:
        path, _ = newest_intact(os.path.dirname(os.path.abspath(resume)))
        advice = (
            f"the newest intact checkpoint there is {path} (--resume {path})" if path else "no checkpoint there loads"
        )
        raise ValueError(f"{err}; {advice}") from None
