"""settings.py: every script's settings declared once, with short help, one shown default and clear rule errors."""

import pytest

import ablation
import bench
import embed
import event_noise_windows
import inference
import similar
import train
from reading.transform import STFTConfig
from running.settings import HELP_WIDTH, RunError, Setting, at_least, build_parser, parse, run_keys

SCRIPTS = (train, inference, embed, similar, bench, ablation, event_noise_windows)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.__name__)
def test_each_setting_is_declared_once_with_a_short_help_line(script):
    names = [setting.name for setting in script.SETTINGS]
    assert len(names) == len(set(names))
    assert all(setting.help and len(setting.help) <= HELP_WIDTH for setting in script.SETTINGS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.__name__)
def test_help_shows_each_default_once(script):
    parser = build_parser(script.__doc__, script.SETTINGS)
    formatter = parser._get_formatter()
    templates = [(formatter._get_help_string(a), a.default) for a in parser._actions if a.dest != "help"]
    helps = [text.replace("%(default)s", str(default)) for text, default in templates]
    assert all(text.count("(default") <= 1 and "(default: None)" not in text for text in helps)
    assert sum("(default: " in text for text in helps) >= len(helps) // 2  # most show their default


def test_the_settings_that_define_a_run_are_those_a_resume_keeps():
    assert set(train.RUN_KEYS) == {
        *("channels", "extensions", "val_split", "seed", "nperseg", "noverlap", "nfft", "batch_size", "lr", "log_dir"),
        *("lr_schedule", "crop_bins", "offset_bins", "weight_decay", "spectral_tilt", "noise_floor", "size_fit"),
        *("horizontal_swap", "arch", "window_seconds", "window_stride", "split_by", "nyquist_band", "positive_weight"),
        "normalisation",
    }


def test_stft_defaults_come_from_stft_config(capsys):
    _, args = train.parse_args([])
    stft = STFTConfig()
    assert (args.nperseg, args.noverlap, args.nfft) == (stft.nperseg, stft.noverlap, stft.nfft)
    assert args.normalisation == stft.normalisation == "background-db"
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "(default: 256)" in " ".join(capsys.readouterr().out.split())


def test_broken_rules_are_named_together(capsys):
    table = (Setting("n", 1, "a count", int, check=at_least(1)), Setting("x", 0.5, "a share", float, run=True))
    with pytest.raises(SystemExit) as exit_info:
        parse("demo", table, ["--n", "0"], lambda args: ["--x is odd"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--n must be >= 1; --x is odd" in err
    assert run_keys(table) == ("x",) and issubclass(RunError, Exception)
