"""offload_embedding / offload_lm_head (fastlm/loading/host_weights.py): embedding matrices in pinned host memory.

CPU: the refusals (a tied embedding without its output layer streamed, full fine-tuning, a non-bool; for the lm_head
also a softcapped model and a biased layer) and the CPU case (nothing to move, training runs).
GPU: the host-mapped tensor equals its source, uses no device memory, outlives every other reference and is found
by host_source; a LoRA model with the offloaded embedding gives the same loss, LoRA gradients and generated tokens
as the same model without it (to the bit), with the embedding's size less allocated device memory; with the
offloaded lm_head (untied, or tied: then the one matrix, the embedding's lookups reading it in host memory) the same
within fp32 noise (the loss streams the weight with an online softmax, summing in another order), its size less
memory, the same logits without labels; PEFT's modules_to_save trains a device copy.
"""
import gc

import pytest
import torch

from fastlm import FastLanguageModel
from fastlm.loading.host_weights import host_mapped, host_source, keep_output_layer_on_host
from tests.fixtures.compare import assert_same_loss_and_grads
from tests.test_offload_checkpointing import _batch, _lora_model

OFFLOADS = ("offload_embedding", "offload_lm_head")


def _lora(path, peft=None, **offload):
    return _lora_model(path, "16bit", dropout=0.0, peft=peft, dtype=torch.float32, **offload)


# ---------------------------------------------------------------- CPU

def test_a_tied_embedding_needs_its_output_layer_streamed(tiny_checkpoint):
    with pytest.raises(ValueError, match="ties it to its output layer.*add offload_lm_head=True"):
        FastLanguageModel.from_pretrained(tiny_checkpoint("gemma"), load_in_16bit=True, offload_embedding=True)


def test_softcapped_logits_are_not_streamed(tiny_checkpoint):
    with pytest.raises(ValueError, match="softcaps its logits"):
        FastLanguageModel.from_pretrained(tiny_checkpoint("gemma2"), load_in_16bit=True, offload_lm_head=True)


def test_an_lm_head_with_a_bias_is_refused(tiny_checkpoint):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True)
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with pytest.raises(ValueError, match="an nn.Linear with a bias"):
        keep_output_layer_on_host(model)


@pytest.mark.parametrize("offload", OFFLOADS)
def test_full_finetuning_is_refused(tiny_checkpoint, offload):
    with pytest.raises(ValueError, match="full_finetuning=True trains it"):
        FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), full_finetuning=True, **{offload: True})


@pytest.mark.parametrize("offload", OFFLOADS)
def test_offload_flags_must_be_bools(tiny_checkpoint, offload):
    with pytest.raises(TypeError, match=f"{offload} must be True or False"):
        FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), **{offload: "auto"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU case")
@pytest.mark.parametrize("model_type", ["llama", "gemma"])  # untied, tied
def test_on_the_cpu_nothing_moves_and_training_runs(tiny_checkpoint, model_type):
    model = _lora(tiny_checkpoint(model_type), offload_embedding=True, offload_lm_head=True)
    assert model.get_input_embeddings().weight.device.type == "cpu"
    assert model.get_output_embeddings().weight.device.type == "cpu"
    model(**_batch("cpu")).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_host_mapped_tensor():
    source = torch.randn(1001, 37, device="cuda").to(torch.bfloat16)  # odd shape; bf16 goes through int16
    expected = source.clone()
    allocated = torch.cuda.memory_allocated()
    mapped = host_mapped(source)
    assert mapped.is_cuda and mapped.dtype == torch.bfloat16 and mapped.shape == source.shape
    assert torch.cuda.memory_allocated() == allocated  # no device memory
    del source
    gc.collect()
    ids = torch.randint(0, 1001, (3, 17), device="cuda")
    assert torch.equal(torch.nn.functional.embedding(ids, mapped), torch.nn.functional.embedding(ids, expected))
    assert torch.equal(mapped.to("cuda"), expected) and mapped.to("cuda").data_ptr() == mapped.data_ptr()
    assert torch.equal(mapped.cpu(), expected.cpu())
    host = host_source(mapped)
    assert host is not None and not host.is_cuda and host.is_pinned() and torch.equal(host, expected.cpu())
    assert host_source(expected) is None and host_source(mapped[1:]) is None and host_source(host) is None


def _train_and_generate(path, **offload):
    """(model, allocated device bytes after loading, (loss, LoRA grads), greedy tokens, logits without labels)."""
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = _lora(path, **offload)
    assert model.device.type == "cuda"
    allocated = torch.cuda.memory_allocated() - before
    batch = _batch("cuda")
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tokens = model.generate(input_ids=batch["input_ids"][:1, :5], max_new_tokens=6, do_sample=False)
    return model, allocated, (loss.detach(), grads), tokens, logits


@pytest.mark.gpu
def test_gpu_offloaded_embedding_trains_and_generates_like_on_device(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    _, on_device, (loss, grads), tokens, _ = _train_and_generate(path)
    model, offloaded, (loss_h, grads_h), tokens_h, _ = _train_and_generate(path, offload_embedding=True)
    weight = model.get_input_embeddings().weight
    assert 0 <= on_device - offloaded - weight.numel() * weight.element_size() < 2**20  # to the allocator's rounding
    # The same kernels read the same values (from host memory instead of device memory): equal to the bit.
    assert torch.equal(loss, loss_h) and torch.equal(tokens, tokens_h)
    assert grads.keys() == grads_h.keys() and all(torch.equal(grads[n], grads_h[n]) for n in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "gemma"])  # untied, tied (the one matrix moves)
def test_gpu_offloaded_lm_head_trains_and_generates_like_on_device(tiny_checkpoint, model_type):
    path = tiny_checkpoint(model_type)
    _, on_device, expected, tokens, logits = _train_and_generate(path)
    model, offloaded, streamed, tokens_h, logits_h = _train_and_generate(path, offload_lm_head=True)
    weight = model.get_output_embeddings().weight
    assert host_source(weight) is not None
    assert (host_source(model.get_input_embeddings().weight) is not None) == (model_type == "gemma")
    assert 0 <= on_device - offloaded - weight.numel() * weight.element_size() < 2**20
    # fp32: the streamed loss sums the softmax by vocabulary blocks and takes the label's term apart, the chunked
    # one in one pass: rounding-order differences of a few fp32 ulps, far below 1e-4 (the GPU rule elsewhere).
    assert_same_loss_and_grads(expected, streamed, rtol=1e-4, what="offload_lm_head")
    torch.testing.assert_close(logits_h, logits, rtol=1e-5, atol=1e-5)  # each block is a slice of the same matmul
    assert torch.equal(tokens, tokens_h)


@pytest.mark.gpu
@pytest.mark.parametrize("offload, module", [("offload_embedding", "embed_tokens"), ("offload_lm_head", "lm_head")])
def test_gpu_modules_to_save_trains_a_device_copy(tiny_checkpoint, offload, module):
    model = _lora(tiny_checkpoint("llama"), peft=dict(modules_to_save=[module]), **{offload: True})
    wrapper = model.get_input_embeddings() if module == "embed_tokens" else model.get_output_embeddings()
    original, trained = wrapper.original_module.weight, wrapper.modules_to_save["default"].weight
    assert trained.requires_grad and not original.requires_grad and trained.data_ptr() != original.data_ptr()
    assert host_source(original) is not None and host_source(trained) is None
    kept = original.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**_batch("cuda")).loss.backward()
    optimizer.step()
    assert not torch.equal(trained.detach().to(kept.dtype), kept) and torch.equal(original, kept)
