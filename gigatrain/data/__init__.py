"""gigatrain's data layer: tokenizers, `prepare` (text -> token shards) and loaders.

    from gigatrain.data.prepare import prepare
    prepare(["corpus/"], Path("data/corpus"))        # text -> data/corpus/*.bin + manifest.json
    data = TokenData(Path("data/corpus"))            # verifies and memory-maps the shards
    loader = BatchLoader(data.split("train"), seq_len=256, global_batch=32, seed=0)
    inputs, targets = loader.next_batch()            # int64 [32, 256] each
"""

from gigatrain.data.errors import DataError
from gigatrain.data.tokenizers import (
    Tokenizer,
    from_tokenizer_json,
    load_tokenizer,
    make_tokenizer,
    train_bpe,
)
# `gigatrain.data.prepare` stays the module (not shadowed by its function, which would
# break `import gigatrain.data.prepare as m` and monkeypatching): call the function as
# `from gigatrain.data.prepare import prepare`.
from gigatrain.data.prepare import default_corpus_files, ensure_default_data
from gigatrain.data.loader import BatchLoader, TokenData, TokenSplit, eval_batches

__all__ = [
    "DataError",
    "Tokenizer",
    "from_tokenizer_json",
    "load_tokenizer",
    "make_tokenizer",
    "train_bpe",
    "default_corpus_files",
    "ensure_default_data",
    "TokenData",
    "TokenSplit",
    "BatchLoader",
    "eval_batches",
]
