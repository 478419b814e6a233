"""The causal-LM forward with the fused linear cross-entropy: the loss without materialising the logits.

Bound as the forward of the *ForCausalLM instance. With `labels`, it runs the decoder (the base model under
`base_model_prefix`) and computes transformers' ForCausalLMLoss (labels shifted by one, ignore_index -100,
sum / num_items_in_batch when the Trainer passes it, Gemma 2/3 final-logit softcapping) with
fastlm.kernels.cross_entropy.fused_linear_cross_entropy from the final hidden states and lm_head's weight
(and bias); the returned `logits` are then **None** (nothing of size (B, T, vocab) is ever held). Without
labels it is the class's own forward, logits (and logits_to_keep) as usual. An lm_head kept in host memory
(offload_lm_head=True, fastlm.loading.host_weights) is streamed to the GPU by the loss.

When PEFT wraps the model, PeftModelForCausalLM -> LoraModel -> this forward; an lm_head trained through
modules_to_save (a ModulesToSaveWrapper) contributes its active trained copy's weight. Where the fused loss
cannot reproduce transformers (an lm_head that is not a plain Linear, e.g. LoRA on lm_head; a custom
`loss_function`; logits_to_keep together with labels) the class forward runs instead.

In training, a batch whose attention mask only marks right padding that the loss ignores runs without the mask
(`padding_mask_droppable`): causal attention alone gives every real position the same output, and attention
without a mask takes the faster causal kernels and the saved output (fastlm/models/saved_attention.py). Only the
padded positions' own hidden states change, and nothing reads them: the loss skips them and logits are not returned.
TRL's fused LM head (`model(..., labels=..., fused_lm_head=True)`, TRL 1.x's SFTTrainer and RL trainers) runs the
decoder itself and never calls this forward; `drop_padding_mask_for_fused_head`, a forward pre-hook on the model
instance (PEFT calls it through `model(...)`), applies the same rule there.

`decoder_forward` is bound as the forward of the decoder instance under it (e.g. LlamaModel): in training under
fastlm's CUDA-graphed checkpointing it runs the layers on the batch lengthened to a length bucket
(fastlm/training/length_buckets.py) and returns the hidden states of the batch as given. Being the decoder's own
forward, it serves every caller: this loss, the class forward (logits), and callers that run the decoder
themselves, such as TRL's fused LM head (SFTTrainer since TRL 1.x computes the loss from `model.base_model(...)`).
"""
import functools
import inspect
import logging

import torch

from fastlm.kernels.cross_entropy import LabelledCount, fused_linear_cross_entropy
from fastlm.loading.host_weights import host_source
from fastlm.training import length_buckets

logger = logging.getLogger("fastlm")


def active_output_linear(lm_head):
    """The nn.Linear whose weight the lm_head applies now (PEFT's active modules_to_save copy), or None."""
    try:
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # peft not installed: no wrapper can exist
        ModulesToSaveWrapper = ()
    if isinstance(lm_head, ModulesToSaveWrapper):
        active = lm_head.active_adapters
        if lm_head.disable_adapters or any(name not in lm_head.modules_to_save for name in active):
            lm_head = lm_head.original_module
        elif len(active) == 1:
            lm_head = lm_head.modules_to_save[active[0]]
        else:
            return None
    if type(lm_head) is not torch.nn.Linear or getattr(lm_head, "_hf_hook", None) is not None:
        return None
    return lm_head


def _cache_field(output_class) -> str:
    """The cache's field name in transformers' model outputs: `cache` (5.2x) or `past_key_values` (5.17)."""
    fields = getattr(output_class, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


_REPORTED_FALLBACKS = set()  # each reason is logged once per process
DROP_PADDING_MASK = True  # False: keep every attention mask (bench/train_step.py's --padding-mask ablation)


def _fall_back(reason: str) -> None:
    if reason not in _REPORTED_FALLBACKS:
        _REPORTED_FALLBACKS.add(reason)
        logger.info("fastlm: loss through transformers' own lm_head + cross-entropy (%s).", reason)


@functools.lru_cache(maxsize=None)
def _signature(model_class):
    """(signature of model_class.forward, name of its **kwargs parameter or None)."""
    signature = inspect.signature(model_class.forward)
    var_keyword = next((name for name, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)
    return signature, var_keyword


def padding_mask_droppable(arguments: dict, loss_labels, shifted: bool, ignore_index: int) -> bool:
    """Whether the decoder can run this training batch without its attention mask, with the same loss and gradients.
    `arguments`: the forward's arguments by name (its **kwargs included).

    True when the mask (B, T) (any dtype, nonzero = real) marks right padding only (each row real tokens, then
    padding) and no padded position has a label: with `shifted` labels (B, T) position t predicts labels[t + 1],
    otherwise loss_labels[t] (pre-shifted). Then causal attention alone lets each real position see the same keys
    (earlier positions, all real) as the mask does, and the padded positions' outputs reach no loss. Also True for a
    mask of ones (transformers drops such a mask itself). Costs one device-to-host read. False with position_ids
    (packed sequences) or a cache given, or any other mask shape."""
    mask = arguments.get("attention_mask")
    if not (DROP_PADDING_MASK and torch.is_tensor(mask) and mask.dim() == 2 and torch.is_tensor(loss_labels)
            and loss_labels.shape == mask.shape and arguments.get("position_ids") is None
            and arguments.get("past_key_values") is None and arguments.get("cache") is None):
        return False
    real = mask != 0
    real_after_padding = real[:, 1:] & ~real[:, :-1]  # (B, T-1): a real token after a padded one (left padding)
    padded = ~real[:, :-1] if shifted else ~real
    targets = loss_labels[:, 1:] if shifted else loss_labels
    return not bool(real_after_padding.any() | (padded & (targets != ignore_index)).any())


# The keyword with which TRL asks for its fused LM head (trl.trainer.utils.add_fused_lm_head, TRL >= 1.0).
FUSED_HEAD_KEYWORD = "fused_lm_head"
_FUSED_HEAD_HOOKED = "_fastlm_fused_head_hook"


def drop_padding_mask_for_fused_head(module, args, kwargs):
    """Forward pre-hook (with_kwargs=True) of the model a trainer calls: the padding-mask drop for TRL's fused head.

    TRL's `model(**batch, labels=labels, fused_lm_head=True)` replaces the model's forward with one of TRL's that
    runs the decoder itself and scores only the positions whose next-token label (or pre-shifted `shift_labels`)
    is not -100, so causal_lm_forward never sees those labels. Here, before that forward, the same rule
    (padding_mask_droppable) applies: in training with grad, a right-padded mask (B, T) with no label on the padding
    is passed on as None. Positional arguments and every other call are left as they are.
    Returns (args, kwargs) with attention_mask None, or None (unchanged)."""
    if kwargs.get(FUSED_HEAD_KEYWORD) is not True or not (module.training and torch.is_grad_enabled()):
        return None
    shift_labels = kwargs.get("shift_labels")
    loss_labels = kwargs.get("labels") if shift_labels is None else shift_labels
    if not padding_mask_droppable(kwargs, loss_labels, shift_labels is None, -100):
        return None
    return args, {**kwargs, "attention_mask": None}


def hook_fused_head(model) -> None:
    """Register drop_padding_mask_for_fused_head on the causal LM `model`, once. A PeftModel around it reaches it
    through `model(...)` (PEFT >= 0.21's BaseTuner.forward), so its hooks run under PEFT too."""
    if not getattr(model, _FUSED_HEAD_HOOKED, False):
        model.register_forward_pre_hook(drop_padding_mask_for_fused_head, with_kwargs=True)
        setattr(model, _FUSED_HEAD_HOOKED, True)


def causal_lm_forward(self, *args, final_softcap_key=None, **kwargs):
    """*ForCausalLM.forward with the fused loss; same arguments as the class forward.

    Returns:
        CausalLMOutputWithPast (or a tuple when return_dict=False). With labels: `loss` is the 0-dim fp32 mean
        (or sum / num_items_in_batch) cross-entropy and `logits` is None; without labels: the class's output.
    """
    class_forward = type(self).forward
    signature, var_keyword = _signature(type(self))
    arguments = dict(signature.bind(self, *args, **kwargs).arguments)
    arguments.pop("self", None)
    extra = dict(arguments.pop(var_keyword, {})) if var_keyword else {}
    labels = arguments.pop("labels", None)
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    if labels is None:
        return class_forward(self, *args, **kwargs)
    linear = active_output_linear(self.get_output_embeddings())
    reason = None
    if linear is None:
        reason = f"lm_head is a {type(self.get_output_embeddings()).__name__}, not a plain Linear"
    elif "_loss_function" in self.__dict__ or getattr(self, "loss_type", None) not in (None, "ForCausalLM"):
        reason = "the model has its own loss function"
    elif not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        reason = "logits_to_keep is set together with labels"
    if reason is not None:
        _fall_back(reason)
        return class_forward(self, *args, **kwargs)

    shift_labels = extra.get("shift_labels")
    ignore_index = extra.get("ignore_index", -100)
    loss_labels = labels if shift_labels is None else shift_labels
    labelled_count = None  # started before the decoder, so that the loss reads it without a host sync (CUDA only)
    if torch.is_tensor(loss_labels) and loss_labels.is_cuda and not torch.cuda.is_current_stream_capturing():
        labelled_count = LabelledCount(loss_labels, ignore_index, shift_labels=shift_labels is None)
    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    if self.training and padding_mask_droppable({**extra, **arguments}, loss_labels, shift_labels is None,
                                                 ignore_index):  # extra: a past_key_values= of transformers 5.2x
        arguments["attention_mask"] = None
    outputs = getattr(self, self.base_model_prefix)(**arguments, **extra)
    hidden = outputs[0]  # (B, T, H)
    hidden_states, attentions = getattr(outputs, "hidden_states", None), getattr(outputs, "attentions", None)
    weight, bias = linear.weight, linear.bias
    if hidden.dtype != weight.dtype:  # an fp32-trained lm_head sees fp32 inputs (fastlm's upcast hook does this)
        hidden = hidden.to(weight.dtype)
    softcap = getattr(self.config, final_softcap_key, None) if final_softcap_key else None
    loss = fused_linear_cross_entropy(
        hidden.to(weight.device), weight, loss_labels, bias, ignore_index=ignore_index, softcap=softcap,
        shift_labels=shift_labels is None, num_items_in_batch=extra.get("num_items_in_batch"),
        labelled_count=labelled_count, host_weight=host_source(weight))

    from transformers.modeling_outputs import CausalLMOutputWithPast
    cache_name = _cache_field(CausalLMOutputWithPast)
    result = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=hidden_states, attentions=attentions,
                                    **{cache_name: getattr(outputs, _cache_field(type(outputs)), None)})
    return result if return_dict else result.to_tuple()


def decoder_forward(self, *args, **kwargs):
    """The decoder's forward (e.g. LlamaModel.forward; same arguments and outputs) with training batches run at their
    length bucket: when length_buckets.padded_length says so, the layers run on the batch lengthened to T' as
    length_buckets.pad_batch does, and the returned last_hidden_state (B, T, H), hidden_states and attentions are
    cut back to the batch's T (length_buckets.cut_outputs); any other call is the class's forward as it is."""
    class_forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()):  # generation and evaluation: nothing to bind or check
        return class_forward(self, *args, **kwargs)
    signature, var_keyword = _signature(type(self))
    arguments = dict(signature.bind(self, *args, **kwargs).arguments)
    arguments.pop("self", None)
    extra = dict(arguments.pop(var_keyword, {})) if var_keyword else {}
    padded_to = length_buckets.padded_length(self, arguments, extra)
    if padded_to is None:
        return class_forward(self, *args, **kwargs)
    outputs = class_forward(self, **length_buckets.pad_batch(arguments, padded_to), **extra)
    hidden, hidden_states, attentions = length_buckets.cut_outputs(
        outputs.last_hidden_state, getattr(outputs, "hidden_states", None), getattr(outputs, "attentions", None),
        length_buckets.batch_length(arguments))
    outputs.last_hidden_state = hidden
    if hidden_states is not None:
        outputs.hidden_states = hidden_states
    if attentions is not None:
        outputs.attentions = attentions
    return outputs
