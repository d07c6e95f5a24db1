"""
Hugging Face interop: load LLaMA-format checkpoints (Meta's facebook/MobileLLM-* among them) into MobileLLM,
and export our models in the format that transformers' LlamaForCausalLM loads unchanged.

  from hf import load_hf, export_hf
  model, tokenizer = load_hf("facebook/MobileLLM-125M")     # repo id (downloads) or a local HF-format dir
  export_hf(model, "out-hf", tokenizer)                     # config.json + model.safetensors + tokenizer files

  python export.py --init_from=model.gguf --format=hf --out=out-hf   # the same from the command line, for
                                                                     # anything loader.py loads

The layouts are the same up to names: our RoPE already uses the HF "rotate half" pairing, so no weight is
permuted, only renamed. Meta's configs carry two fields of their own (their modeling code, checked):
  share_embedding: true   the LM head is the token embedding (their config still says
                          tie_word_embeddings: false, and the files have no lm_head tensor)
  layer_sharing: true     each block is applied twice in a row (§2.3 immediate block-wise sharing)
Meta's 125M safetensors conversion is reported broken, so pytorch_model.bin is preferred when both exist
(it is loaded with weights_only=True). safetensors, sentencepiece, tokenizers and huggingface_hub are optional.

Tokenizers come in two formats. tokenizer.json (SmolLM2 and most newer repos) is preferred; tokenizer_config.json
beside it gives the BOS/EOS tokens, add_bos_token and the chat template (chat_template.jinja, when present, wins,
as in transformers). Without tokenizer.json, tokenizer.model is Meta's LLaMA-2 SentencePiece model.
"""
import json
import os
import warnings
from pathlib import Path

import torch

from checkpoint import atomic_write
from model import MobileLLM, ModelConfig
from tokenizer import sentencepiece_tokenizer, tokenizers_tokenizer

# our parameter name -> LLaMA name ({} is the unique block index)
BLOCK_KEYS = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "pytorch_model.bin.index.json",
                "model.safetensors.index.json")   # in order of preference
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")   # the last two optional


class HFFormatError(ValueError):
    """An HF checkpoint that is missing files or that MobileLLM cannot represent."""


def _require(module, package):
    try:
        return __import__(module)
    except ImportError as e:
        raise RuntimeError(f"Hugging Face format support needs {package}: pip install {package}") from e


# --- config ------------------------------------------------------------------------------------

def config_from_hf(hf, has_lm_head):
    """ModelConfig from an HF config.json dict; one HFFormatError naming every field we cannot represent."""
    problems = []
    if hf.get("model_type", "llama") not in ("llama", "mobilellm"):
        problems.append(f"model_type {hf.get('model_type')!r} (only LLaMA-style models)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (SwiGLU needs silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            problems.append(f"{flag}: true (our projections have no biases)")
    if hf.get("rope_scaling"):
        problems.append(f"rope_scaling {hf['rope_scaling']!r} (only plain RoPE)")
    n_heads = hf.get("num_attention_heads", 0)
    if hf.get("head_dim") not in (None, hf.get("hidden_size", 0) // max(n_heads, 1)):
        problems.append(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    if problems:
        raise HFFormatError("this Hugging Face config cannot be represented by MobileLLM: " + "; ".join(problems))
    shared_head = bool(hf.get("share_embedding") or hf.get("tie_word_embeddings"))
    if not shared_head and not has_lm_head:
        warnings.warn("config says the LM head is untied but there is no lm_head tensor: using the token "
                      "embedding as the head (what Meta's share_embedding models need)")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"], block_size=hf.get("max_position_embeddings", 2048),
            rope_theta=float(hf.get("rope_theta", 10000.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=shared_head or not has_lm_head,
            share="immediate" if hf.get("layer_sharing") else "none", share_repeats=2)
    except KeyError as e:
        raise HFFormatError(f"Hugging Face config.json lacks {e.args[0]!r}") from e
    except ValueError as e:
        raise HFFormatError(f"this Hugging Face config cannot be represented by MobileLLM: {e}") from e


def config_to_hf(config):
    """LLaMA config.json dict for a ModelConfig whose blocks are unrolled (see unrolled_state_dict)."""
    if config.ffn_type != "swiglu":
        raise HFFormatError(f"LLaMA has a SwiGLU feed-forward; ffn_type={config.ffn_type!r} cannot be exported")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "num_hidden_layers": config.depth,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "intermediate_size": config.ffn_dim, "hidden_act": "silu",
        "max_position_embeddings": config.block_size, "rope_theta": config.rope_theta,
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "rope_scaling": None, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    }


# --- weights -----------------------------------------------------------------------------------

def state_dict_from_hf(hf_sd, config):
    """Rename LLaMA tensors to ours. With layer sharing the file holds the unique blocks only.
    Tensors left over (more layers than the config says, unknown names) are an error, not ignored."""
    names = dict((theirs, ours) for ours, theirs in TOP_KEYS.items())
    names.update((f"model.layers.{i}.{theirs}", f"layers.{i}.{ours}")
                 for i in range(config.n_layers) for ours, theirs in BLOCK_KEYS.items())
    sd = {names[k]: v for k, v in hf_sd.items() if k in names}
    if config.tie_embeddings and "tok_embeddings.weight" in sd:   # a tied head is the embedding, lm_head or not
        sd["output.weight"] = sd["tok_embeddings.weight"]
    left = sorted(k for k in hf_sd if k not in names and not k.endswith("rotary_emb.inv_freq"))
    if left:
        raise HFFormatError(f"tensors that the config has no place for: {', '.join(left[:5])}"
                            f"{' ...' if len(left) > 5 else ''}")
    return sd


def unrolled_state_dict(model):
    """LLaMA-named tensors with one layer per block *application*: an LS model's shared blocks are written
    once per use (the file doubles), so any LLaMA runtime can run it."""
    sd = model.state_dict()
    out = {theirs: sd[ours] for ours, theirs in TOP_KEYS.items() if not (ours == "output.weight"
                                                                      and model.config.tie_embeddings)}
    for depth, block in enumerate(model.schedule):
        for ours, theirs in BLOCK_KEYS.items():
            out[f"model.layers.{depth}.{theirs}"] = sd[f"layers.{block}.{ours}"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def read_hf_weights(hf_dir):
    """All tensors of an HF dir: pytorch_model.bin first (Meta's 125M safetensors is reported broken)."""
    hf_dir = Path(hf_dir)
    found = next((hf_dir / name for name in WEIGHT_FILES if (hf_dir / name).is_file()), None)
    if found is None:
        raise HFFormatError(f"{hf_dir} has no weights (expected one of: {', '.join(WEIGHT_FILES)})")
    files = [found]
    if found.name.endswith(".index.json"):
        files = [hf_dir / f for f in sorted(set(json.loads(found.read_text())["weight_map"].values()))]
    sd = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                sd.update(_require("safetensors.torch", "safetensors").torch.load_file(str(f)))
            else:
                sd.update(torch.load(f, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, ValueError) as e:
            raise HFFormatError(f"could not read weights {f} ({type(e).__name__}: {e})") from e
    return sd


# --- load / download / export ------------------------------------------------------------------

def download(repo_id, revision=None):
    """Fetch config, tokenizer and ONE weights format of a hub repo into the HF cache; return the dir."""
    hub = _require("huggingface_hub", "huggingface_hub")
    from huggingface_hub.errors import RemoteEntryNotFoundError

    def fetch(name, required=True):
        try:
            return Path(hub.hf_hub_download(repo_id, name, revision=revision))
        except RemoteEntryNotFoundError:      # the repo exists but lacks this file
            if required:
                raise HFFormatError(f"{repo_id} has no {name}") from None
            return None
        except Exception as e:  # offline, unknown repo, gated repo: huggingface_hub raises many types
            raise RuntimeError(f"could not download {name} from the Hugging Face hub repo {repo_id!r} "
                               f"({type(e).__name__}: {e}). Offline? Give a local HF-format dir instead, or set "
                               "HF_HUB_OFFLINE=1 to use the hub's local cache without its retries") from e

    config_path = fetch("config.json")
    if fetch("tokenizer.json", required=False):
        for name in TOKENIZER_JSON_FILES[1:]:
            fetch(name, required=False)
    else:
        fetch(SENTENCEPIECE_FILE, required=False)
    for name in WEIGHT_FILES:
        path = fetch(name, required=False)
        if path is not None:
            if name.endswith(".index.json"):
                for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
                    fetch(shard)
            return config_path.parent
    raise HFFormatError(f"{repo_id} has none of {', '.join(WEIGHT_FILES)}")


def load_hf(repo_id_or_dir, device="cpu", revision=None):
    """Load an HF LLaMA/MobileLLM checkpoint (a local dir, else a hub repo id; revision: a hub branch, tag or
    commit) -> (model in eval mode, tokenizer)."""
    hf_dir = Path(repo_id_or_dir)
    if not hf_dir.is_dir():
        hf_dir = download(str(repo_id_or_dir), revision)
    if not (hf_dir / "config.json").is_file():
        raise HFFormatError(f"{hf_dir} is not a Hugging Face model dir (no config.json)")
    hf_config = json.loads((hf_dir / "config.json").read_text())
    if "layer-share" in str(repo_id_or_dir) and not hf_config.get("layer_sharing"):
        warnings.warn(f"{repo_id_or_dir} looks like a -layer-share model but its config has no layer_sharing: true; "
                      "loading it without layer sharing")
    hf_sd = read_hf_weights(hf_dir)
    config = config_from_hf(hf_config, "lm_head.weight" in hf_sd)
    model = MobileLLM(config)
    try:
        model.load_state_dict(state_dict_from_hf(hf_sd, config))     # fp16/bf16 files are cast to fp32 here
    except RuntimeError as e:
        raise HFFormatError(f"the weights in {hf_dir} do not match its config.json: {e}") from e
    return model.to(device).eval(), read_tokenizer(hf_dir)


def export_hf(model, out_dir, tokenizer=None):
    """Write config.json + model.safetensors that transformers' LlamaForCausalLM loads unchanged, and the
    tokenizer's files when one is given (write_tokenizer); config.json's bos/eos ids are then the tokenizer's.
    A layer-shared model is unrolled (one LLaMA layer per block application: the file doubles for LS)."""
    st = _require("safetensors.torch", "safetensors").torch
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").unlink(missing_ok=True)    # what marks a directory as a model: gone until all is written
    hf_config = config_to_hf(model.config)
    if tokenizer is not None:
        write_tokenizer(tokenizer, out_dir)
        hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    weights = unrolled_state_dict(model)

    def write_weights(tmp):             # with the mode any new file gets (safetensors makes it owner-only)
        st.save_file(weights, str(tmp), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)

    # each file whole or not at all, and config.json (what marks the directory as a model) last
    atomic_write(out_dir / "model.safetensors", write_weights)
    atomic_write(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(hf_config, indent=2) + "\n"))
    return out_dir


# --- tokenizer files ---------------------------------------------------------------------------

def read_tokenizer(hf_dir):
    """The tokenizer of an HF dir: tokenizer.json (read_tokenizer_json), else tokenizer.model, else None."""
    if (hf_dir / "tokenizer.json").is_file():
        return read_tokenizer_json(hf_dir)
    if (hf_dir / SENTENCEPIECE_FILE).is_file():
        return sentencepiece_tokenizer(hf_dir / SENTENCEPIECE_FILE)
    return None


def read_tokenizer_json(hf_dir):
    """tokenizer.json with tokenizer_config.json's bos_token, eos_token, add_bos_token and chat template. Without
    add_bos_token, the BOS is prepended when tokenizer.json's post-processor prepends it (what transformers does)."""
    tokenizer_json = (hf_dir / "tokenizer.json").read_text(encoding="utf-8")
    config_file = hf_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    bos, eos = token_content(config.get("bos_token")), token_content(config.get("eos_token"))
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        add_bos = prepends_bos(json.loads(tokenizer_json).get("post_processor"), bos)
    return tokenizers_tokenizer(tokenizer_json, bos, eos, add_bos, chat_template(hf_dir, config))


def token_content(token):
    """A special token of tokenizer_config.json: a string, or an AddedToken dict {"content": "<s>", ...}."""
    return token.get("content") if isinstance(token, dict) else token


def chat_template(hf_dir, config):
    """chat_template.jinja if the dir has one, else the config's chat_template (of a list of named ones, "default")."""
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def prepends_bos(post_processor, bos):
    """Whether a tokenizer.json post-processor (a TemplateProcessing, alone or in a Sequence) starts texts with bos."""
    if not post_processor or bos is None:
        return False
    if post_processor["type"] == "Sequence":
        return any(prepends_bos(p, bos) for p in post_processor["processors"])
    if post_processor["type"] != "TemplateProcessing":
        return False
    return post_processor["single"][0].get("SpecialToken", {}).get("id") == bos


def write_tokenizer(tokenizer, out_dir):
    """tokenizer.json + tokenizer_config.json for the tokenizers kind, tokenizer.model for SentencePiece. A char
    or tiktoken tokenizer is first made the tokenizer.json its GGUF vocabulary stands for (gguf_vocab.py: the
    same tokens, as llama.cpp tokenizes them)."""
    if tokenizer.spec.get("kind") in ("char", "tiktoken"):
        from gguf_vocab import tokenizer_from_gguf, vocab_metadata
        tokenizer = tokenizer_from_gguf(vocab_metadata(tokenizer, tokenizer.vocab_size), tokenizer.vocab_size)
    spec = tokenizer.spec
    if spec.get("kind") == "sentencepiece":
        atomic_write(out_dir / SENTENCEPIECE_FILE, lambda tmp: tmp.write_bytes(Path(spec["model_file"]).read_bytes()))
        return
    if spec.get("kind") != "tokenizers":
        raise HFFormatError(f"a {spec.get('kind')!r} tokenizer has no Hugging Face files here (char, tiktoken, "
                            "tokenizers and sentencepiece have): export the model without it")
    tokenizer_json = with_bos_post_processor(spec["json"], spec["bos"], tokenizer.bos_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": spec["bos"], "eos_token": spec["eos"],
              "add_bos_token": spec["add_bos"], "chat_template": spec["chat_template"]}
    config_json = json.dumps({k: v for k, v in config.items() if v is not None}, indent=2, ensure_ascii=False) + "\n"
    for name, text in (("tokenizer.json", tokenizer_json), ("tokenizer_config.json", config_json)):
        atomic_write(out_dir / name, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def with_bos_post_processor(tokenizer_json, bos, bos_id):
    """tokenizer.json whose post-processor prepends bos exactly when bos_id is given: transformers takes the BOS
    from tokenizer.json's post-processor and ignores tokenizer_config.json's add_bos_token."""
    data = json.loads(tokenizer_json)
    if prepends_bos(data.get("post_processor"), bos) == (bos_id is not None):
        return tokenizer_json
    data["post_processor"] = None
    if bos_id is not None:
        special = [{"SpecialToken": {"id": bos, "type_id": i}} for i in (0, 1)]
        text = [{"Sequence": {"id": name, "type_id": i}} for i, name in enumerate("AB")]
        data["post_processor"] = {"type": "TemplateProcessing", "single": [special[0], text[0]],
                                  "pair": [special[0], text[0], special[1], text[1]],
                                  "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    return json.dumps(data, ensure_ascii=False)
