"""atlas.html (embedding/atlas.py) on real recordings at 40, 50 and 100 Hz, one of them under a name that is HTML."""

import csv
import json
import os
import shlex
import shutil
import urllib.parse
from html.parser import HTMLParser

import pandas as pd
import pytest
from conftest import ROOT

import embed
import similar
from embedding.atlas import member_figures
from reading.transform import STFTConfig
from reading.waveforms import UnusableFile

EXOTIC = os.path.join(ROOT, "tests", "data", "exotic")
HOSTILE = 'NC.EVIL.HH.<script>alert("x")&.mseed'  # a file name a page must not run


class Page(HTMLParser):
    """The image sources, element ids and text of a page."""

    def __init__(self):
        super().__init__()
        self.sources, self.ids, self.text = [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        if "id" in attrs:
            self.ids.add(attrs["id"])

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def atlas(trained, tmp_path_factory):
    """embed.py --labels on the 12 training files, one renamed HOSTILE, and 6 per-channel recordings of landslides and
    avalanches (18 recordings): (output directory, the page's text as written, the parsed page)."""
    checkpoint, train_dir = trained
    base = tmp_path_factory.mktemp("atlas")
    data_dir = base / "waveforms"
    shutil.copytree(train_dir, data_dir)
    first = min(name for name in os.listdir(train_dir) if name.endswith(".mseed"))
    os.rename(data_dir / first, data_dir / HOSTILE)
    shutil.copytree(os.path.join(EXOTIC, "waveforms"), data_dir / "exotic")
    with open(os.path.join(EXOTIC, "labels.csv"), newline="") as f:
        labels = [
            {"path": "exotic/" + row["path"][len("waveforms/") :], "label": row["label"]} for row in csv.DictReader(f)
        ]
    labels.append({"path": HOSTILE, "label": "<b>quake</b>"})
    with open(base / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows(labels)
    out = base / "out"
    argv = [checkpoint, "--data_dir", str(data_dir), "--output_dir", str(out), "--device", "cpu"]
    embed.main(argv + ["--num_anomalies", "18", "--projector_points", "0", "--labels", str(base / "labels.csv")])
    with open(out / "atlas.html", encoding="utf-8") as f:
        text = f.read()
    page = Page()
    page.feed(text)
    return out, text, page


def test_every_image_the_atlas_names_exists(atlas):
    out, _, page = atlas
    assert len(page.sources) >= 18 + 1  # the anomalies and the map at least
    for src in page.sources:
        assert not urllib.parse.urlparse(src).scheme  # relative: beside the page
        assert os.path.getsize(out / urllib.parse.unquote(src)) > 2_000, src


def test_the_atlas_holds_every_cluster_with_its_mixes(atlas):
    out, text, page = atlas
    with open(out / "clusters.json") as f:
        clusters = json.load(f)
    assert {f"cluster-{c['cluster']}" for c in clusters["clusters"]} <= page.ids and "anomalies" in page.ids
    words = "".join(page.text)
    for c in clusters["clusters"]:
        assert f"Cluster {c['cluster']}: {c['size']} recordings" in words
        assert sum(c["sampling_rates"].values()) == c["size"]
    rates = set().union(*(c["sampling_rates"] for c in clusters["clusters"]))
    assert {"40", "50", "100"} <= rates  # each recording's own rate, before resampling to 100 Hz
    catalog = pd.read_parquet(out / "catalog.parquet")
    assert sorted(catalog.sampling_rate.unique()) == [40.0, 50.0, 100.0]
    # --labels: each cluster's label mix, and the clusters' mutual information with the labels
    assert clusters["labels"]["recordings"] == 7 and 0 <= clusters["labels"]["nmi"] <= 1
    assert sum(sum(c.get("labels", {}).values()) for c in clusters["clusters"]) == 7
    assert "sampling rate (Hz)" in words and "label" in words


def test_the_atlas_escapes_what_it_takes_from_the_data_and_loads_nothing(atlas):
    _, text, page = atlas
    assert "<script" not in text and "<b>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&amp;.mseed" in text  # the file, named in the anomalies
    assert "&lt;b&gt;quake&lt;/b&gt;" in text  # its label, in its cluster's mix
    assert "http://" not in text and "https://" not in text and "//" not in "".join(page.sources)


def test_its_similar_commands_run(atlas, capsys):
    out, _, page = atlas
    commands = [line for line in page.text if line.startswith("python similar.py ")]
    assert len(commands) >= 18
    words = shlex.split(commands[0])
    assert words[2] == str(out)
    similar.main(words[2:] + ["--no-figures", "--table", str(out / "near.csv")])
    assert "near.csv" in capsys.readouterr().out


def test_a_member_unreadable_now_is_drawn_as_such_not_a_crash(tmp_path, caplog):
    class Gone:  # a dataset whose file was removed since it was embedded, and no cache
        stft = STFTConfig()

        def waveform(self, position):
            raise UnusableFile("unreadable file", "gone.mseed: No such file")

        def __getitem__(self, position):
            return None, {"path": "gone.mseed", "skip_reason": "unreadable file", "message": "No such file"}

    member = {
        "row": 0,
        "path": "gone.mseed",
        "trace_id": "XX.GONE..HH?",
        "starttime": "2020-01-01T00:00:00",
        "sampling_rate": 100.0,
    }
    member_figures([member], Gone(), [0], "test", str(tmp_path / "gone.png"))
    assert os.path.getsize(tmp_path / "gone.png") > 2_000 and "gone.mseed: waveform not readable" in caplog.text
