"""The Python API over both stages: ``mosmos.from_pretrained``, ``mosmos export`` and ``mosmos info``.

:func:`from_pretrained` loads a ``mosmos export`` folder (or a run directory itself) into a
:class:`Pretrained`. The export itself (:func:`export_run`, the folder's layout) is in
:mod:`mosmos.api_export` and ``mosmos info`` (:func:`run_info`, :func:`format_info`) in
:mod:`mosmos.api_info`; both are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mosmos.api_export import FORMAT, _pretrained_config, export_run, run_kind
from mosmos.api_info import format_info, run_info
from mosmos.errors import ConfigError

__all__ = ["FORMAT", "Pretrained", "export_run", "format_info", "from_pretrained", "run_info"]


@dataclass
class Pretrained:
    """What :func:`from_pretrained` returns; ``model`` is in eval mode on the requested device.

    Stage 1 (``kind="encoder"``): ``model`` is a :class:`mosmos.models.MosmosPretrainModel` (its
    ``forward`` gives ``image_emb``, ``text_emb``, ``tag_logits``, ``attn_maps``), with the tokenizer.
    Stage 2 (``kind="segmenter"``): ``model`` is the segmentation network, ``spec`` its ``model.json``.
    """

    kind: str  # "encoder" (stage 1) or "segmenter" (stage 2)
    model: Any  # torch.nn.Module, weights loaded
    organs: list[str]  # tag order (stage 1) or output channel order (stage 2)
    preprocess: Any  # mosmos.transforms.PreprocessConfig of the model's inputs
    config: dict[str, Any] = field(default_factory=dict)  # config.json (or the run's records)
    tokenizer: Any = None  # stage 1 with a text tower
    spec: Any = None  # stage 2: mosmos.finetune.inference.ModelSpec

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def load_image(self, path: str | Path) -> tuple[Any, Any]:
        """``(image, body_mask)``, each ``[1, 1, *S]`` on the model's device: a NIfTI volume
        prepared as the model's inputs were (RAS, spacing, HU window, body crop, size)."""
        import torch

        from mosmos.transforms import BODY_MASK_KEY, build_preprocess

        item = build_preprocess(self.preprocess, ("image",))({"image": str(path)})
        image = _plain(item["image"]).float()[None].to(self.device)
        mask = torch.as_tensor(_plain(item[BODY_MASK_KEY])).float()[None].to(self.device)
        return image, mask

    def encode_image(self, image: Any, mask: Any = None) -> Any:
        """L2-normalised image embeddings ``[B, E]`` (stage 1)."""
        import torch

        self._need("encoder", "encode_image")
        with torch.no_grad():
            return self.model.encode_image(image, mask)

    def encode_text(self, reports: Sequence[str]) -> Any:
        """L2-normalised report embeddings ``[B, E]`` (stage 1 with a text tower)."""
        import torch

        self._need("encoder", "encode_text")
        if self.tokenizer is None:
            raise ConfigError("this stage 1 model has no text tower (trained without reports' embedding)")
        max_length = (self.config.get("encoder", {}).get("text") or {}).get("max_length", 512)
        batch = self.tokenizer(
            list(reports), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        with torch.no_grad():
            return self.model.encode_text(
                batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            )

    def segment(self, path: str | Path, task: str | None = None, overlap: float = 0.25) -> Any:
        """uint8 label map (0 background, k = ``organs[k-1]``) of a NIfTI volume, in its own voxel
        grid (stage 2)."""
        from mosmos.finetune.inference import Predictor, decode_probabilities

        self._need("segmenter", "segment")
        predictor = Predictor(self.model, self.spec, self.device, overlap=overlap)
        probs, _ = predictor.probabilities(path, task=self.spec.task_index(task))
        return decode_probabilities(probs, self.spec.strategy)

    def _need(self, kind: str, method: str) -> None:
        if self.kind != kind:
            raise ConfigError(
                f"{method} needs a {kind} (stage {1 if kind == 'encoder' else 2}); this is a {self.kind}"
            )


def _text_tower(text_dir: Path, record: dict[str, Any]) -> tuple[Any, Any]:
    """(tokenizer, TextEncoder) of an export's text folder, built as stage 1 built them."""
    from safetensors.torch import load_file

    from mosmos.pretrain.text import SMALL_BERT, build_text_side

    weights = text_dir / "model.safetensors"
    if not (text_dir / "config.json").is_file():
        raise ConfigError(f"{text_dir}: the text tower the export records is missing (no config.json)")
    name, pooling = record.get("name"), record.get("pooling", "cls")
    try:
        if name != SMALL_BERT:  # a Hugging Face model: its saved folder loads as any other
            return build_text_side(str(text_dir), [], pooling=pooling)
        # the small BERT has no pooler; AutoModel would add a random one (and say so)
        tokenizer, text_encoder = build_text_side(
            SMALL_BERT, [], pooling=pooling, text_kwargs=record.get("kwargs"), saved_tokenizer=text_dir
        )
        text_encoder.model.load_state_dict(load_file(str(weights)))
    except (OSError, RuntimeError, ValueError) as err:
        raise ConfigError(f"{text_dir}: cannot load the text tower: {str(err).splitlines()[0]}") from None
    return tokenizer, text_encoder


def _plain(x: Any) -> Any:
    """A MetaTensor's plain tensor (embeddings of plain tensors are plain)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def _stage1_model(path: Path, device: Any) -> Pretrained:
    from mosmos.export import load_encoder
    from mosmos.models.pretrain_model import MosmosPretrainModel

    loaded = load_encoder(path, device)
    meta = loaded.export
    text_encoder = tokenizer = None
    if meta.text is not None:
        tokenizer, text_encoder = _text_tower(path / meta.text.get("dir", "text"), meta.text)
    has_text = text_encoder is not None and "image" in loaded.projections
    temperature = meta.temperature or 0.07
    model = MosmosPretrainModel(
        loaded.encoder,
        text_encoder if has_text else None,
        embed_dim=meta.projections["image"]["out_dim"] if has_text else loaded.encoder.embed_dim,
        num_tags=len(meta.organs) if loaded.tag_head is not None else 0,
        tag_head_config=loaded.tag_head.config if loaded.tag_head is not None else None,
        init_temperature=temperature,
        max_logit_scale=max(100.0, 2.0 / temperature),
        embedding_from_tags=bool(meta.objective.get("embedding_from_tags")) and has_text,
    )
    # the modules the export holds replace the fresh ones the constructor built
    if loaded.tag_head is not None:
        model.tag_head = loaded.tag_head
    if has_text:
        model.image_proj, model.text_proj = loaded.projections["image"], loaded.projections["text"]
    config = _pretrained_config(path) or {"kind": "encoder", "encoder": meta.to_dict()}
    pre = loaded.preprocess.to_config() if loaded.preprocess is not None else None
    return Pretrained(
        "encoder",
        model.to(device).eval(),
        list(meta.organs),
        pre,
        config,
        tokenizer=tokenizer if has_text else None,
    )


def from_pretrained(path: str | Path, device: str = "cpu") -> Pretrained:
    """Load a ``mosmos export`` folder, or a stage 1 or stage 2 run directory.

    Args:
        path: the folder.
        device: where the model goes (``cpu``, ``cuda``, ``cuda:1`` ...).

    Returns:
        A :class:`Pretrained`: the model with its weights, organs, preprocessing and (stage 1) tokenizer.

    Raises:
        ConfigError: naming the file and the problem, for a folder that is none of these.

    Example::

        m = mosmos.from_pretrained("exports/stage1")
        image, mask = m.load_image("ct.nii.gz")
        similarity = m.encode_image(image, mask) @ m.encode_text(["No focal liver lesion."]).T
    """
    path = Path(path)
    kind = run_kind(path)
    if kind == "export":
        kind = _pretrained_config(path)["kind"]
    if kind == "encoder":
        return _stage1_model(path, device)
    from mosmos.finetune.inference import load_model
    from mosmos.transforms import PreprocessConfig

    model, spec = load_model(path, device)
    config = _pretrained_config(path) or {"kind": "segmenter", "segmenter": spec.to_dict()}
    return Pretrained(
        "segmenter", model, list(spec.organs), PreprocessConfig.from_dict(spec.preprocess), config, spec=spec
    )
