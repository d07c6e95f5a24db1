"""
The one model loader every script uses: whatever --init_from names becomes (model, tokenizer).
Also the one spelling of float dtypes on every command line: fp32, bf16, fp16 (torch's float32, bfloat16,
float16 work too; export.py's and bench_mobile.py's --dtype adds their program schemes, w8a8 and 8da4w),
and what "auto" means for a dtype (resolve_dtype) and a device (resolve_device).

  from loader import load_model_and_tokenizer
  model, tokenizer = load_model_and_tokenizer("out-shakespeare-char")   # our checkpoint (out_dir or ckpt.pt)
  model, tokenizer = load_model_and_tokenizer("out-w8a8")               # an int8 checkpoint (quantize.py, int8.py)
  model, tokenizer = load_model_and_tokenizer("facebook/MobileLLM-125M") # an HF dir or hub repo id (hf.py)
  model, tokenizer = load_model_and_tokenizer("SmolLM2-135M.Q4_1.gguf")  # a llama.cpp GGUF file (gguf_file.py)
  model, tokenizer = load_model_and_tokenizer("mobilellm-125m")         # a preset: random weights, no tokenizer
  model, tokenizer = load_model_and_tokenizer("mobilellm-125m:n_layers=60+share=none")   # ... with overrides
"""
import difflib
import re
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from checkpoint import CheckpointError, checkpoint_file, load_checkpoint, load_model
from configurator import ConfigError, apply_settings, parse_value
from int8 import load_quantized
from model import PRESETS, MobileLLM, config_from_preset
from tokenizer import load_tokenizer
from torch_private import cpu_has_native_bf16

HF_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+(?<!\.pt)")   # owner/name, and not a missing .pt path
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(name):
    """The short name (fp32, bf16, fp16) of a dtype name or its torch alias; any other name comes back
    unchanged, for the caller's list of choices to reject (argparse: type=dtype_name, choices=DTYPES)."""
    return DTYPE_ALIASES.get(name, name)


def torch_dtype(name):
    """torch.float32 for "fp32" or "float32", and so on."""
    if dtype_name(name) not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose from {', '.join(DTYPES)} "
                         f"(or {', '.join(DTYPE_ALIASES)})")
    return DTYPES[dtype_name(name)]


# dtype=auto on a CPU: bf16 only for models at least this wide. Below it, autocast's casts cost more than AMX's
# bf16 products save: `python bench_train.py --dim=D --dtype=fp32,bf16 --iters=20 --warmup=3` on a 2-core AMX
# Xeon, bf16 / fp32 tokens/s: 0.88x at dim 128 (the quick default), 0.92x at 192, 1.07x at 256, 1.25x at 384; in
# the training loop 0.83x at 128 and 1.14x at 256 (docs/training.md).
CPU_BF16_MIN_DIM = 256


def native_bf16(device):
    """Whether device computes bf16 in hardware: CUDA with bf16 support, or a CPU with AVX-512 BF16/AMX."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)   # not sm70/sm75's emulated bf16
    return cpu_has_native_bf16()


def resolve_device(name):
    """--device: "auto" is CUDA where there is one, else the CPU; cpu, cuda, cuda:N or mps as it is, if it
    exists here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={name!r}: use cpu, cuda, cuda:N, mps or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here (use --device=cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r} but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} but MPS (Apple's GPUs) is not available here (use --device=cpu)")
    return name


def resolve_dtype(name, device, dim):
    """The short dtype name to run a model `dim` wide in on device: `name` itself, or for "auto" bf16 where it
    is native and pays (CUDA with bf16; a CPU with native bf16 for models at least CPU_BF16_MIN_DIM wide),
    else fp32."""
    if name != "auto":
        return dtype_name(name)
    wide_enough = torch.device(device).type == "cuda" or dim >= CPU_BF16_MIN_DIM
    return "bf16" if wide_enough and native_bf16(device) else "fp32"


def autocast(device, dtype):
    """The forward in `dtype` (a name such as "bf16", or a torch dtype) through torch.autocast on the device's
    type; weights (and a trainer's optimizer state) stay fp32. fp32 runs as it is."""
    dtype = dtype if isinstance(dtype, torch.dtype) else torch_dtype(dtype)
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def load_model_and_tokenizer(init_from, device="cpu", meta_ls_cache=False, seed=0):
    """(model in eval mode, tokenizer) from: one of our checkpoints (file or out_dir), an int8 checkpoint
    (quantize.py), a local Hugging Face dir or a hub repo id (hf.py), a .gguf file (gguf_file.py), or a preset
    name, with overrides as `preset:field=value+field=value` (random weights drawn from seed, tokenizer None:
    for timing). meta_ls_cache: see ModelConfig.meta_ls_cache (Meta's -layer-share models).
    A tokenizer with more tokens than the model has embeddings is refused (fewer is fine: padded vocabularies)."""
    model, tokenizer = _load(init_from, device, seed)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embeddings: it is not this model's tokenizer")
    if meta_ls_cache:      # validated like any config: needs share="immediate"
        model.config = replace(model.config, meta_ls_cache=True)
    return model.eval(), tokenizer


def source_kind(init_from):
    """What --init_from names: "preset" (with or without overrides), "gguf", "hf" (a local dir or a hub repo id)
    or "checkpoint" (ours)."""
    path = Path(init_from)
    if not path.exists() and init_from.partition(":")[0] in PRESETS:
        return "preset"
    if path.suffix == ".gguf":
        return "gguf"
    hub_id = not path.exists() and not path.parent.is_dir() and HF_REPO_ID.fullmatch(str(init_from))
    if (path / "config.json").is_file() or hub_id:      # owner/name, unless owner is a folder here
        return "hf"
    return "checkpoint"


def without_tokenizer(init_from):
    """What a model that loaded without a tokenizer is: a preset, or a model whose files hold none."""
    if source_kind(init_from) == "preset":
        return f"{init_from} is a preset (random weights, no tokenizer)"
    return f"{init_from} holds no tokenizer (no text can be encoded for it)"


def did_you_mean(name):
    """The hint " (did you mean 'out-shakespeare-char'?)" for a name close to a preset's or to a file beside
    it; "" when nothing is close."""
    path = Path(name)
    beside = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    stem, colon, overrides = path.name.partition(":")
    if colon:                                               # a preset spec whose preset is misspelt
        close = [p + colon + overrides for p in difflib.get_close_matches(stem, PRESETS, n=1)]
    else:
        close = difflib.get_close_matches(path.name, [*PRESETS, *beside], n=1)
    if not close:
        return ""
    return f" (did you mean {str(path.with_name(close[0])) if close[0] in beside else close[0]!r}?)"


def parse_preset_spec(spec):
    """'mobilellm-125m:n_layers=60+share=none' -> (preset, overrides); values are Python literals where they
    parse (60, False), else strings. Fields are separated by '+' (or ',' outside a comma-separated list)."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, re.split(r"[+,]", rest)):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"bad override {item!r} in {spec!r}: use preset:field=value+field=value")
        overrides[key] = parse_value(value)
    return name, overrides


def preset_config(spec):
    """The ModelConfig of 'preset[:field=value+...]', each override checked by name and type (ConfigError,
    with the nearest field name); model.py refuses an unknown preset or a bad shape (ValueError)."""
    name, overrides = parse_preset_spec(spec)
    return apply_settings(config_from_preset(name), overrides, "the preset's overrides")


def preset_model(spec, seed=0):
    """A preset (with overrides) with random weights drawn from seed."""
    config = preset_config(spec)
    torch.manual_seed(seed)
    return MobileLLM(config).eval()


def require_source(init_from):
    """One clear error, before any slow work, when --init_from names a local file or folder that is not there,
    or a preset spec that does not parse. Returns what it names (source_kind)."""
    kind = source_kind(init_from)
    if kind == "preset":
        preset_config(init_from)
    if kind in ("checkpoint", "gguf") and not Path(init_from).exists():
        what = "GGUF file" if kind == "gguf" else "checkpoint"
        raise CheckpointError(f"no {what} at {init_from}{did_you_mean(init_from)}: --init_from takes our out_dir "
                              "or ckpt.pt, a .gguf file, a Hugging Face dir or hub id (owner/name), or a preset such "
                              "as mobilellm-125m")
    return kind


def _load(init_from, device, seed):
    kind, path = require_source(init_from), Path(init_from)
    if kind == "preset":
        return preset_model(init_from, seed).to(device), None
    if kind == "gguf":
        import gguf_file
        return gguf_file.load_gguf(path, device)
    if kind == "hf":
        import hf
        return hf.load_hf(init_from, device)
    ckpt = load_checkpoint(path)      # read once; the loaders below rebuild the model from this dict
    if "tokenizer" not in ckpt:
        raise CheckpointError(f"{checkpoint_file(path)} records no tokenizer: cannot encode prompts for it")
    if ckpt.get("quantization"):
        model, ckpt = load_quantized(path, device, ckpt)
    else:
        model, ckpt = load_model(path, device, ckpt)
    try:
        return model, load_tokenizer(ckpt["tokenizer"])
    except (ValueError, KeyError, TypeError) as e:     # a tokenizer spec that is not one of tokenizer.py's
        raise CheckpointError(f"{checkpoint_file(path)}: its tokenizer does not load ({type(e).__name__}: {e})") from e
