"""Embeddings: one fixed-length vector per recording from the encoder's latent, whatever the recording's duration.

The latent of a (3, F, T) spectrogram is (256, F // 16 + 1, T // 16 + 1) with the seed arch, (128, F // 8 + 1,
T // 8 + 1) with "stride8" (model.ConvAutoencoder.encode); a pooling
over time gives a vector of fixed length. Each recording is encoded at its own length (batching.length_groups), so
its embedding does not depend on its batch. docs/embeddings.md says how the default pooling was chosen.

The catalogue and the stored embeddings are in embedding/catalogue.py.
"""

import numpy as np
import torch
from torch.utils.data import DataLoader

from embedding.baselines import time_mean
from model import masked_errors
from reading.augment import rescale
from reading.batching import LengthBatchSampler, length_groups
from running.device import model_input
from stft_dataset import pad_collate

# latent (B, C, F', T') -> (B, D)
POOLINGS = {
    "time-mean": lambda latent: latent.mean(dim=3).flatten(1),  # C x F' values: the mean over time of each cell
    "mean": lambda latent: latent.mean(dim=(2, 3)),  # C values: the mean over time and frequency
    "time-mean-std": lambda latent: torch.cat([latent.mean(dim=3), latent.std(dim=3, correction=0)], dim=2).flatten(1),
    "time-max": lambda latent: latent.amax(dim=3).flatten(1),  # C x F' values: the maximum over time of each cell
}
READOUT = "readout"  # the checkpoint's read-out (readout.py): the default where the checkpoint has one
FALLBACK_POOLING = "time-mean"  # the default of checkpoints without a read-out (trained before it)


@torch.no_grad()
def encode_batch(model, x, mask, pooling=None):
    """Padded batch (B, 3, F, T) and its mask -> (embeddings (B, D) float32, model MSE (B,), time-mean MSE (B,)),
    each recording encoded and reconstructed at its own length. pooling: READOUT or a POOLINGS key (default:
    default_pooling(model)). The model must be in eval mode."""
    pooling = pooling or default_pooling(model)
    embeddings, mse, mse_time_mean = [None] * len(x), torch.zeros(len(x)), torch.zeros(len(x))
    for n_time, rows in length_groups(mask):
        own = x[rows, :, :, :n_time]
        latent = model.encode(own)
        reconstruction = model.decode(latent, own.shape[-2:])
        full = torch.ones(len(rows), n_time, dtype=torch.bool, device=own.device)
        mse[rows.cpu()] = masked_errors(reconstruction.float(), own, full).mean(dim=1).cpu()
        mse_time_mean[rows.cpu()] = masked_errors(time_mean(own, full), own, full).mean(dim=1).cpu()
        for row, vector in zip(rows.tolist(), pooled(model, latent.float(), pooling).cpu()):
            embeddings[row] = vector
    return torch.stack(embeddings).numpy().astype(np.float32), mse.numpy(), mse_time_mean.numpy()


@torch.no_grad()
def pooled_features(model, dataset, positions, batch_size, device, pooling, crop_bins=None, rows=None):
    """(N, D) float32 pooled latents of the dataset's samples at `positions` (those that read; unusable ones are
    dropped, as everywhere), each encoded at its own length; with crop_bins = (L, stride), also of every window of L
    time bins every `stride` bins of each sample, min-max normalised again as a recording of that length would be
    (augment.rescale); rows: pooled over the latent's first `rows` frequency rows only. The model must be in eval
    mode."""
    sampler = LengthBatchSampler(dataset.time_bins(), batch_size, positions)
    found = []
    for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_collate):
        if batch["spectrogram"] is None:
            continue
        x, mask = model_input(batch["spectrogram"], device), batch["mask"].to(device)
        found.append(pooled_batch(model, x, mask, pooling, rows))
        n_time = int(mask.sum(dim=1).min())  # one length: the batch sampler groups by it
        length, stride = crop_bins or (n_time + 1, 1)
        for start in range(0, n_time - length + 1, stride):
            window = rescale(x[..., start : start + length], None, dataset.stft.normalisation)
            full = torch.ones(len(window), length, dtype=torch.bool, device=window.device)
            found.append(pooled_batch(model, window, full, pooling, rows))
    return np.concatenate(found)


@torch.no_grad()
def pooled_batch(model, x, mask, pooling, rows=None):
    """(B, D) float32 embeddings of a padded batch as encode_batch gives them, without the reconstructions; rows: of the
    latent's first `rows` frequency rows only."""
    vectors = [None] * len(x)
    for n_time, members in length_groups(mask):
        latent = model.encode(x[members, :, :, :n_time])[:, :, :rows]
        for row, vector in zip(members.tolist(), pooled(model, latent.float(), pooling).cpu()):
            vectors[row] = vector
    return torch.stack(vectors).numpy().astype(np.float32)


def pooled(model, latent, pooling):
    """latent (B, C, F', T') -> (B, D) by POOLINGS[pooling], or for READOUT by the model's read-out (model.readout,
    from its checkpoint)."""
    if pooling != READOUT:
        return POOLINGS[pooling](latent)
    return model.readout(POOLINGS[model.readout.pooling](latent[:, :, : model.readout.rows]))


def default_pooling(model):
    """What --pooling means when not given: the read-out of the model's checkpoint, else FALLBACK_POOLING."""
    return READOUT if getattr(model, "readout", None) is not None else FALLBACK_POOLING
