"""The read-out: the encoder's latent -> a compact embedding, fitted when training ends and stored in the checkpoint.

A recording's latent (C, F', T') is cut to its lowest frequency rows, those whose inputs all lie below READOUT_MAX_HZ
(band_rows: 3 of 9 rows, 0-18.4 Hz, with the seed arch), pooled over time (embedding.POOLINGS[READOUT_POOLING]: the mean
and the standard deviation over time of each channel and frequency cell, 1,536 values), then standardised and
projected onto its first READOUT_DIM principal components, whitened (unit variance each). Scaler and PCA are fitted,
with the best weights, on at most READOUT_SAMPLE of the run's training samples, each whole and in windows of 10 s
(READOUT_WINDOW_SECONDS): fitted on whole files alone, the read-out embedded 10 s windows of held-out networks far
worse (docs/embeddings.md); it must see the lengths users embed. The band: a 40 Hz recording (BH) holds no data above
20 Hz, and read over the whole band the embedding sorted recordings by instrument and placed held-out BH windows
badly (docs/embeddings.md). train.py stores it as checkpoint["readout"] when a run ends, so embed.py and similar.py
need no flag; the model keeps its parameters.
"""

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

READOUT_POOLING = "time-mean-std"  # embedding.POOLINGS key the PCA is fitted on (embedding.pooled_features)
READOUT_DIM = 32  # values per embedding
READOUT_SAMPLE = 5_000  # training samples the scaler and PCA are fitted on, each whole and in windows:
READOUT_WINDOW_SECONDS = (10.0, 5.0)  # windows of 10 s every 5 s of each (16 per 90 s file)
READOUT_MAX_HZ = 20.0  # the band read: the Nyquist frequency of 40 Hz recordings (BH), the lowest of the shipped data


@dataclass(frozen=True)
class Readout:
    """pooled (B, D) -> ((pooled - mean) / scale) @ projection.T, (B, dim): whitened principal components. pooled is
    POOLINGS[pooling] of the latent's first `rows` frequency rows (None: every row, as read-outs before the band)."""

    pooling: str
    mean: torch.Tensor  # (D,)
    scale: torch.Tensor  # (D,)
    projection: torch.Tensor  # (dim, D): principal axes divided by the square root of their variance
    fitted_on: int  # spectrograms: training samples whole and their windows
    rows: int | None = None  # latent frequency rows read (band_rows)

    def __call__(self, pooled):
        """In float64, so that a row's embedding does not depend on the size of its batch (a float32 matrix product
        may sum in another order for another shape); returned as float32."""
        mean, scale, projection = (t.to(pooled.device, torch.float64) for t in (self.mean, self.scale, self.projection))
        return (((pooled.double() - mean) / scale) @ projection.T).float()

    @property
    def dim(self):
        return self.projection.shape[0]

    def to_dict(self):
        return {"pooling": self.pooling, "mean": self.mean, "scale": self.scale, "projection": self.projection,
                "fitted_on": self.fitted_on, "rows": self.rows}  # fmt: skip

    @classmethod
    def from_dict(cls, values):
        rows = values.get("rows")  # absent from read-outs of before the band
        return cls(values["pooling"], values["mean"], values["scale"], values["projection"], int(values["fitted_on"]),
                   None if rows is None else int(rows))  # fmt: skip


def fit_readout(pooled, seed, rows=None, dim=READOUT_DIM, pooling=READOUT_POOLING):
    """Readout fitted on pooled features (N, D) of training samples (of the latent's first `rows` frequency rows);
    dim at most N and D."""
    pooled = np.asarray(pooled, dtype=np.float64)
    scaler = StandardScaler().fit(pooled)
    pca = PCA(min(dim, *pooled.shape), random_state=seed).fit(scaler.transform(pooled))
    variance = np.maximum(pca.explained_variance_, 1e-12)
    projection = pca.components_ / np.sqrt(variance)[:, None]
    # PCA centres the standardised rows at their mean, ~0: fold it into the mean so one affine map does all
    mean = scaler.mean_ + scaler.scale_ * pca.mean_
    as_tensor = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    return Readout(pooling, as_tensor(mean), as_tensor(scaler.scale_), as_tensor(projection), len(pooled), rows)


def window_bins(stft):
    """READOUT_WINDOW_SECONDS as (time bins of a window, stride in bins) of the transform `stft`."""
    seconds, stride = READOUT_WINDOW_SECONDS
    return stft.n_time_bins(round(seconds * stft.sampling_rate)), max(1, round(stride * stft.sampling_rate / stft.hop))


def band_rows(stft, config, max_hz=READOUT_MAX_HZ):
    """Latent frequency rows whose inputs all lie below max_hz (at least one). With stride s (model.ModelConfig), row m
    is computed from input bins s*m - s + 1 .. s*m + s - 1 (3x3 kernels, stride 2, padding 1, len(features) layers), so
    rows 0 .. n // s - 1 see only the n bins below max_hz: 52 bins below 20 Hz, stride 16 -> 3 rows (bins 0-47)."""
    return max(1, stft.bins_below_nyquist(2 * max_hz) // config.stride)
