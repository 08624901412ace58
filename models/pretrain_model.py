"""Stage 1 model: image encoder + report encoder + pixel-tag attention (MOSMOS pretraining)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mosmos.models.encoders.base import ImageEncoder
from mosmos.models.tag_head import TagAttentionHead, TagHeadConfig
from mosmos.models.text import TextEncoder

__all__ = ["MosmosPretrainModel", "ProjectionHead"]


class ProjectionHead(nn.Module):
    """Two-layer MLP projection into the joint space (ConVIRT, Zhang et al., MLHC 2022)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        hidden = max(in_dim, out_dim)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MosmosPretrainModel(nn.Module):
    """Report-supervised pretraining model (Tian et al., "MOSMOS: Multi-organ segmentation facilitated
    by medical report supervision", arXiv:2409.02418): a CLIP-style image-report alignment of pooled
    embeddings plus multi-label organ recognition through pixel-tag attention on a fine feature map.

    Args:
        image_encoder: any :class:`ImageEncoder`.
        text_encoder: a :class:`TextEncoder`, or None for the tags-only ablation (then there is no
            projection nor temperature, and ``image_emb`` is the normalised pooled encoder output).
        embed_dim: joint image-report embedding size.
        num_tags: organ tags (pixel-tag attention queries); 0 disables the tag branch (contrastive-
            only ablation: no ``tag_logits`` / ``attn_maps`` in the output).
        tag_head_config: the tag head's settings (:class:`TagHeadConfig`; default: its tuned
            defaults); ``queries`` is the caller's business (pass ``query_init`` or not).
        query_init: optional ``[num_tags, text_dim]`` initial tag queries (e.g. organ-name embeddings).
        init_temperature: initial softmax temperature of the contrastive logits.
        max_logit_scale: clamp of the learnable inverse temperature (CLIP uses 100).
        num_outputs: logits per tag (e.g. visible, abnormal).
        image_embedding_grad: share of the image embedding's gradient that reaches the encoder.
        embedding_from_tags: the image embedding's projection reads the tag logits as well as the
            pooled features.

    Example::

        encoder = create_image_encoder("rescnn3d")
        text = TextEncoder(build_small_bert(vocab_size=2000), pooling="mean")
        model = MosmosPretrainModel(encoder, text, embed_dim=128, num_tags=12)
        out = model(image, mask, input_ids=ids, attention_mask=am)
        # image_emb [B,128], text_emb [B,128], logit_scale [], tag_logits [B,12,2], attn_maps [B,12,*]
    """

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder | None,
        embed_dim: int = 128,
        num_tags: int = 0,
        tag_head_config: TagHeadConfig | None = None,
        query_init: torch.Tensor | None = None,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        num_outputs: int = 2,
        image_embedding_grad: float = 1.0,
        embedding_from_tags: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(image_encoder, ImageEncoder):
            raise ValueError(f"image_encoder must be an ImageEncoder, got {type(image_encoder).__name__}")
        if text_encoder is not None and not isinstance(text_encoder, TextEncoder):
            raise ValueError(f"text_encoder must be a TextEncoder or None, got {type(text_encoder).__name__}")
        if embed_dim < 1:
            raise ValueError(f"embed_dim={embed_dim} must be >= 1")
        if num_tags < 0:
            raise ValueError(f"num_tags={num_tags} must be >= 0")
        if text_encoder is None and num_tags == 0:
            raise ValueError("text_encoder=None and num_tags=0 leaves nothing to train")
        if not init_temperature > 0:
            raise ValueError(f"init_temperature={init_temperature} must be > 0")
        if max_logit_scale < 1.0 / init_temperature:
            raise ValueError(
                f"max_logit_scale={max_logit_scale} is below the initial scale 1/init_temperature="
                f"{1.0 / init_temperature:g}"
            )
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.embed_dim = embed_dim
        self.num_tags = num_tags
        self.max_log_scale = math.log(max_logit_scale)
        if not 0.0 <= image_embedding_grad <= 1.0:
            raise ValueError(f"image_embedding_grad={image_embedding_grad} must be in [0, 1]")
        # Share of the image-embedding gradient (contrastive, embedding tags) that reaches the encoder.
        # 0 locks the encoder to what the tag heads teach it (LiT: Zhai et al., CVPR 2022) while the
        # projections and the text tower still align; a text tower trained from scratch otherwise
        # pushes the encoder towards noise early on (measured: present-tag AUROC 0.65 vs 0.88).
        self.image_embedding_grad = image_embedding_grad

        if embedding_from_tags and not (num_tags and text_encoder is not None):
            raise ValueError("embedding_from_tags needs a tag branch (num_tags > 0) and a text encoder")
        # The image embedding may also read the tag head's logits: what the report says organ by organ
        # (status, findings) is then in the embedding the report is matched with, instead of having to
        # be re-learned from the pooled features by the projection alone.
        self.embedding_from_tags = embedding_from_tags
        if text_encoder is not None:
            # Both projections exist only with a text side: unused parameters break DDP.
            proj_in = image_encoder.embed_dim + (num_tags * num_outputs if embedding_from_tags else 0)
            self.image_proj = ProjectionHead(proj_in, embed_dim)
            self.text_proj = ProjectionHead(text_encoder.output_dim, embed_dim)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        if num_tags:
            self.tag_head = TagAttentionHead.for_encoder(
                image_encoder, num_tags, tag_head_config, num_outputs=num_outputs, query_init=query_init
            )
            self.attn_stride = image_encoder.feature_strides[self.tag_head.level]

    def _embedding_input(self, pooled: torch.Tensor, tag_logits: torch.Tensor | None) -> torch.Tensor:
        """What the image projection reads: the pooled features, plus the tag logits with
        ``embedding_from_tags``."""
        if not self.embedding_from_tags:
            return pooled
        return torch.cat([pooled, tag_logits.flatten(1)], dim=1)

    def _image_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.text_encoder is not None:
            pooled = self.image_proj(pooled)
        return F.normalize(pooled, dim=-1)

    def _require_tags(self) -> TagAttentionHead:
        if not self.num_tags:
            raise ValueError("this model has no tag branch (num_tags=0)")
        return self.tag_head

    def tag_attention_config(self) -> dict[str, Any]:
        """The tag head's record (``TagAttentionHead.from_config(record)`` rebuilds it), for export."""
        return self._require_tags().head_config()

    def tag_attention_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the tag head (level fusion, queries, attention, per-tag classifiers), for export."""
        return self._require_tags().state_dict()

    def encode_image(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised image embedding ``[B, E]`` (joint space; pooled features without text)."""
        enc = self.image_encoder(image, mask)
        logits = self.tag_head(enc["features"], mask)[0] if self.embedding_from_tags else None
        return self._image_embedding(self._embedding_input(enc["pooled"], logits))

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache_keys: list | None = None,
    ) -> torch.Tensor:
        """L2-normalised report embedding ``[B, embed_dim]``."""
        if self.text_encoder is None:
            raise ValueError("this model has no text encoder (text_encoder=None)")
        pooled = self.text_encoder(input_ids, attention_mask, cache_keys=cache_keys)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_cache_keys: list | None = None,
    ) -> dict[str, Any]:
        """Embeddings, temperature, tag logits and pixel-tag attention maps.

        Args:
            image: ``[B, C, *spatial]``.
            mask: optional ``[B, 1, *spatial]`` body mask: restricts pooling and attention.
            input_ids, attention_mask: tokenised reports ``[B, L]`` (no ``text_emb`` when None).
            text_cache_keys: report identities for the frozen text encoder's cache.

        Returns:
            ``image_emb [B, E]`` and the encoder's ``pooled`` features; ``text_emb [B, E]`` and ``logit_scale`` (scalar, exponentiated and
            clamped) when there is text; ``tag_logits [B, T, K]``, ``attn_maps [B, T, *attn_spatial]``
            and ``attn_stride`` when ``num_tags > 0``.
        """
        enc = self.image_encoder(image, mask)
        out: dict[str, Any] = {"pooled": enc["pooled"]}
        if self.num_tags:
            out["tag_logits"], out["attn_maps"] = self.tag_head(enc["features"], mask)
            out["attn_stride"] = self.attn_stride
        pooled = self._embedding_input(enc["pooled"], out.get("tag_logits"))
        if self.image_embedding_grad < 1.0:
            g = self.image_embedding_grad
            pooled = pooled * g + pooled.detach() * (1.0 - g)  # same value, scaled gradient
        out["image_emb"] = self._image_embedding(pooled)
        if self.text_encoder is not None:
            out["logit_scale"] = self.logit_scale.clamp(max=self.max_log_scale).exp()
            if input_ids is not None:
                out["text_emb"] = self.encode_text(input_ids, attention_mask, text_cache_keys)
        return out

    def attention_maps(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None = None,
        output_size: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Pixel-tag attention maps ``[B, T, *output_size]`` upsampled (linear) to the input size by default.

        Upsampled maps are for display and transfer: they no longer sum to 1. With a mask, values
        outside the (resized) mask are set to 0.
        """
        head = self._require_tags()
        _, attn = head(self.image_encoder.forward_features(image), mask)
        size = tuple(output_size) if output_size is not None else tuple(image.shape[2:])
        mode = {2: "bilinear", 3: "trilinear"}[attn.ndim - 2]
        maps = F.interpolate(attn, size=size, mode=mode, align_corners=False)
        if mask is not None:
            inside = F.interpolate(mask.float(), size=size, mode="nearest-exact") > 0
            maps = maps * inside.to(maps.dtype)
        return maps
