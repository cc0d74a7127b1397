"""What a training run records besides checkpoints: TensorBoard scalars, images and hparams, config.json and
skipped_files.json, and the report printed at its end."""

import os

import numpy as np
import torch
from matplotlib import colormaps
from torch.utils.tensorboard.summary import hparams

from running.device import model_input
from running.storage import write_json_atomic


def write_run_record(run):
    """config.json (settings, dataset sizes, skip counts) and skipped_files.json (every skip and its reason)."""
    run.config["skipped"] = run.skips.counts()
    write_json_atomic(os.path.join(run.run_dir, "config.json"), run.config)
    write_json_atomic(os.path.join(run.run_dir, "skipped_files.json"), run.skips.summary())


NO_DATA_RGB = (0.83, 0.83, 0.83)  # figures.NO_DATA ("lightgrey"): bins at and above a recording's Nyquist frequency


@torch.no_grad()
def log_images(model, batch, device, writer, epoch):
    """Input | reconstruction of the fixed validation samples; rows E, N, Z, low frequencies at the bottom; the rows
    at and above each recording's own Nyquist frequency (batch["valid_bins"]) flat grey, as no data."""
    model.eval()
    spectrograms = batch["spectrogram"].float()
    reconstruction = model(model_input(spectrograms, device)).clamp(0, 1).cpu().numpy()
    for k, meta in enumerate(batch["meta"]):
        n_time = int(batch["mask"][k].sum())
        x, r = spectrograms[k, :, :, :n_time].numpy(), reconstruction[k, :, :, :n_time]
        image = np.array(colormaps["viridis"](np.concatenate([x, r], axis=2))[..., :3])  # (3, F, 2 T, RGB)
        image[:, batch.get("valid_bins", [x.shape[1]] * len(batch["meta"]))[k] :] = NO_DATA_RGB
        tile = np.concatenate([component[::-1] for component in image], axis=0)
        file_id = os.path.splitext(os.path.basename(meta["path"]))[0]
        writer.add_image(f"reconstruction/{k}_{file_id}", tile, epoch, dataformats="HWC")


def write_epoch_scalars(writer, epoch, first_step, step_losses, train_loss, val_loss, optimizer, samples_per_s):
    for step, loss in enumerate(torch.stack(step_losses).tolist() if step_losses else [], start=first_step):
        writer.add_scalar("loss/train_step", loss, step)
    writer.add_scalar("loss/train", train_loss, epoch)
    writer.add_scalar("loss/val", val_loss, epoch)
    writer.add_scalar("learning_rate", optimizer.param_groups[0]["lr"], epoch)
    writer.add_scalar("speed/train_samples_per_s", samples_per_s, epoch)


def log_hparams(writer, args, state):
    """Settings and final metrics into the run's own event file (HPARAMS tab), not a new sub-run."""
    metrics = {"hparam/best_val_loss": state["best_val_loss"], "hparam/best_epoch": state["best_epoch"]}
    values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
    for summary in hparams(values, metrics):
        writer.file_writer.add_summary(summary)
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, state["epoch"])


def report(state, run_dir, log_dir, skips, dataset):
    print(f"best validation loss {state['best_val_loss']:.5f} at epoch {state['best_epoch']}")
    print(f"run directory {run_dir}  (TensorBoard: tensorboard --logdir {log_dir})")
    print(f"skipped files: {skips.describe()}")
    if dataset.excluded:
        print("left out by --channels: " + ", ".join(f"{n} {families}" for families, n in dataset.excluded.items()))
