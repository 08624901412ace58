"""mosmos+masks (issue 20): the attention-mask loss, the batch mixing, the equivariance term, a tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mosmos.config import load_config
from mosmos.models.losses import attention_equivariance_loss, attention_mask_loss, organ_fractions
from mosmos.pretrain.config import PretrainConfig
from tests.conftest import REPO, tiny_pretrain_overrides

DEMO = REPO / "configs" / "pretrain" / "demo.yaml"


def _labels_4x4() -> torch.Tensor:
    """One 2D scan, 4 x 4 voxels: tag 0 (value 1) fills rows 0-1 x columns 0-2, tag 1 (value 2) the
    voxel (3, 3)."""
    lab = torch.zeros(1, 1, 4, 4, dtype=torch.int16)
    lab[0, 0, :2, :3] = 1
    lab[0, 0, 3, 3] = 2
    return lab


def test_organ_fractions_by_hand():
    frac = organ_fractions(_labels_4x4(), num_tags=3, grid=(2, 2))
    assert frac.shape == (1, 3, 2, 2)
    # 2 x 2 voxel cells: tag 0 fills cell (0, 0) and half of cell (0, 1); tag 1 a quarter of (1, 1)
    assert torch.equal(frac[0, 0], torch.tensor([[1.0, 0.5], [0.0, 0.0]]))
    assert torch.equal(frac[0, 1], torch.tensor([[0.0, 0.0], [0.0, 0.25]]))
    assert torch.equal(frac[0, 2], torch.zeros(2, 2))


def test_mask_loss_against_hand_computed_value():
    frac = organ_fractions(_labels_4x4(), num_tags=2, grid=(2, 2))
    attn = torch.tensor([[[0.5, 0.3], [0.2, 0.0]], [[0.25, 0.25], [0.25, 0.25]]])[None]
    # tag 0 alone: mass inside 0.5 * 1 + 0.3 * 0.5 = 0.65
    only_0 = torch.tensor([[True, False]])
    assert attention_mask_loss(attn, frac, only_0).item() == pytest.approx(-math.log(0.65), rel=1e-6)
    # both: tag 1's mass inside is 0.25 * 0.25; the loss is the mean over the two pairs
    both = torch.tensor([[True, True]])
    expected = (-math.log(0.65) - math.log(0.0625)) / 2
    assert attention_mask_loss(attn, frac, both).item() == pytest.approx(expected, rel=1e-6)


def test_mask_loss_is_zero_when_all_attention_lies_inside_the_mask():
    frac = organ_fractions(_labels_4x4(), num_tags=2, grid=(2, 2))
    attn = torch.zeros(1, 2, 2, 2)
    attn[0, 0, 0, 0] = 1.0  # wholly on a cell inside tag 0
    attn[0, 1, 1, 1] = 1.0  # tag 1 is smaller than a cell: its minimum is -log(0.25)
    assert attention_mask_loss(attn, frac, torch.tensor([[True, False]])).item() == 0.0
    assert attention_mask_loss(attn, frac, torch.tensor([[False, True]])).item() == pytest.approx(
        -math.log(0.25)
    )


def test_mask_loss_gradient_moves_mass_into_the_organ_and_skips_unsupervised_pairs():
    frac = organ_fractions(_labels_4x4(), num_tags=2, grid=(2, 2))
    scores = torch.zeros(1, 2, 4, requires_grad=True)
    attn = F.softmax(scores, dim=-1).view(1, 2, 2, 2)
    attention_mask_loss(attn, frac, torch.tensor([[True, False]])).backward()
    grad = scores.grad.view(1, 2, 2, 2)
    assert grad[0, 0, 0, 0] < 0 < grad[0, 0, 1, 0]  # descent raises the score of the cell inside
    assert torch.equal(grad[0, 1], torch.zeros(2, 2))  # tag 1 is not supervised: exactly no gradient
    # no supervised pair: a zero that keeps the graph
    zero = attention_mask_loss(attn, frac, torch.zeros(1, 2, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad


def test_equivariance_term_is_zero_for_a_perfectly_equivariant_map():
    torch.manual_seed(0)
    image = torch.rand(2, 1, 8, 8, 4)

    def maps(x: torch.Tensor) -> torch.Tensor:
        # pointwise in space (pooling blocks align under flips): an equivariant map by construction
        pooled = F.avg_pool3d(x, 2)
        scores = torch.cat([pooled * 3.0, -pooled * 2.0], dim=1)  # two tags
        return F.softmax(scores.flatten(2), dim=-1).view_as(scores)

    for dims in ([2], [3, 4], [2, 3, 4]):
        loss = attention_equivariance_loss(maps(image), maps(image.flip(dims)), dims)
        assert loss.item() == pytest.approx(0.0, abs=1e-7)
    # a map with a fixed location prior is not equivariant: the term sees it
    prior = torch.linspace(0, 3, 4).view(1, 1, 4, 1, 1)

    def biased(x: torch.Tensor) -> torch.Tensor:
        scores = F.avg_pool3d(x, 2) + prior
        return F.softmax(scores.flatten(2), dim=-1).view_as(scores)

    assert attention_equivariance_loss(biased(image), biased(image.flip([2])), [2]).item() > 0.1
    # disjoint maps: total-variation distance 1
    a = torch.zeros(1, 1, 2, 1, 1)
    a[0, 0, 0] = 1.0
    assert attention_equivariance_loss(a, a, [2]).item() == pytest.approx(1.0)


def _mask_datasets(data) -> list[str]:
    return sorted(str(p) for p in (data / "nnUNet_raw").glob("Dataset01*"))


def _mask_overrides(data, run_dir, **extra) -> list[str]:
    sets = ",".join(_mask_datasets(data))
    return tiny_pretrain_overrides(
        data, run_dir, **{"data.mask_datasets": f"[{sets}]", "data.mask_ratio": "0.25", **extra}
    )


def test_masked_scans_are_mixed_at_the_configured_ratio(tiny_synth, tmp_path):
    from torch.utils.data import DataLoader

    from mosmos.pretrain.data import build_datasets
    from mosmos.vocabulary import load_vocabulary

    cfg = load_config(PretrainConfig, DEMO, _mask_overrides(tiny_synth, tmp_path / "run"))
    vocab = load_vocabulary(cfg.data.vocabulary, cfg.data.organs)
    data = build_datasets(cfg, vocab)
    scans = data.mask_mixer.scans
    assert len(scans) == 2 * len(_mask_datasets(tiny_synth))  # tiny_synth: 2 labelled cases per dataset
    # each masked scan's labels hold vocabulary tags + 1, on the organs its dataset labels only
    for j in range(len(scans)):
        item = scans[j]
        values = set(item["labels"].unique().tolist()) - {0}
        assert values and all(item["mask_organs"][v - 1] for v in values)
        assert item["masked"] and (item["tags"] == -1).all() and item["index"] >= len(data.train)

    def tokenizer(texts, **_):
        return {
            "input_ids": torch.zeros(len(texts), 3, dtype=torch.long),
            "attention_mask": torch.ones(len(texts), 3),
        }

    collate = data.make_collator(tokenizer, 16, mix=data.mask_mixer)
    for batch_size, per_batch in ((4, 1), (8, 2), (12, 3)):
        loader = DataLoader(data.train, batch_size=batch_size, collate_fn=collate, drop_last=True)
        batches = list(loader)
        assert batches
        for batch in batches:
            masked = batch["masked"]
            assert int(masked.sum()) == per_batch  # round(0.25 * batch size) rows
            assert batch["labels"][~masked].eq(0).all() and not batch["mask_organs"][~masked].any()
            assert batch["mask_organs"][masked].any(dim=1).all()
            assert [r for r, m in zip(batch["report"], masked.tolist(), strict=True) if m] == [""] * per_batch
    # the draw is a function of (seed, epoch, replaced index): reproducible, and new each epoch
    first = [data.mask_mixer(list(map(data.train.__getitem__, range(4))))[-1]["index"] for _ in range(2)]
    assert first[0] == first[1]
    draws = set()
    for epoch in range(6):
        data.train.set_epoch(epoch)
        draws.add(data.mask_mixer([data.train[i] for i in range(4)])[-1]["index"])
    assert len(draws) > 1


def test_objective_skips_masked_rows_in_report_terms_and_scores_their_masks():
    from mosmos.models.pretrain_model import MosmosPretrainModel
    from mosmos.models.registry import create_image_encoder
    from mosmos.models.tag_head import TagHeadConfig
    from mosmos.pretrain.objective import PretrainObjective

    torch.manual_seed(0)
    encoder = create_image_encoder(
        "rescnn3d", spatial_dims=3, in_channels=1, channels=[4, 8, 8], strides=[2, 2, 2], num_res_units=1
    )
    model = MosmosPretrainModel(
        encoder, None, num_tags=3, tag_head_config=TagHeadConfig(dim=8, position_prior=None, margin=0)
    )
    objective = PretrainObjective(model, contrastive_weight=0.0, tag_weight=1.0, mask_weight=2.0)
    image = torch.rand(4, 1, 16, 16, 16)
    body = torch.ones(4, 1, 16, 16, 16, dtype=torch.bool)
    tags = torch.randint(0, 2, (4, 3, 2), dtype=torch.int8)
    labels = torch.zeros(4, 1, 16, 16, 16, dtype=torch.int16)
    labels[3, 0, :8, :8, :8] = 2  # the masked scan labels tag 1 in one corner
    batch = {"image": image, "body_mask": body, "tags": tags, "report": ["a", "b", "c", ""]}
    plain = objective(batch)
    mixed = objective(
        {
            **batch,
            "labels": labels,
            "masked": torch.tensor([False, False, False, True]),
            "mask_organs": torch.tensor([[False] * 3] * 3 + [[False, True, False]]),
        }
    )
    report_only = objective({**batch, "image": image[:3], "body_mask": body[:3], "tags": tags[:3]})
    assert "masks" not in plain and mixed["tags"].item() == pytest.approx(
        report_only["tags"].item(), rel=1e-5
    )
    assert mixed["tags"].item() != pytest.approx(plain["tags"].item(), rel=1e-5)
    _, attn = model.tag_head(model.image_encoder(image[3:], body[3:])["features"], body[3:])
    frac = organ_fractions(labels[3:], 3, tuple(attn.shape[2:]))
    expected = attention_mask_loss(attn, frac, torch.tensor([[False, True, False]]))
    assert mixed["masks"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert mixed["loss"].item() == pytest.approx(mixed["tags"].item() + 2.0 * mixed["masks"].item(), rel=1e-5)


def test_masks_are_a_named_choice_recorded_in_the_objective():
    from mosmos.pretrain.train import stage1_objective

    plain = load_config(PretrainConfig, None, ["data.table=x.csv"])
    assert stage1_objective(plain)["name"] == "mosmos" and "mask_datasets" not in stage1_objective(plain)
    cfg = load_config(
        PretrainConfig,
        None,
        ["data.table=x.csv", "data.mask_datasets=[a,b]", "train.variants=[equivariance]"],
    )
    record = stage1_objective(cfg)
    assert record["name"] == "mosmos+equivariance+masks"
    assert record["mask_datasets"] == ["a", "b"] and record["mask_ratio"] == 0.25
    assert record["equivariance_weight"] > 0
    with pytest.raises(Exception, match="mask_ratio"):
        load_config(PretrainConfig, None, ["data.table=x.csv", "data.mask_datasets=[a]", "data.mask_ratio=1"])


def test_tiny_stage1_run_with_masks_records_the_objective_and_draws_montages(tiny_synth, tmp_path):
    from mosmos.pretrain.train import run

    out = tmp_path / "run"
    cfg = load_config(
        PretrainConfig,
        DEMO,
        _mask_overrides(
            tiny_synth,
            out,
            **{
                "train.variants": "[]",
                "train.epochs": "2",
                "train.log_every": "1",
                "train.equivariance_weight": "0.1",
            },
        ),
    )
    final = run(cfg)
    assert "pointing_game" in final
    objective = json.loads((out / "encoder.json").read_text())["objective"]
    assert objective["name"] == "mosmos+masks"
    assert objective["mask_scans"] == 2 * len(_mask_datasets(tiny_synth))
    assert objective["mask_datasets"] == _mask_datasets(tiny_synth)
    montages = sorted((out / "attention").glob("montage_*.png"))
    assert len(montages) == len(cfg.data.organs)
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags().get("images", [])) | set(acc.Tags().get("scalars", []))
    assert "attention/liver" in tags and "train/masks" in tags and "train/equivariance" in tags
