r"""
Tiny shakespeare with OpenAI's GPT-2 BPE (tiktoken): 50257 tokens in the vocabulary, ~300k training tokens.
Or with the tokenizer of a model to fine-tune, into a folder of its own (--out_dir is then required).

  python data/shakespeare/prepare.py                       # data/tinyshakespeare.txt, shipped with the repo
  python data/shakespeare/prepare.py --input PATH          # or any other text file
  python data/shakespeare/prepare.py --tokenizer=../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \
      --out_dir=data/shakespeare_smollm2                   # then: train.py --dataset=shakespeare_smollm2
--tokenizer takes what train.py's --init_from takes: our checkpoint, a Hugging Face dir or hub id, a .gguf file.
tiktoken fetches its BPE files on first use; offline, set TIKTOKEN_CACHE_DIR to a folder holding them.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prepare_common import (TOKENIZER_HELP, ctrl_c_is_one_line, output_dir, shakespeare_text,  # noqa: E402
                            source_tokenizer, split_text, write_dataset)


def prepare(input_path=None, out_dir=Path(__file__).parent, tokenizer="gpt2"):
    text = shakespeare_text(input_path)
    write_dataset(out_dir, source_tokenizer(tokenizer), *split_text(text))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="another text file (default: data/tinyshakespeare.txt)")
    parser.add_argument("--tokenizer", default="gpt2", help=TOKENIZER_HELP)
    parser.add_argument("--out_dir", help="where to write the .bin files (default: this folder, for gpt2)")
    args = parser.parse_args()
    with ctrl_c_is_one_line("data/shakespeare/prepare.py"):
        prepare(args.input, output_dir(args.out_dir, args.tokenizer, Path(__file__).parent), args.tokenizer)
