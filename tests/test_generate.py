import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.generate import SamplingParams, generate, generate_ids, process_logits, stream_generate
from lmforge.model.checkpoint import load_model, load_tokenizer_for

transformers = pytest.importorskip("transformers")


def test_greedy_is_token_identical_to_transformers_generate(hf_gpt2):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_gpt2)).eval()
    ours = load_model(hf_gpt2)
    for seed in range(3):
        torch.manual_seed(seed)
        prompt = torch.randint(1, 1024, (1, 7))
        expected = hf.generate(prompt, do_sample=False, max_new_tokens=40, eos_token_id=None, pad_token_id=0)
        got = list(generate_ids(ours, prompt[0].tolist(), SamplingParams(max_new_tokens=40, temperature=0), set()))
        assert got == expected[0, 7:].tolist()


def test_logit_processing_matches_transformers_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(300) * 3
    history = torch.randint(0, 300, (40,))
    p = SamplingParams(temperature=0.7, top_k=50, top_p=0.8, repetition_penalty=1.3)
    expected = logits[None].clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.8)):
        expected = proc(history[None], expected)
    torch.testing.assert_close(process_logits(logits, history, p), expected[0])


def test_seeded_sampling_is_reproducible(hf_gpt2):
    model = load_model(hf_gpt2)
    run = lambda seed: generate(model, "def f(x):", max_new_tokens=30, temperature=1.0, top_p=0.95, seed=seed).token_ids  # noqa: E731
    assert run(1) == run(1)
    assert run(1) != run(2)
    before = torch.get_rng_state()
    run(3)
    assert torch.equal(before, torch.get_rng_state())  # a seeded run leaves global randomness alone


def test_stop_strings_and_streaming(hf_gpt2):
    model = load_model(hf_gpt2)
    tok = load_tokenizer_for(model)
    full = generate(model, "import", max_new_tokens=40, temperature=0).text
    assert len(full) > 10
    stop = full[5:8]
    cut = full[: full.find(stop)]
    result = {}
    pieces = list(stream_generate(model, tok, "import", SamplingParams(max_new_tokens=40, temperature=0, stop=[stop]), result))
    assert "".join(pieces) == cut == result["generation"].text
    assert result["generation"].finish_reason == "stop"
    pieces = list(stream_generate(model, tok, "import", SamplingParams(max_new_tokens=40, temperature=0), result))
    assert "".join(pieces) == full and len(pieces) > 1  # streamed piece by piece
    assert result["generation"].finish_reason == "length"


def test_end_of_text_stops_generation(hf_gpt2):
    model = load_model(hf_gpt2)
    tok = load_tokenizer_for(model)
    ids = generate(model, "x", max_new_tokens=20, seed=0, stop_token_ids=[]).token_ids
    # Make the first token that is new after position 2 the stop token: generation ends right there.
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    gen = generate(model, "x", max_new_tokens=20, seed=0, stop_token_ids=[ids[k]])
    assert gen.token_ids == ids[:k] and gen.finish_reason == "stop"
    assert gen.text == tok.decode(ids[:k])


def test_every_end_id_of_generation_config_stops_as_in_transformers(hf_gpt2):
    """Chat models list several end ids (Qwen2.5: <|im_end|> and <|endoftext|>; Llama 3: three); transformers'
    generate stops at any of them, and so does lmforge (it kept only the first)."""
    import json

    ids = generate(load_model(hf_gpt2), "x", max_new_tokens=20, temperature=0, stop_token_ids=[]).token_ids
    k = max(i for i in range(len(ids)) if ids[i] not in ids[:i] and ids[i] != 0)  # the last new token
    (hf_gpt2 / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [0, ids[k]]}))
    gen = generate(load_model(hf_gpt2), "x", max_new_tokens=20, temperature=0)
    assert gen.token_ids == ids[:k] and gen.finish_reason == "stop"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_gpt2)).eval()
    prompt = torch.tensor([load_tokenizer_for(load_model(hf_gpt2)).encode("x") or [0]])
    expected = hf.generate(prompt, do_sample=False, max_new_tokens=20, pad_token_id=0)
    assert expected[0, prompt.shape[1]:].tolist() == ids[: k + 1]  # (transformers keeps the end token)


def test_the_sampling_a_folders_generation_config_recommends_is_the_default(hf_gpt2, tmp_path, capsys):
    """do_sample true with temperature/top_k/... (Qwen2.5-, Llama-3-Instruct): transformers samples with them
    (and top_k 50 where unsaid); so do generate, chat and serve where the user sets none; a setting given wins,
    and beam search, which samples nothing, is not refused for them."""
    import json
    import shutil

    from lmforge.cli import main
    from lmforge.infer.sampling import recommended_sampling
    from lmforge.serve.server import CompletionBody, Metrics, OpenAIService, ServerSettings

    plain = tmp_path / "plain"
    shutil.copytree(hf_gpt2, plain)
    config = json.loads((hf_gpt2 / "generation_config.json").read_text())
    (hf_gpt2 / "generation_config.json").write_text(json.dumps(
        {**config, "do_sample": True, "temperature": 0.5, "top_p": 0.9, "repetition_penalty": 1.3}))
    model = load_model(hf_gpt2)
    wanted = dict(temperature=0.5, top_p=0.9, top_k=50, min_p=0.0, repetition_penalty=1.3)
    assert recommended_sampling(model) == wanted
    assert recommended_sampling(load_model(plain)) == {}
    # a model saved again (after full fine-tuning, say) keeps its folder's recommendation, as save_pretrained does
    from lmforge.model.checkpoint import save_model

    save_model(model, tmp_path / "again")
    assert recommended_sampling(load_model(tmp_path / "again")) == wanted
    run = lambda folder, **kw: generate(folder, "def f", max_new_tokens=24, seed=3, chat=False, **kw).token_ids  # noqa: E731
    assert run(hf_gpt2) == run(plain, **wanted) != run(plain)
    assert run(hf_gpt2, temperature=0) == run(plain, temperature=0, repetition_penalty=1.3)  # (given wins)
    assert generate(hf_gpt2, "def f", max_new_tokens=4, num_beams=2, chat=False).finish_reason
    capsys.readouterr()
    assert main(["generate", "def f", "--model", str(hf_gpt2), "--max-new-tokens", "24", "--seed", "3", "--raw",
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "sampling: temperature 0.5, top_p 0.9, top_k 50, repetition_penalty 1.3, as" in err
    assert out.rstrip("\n") == generate(plain, "def f", max_new_tokens=24, seed=3, chat=False, **wanted).text
    service = OpenAIService(model, load_tokenizer_for(model), ServerSettings(), Metrics())
    unset = service.sampling(CompletionBody(prompt="x"), 4, 1, None)
    told = service.sampling(CompletionBody(prompt="x", temperature=1.0, top_k=-1), 4, 1, None)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.repetition_penalty) == (0.5, 0.9, 50, 1.3)
    assert (told.temperature, told.top_p, told.top_k) == (1.0, 0.9, 0)


def test_prompt_longer_than_the_context(hf_gpt2):
    model = load_model(hf_gpt2)  # context 64
    prompt = "word " * 200
    with pytest.raises(LmforgeError, match="exceeds the model's context of 64.*--truncate"):
        generate(model, prompt, max_new_tokens=10)
    gen = generate(model, prompt, max_new_tokens=10, temperature=0, truncate=True)
    assert gen.prompt_tokens == 54 and len(gen.token_ids) == 10
    with pytest.raises(LmforgeError, match="must be below the model's context"):
        generate(model, "x", max_new_tokens=64)


def test_bad_sampling_options(hf_gpt2):
    model = load_model(hf_gpt2)
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_new_tokens": 0}, {"seed": 2**64},
                {"seed": -(2**63) - 1}, {"seed": 2**64 - 1, "n": 2}):
        with pytest.raises(LmforgeError, match="bad sampling option"):
            generate(model, "x", **bad)


def test_empty_prompt_starts_from_end_of_text(hf_gpt2):
    gen = generate(hf_gpt2, "", max_new_tokens=5, temperature=0, stop_token_ids=[])
    assert gen.prompt_tokens == 1 and len(gen.token_ids) == 5


@pytest.mark.parametrize("options", [[], ["-n", "2"], ["--num-beams", "2"]], ids=["stream", "n2", "beams"])
def test_generate_truncate_warns_once(hf_gpt2, capsys, options):
    from lmforge.cli import main

    capsys.readouterr()
    assert main(["generate", "word " * 200, "--model", str(hf_gpt2), "--truncate", "--max-new-tokens", "5",
                 "--temperature", "0", "--device", "cpu", *options]) == 0
    err = capsys.readouterr().err
    assert err.count("left-truncated to its last 59") == 1, err
