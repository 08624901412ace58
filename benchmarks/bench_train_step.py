"""What ``train.channels_last`` or ``train.mixed_precision: bf16`` saves per training step.

Builds the image encoder of a pretraining config (default: the CPU demo's), or with ``--stage 2`` the
segmenter of a fine-tuning config (default: its CPU demo), then times forward + backward + an AdamW
step on random volumes of the config's input (patch) size and batch size, and prints each variant as
a ratio to the baseline. Runs alternate so drift in machine load hits both alike.

- ``--compare layout`` (default): default layout (baseline) vs weights channels-last (``mosmos.channels_last``).
- ``--compare bf16``: channels-last in float32 (baseline) vs channels-last under bf16 autocast, what
  ``train.mixed_precision: bf16`` runs on a GPU or on a CPU with native bf16 (AVX512-BF16 / AMX).

    python benchmarks/bench_train_step.py [--stage 1|2] [--compare layout|bf16] [--config FILE]
        [--steps 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from mosmos.channels_last import to_channels_last
from mosmos.config import load_config
from mosmos.models.registry import create_image_encoder
from mosmos.pretrain.config import PretrainConfig


def _loss(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):  # segmenter logits
        return out.float().square().mean()
    return sum(f.float().square().mean() for f in out["features"]) + out["pooled"].square().mean()


def _time_steps(model: torch.nn.Module, x: torch.Tensor, steps: int, bf16: bool = False) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = _loss(model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: oneDNN / cuDNN pick their kernels on the first call
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1)
    parser.add_argument("--config", help="default: configs/pretrain/demo.yaml or configs/finetune/demo.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compare", choices=("layout", "bf16"), default="layout")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.stage == 1:
        cfg = load_config(PretrainConfig, args.config or "configs/pretrain/demo.yaml", [])
        base = create_image_encoder(
            cfg.model.image_encoder, spatial_dims=3, in_channels=1, **cfg.model.encoder_kwargs
        )
        name, kwargs, size = cfg.model.image_encoder, cfg.model.encoder_kwargs, cfg.data.size
    else:
        from mosmos.finetune.config import FinetuneConfig
        from mosmos.finetune.pretrained import build_segmenter

        cfg = load_config(FinetuneConfig, args.config or "configs/finetune/demo.yaml", [])
        size = cfg.data.patch_size
        base, _ = build_segmenter(
            cfg.model.name,
            num_classes=11,
            num_tasks=3,
            encoder=cfg.model.encoder,
            encoder_kwargs=cfg.model.encoder_kwargs,
            img_size=size,
        )
        name, kwargs = f"{cfg.model.name} segmenter", cfg.model.encoder_kwargs
    base = base.to(args.device)
    x = torch.rand(cfg.train.batch_size, 1, *size, device=args.device)
    if args.compare == "layout":
        # (label, model, bf16 autocast); the first is the baseline
        variants = [
            ("default layout", base, False),
            ("channels_last", to_channels_last(copy.deepcopy(base)), False),
        ]
    else:
        fast = to_channels_last(base)
        variants = [("float32", fast, False), ("bf16 autocast", copy.deepcopy(fast), True)]
    times: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    for _ in range(args.rounds):
        for label, model, bf16 in variants:
            times[label].append(_time_steps(model, x, args.steps, bf16))
    print(
        f"{name} {kwargs}, batch {cfg.train.batch_size} x {size}, "
        f"{args.device}, {torch.get_num_threads()} threads; best of {args.rounds} x {args.steps} steps"
    )
    baseline = min(times[variants[0][0]])
    for name, values in times.items():
        best = min(values)
        print(f"  {name:15s} {best * 1000:8.1f} ms/step   x{best / baseline:.2f} of the baseline")


if __name__ == "__main__":
    main()
