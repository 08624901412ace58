"""The stage 1 pretraining model (image and report embeddings, the tag branch) and the models
package's lazy exports. Shared tiny builders for the other ``test_models_pretrain_*`` files."""

import subprocess
import sys

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from mosmos.models import (
    ClipLoss,
    MosmosPretrainModel,
    TagAttentionHead,
    TagHeadConfig,
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


HEAD = TagHeadConfig(dim=8)  # the tuned settings at a tiny width


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


def test_pretrain_model_shapes_and_every_gradient():
    torch.manual_seed(0)
    model = MosmosPretrainModel(tiny_encoder(), tiny_text(), embed_dim=8, num_tags=4, tag_head_config=HEAD)
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
        tiny_encoder(), tiny_text(), embed_dim=8, num_tags=3, tag_head_config=HEAD, embedding_from_tags=True
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
    model = MosmosPretrainModel(tiny_encoder(), None, num_tags=3, tag_head_config=HEAD)
    out = model(image, mask)
    assert set(out) == {"image_emb", "pooled", "tag_logits", "attn_maps", "attn_stride"}
    TagLoss()(out["tag_logits"], torch.ones(2, 3, 2)).backward()
    assert all(p.grad is not None for p in model.parameters())

    model = MosmosPretrainModel(
        tiny_encoder(), tiny_text().freeze(), embed_dim=8, num_tags=3, tag_head_config=HEAD
    )
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
    with pytest.raises(ValueError, match="level=7"):
        MosmosPretrainModel(tiny_encoder(), None, num_tags=2, tag_head_config=TagHeadConfig(level=7))


def test_attention_maps_at_input_size():
    torch.manual_seed(0)
    model = MosmosPretrainModel(
        tiny_encoder(), None, num_tags=2, tag_head_config=HEAD, query_init=torch.randn(2, 16)
    )
    image, mask, _, _ = batch()
    with torch.no_grad():
        maps = model.attention_maps(image, mask)
    assert maps.shape == (2, 2, 16, 16, 16)
    assert torch.all(maps.masked_select(~mask) == 0) and maps.sum() > 0


def test_swin_encoder_in_pretrain_model():
    encoder = create_image_encoder(
        "swinvit2d", feature_size=6, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4
    )
    head = TagHeadConfig(dim=8, position_prior=[4, 4])  # a 2D map: a 2D prior grid
    model = MosmosPretrainModel(encoder, tiny_text(), embed_dim=8, num_tags=2, tag_head_config=head)
    image = torch.randn(2, 1, 32, 32)
    out = model(image, torch.ones_like(image, dtype=torch.bool), *batch()[2:])
    assert model.tag_head.level == 1 and out["attn_maps"].shape == (2, 2, 8, 8)
    with pytest.raises(ValueError, match="position_prior"):
        MosmosPretrainModel(encoder, None, num_tags=2, tag_head_config=TagHeadConfig(dim=8))


def test_tag_head_export_rebuilds_the_same_maps():
    torch.manual_seed(0)
    model = MosmosPretrainModel(
        tiny_encoder(), tiny_text(), embed_dim=8, num_tags=3, tag_head_config=HEAD
    ).eval()
    image, mask, _, _ = batch()
    head = TagAttentionHead.from_config(model.tag_attention_config())
    head.load_state_dict(model.tag_attention_state_dict())
    with torch.no_grad():
        out = model(image, mask)
        logits, attn = head(model.image_encoder.forward_features(image), mask)
    torch.testing.assert_close(logits, out["tag_logits"])
    torch.testing.assert_close(attn, out["attn_maps"])
    assert model.tag_attention_config()["config"]["level"] == 2  # resolved: stride 4 of (1, 2, 4, 8)
    with pytest.raises(ValueError, match="num_tags=0"):
        MosmosPretrainModel(tiny_encoder(), tiny_text(), num_tags=0).tag_attention_config()


def test_package_exports_resolve_lazily():
    """``import mosmos.models`` imports none of its modules (nor torch); a name imports its own
    module only, and every name in ``__all__`` resolves."""
    code = """
import sys
import mosmos.models as package
loaded = lambda: sorted(m for m in sys.modules if m.startswith("mosmos.models."))
assert loaded() == [] and "torch" not in sys.modules, loaded()
package.ClipLoss
assert loaded() == ["mosmos.models.distributed", "mosmos.models.losses"], loaded()
assert "monai" not in sys.modules and "transformers" not in sys.modules
for name in package.__all__:
    assert getattr(package, name).__name__ == name, name
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
