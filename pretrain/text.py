"""Text side of stage 1: the offline default tokenizer and text encoder, or any Hugging Face model.

``model.text_encoder: small-bert`` trains a WordPiece tokenizer on the report corpus with
``tokenizers`` and builds a small randomly initialised BERT from a config, so pretraining works
with no network. Any other value is a local Hugging Face directory or a hub name, loaded with
``AutoTokenizer`` / ``AutoModel`` (``trust_remote_code`` only when the config says so).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mosmos.errors import ConfigError

SMALL_BERT = "small-bert"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """A BERT-style (lower-case WordPiece, [CLS] ... [SEP]) fast tokenizer fitted to ``texts``.

    The vocabulary is the special tokens, every character seen (alone and as a ``##`` continuation,
    so any word can still be spelled) and the most frequent words, ties broken alphabetically.
    We count words with the ``tokenizers`` normaliser and pre-tokeniser but do not use its
    ``WordPieceTrainer``: that breaks frequency ties in hash order, so two runs on the same reports
    got different vocabularies (64-68 of 600 tokens differed here), and no run could be reproduced.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    vocab = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    room = max(0, vocab_size - len(vocab))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:room]
    vocab += words
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_text_side(
    name: str,
    texts: list[str],
    pooling: str = "mean",
    text_kwargs: dict | None = None,
    tokenizer_vocab_size: int = 2000,
    trust_remote_code: bool = False,
    saved_tokenizer: str | Path | None = None,
):
    """(tokenizer, TextEncoder) for ``model.text_encoder``.

    Args:
        name: ``"small-bert"``, a local Hugging Face model directory, or a hub name.
        texts: the training reports (the small-bert tokenizer is trained on them).
        saved_tokenizer: a tokenizer saved by an earlier run (resume, export), reused as is.
    """
    from transformers import AutoTokenizer

    from mosmos.models.text import TextEncoder, build_small_bert

    if name == SMALL_BERT:
        if saved_tokenizer is not None and Path(saved_tokenizer).is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(saved_tokenizer))
        else:
            tokenizer = train_wordpiece_tokenizer(texts, tokenizer_vocab_size)
        kwargs = {"max_position_embeddings": 512, **(text_kwargs or {})}
        bert = build_small_bert(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **kwargs)
        return tokenizer, TextEncoder(bert, pooling=pooling)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        encoder = TextEncoder.from_pretrained(name, pooling=pooling, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ConfigError(
            f"model.text_encoder={name!r}: not a local Hugging Face model directory and not loadable "
            f"from the hub ({str(exc).splitlines()[0]}); use {SMALL_BERT!r} for the offline default"
        ) from None
    return tokenizer, encoder
