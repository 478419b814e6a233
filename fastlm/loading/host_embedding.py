"""offload_embedding=True: the input embedding kept in pinned host memory, read by the GPU in place.

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

Only for an input embedding the output layer does not share (tied weights would make the lm_head's GEMMs read it
over PCIe every step) and that is not trained in place (full fine-tuning; LoRA's modules_to_save trains a device
copy). On the CPU the weights are in host memory already.

Public: keep_input_embedding_on_host(model), host_mapped(tensor).
"""
import logging

import torch

logger = logging.getLogger("fastlm")

# torch.as_tensor reads __cuda_array_interface__ typestrs that NumPy knows; bf16 is not one, so the host tensor is
# handed over as the integer type of its element size and viewed back.
_SAME_SIZE_INT = {1: (torch.uint8, "<u1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4"), 8: (torch.int64, "<i8")}


class _HostArray:
    """A pinned host tensor described by __cuda_array_interface__; torch.as_tensor keeps this object (and so the
    host tensor) alive as long as the CUDA tensor made from it."""

    def __init__(self, host: torch.Tensor, typestr: str):
        self.host = host
        self.__cuda_array_interface__ = {"data": (host.data_ptr(), False), "shape": tuple(host.shape),
                                         "strides": None, "typestr": typestr, "version": 2}


def host_mapped(tensor: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor equal to `tensor` (a CUDA tensor, any shape and dtype), on its device, whose memory is pinned
    host memory (contiguous); GPU kernels read it over PCIe, and no device memory is used."""
    int_dtype, typestr = _SAME_SIZE_INT[tensor.element_size()]
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)
    with torch.cuda.device(tensor.device):
        alias = torch.as_tensor(_HostArray(host.view(int_dtype), typestr), device=tensor.device)
    return alias.view(tensor.dtype)


def keep_input_embedding_on_host(model) -> None:
    """Move `model`'s input embedding weight into pinned host memory, read in place by the GPU (module docstring).

    The weight must not train in place (full fine-tuning; from_pretrained refuses that combination): PEFT's
    modules_to_save trains a device copy and leaves this one as the frozen original.

    Raises:
        ValueError: the output layer shares the weight (tied embeddings), or there is no weight tensor.
    """
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"offload_embedding=True: the input embedding ({type(embedding).__name__}) has no weight "
                         "tensor to keep in host memory; leave offload_embedding=False.")
    output = model.get_output_embeddings()
    if output is not None and getattr(output, "weight", None) is weight:
        raise ValueError("offload_embedding=True keeps the input embedding in host memory, but this model ties it to "
                         "its output layer (tie_word_embeddings), whose matmuls read all of it at every step; leave "
                         "offload_embedding=False for this model.")
    if weight.device.type != "cuda":
        logger.info("fastlm: offload_embedding=True: the input embedding is on %s, in host memory already.",
                    weight.device)
        return
    weight.data = host_mapped(weight.data)
    logger.info("fastlm: input embedding (%s, %s, %.2f GiB) kept in pinned host memory (offload_embedding=True).",
                "x".join(map(str, weight.shape)), str(weight.dtype).replace("torch.", ""),
                weight.numel() * weight.element_size() / 2**30)
