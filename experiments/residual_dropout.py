"""
Residual dropout on train.py's runs: does a regularizer close the quick default's train/val gap?
(docs/quickstart.md, "Given the whole 10 minutes"). Dropout is not part of MobileLLM's recipe, so model.py
has no such setting: for this script's runs only, the output of every attention and feed-forward branch
is dropped out (rate --dropout) before it joins the residual stream, as nanoGPT's dropout does there.

  OMP_NUM_THREADS=1 python experiments/residual_dropout.py --dropout=0.1 --max_iters=3000 --dtype=fp32

Takes train.py's settings (config files, --key=value) besides --dropout; writes out_dir as train.py does
and prints the val loss at each eval.
"""
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the scripts live at the repo root
import model  # noqa: E402
from configurator import ConfigError, configure, exit_if_help  # noqa: E402
from train import TrainConfig, train  # noqa: E402


@dataclass
class DropoutConfig(TrainConfig):
    dropout: float = 0.1                 # the rate on each residual branch (0: train.py's run unchanged)
    dtype: str = "fp32"
    quiet: bool = True
    out_dir: str = "out-residual-dropout"


@contextmanager
def residual_dropout(p):
    """Attention and FeedForward outputs dropped out at rate p while training (in eval mode: unchanged)."""
    originals = {cls: cls.forward for cls in (model.Attention, model.FeedForward)}

    def dropped(forward):
        return lambda self, *args, **kw: F.dropout(forward(self, *args, **kw), p, self.training)
    try:
        for cls, forward in originals.items():
            cls.forward = dropped(forward)
        yield
    finally:
        for cls, forward in originals.items():
            cls.forward = forward


def main(cfg):
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}")
    run = TrainConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainConfig)})
    with residual_dropout(cfg.dropout):
        records = train(run)
    print(f"residual dropout {cfg.dropout}: val loss " +
          " / ".join(f"{r['val_loss']:.3f}" for r in records if r["iter"]) +
          " at iterations " + " / ".join(str(r["iter"]) for r in records if r["iter"]))
    return records


if __name__ == "__main__":
    exit_if_help(sys.argv[1:], __doc__, DropoutConfig(), more_comments=(model.ModelConfig,))
    try:
        main(configure(DropoutConfig(), sys.argv[1:]))
    except ConfigError as e:
        sys.exit(f"error: {e}")
