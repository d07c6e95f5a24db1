"""
Tiny shakespeare with OpenAI's GPT-2 BPE (tiktoken): 50257 tokens in the vocabulary, ~300k training tokens.

  python data/shakespeare/prepare.py                       # downloads input.txt (karpathy/char-rnn)
  python data/shakespeare/prepare.py --input PATH          # or use a local copy of it
tiktoken fetches its BPE files on first use; offline, set TIKTOKEN_CACHE_DIR to a folder holding them.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prepare_common import split_text, text_from_source, write_dataset  # noqa: E402
from tokenizer import tiktoken_tokenizer  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def prepare(input_path=None, out_dir=Path(__file__).parent):
    text = text_from_source(input_path, URL, Path(out_dir) / "input.txt")
    write_dataset(out_dir, tiktoken_tokenizer("gpt2"), *split_text(text))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="local copy of tinyshakespeare's input.txt (no download)")
    parser.add_argument("--out_dir", default=str(Path(__file__).parent), help="where to write the .bin files")
    args = parser.parse_args()
    prepare(args.input, args.out_dir)
