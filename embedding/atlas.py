"""atlas.html: one static page of what an embedded archive holds, written by embed.py beside its other outputs.

The map; per cluster its size, its mix of networks, stations, families, sampling rates (and labels, with --labels),
the spectrograms and vertical-component waveforms of its members nearest the centre and of a few at its edge, and
its occurrence over time; the anomalies with their figures and the errors that rank them; a copyable similar.py
command for every recording shown. It draws a fixed number of recordings per cluster (NEAREST_SHOWN + EDGE_SHOWN),
so its size and cost do not grow with the archive. Every text taken from the data is HTML-escaped, every file name
URL-quoted, and the page loads nothing from the network.
"""

import html
import logging
import os
import shlex
import urllib.parse

import numpy as np

from embedding.figures import plot_clusters_over_time, plot_members, save_figure
from reading.transform import spectrogram
from running.storage import atomic_write

NEAREST_SHOWN = 6  # members nearest each cluster's centre: listed in clusters.json, drawn as its typical members
EDGE_SHOWN = 3  # members farthest from each cluster's centre: drawn as its edge
SET_ASIDE_SHOWN = 6  # recordings set aside by the clustering (outliers) drawn; clusters.json lists up to 100
MIX_SHOWN = 8  # values of each mix (networks, stations, ...) listed; the rest are counted
ATLAS_DIR = "atlas"  # the page's own figures, beside atlas.html
UNREAD = (3, 1, 2)  # the spectrogram drawn for a member whose files cannot be read now: blank
log = logging.getLogger("embed")
STYLE = (
    "body{font-family:sans-serif;max-width:1350px;margin:1em auto;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:.4em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
    "th{background:#eee}img{max-width:100%;border:1px solid #ddd}code{background:#f4f4f4;font-size:12px}"
    ".mix{display:inline-block;vertical-align:top;margin-right:1.2em}figcaption{font-size:12px;color:#555}"
)


def text(value):
    """Data as HTML text: every value from files, headers, catalogues or labels goes through here."""
    return html.escape(str(value), quote=True)


def source(name):
    """A file name as a relative URL (quoted: '#', '?', '<' and spaces in a name stay part of it)."""
    return text(urllib.parse.quote(name))


def similar_command(output_dir, row):
    """The shell command that lists a catalogue row's nearest neighbours."""
    return f"python similar.py {shlex.quote(output_dir)} {int(row)} -k 10"


def member_figures(members, dataset, positions, title, path):
    """A figure of the members (catalogue rows as dicts with "row" and "sampling_rate"): Z spectrogram and waveform
    of each, read from its files once (the spectrogram from the dataset, e.g. its cache, where the file is not)."""
    spectrograms, waveforms = [], []
    for member in members:
        position = positions[member["row"]]
        try:
            waveform = dataset.waveform(position)
            spectrograms.append(spectrogram(waveform, dataset.stft, member["sampling_rate"]))
        except Exception as err:  # unreadable now (moved, changed, or only in the cache): what can be is drawn
            log.warning("atlas: %s: waveform not readable (%s: %s)", member["path"], type(err).__name__, err)
            waveform = f"waveform not readable:\n{type(err).__name__}: {str(err)[:80]}"
            cached = dataset[position][0]
            spectrograms.append(cached.float().numpy() if cached is not None else np.zeros(UNREAD, dtype=np.float32))
        waveforms.append(waveform)
    titles = [f"{m['trace_id']}\n{str(m['starttime'])[:19]}" for m in members]
    rates = [m["sampling_rate"] for m in members]
    save_figure(plot_members(spectrograms, waveforms, titles, dataset.stft, title, rates), path)


def draw_set_aside(reader, dataset, positions, rows, output_dir):
    """atlas/set_aside.png of the first SET_ASIDE_SHOWN rows the clustering set aside (outliers, assigned to their
    nearest cluster after); returns (the rows as dicts, the figure's (file, caption) or None)."""
    columns = ["path", "trace_id", "starttime", "cluster", "cluster_distance", "sampling_rate", "anomaly_rank"]
    found = reader.rows(rows, columns)
    listed = [{"row": r, **found[r]} for r in rows]
    if not listed:
        return listed, None
    name = f"{ATLAS_DIR}/set_aside.png"
    caption = f"{min(len(listed), SET_ASIDE_SHOWN)} of the recordings the clustering set aside as outliers"
    member_figures(listed[:SET_ASIDE_SHOWN], dataset, positions, caption, os.path.join(output_dir, name))
    return listed, (name, caption)


def draw_clusters(reader, dataset, positions, clusters, over_time, output_dir):
    """cluster_<c>.png (typical members) beside the outputs, atlas/cluster_<c>_edge.png and atlas/cluster_<c>_time.png;
    returns {c: {"typical": rows, "edge": rows, "figures": [(file, caption)]}} for the page."""
    os.makedirs(os.path.join(output_dir, ATLAS_DIR), exist_ok=True)
    columns = ["path", "trace_id", "starttime", "cluster_distance", "sampling_rate", "duration_s"]
    drawn = {}
    for summary in clusters:
        c = summary["cluster"]
        typical = summary["nearest_rows"]
        edge = [row for row in summary["edge_rows"] if row not in typical]
        found = reader.rows(typical + edge, columns)
        rows = {"typical": [{"row": r, **found[r]} for r in typical], "edge": [{"row": r, **found[r]} for r in edge]}
        figures = [(f"cluster_{c}.png", f"the {len(typical)} members nearest the centre of cluster {c}")]
        path = os.path.join(output_dir, figures[0][0])
        member_figures(rows["typical"], dataset, positions, f"cluster {c}: {figures[0][1]}", path)
        if edge:
            name = f"{ATLAS_DIR}/cluster_{c}_edge.png"
            figures.append((name, f"the {len(edge)} members farthest from the centre of cluster {c}"))
            path = os.path.join(output_dir, name)
            member_figures(rows["edge"], dataset, positions, f"cluster {c}: {figures[-1][1]}", path)
        if over_time is not None:
            edges, counts = over_time
            name = f"{ATLAS_DIR}/cluster_{c}_time.png"
            save_figure(
                plot_clusters_over_time(edges, counts[c : c + 1], [c], (9, 2.6)), os.path.join(output_dir, name)
            )
            figures.append((name, f"members of cluster {c} in each bin of start time (UTC)"))
        drawn[c] = {**rows, "figures": figures}
    return drawn


def mix(counts, title, total):
    """A table of the commonest MIX_SHOWN values of one mix ({value: members}) and their shares of `total`."""
    ordered = list(counts.items())
    rows = "".join(
        f"<tr><td>{text(value)}</td><td>{n}</td><td>{100 * n / total:.0f} %</td></tr>"
        for value, n in ordered[:MIX_SHOWN]
    )
    if len(ordered) > MIX_SHOWN:
        rest = ordered[MIX_SHOWN:]
        rows += f"<tr><td colspan=3>{len(rest)} more ({sum(n for _, n in rest)} recordings)</td></tr>"
    return f'<div class="mix"><table><tr><th>{text(title)}</th><th>n</th><th>share</th></tr>{rows}</table></div>'


def members_table(drawn, output_dir):
    """The recordings drawn for a cluster: where each comes from and the command that finds its neighbours."""
    head = "<tr><th>drawn as</th><th>row</th><th>file</th><th>trace</th><th>start (UTC)</th><th>Hz</th>"
    head += "<th>distance to the centre</th><th>its nearest neighbours</th></tr>"
    body = ""
    for kind in ("typical", "edge"):
        for m in drawn[kind]:
            body += (
                f"<tr><td>{kind}</td><td>{m['row']}</td><td>{text(m['path'])}</td><td>{text(m['trace_id'])}</td>"
                f"<td>{text(str(m['starttime'])[:19])}</td><td>{m['sampling_rate']:g}</td>"
                f"<td>{m['cluster_distance']:.2f}</td>{command_cell(output_dir, m['row'])}</tr>"
            )
    return f"<table>{head}{body}</table>"


def command_cell(output_dir, row):
    return f"<td><code>{text(similar_command(output_dir, row))}</code></td>"


def figure(name, caption):
    return f'<figure><img src="{source(name)}" alt="{text(caption)}"><figcaption>{text(caption)}</figcaption></figure>'


def cluster_section(summary, drawn, rows, output_dir):
    c, size = summary["cluster"], summary["size"]
    mixes = [("networks", "network"), ("stations", "station"), ("families", "channel family")]
    mixes += [("sampling_rates", "sampling rate (Hz)"), ("labels", "label")]
    tables = "".join(mix(summary[key], title, size) for key, title in mixes if summary.get(key))
    span = f"first start {text(summary['first'])[:19]}, last {text(summary['last'])[:19]} (UTC)"
    figures = "".join(figure(name, caption) for name, caption in drawn["figures"])
    return (
        f'<h2 id="cluster-{c}">Cluster {c}: {size} recordings ({100 * size / rows:.1f} %)</h2><p>{span}</p>'
        f"{tables}{figures}{members_table(drawn, output_dir)}"
    )


def overview(clusters, rows):
    head = "<tr><th>cluster</th><th>recordings</th><th>share</th><th>networks</th><th>families</th><th>Hz</th>"
    head += "<th>labels</th></tr>" if any("labels" in s for s in clusters) else "</tr>"
    body = ""
    for s in clusters:
        first = [", ".join(text(v) for v in list(s[key])[:3]) for key in ("networks", "families", "sampling_rates")]
        labels = f"<td>{', '.join(text(v) for v in list(s['labels'])[:3])}</td>" if "labels" in s else ""
        cells = "".join(f"<td>{v}</td>" for v in first)
        body += f'<tr><td><a href="#cluster-{s["cluster"]}">{s["cluster"]}</a></td><td>{s["size"]}</td>'
        body += f"<td>{100 * s['size'] / rows:.1f} %</td>{cells}{labels}</tr>"
    return f"<table>{head}{body}</table>"


def anomalies_section(anomalies, output_dir):
    """The most anomalous recordings: why each ranks (its error against the baselines') and its figure."""
    if not anomalies:
        return ""
    head = "<tr><th>rank</th><th>file</th><th>start (UTC)</th><th>cluster</th><th>model MSE</th>"
    head += "<th>time-mean MSE</th><th>blur MSE</th><th>model / time-mean</th><th>its nearest neighbours</th></tr>"
    body, figures = "", ""
    for a in anomalies:
        body += (
            f"<tr><td>{a['rank']}</td><td>{text(a['path'])}</td><td>{text(str(a['starttime'])[:19])}</td>"
            f"<td>{a['cluster']}</td><td>{a['mse']:.4f}</td><td>{a['mse_time_mean']:.4f}</td>"
            f"<td>{a['mse_blur']:.4f}</td><td>{a['mse'] / a['mse_time_mean']:.2f}</td>"
            f"{command_cell(output_dir, a['row'])}</tr>"
        )
        caption = f"anomaly {a['rank']}: {a['path']}; E, N, Z rows: input, reconstruction, difference"
        figures += figure(a["figure"], caption)
    return (
        '<h2 id="anomalies">Anomalies</h2><p>Ranked by the model\'s reconstruction error over that of the time-mean '
        "baseline (each recording's own average spectrum repeated over time): a high ratio is a recording the model "
        "reconstructs worse than its own average spectrum. The blur baseline (the spectrogram pooled 8 x 8 and "
        "interpolated back) is beside it. Spectrogram values are normalised (0-1 per component).</p>"
        f"<table>{head}{body}</table>{figures}"
    )


def set_aside_section(set_aside, description, output_dir):
    """The outliers of the clustering: rows set aside while fitting, so that none became a cluster of its own."""
    listed, drawn = set_aside
    if not listed:
        return ""
    head = "<tr><th>row</th><th>file</th><th>start (UTC)</th><th>Hz</th><th>assigned to cluster</th>"
    head += "<th>distance to its centre</th><th>anomaly rank</th><th>its nearest neighbours</th></tr>"
    body = "".join(
        f"<tr><td>{m['row']}</td><td>{text(m['path'])}</td><td>{text(str(m['starttime'])[:19])}</td>"
        f"<td>{m['sampling_rate']:g}</td><td>{m['cluster']}</td><td>{m['cluster_distance']:.2f}</td>"
        f"<td>{m['anomaly_rank']}</td>{command_cell(output_dir, m['row'])}</tr>"
        for m in listed
    )
    return (
        f'<h2 id="set-aside">Outliers of the clustering: {description["set_aside"]} set aside</h2><p>Recordings in '
        f"clusters smaller than the size floor ({description['size_floor']}) while K-means was fitted: left out of "
        "the fit so that none became a cluster of its own, then assigned to the nearest cluster. "
        f"{len(listed)} listed.</p>{figure(*drawn)}<table>{head}{body}</table>"
    )


def head(facts, description):
    """The page's title and what the run was: data, checkpoint, rows, the clustering and how K was chosen."""
    k, floor = description["k"], description.get("size_floor")
    items = [
        f"{facts['rows']} recordings of <code>{text(facts['data_dir'])}</code>, {text(facts['windows'])}",
        f"checkpoint <code>{text(facts['checkpoint'])}</code>; {facts['dim']} values each ({text(facts['pooling'])})",
        f"{text(description['method'])}: K = {k}, {text(description['k_chosen_by'])}",
        f"size floor {floor} recordings; {description.get('set_aside', 0)} set aside while fitting (assigned after)",
    ]
    if "labels" in description:
        scored = description["labels"]
        items.append(
            f"labels {text(scored['name'])} of {scored['recordings']} recordings: adjusted mutual information with "
            f"the clusters {scored['ami']:.3f}, normalised {scored['nmi']:.3f}"
        )
    listed = "".join(f"<li>{item}</li>" for item in items)
    name = os.path.basename(facts["data_dir"].rstrip("/")) or facts["data_dir"]
    return f"<h1>Atlas of {text(name)}</h1><ul>{listed}</ul>"


def write_atlas(output_dir, facts, description, drawn, anomalies, set_aside):
    """atlas.html in output_dir (its figures beside it, written before); returns its path."""
    rows, clusters = facts["rows"], description["clusters"]
    legend = (
        "<p>How to read the figures: spectrograms are log amplitude normalised to 0-1 per component (colour), time in "
        "s, frequency in Hz, low frequencies at the bottom; grey bands are no data, above a recording's own Nyquist "
        "frequency (half its sampling rate before resampling). Waveforms are the vertical (Z) component in counts "
        "less their mean, resampled to the model's rate; time in s from the start of the recording or window. The "
        "map shows the first two principal components of the clustering space (standardised units).</p>"
    )
    links = [("map", "map"), ("clusters", "clusters")] + [(f"cluster-{s['cluster']}", s["cluster"]) for s in clusters]
    links += [("anomalies", "anomalies")] * bool(anomalies) + [("set-aside", "outliers")] * bool(set_aside[0])
    nav = "<p>" + " | ".join(f'<a href="#{target}">{name}</a>' for target, name in links) + "</p>"
    body = head(facts, description) + nav + legend + '<h2 id="map">Map</h2>'
    body += figure("map.png", "the 2-D map, coloured by cluster (left) and by channel family (right)")
    body += '<h2 id="clusters">Clusters</h2>' + overview(clusters, rows)
    body += "".join(cluster_section(s, drawn[s["cluster"]], rows, output_dir) for s in clusters)
    body += anomalies_section(anomalies, output_dir) + set_aside_section(set_aside, description, output_dir)
    page = f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>atlas</title><style>{STYLE}</style>'
    page += f"</head><body>{body}</body></html>\n"
    path = os.path.join(output_dir, "atlas.html")
    atomic_write(path, lambda f: f.write(page.encode()))
    return path
