r"""
The peer a user would pick instead of ExecuTorch for CPU decoding, llama.cpp, timed on the same model on
this host, so that bench_mobile.py's tables have a reference measured on the same machine.

MobileLLM is LLaMA-shaped (RMSNorm, rotary attention with grouped KV heads, SwiGLU, tied embedding), so
it is written as a GGUF file of llama.cpp's LLaMA architecture (gguf_file.export_gguf), quantized with
llama.cpp's llama-quantize and timed with its llama-bench: a --prompt_len prompt, and --new_tokens
generated after a prompt of that length (llama-bench's pp and tg tests, the latter at depth --prompt_len).
llama.cpp has no layer sharing: a layer-shared model is written with each block once per application
(an LS-125M GGUF is a 60-layer file). The file has no vocabulary (tokenizer "no_vocab": llama.cpp makes
vocab_size dummy tokens): llama-bench and --check_logits feed token ids, never text. A .gguf --init_from (a
released model, e.g. a Q4_1 file) is also timed as it is, in a row of its own; model.py then runs its weights
dequantized to fp32, and the quantized files are made from those.

--check_logits proves the file is our model: it feeds a random --prompt_len token sequence through
llama.cpp (through the llama-cpp-python bindings, loaded on the same build when --llama_cpp holds its
libllama.so) and reports, for every position, how far llama.cpp's logits are from model.py's (largest
|difference|) and how often both pick the same next token.

  python experiments/llama_cpp_reference.py --llama_cpp ~/llama.cpp/build/bin --init_from mobilellm-125m
  python experiments/llama_cpp_reference.py --llama_cpp BIN --compare mobilellm-125m,mobilellm-125m:n_layers=60 \
      --quant Q8_0 --threads 2
  python experiments/llama_cpp_reference.py --llama_cpp BIN --init_from out-shakespeare --quant F32,Q8_0 --check_logits

Getting llama.cpp (a CPU build). The figures in docs/on-device.md and docs/real-models.md used the llama.cpp
vendored in llama-cpp-python 0.3.36, whose Python bindings then match the build exactly (--check_logits needs
them; they are plain Python):
  pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
  cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON
  cmake --build build -j --target llama-bench llama-quantize      # BIN is then build/bin (with libllama.so)
  pip install diskcache jinja2 && export PYTHONPATH=$PWD/../..     # the bindings, for --check_logits
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # bench_mobile.py lives at the repo root
from bench_mobile import BenchError, check_tokens, logit_agreement  # noqa: E402
from checkpoint import atomic_write  # noqa: E402
from configurator import accept_old_flags, at_least  # noqa: E402
from export import ExportError, load_source, source_hash  # noqa: E402
from gguf_file import GGUFFormatError, export_gguf  # noqa: E402

QUANTS = ("F32", "F16", "Q8_0", "Q4_0")       # llama-quantize's names


def llama_tool(bin_dir, name):
    path = Path(bin_dir).expanduser() / name
    if not path.is_file():
        raise BenchError(f"{path} not found: --llama_cpp is llama.cpp's build/bin (see this file's docstring)")
    return str(path)


def gguf_files(model, quants, bin_dir, out_dir):
    """{quant: path} for the model, written (F32) and quantized once per weights and kept in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / f"{source_hash(model)}-F32.gguf"
    if not f32.is_file():
        export_gguf(model, None, f32)
    paths = {}
    for quant in quants:
        paths[quant] = f32 if quant == "F32" else out_dir / f"{source_hash(model)}-{quant}.gguf"
        if not paths[quant].is_file():
            quantize = [llama_tool(bin_dir, "llama-quantize"), str(f32)]
            atomic_write(paths[quant], lambda tmp: run_tool(quantize + [str(tmp), quant]))
    return paths


def run_tool(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise BenchError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result.stdout


def parse_bench_json(text):
    """llama-bench -o json -> {"prefill": tok/s, "decode": tok/s} (a pp test has n_gen 0, a tg test n_prompt 0)."""
    speeds = {}
    for test in json.loads(text):
        speeds["decode" if test["n_gen"] else "prefill"] = test["avg_ts"]
    return speeds


def bench(bin_dir, path, threads, prompt_len, new_tokens, runs):
    """{"prefill": tok/s of a prompt_len prompt, "decode": tok/s of new_tokens generated after one}."""
    cmd = [llama_tool(bin_dir, "llama-bench"), "-m", str(path), "-t", str(threads), "-r", str(runs), "-o", "json"]
    speeds = parse_bench_json(run_tool(cmd + ["-p", str(prompt_len), "-n", "0"]))
    speeds.update(parse_bench_json(run_tool(cmd + ["-p", "0", "-n", str(new_tokens), "-d", str(prompt_len)])))
    return speeds


def llama_cpp_logits(bin_dir, path, tokens, threads):
    """llama.cpp's logits (T, V) for every position of `tokens` (a list of ids), through llama-cpp-python's
    bindings, on the build in bin_dir when it has its libllama.so."""
    if (Path(bin_dir).expanduser() / "libllama.so").is_file():
        os.environ["LLAMA_CPP_LIB_PATH"] = str(Path(bin_dir).expanduser())   # read when llama_cpp is imported
    try:
        import llama_cpp
    except ImportError as e:
        raise BenchError(f"--check_logits needs llama-cpp-python's bindings ({e}); see this file's docstring")
    llm = llama_cpp.Llama(str(path), n_ctx=len(tokens), logits_all=True, n_threads=threads, verbose=False)
    llm.eval(tokens)
    return torch.from_numpy(llm.scores[:len(tokens)].copy())


OLD_FLAGS = {"--llama-cpp": "--llama_cpp", "--prompt-len": "--prompt_len", "--new-tokens": "--new_tokens",
             "--out-dir": "--out_dir", "--check-logits": "--check_logits", "--ckpt": "--init_from",
             "--preset": "--init_from"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama_cpp", required=True, help="folder with llama-bench and llama-quantize")
    p.add_argument("--init_from", default="mobilellm-125m",
                   help="preset[:field=value+...] (random weights), our checkpoint, a GGUF file, or an HF dir "
                        "(as export.py)")
    p.add_argument("--compare", default="", help="comma-separated --init_from values, one table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", default="F32,F16,Q8_0,Q4_0", help=f"comma-separated, from {QUANTS}")
    p.add_argument("--threads", type=at_least(1), default=2)
    p.add_argument("--prompt_len", type=at_least(1), default=64)
    p.add_argument("--new_tokens", type=at_least(1), default=32)
    p.add_argument("--runs", type=at_least(1), default=5)
    p.add_argument("--out_dir", default="out-llamacpp", help="where the GGUF files are kept")
    p.add_argument("--check_logits", action="store_true",
                   help="also compare llama.cpp's logits with model.py's (needs llama-cpp-python)")
    args = p.parse_args(accept_old_flags(argv, OLD_FLAGS))
    quants = args.quant.split(",")
    if bad := [q for q in quants if q not in QUANTS]:
        p.error(f"--quant: unknown {bad}; choose from {QUANTS}")
    sources = args.compare.split(",") if args.compare else [args.init_from]
    check = " max abs logit difference to model.py | same next token |" if args.check_logits else ""
    print(f"| model | llama.cpp | file MB | prefill {args.prompt_len} tok/s | decode tok/s |{check}")
    print("|---|---|---|---|---|" + "---|---|" * bool(check))
    try:
        for source in sources:
            with torch.no_grad():
                model = load_source(source, args.seed)[0].eval()
                tokens = check_tokens(model.config.vocab_size, args.prompt_len, args.seed)
                reference = model(tokens[None])[0][0] if args.check_logits else None          # (T, V)
            files = gguf_files(model, quants, args.llama_cpp, args.out_dir)
            if source.endswith(".gguf"):                  # a released GGUF: time the file itself too
                files = {"the file itself": Path(source), **files}
            for quant, path in files.items():
                s = bench(args.llama_cpp, path, args.threads, args.prompt_len, args.new_tokens, args.runs)
                row = f"| {source} | {quant} | {path.stat().st_size / 2**20:.0f} | {s['prefill']:.0f} | "
                row += f"{s['decode']:.1f} |"
                if args.check_logits:
                    theirs = llama_cpp_logits(args.llama_cpp, path, tokens.tolist(), args.threads)
                    diff, same = logit_agreement(theirs, reference)
                    row += f" {diff:.2g} | {same:.0%} |"
                print(row, flush=True)
    except (ExportError, GGUFFormatError) as e:        # BenchError is an ExportError
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
