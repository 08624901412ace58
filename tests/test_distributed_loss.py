"""ClipLoss across 2 gloo processes equals the single-process loss and gradients on the global batch."""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mosmos.models.distributed import all_gather_with_grad
from mosmos.models.losses import ClipLoss

WORLD, LOCAL, DIM, SCALE = 2, 3, 8, 12.0


def global_batches(steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            F.normalize(torch.randn(WORLD * LOCAL, DIM, generator=g), dim=-1),
            F.normalize(torch.randn(WORLD * LOCAL, DIM, generator=g), dim=-1),
        )
        for _ in range(steps)
    ]


def local_step(loss_fn, image, text, rank):
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    image, text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
    scale = torch.tensor(SCALE, requires_grad=True)
    loss = loss_fn(image, text, scale)
    loss.backward()
    return {"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad, "scale_grad": scale.grad}


def worker(rank: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        batches = global_batches()
        result = {"plain": local_step(ClipLoss(), *batches[0], rank)}
        queued = ClipLoss(queue_size=8, embed_dim=DIM)
        result["queued"] = [local_step(queued, *b, rank) for b in batches]
        result["queue"] = (queued.queue_image.clone(), queued.queue_text.clone(), int(queued.queue_count))

        # Unequal local batches (2 and 3 rows): rank order, and gradients summed over processes.
        x = torch.full((rank + 2, 2), float(rank)).requires_grad_()
        gathered = all_gather_with_grad(x)
        (gathered * (rank + 1)).sum().backward()
        result["gathered"], result["gathered_grad"] = gathered.detach(), x.grad
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def reference_step(loss_fn, image, text):
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    scale = torch.tensor(SCALE, requires_grad=True)
    loss = loss_fn(image, text, scale)
    loss.backward()
    return {"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad, "scale_grad": scale.grad}


def test_clip_loss_gathers_the_global_batch_with_gradients(tmp_path):
    mp.spawn(worker, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    batches = global_batches()

    # (a) Each rank's loss is its rows against every column of the global batch ...
    image, text = batches[0]
    logits = SCALE * image @ text.T
    labels = torch.arange(WORLD * LOCAL)
    for r, res in enumerate(ranks):
        rows = slice(r * LOCAL, (r + 1) * LOCAL)
        want = (
            F.cross_entropy(logits[rows], labels[rows]) + F.cross_entropy(logits.T[rows], labels[rows])
        ) / 2
        torch.testing.assert_close(res["plain"]["loss"], want)
    # ... so their mean is the single-process loss on the concatenated batch.
    ref = reference_step(ClipLoss(), image, text)
    torch.testing.assert_close(torch.stack([res["plain"]["loss"] for res in ranks]).mean(), ref["loss"])

    # (b) Gradients: all_gather_with_grad sums each local slice's gradient over the WORLD losses, and
    # DDP averages parameter gradients over WORLD ranks, so local gradient / WORLD (what reaches the
    # parameters after DDP's averaging) equals the single-process gradient of the global mean loss.
    for key in ("image_grad", "text_grad"):
        local = torch.cat([res["plain"][key] for res in ranks]) / WORLD
        torch.testing.assert_close(local, ref[key])
    scale_grad = torch.stack([res["plain"]["scale_grad"] for res in ranks]).mean()
    torch.testing.assert_close(scale_grad, ref["scale_grad"])

    # The queue is filled with the gathered global batch, identically on every rank, and its loss
    # matches a single process seeing the same global batches.
    single = ClipLoss(queue_size=8, embed_dim=DIM)
    for step, batch in enumerate(batches):
        want = reference_step(single, *batch)
        got = torch.stack([res["queued"][step]["loss"] for res in ranks]).mean()
        torch.testing.assert_close(got, want["loss"])
        local = torch.cat([res["queued"][step]["image_grad"] for res in ranks]) / WORLD
        torch.testing.assert_close(local, want["image_grad"])
    for res in ranks:
        torch.testing.assert_close(res["queue"][0], single.queue_image)
        torch.testing.assert_close(res["queue"][1], single.queue_text)
        assert res["queue"][2] == 8

    # Unequal local batches gather in rank order; each slice gets the sum of all ranks' gradients.
    expected = torch.cat([torch.zeros(2, 2), torch.ones(3, 2)])
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["gathered"], expected)
        torch.testing.assert_close(res["gathered_grad"], torch.full((r + 2, 2), 3.0))
