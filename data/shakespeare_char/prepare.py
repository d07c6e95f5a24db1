"""
Tiny shakespeare (1.1 MB of plays) at the character level: 65 symbols, 1M training tokens.

  python data/shakespeare_char/prepare.py                       # downloads input.txt (karpathy/char-rnn)
  python data/shakespeare_char/prepare.py --input PATH          # or use a local copy of it
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prepare_common import split_text, text_from_source, write_dataset  # noqa: E402
from tokenizer import char_tokenizer  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def prepare(input_path=None, out_dir=Path(__file__).parent):
    text = text_from_source(input_path, URL, Path(out_dir) / "input.txt")
    tokenizer = char_tokenizer("".join(sorted(set(text))))
    print(f"{len(text):,} characters, vocabulary of {tokenizer.vocab_size}")
    write_dataset(out_dir, tokenizer, *split_text(text))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="local copy of tinyshakespeare's input.txt (no download)")
    parser.add_argument("--out_dir", default=str(Path(__file__).parent), help="where to write the .bin files")
    args = parser.parse_args()
    prepare(args.input, args.out_dir)
