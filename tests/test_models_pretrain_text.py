"""The text encoder wrapper: pretrained loading, pooling, the frozen cache."""

import pytest
import torch
from transformers import AutoTokenizer

from mosmos.models import TextEncoder, build_small_bert
from tests.test_models_pretrain import REPORTS, TINY_BERT, batch, tiny_text, tiny_tokenizer

torch.set_num_threads(2)


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
