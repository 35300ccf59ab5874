"""llama.cpp's side of bench/bench_context.py, run by a Python that has ``llama-cpp-python`` and ``gguf``
(a bench-only environment; neither is a dependency of lmforge, and this file imports no torch):

    python -m venv /tmp/llamaenv && /tmp/llamaenv/bin/pip install llama-cpp-python gguf safetensors numpy
    python bench/bench_context.py --llama-cpp /tmp/llamaenv/bin/python

``convert FOLDER OUT.gguf TYPE`` writes a transformers GPT-2 folder (model.safetensors, config.json,
tokenizer.json) as a GGUF file of llama.cpp's ``gpt2`` architecture, its matrices in TYPE (f32, bf16 or
q8_0; norms, biases and position embeddings stay f32, as llama.cpp's own converter leaves them). ``time FILE PROMPT_IDS NEW
THREADS`` prints, as JSON, each greedy token's arrival time (seconds from the start of generation) and
the tokens; ``logits FILE PROMPT_IDS OUT.npy`` saves the logits at every prompt position.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

# transformers' GPT-2 names → llama.cpp's; Conv1D matrices are stored (in, out) and are transposed
NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
         "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def convert(folder: str, out: str, kind: str) -> None:
    import gguf
    from safetensors.numpy import load_file

    config = json.load(open(f"{folder}/config.json"))
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(f"{folder}/model.safetensors").items()}
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    w = gguf.GGUFWriter(out, "gpt2")
    w.add_context_length(config["n_positions"])
    w.add_embedding_length(config["n_embd"])
    w.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    w.add_block_count(config["n_layer"])
    w.add_head_count(config["n_head"])
    w.add_layer_norm_eps(config["layer_norm_epsilon"])
    w.add_file_type({"f32": 0, "bf16": 32, "q8_0": 7}[kind])
    # the bench feeds token ids, so a folder without a tokenizer gets placeholder pieces and no merges
    try:
        vocab = json.load(open(f"{folder}/tokenizer.json"))["model"]
    except FileNotFoundError:
        vocab = {"vocab": {}, "merges": ["<unused0> <unused1>"]}  # llama.cpp wants at least one merge
    tokens = [t for t, _ in sorted(vocab["vocab"].items(), key=lambda kv: kv[1])]
    tokens += [f"<unused{i}>" for i in range(config["vocab_size"] - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
    w.add_bos_token_id(config.get("bos_token_id") or 0)
    w.add_eos_token_id(config.get("eos_token_id") or 0)

    def add(name: str, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data.astype(np.float32))
        # position embeddings stay f32 as in llama.cpp's converter (its q8_0 GET_ROWS on them crashes)
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32 and name != "position_embd.weight":
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)

    add("token_embd.weight", tensors["wte.weight"])
    add("position_embd.weight", tensors["wpe.weight"])
    for i in range(config["n_layer"]):
        for hf, ours in NAMES.items():
            weight = tensors[f"h.{i}.{hf}.weight"]
            add(f"blk.{i}.{ours}.weight", weight.T if weight.ndim == 2 else weight)
            add(f"blk.{i}.{ours}.bias", tensors[f"h.{i}.{hf}.bias"])
    add("output_norm.weight", tensors["ln_f.weight"])
    add("output_norm.bias", tensors["ln_f.bias"])
    add("output.weight", tensors.get("lm_head.weight", tensors["wte.weight"]))  # tied: the embedding
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def time_greedy(path: str, prompt: list[int], new: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=len(prompt) + new + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=len(prompt), verbose=False)
    times, tokens = [], []
    start = time.perf_counter()
    # generate() yields each sampled token and never stops on its own (the end token included)
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter() - start)
        tokens.append(int(token))
        if len(tokens) == new:
            break
    return {"times": times, "tokens": tokens}


def prompt_logits(path: str, prompt: list[int], out: str) -> None:
    """llama.cpp's logits at every prompt position, saved as .npy (the bench checks the conversion with them)."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=len(prompt) + 8, n_batch=len(prompt), logits_all=True, verbose=False)
    llm.eval(prompt)
    np.save(out, np.asarray(llm.scores[: len(prompt)], dtype=np.float32))


if __name__ == "__main__":
    if sys.argv[1] == "convert":
        convert(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "logits":
        prompt_logits(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
    elif sys.argv[1] == "time":
        print(json.dumps(time_greedy(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
    else:
        raise SystemExit(__doc__)
