"""What ``train.channels_last`` saves per training step of a stage 1 encoder or a stage 2 segmenter.

Builds the image encoder of a pretraining config (default: the CPU demo's), or with ``--stage 2`` the
segmenter of a fine-tuning config (default: its CPU demo), then times forward + backward + an AdamW
step on random volumes of the config's input (patch) size and batch size, first with the default
layout (the baseline), then with the weights channels-last (``mosmos.layout``), and prints each as a
ratio to the baseline. Runs alternate so drift in machine load hits both alike.

    python benchmarks/bench_channels_last.py [--stage 1|2] [--config FILE] [--steps 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from models.registry import create_image_encoder
from mosmos.config import load_config
from mosmos.layout import to_channels_last
from pretrain.config import PretrainConfig


def _loss(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):  # segmenter logits
        return out.float().square().mean()
    return sum(f.float().square().mean() for f in out["features"]) + out["pooled"].square().mean()


def _time_steps(model: torch.nn.Module, x: torch.Tensor, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        _loss(model(x)).backward()
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
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per layout")
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
        from finetune.config import FinetuneConfig
        from finetune.pretrained import build_segmenter

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
    fast = to_channels_last(copy.deepcopy(base))
    x = torch.rand(cfg.train.batch_size, 1, *size, device=args.device)
    times: dict[str, list[float]] = {"default layout": [], "channels_last": []}
    for _ in range(args.rounds):
        times["default layout"].append(_time_steps(base, x, args.steps))
        times["channels_last"].append(_time_steps(fast, x, args.steps))
    print(
        f"{name} {kwargs}, batch {cfg.train.batch_size} x {size}, "
        f"{args.device}, {torch.get_num_threads()} threads; best of {args.rounds} x {args.steps} steps"
    )
    baseline = min(times["default layout"])
    for name, values in times.items():
        best = min(values)
        print(f"  {name:15s} {best * 1000:8.1f} ms/step   x{best / baseline:.2f} of the baseline")


if __name__ == "__main__":
    main()
