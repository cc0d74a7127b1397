"""One epoch of training and one pass of validation, as train.py (and bench.py) run them.

Both take batches from stft_dataset.pad_collate and return error sums weighted by valid bins, so
that the mean over processes and batches of different lengths is exact (see runtime.sum_over_processes).
"""

import torch
from tqdm import tqdm

from model import masked_mse
from runtime import is_rank_zero, model_input
from waveforms import COMPONENTS

PROGRESS_EVERY = 20  # steps between progress-bar loss updates (each one waits for the GPU)


def placeholder_batch():
    """A batch of no real file: every process must join each gradient all-reduce under DDP."""
    return torch.zeros(1, len(COMPONENTS), 32, 32), torch.zeros(1, 32, dtype=torch.bool)


def train_epoch(model, loader, optimizer, scaler, autocast, device, skips, epoch, distributed=False):
    """One pass over this process's training files.

    Returns ((sum over batches of loss x valid bins, valid bins, samples), per-step losses).
    Losses stay on the device until the epoch ends: reading one waits for the GPU.
    """
    model.train()
    total, bins, samples, step_losses = torch.zeros((), dtype=torch.float64, device=device), 0, 0, []
    bar = tqdm(
        loader, desc=f"epoch {epoch} train", unit="batch", leave=False, dynamic_ncols=True, disable=not is_rank_zero()
    )
    for batch in bar:
        skips.add_batch(batch["skipped"])
        x, mask = batch["spectrogram"], batch["mask"]  # (B, 3, F, T), (B, T)
        placeholder = x is None
        if placeholder:
            if not distributed:
                continue
            # A zero loss on a placeholder, in eval mode so that BatchNorm statistics learn nothing from it.
            x, mask = placeholder_batch()
            model.eval()
        n_bins = int(mask.sum())  # counted on the CPU copy: no wait for the GPU
        x = model_input(x, device)
        mask = mask.to(device, non_blocking=True)
        with autocast():
            reconstruction = model(x)
        if placeholder:
            model.train()
        loss = masked_mse(reconstruction.float(), x, mask) if n_bins else reconstruction.float().sum() * 0.0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if n_bins:
            total += loss.detach() * n_bins
            bins, samples = bins + n_bins, samples + len(batch["meta"])
            step_losses.append(loss.detach())
            if len(step_losses) % PROGRESS_EVERY == 0:
                bar.set_postfix(loss=f"{loss.item():.5f}")
    return (total, bins, samples), step_losses


@torch.no_grad()
def evaluate(model, loader, autocast, device, skips):
    """(sum over batches of MSE x valid bins, valid bins) over this process's validation files."""
    model.eval()
    total, bins = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in tqdm(
        loader, desc="validation", unit="batch", leave=False, dynamic_ncols=True, disable=not is_rank_zero()
    ):
        skips.add_batch(batch["skipped"])
        if batch["spectrogram"] is None:
            continue
        n_bins = int(batch["mask"].sum())
        x = model_input(batch["spectrogram"], device)
        with autocast():
            reconstruction = model(x)
        total += masked_mse(reconstruction.float(), x, batch["mask"].to(device, non_blocking=True)) * n_bins
        bins += n_bins
    return total, bins


def mean_loss(total, bins):
    return total / bins if bins else float("nan")
