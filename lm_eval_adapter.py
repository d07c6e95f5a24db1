r"""
lm-evaluation-harness (lm-eval) backend for our models: anything loader.py loads (our checkpoints, int8
checkpoints, Hugging Face dirs and repo ids) evaluated on the harness's own tasks, prompts and metrics.

  python lm_eval_adapter.py --model_args init_from=out-gutenberg,device=cpu,batch_size=16 \
      --include_path lm_eval_tasks --tasks piqa_local --limit 200

Run as a script, this registers the model as `nanomobilellm` and hands its arguments to lm-eval's own CLI
(`lm-eval run --model nanomobilellm ...`), so every lm-eval flag works (--output_path, --log_samples, --tasks
with any task lm-eval knows, which then downloads its data; lm_eval_tasks/ holds offline ones). model_args:
init_from (required) and dtype (fp32, the default, bf16 or fp16: the autocast dtype of the forward; log-probs
are summed in float32), simulate_int8 (True: as eval.py --simulate_int8), device and batch_size, which may
instead be lm-eval's --device and --batch_size flags (model_args win; lm-eval's CLI asks for cuda:0 by default:
without CUDA that means the CPU). From Python, after `import lm_eval_adapter`:
lm_eval.simple_evaluate(model="nanomobilellm", model_args=dict(init_from=..., device=..., dtype=...,
batch_size=...), tasks=[...]).

How requests are answered:
  loglikelihood          the harness's own split of (context, continuation) into tokens (TemplateLM: trailing
                         whitespace of the context moves to the continuation, the pair is encoded whole and cut
                         where the context's encoding ends; an empty context is BOS, else EOS), then eval.py's
                         scoring (eval.score: batched, KV-free, a context longer than block_size cut from the left,
                         the continuation kept whole), with is_greedy
  loglikelihood_rolling  the harness's disjoint windows of block_size tokens, each token predicted once; the first
                         is conditioned on BOS/EOS, or, for a tokenizer with neither (char level), the text's first
                         token is context only
  generate_until         greedy decoding through the KV cache, one request at a time, stopped at EOS, at the first
                         of the request's `until` strings (cut from the output) or after max_gen_toks tokens; the
                         context keeps its last block_size - max_gen_toks tokens (at least one), as the harness's hf
                         backend does
Text the tokenizer cannot encode (a character outside a char-level vocabulary) stops the run with the tokenizer's
error: eval.py skips such examples, but an lm-eval backend must answer every request.
"""
import inspect
import logging
import sys

import lm_eval.models  # noqa: F401  lm-eval's own backends: get_model() imports them only into an empty registry
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

import eval as ev
from checkpoint import CheckpointError
from int8 import set_simulate
from loader import autocast, load_model_and_tokenizer, resolve_device, torch_dtype, without_tokenizer

log = logging.getLogger(__name__)
MAX_GEN_TOKS = 256   # the harness's default when a task does not say


def pick_device(device):
    """The device asked for, or CUDA when there is one; a CUDA device on a machine without CUDA means the CPU
    (lm-eval's CLI asks for cuda:0 unless told otherwise)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s asked for, but CUDA is not available: using the CPU", device)
        return "cpu"
    return resolve_device(device or "auto")


def parse_batch_size(value):
    if str(value).isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"batch_size must be a positive whole number, got {value!r} (this backend has no 'auto')")


def prefix_token(tokenizer):
    """The token standing for 'no text before': BOS when the model is fed one, else EOS, else None."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def cut_at_stop(text, until):
    """text up to the first occurrence of any of the stop strings."""
    return text[:min((text.find(s) for s in until if s in text), default=len(text))]


@register_model("nanomobilellm")
class NanoMobileLLM(TemplateLM):
    """An lm-eval model answering requests with load_model_and_tokenizer(init_from)."""

    def __init__(self, init_from, device=None, dtype="fp32", batch_size=16, simulate_int8=False):
        super().__init__()
        self.dtype = torch_dtype(dtype)
        self.batch_size = parse_batch_size(batch_size)
        self._device = pick_device(device)
        self.model, self.tokenizer = load_model_and_tokenizer(str(init_from), device=self._device)
        set_simulate(self.model, str(simulate_int8).lower() == "true")          # eval.py --simulate_int8
        if self.tokenizer is None:
            raise ValueError(f"{without_tokenizer(str(init_from))}: give a trained model with its tokenizer")
        self.block_size = self.model.config.block_size

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """The model from model_args plus lm-eval's --device/--batch_size, model_args winning (lm-eval's CLI
        always sends those two, its defaults included, and would otherwise pass a key given in both twice)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(arg_dict) - known)
        if unknown or "init_from" not in arg_dict:
            raise ValueError(f"--model_args {', '.join(unknown) or 'without init_from'}: takes init_from=<model> "
                             f"(required), {', '.join(sorted(known - {'init_from'}))}")
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self):
        """What an empty context is encoded as (the harness's choice: BOS, else EOS)."""
        prefix = prefix_token(self.tokenizer)
        if prefix is None:
            raise ValueError("an empty context, and the tokenizer has no BOS or EOS token to stand for it")
        return prefix

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """Token ids of string, BOS first when the model is fed one (unless add_special_tokens is False)."""
        bos = self.tokenizer.bos_id
        return ([bos] if bos is not None and add_special_tokens is not False else []) + self.tokenizer.encode(string)

    def _score(self, pairs, desc, greedy=False):
        return ev.score(self.model, pairs, self.batch_size, self._device, self.dtype, desc=desc, greedy=greedy)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """[(key, context ids, continuation ids)] from TemplateLM.loglikelihood -> [(log-likelihood, is_greedy)]."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        empty = [key for key, ctx, _ in requests if not ctx]
        if empty:
            raise ValueError(f"context {empty[0][0]!r} encodes to no tokens: nothing to condition the continuation on")
        return self._score(pairs, "loglikelihood", greedy=True)

    def rolling_windows(self, text):
        """[(context ids, ids to predict)] covering every token of text once, block_size at a time."""
        tokens = self.tokenizer.encode(text)
        prefix = prefix_token(self.tokenizer)
        if not tokens:
            return []
        if prefix is None:
            prefix, tokens = tokens[0], tokens[1:]
        windows = get_rolling_token_windows(tokens, prefix, self.block_size, context_len=1)
        return [make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        windows, owners = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            text_windows = self.rolling_windows(text)
            windows += text_windows
            owners += [n] * len(text_windows)
        totals = [0.0] * len(requests)
        for n, ll in zip(owners, self._score(windows, "loglikelihood_rolling")):
            totals[n] += ll
        return totals

    @torch.no_grad()
    def generate(self, context, until, max_gen_toks):
        """Greedy continuation of context, stopped at EOS, at a stop string (cut off) or after max_gen_toks."""
        ids = self.tok_encode(context) or [self.prefix_token_id]
        idx = torch.tensor([ids[-max(1, self.block_size - max_gen_toks):]], device=self._device)
        new, text = [], ""
        with autocast(self._device, self.dtype):
            for token in self.model.generate_tokens(idx, max_gen_toks, temperature=0):
                if token.item() == self.tokenizer.eos_id:
                    break
                new.append(token.item())
                text = self.tokenizer.decode(new)
                if any(s in text for s in until):
                    break
        self.model.clear_cache()     # generate_tokens frees its cache only when it runs to the end
        return cut_at_stop(text, until)

    def generate_until(self, requests, disable_tqdm=False):
        outputs = []
        for context, gen_kwargs in tqdm([req.args for req in requests], desc="generate_until", disable=disable_tqdm):
            kwargs = normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS)
            if kwargs["do_sample"]:
                raise ValueError(f"this backend decodes greedily only; the task asks for sampling ({gen_kwargs})")
            outputs.append(self.generate(context, [s for s in kwargs["until"] if s], kwargs["max_gen_toks"]))
        return outputs


def main(argv=None):
    """lm-eval's CLI (`lm-eval run`) with this backend as --model (a later --model in argv still wins)."""
    from lm_eval.__main__ import cli_evaluate
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):                   # ours first: lm-eval's own says nothing of init_from
        print(__doc__.split("\nHow requests")[0].strip(), "lm-eval's options (--model: nanomobilellm):", sep="\n\n")
    sys.argv = ["lm-eval", "run", "--model", "nanomobilellm", *argv]
    try:
        cli_evaluate()
    except (CheckpointError, ValueError) as e:         # a model that does not load: one line, not lm-eval's traceback
        sys.exit(f"lm_eval_adapter.py: {e}")


if __name__ == "__main__":
    main()
