"""Do the attention maps stage 2 feeds its decoder still point at the organs?

Stage 1 scores its pixel-tag attention (the pointing game) on whole held-out scans with the head's
learned location prior. The stage 2 segmenter (``model.attention_maps: true``) rebuilds the same head
from the export but turns the prior off (it describes where organs lie in a whole scan, not in a
patch) and sees patches. This scores, on a stage 1 run's held-out pairs, the maps of the head the
segmenter rebuilt (``mosmos.finetune.pretrained.build_segmenter``):

- ``stage 1``: whole scan, location prior on (what the run's own pointing game measured);
- ``no prior``: whole scan, prior off (what stage 2 gets on a scan that fits one window);
- ``patch``: prior off, on the centre crop of ``--patch`` voxels (a training patch), scored inside it.

    python tools/transfer_maps.py RUN_DIR [RUN_DIR ...] [--patch 48 48 32] [--max-cases 120]

Prints the pointing game (strict) per run and setting, over all organs and per organ.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mosmos.config import load_config
from mosmos.finetune.pretrained import build_segmenter
from mosmos.pretrain.config import PretrainConfig
from mosmos.pretrain.data import build_datasets
from mosmos.pretrain.evaluate import organ_presence
from mosmos.pretrain.metrics import pointing_game
from mosmos.vocabulary import load_vocabulary


def _crop(t: torch.Tensor, patch: list[int]) -> torch.Tensor:
    """Centre crop of the last three axes to ``patch`` (kept whole where smaller)."""
    slices = []
    for size, want in zip(t.shape[-3:], patch, strict=True):
        start = max(0, (size - want) // 2)
        slices.append(slice(start, start + min(size, want)))
    return t[(..., *slices)]


@torch.no_grad()
def score_run(run: Path, patch: list[int], max_cases: int) -> dict[str, dict]:
    cfg = load_config(PretrainConfig, run / "config.yaml")
    vocab = load_vocabulary(cfg.data.vocabulary, cfg.data.organs)
    data = build_datasets(cfg, vocab)
    seg, _ = build_segmenter("unet", num_classes=1, init=str(run), use_attention_maps=True)
    seg.eval()
    head = seg.attention_head
    items = [data.val[i] for i in range(min(len(data.val), max_cases))]
    image = torch.stack([it["image"] for it in items])
    mask = torch.stack([it["body_mask"] for it in items])
    labels = torch.stack([torch.as_tensor(it["labels"]) for it in items])
    ids = data.organ_label_ids
    results = {}
    for setting, prior, crop in (
        ("stage 1", True, False),
        ("no prior", False, False),
        ("patch", False, True),
    ):
        x, m, lab = (_crop(t, patch) for t in (image, mask, labels)) if crop else (image, mask, labels)
        head.pixel_tag.use_position_prior = prior
        maps = []
        for i in range(0, len(x), 8):
            _, attn = head(seg.encoder.forward_features(x[i : i + 8]), mask=m[i : i + 8])
            maps.append(attn.float())
        attn = torch.cat(maps)
        results[setting] = pointing_game(attn, lab, ids, organ_presence(lab, ids), names=vocab.names)
    head.pixel_tag.use_position_prior = False
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--patch", nargs=3, type=int, default=[48, 48, 32])
    parser.add_argument("--max-cases", type=int, default=120)
    args = parser.parse_args()
    for run in args.runs:
        res = score_run(run, args.patch, args.max_cases)
        print(f"\n{run}")
        organs = list(next(iter(res.values()))["per_organ"])
        print(f"  {'organ':22s}" + "".join(f"{s:>10s}" for s in res))
        for organ in organs:
            vals = [res[s]["per_organ"].get(organ) for s in res]
            print(f"  {organ:22s}" + "".join(f"{v:10.3f}" if v is not None else f"{'-':>10s}" for v in vals))
        print(f"  {'all':22s}" + "".join(f"{res[s]['pointing_game']:10.3f}" for s in res))


if __name__ == "__main__":
    main()
