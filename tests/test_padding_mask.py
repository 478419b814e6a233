"""Right-padded training batches whose padding carries no labels run without their attention mask
(fastlm.models.causal_lm.padding_mask_droppable); every other batch keeps it.

Each comparison trains one FastLanguageModel (fast path, fused LoRA, fp32 on the CPU) on the same batch with the
mask dropped and kept (causal_lm.DROP_PADDING_MASK) and compares loss and LoRA gradients at relative 1e-5 (the fp32
rule of issue 4): the two differ only in which attention path runs (causal against masked), so in summation order.
"""
import pytest
import torch

from fastlm.models import causal_lm
from tests.fixtures.compare import assert_same_loss_and_grads
from tests.test_length_buckets import _fast_model

RTOL = 1e-5


def _masks_seen(model) -> list:
    """A list that records the attention_mask argument the decoder gets at each call (None or its shape)."""
    seen = []

    def record(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        seen.append(None if mask is None else tuple(mask.shape))
    model.get_base_model().model.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def _padded_batch(device, length=29, pad=6, left=False):
    """Two rows, the second padded by `pad` on the right (or left); labels -100 on the padding."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 500, (2, length), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, slice(0, pad) if left else slice(length - pad, None)] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, attention_mask=mask, labels=labels).items()}


def _step(model, batch, drop: bool, monkeypatch, **extra):
    monkeypatch.setattr(causal_lm, "DROP_PADDING_MASK", drop)
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **extra).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen3", "phi3"])
def test_right_padding_runs_without_mask(tiny_checkpoint, model_type, monkeypatch):
    """gemma2: sliding-window layers and logit softcapping, built by transformers from no mask as from a mask."""
    model = _fast_model(tiny_checkpoint, model_type, monkeypatch)
    masks = _masks_seen(model)
    batch = _padded_batch(model.device)
    kept = _step(model, batch, False, monkeypatch)
    dropped = _step(model, batch, True, monkeypatch)
    assert masks == [(2, 29), None]
    assert_same_loss_and_grads(kept, dropped, RTOL, "mask dropped vs kept")


def test_pre_shifted_labels(tiny_checkpoint, monkeypatch):
    """shift_labels (position t predicts shift_labels[t]): the padding's own entries are checked."""
    model = _fast_model(tiny_checkpoint, "llama", monkeypatch)
    masks = _masks_seen(model)
    batch = _padded_batch(model.device)
    shifted = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], dim=1)
    kept = _step(model, batch, False, monkeypatch, shift_labels=shifted)
    dropped = _step(model, batch, True, monkeypatch, shift_labels=shifted)
    labelled = shifted.clone()
    labelled[1, -2] = 7  # a padded position with a label: the mask stays
    _step(model, batch, True, monkeypatch, shift_labels=labelled)
    assert masks == [(2, 29), None, (2, 29)]
    assert_same_loss_and_grads(kept, dropped, RTOL, "mask dropped vs kept, pre-shifted labels")


def test_mask_kept(tiny_checkpoint, monkeypatch):
    """Kept: a padded position that the loss reads (its label, shifted by one, is not -100), left padding,
    position_ids given (packed sequences), a cache under either name, evaluation mode. Dropped: a mask of ones, and
    a label on the first padded position (the last real position predicts it, with the same output either way)."""
    model = _fast_model(tiny_checkpoint, "llama", monkeypatch)
    masks = _masks_seen(model)
    monkeypatch.setattr(causal_lm, "DROP_PADDING_MASK", True)
    labelled = _padded_batch(model.device)
    labelled["labels"][1, -3] = 7  # predicted by padded position -4
    model(**labelled)
    model(**_padded_batch(model.device, left=True))
    model(**_padded_batch(model.device), position_ids=torch.arange(29, device=model.device).repeat(2, 1))
    from transformers import DynamicCache
    for name in ("past_key_values", "cache"):  # transformers 5.2x names it cache, and takes past_key_values as well
        model(**_padded_batch(model.device), use_cache=True, **{name: DynamicCache(config=model.config)})
    model.eval()
    model(**_padded_batch(model.device))
    model.train()
    ones = _padded_batch(model.device, pad=0)
    model(**ones)
    assert masks == [(2, 29)] * 6 + [None]
    first = _padded_batch(model.device)
    first["labels"][1, -6] = 7  # the first padded position's own label: read by the last real position, unchanged
    model(**first)
    assert masks[-1] is None


def test_fused_head_hook_drops_only_what_the_rule_allows():
    """causal_lm.drop_padding_mask_for_fused_head (before TRL's fused LM head): the mask goes only for a call with
    fused_lm_head=True, in training with grad, when padding_mask_droppable says so; other calls pass unchanged."""
    module = torch.nn.Linear(1, 1)
    batch = _padded_batch("cpu")
    hook = causal_lm.drop_padding_mask_for_fused_head
    args, kwargs = hook(module, (), {**batch, "fused_lm_head": True})
    assert kwargs["attention_mask"] is None and kwargs["labels"] is batch["labels"] and args == ()
    assert hook(module, (), dict(batch)) is None  # fastlm's own loss decides there (causal_lm_forward)
    assert hook(module, (), {**_padded_batch("cpu", left=True), "fused_lm_head": True}) is None
    labelled = {**batch, "labels": batch["input_ids"], "fused_lm_head": True}
    assert hook(module, (), labelled) is None  # the padding carries labels
    shifted = {**batch, "shift_labels": batch["labels"], "labels": None, "fused_lm_head": True}
    assert hook(module, (), shifted)[1]["attention_mask"] is None  # pre-shifted targets, none on the padding
    assert hook(module, (), {**shifted, "shift_labels": batch["input_ids"]}) is None
    with torch.no_grad():
        assert hook(module, (), {**batch, "fused_lm_head": True}) is None
    module.eval()
    assert hook(module, (), {**batch, "fused_lm_head": True}) is None
