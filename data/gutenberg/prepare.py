"""
Public-domain children's books from Project Gutenberg: a larger prose corpus for longer CPU runs.

  python data/gutenberg/prepare.py                               # downloads 10 books from gutenberg.org
  python data/gutenberg/prepare.py --input ../shared/data/gutenberg_children   # folder with train.txt + val.txt
  python data/gutenberg/prepare.py --input book1.txt book2.txt ...             # local books: last 10% validates
  python data/gutenberg/prepare.py --tokenizer=char              # characters instead of GPT-2 BPE (default)
  python data/gutenberg/prepare.py --tokenizer=HuggingFaceTB/SmolLM2-135M-Instruct --out_dir=data/gutenberg_smollm2
--tokenizer=<model> encodes with the tokenizer of a model to fine-tune (what train.py's --init_from takes: our
checkpoint, a Hugging Face dir or hub id, a .gguf file); its data needs an --out_dir of its own.
Downloaded books lose Project Gutenberg's license header and footer (the "*** START/END OF" lines).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prepare_common import (TOKENIZER_HELP, ctrl_c_is_one_line, download, output_dir, read_text,  # noqa: E402
                            source_tokenizer, split_text, write_dataset)
from tokenizer import char_tokenizer  # noqa: E402

BOOK_URL = "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt"
TRAIN_BOOKS = {11: "Alice's Adventures in Wonderland", 12: "Through the Looking-Glass", 16: "Peter Pan",
               55: "The Wonderful Wizard of Oz", 113: "The Secret Garden", 146: "A Little Princess",
               236: "The Jungle Book", 778: "Five Children and It", 14838: "The Tale of Peter Rabbit"}
VAL_BOOKS = {1874: "The Railway Children"}


def strip_gutenberg_header(text):
    """The book between Project Gutenberg's '*** START OF ...' and '*** END OF ...' lines."""
    start, end = text.find("*** START OF"), text.find("*** END OF")
    if start >= 0:
        text = text[text.find("\n", start) + 1:end if end > start else None]
    return text.strip() + "\n"


def download_books(books, cache_dir):
    texts = []
    for book_id, title in books.items():
        path = Path(cache_dir) / f"pg{book_id}.txt"
        if not path.is_file():
            print(f"{title} (Project Gutenberg #{book_id})")
            download(BOOK_URL.format(id=book_id), path)
        texts.append(strip_gutenberg_header(read_text(path)))
    return "\n\n".join(texts)


def texts_from_inputs(inputs):
    """(train, val) text from a folder holding train.txt and val.txt, or from book files."""
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        folder = Path(inputs[0])
        return read_text(folder / "train.txt"), read_text(folder / "val.txt")
    return split_text("\n\n".join(read_text(p) for p in inputs))


def prepare(inputs=None, tokenizer_name="gpt2", out_dir=Path(__file__).parent):
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if inputs:
        train_text, val_text = texts_from_inputs(inputs)
    else:
        train_text, val_text = download_books(TRAIN_BOOKS, out_dir), download_books(VAL_BOOKS, out_dir)
    if tokenizer_name == "char":
        tokenizer = char_tokenizer("".join(sorted(set(train_text) | set(val_text))))
    else:
        tokenizer = source_tokenizer(tokenizer_name)
    print(f"train {len(train_text):,} characters, val {len(val_text):,}; tokenizer {tokenizer.spec['kind']}")
    write_dataset(out_dir, tokenizer, train_text, val_text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="a folder with train.txt and val.txt, or book .txt files")
    parser.add_argument("--tokenizer", default="gpt2", help=f"char (the text's characters), {TOKENIZER_HELP}")
    parser.add_argument("--out_dir", help="where to write the .bin files (default: this folder, for gpt2 and char)")
    args = parser.parse_args()
    out_dir = output_dir(args.out_dir, args.tokenizer, Path(__file__).parent, default_tokenizers=("gpt2", "char"))
    with ctrl_c_is_one_line("data/gutenberg/prepare.py"):
        prepare(args.input, args.tokenizer, out_dir)
