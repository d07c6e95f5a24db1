"""
The optimizers train.py builds (build_optimizer): AdamW, or Muon (momentum, then the update orthogonalized by
a Newton-Schulz iteration) for the blocks' weight matrices with AdamW for the rest, a pair stepped and
checkpointed as one; and the learning rate at each iteration (lr_at).
"""
import math

import torch


def orthogonalize(matrix, coefficients, steps, eps):
    """The quintic Newton-Schulz iteration of torch.optim.Muon (roughly U V^T of matrix's SVD U S V^T), in
    float32: torch's runs in bfloat16, which CPUs without AVX-512 BF16/AMX emulate ~100x slower than float32."""
    a, b, c = coefficients
    x = matrix.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T                                               # iterate on the smaller Gram matrix
    x = x / x.norm().clamp(min=eps)                           # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(matrix.dtype)


class Float32Muon(torch.optim.Muon):
    """torch.optim.Muon (same settings, state and update rule) with the Newton-Schulz iteration in float32.
    At train.py's quick default on a 2-core CPU, torch's bfloat16 iteration made a training step ~2x slower
    than with AdamW."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(param.grad, 1 - group["momentum"])
                update = param.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-adjusted_lr(group["lr"], group["adjust_lr_fn"], param.shape))


def adjusted_lr(lr, adjust_lr_fn, shape):
    """Muon's per-matrix learning rate, as torch.optim.Muon scales it: "original" (None) sqrt(max(1, A/B)),
    "match_rms_adamw" 0.2 sqrt(max(A, B))."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * max(rows, cols) ** 0.5
    return lr * max(1.0, rows / cols) ** 0.5


class OptimizerPair:
    """Two optimizers over disjoint parameters, stepped, zeroed and checkpointed as one (param_groups: both
    lists, so a learning-rate schedule reaches every group)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    @property
    def param_groups(self):
        """Both optimizers' groups, read anew each time: load_state_dict replaces an optimizer's group dicts."""
        return self.first.param_groups + self.second.param_groups

    def step(self):
        self.first.step()
        self.second.step()

    def zero_grad(self, set_to_none=True):
        self.first.zero_grad(set_to_none=set_to_none)
        self.second.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"first": self.first.state_dict(), "second": self.second.state_dict()}

    def load_state_dict(self, state):
        if set(state) != {"first", "second"}:
            raise ValueError("the state is one optimizer's, not a pair's")
        self.first.load_state_dict(state["first"])
        self.second.load_state_dict(state["second"])


def adamw(params, cfg, device):
    """AdamW; weight decay on matrices only (not norms); the fused kernel on CUDA."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused or None)


def muon_and_adamw(model, params, cfg, device):
    """Muon for the blocks' 2-D matrices, AdamW for the rest (embeddings, norms). Muon's groups carry
    lr_scale = muon_lr / learning_rate, so that one schedule drives both."""
    block_matrices = {id(p) for p in model.layers.parameters() if p.dim() == 2}
    matrices = [p for p in params if id(p) in block_matrices]
    rest = [p for p in params if id(p) not in block_matrices]
    muon = Float32Muon(matrices, lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
    for group in muon.param_groups:
        group["lr_scale"] = cfg.muon_lr / cfg.learning_rate
    return OptimizerPair(adamw(rest, cfg, device), muon)


def build_optimizer(model, cfg, device):
    """The optimizer of cfg.optimizer over the trained (requires_grad) parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "muon":
        return muon_and_adamw(model, params, cfg, device)
    return adamw(params, cfg, device)


def lr_at(cfg, it):
    """Linear warmup to learning_rate, then decay to min_lr at lr_decay_iters ("cosine" all the way, or
    "wsd": constant until the last cooldown_frac of it, then linear), then min_lr."""
    decay_iters = cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        cooldown_start = decay_iters - cfg.cooldown_frac * decay_iters
        progress = max(0.0, (it - cooldown_start) / (decay_iters - cooldown_start))
        return cfg.learning_rate - progress * (cfg.learning_rate - cfg.min_lr)
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)
