"""awq.util.cli: parsers generated from config dataclasses (types, flags, required, ranges, round trip)."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import pytest

from awq.util.cli import ConfigError, build_parser, check_config, given_options, opt, parse_config, to_argv


@dataclass
class Toy:
    name: str = opt(help="a required string")
    out: Path = opt(Path("o.json"), help="a path")
    n: int = opt(3, help="an int >= 1", min=1)
    frac: float = opt(0.5, help="a fraction in [0, 1)", min=0.0, lt=1.0)
    k: Optional[int] = opt(None, help="an optional int > 0", gt=0)
    ks: list[int] = opt(default_factory=lambda: [1, 2], help="comma-separated ints", min=1)
    mode: str = opt("a", help="a choice", choices=("a", "b"))
    dense: bool = opt(False, help="a switch")
    progress: bool = opt(True, help="turn progress off")
    hidden: int = opt(7, help="not an option", cli=False)


def test_types_defaults_and_flags():
    cfg, _ = parse_config(Toy, ["--name", "x"])
    assert cfg == Toy(name="x")
    cfg, _ = parse_config(Toy, ["--name", "y", "--out", "d/r.json", "--n", "5", "--frac", "0.25", "--k", "4",
                                "--ks", "8,16", "--mode", "b", "--dense", "--no_progress"])
    assert cfg == Toy(name="y", out=Path("d/r.json"), n=5, frac=0.25, k=4, ks=[8, 16], mode="b", dense=True,
                      progress=False)
    assert isinstance(cfg.out, Path) and isinstance(cfg.frac, float)


def test_help_lists_every_option_once():
    text = build_parser(Toy, prog="toy").format_help()
    for f in fields(Toy):
        flag = {"progress": "--no_progress"}.get(f.name, f"--{f.name}")
        assert (text.count(flag + " ") + text.count(flag + "\n") >= 1) == (f.name != "hidden"), f.name
    assert "a fraction in [0, 1)" in text and "{a,b}" in text


@pytest.mark.parametrize("argv,msg", [
    (["--n", "0"], "--n: must be >= 1, got 0"),
    (["--frac", "1"], "--frac: must be < 1.0, got 1.0"),
    (["--k", "0"], "--k: must be > 0, got 0"),
    (["--ks", "4,0"], "--ks: must be >= 1, got 0"),
])
def test_ranges_are_one_line_config_errors(argv, msg):
    with pytest.raises(ConfigError) as e:
        parse_config(Toy, ["--name", "x", *argv])
    assert str(e.value) == msg
    with pytest.raises(ConfigError, match="--mode: 'c' is not one of a, b"):
        check_config(Toy(name="x", mode="c"))  # library use is checked too


def test_required_and_bad_type_are_one_line_config_errors(capsys):
    for argv, msg in (([], "--name: required"), (["--name", "x", "--n", "three"], "--n: invalid int value: 'three'"),
                      (["--name", "x", "--ks", "1,a"], "--ks: expected comma-separated int values, got '1,a'"),
                      (["--name", "x", "--dense=yes"], "--dense: takes no value, got 'yes'"),
                      (["--name", "x", "--bogus", "1"], "--bogus: unknown option (unrecognized: --bogus 1)"),
                      (["--name", "x", "--n"], "--n: needs a value")):
        with pytest.raises(ConfigError) as e:
            parse_config(Toy, argv)
        assert str(e.value) == msg
    assert capsys.readouterr().err == ""  # nothing printed: the command prints the one line


def test_to_argv_round_trip():
    cfg = Toy(name="z", out=Path("a b/c.json"), n=9, frac=0.0, k=2, ks=[3], mode="b", dense=True, progress=False)
    assert parse_config(Toy, to_argv(cfg))[0] == cfg
    assert to_argv(Toy(name="z")) == ["--name", "z"]  # defaults are left out


def test_given_options_with_suppressed_defaults():
    p = build_parser(Toy, suppress_defaults=True)
    assert given_options(Toy, p.parse_args(["--name", "x", "--dense"])) == {"name": "x", "dense": True}


def test_real_clis_share_the_generator():
    from awq.experiments.entry import EntryConfig
    from awq.experiments.entry import build_parser as entry_parser
    from awq.experiments.reproduce import ReproduceConfig
    from awq.methods.calibration import CalibrateConfig

    help_text = entry_parser().format_help()
    for f in fields(EntryConfig):
        assert f"--{f.name}" in help_text and f.metadata["help"]
    assert all(f.metadata.get("help") for f in fields(CalibrateConfig) + fields(ReproduceConfig))
    r = subprocess.run([sys.executable, "-m", "awq.entry", "--nsamples", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: --nsamples: must be >= 1, got 0"
    r = subprocess.run([sys.executable, "-m", "awq.experiments.reproduce", "--quick", "--ks", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: --ks: must be >= 1, got 0"
