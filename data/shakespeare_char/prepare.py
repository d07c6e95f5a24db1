"""
Tiny shakespeare (1.1 MB of plays) at the character level: 65 symbols, 1M training tokens.

  python data/shakespeare_char/prepare.py                       # data/tinyshakespeare.txt, shipped with the repo
  python data/shakespeare_char/prepare.py --input PATH          # or any other text file
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prepare_common import ctrl_c_is_one_line, split_text, shakespeare_text, write_dataset  # noqa: E402
from tokenizer import char_tokenizer  # noqa: E402


def prepare(input_path=None, out_dir=Path(__file__).parent):
    text = shakespeare_text(input_path)
    tokenizer = char_tokenizer("".join(sorted(set(text))))
    print(f"{len(text):,} characters, vocabulary of {tokenizer.vocab_size}")
    write_dataset(out_dir, tokenizer, *split_text(text))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="another text file (default: data/tinyshakespeare.txt)")
    parser.add_argument("--out_dir", default=str(Path(__file__).parent), help="where to write the .bin files")
    args = parser.parse_args()
    with ctrl_c_is_one_line("data/shakespeare_char/prepare.py"):
        prepare(args.input, args.out_dir)
