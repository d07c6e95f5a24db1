"""configurator.py's --help, through every script whose settings it reads."""
import runpy
import sys
from pathlib import Path

import pytest

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
    assert "Settings (--key=value) and their defaults:" in out
    assert "  --max_iters=" in out and "  --seed=1337" in out
