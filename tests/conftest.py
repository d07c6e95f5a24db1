import os
from pathlib import Path

import pytest

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
