"""Training batches lengthened to a length bucket (fastlm/training/length_buckets.py) give the loss, the LoRA
gradients and the returned hidden states of the batch as given.

Each exactness test trains one FastLanguageModel (fast path, fused LoRA, use_gradient_checkpointing="unsloth", fp32
on the CPU) on the same batch with FASTLM_LENGTH_BUCKETS=0 and =1 and compares. Tolerance: relative 1e-5 on the
loss and on each LoRA gradient (relative to its largest element), the fp32 rule of issue 4; the padded run
multiplies matrices with more rows, which may change the CPU GEMM's blocking and so the summation order, a few
1e-7 at most.
"""
import pytest
import torch

from fastlm.training import length_buckets
from tests.fixtures.compare import assert_same_loss_and_grads
from tests.fixtures.tiny_models import SUPPORTED_TYPES

RTOL = 1e-5


def test_bucket_lengths():
    assert [length_buckets.bucket_length(n) for n in (1, 64, 65, 200, 257, 1000, 1025, 1300, 2048, 2049)] == \
        [64, 64, 128, 256, 320, 1024, 1280, 1536, 2048, 2560]
    buckets = set()
    for n in range(1, 9000):
        bucket = length_buckets.bucket_length(n)
        if n <= 2048:
            buckets.add(bucket)
        assert bucket >= n and bucket % length_buckets.MIN_BUCKET_STEP == 0
        assert bucket - n < max(length_buckets.MIN_BUCKET_STEP, n / length_buckets.BUCKETS_PER_OCTAVE), n
    assert len(buckets) == 16  # four per doubling from 64 to 2048
    with pytest.raises(ValueError, match="positive"):
        length_buckets.bucket_length(0)


def test_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv(length_buckets.SWITCH, "yes")
    with pytest.raises(ValueError, match="FASTLM_LENGTH_BUCKETS must be auto, 1 or 0"):
        length_buckets.setting()


def _fast_model(tiny_checkpoint, model_type, monkeypatch):
    from fastlm import FastLanguageModel

    monkeypatch.setenv("FASTLM_FAST_PATH", "1")
    if not torch.cuda.is_available():  # the kernels' PyTorch references (tests/kernels test the kernels): faster
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint(model_type), max_seq_length=128, load_in_16bit=True,
                                                 dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False,
                                             use_gradient_checkpointing="unsloth")
    return model.train()


def _decoder_lengths(model) -> list:
    """A list that records the sequence length the decoder's layers ran at, per call of the decoder (the base model
    under the LM head): the length of what its final norm gets (B, T, H), once per forward."""
    seen = []

    def record(module, args):
        seen.append(args[0].shape[1])
    model.get_base_model().model.norm.register_forward_pre_hook(record)
    return seen


def _run(model, batch, monkeypatch, setting, **extra):
    monkeypatch.setenv(length_buckets.SWITCH, setting)
    model.zero_grad(set_to_none=True)
    out = model(**{k: v.to(model.device) for k, v in batch.items()},
                **{k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()})
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _compare(padded, plain):
    """padded, plain: (model output, gradients) as _run returns them."""
    assert_same_loss_and_grads((plain[0].loss, plain[1]), (padded[0].loss, padded[1]), RTOL, "padded vs as given")


def _batch(kind: str, length: int = 37):
    """A training batch of `length` tokens: "padded" (two rows, the second right-padded by 5, labels -100 there),
    "left-padded" (the same padding at the start), "packed" (one row of three examples, positions restarting) or
    "plain" (two full rows, no mask)."""
    generator = torch.Generator().manual_seed(0)
    rows = 1 if kind == "packed" else 2
    input_ids = torch.randint(3, 500, (rows, length), generator=generator)
    labels = input_ids.clone()
    batch = {"input_ids": input_ids}
    if kind in ("padded", "left-padded"):
        mask = torch.ones_like(input_ids)
        mask[1, slice(0, 5) if kind == "left-padded" else slice(-5, None)] = 0
        batch["attention_mask"] = mask
        labels = labels.masked_fill(mask == 0, -100)
    if kind == "packed":
        sizes = (15, 10, length - 25)
        batch["position_ids"] = torch.cat([torch.arange(n) for n in sizes]).unsqueeze(0)
        labels[0, [0, 15, 25]] = -100
    batch["labels"] = labels
    return batch


@pytest.mark.parametrize("model_type,kind", [(t, "padded") for t in SUPPORTED_TYPES] + [
    ("llama", "packed"), ("gemma3_text", "packed"), ("qwen3", "plain")])
def test_padded_to_bucket_trains_like_the_batch_as_given(model_type, kind, tiny_checkpoint, monkeypatch):
    model = _fast_model(tiny_checkpoint, model_type, monkeypatch)
    lengths = _decoder_lengths(model)
    batch = _batch(kind)
    plain = _run(model, batch, monkeypatch, "0")
    padded = _run(model, batch, monkeypatch, "1")
    assert lengths == [37, 64], "the decoder must see the batch as given, then lengthened to its bucket"
    _compare(padded, plain)


def test_inputs_embeds_and_returned_hidden_states(tiny_checkpoint, monkeypatch):
    """inputs_embeds are lengthened with zeros; hidden states returned with output_hidden_states have the batch's
    length and the values of the unpadded run."""
    model = _fast_model(tiny_checkpoint, "gemma2", monkeypatch)
    lengths = _decoder_lengths(model)
    batch = _batch("padded")
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch.pop("input_ids").to(model.device))
    batch["inputs_embeds"] = embeds
    plain = _run(model, batch, monkeypatch, "0", output_hidden_states=True)
    padded = _run(model, batch, monkeypatch, "1", output_hidden_states=True)
    assert lengths == [37, 64]
    _compare(padded, plain)
    assert len(padded[0].hidden_states) == len(plain[0].hidden_states) == model.config.num_hidden_layers + 1
    for got, want in zip(padded[0].hidden_states, plain[0].hidden_states):
        assert got.shape == want.shape == (2, 37, model.config.hidden_size)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-6)


def test_left_as_given(tiny_checkpoint, monkeypatch):
    """No padding on a bucket length, in evaluation, without grad, with an argument the padding does not know
    (a 4-D mask, a flash-attention varlen tensor), on a left-padded batch, or by default ("auto") without
    CUDA-graphed layers."""
    model = _fast_model(tiny_checkpoint, "llama", monkeypatch)
    lengths = _decoder_lengths(model)

    def call(batch, **extra):
        model(**{k: v.to(model.device) for k, v in {**batch, **extra}.items()})
    monkeypatch.setenv(length_buckets.SWITCH, "1")
    call(_batch("plain", length=64))
    with torch.no_grad():
        call(_batch("plain"))
    model.eval()
    call(_batch("plain"))
    model.train()
    call(_batch("plain"), attention_mask=torch.ones(2, 1, 37, 37, dtype=torch.bool).tril())
    call(_batch("plain"), cu_seq_lens_q=torch.tensor([0, 37, 74], dtype=torch.int32))
    call(_batch("left-padded"))
    monkeypatch.setenv(length_buckets.SWITCH, "auto")
    call(_batch("plain"))  # on a GPU the layers are graphed: "auto" pads there
    assert lengths == [64, 37, 37, 37, 37, 37, 64 if model.device.type == "cuda" else 37]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["16bit", "4bit"])
def test_graphed_layers_take_buckets_on_gpu(precision, tiny_checkpoint, monkeypatch):
    """On CUDA with layer graphs ("auto"): batches of lengths 37, 50, 60 and 37 all run in the 64-token bucket, so
    the third and fourth replay the graphs captured by the second. Their bf16 loss and LoRA gradients are as close
    to an fp32 run without buckets as the same bf16 steps without buckets are (within 2x their error, plus 1e-3
    relative: tests/test_fused_lora.py's bf16 rule)."""
    from fastlm import FastLanguageModel
    from fastlm.training.offload import OffloadedCheckpoint

    def train(setting, dtype):
        monkeypatch.setenv(length_buckets.SWITCH, setting)
        model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_4bit=precision == "4bit",
                                                     load_in_16bit=precision == "16bit", dtype=dtype)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False,
                                                 use_gradient_checkpointing="unsloth").train()
        lengths = _decoder_lengths(model)
        results = []
        for length in (37, 50, 60, 37):
            batch = {k: v.cuda() for k, v in _batch("padded", length).items()}
            out, grads = _run(model, batch, monkeypatch, setting)
            results.append((out.loss.float(), {name: g.float() for name, g in grads.items()}))
        checkpoint = next(m._gradient_checkpointing_func for m in model.modules()
                          if isinstance(getattr(m, "_gradient_checkpointing_func", None), OffloadedCheckpoint))
        return results, lengths, checkpoint.graphs.captured()

    exact, _, _ = train("0", torch.float32)
    bucketed, bucketed_lengths, bucketed_graphs = train("auto", torch.bfloat16)
    plain, plain_lengths, _ = train("0", torch.bfloat16)
    assert bucketed_lengths == [64] * 4 and plain_lengths == [37, 50, 60, 37]
    layers = 2  # the tiny llama's: one graph per layer for the one signature all four batches share
    assert bucketed_graphs == layers
    for (loss, grads), (plain_loss, plain_grads), (exact_loss, exact_grads) in zip(bucketed, plain, exact):
        assert abs(loss - exact_loss) <= 2 * abs(plain_loss - exact_loss) + 1e-3 * abs(exact_loss)
        for name, want in exact_grads.items():
            ours, theirs = (grads[name] - want).norm(), (plain_grads[name] - want).norm()
            assert ours <= 2 * theirs + 1e-2 * want.norm(), name


def test_decoder_called_directly(tiny_checkpoint, monkeypatch):
    """A caller that runs the decoder itself and computes its own loss from the hidden states (TRL's fused LM head
    does: model.base_model(...)) gets the buckets too: the layers run at 64, the hidden states come back at 37 with
    the values, and the gradients, of the batch as given."""
    model = _fast_model(tiny_checkpoint, "qwen3", monkeypatch)
    lengths = _decoder_lengths(model)
    batch = _batch("padded")
    labels = batch.pop("labels").to(model.device)
    decoder = model.get_base_model().model

    def run(setting):
        monkeypatch.setenv(length_buckets.SWITCH, setting)
        model.zero_grad(set_to_none=True)
        hidden = decoder(**{k: v.to(model.device) for k, v in batch.items()}, use_cache=False).last_hidden_state
        logits = model.get_base_model().lm_head(hidden[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        return hidden, loss, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_hidden, plain_loss, plain_grads = run("0")
    padded_hidden, padded_loss, padded_grads = run("1")
    assert lengths == [37, 64]
    assert padded_hidden.shape == plain_hidden.shape == (2, 37, model.config.hidden_size)
    torch.testing.assert_close(padded_hidden, plain_hidden, rtol=RTOL, atol=1e-6)
    assert_same_loss_and_grads((plain_loss, plain_grads), (padded_loss, padded_grads), RTOL, "padded vs as given")


def test_decoder_left_as_given_for_tuples_and_caches(tiny_checkpoint, monkeypatch):
    """A decoder asked for a tuple (return_dict=False, or config.return_dict=False) or given a cache (under either
    of its names) runs the batch as given."""
    from transformers import DynamicCache

    model = _fast_model(tiny_checkpoint, "llama", monkeypatch)
    lengths = _decoder_lengths(model)
    monkeypatch.setenv(length_buckets.SWITCH, "1")
    decoder = model.get_base_model().model
    ids = _batch("plain")["input_ids"].to(model.device)
    assert decoder(input_ids=ids, return_dict=False)[0].shape[1] == 37
    decoder.config.return_dict = False
    try:
        assert decoder(input_ids=ids)[0].shape[1] == 37
    finally:
        decoder.config.return_dict = True
    for name in ("past_key_values", "cache"):
        out = decoder(input_ids=ids, use_cache=True, **{name: DynamicCache(config=decoder.config)})
        assert out.last_hidden_state.shape[1] == 37
    assert decoder(input_ids=ids).last_hidden_state.shape[1] == 37
    assert lengths == [37, 37, 37, 37, 64]
