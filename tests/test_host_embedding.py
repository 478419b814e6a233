"""offload_embedding=True (fastlm/loading/host_embedding.py): the input embedding in pinned host memory.

CPU: the refusals (tied embeddings, full fine-tuning, a non-bool) and the CPU case (nothing to move, training runs).
GPU: the host-mapped tensor equals its source, uses no device memory and outlives every other reference; a LoRA
model with the offloaded embedding gives the same loss, LoRA gradients and generated tokens as the same model
without it, with the embedding's size less allocated device memory; PEFT's modules_to_save trains a device copy.
"""
import gc

import pytest
import torch

from fastlm import FastLanguageModel
from fastlm.loading.host_embedding import host_mapped
from tests.test_offload_checkpointing import _batch


def _lora(path, offload, **peft):
    model, _ = FastLanguageModel.from_pretrained(path, load_in_16bit=True, dtype=torch.float32, max_seq_length=64,
                                                 offload_embedding=offload)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, **peft)
    with torch.no_grad():  # random B, so that every LoRA gradient is non-zero
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model


# ---------------------------------------------------------------- CPU

def test_tied_embeddings_are_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="ties it to its output layer"):
        FastLanguageModel.from_pretrained(tiny_checkpoint("gemma"), load_in_16bit=True, offload_embedding=True)


def test_full_finetuning_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="full_finetuning=True trains it"):
        FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), full_finetuning=True, offload_embedding=True)


def test_offload_embedding_must_be_a_bool(tiny_checkpoint):
    with pytest.raises(TypeError, match="offload_embedding must be True or False"):
        FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), offload_embedding="auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU case")
def test_on_the_cpu_nothing_moves_and_training_runs(tiny_checkpoint):
    model = _lora(tiny_checkpoint("llama"), True)
    assert model.get_input_embeddings().weight.device.type == "cpu"
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


@pytest.mark.gpu
def test_gpu_offloaded_embedding_trains_and_generates_like_on_device(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    results = {}
    for offload in (False, True):
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model = _lora(path, offload)
        weight = model.get_input_embeddings().weight
        assert weight.is_cuda and model.device.type == "cuda"
        allocated = torch.cuda.memory_allocated() - before
        loss = model(**_batch("cuda")).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        with torch.no_grad():
            tokens = model.generate(input_ids=_batch("cuda")["input_ids"][:1, :5], max_new_tokens=6, do_sample=False)
        results[offload] = (allocated, loss.detach(), grads, tokens, weight.numel() * weight.element_size())
        del model, weight, loss
    (on_device, loss, grads, tokens, size), (offloaded, loss_h, grads_h, tokens_h, _) = results[False], results[True]
    assert 0 <= on_device - offloaded - size < 2**20  # the embedding's size, to the allocator's rounding
    # The same kernels read the same values (from host memory instead of device memory): equal to the bit.
    assert torch.equal(loss, loss_h) and torch.equal(tokens, tokens_h)
    assert grads.keys() == grads_h.keys() and all(torch.equal(grads[n], grads_h[n]) for n in grads)


@pytest.mark.gpu
def test_gpu_modules_to_save_trains_a_device_copy(tiny_checkpoint):
    model = _lora(tiny_checkpoint("llama"), True, modules_to_save=["embed_tokens"])
    wrapper = model.base_model.model.model.embed_tokens  # PEFT's ModulesToSaveWrapper
    original, trained = wrapper.original_module.weight, wrapper.modules_to_save["default"].weight
    assert trained.requires_grad and not original.requires_grad and trained.data_ptr() != original.data_ptr()
    kept = original.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**_batch("cuda")).loss.backward()
    optimizer.step()
    assert not torch.equal(trained.detach().to(kept.dtype), kept) and torch.equal(original, kept)
