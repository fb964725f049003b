"""Captions -> token ids: a byte-level BPE tokenizer trained on the shards' own captions.

CLIP's recipe (lower-cased byte-pair encoding, a fixed context with start and end tokens)
with the `tokenizers` library; no download is possible at run time, so the vocabulary is
learnt from the training captions (``megabatch data tokenizer``) and saved as one
``tokenizer.json`` that ``transformers.PreTrainedTokenizerFast`` can also load.

Every encoded caption is ``<|startoftext|> tokens... <|endoftext|> <pad>...`` of exactly
``context_length`` ids: too long captions are truncated *before* the end token, so the
end token, whose final activation is the text feature, is always present.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

from megabatch.data_pipeline.read.shard_stream import OVERSIZED, RateLimitedWarnings, read_shard
from megabatch.data_pipeline.shard_format import CAPTION_EXTENSIONS
from megabatch.data_pipeline.shard_specs import resolve_sources

PAD, SOT, EOT = "<pad>", "<|startoftext|>", "<|endoftext|>"
# ids 0, 1, 2. The end token must not be id 2: transformers' CLIP text tower reads an
# eos_token_id of 2 as a legacy config and pools at argmax(input_ids) instead of at the
# end token.
SPECIAL_TOKENS = [PAD, EOT, SOT]
DEFAULT_CONTEXT_LENGTH = 77


class CaptionTokenizer:
    """Encode captions to (B, context_length) int64 ids and a boolean attention mask."""

    def __init__(self, tokenizer: Tokenizer, context_length: int = DEFAULT_CONTEXT_LENGTH):
        if context_length < 3:
            raise ValueError(
                f"context_length must be >= 3 (start, one token, end), got {context_length}"
            )
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_id = tokenizer.token_to_id(PAD)
        self.sot_id = tokenizer.token_to_id(SOT)
        self.eot_id = tokenizer.token_to_id(EOT)
        if None in (self.pad_id, self.sot_id, self.eot_id):
            raise ValueError(f"tokenizer lacks the special tokens {SPECIAL_TOKENS}")
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{SOT} $A {EOT}", special_tokens=[(SOT, self.sot_id), (EOT, self.eot_id)]
        )
        tokenizer.enable_truncation(max_length=context_length)
        # Batches are encoded bare (no padding, no start and end tokens) straight into a
        # padded array, which gets the start and end tokens from NumPy: building the
        # padded encodings' Python ints and running the template post-processor cost a
        # good part of the encoding time (docs/benchmarks-data.md, "Measurements").
        self._bare = Tokenizer.from_str(tokenizer.to_str())
        self._bare.no_padding()  # a loaded tokenizer.json pads already
        self._bare.post_processor = None
        # Room for the start and end tokens: the truncation the template implies.
        self._bare.enable_truncation(max_length=context_length - 2)
        # The saved file (and transformers' view of it) pads, like __call__'s result.
        tokenizer.enable_padding(length=context_length, pad_id=self.pad_id, pad_token=PAD)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) int64 and mask (B, L) bool, True on real tokens (start and end too)."""
        ids = torch.empty((len(captions), self.context_length), dtype=torch.long)
        mask = torch.empty(ids.shape, dtype=torch.bool)
        self.encode_into(captions, ids.numpy(), mask.numpy())
        return ids, mask

    def encode_into(self, captions: list[str], ids: np.ndarray, mask: np.ndarray) -> None:
        """``__call__`` writing into given (B, L) int64 ``ids`` and bool ``mask`` arrays
        (the loader's shared batch buffer)."""
        # encode_batch_fast: the same ids, without the character offsets we never read.
        encodings = self._bare.encode_batch_fast(list(captions))
        lengths = np.empty(len(encodings), dtype=np.int64)  # tokens of each caption, T
        ids.fill(self.pad_id)
        ids[:, 0] = self.sot_id
        for row, encoding in enumerate(encodings):
            n = lengths[row] = len(encoding.ids)
            ids[row, 1 : n + 1] = encoding.ids
        ids[np.arange(len(encodings)), lengths + 1] = self.eot_id
        # Row r is <start> T tokens <end> <pad>...: the mask is True on its first T + 2.
        np.less(np.arange(self.context_length), lengths[:, None] + 2, out=mask)

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        """Atomic: a half-written tokenizer.json never replaces a good one."""
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        self.tokenizer.save(str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer file at {path} (build it with `megabatch data tokenizer`)"
            )
        return cls(Tokenizer.from_file(str(path)), context_length)

    @classmethod
    def train(
        cls,
        captions: Iterable[str],
        vocab_size: int = 8192,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        min_frequency: int = 2,
    ) -> CaptionTokenizer:
        """Learn a byte-level BPE vocabulary from captions (lower-cased, NFC)."""
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            # Every byte is in the vocabulary, so no caption is ever out of vocabulary.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        seen = 0

        def counted(items):
            nonlocal seen
            for caption in items:
                seen += 1
                yield caption

        tokenizer.train_from_iterator(counted(captions), trainer=trainer)
        if seen == 0:
            raise ValueError("no captions to train the tokenizer on")
        return cls(tokenizer, context_length)


def captions_from_shards(spec) -> Iterable[str]:
    """Every caption (``txt``, ``text`` or ``caption`` member) of a shard specification,
    for training: the captions the loader would train on. A sample whose caption is not
    UTF-8 (``bad_caption``), is empty, or has a member over the member cap
    (``oversized_member``) is skipped, with the loader's rate-limited warnings."""
    warn, skipped = RateLimitedWarnings(), Counter()
    for source in resolve_sources(spec):
        for url, count in zip(source.urls, source.counts, strict=True):
            for sample in read_shard(url, warn, skipped, count):
                where = f"{url} key {sample['__key__']}"
                if OVERSIZED in sample:
                    skipped["oversized_member"] += 1
                    warn("oversized_member", f"{where}: member {sample[OVERSIZED]} is over "
                         "the member cap, caption skipped")  # fmt: skip
                    continue
                ext = next((e for e in sample if e in CAPTION_EXTENSIONS), None)
                text = sample[ext] if ext else b""
                if not text:
                    continue
                try:
                    caption = text.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    skipped["bad_caption"] += 1
                    warn("bad_caption", f"{where}: caption is not UTF-8 ({exc}), skipped")
                    continue
                if caption:
                    yield caption
