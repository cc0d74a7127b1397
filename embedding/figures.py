"""Figures of spectrograms, reconstructions and embeddings (matplotlib's object API: no pyplot state, no display).

Spectrograms are (3, n_freq, n_time) arrays of valid bins, E, N, Z; axes in s and Hz, low frequencies at the bottom.
"""

import os

import matplotlib
import matplotlib.dates as mdates
import numpy as np
from matplotlib.figure import Figure

from reading.waveforms import COMPONENTS, MINISEED_EXTENSIONS
from running.storage import atomic_write


def sample_name(path, starttime=None):
    """A figure's name for a sample: its file's name less a miniSEED extension (an SDS day file keeps its day:
    XX.S000..HHE.D.2020.001), and for a window of a longer recording its start (_20200101T065514)."""
    stem, extension = os.path.splitext(os.path.basename(path))
    name = stem if extension.lower() in MINISEED_EXTENSIONS else stem + extension
    return f"{name}_{starttime[:19].replace('-', '').replace(':', '')}" if starttime else name


NO_DATA = "lightgrey"  # bins at and above a recording's own Nyquist frequency: no data, never drawn as data


def show_spectrogram(ax, image, stft, cmap="viridis", vmin=0, vmax=1, native_rate=None):
    """One component's (n_freq, n_time) image on `ax`, time in s and frequency in Hz; returns the image artist.
    native_rate: the recording's own sampling rate (Hz): the bins at and above its Nyquist frequency are masked and
    drawn flat NO_DATA (said in the title of the axes), not as the copies of the last bin that the spectrogram holds."""
    freqs, times = stft.axes(image.shape[-1])
    n_valid = stft.bins_below_nyquist(native_rate)
    if n_valid < image.shape[0]:
        image = np.ma.masked_array(image, np.arange(image.shape[0])[:, None] >= n_valid + np.zeros_like(image))
        ax.text(0.02, 0.97, f"grey: no data above {native_rate / 2:g} Hz (Nyquist)", transform=ax.transAxes,
                fontsize=6, va="top")  # fmt: skip
    colours = matplotlib.colormaps[cmap].with_extremes(bad=NO_DATA)
    return ax.imshow(
        image,
        origin="lower",
        aspect="auto",
        cmap=colours,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
        extent=(times[0], times[-1], freqs[0], freqs[-1]),
    )


def plot_reconstruction(spectrogram, reconstruction, stft, title, native_rate=None):
    """Figure with one row per component (E, N, Z): input, reconstruction, difference.

    spectrogram, reconstruction: (3, n_freq, n_time) arrays of valid bins only. native_rate: the recording's own
    sampling rate (Hz): the bins at and above its Nyquist frequency are drawn as no data in every panel and left out
    of the MSE in the titles.
    """
    n_valid = stft.bins_below_nyquist(native_rate)
    mse = ((reconstruction - spectrogram)[:, :n_valid] ** 2).mean(axis=(1, 2))
    figure = Figure(figsize=(13, 8))
    axes = figure.subplots(3, 3, sharex=True, sharey=True)
    for row, component in enumerate(COMPONENTS):
        panels = [
            (spectrogram[row], "input", "viridis", (0, 1)),
            (reconstruction[row], "reconstruction", "viridis", (0, 1)),
            (reconstruction[row] - spectrogram[row], "difference", "RdBu_r", (-0.5, 0.5)),
        ]
        for col, (image, name, cmap, (vmin, vmax)) in enumerate(panels):
            ax = axes[row, col]
            mesh = show_spectrogram(ax, image, stft, cmap, vmin, vmax, native_rate)
            figure.colorbar(mesh, ax=ax)
            ax.set_title(f"{component} {name}" + (f" (MSE {mse[row]:.4f})" if col == 1 else ""), fontsize=9)
            if row == 2:
                ax.set_xlabel("time (s)")
            if col == 0:
                ax.set_ylabel("frequency (Hz)")
    figure.suptitle(f"{title}   MSE E {mse[0]:.4f}  N {mse[1]:.4f}  Z {mse[2]:.4f}")
    return figure


def plot_spectrogram_row(spectrograms, titles, stft, suptitle, native_rates=None):
    """The Z component of each spectrogram side by side (time in s, frequency in Hz); native_rates: each recording's
    own sampling rate (Hz), whose bins above Nyquist are drawn as no data (show_spectrogram)."""
    native_rates = native_rates if native_rates is not None else [None] * len(spectrograms)
    figure = Figure(figsize=(2.6 * len(spectrograms) + 0.6, 2.8))
    axes = np.atleast_1d(figure.subplots(1, len(spectrograms), sharey=True))
    for ax, spectrogram, title, rate in zip(axes, spectrograms, titles, native_rates):
        show_spectrogram(ax, spectrogram[COMPONENTS.index("Z")], stft, native_rate=rate)
        ax.set_title(title, fontsize=7)
        ax.set_xlabel("time (s)")
    axes[0].set_ylabel("Z frequency (Hz)")
    figure.suptitle(suptitle, fontsize=9)
    figure.tight_layout()
    return figure


def plot_map(xy, colourings, of=None):
    """The 2-D map once per colouring: {title: labels (N,)}; a legend of every label value. of: the recordings that
    the N points were drawn from, where they are a sample (said in the title; the legend counts the points)."""
    figure = Figure(figsize=(6.5 * len(colourings), 5.5))
    if of and of > len(xy):
        figure.suptitle(f"{len(xy):,} of {of:,} recordings, drawn at random", fontsize=9)
    shown, outside = on_axes(xy)
    for ax, (title, labels) in zip(np.atleast_1d(figure.subplots(1, len(colourings))), colourings.items()):
        values, counts = np.unique(labels, return_counts=True)
        on_top = np.argsort(np.argsort(-counts, kind="stable"))  # the smallest groups drawn last: none hidden
        for value, count, layer in zip(values, counts, on_top):
            chosen = labels == value
            for kept, marker in ((chosen & ~outside, "o"), (chosen & outside, "x")):
                if marker == "x" and not kept.any():
                    continue
                label = f"{value} ({count})" if marker == "o" else "_beyond"  # "_": not in the legend
                ax.scatter(shown[kept, 0], shown[kept, 1], s=8, marker=marker, label=label, zorder=2 + layer,
                           color=f"C{layer % 10}")  # fmt: skip
        if outside.any():
            title += f"\n(x: {int(outside.sum())} beyond the 0.5-99.5 % range, drawn at its edge)"
        ax.set_xlabel("principal component 1 (standardised units)")
        ax.set_ylabel("principal component 2 (standardised units)")
        ax.set_title(title)
        ax.legend(fontsize=7, markerscale=1.5)
    figure.tight_layout()
    return figure


def on_axes(xy, share=0.005):
    """(points clipped to the range between the `share` and 1 - `share` quantiles of each axis, widened by a quarter,
    mask of the points clipped): one far outlier no longer squeezes every other point into a corner of the map."""
    if len(xy) < 2:
        return xy, np.zeros(len(xy), dtype=bool)
    low, high = np.quantile(xy, share, axis=0), np.quantile(xy, 1 - share, axis=0)
    pad = np.maximum(high - low, 1e-9) / 4
    low, high = low - pad, high + pad
    return np.clip(xy, low, high), ((xy < low) | (xy > high)).any(axis=1)


def plot_clusters_over_time(edges, counts, clusters=None, size=(10, 4)):
    """Recordings per cluster in each bin of start time: edges (n_bins + 1,) in s since 1970, counts (K, n_bins) of
    the clusters numbered `clusters` (default 0..K-1), stacked."""
    centres = ((edges[:-1] + edges[1:]) / 2).astype("datetime64[s]")
    figure = Figure(figsize=size)
    ax = figure.subplots()
    bottom = np.zeros(counts.shape[1])
    width = (edges[1] - edges[0]) / 86_400  # days
    for value, members in zip(clusters if clusters is not None else range(len(counts)), counts):
        ax.bar(centres, members, width=width, bottom=bottom, label=f"cluster {value}")
        bottom += members
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    bins = f"{width:.1f} days" if width >= 1 else f"{width * 24:.2g} hours"
    ax.set_xlabel(f"start time (UTC; bins of {bins})")
    ax.set_ylabel("recordings")
    ax.legend(fontsize=7, ncols=2)
    figure.tight_layout()
    return figure


def plot_members(spectrograms, waveforms, titles, stft, suptitle, native_rates):
    """Each member's Z spectrogram (time in s, frequency in Hz; no data above its own Nyquist frequency drawn grey)
    above its Z waveform (time in s, counts less their mean, at stft.sampling_rate). waveforms: (3, n) arrays, or
    text saying why there is none."""
    figure = Figure(figsize=(max(2.6 * len(spectrograms) + 0.6, 6.0), 4.8))  # wide enough for its title
    axes = figure.subplots(2, len(spectrograms), squeeze=False)
    for k, (spectrogram, waveform, title, rate) in enumerate(zip(spectrograms, waveforms, titles, native_rates)):
        top, bottom = axes[0, k], axes[1, k]
        show_spectrogram(top, spectrogram[COMPONENTS.index("Z")], stft, native_rate=rate)
        top.set_title(title, fontsize=7)
        if isinstance(waveform, str):
            bottom.text(0.5, 0.5, waveform, ha="center", va="center", fontsize=6, wrap=True, transform=bottom.transAxes)
        else:
            z = waveform[COMPONENTS.index("Z")]
            bottom.plot(np.arange(len(z)) / stft.sampling_rate, z - z.mean(), linewidth=0.4, color="black")
            bottom.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
            bottom.tick_params(labelsize=6)
        bottom.set_xlabel("time (s)")
    axes[0, 0].set_ylabel("Z frequency (Hz)")
    axes[1, 0].set_ylabel("Z (counts, demeaned)")
    figure.suptitle(suptitle, fontsize=9)
    figure.tight_layout()
    return figure


def save_figure(figure, path):
    """The figure as a PNG at `path`, written atomically."""
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=80))
