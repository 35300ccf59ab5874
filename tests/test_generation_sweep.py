"""Generation against transformers' generate on settings the other tests leave out: tied logits at top-p's cut,
no_repeat_ngram_size and min_new_tokens (greedy, batched and beam search), and an empty list of prompts."""

import pytest
import torch
from test_engine import IdTokenizer

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine, beam_search
from lmforge.infer.generate import SamplingParams, generate, process_logits
from lmforge.model.checkpoint import load_model

transformers = pytest.importorskip("transformers")


def test_top_p_drops_tied_logits_at_its_cut_as_transformers_does():
    """Logits tied at top-p's cut (common in bf16) kept other tokens than transformers' TopPLogitsWarper."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0], [0.0, 3.0, 3.0, -1.0, 3.0]])
    for top_p in (0.3, 0.5, 0.7, 0.9):
        p = SamplingParams(temperature=0.8, top_p=top_p)
        expected = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(0.8)(None, logits.clone()))
        for row in range(2):
            got = process_logits(logits[row], torch.tensor([], dtype=torch.long), p)
            assert torch.equal(got.isinf(), expected[row].isinf()), (top_p, row)
            torch.testing.assert_close(got.softmax(-1), expected[row].softmax(-1))


def test_an_empty_list_of_prompts_gives_an_empty_list(hf_gpt2):
    """generate(model, []) failed with "max() arg is an empty sequence" while working out its default length."""
    model = load_model(hf_gpt2)
    assert generate(model, []) == [] and generate(model, [], num_beams=2) == [] and generate(model, [], n=2) == []


@pytest.fixture
def repetitive_gpt2(tmp_path):
    """A tiny GPT-2 of 40 tokens with sharp logits, so that greedy decoding repeats itself and ends early."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4,
                                                              n_positions=64)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4) if p.dim() > 1 else None
    hf.save_pretrained(tmp_path / "m")
    return hf, load_model(tmp_path / "m")


def _cut(tokens, ends):
    """transformers' tokens up to its first end token (it pads after it)."""
    return tokens[: next((i + 1 for i, t in enumerate(tokens) if t in ends), len(tokens))]


@pytest.mark.parametrize("ngram, least", [(1, 0), (2, 0), (3, 5), (0, 8)])
def test_no_repeat_ngram_size_and_min_new_tokens_match_transformers(repetitive_gpt2, ngram, least):
    """Neither setting existed (an unknown option), so what transformers' generate(no_repeat_ngram_size=...,
    min_new_tokens=...) gives could not be had: greedy (alone and in a batch) and beam search follow it."""
    hf, ours = repetitive_gpt2
    changed = 0
    for seed in range(3):
        torch.manual_seed(seed)
        prompt = torch.randint(0, 40, (1, 3 + 4 * seed))
        plain = beam_search(ours, prompt[0].tolist(), 1, 12)[0]
        # min_new_tokens: tokens greedy writes early, to hold back; else one it never writes, so that it repeats itself
        ends = sorted(set(plain[1:4])) if least else [next(t for t in range(40) if t not in plain)]
        options = {k: v for k, v in (("no_repeat_ngram_size", ngram), ("min_new_tokens", least)) if v}
        expected = hf.generate(prompt, do_sample=False, max_new_tokens=12, eos_token_id=ends, pad_token_id=ends[0],
                               attention_mask=torch.ones_like(prompt), **options)[0, prompt.size(1):].tolist()
        expected = _cut(expected, ends)
        params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=ends, no_repeat_ngram_size=ngram,
                                min_new_tokens=least)
        engine = Engine(ours, IdTokenizer(), max_batch=2)
        requests = [engine.add(prompt[0].tolist(), params), engine.add([5, 6, 5, 6, 5], params)]
        engine.run(requests)
        seq = requests[0].sequences[0]
        assert seq.tokens + [seq.stop_token] * (seq.stop_token is not None) == expected, seed
        changed += _cut(plain, ends) != expected
        for beams in (2, 3):
            expected = hf.generate(prompt, do_sample=False, num_beams=beams, num_return_sequences=2, max_new_tokens=12,
                                   eos_token_id=ends, pad_token_id=ends[0], attention_mask=torch.ones_like(prompt),
                                   **options)[:, prompt.size(1):].tolist()
            got = beam_search(ours, prompt[0].tolist(), beams, 12, eos_ids=tuple(ends), n=2, no_repeat_ngram_size=ngram,
                              min_new_tokens=least)
            assert [tokens for tokens, _ in got] == [_cut(e, ends) for e in expected], (seed, beams)
    assert changed  # (the setting changed greedy's answer)


def test_no_repeat_ngram_size_and_min_new_tokens_in_the_python_api(hf_gpt2):
    model = load_model(hf_gpt2)
    out = generate(model, "a a a a", max_new_tokens=20, temperature=0, no_repeat_ngram_size=2, stop_token_ids=[])
    pairs = list(zip(out.token_ids, out.token_ids[1:]))
    assert len(pairs) == len(set(pairs))
    beams = generate(model, "a a a a", max_new_tokens=8, num_beams=2, no_repeat_ngram_size=1)
    assert len(beams.token_ids) == len(set(beams.token_ids))
    for bad in (dict(no_repeat_ngram_size=-1), dict(min_new_tokens=-2), dict(min_new_tokens=1.5)):
        with pytest.raises(LmforgeError, match="bad sampling option"):
            generate(model, "a", max_new_tokens=3, **bad)
