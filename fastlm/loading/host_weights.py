"""offload_embedding / offload_lm_head: frozen embedding matrices kept in pinned host memory instead of on the GPU.

**offload_embedding=True: the input embedding, read by the GPU in place.**

The input embedding (V, H) is the largest frozen tensor of a LoRA run after the decoder's own weights, and it is
never used whole: a forward reads only the B x T rows of its tokens. So it can stay in host memory: its values are
copied once into pinned (page-locked) host memory, and the Parameter's data becomes a CUDA tensor that aliases that
memory (with CUDA's unified addressing, pinned host memory is mapped into the GPU's address space; the tensor is
made from a __cuda_array_interface__ through torch.as_tensor). Kernels then read the rows over PCIe where they
stand. Nothing else changes: F.embedding and every caller run as before, `model.device` is still the GPU,
`.to("cuda")` is a no-op, `copy.deepcopy` (PEFT's modules_to_save) makes an ordinary device copy, and the weight no
longer counts in torch.cuda's memory statistics. Llama-3.1-8B: 0.98 GiB less GPU memory.

Cost, measured on the H200: F.embedding of 4096 tokens x 4096 bf16 (32 MiB) takes 0.67 ms from host memory (50
GB/s, PCIe) against 0.025 ms from device memory, 8192 x 2048 the same (bench/RESULTS.md run 53); a Llama-3.1-8B
QLoRA step (batch 2 x 2048) took 349.0 ms with it and 356.0 without, at 5.94 instead of 6.92 GiB peak allocated
(run 54).

Only for an input embedding that is not trained in place (full fine-tuning; LoRA's modules_to_save trains a device
copy), and one the output layer does not share unless that layer is streamed too (tied weights would otherwise make
the lm_head's GEMMs read it over PCIe every step). On the CPU the weights are in host memory already.

**offload_lm_head=True: the output layer, streamed.** The lm_head (V, H) is read whole by every matmul, and cuBLAS
reading it over PCIe in place re-reads it for each tile of rows (332 ms for 4096 rows at 128256 x 4096, run 58).
So its weight becomes a host-mapped alias the same way, and whoever multiplies by it copies it to the GPU in
blocks, once per call (fastlm.kernels.streamed_cross_entropy): the fused loss (causal_lm_forward finds the host
copy with `host_source`) and the lm_head's own forward, set on this instance to `streamed_linear` (logits without
labels, generation). A training step then moves the weight over PCIe once (1 GiB at 8B: the loss + backward takes
20.2 ms, bound by the copies at 52 GB/s, against 14.1 ms with the weight on the GPU, run 62; the 8B QLoRA step 353.0
ms against 349.0, at 5.00 instead of 5.97 GiB peak allocated, run 61); generating a token costs ~20 ms more. Only
for a frozen, bias-free lm_head whose logits are not softcapped (ValueError otherwise). With tied embeddings (most
small models) the one matrix moves, and the input embedding's lookups read their rows from host memory as above.

Public: keep_input_embedding_on_host(model, output_streamed), keep_output_layer_on_host(model), host_mapped(tensor),
host_source(tensor).
"""
import logging
import weakref

import torch

logger = logging.getLogger("fastlm")

# torch.as_tensor reads __cuda_array_interface__ typestrs that NumPy knows; bf16 is not one, so the host tensor is
# handed over as the integer type of its element size and viewed back.
_SAME_SIZE_INT = {1: "<u1", 2: "<i2", 4: "<i4", 8: "<i8"}


class _HostArray:
    """A pinned host tensor described by __cuda_array_interface__; torch.as_tensor keeps this object (and so the
    host tensor) alive as long as the CUDA tensor made from it."""

    def __init__(self, host: torch.Tensor, typestr: str):
        self.host = host  # in its own dtype; the interface describes it as integers
        self.__cuda_array_interface__ = {"data": (host.data_ptr(), False), "shape": tuple(host.shape),
                                         "strides": None, "typestr": typestr, "version": 2}


# Host tensors behind host-mapped aliases, by address (the alias has the host tensor's address under CUDA's unified
# addressing); an entry lives as long as its host tensor, i.e. as long as some alias of it.
_HOST_SOURCES = weakref.WeakValueDictionary()


def host_mapped(tensor: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor equal to `tensor` (a CUDA tensor, any shape and dtype), on its device, whose memory is pinned
    host memory (contiguous); GPU kernels read it over PCIe, and no device memory is used."""
    typestr = _SAME_SIZE_INT[tensor.element_size()]
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)
    with torch.cuda.device(tensor.device):
        array = _HostArray(host, typestr)
        alias = torch.as_tensor(array, device=tensor.device)
    _HOST_SOURCES[host.data_ptr()] = host
    return alias.view(tensor.dtype)


def host_source(tensor: torch.Tensor):
    """The pinned host tensor a host_mapped alias reads (same shape, dtype and values), or None when `tensor` is not
    such an alias (a device tensor, a CPU tensor, a view into part of an alias)."""
    if not tensor.is_cuda:
        return None
    host = _HOST_SOURCES.get(tensor.data_ptr())
    if host is None or host.shape != tensor.shape or host.dtype != tensor.dtype or not tensor.is_contiguous():
        return None
    return host


def _described(weight: torch.Tensor) -> str:
    """E.g. "128256x4096, bfloat16, 0.98 GiB" (for the log)."""
    return (f"{'x'.join(map(str, weight.shape))}, {str(weight.dtype).replace('torch.', '')}, "
            f"{weight.numel() * weight.element_size() / 2**30:.2f} GiB")


def _on_the_host_already(weight: torch.Tensor, option: str, what: str) -> bool:
    """True (and logged) when `weight` is not on a GPU: the option has nothing to move."""
    if weight.device.type == "cuda":
        return False
    logger.info("fastlm: %s=True: the %s is on %s, in host memory already.", option, what, weight.device)
    return True


def keep_input_embedding_on_host(model, output_streamed: bool = False) -> None:
    """Move `model`'s input embedding weight into pinned host memory, read in place by the GPU (module docstring).

    The weight must not train in place (full fine-tuning; from_pretrained refuses that combination): PEFT's
    modules_to_save trains a device copy and leaves this one as the frozen original.

    output_streamed: the output layer will be kept in host memory and streamed (offload_lm_head=True): a tied
    embedding is then left to keep_output_layer_on_host, which moves the one matrix.

    Raises:
        ValueError: the output layer shares the weight (tied embeddings) and is not streamed, or there is no weight
            tensor.
    """
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"offload_embedding=True: the input embedding ({type(embedding).__name__}) has no weight "
                         "tensor to keep in host memory; leave offload_embedding=False.")
    output = model.get_output_embeddings()
    if output is not None and getattr(output, "weight", None) is weight:
        if output_streamed:
            return  # one matrix: keep_output_layer_on_host moves it
        raise ValueError("offload_embedding=True keeps the input embedding in host memory, but this model ties it to "
                         "its output layer (tie_word_embeddings), whose matmuls would read all of it over PCIe at "
                         "every step; add offload_lm_head=True (the output layer then streams it) or leave "
                         "offload_embedding=False.")
    if _on_the_host_already(weight, "offload_embedding", "input embedding"):
        return
    weight.data = host_mapped(weight.data)
    logger.info("fastlm: input embedding (%s) kept in pinned host memory (offload_embedding=True).",
                _described(weight))


def _host_output_forward(self, hidden):
    """The offloaded lm_head's forward: hidden (..., H) -> logits (..., V), the weight streamed from host memory
    (a device copy, e.g. PEFT's modules_to_save copy of this module, multiplies as usual)."""
    from fastlm.kernels.streamed_cross_entropy import streamed_linear
    host = host_source(self.weight)
    if host is None:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)
    return streamed_linear(hidden, host)


def keep_output_layer_on_host(model) -> None:
    """Move `model`'s output layer weight into pinned host memory, streamed to the GPU by the matmuls that use it
    (module docstring); its forward is set on this instance to do so.

    A tied input embedding (one matrix) is then in host memory too, where its lookups read their rows in place.

    Raises:
        ValueError: the output layer is not a bias-free nn.Linear, or the model softcaps its logits (the streamed
            loss has no softcap).
    """
    output = model.get_output_embeddings()
    if type(output) is not torch.nn.Linear or output.bias is not None:
        what = "an nn.Linear with a bias" if type(output) is torch.nn.Linear else type(output).__name__
        raise ValueError(f"offload_lm_head=True streams a bias-free nn.Linear output layer; this model's is {what}; "
                         "leave offload_lm_head=False.")
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("offload_lm_head=True: this model softcaps its logits (final_logit_softcapping), which the "
                         "streamed loss does not do; leave offload_lm_head=False.")
    weight = output.weight
    tied = weight is getattr(model.get_input_embeddings(), "weight", None)
    if _on_the_host_already(weight, "offload_lm_head", "output layer"):
        return
    from fastlm.patching import set_instance_forward  # here: fastlm.patching imports the models, which import this
    if host_source(weight) is None:
        weight.data = host_mapped(weight.data)
    set_instance_forward(output, _host_output_forward)
    logger.info("fastlm: output layer (%s%s) kept in pinned host memory, streamed to the GPU by the loss and logits "
                "(offload_lm_head=True).", _described(weight),
                "; tied: the input embedding reads its rows there" if tied else "")
