"""The Python API over both stages: ``mosmos.from_pretrained``, ``mosmos export`` and ``mosmos info``.

``mosmos export RUN --output DIR`` writes a self-contained folder in Hugging Face's layout:

- ``config.json``: what the model is (``model_type: mosmos``, :data:`FORMAT`, ``kind``: ``encoder``
  for a stage 1 run, ``segmenter`` for a stage 2 one), its record (``encoder``: what the run's
  ``encoder.json`` holds; ``segmenter``: its ``model.json``), the run's scores, resolved config,
  library versions and commit;
- ``model.safetensors``: the weights (a stage 1 export's are named as in ``encoder.safetensors``:
  encoder, tag head, image and text projections);
- ``text/``: stage 1's text tower and tokenizer (a Hugging Face model folder), so image-report
  retrieval works from the export;
- ``model.json`` (stage 2 only): the network spec again, so ``mosmos predict -m DIR`` and
  ``mosmos evaluate --model DIR`` take the export as they take the run.

:func:`from_pretrained` loads such a folder (or a run directory itself) into a :class:`Pretrained`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mosmos.errors import ConfigError
from mosmos.export import (
    ENCODER_JSON,
    ENCODER_WEIGHTS,
    PRETRAINED_CONFIG,
    PRETRAINED_WEIGHTS,
    read_encoder_export,
)
from mosmos.io import write_json

__all__ = ["FORMAT", "Pretrained", "export_run", "format_info", "from_pretrained", "run_info"]

FORMAT = "mosmos-pretrained-v1"
_SEGMENTER_JSON, _SEGMENTER_WEIGHTS = "model.json", "model.safetensors"
#: Stage 1 scores ``mosmos info`` shows first (every scalar of the final evaluation is recorded).
_STAGE1_HEADLINE = (
    "i2t_R@1",
    "t2i_R@1",
    "i2t_R@5",
    "t2i_R@5",
    "tag_mAP",
    "tag_AUROC",
    "tag_abnormal_AUROC",
    "pointing_game",
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None


def _pretrained_config(path: Path) -> dict[str, Any] | None:
    """``config.json`` of a ``mosmos export`` folder, None for any other folder."""
    cfg_path = path / PRETRAINED_CONFIG
    if not cfg_path.is_file():
        return None
    data = _read_json(cfg_path)
    if not isinstance(data, dict) or data.get("model_type") != "mosmos":
        return None
    if data.get("format") != FORMAT or data.get("kind") not in ("encoder", "segmenter"):
        raise ConfigError(
            f"{cfg_path}: format {data.get('format')!r}, kind {data.get('kind')!r}; expected {FORMAT!r} "
            "of kind 'encoder' or 'segmenter' (export it again with this version of mosmos)"
        )
    return data


def run_kind(path: str | Path) -> str:
    """``"encoder"`` (stage 1 run), ``"segmenter"`` (stage 2 run) or ``"export"`` (``mosmos export``)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such folder (expected a stage 1 or stage 2 run, or an export)")
    if _pretrained_config(path) is not None:
        return "export"
    if (path / ENCODER_JSON).is_file():
        return "encoder"
    if (path / _SEGMENTER_JSON).is_file():
        return "segmenter"
    raise ConfigError(
        f"{path}: neither a stage 1 run ({ENCODER_JSON}), a stage 2 run ({_SEGMENTER_JSON}) nor a "
        f"mosmos export ({PRETRAINED_CONFIG}); a run writes them when it finishes"
    )


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("train/")
    }


def _scores(run: Path, kind: str) -> dict[str, Any]:
    """What the run's ``metrics.json`` says of the weights it exported.

    Stage 2 keeps its best weights by mean validation Dice (``best``); stage 1 exports its last
    ones (``final``), and the epoch that scored the best tag mAP is noted beside them."""
    path = run / "metrics.json"
    if not path.is_file():
        return {}
    metrics = _read_json(path)
    if not isinstance(metrics, dict):
        return {}
    if kind == "segmenter":
        best = metrics.get("best") or metrics.get("final") or {}
        return {"weights": "best mean_dice", **_scalars(best)}
    history = [h for h in metrics.get("history", []) if isinstance(h, dict)]
    scores: dict[str, Any] = {"weights": "final", **_scalars(metrics.get("final") or {})}
    ranked = [h for h in history if isinstance(h.get("tag_mAP"), (int, float))]
    if ranked:
        best = max(ranked, key=lambda h: h["tag_mAP"])
        scores["best_tag_mAP"] = {"value": float(best["tag_mAP"]), "epoch": best.get("epoch")}
    return scores


def _run_config(run: Path) -> dict[str, Any] | None:
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None


def _config_record(run: Path, kind: str) -> dict[str, Any]:
    """``config.json`` of an export of ``run`` (checked: the run's weights load)."""
    from mosmos import __version__

    if kind == "encoder":
        meta, _ = read_encoder_export(run)  # every file and key checked
        record, commit = meta.to_dict(), meta.commit
    else:
        from mosmos.finetune.inference import load_model

        _, spec = load_model(run)  # the spec parses and the weights fit it
        record, commit = spec.to_dict(), spec.extra.get("commit", "")
    versions = run / "versions.json"
    return {
        "model_type": "mosmos",
        "format": FORMAT,
        "kind": kind,
        "mosmos_version": __version__,
        "source": {"run": str(run.resolve()), "commit": commit},
        "scores": _scores(run, kind),
        "run_config": _run_config(run),
        "versions": _read_json(versions) if versions.is_file() else None,
        kind: record,
    }


def export_run(run: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write ``run`` (a finished stage 1 or stage 2 run) as a self-contained folder ``output``.

    The folder is built beside ``output`` and renamed into place, so a failed export leaves nothing.

    Raises:
        ConfigError: ``run`` is no finished run (or is already an export), its files do not load,
            or ``output`` exists and is not empty (without ``overwrite``).
    """
    run, output = Path(run), Path(output)
    kind = run_kind(run)
    if kind == "export":
        raise ConfigError(f"{run} is already a mosmos export; copy the folder instead")
    if output.resolve() == run.resolve() or run.resolve() in output.resolve().parents:
        raise ConfigError(f"--output {output} is inside the run {run}; choose a folder outside it")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise ConfigError(
            f"--output {output} exists and is not empty; choose another folder or pass --overwrite"
        )
    config = _config_record(run, kind)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        if kind == "encoder":
            shutil.copyfile(run / ENCODER_WEIGHTS, tmp / PRETRAINED_WEIGHTS)
            text = config["encoder"].get("text")
            if text is not None:
                src = run / text.get("dir", "text")
                if not (src / "config.json").is_file():
                    raise ConfigError(f"{src}: the run's text tower is missing (no config.json)")
                shutil.copytree(src, tmp / text.get("dir", "text"))
        else:
            shutil.copyfile(run / _SEGMENTER_WEIGHTS, tmp / PRETRAINED_WEIGHTS)
            write_json(tmp / _SEGMENTER_JSON, config["segmenter"])
        write_json(tmp / PRETRAINED_CONFIG, config)
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


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


def run_info(path: str | Path) -> dict[str, Any]:
    """What ``mosmos info`` prints, as a dict: kind, organs, tasks, preprocessing, objective, scores."""
    path = Path(path)
    kind = run_kind(path)
    if kind == "export":
        config = _pretrained_config(path)
        kind, record, scores = config["kind"], config[config["kind"]], config.get("scores", {})
        commit = (config.get("source") or {}).get("commit", "")
    else:
        if kind == "encoder":
            record = read_encoder_export(path)[0].to_dict()
        else:
            record = _read_json(path / _SEGMENTER_JSON)
            if not isinstance(record, dict):
                raise ConfigError(f"{path / _SEGMENTER_JSON}: expected a JSON object")
        scores, commit = _scores(path, kind), record.get("commit", "")
    if kind == "encoder":
        objective = record.get("objective") or {}
        tasks: list[dict[str, Any]] = []
        extra = {"architecture": record.get("architecture"), "text": (record.get("text") or {}).get("name")}
    else:
        objective = {"strategy": record.get("strategy"), "init": record.get("init", "random")}
        tasks = list(record.get("tasks") or [])
        extra = {"architecture": f"{record.get('name')} on {record.get('encoder')}"}
    return {
        "path": str(path),
        "kind": kind,
        "organs": list(record.get("organs") or []),
        "tasks": tasks,
        "preprocess": record.get("preprocess") or {},
        "objective": objective,
        "scores": scores,
        "commit": commit,
        **extra,
    }


def format_info(info: dict[str, Any]) -> str:
    """The text ``mosmos info`` prints."""
    stage = "stage 1 encoder" if info["kind"] == "encoder" else "stage 2 segmenter"
    lines = [f"{info['path']}: {stage} ({info.get('architecture')})"]
    if info.get("text"):
        lines.append(f"text tower: {info['text']}")
    lines.append(f"organs ({len(info['organs'])}): {', '.join(info['organs']) or '-'}")
    if info["kind"] == "segmenter":
        lines.append(f"tasks ({len(info['tasks'])}):")
        lines += [f"  {t.get('name')}: {', '.join(t.get('organs', []))}" for t in info["tasks"]]
    pre = info["preprocess"]
    keys = ("spacing", "size", "hu_window", "body_threshold_hu", "resize_mode")
    lines.append("preprocessing: " + ", ".join(f"{k} {pre[k]}" for k in keys if k in pre))
    objective = dict(info["objective"])
    name = objective.pop("name", None)
    lines.append(f"objective: {name}" if name else "objective:")
    lines += [f"  {k}: {v}" for k, v in objective.items()]
    scores = dict(info["scores"])
    if not scores:
        lines.append("scores: none recorded (no metrics.json)")
    else:
        weights = scores.pop("weights", "")
        best_map = scores.pop("best_tag_mAP", None)
        lines.append(f"scores (of the {weights} weights):")
        shown = [k for k in (*_STAGE1_HEADLINE, "mean_dice", "mean_hd95") if k in scores]
        shown += sorted(k for k in scores if k.startswith("dice/"))
        lines += [f"  {k:28s} {scores[k]:.4f}" for k in shown]
        if "epoch" in scores:
            lines.append(f"  {'epoch':28s} {int(scores['epoch'])}")
        if best_map:
            lines.append(f"  best tag_mAP {best_map['value']:.4f} at epoch {best_map['epoch']}")
    if info.get("commit"):
        lines.append(f"commit: {info['commit']}")
    return "\n".join(lines)
