from dataclasses import replace

import pytest
import torch

from optim import Float32Muon, OptimizerPair, lr_at, orthogonalize
from train import TrainConfig


def test_orthogonalize_flattens_the_singular_values_of_wide_and_tall_matrices():
    torch.manual_seed(0)
    for shape in [(16, 48), (48, 16), (32, 32)]:
        matrix = torch.randn(shape) @ torch.diag(torch.logspace(-2, 1, shape[1]))   # badly conditioned
        singular = torch.linalg.svdvals(orthogonalize(matrix, (3.4445, -4.775, 2.0315), 5, 1e-7))
        assert orthogonalize(matrix, (3.4445, -4.775, 2.0315), 5, 1e-7).shape == shape
        assert singular.max() < 1.3 and singular.median() > 0.6        # Muon's ~U V^T: all near 1


@pytest.mark.parametrize("nesterov, adjust", [(True, None), (False, "match_rms_adamw")])
def test_float32_muon_steps_like_torch_muon(nesterov, adjust):
    torch.manual_seed(0)
    weights = [torch.randn(24, 40), torch.randn(40, 24)]
    ours = [w.clone().requires_grad_() for w in weights]
    theirs = [w.clone().requires_grad_() for w in weights]
    settings = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust)
    opt_ours, opt_theirs = Float32Muon(ours, **settings), torch.optim.Muon(theirs, **settings)
    for step in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b, w in zip(ours, theirs, weights):
        assert not torch.equal(a, w)
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)        # torch's iteration runs in bfloat16
    assert opt_ours.state_dict()["state"].keys() == opt_theirs.state_dict()["state"].keys()
    torch.testing.assert_close(opt_ours.state[ours[0]]["momentum_buffer"], opt_theirs.state[theirs[0]]["momentum_buffer"])


def test_a_pair_steps_both_and_restores_both_states():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4, 4))
    pair = OptimizerPair(torch.optim.AdamW([a], lr=0.1), Float32Muon([b], lr=0.1))
    assert len(pair.param_groups) == 2
    a.grad, b.grad = torch.ones(3), torch.eye(4)
    pair.step()
    assert (a < 1).all() and (b.diagonal() < 1).all()
    state = pair.state_dict()
    fresh = OptimizerPair(torch.optim.AdamW([a], lr=0.1), Float32Muon([b], lr=0.1))
    fresh.load_state_dict(state)
    for group in fresh.param_groups:             # a schedule setting lr after a resume reaches both optimizers
        group["lr"] = 0.5
    assert fresh.first.param_groups[0]["lr"] == fresh.second.param_groups[0]["lr"] == 0.5
    assert torch.equal(fresh.second.state[b]["momentum_buffer"], pair.second.state[b]["momentum_buffer"])
    pair.zero_grad()
    assert a.grad is None and b.grad is None
    with pytest.raises(ValueError, match="one optimizer's"):
        fresh.load_state_dict(torch.optim.AdamW([a]).state_dict())


def test_lr_warms_up_then_decays_by_cosine_to_min_lr():
    cfg = TrainConfig(learning_rate=1e-3, warmup_iters=10, max_iters=110, min_lr=1e-4)
    lrs = [lr_at(cfg, it) for it in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.55e-3) and lrs[110] == lrs[119] == pytest.approx(1e-4)
    to_zero = [lr_at(replace(cfg, min_lr=0.0), it) for it in (60, 109, 110)]      # the default: down to 0
    assert to_zero[0] == pytest.approx(0.5e-3) and 0 < to_zero[1] < 1e-6 and to_zero[2] == 0


def test_wsd_holds_the_peak_then_decays_linearly_over_the_cooldown():
    cfg = TrainConfig(learning_rate=1e-3, warmup_iters=10, max_iters=110, lr_schedule="wsd", cooldown_frac=0.2,
                      min_lr=1e-4)
    lrs = [lr_at(cfg, it) for it in range(120)]
    assert lrs[0] < lrs[9] < lrs[10] == lrs[88] == 1e-3
    assert lrs[99] == pytest.approx(0.55e-3) and lrs[110] == lrs[119] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs[88:110], lrs[89:111]))
