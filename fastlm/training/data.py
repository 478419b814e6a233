"""Training data: read a file or `datasets` directory, pick the format, tokenize with label masks, collate.

Three formats, chosen by the field names (given, or found in the data):
    text        one string per example; every token is a label
    instruction a prompt and a response; rendered with the tokenizer's chat template as a user turn and an
                assistant turn; only the response tokens are labels
    chat        a list of {"role", "content"} messages; rendered with the tokenizer's chat template; only
                assistant tokens are labels (as Unsloth's `train_on_responses_only`)

An encoded example is {"input_ids": list[int], "labels": list[int]} with labels -100 where no loss is taken.
The first label of every example is -100: a causal LM never predicts its first token, and so the count of label
tokens (the `num_items_in_batch` the Trainer divides the summed loss by) is the same whether or not the count
skips position 0 (transformers 5.24 does, older versions did not), and a packed row never predicts one example's
first token from the end of the one before.
"""
import csv
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

IGNORE = -100
_FILE_KINDS = (".jsonl", ".json", ".csv", ".parquet")


class DataError(SystemExit):
    """A one-line error about the user's data (exits the command with the message)."""

    def __init__(self, message: str):
        super().__init__(f"fastlm: {message}")


def read_rows(path: str) -> dict:
    """{"train": rows, "test": rows} from a JSONL/JSON/CSV/Parquet file or a `datasets` directory.

    Rows with a "split" field equal to "test" (files), or a "test"/"validation" split (datasets directories),
    are held out for evaluation. Raises DataError for a missing or unreadable path or an empty dataset.
    """
    if not os.path.exists(path):
        raise DataError(f"data path '{path}' does not exist; pass --data FILE (.jsonl/.json/.csv/.parquet) or a "
                        "`datasets` directory.")
    try:
        if os.path.isdir(path):
            splits = _read_dataset_dir(path)
        else:
            rows = _read_file(path)
            splits = {"train": [r for r in rows if r.get("split", "train") != "test"],
                      "test": [r for r in rows if r.get("split") == "test"]}
    except DataError:
        raise
    except Exception as err:  # any parser's error: the user needs the file and the reason, on one line
        reason = " ".join(str(err).split())[:200]
        raise DataError(f"cannot read data '{path}': {type(err).__name__}: {reason}") from None
    if not splits["train"]:
        raise DataError(f"data '{path}' holds no training examples; check the file (rows whose split is 'test' are "
                        "held out).")
    return splits


def _read_file(path: str) -> list:
    kind = os.path.splitext(path)[1].lower()
    if kind == ".jsonl":
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif kind == ".json":
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
        if isinstance(loaded, dict) and len(loaded) == 1 and isinstance(next(iter(loaded.values())), list):
            loaded = next(iter(loaded.values()))  # {"data": [...]}
        if not isinstance(loaded, list):
            raise DataError(f"'{path}' must hold a JSON list of objects (or one key whose value is that list).")
        rows = loaded
    elif kind == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif kind == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading Parquet needs pyarrow: pip install pyarrow") from None
        rows = pq.read_table(path).to_pylist()
    else:
        raise DataError(f"data file '{path}' has an unknown extension; use one of {', '.join(_FILE_KINDS)} or a "
                        "`datasets` directory.")
    if rows and not all(isinstance(r, dict) for r in rows):
        raise DataError(f"'{path}' must hold one object (a dict of fields) per example.")
    return rows


def _read_dataset_dir(path: str) -> dict:
    try:
        import datasets
    except ImportError:
        raise DataError("reading a `datasets` directory needs the datasets package: pip install datasets") from None
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        held_out = next((s for s in ("test", "validation") if s in loaded), None)
        train_name = "train" if "train" in loaded else next(s for s in loaded if s != held_out)
        return {"train": loaded[train_name].to_list(), "test": loaded[held_out].to_list() if held_out else []}
    return {"train": loaded.to_list(), "test": []}


@dataclass
class DataFormat:
    """Which fields hold the examples. kind: "text", "instruction" or "chat"."""
    kind: str
    text_field: Optional[str] = None
    prompt_field: Optional[str] = None
    response_field: Optional[str] = None
    messages_field: Optional[str] = None

    @property
    def fields(self) -> List[str]:
        return [f for f in (self.text_field, self.prompt_field, self.response_field, self.messages_field) if f]


def choose_format(rows: list, text_field=None, prompt_field=None, response_field=None, messages_field=None,
                  where: str = "the data") -> DataFormat:
    """The format from the field options, or, when none is given, from the fields found
    ("prompt"+"response", then "messages", then "text"). Raises DataError naming the fields found."""
    found = sorted(rows[0])
    if messages_field:
        chosen = DataFormat("chat", messages_field=messages_field)
    elif text_field:
        chosen = DataFormat("text", text_field=text_field)
    elif prompt_field or response_field:
        chosen = DataFormat("instruction", prompt_field=prompt_field or "prompt",
                            response_field=response_field or "response")
    elif {"prompt", "response"} <= set(found):
        chosen = DataFormat("instruction", prompt_field="prompt", response_field="response")
    elif "messages" in found:
        chosen = DataFormat("chat", messages_field="messages")
    elif "text" in found:
        chosen = DataFormat("text", text_field="text")
    else:
        raise DataError(f"{where} has no 'prompt'/'response', 'messages' or 'text' field; its fields are "
                        f"{found}. Name yours with --text-field, --prompt-field/--response-field or --messages-field.")
    for index, row in enumerate(rows):
        missing = [f for f in chosen.fields if f not in row]
        if missing:
            raise DataError(f"example {index} of {where} has no field {missing[0]!r}; its fields are {sorted(row)}. "
                            "Name the right one with --text-field, --prompt-field/--response-field or "
                            "--messages-field.")
    return chosen


def _chat_ids(tokenizer, messages: list, add_generation_prompt: bool = False) -> list:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                              return_dict=False))


def encode_chat(tokenizer, messages: list) -> dict:
    """Token ids of `messages` rendered by the tokenizer's chat template; labels only on assistant turns.

    Each assistant turn's tokens are those the full rendering adds after the rendering of the conversation before
    it with the generation prompt (the assistant header), so the header itself is not a label.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template; use --text-field for plain text, or a chat model.")
    full_ids = _chat_ids(tokenizer, messages)
    labels = [IGNORE] * len(full_ids)
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        header = _chat_ids(tokenizer, messages[:turn], add_generation_prompt=True)
        through = _chat_ids(tokenizer, messages[:turn + 1])
        start, end = len(header), len(through)
        if full_ids[:end] != through or through[:start] != header:
            raise DataError("the tokenizer's chat template renders earlier turns differently as the conversation "
                            "grows, so assistant tokens cannot be located; use --text-field instead.")
        labels[start:end] = full_ids[start:end]
    return {"input_ids": full_ids, "labels": labels}


def encode(tokenizer, row: dict, data_format: DataFormat, max_seq_length: int, index: int = 0) -> dict:
    """One example -> {"input_ids", "labels"} (+ "truncated": True when cut to max_seq_length); a prompt that does
    not fit below max_seq_length raises DataError."""
    if data_format.kind == "text":
        ids = tokenizer(str(row[data_format.text_field]), add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        example = {"input_ids": ids, "labels": list(ids)}
        prompt_length = 0
    else:
        if data_format.kind == "instruction":
            messages = [{"role": "user", "content": str(row[data_format.prompt_field])},
                        {"role": "assistant", "content": str(row[data_format.response_field])}]
        else:
            messages = row[data_format.messages_field]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise DataError(f"example {index}: field {data_format.messages_field!r} must be a list of "
                                "{'role': ..., 'content': ...} messages.")
        example = encode_chat(tokenizer, messages)
        prompt_length = next((i for i, label in enumerate(example["labels"]) if label != IGNORE),
                             len(example["labels"]))
    if prompt_length >= max_seq_length:
        raise DataError(f"example {index} has a prompt of {prompt_length} tokens, not below --max-seq-length "
                        f"{max_seq_length}: raise --max-seq-length to at least {prompt_length + 1} or shorten it.")
    truncated = len(example["input_ids"]) > max_seq_length
    example = {key: value[:max_seq_length] for key, value in example.items()}
    example["labels"][0] = IGNORE
    if truncated:
        example["truncated"] = True  # counted and reported by the caller; collators read input_ids/labels only
    return example


def prompt_and_answer(row: dict, data_format: DataFormat):
    """(messages to generate from, expected answer) for exact-match evaluation, or None for plain text."""
    if data_format.kind == "instruction":
        return [{"role": "user", "content": str(row[data_format.prompt_field])}], str(row[data_format.response_field])
    if data_format.kind == "chat":
        messages = row[data_format.messages_field]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        return (messages[:last], str(messages[last]["content"])) if last else None  # None or 0: no prompt
    return None


class Collator:
    """Batches encoded examples.

    padded (packing=False): input_ids/labels/attention_mask of shape (B, longest), right-padded.
    packed (packing=True): the B examples concatenated into ONE row, shape (1, sum of lengths), no padding, with
        position_ids restarting at 0 for every example, no attention_mask and use_cache=False: transformers then
        builds a mask
        that keeps attention inside each example (its packed-sequence detection from position_ids on sdpa/eager;
        varlen kernels with flash attention). Each example's first label is -100 (see the module docstring).
    `tokens_seen` counts the non-padding tokens collated (for tokens/s).
    """

    def __init__(self, pad_token_id: int, packing: bool = False):
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.tokens_seen = 0

    def __call__(self, examples: list) -> dict:
        self.tokens_seen += sum(len(e["input_ids"]) for e in examples)
        if self.packing:
            ids = torch.tensor([t for e in examples for t in e["input_ids"]]).unsqueeze(0)
            labels = torch.tensor([t for e in examples for t in e["labels"]]).unsqueeze(0)
            positions = torch.cat([torch.arange(len(e["input_ids"])) for e in examples]).unsqueeze(0)
            # use_cache=False: transformers detects packed rows only when no KV cache is made (it is made in eval
            # mode, and in train mode without gradient checkpointing).
            return {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False}
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
