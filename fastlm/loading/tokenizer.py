"""Tokenizer fixes for training: a pad token that is not eos, right padding, the context length.

Why pad must differ from eos: collators mask pad positions out of the labels; when pad == eos, the eos
that ends every example is masked too, and the fine-tuned model never learns to stop.
"""
import logging
import re

logger = logging.getLogger("fastlm")

FASTLM_PAD = "<|fastlm_pad|>"
# Tokens that some vocabularies reserve for padding, in order of preference.
_PAD_NAMES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<PAD>", "<|padding|>", "<|PAD_TOKEN|>")
# Reserved / unused slots that no text produces (Llama 3 reserved_special_token_N, BERT-style [unused0], ...).
_SPARE = re.compile(r"^<?[|\[]?(reserved|unused)[^>\]]*[|\]]?>?$", re.IGNORECASE)


def _spare_token(tokenizer):
    """A vocabulary token usable as pad: a named pad token, a reserved slot, or unk; never eos or bos."""
    vocab = tokenizer.get_vocab()
    taken = {tokenizer.eos_token, tokenizer.bos_token}
    for name in _PAD_NAMES:
        if name in vocab and name not in taken:
            return name
    spare = sorted((vocab[t], t) for t in vocab if _SPARE.match(t) and t not in taken)
    if spare:
        return spare[0][1]
    if tokenizer.unk_token is not None and tokenizer.unk_token not in taken:
        return tokenizer.unk_token
    return None


def fix_tokenizer(tokenizer, model, max_seq_length: int) -> None:
    """Give `tokenizer` a pad token distinct from eos, right padding and `model_max_length`; sync the model.

    Where no spare token exists, adds FASTLM_PAD and grows the model's embeddings (mean-initialised rows).
    The chat template is left as it is.
    """
    needs_pad = tokenizer.pad_token is None or (
        tokenizer.eos_token is not None and tokenizer.pad_token_id == tokenizer.eos_token_id)
    if needs_pad:
        spare = _spare_token(tokenizer)
        if spare is not None:
            tokenizer.pad_token = spare
        else:
            tokenizer.add_special_tokens({"pad_token": FASTLM_PAD})
            if len(tokenizer) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tokenizer))
        logger.info("fastlm: pad token set to %r (id %d), distinct from eos", tokenizer.pad_token,
                    tokenizer.pad_token_id)
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = max_seq_length
    sync_special_tokens(tokenizer, model)


def sync_special_tokens(tokenizer, model) -> None:
    """Write the tokenizer's pad id into the model's config and generation config."""
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
