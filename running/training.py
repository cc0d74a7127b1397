"""One epoch of training and one pass of validation, as train.py (and bench.py) run them; the read-out fitted into
best_model.pt at the end of a run.

Both take batches from stft_dataset.pad_collate and return error sums weighted by valid bins, so
that the mean over processes and batches of different lengths is exact (see distributed.sum_over_processes).
"""

import logging
import math
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from embedding.poolings import pooled_features
from embedding.readout import READOUT_MAX_HZ, READOUT_POOLING, READOUT_SAMPLE, band_rows, fit_readout, window_bins
from embedding.representation import fit_sample
from model import masked_mse
from reading.augment import rows_below, within_band
from reading.batching import reconstruct
from reading.transform import STFTConfig
from reading.waveforms import COMPONENTS
from running.checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint
from running.device import model_input
from running.distributed import is_rank_zero
from running.positives import Positives

# The default training recipe, train.py's flag defaults (docs/training.md says how it was chosen).
NUM_EPOCHS, BATCH_SIZE, LR, WEIGHT_DECAY = 120, 8, 3e-3, 0.0
CROP_BINS, OFFSET_BINS, SPECTRAL_TILT, NOISE_FLOOR, HORIZONTAL_SWAP = (0, 0), 0, 0.15, 0.5, 0.0  # of training batches
PROGRESS_EVERY = 20  # steps between progress-bar loss updates (each one waits for the GPU)
ONE_CYCLE_WARMUP = 0.3  # fraction of a one-cycle run spent raising the learning rate (torch's OneCycleLR default)
ONE_CYCLE_START, ONE_CYCLE_END = 1 / 25, 1e-4  # learning-rate factors at the start and the end of a one-cycle run
LR_SCHEDULE_HELP = (
    f"onecycle: cosine rise from --lr / {1 / ONE_CYCLE_START:.0f} over {ONE_CYCLE_WARMUP * 100:.0f}%% of the steps, "
    f"cosine fall to --lr / {1 / ONE_CYCLE_END:.0f}; constant: --lr throughout"
)
SPLIT_BY = "station"  # --split_by: no station on both sides, so the validation loss is one on unseen stations


def placeholder_batch():
    """A batch of no real file: every process must join each gradient all-reduce under DDP."""
    return torch.zeros(1, len(COMPONENTS), 32, 32), torch.zeros(1, 32, dtype=torch.bool)


def train_epoch(
    model,
    loader,
    optimizer,
    scaler,
    autocast,
    device,
    skips,
    epoch,
    distributed=False,
    augment=None,
    learning_rate=None,
    start_step=0,
    after_step=None,
    band=None,
    positives=None,
):
    """One pass over this process's training files.

    augment: None, or (spectrogram, mask, step in this epoch) -> (spectrogram, mask), applied to each training batch
    on the CPU.
    learning_rate: None (keep the optimizer's), or step in this epoch -> learning rate of that step.
    start_step: batches of this epoch trained before a resume (the loader leaves them out, see preemption.SkipFirst).
    after_step: None, or called after every batch with (batches of this epoch done, (total, bins, samples) so far,
    step losses so far); it may save, or raise to stop the epoch there.
    band: None, or the samples' meta -> (B,) rows below each one's own Nyquist frequency (--nyquist_band): only
    they count in the loss, the others are filled as the transform fills them (augment.within_band).
    positives: None, or Positives (--positive_weight): the loss gains its contrastive term on the batch's pairs.
    Returns ((sum over batches of MSE x valid bins, valid bins, samples), per-step MSEs): the reconstruction's error
    alone, which validation measures too.
    Losses stay on the device until the epoch ends: reading one waits for the GPU.
    """
    model.train()
    total, bins, samples, step_losses = torch.zeros((), dtype=torch.float64, device=device), 0, 0, []
    bar = progress_bar(loader, f"epoch {epoch} train", start_step)
    for step, batch in enumerate(bar, start=start_step):
        skips.add_batch(batch["skipped"])
        if batch["spectrogram"] is not None or distributed:
            if learning_rate:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step)
            x, mask, rows = training_batch(batch, augment, step, band)
            n_bins = valid_bins(mask, rows)  # counted on the CPU copy: no wait for the GPU
            pairs = positives.of_batch(batch["meta"]) if positives and n_bins else None
            loss, mse = step_loss(
                model, model_input(x, device), mask.to(device, non_blocking=True), autocast, not n_bins, rows, pairs
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if n_bins:
                total += mse.detach() * n_bins
                bins, samples = bins + n_bins, samples + len(batch["meta"])
                step_losses.append(mse.detach())
                if len(step_losses) % PROGRESS_EVERY == 0:
                    bar.set_postfix(loss=f"{mse.item():.5f}")
        if after_step:
            after_step(step + 1, (total, bins, samples), step_losses)
    return (total, bins, samples), step_losses


def progress_bar(loader, description, start_step=0):
    """The loader's batches behind a progress bar that rank 0 alone shows and that leaves no line behind."""
    return tqdm(
        loader,
        desc=description,
        unit="batch",
        leave=False,
        dynamic_ncols=True,
        disable=not is_rank_zero(),
        initial=start_step,
    )


def training_batch(batch, augment, step, band=None):
    """(spectrogram, mask, rows that count or None) to train on: the batch's, augmented (and with `band`, its rows
    above each recording's Nyquist frequency filled as the transform fills them); a placeholder when no file of it
    could be read."""
    if batch["spectrogram"] is None:
        return (*placeholder_batch(), None)
    x, mask = batch["spectrogram"], batch["mask"]  # (B, 3, F, T), (B, T)
    x, mask = augment(x, mask, step) if augment else (x, mask)
    if band is None:
        return x, mask, None
    x, rows = within_band(x, mask, torch.tensor(band(batch["meta"])), band.stft.normalisation)
    return x, mask, rows


def valid_bins(mask, rows=None):
    """The valid bins of a batch in units of whole time bins (all its rows): padding and, with rows, the rows that do
    not count left out."""
    if rows is None:
        return int(mask.sum())
    return float((mask[:, None, :] & rows[:, :, None]).sum()) / rows.shape[1]


def step_loss(model, x, mask, autocast, placeholder=False, rows=None, pairs=None):
    """(loss to train on, masked MSE of the model's reconstruction of x): the MSE over `rows` alone where given, and
    with `pairs` (Positives.of_batch) plus its contrastive term. A placeholder gives a zero loss that still joins DDP's
    gradient all-reduce, computed in eval mode so that BatchNorm statistics learn nothing."""
    if placeholder:
        model.eval()
    with autocast():
        reconstruction, latent = model(x, with_latent=True)
    if placeholder:
        model.train()
        zero = reconstruction.float().sum() * 0.0
        return zero, zero
    mse = masked_mse(reconstruction.float(), x, mask, None if rows is None else rows.to(x.device))
    return (mse if pairs is None else mse + pairs(latent, mask)), mse


def one_cycle(progress, warmup=ONE_CYCLE_WARMUP, start=ONE_CYCLE_START, end=ONE_CYCLE_END):
    """Learning-rate factor at `progress` (0 to 1) of a run: a cosine rise from `start` to 1 over the first `warmup`
    of the run, then a cosine fall to `end`; the shape of torch's OneCycleLR, as a function of the step alone so
    that a resumed run (even with another --num_epochs) needs no scheduler state."""
    if progress < warmup:
        return start + (1 - start) * (1 - math.cos(math.pi * progress / warmup)) / 2
    return end + (1 - end) * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup)))) / 2


def learning_rate(args, epoch, steps_per_epoch):
    """step in the epoch -> learning rate, or None for a constant --lr."""
    if args.lr_schedule == "constant":
        return None
    total = args.num_epochs * steps_per_epoch
    return lambda step: args.lr * one_cycle(((epoch - 1) * steps_per_epoch + step) / total)


@torch.no_grad()
def evaluate(model, loader, autocast, device, skips, band=None):
    """(sum over batches of MSE x valid bins, valid bins) over this process's validation files; with `band` (as in
    train_epoch), over each recording's rows below its own Nyquist frequency."""
    model.eval()
    total, bins = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in progress_bar(loader, "validation"):
        skips.add_batch(batch["skipped"])
        if batch["spectrogram"] is None:
            continue
        rows = None if band is None else rows_below(batch["spectrogram"].shape[2], torch.tensor(band(batch["meta"])))
        n_bins = valid_bins(batch["mask"], rows)
        x = model_input(batch["spectrogram"], device)
        mask = batch["mask"].to(device, non_blocking=True)
        with autocast():
            reconstruction = reconstruct(model, x, mask)  # each file at its own length: batch-independent
        total += masked_mse(reconstruction.float(), x, mask, None if rows is None else rows.to(device)) * n_bins
        bins += n_bins
    return total, bins


def nyquist_band(args, stft):
    """--nyquist_band: the samples' meta -> the rows below each one's own Nyquist frequency; None when off."""
    return NyquistBand(stft) if args.nyquist_band else None


@dataclass(frozen=True)
class NyquistBand:
    """--nyquist_band of the transform `stft`: the samples' meta -> the rows below each one's own Nyquist frequency."""

    stft: STFTConfig

    def __call__(self, metas):
        return [self.stft.bins_below_nyquist(meta["native_rate"]) for meta in metas]


def positives(args, stft, config):
    """--positive_weight: the contrastive term (running/positives.py) on the band the read-out reads; None when off."""
    return Positives(args.positive_weight, band_rows(stft, config), config.stride) if args.positive_weight else None


def mean_loss(total, bins):
    return total / bins if bins else float("nan")


def store_readout(path, dataset, train_indices, stft, args, device):
    """best_model.pt at `path` gains the read-out (embedding/readout.py) fitted on a sample of the run's training
    samples (dataset positions `train_indices`, transformed by `stft`) with its weights; a run resumed after its last
    epoch fits it again (it changes nothing else). Nothing happens where the run saved no best model."""
    if not os.path.exists(path):
        return
    checkpoint = load_checkpoint(path, device)
    model = model_from_checkpoint(checkpoint, device).eval()
    positions = train_indices[fit_sample(len(train_indices), args.seed, READOUT_SAMPLE)]
    windows, rows = window_bins(stft), band_rows(stft, model.config)
    pooled = pooled_features(model, dataset, positions, args.batch_size, device, READOUT_POOLING, windows, rows)
    readout = fit_readout(pooled, args.seed, rows)
    save_checkpoint({**checkpoint, "readout": readout.to_dict()}, path)
    fitted = f"{len(pooled)} spectrograms of {len(positions)} training samples, whole and in windows"
    band = f"the latent's {rows} lowest frequency rows (below {READOUT_MAX_HZ:g} Hz)"
    logging.getLogger("train").info(
        "read-out: %d values per embedding from %s, fitted on %s (%s)", readout.dim, band, fitted, path
    )
