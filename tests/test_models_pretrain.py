"""Text encoder, pixel-tag attention and the stage 1 pretraining model."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mosmos.models import (
    ClipLoss,
    MosmosPretrainModel,
    PixelTagAttention,
    TagAttentionHead,
    TagLoss,
    TextEncoder,
    build_small_bert,
    create_image_encoder,
)
from mosmos.pretrain.text import train_wordpiece_tokenizer

torch.set_num_threads(2)

REPORTS = [
    "The liver is enlarged. No focal hepatic lesion.",
    "Status post splenectomy. Kidneys are normal.",
    "Gallbladder stones. The pancreas is atrophic.",
    "Normal spleen and liver.",
]
TINY_BERT = {
    "hidden_size": 16,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return train_wordpiece_tokenizer(REPORTS, vocab_size=120)


def tiny_text(pooling="mean", vocab_size=60) -> TextEncoder:
    return TextEncoder(build_small_bert(vocab_size, **TINY_BERT), pooling=pooling)


def tiny_encoder():
    return create_image_encoder("rescnn3d", channels=(4, 8, 8, 16), strides=(1, 2, 2, 2), num_res_units=1)


def batch(b=2, size=16, vocab=60, length=7):
    torch.manual_seed(1)
    image = torch.randn(b, 1, size, size, size)
    mask = torch.zeros(b, 1, size, size, size, dtype=torch.bool)
    mask[:, :, 2:-2, 2:-2, 1:-1] = True
    ids = torch.randint(5, vocab, (b, length))
    am = torch.ones(b, length, dtype=torch.long)
    am[0, -2:] = 0
    return image, mask, ids, am


# ---------------------------------------------------------------- text encoder


def test_from_pretrained_matches_the_saved_model(tmp_path):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    bert = build_small_bert(len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_BERT).eval()
    bert.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    text = TextEncoder.from_pretrained(str(tmp_path), pooling="cls").eval()
    tokens = AutoTokenizer.from_pretrained(str(tmp_path))(REPORTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = text(tokens["input_ids"], tokens["attention_mask"])
        want = bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state[
            :, 0
        ]
    assert got.shape == (len(REPORTS), text.output_dim) == (4, TINY_BERT["hidden_size"])
    torch.testing.assert_close(got, want)


def test_mean_pooling_ignores_padding():
    torch.manual_seed(0)
    text = tiny_text("mean").eval()
    ids = torch.tensor([[2, 7, 8, 9, 3, 0, 0]])
    am = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        hidden = text.model(input_ids=ids, attention_mask=am).last_hidden_state
        padded = text(ids, am)
        unpadded = text(ids[:, :5], am[:, :5])
    torch.testing.assert_close(padded[0], hidden[0, :5].sum(dim=0) / 5)
    torch.testing.assert_close(padded, unpadded)


def test_frozen_cache_skips_the_model():
    torch.manual_seed(0)
    text = tiny_text("cls").freeze()
    calls = []
    text.model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    text.train()  # a parent's .train() must not switch the frozen model back to dropout
    assert not text.model.training
    _, _, ids, am = batch(3)

    first = text(ids, am, cache_keys=["a", "b", "c"])
    again = text(ids[[2, 0]], am[[2, 0]], cache_keys=["c", "a"])
    assert calls == [3]
    assert torch.equal(again, first[[2, 0]])
    assert not first.requires_grad and all(not p.requires_grad for p in text.parameters())

    mixed = text(ids[:2], am[:2], cache_keys=["a", "d"])  # only the unseen report is encoded
    assert calls == [3, 1]
    assert torch.equal(mixed[0], first[0]) and text.cache_size == 4
    with pytest.raises(ValueError, match="cache_keys"):
        text(ids, am, cache_keys=["a"])

    text.unfreeze()
    assert text.cache_size == 0 and text(ids, am).requires_grad


def test_text_encoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(build_small_bert(20, **TINY_BERT), pooling="max")
    with pytest.raises(ValueError, match="hidden_size"):
        build_small_bert(20, hidden_size=10, num_heads=4)


# ---------------------------------------------------------------- pixel-tag attention


def test_attention_sums_to_one_inside_the_mask_and_is_zero_outside():
    torch.manual_seed(0)
    pta = PixelTagAttention(feature_dim=8, num_tags=5, dim=16, num_heads=2)
    features = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    mask = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)  # input resolution: 2x the map
    mask[0, :, :4] = True
    mask[1, :, 2:6, 2:6, 2:6] = True
    logits, attn = pta(features, mask)
    assert logits.shape == (2, 5, 2) and attn.shape == (2, 5, 4, 4, 4)
    torch.testing.assert_close(attn.flatten(2).sum(-1), torch.ones(2, 5))
    inside = F.adaptive_max_pool3d(mask.float(), (4, 4, 4)) > 0
    assert torch.all(attn.masked_select(~inside) == 0)
    assert torch.all(attn.masked_select(inside) > 0)

    (logits.sum() + (attn * torch.randn_like(attn)).sum()).backward()
    assert pta.queries.grad.abs().sum() > 0 and features.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pta.parameters())


def test_attention_can_be_kept_off_cells_on_the_bodys_outline():
    """mask_min_inside=1: only cells wholly inside the body are attended; a body too small for any
    such cell falls back to the any-voxel rule."""
    torch.manual_seed(0)
    pta = PixelTagAttention(feature_dim=8, num_tags=3, dim=16, mask_min_inside=1.0)
    features = torch.randn(2, 8, 4, 4, 4)
    mask = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)
    mask[0, :, 1:7, 1:7, 1:7] = True  # cells 1..2 wholly inside; the outer ring is half inside
    mask[1, :, 3:5, 3:5, 3:5] = True  # straddles 8 cells, fills none
    _, attn = pta(features, mask)
    full = torch.zeros(4, 4, 4, dtype=torch.bool)
    full[1:3, 1:3, 1:3] = True
    assert torch.all(attn[0][:, ~full] == 0) and torch.all(attn[0][:, full] > 0)
    touched = F.adaptive_max_pool3d(mask[1:].float(), (4, 4, 4))[0, 0] > 0
    assert touched.sum() == 8 and torch.all(attn[1][:, touched] > 0) and torch.all(attn[1][:, ~touched] == 0)
    with pytest.raises(ValueError, match="mask_min_inside"):
        PixelTagAttention(feature_dim=8, num_tags=3, mask_min_inside=1.5)


def test_attention_margin_sharpness_and_no_residual():
    torch.manual_seed(0)
    features = torch.randn(1, 8, 6, 6, 6)
    mask = torch.ones(1, 1, 6, 6, 6, dtype=torch.bool)
    edged = PixelTagAttention(feature_dim=8, num_tags=2, dim=16, mask_margin=1)
    _, attn = edged(features, mask)
    core = torch.zeros(6, 6, 6, dtype=torch.bool)
    core[1:5, 1:5, 1:5] = True
    assert torch.all(attn[0][:, ~core] == 0) and torch.all(attn[0][:, core] > 0)
    # a sharper start concentrates the same scores: lower entropy, same argmax
    plain = PixelTagAttention(feature_dim=8, num_tags=2, dim=16, residual_average=False)
    sharp = PixelTagAttention(feature_dim=8, num_tags=2, dim=16, residual_average=False, init_sharpness=4.0)
    sharp.load_state_dict(plain.state_dict(), strict=False)
    (_, a1), (logits, a4) = plain(features), sharp(features)
    entropy = lambda a: -(a * a.clamp_min(1e-12).log()).flatten(2).sum(-1)  # noqa: E731
    assert torch.all(entropy(a4) < entropy(a1))
    assert torch.equal(a1.flatten(2).argmax(-1), a4.flatten(2).argmax(-1))
    logits.sum().backward()
    assert sharp.log_sharpness.grad is not None and sharp.log_sharpness.grad.abs().sum() > 0
    assert plain.log_sharpness is None  # no parameter unless asked for: old exports still load


def test_attention_matches_scaled_dot_product_attention():
    torch.manual_seed(0)
    pta = PixelTagAttention(feature_dim=6, num_tags=3, dim=8)
    features = torch.randn(2, 6, 3, 4, 2)
    mask = torch.rand(2, 1, 3, 4, 2) > 0.4
    logits, attn = pta(features, mask)

    tokens = pta.feature_norm(pta.embed(features).flatten(2).transpose(1, 2))
    q = pta.to_q(pta.query_norm(pta.queries)).expand(2, -1, -1)
    k, v = pta.to_k(tokens), pta.to_v(tokens)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.flatten(2))
    inside = mask.flatten(2).transpose(1, 2).float()  # [B, N, 1]
    average = (v * inside).sum(1) / inside.sum(1)  # CSRA's residual: the body-average feature
    pooled = pta.out_norm(attended) + pta.out_norm(average)[:, None]
    want = torch.stack([pooled[:, t] @ pta.head_weight[t] + pta.head_bias[t] for t in range(3)], 1)
    torch.testing.assert_close(logits, want)
    weights = torch.softmax(
        (q @ k.transpose(1, 2) / math.sqrt(8)).masked_fill(~mask.flatten(2), -math.inf), -1
    )
    torch.testing.assert_close(attn.flatten(2), weights)


def test_all_masked_input_stays_finite():
    pta = PixelTagAttention(feature_dim=4, num_tags=2, dim=8)
    features = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    logits, attn = pta(features, torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool))
    assert torch.isfinite(logits).all() and torch.all(attn == 0)
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in pta.parameters() if p.grad is not None)
    assert torch.isfinite(features.grad).all()


def test_position_prior_moves_the_peak_and_learns():
    """The location prior adds its (upsampled) score offsets per tag: with features that carry no
    location, the attention is the softmax of the prior itself, and the prior gets a gradient."""
    torch.manual_seed(0)
    pta = PixelTagAttention(feature_dim=4, num_tags=2, dim=8, position_prior=(2, 2, 2), prior_gain=1.0)
    with torch.no_grad():
        pta.position_logits.zero_()
        pta.position_logits[0, 1, 0, 1] = 3.0  # tag 0 prefers the +x, -y, +z octant
        pta.position_logits[1, 0, 1, 0] = 3.0
    features = torch.randn(1, 4, 1, 1, 1).expand(1, 4, 4, 4, 4)  # the same feature everywhere
    logits, attn = pta(features)
    prior = F.interpolate(pta.position_logits.detach()[None], size=(4, 4, 4), mode="trilinear")[0]
    torch.testing.assert_close(attn[0].flatten(1), torch.softmax(prior.flatten(1), dim=1))
    assert tuple(torch.nonzero(attn[0, 0] == attn[0, 0].max())[0]) == (3, 0, 3)
    assert tuple(torch.nonzero(attn[0, 1] == attn[0, 1].max())[0]) == (0, 3, 0)
    (logits[:, :, 0] * torch.randn(1, 2)).sum().backward()
    assert pta.position_logits.grad is not None
    # the gain scales the prior's scores (and so its effective learning rate)
    assert torch.allclose(
        PixelTagAttention(4, 2, dim=8, position_prior=(2, 2, 2), prior_gain=2.0).position_scores((4, 4, 4)),
        torch.zeros(2, 4, 4, 4),
    )
    with pytest.raises(ValueError, match="position_prior"):
        PixelTagAttention(feature_dim=4, num_tags=2, position_prior=(2, 2))
    head = TagAttentionHead([4, 6], num_tags=2, attn_level=0, dim=8, position_prior=[3, 3, 2])
    rebuilt = TagAttentionHead(**head.head_config())
    assert rebuilt.pixel_tag.position_logits.shape == (2, 3, 3, 2)
    rebuilt.load_state_dict(head.state_dict())


def test_query_init_and_per_tag_heads():
    init = torch.randn(3, 10)
    pta = PixelTagAttention(feature_dim=4, num_tags=3, dim=8, query_init=init)
    assert pta.queries.shape == (3, 8)
    # The projection is linear: the queries keep the names' similarity structure up to a linear map.
    assert torch.linalg.matrix_rank(torch.cat([init - init.mean(0), pta.queries.detach()], 1)) == 2
    features = torch.randn(1, 4, 2, 2, 2)
    before, _ = pta(features)
    with torch.no_grad():
        pta.head_weight[1] += 1.0
    after, _ = pta(features)
    changed = (after - before).abs().sum(-1)[0]
    assert changed[1] > 0 and changed[0] == 0 and changed[2] == 0
    with pytest.raises(ValueError, match="query_init"):
        PixelTagAttention(feature_dim=4, num_tags=3, query_init=torch.randn(4, 10))


# ---------------------------------------------------------------- pretraining model


@pytest.mark.parametrize("share", [0.0, 0.25])
def test_image_embedding_gradient_share_reaches_the_encoder_scaled(share):
    """image_embedding_grad scales (0: blocks) the contrastive gradient into the encoder, not into the
    image projection or the text tower, and leaves the forward values unchanged."""
    image, mask, ids, am = batch()

    def grads(g):
        torch.manual_seed(0)
        model = MosmosPretrainModel(
            tiny_encoder(), tiny_text(), embed_dim=8, num_tags=0, image_embedding_grad=g
        )
        out = model(image, mask, input_ids=ids, attention_mask=am)
        ClipLoss()(out["image_emb"], out["text_emb"], out["logit_scale"]).backward()
        enc = torch.cat([p.grad.flatten() for p in model.image_encoder.parameters() if p.grad is not None])
        proj = torch.cat([p.grad.flatten() for p in model.image_proj.parameters()])
        text = torch.cat([p.grad.flatten() for p in model.text_encoder.parameters() if p.grad is not None])
        return out["image_emb"].detach(), enc, proj, text

    full, scaled = grads(1.0), grads(share)
    torch.testing.assert_close(scaled[0], full[0])  # same embedding
    if share == 0:
        assert scaled[1].abs().sum() == 0 and full[1].abs().sum() > 0
    else:
        torch.testing.assert_close(scaled[1], share * full[1])
    torch.testing.assert_close(scaled[2], full[2])
    torch.testing.assert_close(scaled[3], full[3])


@pytest.mark.parametrize("attn_values", ["level0", "level0_max", "patch"])
def test_pretrain_model_shapes_and_every_gradient(attn_values):
    torch.manual_seed(0)
    model = MosmosPretrainModel(
        tiny_encoder(), tiny_text(), embed_dim=8, num_tags=4, tag_dim=8, attn_values=attn_values
    )
    image, mask, ids, am = batch()
    out = model(image, mask, input_ids=ids, attention_mask=am)
    assert out["image_emb"].shape == out["text_emb"].shape == (2, 8)
    torch.testing.assert_close(out["image_emb"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["text_emb"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07))
    assert out["tag_logits"].shape == (2, 4, 2)
    assert out["attn_stride"] == 4 and out["attn_maps"].shape == (2, 4, 4, 4, 4)

    targets = torch.tensor([[[1, 0], [0, -1], [1, 1], [-1, 0]], [[0, 0], [1, 0], [1, -1], [0, 1]]])
    loss = ClipLoss()(out["image_emb"], out["text_emb"], out["logit_scale"]) + TagLoss()(
        out["tag_logits"], targets
    )
    loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert not missing
    torch.testing.assert_close(model.encode_image(image, mask), out["image_emb"])


def test_image_embedding_from_tag_logits():
    """embedding_from_tags: the projection reads [pooled, tag logits]; the contrastive gradient then
    reaches the tag head too, and encode_image gives the forward's embedding."""
    torch.manual_seed(0)
    model = MosmosPretrainModel(
        tiny_encoder(), tiny_text(), embed_dim=8, num_tags=3, tag_dim=8, embedding_from_tags=True
    )
    assert model.image_proj.net[0].in_features == model.image_encoder.embed_dim + 3 * 2
    image, mask, ids, am = batch()
    out = model(image, mask, input_ids=ids, attention_mask=am)
    ClipLoss()(out["image_emb"], out["text_emb"], out["logit_scale"]).backward()
    assert model.tag_head.pixel_tag.head_weight.grad.abs().sum() > 0
    torch.testing.assert_close(model.encode_image(image, mask), out["image_emb"])
    with pytest.raises(ValueError, match="embedding_from_tags"):
        MosmosPretrainModel(tiny_encoder(), None, num_tags=3, embedding_from_tags=True)


def test_tags_only_ablation_and_frozen_text():
    torch.manual_seed(0)
    image, mask, ids, am = batch()
    model = MosmosPretrainModel(tiny_encoder(), None, num_tags=3, tag_dim=8)
    out = model(image, mask)
    assert set(out) == {"image_emb", "pooled", "tag_logits", "attn_maps", "attn_stride"}
    TagLoss()(out["tag_logits"], torch.ones(2, 3, 2)).backward()
    assert all(p.grad is not None for p in model.parameters())

    model = MosmosPretrainModel(tiny_encoder(), tiny_text().freeze(), embed_dim=8, num_tags=3, tag_dim=8)
    out = model(image, mask, ids, am, text_cache_keys=["x", "y"])
    ClipLoss()(out["image_emb"], out["text_emb"], out["logit_scale"]).backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert all(p.grad is not None for p in model.text_proj.parameters())


def test_contrastive_only_and_temperature_clamp():
    model = MosmosPretrainModel(tiny_encoder(), tiny_text(), embed_dim=8, num_tags=0, max_logit_scale=50.0)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    out = model(*batch()[:1])
    assert set(out) == {"image_emb", "pooled", "logit_scale"}
    torch.testing.assert_close(out["logit_scale"], torch.tensor(50.0))
    with pytest.raises(ValueError, match="nothing to train"):
        MosmosPretrainModel(tiny_encoder(), None, num_tags=0)
    with pytest.raises(ValueError, match="attn_level"):
        MosmosPretrainModel(tiny_encoder(), None, num_tags=2, attn_level=7)


def test_attention_maps_at_input_size():
    torch.manual_seed(0)
    model = MosmosPretrainModel(tiny_encoder(), None, num_tags=2, tag_dim=8, query_init=torch.randn(2, 16))
    image, mask, _, _ = batch()
    with torch.no_grad():
        maps = model.attention_maps(image, mask)
    assert maps.shape == (2, 2, 16, 16, 16)
    assert torch.all(maps.masked_select(~mask) == 0) and maps.sum() > 0


def test_swin_encoder_in_pretrain_model():
    encoder = create_image_encoder(
        "swinvit2d", feature_size=6, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4
    )
    model = MosmosPretrainModel(encoder, tiny_text(), embed_dim=8, num_tags=2, tag_dim=8)
    image = torch.randn(2, 1, 32, 32)
    out = model(image, torch.ones_like(image, dtype=torch.bool), *batch()[2:])
    assert model.attn_level == 1 and out["attn_maps"].shape == (2, 2, 8, 8)


@pytest.mark.parametrize("attn_values", ["level0", "level0_max", "patch"])
def test_tag_head_export_rebuilds_the_same_maps(attn_values):
    torch.manual_seed(0)
    model = MosmosPretrainModel(
        tiny_encoder(), tiny_text(), embed_dim=8, num_tags=3, tag_dim=8, attn_values=attn_values
    ).eval()
    image, mask, _, _ = batch()
    head = TagAttentionHead(**model.tag_attention_config())
    head.load_state_dict(model.tag_attention_state_dict())
    with torch.no_grad():
        out = model(image, mask)
        logits, attn = head(model.image_encoder.forward_features(image), mask, image)
    torch.testing.assert_close(logits, out["tag_logits"])
    torch.testing.assert_close(attn, out["attn_maps"])
    assert "feature_channels" in model.tag_attention_config()
    with pytest.raises(ValueError, match="num_tags=0"):
        MosmosPretrainModel(tiny_encoder(), tiny_text(), num_tags=0).tag_attention_config()


@pytest.mark.parametrize("source, expected", [("level0", 1.0), ("level0_max", 8.0)])
def test_level0_values_average_or_keep_a_one_voxel_finding(source, expected):
    """A one-voxel spike in the finest level reaches its attention cell averaged over the cell's
    8 voxels ("level0") or at full strength ("level0_max")."""
    head = TagAttentionHead([2, 3, 5], num_tags=1, attn_level=1, dim=4, value_source=source)
    fine = torch.zeros(1, 2, 4, 4, 4)
    fine[0, 0, 1, 0, 1] = 8.0  # in cell (0, 0, 0) of the 2x2x2 attention grid
    seen = {}

    def spy(keys, mask=None, values=None):
        seen["values"] = values
        return torch.zeros(1, 1, 2), torch.zeros(1, 1, *keys.shape[2:])

    head.pixel_tag.forward = spy
    head([fine, torch.randn(1, 3, 2, 2, 2), torch.randn(1, 5, 1, 1, 1)])
    values = seen["values"]
    assert values.shape == (1, 2, 2, 2, 2)
    assert values[0, 0, 0, 0, 0].item() == pytest.approx(expected)
    assert values.abs().sum().item() == pytest.approx(expected)  # nothing leaks into other cells


def test_package_exports_resolve_lazily():
    import mosmos.models as package

    for name in package.__all__:
        assert getattr(package, name) is not None
