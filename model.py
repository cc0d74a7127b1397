"""Convolutional autoencoder for 3-component spectrograms, shape (batch, component, freq, time), and its losses."""

from dataclasses import asdict, dataclass

import torch.nn as nn
import torch.nn.functional as F

# How a spectrogram of any size meets the layers, which halve it 4 times and double it back (the seed arch; the
# figures below are for its stride of 16, "stride8" halves it 3 times):
#   "pad"          repeat the last frequency and time bin at least once, up to the next multiple of 16
#                  (n -> 16 * (n // 16 + 1)), crop the output back: every bin is reconstructed at its own position,
#                  whatever the recording's length, and never in the decoder's last column (the transposed
#                  convolutions' edge, filled from fewer kernel taps: training on 142-bin files, padded to 144,
#                  never keeps it);
#   "interpolate"  resize the decoder's (16 * ceil(F/16), 16 * ceil(T/16)) output to the input size: a stretch that
#                  depends on the length (142 bins: 144 -> 142, 0.99; 129 bins: 144 -> 129, 0.90), so lengths just
#                  over a multiple of 16 come out shifted by up to 15 bins (the seed model; checkpoints before "pad").
SIZE_FITS = ("pad", "interpolate")
# --arch: encoder widths, one stride-2 layer each (the decoder mirrors them). "seed" is the default, 777,987 parameters.
DEFAULT_ARCH = "seed"
ARCHS = {
    "seed": (32, 64, 128, 256),  # latent (256, F/16, T/16)
    "stride8": (32, 64, 128),  # latent (128, F/8, T/8): twice the resolution in frequency and time
    "wide": (64, 128, 256, 512),  # latent (512, F/16, T/16): twice the width of every layer
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture settings; stored in every checkpoint so no script needs architecture flags."""

    in_channels: int = 3  # E, N, Z
    features: tuple = ARCHS[DEFAULT_ARCH]  # one stride-2 3x3 conv layer each
    size_fit: str = "pad"  # one of SIZE_FITS

    def __post_init__(self):
        if self.size_fit not in SIZE_FITS:
            raise ValueError(f"size_fit must be one of {', '.join(SIZE_FITS)}, got {self.size_fit!r}")

    @property
    def stride(self):
        """Bins of the input per latent bin, along each axis."""
        return 2 ** len(self.features)

    def fitted_size(self, n):
        """Bins the layers get for n bins along an axis ("pad"; "interpolate" pads nothing, the convolutions round
        up): n // 16 + 1 latent bins of 16, at least one of them repeated."""
        return self.stride * (n // self.stride + 1)

    @classmethod
    def from_dict(cls, values):
        return cls(
            in_channels=int(values["in_channels"]),
            features=tuple(values["features"]),
            size_fit=values["size_fit"],  # checkpoints of before the field: checkpoints.filled_in
        )

    def to_dict(self):
        return {**asdict(self), "features": list(self.features)}


def conv_block(in_features, out_features):
    """3x3 stride-2 conv: (H, W) -> (ceil(H/2), ceil(W/2))."""
    return nn.Sequential(
        nn.Conv2d(in_features, out_features, 3, stride=2, padding=1),
        nn.BatchNorm2d(out_features),
        nn.ReLU(inplace=True),
    )


def deconv_block(in_features, out_features, last=False):
    """3x3 stride-2 transposed conv: (H, W) -> (2H, 2W); no BatchNorm/ReLU after the last layer."""
    deconv = nn.ConvTranspose2d(in_features, out_features, 3, stride=2, padding=1, output_padding=1)
    if last:
        return deconv
    return nn.Sequential(deconv, nn.BatchNorm2d(out_features), nn.ReLU(inplace=True))


class ConvAutoencoder(nn.Module):
    """(B, 3, F, T) -> latent (B, 256, F // 16 + 1, T // 16 + 1) -> (B, 3, F, T).

    With the default config and a (3, 129, 111) input (70 s at 100 Hz): latent (256, 9, 7);
    777,987 parameters. config.size_fit says how the input meets the layers: "pad" as above;
    "interpolate" gives a latent (256, ceil(F/16), ceil(T/16)) and resizes the decoder's
    (16 * ceil(F/16), 16 * ceil(T/16)) output to the input size.
    """

    def __init__(self, config=ModelConfig()):
        super().__init__()
        self.config = config
        widths = (config.in_channels, *config.features)
        self.encoder = nn.Sequential(*[conv_block(a, b) for a, b in zip(widths[:-1], widths[1:])])
        pairs = list(zip(widths[::-1][:-1], widths[::-1][1:]))  # (256, 128), ..., (32, 3)
        self.decoder = nn.Sequential(*[deconv_block(a, b) for a, b in pairs[:-1]], deconv_block(*pairs[-1], last=True))

    def encode(self, x):
        if self.config.size_fit == "pad":
            n_freq, n_time = x.shape[-2:]
            fit = self.config.fitted_size
            x = F.pad(x, (0, fit(n_time) - n_time, 0, fit(n_freq) - n_freq), mode="replicate")
        return self.encoder(x)

    def decode(self, latent, size):
        """latent -> reconstruction of spatial size `size` = (n_freq, n_time)."""
        output = self.decoder(latent)
        if self.config.size_fit == "pad":
            return output[..., : size[0], : size[1]]
        return F.interpolate(output, size=size, mode="bilinear", align_corners=False)

    def forward(self, x, with_latent=False):
        """The reconstruction of x; with_latent: (reconstruction, latent), one pass (train.py --positive_weight)."""
        latent = self.encode(x)
        reconstruction = self.decode(latent, x.shape[-2:])
        return (reconstruction, latent) if with_latent else reconstruction


def masked_errors(reconstruction, target, mask, power=2):
    """Mean |reconstruction - target| ** power over valid time bins: (B, C).

    mask: (B, T) True on valid time bins (see stft_dataset.pad_collate).
    """
    weights = mask[:, None, None, :].to(target.dtype)  # (B, 1, 1, T)
    error = (reconstruction - target).abs().pow(power) * weights
    valid = weights.sum(dim=(2, 3)) * target.shape[2]  # (B, 1): valid bins per component
    return error.sum(dim=(2, 3)) / valid


def masked_mse(reconstruction, target, mask, rows=None):
    """MSE over all valid bins of the batch (padding excluded), a scalar. rows: None, or (B, F) True on the frequency
    rows of each sample that count (train.py --nyquist_band: those below its recording's own Nyquist frequency)."""
    if rows is not None:
        weights = (mask[:, None, None, :] & rows[:, None, :, None]).to(target.dtype)  # (B, 1, F, T)
        error = (reconstruction - target).pow(2) * weights
        return error.sum() / (weights.sum() * target.shape[1])
    valid = mask.sum(dim=1).to(target.dtype)  # (B,) valid time bins per sample
    per_sample = masked_errors(reconstruction, target, mask).mean(dim=1)
    return (per_sample * valid).sum() / valid.sum()
