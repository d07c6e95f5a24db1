"""
Generate text from a trained MobileLLM: our checkpoints, int8 checkpoints from quantize.py, llama.cpp GGUF
files, or Meta's released facebook/MobileLLM-* weights (any LLaMA-format Hugging Face dir or repo id).

  python sample.py                                     # from what `python train.py` made (its default out_dir)
  python sample.py --init_from out-shakespeare-char --start "ROMEO:"
  python sample.py --init_from facebook/MobileLLM-125M --start "The capital of France is" --temperature 0
  python sample.py --init_from out --start FILE:prompt.txt --num_samples 3 --top_k 50 --top_p 0.9
  python sample.py --init_from mobilellm-125m --benchmark --dtype fp16 --compile  # decode speed, random weights
  python sample.py --init_from mobilellm-125m:n_layers=60+share=none --benchmark  # a preset with overrides
  python sample.py --init_from HuggingFaceTB/SmolLM2-135M-Instruct --chat --start "What is a llama?"
  python sample.py --init_from HuggingFaceTB/SmolLM2-135M-Instruct --interactive --system "Answer briefly."

Tokens stream to stdout as they are made; generation stops at the tokenizer's end-of-text token; the
prefill and decode speeds (tokens/s) are printed at the end. Decoding goes through the model's static
KV cache (model.generate_tokens); --compile compiles the one-token decode step with torch.compile.

--chat puts --start in the model's chat template (an instruct model's, from its tokenizer files) as the user's
message and prints the assistant's reply, which ends at the tokenizer's end-of-text token (<|im_end|> for
SmolLM2-Instruct). --interactive keeps a conversation going: one user message per stdin line, until EOF, an
empty line or /exit; the whole conversation is the prompt of each reply (its oldest turns are dropped when it
outgrows the context). Ctrl-C stops a reply and leaves that exchange out; Ctrl-C at the "> " prompt quits.
"""
import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch

from checkpoint import CheckpointError
from configurator import HelpFormatter, accept_old_flags, at_least, usage_description
from loader import DTYPES, dtype_name, load_model_and_tokenizer, resolve_device, torch_dtype, without_tokenizer
from tokenizer import render_chat
from torch_private import MATRIX_VECTOR_LOOPS
from train import TrainConfig


def compile_decode_step(model):
    """torch.compile the one-token decode step (static shapes: compiled once per cache length); the
    prompt's prefill stays eager, so a new prompt length costs no recompilation. On CPU, two inductor
    options (measured in docs/decoding.md):
    - decompose_mm_pass: one token makes every linear a matrix-vector product. Inductor then writes it as
      its own fused multiply-and-sum loop instead of calling the BLAS kernel, which can stream the weights
      faster (experiments/decode_gemv.py times both). Only matrices up to 2048 wide: not the LM head.
    - cpp_wrapper: the step's hundreds of small kernels are launched from C++, not Python."""
    cpu = model.norm.weight.device.type == "cpu"
    options = {"cpp_wrapper": True, **MATRIX_VECTOR_LOOPS} if cpu else {}
    eager = model.forward
    compiled = torch.compile(model.forward, dynamic=False, options=options)

    def forward(idx, targets=None, input_pos=None):
        return (compiled if idx.size(1) == 1 else eager)(idx, targets, input_pos)

    model.forward = forward


def check_default_run(init_from):
    """The default --init_from is train.py's default out_dir: say how to make it when it is missing."""
    if init_from == TrainConfig.out_dir and not Path(init_from).exists():
        raise SystemExit(f"error: no {init_from}/ here: run `python train.py` first, "
                         "or name a model with --init_from")


def read_prompt(start):
    if start.startswith("FILE:"):
        prompt_file = Path(start[len("FILE:"):])
        if not prompt_file.is_file():
            raise SystemExit(f"error: --start {start}: " + ("a folder" if prompt_file.is_dir() else "no such file"))
        try:
            return prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: --start {start}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return start


def encode_prompt(tokenizer, text, block_size):
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:                   # a character-level model meets a character it never saw
        raise SystemExit(f"error: --start: {e}") from e
    if tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    if not ids:
        raise SystemExit("error: the prompt is empty and this tokenizer has no beginning-of-text token: "
                         "give --start some text")
    if len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} tokens, more than the context ({block_size}): keeping its last "
              f"{block_size}", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


def generate_one(model, ids, args, generator, tokenizer=None, out=None, echo=True):
    """Stream one sample after its prompt (echo: print the prompt first); return (new token ids, decode steps,
    prefill s, decode s)."""
    device = model.norm.weight.device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    eos = None if tokenizer is None else tokenizer.eos_id
    out = out or sys.stdout
    if tokenizer is not None:
        printed = tokenizer.decode(ids)
        if echo:
            out.write(printed)
    new, steps = [], 0
    t0 = time.perf_counter()
    t_first = t_last = t0
    stream = model.generate_tokens(idx, args.max_new_tokens, args.temperature, args.top_k or None, args.top_p,
                                   generator)
    for token in stream:
        token = token.item()                        # waits for a GPU to finish it: timed when it exists
        t_last = time.perf_counter()
        if steps == 0:                              # the first token came out of the prefill
            t_first = t_last
        steps += 1
        if token == eos:
            break
        new.append(token)
        if tokenizer is not None:
            text = tokenizer.decode(ids + new)          # whole text: SentencePiece spaces depend on neighbours
            if not text.endswith("\ufffd"):               # wait for the rest of a multi-byte character
                out.write(text[len(printed):])
                out.flush()
                printed = text
    stream.close()
    model.clear_cache()
    return new, steps - 1, t_first - t0, t_last - t_first


def require_chat_template(tokenizer, init_from):
    if not tokenizer.chat_template:
        raise SystemExit(f"error: {init_from} has no chat template (an instruct model's tokenizer_config.json or "
                         "chat_template.jinja gives one): --chat and --interactive need one")


def encode_chat(tokenizer, messages, block_size):
    """The conversation through the model's chat template, encoded with its special tokens recognised (no BOS
    added: a template writes its own). While it outgrows the context its oldest exchange (user message and
    reply) is dropped, with a note on stderr; a system message stays. Returns (ids, the messages kept)."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while True:
        ids = tokenizer.encode(render_chat(tokenizer.chat_template, messages, tokenizer))
        if len(ids) <= block_size:
            return ids, messages
        if len(messages) - first <= 1:
            raise SystemExit(f"error: the last message makes a {len(ids)}-token prompt, more than the context "
                             f"({block_size} tokens)")
        print(f"note: the conversation has {len(ids)} tokens, more than the context ({block_size}): dropping its "
              "oldest exchange", file=sys.stderr)
        messages = messages[:first] + messages[first + 2:]


def read_user_line():
    """The next user message from stdin (prompt "> " on stderr); None at EOF, an empty line or /exit."""
    sys.stderr.write("> ")
    sys.stderr.flush()
    line = sys.stdin.readline().rstrip("\n")
    return None if line.strip() in ("", "/exit") else line


def system_message(system):
    return [{"role": "system", "content": system}] if system else []


def prompt_ids(tokenizer, args, block_size):
    """--start as a plain prompt, or with --chat as the user's message in the chat template."""
    if not args.chat:
        return encode_prompt(tokenizer, read_prompt(args.start), block_size)
    messages = system_message(args.system) + [{"role": "user", "content": read_prompt(args.start)}]
    return encode_chat(tokenizer, messages, block_size)[0]


def chat(model, tokenizer, args, generator):
    """--interactive: --start (if given) is the user's first message, then each stdin line the next; the whole
    conversation is re-rendered as the prompt, and the reply streams to stdout and joins the conversation.
    Ctrl-C stops a reply (that exchange is left out of the conversation); Ctrl-C at the prompt ends it."""
    messages = system_message(args.system)
    first = read_prompt(args.start).strip()
    if first:
        print(f"> {first}", file=sys.stderr)
    for line in itertools.chain([first] if first else [], iter(read_user_line, None)):
        ids, kept = encode_chat(tokenizer, messages + [{"role": "user", "content": line}], model.config.block_size)
        try:
            new, _, _, _ = generate_one(model, ids, args, generator, tokenizer, echo=False)
        except KeyboardInterrupt:
            print(" [stopped]")
            continue
        print()
        messages = kept + [{"role": "assistant", "content": tokenizer.decode(new)}]


def main(argv=None):
    p = argparse.ArgumentParser(description=usage_description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--init_from", default=TrainConfig.out_dir,
                   help="our checkpoint (out_dir or file), an int8 checkpoint, a GGUF file, an HF dir or repo id, "
                        "or a preset[:field=value+...] (random weights)")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--chat", action="store_true",
                   help="--start is the user's message in the model's chat template; print the assistant's reply")
    p.add_argument("--interactive", action="store_true",
                   help="a conversation (implies --chat): user messages are read from stdin, one per line")
    p.add_argument("--system", default=None, help="--chat/--interactive: the system message")
    p.add_argument("--num_samples", type=at_least(1), default=1, help="samples from the one prompt")
    p.add_argument("--max_new_tokens", type=at_least(1), default=200, help="tokens to generate (fewer at end-of-text)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=at_least(0), default=200, help="sample from the k most likely tokens (0: from all)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: keep the smallest set reaching p")
    p.add_argument("--seed", type=int, default=1337, help="of the sampling")
    p.add_argument("--device", default="auto", help="auto: CUDA where there is one, else cpu")
    p.add_argument("--dtype", default="fp32", type=dtype_name, choices=DTYPES,
                   help="weights are converted to this dtype (fp16/bf16 halve the bytes read per token; "
                        "which decodes fastest depends on the CPU: see docs/decoding.md)")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")
    p.add_argument("--meta_ls_cache", action="store_true",
                   help="reproduce Meta's KV cache for facebook/MobileLLM-*-layer-share (see docs/decoding.md)")
    p.add_argument("--benchmark", action="store_true",
                   help="time greedy decoding of --max_new_tokens after a random --prompt_len prompt")
    p.add_argument("--prompt_len", type=at_least(1), default=64, help="--benchmark: tokens of the timed prefill")
    p.add_argument("--transformers_reference", action="store_true",
                   help="--benchmark also times transformers' LlamaForCausalLM with the same weights")
    args = p.parse_args(accept_old_flags(argv, {"--prompt_tokens": "--prompt_len"}))
    args.chat |= args.interactive
    if args.interactive and args.num_samples > 1:
        p.error("--interactive gives one reply per message: leave out --num_samples")
    if args.system is not None and not args.chat:
        p.error("--system needs --chat or --interactive")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top_p must be in (0, 1]")

    check_default_run(args.init_from)
    try:
        args.device = resolve_device(args.device)
        model, tokenizer = load_model_and_tokenizer(args.init_from, args.device, args.meta_ls_cache)
    except (CheckpointError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    model.to(dtype=torch_dtype(args.dtype))
    if args.compile:
        compile_decode_step(model)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    torch.manual_seed(args.seed)

    if args.benchmark:
        return benchmark(model, args, generator)
    if tokenizer is None:
        p.error(f"{without_tokenizer(args.init_from)}: use it with --benchmark")
    if args.chat:
        require_chat_template(tokenizer, args.init_from)
    if args.compile:
        warm_up(model, args)
    if args.interactive:
        return chat(model, tokenizer, args, generator)
    ids = prompt_ids(tokenizer, args, model.config.block_size)
    report(len(ids) * args.num_samples, *timed_samples(model, ids, args, generator, tokenizer))


def timed_samples(model, ids, args, generator, tokenizer=None):
    """--num_samples samples after the same prompt (streamed, each followed by a separator line, when a
    tokenizer is given). Returns (prefill s, decoded tokens, decode s), summed over the samples."""
    prefill_s = decode_s = decoded = 0
    for _ in range(args.num_samples):
        _, steps, t_prefill, t_decode = generate_one(model, ids, args, generator, tokenizer, echo=not args.chat)
        prefill_s, decode_s, decoded = prefill_s + t_prefill, decode_s + t_decode, decoded + steps
        if tokenizer is not None:
            print("\n---------------")
    return prefill_s, decoded, decode_s


def warm_up(model, args):
    """Run the compiled decode step once before the samples, so that its compiling (tens of seconds on a CPU)
    is not counted as decoding time; its own generator leaves the samples as they would be."""
    t0 = time.perf_counter()
    generate_one(model, [0], argparse.Namespace(**{**vars(args), "max_new_tokens": 3}), torch.Generator(args.device))
    print(f"compiled the decode step in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def benchmark(model, args, generator):
    """Greedy decoding from a random prompt; the first sample warms up (and compiles), the rest are timed."""
    args.temperature = 0
    ids = torch.randint(model.config.vocab_size, (args.prompt_len,), generator=generator, device=args.device).tolist()
    print(f"{args.init_from}: {model.num_params() / 1e6:.1f}M params, dtype {args.dtype}, "
          f"compile {args.compile}, {args.prompt_len}-token prompt, {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads" + (", compiling first (tens of seconds on a CPU)" if args.compile
                                                  else ""), flush=True)
    generate_one(model, ids, args, generator)
    timings = timed_samples(model, ids, args, generator)
    report(args.prompt_len * args.num_samples, *timings)
    if args.transformers_reference:
        benchmark_transformers(model, ids, args)


def benchmark_transformers(model, ids, args):
    """The same weights, prompt and greedy decoding in transformers' LlamaForCausalLM (our HF export)."""
    import tempfile

    import transformers

    import hf
    with tempfile.TemporaryDirectory() as tmp:
        llama = transformers.LlamaForCausalLM.from_pretrained(hf.export_hf(model, tmp)).eval()
    llama.to(args.device, torch_dtype(args.dtype))                                  # where ours decodes
    idx = torch.tensor([ids], device=args.device)
    greedy = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        llama.generate(idx, max_new_tokens=4, min_new_tokens=4, **greedy)            # warm up
        prefill_s = decode_s = 0.0
        for _ in range(args.num_samples):
            t0 = time.perf_counter()
            llama.generate(idx, max_new_tokens=1, min_new_tokens=1, **greedy)
            t1 = time.perf_counter()
            llama.generate(idx, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, **greedy)
            prefill_s, decode_s = prefill_s + t1 - t0, decode_s + time.perf_counter() - t1 - (t1 - t0)
    print(f"transformers {transformers.__version__} LlamaForCausalLM, same weights, dtype {args.dtype}, eager")
    report(len(ids) * args.num_samples, prefill_s, (args.max_new_tokens - 1) * args.num_samples, decode_s)


def report(prefill_tokens, prefill_s, decoded, decode_s):
    print(f"prefill: {prefill_tokens / max(prefill_s, 1e-9):.1f} tokens/s | "
          f"decode: {decoded / max(decode_s, 1e-9):.1f} tokens/s ({decoded} tokens)", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:                 # Ctrl-C ends a sample or a conversation: no traceback
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:                   # the reader went away (sample.py | head): stop quietly, as
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # cat does; the exit flush goes nowhere
        sys.exit(141)                         # 128 + SIGPIPE, what a shell reports for such a stop
