import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

# ../shared beside the project root holds local copies of the data and tokenizer files
# (the machines that run the tests have no internet).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


@pytest.fixture
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip("../shared (local copies of data and tokenizer files) is not beside the project")
    return SHARED


CHATML_TEMPLATE = """{{ bos_token }}{% for message in messages %}
{% if message['role'] not in ('system', 'user', 'assistant') %}
{{ raise_exception('unknown role: ' + message['role']) }}
{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="session")
def chat_tokenizer():
    """SmolLM2's kind of tokenizer, tiny: a byte-level BPE tokenizer.json (300 tokens) trained on a few sentences,
    <|endoftext|> as BOS (not prepended), <|im_end|> as EOS, and a ChatML template."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizer import tokenizers_tokenizer
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["hello there", "how are you?", "fine thanks", "user", "assistant", "system",
                             "the quick brown fox jumps over the lazy dog"] * 4, trainer)
    return tokenizers_tokenizer(bpe.to_str(), bos="<|endoftext|>", eos="<|im_end|>", chat_template=CHATML_TEMPLATE)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- one tiny layer-shared model and its fp32 program for the export and bench_mobile tests -------------

TINY_LS = "mobilellm-micro-ls:n_layers=1+dim=32+n_heads=2+n_kv_heads=1+ffn_dim=64+vocab_size=64+block_size=64"
MAX_SEQ_LEN = 32


@pytest.fixture(scope="session")
def tiny():
    from loader import preset_model
    return preset_model(TINY_LS, seed=0)


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("export_cache")


@pytest.fixture(scope="session")
def pte_fp32(tiny, export_cache):
    """One fp32 program (block-shared lowering) for every test that needs one, exported once through the
    cache that export.py's command line uses (lowering takes seconds). Returns (path, info)."""
    pytest.importorskip("executorch.exir")
    import export
    path = export.cached_pte(tiny, "fp32", MAX_SEQ_LEN, cache_dir=export_cache)
    return path, json.loads(path.with_suffix(".json").read_text())


# --- Android, with a fake adb that runs everything on this machine (test_android, test_bench_mobile) ----

FAKE_ADB = """#!{python}
import os, shutil, subprocess, sys
log, root = {log!r}, {root!r}
args = sys.argv[1:]
with open(log, "a") as f:
    f.write(" ".join(args) + "\\n")
if args[:1] == ["-s"]:
    args = args[2:]
local = lambda p: p.replace("/data/local/tmp", root)
if args[0] == "devices":
    print("List of devices attached")
    print({devices!r})
elif args[0] == "push":
    os.makedirs(os.path.dirname(local(args[2])), exist_ok=True)
    shutil.copy(args[1], local(args[2]))
elif args[0] == "shell":
    sys.exit(subprocess.run([local(a) for a in args[1:]]).returncode)
"""

FAKE_RUNNER = """#!{python}
import os, sys
opts = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
assert os.path.getsize(opts["model_path"]) > 0             # the program was pushed (running it: test_export.py)
print("I 00:00:01 executor_runner.cpp:180] Model executed successfully %s time(s) in 12.5 ms." % opts["num_executions"])
"""


def write_script(path, text, **fmt):
    path.write_text(text.format(python=sys.executable, **fmt))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    def make(devices="emulator-5554\tdevice"):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        log = tmp_path / "adb_calls.txt"
        write_script(bin_dir / "adb", FAKE_ADB, log=str(log), root=str(tmp_path / "device"), devices=devices)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        return log
    return make
