"""Report encoder: any Hugging Face encoder, pooled, optionally frozen with an embedding cache."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoModel, BertConfig, BertModel, PreTrainedModel

__all__ = ["TextEncoder", "build_small_bert"]

POOLINGS = ("cls", "mean")


def build_small_bert(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    pad_token_id: int = 0,
) -> BertModel:
    """A small randomly initialised BERT (Devlin et al., NAACL 2019): the offline text encoder.

    Built from a ``BertConfig`` (nothing is downloaded) and without BERT's pooler, which
    :class:`TextEncoder` does not use (an unused layer would get no gradient under DDP).

    Example::

        bert = build_small_bert(vocab_size=2000)
        text = TextEncoder(bert, pooling="mean")
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be >= 1")
    if hidden_size < 1 or num_heads < 1 or hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be a positive multiple of num_heads={num_heads}")
    if num_layers < 1 or intermediate_size < 1 or max_position_embeddings < 1:
        raise ValueError(
            f"num_layers={num_layers}, intermediate_size={intermediate_size} and "
            f"max_position_embeddings={max_position_embeddings} must be >= 1"
        )
    if not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"pad_token_id={pad_token_id} must be in [0, vocab_size={vocab_size})")
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
    )
    return BertModel(config, add_pooling_layer=False)


class TextEncoder(nn.Module):
    """Pools a Hugging Face encoder's token states into one report embedding.

    The projection into the shared image-report space lives in the pretraining model, not here:
    with a frozen encoder the cache then holds the (fixed) pooled states while the projection keeps
    training, as in LiT (Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning",
    CVPR 2022, here with the text side locked). Tokenisation happens on the data side.

    Args:
        model: a built ``transformers.PreTrainedModel`` returning ``last_hidden_state``.
        pooling: ``"cls"`` (first token's state) or ``"mean"`` (mean over non-padding tokens).

    Attributes:
        output_dim: size of the pooled embedding (the model's hidden size).

    Example::

        text = TextEncoder.from_pretrained("path/to/bert", pooling="mean")
        text.freeze()
        emb = text(input_ids, attention_mask, cache_keys=["case_001", "case_002"])  # [2, output_dim]
    """

    def __init__(self, model: PreTrainedModel, pooling: Literal["cls", "mean"] = "cls") -> None:
        super().__init__()
        if not isinstance(model, PreTrainedModel):
            raise ValueError(f"model must be a transformers.PreTrainedModel, got {type(model).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
        hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model", None)
        if hidden is None:
            raise ValueError(f"cannot read the hidden size of {type(model).__name__} from its config")
        self.model = model
        self.pooling = pooling
        self.output_dim = int(hidden)
        self.frozen = False
        self._cache: dict[Hashable, torch.Tensor] = {}
        # Pretrained BERT-like checkpoints carry a pooler (dense + tanh on [CLS]) that we never call;
        # left trainable it would get no gradient, which DistributedDataParallel rejects.
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        pooling: Literal["cls", "mean"] = "cls",
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> TextEncoder:
        """Load ``AutoModel.from_pretrained(name_or_path, ...)`` from a local directory or hub name.

        ``trust_remote_code`` is passed on exactly as given; ``kwargs`` go to ``AutoModel``.
        """
        model = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
        return cls(model, pooling=pooling)

    def freeze(self) -> TextEncoder:
        """Stop training the text model (no gradients, eval mode) and start caching embeddings."""
        self.frozen = True
        self.model.requires_grad_(False)
        self.model.eval()
        return self

    def unfreeze(self) -> TextEncoder:
        """Train the text model again and drop the cache (its entries would go stale)."""
        self.frozen = False
        self.model.requires_grad_(True)
        pooler = getattr(self.model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        self.clear_cache()
        return self.train(self.training)

    def clear_cache(self) -> None:
        """Forget every cached report embedding."""
        self._cache.clear()

    @property
    def cache_size(self) -> int:
        """Number of cached report embeddings."""
        return len(self._cache)

    def train(self, mode: bool = True) -> TextEncoder:
        # A frozen text model stays in eval mode (no dropout) when the parent calls .train(),
        # so cached and freshly computed embeddings agree.
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled token states ``[B, output_dim]``, without the cache."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weight = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache_keys: Sequence[Hashable] | None = None,
    ) -> torch.Tensor:
        """Report embeddings ``[B, output_dim]``.

        Args:
            input_ids: ``[B, L]`` token ids.
            attention_mask: ``[B, L]``, 1 for tokens and 0 for padding (all ones when None).
            cache_keys: one hashable per report that identifies its text (e.g. the scan name
                and a hash of the report). Used only when frozen: reports seen before are read
                from the cache, the others are encoded once and stored.
        """
        if not self.frozen or cache_keys is None:
            if self.frozen:
                with torch.no_grad():
                    return self.encode(input_ids, attention_mask)
            return self.encode(input_ids, attention_mask)
        if len(cache_keys) != input_ids.shape[0]:
            raise ValueError(f"got {len(cache_keys)} cache_keys for a batch of {input_ids.shape[0]} reports")
        missing = [i for i, key in enumerate(cache_keys) if key not in self._cache]
        if missing:
            rows = torch.as_tensor(missing, device=input_ids.device)
            mask = None if attention_mask is None else attention_mask[rows]
            with torch.no_grad():
                new = self.encode(input_ids[rows], mask)
            for i, emb in zip(missing, new, strict=True):
                self._cache[cache_keys[i]] = emb.detach().clone()
        return torch.stack([self._cache[key] for key in cache_keys]).to(input_ids.device)
