"""Text corpus -> the model's tokenizer -> token files on disk -> memory-mapped training batches.

A prepared data directory (`odyssey prepare-data CORPUS --out DIR`) holds:

    tokenizer.json ...        the tokenizer's files as they came (the model's own: a checkpoint
                              folder's, a store's), or for a tokenizer trained here a byte-level BPE
                              (GPT-2 byte-to-unicode tokens + merges) with tokenizer_config.json and
                              special_tokens_map.json: <unk> = 0, <s> = 1 (bos), </s> = 2 (eos);
                              `transformers.AutoTokenizer.from_pretrained(DIR)` loads either
    train.bin, val.bin        raw token ids, little-endian uint16 (vocab <= 65535) or uint32, no header:
                              every document is stored as tokenizer(text)["input_ids"] (a BOS first
                              only where the tokenizer adds one) then the tokenizer's EOS, and
                              documents follow each other, so a window that crosses documents sees
                              the boundary
    manifest.json             written last: format, dtype, vocab, special ids, layout, tokens and
                              documents per split, sources, sha256 of tokenizer.json

Documents go to train or val whole (a seeded random choice of documents, at least one in val).
Nothing holds all token ids in RAM: documents are encoded in batches and appended to the files,
and training reads them back through `np.memmap`. Every file is written under a temporary name
and renamed; the manifest comes last, so a directory without one is unfinished.

Conversations (chat, completions and alpaca data) are stored in the examples layout instead:
per split S.bin, S.mask (a uint8 loss mask per token) and S.idx (example offsets), each example
rendered by its chat template (see examples.py and templates.py).

    corpus.py     reading documents from .txt / .jsonl / .json / .parquet / .csv files
    formats.py    records of .jsonl / .json / .parquet / .csv files: chat, completions, alpaca, text
    templates.py  chat templates (transformers' apply_chat_template), end-of-turn ids, loss masks
    tokens.py     the token files and manifest: format, writer, reader (`TokenData`), unigram baseline
    sampler.py    batches of windows (`Batch`: x, y; positions, segments for examples): `BatchSampler`,
                  `eval_batches`
    prepare.py    `prepare_data`, the whole job of `odyssey prepare-data`; examples.py: its examples
                  layout; modelstore.py: the --model store it prepares data for
The tokenizer itself (training, loading, special tokens) is `odyssey.tokenizer`.
"""

from odyssey.data.corpus import read_documents
from odyssey.data.prepare import prepare_data
from odyssey.data.sampler import IGNORE, Batch, BatchSampler, eval_batches
from odyssey.data.tokens import TokenData, token_dtype, unigram_loss

__all__ = [
    "IGNORE",
    "Batch",
    "BatchSampler",
    "TokenData",
    "eval_batches",
    "prepare_data",
    "read_documents",
    "token_dtype",
    "unigram_loss",
]
