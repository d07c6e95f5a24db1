"""configurator.py's --help, through every script whose settings it reads, each setting with its comment."""
import argparse
import dataclasses
import re
import runpy
import sys
from pathlib import Path

import pytest

import configurator

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["train.py", "bench_train.py", "experiments/equal_time.py", "experiments/finetune_options.py",
           "experiments/fused_projections.py"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_every_setting_then_exits(script, flag, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--max_iters=7", flag])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert stop.value.code is None                                  # exit status 0, nothing run
    out = capsys.readouterr().out
    assert out.startswith(runpy.run_path(str(REPO / script))["__doc__"].strip()[:40])
    assert "Settings (--key=value), as the config files and overrides given set them, and what they are:" in out
    assert "  --max_iters=7 " in out and "  --seed=1337" in out                   # the override, and a default
    assert re.search(r"--share='immediate' +MobileLLM-LS: each block applied twice in a row\n", out)
    assert re.search(r"--n_kv_heads=2 +§2.2.4 grouped-query attention", out)     # ModelConfig's comment


def test_each_setting_is_described_by_the_comment_beside_it():
    @dataclasses.dataclass
    class Base:
        # a section heading, not a description
        a: int = 1                  # the first
                                    # over two lines
        b: str = "#"                # a '#' in a default is not a comment
        c: float = 0.5
        # another heading
        d: bool = False             # d's own

    @dataclasses.dataclass
    class Sub(Base):
        d: bool = True              # the subclass's word on d

    assert configurator.field_comments(Base) == {"a": "the first over two lines",
                                                 "b": "a '#' in a default is not a comment", "d": "d's own"}
    assert configurator.field_comments(Sub) == {"d": "the subclass's word on d"}


def test_at_least_makes_a_bad_count_a_usage_error_naming_the_option(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=configurator.at_least(1), default=5)
    assert parser.parse_args(["--runs", "3"]).runs == 3 and parser.parse_args([]).runs == 5
    for bad, says in (("0", "must be an integer >= 1, got 0"), ("abc", "invalid integer value: 'abc'")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--runs", bad])
        assert f"argument --runs: {says}" in capsys.readouterr().err


def test_argparse_help_names_each_options_default_unless_it_means_off(capsys):
    parser = argparse.ArgumentParser(formatter_class=configurator.HelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--start", default="\n", help="prompt")
    parser.add_argument("--out", default=None, help="where to")
    parser.add_argument("--compile", action="store_true", help="compile it")
    help_text = " ".join(parser.format_help().split())
    assert "timed runs (default: 5)" in help_text
    assert help_text.count("(default:") == 1                        # not for 0, a blank string, None or a flag


@pytest.mark.parametrize("script", ["sample.py", "eval.py", "quantize.py", "export.py", "bench_mobile.py"])
def test_argparse_scripts_help_shows_their_example_command_lines(script):
    doc = runpy.run_path(str(REPO / script))["__doc__"]
    shown = configurator.usage_description(doc)
    examples = [line for line in doc.splitlines() if line.startswith(f"  python {script}")]
    assert examples and all(line in shown for line in examples)
    assert len(shown) <= len(doc)
    assert configurator.usage_description("A.\n\n  python x.py\n\nNotes.") == "A.\n\n  python x.py"


def test_an_unknown_key_names_the_closest_known_one():
    @dataclasses.dataclass
    class Settings:
        max_iters: int = 10
        learning_rate: float = 1e-3

    with pytest.raises(configurator.ConfigError, match=r"'max_iter' \(did you mean 'max_iters'\?\), 'zzz' in "
                                                       r"override; known keys: max_iters, learning_rate$"):
        configurator.apply_settings(Settings(), {"max_iter": 5, "zzz": 1}, "override")
