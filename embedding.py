"""Embeddings: one fixed-length vector per recording from the encoder's latent, whatever the recording's duration.

The latent of a (3, F, T) spectrogram is (256, F // 16 + 1, T // 16 + 1) with the seed arch, (128, F // 8 + 1,
T // 8 + 1) with "stride8" (model.ConvAutoencoder.encode); a pooling
over time gives a vector of fixed length. Each recording is encoded at its own length (batching.length_groups), so
its embedding does not depend on its batch. docs/embeddings.md says how the default pooling was chosen.

Also here: the catalogue row of a recording, and EmbeddingWriter, which streams embeddings to a .npy file.
"""

import os
import shutil
import tempfile

import numpy as np
import torch
from numpy.lib import format as npy_format

from baselines import time_mean
from batching import length_groups
from model import masked_errors
from storage import atomic_write

# latent (B, C, F', T') -> (B, D)
POOLINGS = {
    "time-mean": lambda latent: latent.mean(dim=3).flatten(1),  # C x F' values: the mean over time of each cell
    "mean": lambda latent: latent.mean(dim=(2, 3)),  # C values: the mean over time and frequency
    "time-mean-std": lambda latent: torch.cat([latent.mean(dim=3), latent.std(dim=3, correction=0)], dim=2).flatten(1),
    "time-max": lambda latent: latent.amax(dim=3).flatten(1),  # C x F' values: the maximum over time of each cell
}
DEFAULT_POOLING = "time-mean"
CATALOG_COLUMNS = (
    "path",  # relative to the data directory
    "trace_id",  # NET.STA.LOC.FAMILY?
    "network",
    "station",
    "location",
    "family",  # channel family: HH, HN, EH, BH, ...
    "starttime",  # ISO 8601, UTC
    "duration_s",
    "mse",  # the model's reconstruction MSE
    "mse_time_mean",  # the time-mean baseline's MSE (baselines.time_mean)
    "cluster",
    "cluster_distance",  # to the cluster's centre, in the clustering space (standardised, PCA)
    "anomaly_rank",  # 1 = the highest mse / mse_time_mean
    "map_x",
    "map_y",
    "trace_name",  # a SeisBench dataset's trace: pandas.merge(catalog, metadata, on="trace_name"); "" for files
    "trace_chunk",  # its chunk ("" unless the dataset is chunked)
    "dataset",  # the SeisBench dataset's folder name
)


@torch.no_grad()
def encode_batch(model, x, mask, pooling=DEFAULT_POOLING):
    """Padded batch (B, 3, F, T) and its mask -> (embeddings (B, D) float32, model MSE (B,), time-mean MSE (B,)),
    each recording encoded and reconstructed at its own length. The model must be in eval mode."""
    embeddings, mse, mse_time_mean = [None] * len(x), torch.zeros(len(x)), torch.zeros(len(x))
    for n_time, rows in length_groups(mask):
        own = x[rows, :, :, :n_time]
        latent = model.encode(own)
        reconstruction = model.decode(latent, own.shape[-2:])
        full = torch.ones(len(rows), n_time, dtype=torch.bool, device=own.device)
        mse[rows.cpu()] = masked_errors(reconstruction.float(), own, full).mean(dim=1).cpu()
        mse_time_mean[rows.cpu()] = masked_errors(time_mean(own, full), own, full).mean(dim=1).cpu()
        for row, vector in zip(rows.tolist(), POOLINGS[pooling](latent.float()).cpu()):
            embeddings[row] = vector
    return torch.stack(embeddings).numpy().astype(np.float32), mse.numpy(), mse_time_mean.numpy()


def catalog_row(meta, relpath, duration_s, mse, mse_time_mean):
    """The columns of a recording known when it is embedded (cluster, map and rank are filled in later)."""
    network, station, location, _ = meta["trace_id"].split(".")
    return {
        "path": relpath,
        "trace_id": meta["trace_id"],
        "network": network,
        "station": station,
        "location": location,
        "family": meta["family"],
        "starttime": meta["starttime"],
        "duration_s": round(float(duration_s), 2),
        "mse": float(mse),
        "mse_time_mean": float(mse_time_mean),
        **{name: meta.get(name, "") for name in ("trace_name", "trace_chunk", "dataset")},
    }


class EmbeddingWriter:
    """Rows appended batch by batch to a temporary file; `close` writes the .npy atomically, copying in chunks, so
    the embeddings are never held in memory whole."""

    def __init__(self, path):
        self.path, self.rows, self.dim = path, 0, None
        self.raw = tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(path)), suffix=".rows", delete=False)

    def append(self, embeddings):
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.dim = embeddings.shape[1]
        self.raw.write(embeddings.tobytes())
        self.rows += len(embeddings)

    def close(self):
        self.raw.close()
        try:
            header = {"descr": npy_format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
            header["shape"] = (self.rows, self.dim or 0)

            def write(f):
                npy_format.write_array_header_1_0(f, header)
                with open(self.raw.name, "rb") as rows:
                    shutil.copyfileobj(rows, f, 16 << 20)

            atomic_write(self.path, write)
        finally:
            os.remove(self.raw.name)
