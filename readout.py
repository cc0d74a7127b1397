"""The read-out: the encoder's latent -> a compact embedding, fitted when training ends and stored in the checkpoint.

A recording's latent (C, F', T') is pooled over time (embedding.POOLINGS[READOUT_POOLING]: the mean and the standard
deviation over time of each channel and frequency cell, 4,608 values with the seed arch), then standardised and
projected onto its first READOUT_DIM principal components, whitened (unit variance each). Scaler and PCA are fitted,
with the best weights, on at most READOUT_SAMPLE of the run's training samples, each whole and in windows of 10 s
(READOUT_WINDOW_SECONDS): fitted on whole files alone, the read-out embedded 10 s windows of held-out networks far
worse (docs/embeddings.md); it must see the lengths users embed. train.py stores it as checkpoint["readout"] when a
run ends, so embed.py and similar.py need no flag; the model keeps its parameters.
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


@dataclass(frozen=True)
class Readout:
    """pooled (B, D) -> ((pooled - mean) / scale) @ projection.T, (B, dim): whitened principal components."""

    pooling: str
    mean: torch.Tensor  # (D,)
    scale: torch.Tensor  # (D,)
    projection: torch.Tensor  # (dim, D): principal axes divided by the square root of their variance
    fitted_on: int  # spectrograms: training samples whole and their windows

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
                "fitted_on": self.fitted_on}  # fmt: skip

    @classmethod
    def from_dict(cls, values):
        return cls(values["pooling"], values["mean"], values["scale"], values["projection"], int(values["fitted_on"]))


def fit_readout(pooled, seed, dim=READOUT_DIM, pooling=READOUT_POOLING):
    """Readout fitted on pooled features (N, D) of training samples; dim at most N and D."""
    pooled = np.asarray(pooled, dtype=np.float64)
    scaler = StandardScaler().fit(pooled)
    pca = PCA(min(dim, *pooled.shape), random_state=seed).fit(scaler.transform(pooled))
    variance = np.maximum(pca.explained_variance_, 1e-12)
    projection = pca.components_ / np.sqrt(variance)[:, None]
    # PCA centres the standardised rows at their mean, ~0: fold it into the mean so one affine map does all
    mean = scaler.mean_ + scaler.scale_ * pca.mean_
    as_tensor = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    return Readout(pooling, as_tensor(mean), as_tensor(scaler.scale_), as_tensor(projection), len(pooled))


def window_bins(stft):
    """READOUT_WINDOW_SECONDS as (time bins of a window, stride in bins) of the transform `stft`."""
    seconds, stride = READOUT_WINDOW_SECONDS
    return stft.n_time_bins(round(seconds * stft.sampling_rate)), max(1, round(stride * stft.sampling_rate / stft.hop))
