"""The batching engine, beam search, sampling controls, int8."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from test_families import make

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine, Request, beam_search, perplexity, prefill_groups, quantize_int8
from lmforge.infer.generate import SamplingParams, generate, process_logits
from lmforge.model.checkpoint import load_model, load_tokenizer_for

transformers = pytest.importorskip("transformers")


class IdTokenizer:
    """Token ids as text ("5 17 3 "), so the tests can reason about stop strings exactly."""

    eos_id = None

    def decode(self, ids):
        return "".join(f"{i} " for i in ids)


def one_by_one(model, prompts, params):
    out = []
    for p in prompts:
        engine = Engine(model, IdTokenizer(), max_batch=1)
        r = engine.add(p, params)
        engine.run([r])
        out.append(r.sequences[0].tokens)
    return out


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa-untied-theta", "mistral-sliding-window"])
def test_batched_greedy_equals_one_by_one(case, tmp_path, hf_gpt2):
    model = load_model(hf_gpt2) if case == "gpt2" else load_model(make(tmp_path / "m", case) and tmp_path / "m")
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,)).tolist() for n in (3, 11, 1, 7, 5)]
    params = SamplingParams(max_new_tokens=15, temperature=0)
    expected = one_by_one(model, prompts, params)
    engine = Engine(model, IdTokenizer(), max_batch=3)  # fewer rows than prompts: requests wait, rows are reused
    requests = [engine.add(p, params) for p in prompts]
    engine.run(requests)
    assert [r.sequences[0].tokens for r in requests] == expected
    # and the same prompt in different company gives the same answer
    engine = Engine(model, IdTokenizer(), max_batch=5)
    mixed = [engine.add(p, params) for p in (prompts[3], prompts[0], prompts[3])]
    engine.run(mixed)
    assert mixed[0].sequences[0].tokens == mixed[2].sequences[0].tokens == expected[3]


def test_sequences_finish_at_different_times_and_rows_stay_correct(hf_gpt2):
    model = load_model(hf_gpt2)
    prompts = [[5, 6, 7], [9], [100, 200, 300, 400]]
    budgets = [3, 12, 7]
    expected = [one_by_one(model, [p], SamplingParams(max_new_tokens=b, temperature=0))[0] for p, b in zip(prompts, budgets)]
    engine = Engine(model, IdTokenizer(), max_batch=3)
    requests = [engine.add(p, SamplingParams(max_new_tokens=b, temperature=0)) for p, b in zip(prompts, budgets)]
    engine.run(requests)
    assert [r.sequences[0].tokens for r in requests] == expected
    assert [len(t) for t in expected] == budgets


def test_n_samples_seeds_and_abort(hf_gpt2):
    model = load_model(hf_gpt2)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=3, seed=7)
    engine = Engine(model, IdTokenizer(), max_batch=4)
    r = engine.add([1, 2, 3], params)
    engine.run([r])
    samples = [s.tokens for s in r.sequences]
    assert len(set(map(tuple, samples))) == 3  # different samples
    # sample i of a seeded request is the single sample with seed + i
    for i in range(3):
        single = Engine(model, IdTokenizer(), max_batch=1)
        q = single.add([1, 2, 3], SamplingParams(max_new_tokens=10, temperature=1.0, seed=7 + i))
        single.run([q])
        assert q.sequences[0].tokens == samples[i]
    engine = Engine(model, IdTokenizer(), max_batch=2)
    a, b = engine.add([1, 2], SamplingParams(max_new_tokens=30, temperature=0)), engine.add([3], SamplingParams(max_new_tokens=5, temperature=0))
    engine.step()
    engine.abort(a)
    engine.run([a, b])
    assert a.sequences[0].finish_reason == "abort" and len(a.sequences[0].tokens) < 30
    assert b.sequences[0].tokens == one_by_one(model, [[3]], SamplingParams(max_new_tokens=5, temperature=0))[0]
    assert not engine.active and not engine.waiting


@pytest.mark.parametrize("filters", [dict(), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1, temperature=0.7)])
def test_seeded_samples_in_a_batch_are_the_samples_each_gets_alone(hf_gpt2, filters):
    """Rows that share their sampling settings are sampled together (one softmax over the batch), each with its own
    generator: the tokens are those each request gets alone, whatever else is in the batch (other prompt lengths,
    greedy rows, rows with penalties)."""
    model = load_model(hf_gpt2)
    params = {"max_new_tokens": 12, "temperature": 1.0, **filters}
    requests = [([1, 2, 3], SamplingParams(**params, n=3, seed=11)), ([4, 5], SamplingParams(**params, seed=5)),
                ([6], SamplingParams(max_new_tokens=12, temperature=0)),
                ([7, 8], SamplingParams(**params, seed=2, repetition_penalty=1.3))]
    engine = Engine(model, IdTokenizer(), max_batch=6)
    batch = [engine.add(p, q) for p, q in requests]
    engine.run(batch)
    got = [s.tokens for r in batch for s in r.sequences]
    alone = []
    for prompt, q in requests:
        for i in range(q.n):
            single = Engine(model, IdTokenizer(), max_batch=1)
            seed = None if q.seed is None else q.seed + i
            r = single.add(prompt, SamplingParams(**{**q.__dict__, "n": 1, "seed": seed}))
            single.run([r])
            alone.append(r.sequences[0].tokens)
    assert len(set(map(tuple, got[:3]))) == 3 or filters.get("top_k") == 5  # the draws differ
    assert got == alone


def test_requests_admitted_together_are_prefilled_in_one_pass(hf_gpt2):
    """Prompts of different lengths (right-padded into one forward pass) with requests of n samples between them:
    each sequence gets the tokens it gets alone, and the first step runs the model once for all the prompts."""
    model = load_model(hf_gpt2)
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    requests = [([5, 6, 7], greedy), ([9, 10, 11, 12, 13, 14], SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=3)),
                ([4], greedy), ([8, 1], SamplingParams(max_new_tokens=8, temperature=0.8, n=2, seed=9))]
    engine = Engine(model, IdTokenizer(), max_batch=6)
    batch = [engine.add(p, q) for p, q in requests]
    passes = []
    hook = model.register_forward_hook(lambda module, args, out: passes.append(tuple(args[0].shape)))
    try:
        engine.step()
    finally:
        hook.remove()
    assert passes == [(4, 6)]
    engine.run(batch)
    alone = []
    for prompt, q in requests:
        single = Engine(model, IdTokenizer(), max_batch=q.n)
        r = single.add(prompt, q)
        single.run([r])
        alone.append([s.tokens for s in r.sequences])
    assert [[s.tokens for s in r.sequences] for r in batch] == alone
    assert alone[1][0] != alone[1][1]


def test_a_prompt_that_fails_the_shared_prefill_fails_alone(hf_gpt2):
    """With ``isolate_failures`` (the server), a prompt that breaks the pass shared with others (here a token id
    outside the vocabulary) fails alone: the others are prefilled again, each alone, and answer as usual."""
    model = load_model(hf_gpt2)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    prompts = [[5, 6, 7], [1, 2], [4]]

    def add_all(engine):  # (add() refuses an id outside the vocabulary: the bad one is put in behind its back)
        requests = [engine.add(p, params) for p in prompts]
        requests[1].prompt_ids[-1] = model.config.vocab_size + 5
        return requests

    engine = Engine(model, IdTokenizer(), max_batch=3, isolate_failures=True)
    good, bad, other = add_all(engine)
    engine.run([good, bad, other])
    assert isinstance(bad.error, IndexError) and bad.sequences[0].finish_reason == "error"
    assert [good.sequences[0].tokens, other.sequences[0].tokens] == one_by_one(model, [prompts[0], prompts[2]], params)
    strict = Engine(model, IdTokenizer(), max_batch=3)  # without it, the error reaches the caller
    add_all(strict)
    with pytest.raises(IndexError):
        strict.step()


def test_the_cache_grows_to_what_requests_need_and_keeps_what_it_holds(hf_gpt2):
    """The cache starts empty and holds what the admitted requests need (prompt + max_new_tokens), growing while
    other sequences decode (a server's later, longer request) without changing anyone's tokens."""
    model = load_model(hf_gpt2)  # a context of 64 positions
    first, later = ([5, 6], SamplingParams(max_new_tokens=9, temperature=0)), (list(range(3, 30)), SamplingParams(max_new_tokens=8, temperature=0))
    engine = Engine(model, IdTokenizer(), max_batch=2)
    assert engine.cache.max_len == 0
    a = engine.add(*first)
    engine.step()
    engine.step()
    assert engine.cache.max_len == 11
    b = engine.add(*later)  # 35 positions: the cache doubles past it while `a` is in the middle of its answer
    engine.run([a, b])
    assert engine.cache.max_len == 35 and engine.max_len == 64
    assert [a.sequences[0].tokens, b.sequences[0].tokens] == [one_by_one(model, [p], q)[0] for p, q in (first, later)]
    huge = Engine(model, IdTokenizer(), max_batch=1)
    huge.run([huge.add([1], SamplingParams(max_new_tokens=60, temperature=0))])
    assert huge.cache.max_len == 61


def test_a_cache_that_cannot_grow_fails_the_requests_that_needed_it_alone(hf_gpt2, monkeypatch):
    """The server's engine: growing the cache for a longer request runs out of memory (half the layers grown). The
    new request fails with the error; the one decoding goes on to its own tokens; the next that fits is served."""
    from lmforge.model.gpt import KVCache

    model = load_model(hf_gpt2)
    params = SamplingParams(max_new_tokens=9, temperature=0)
    engine = Engine(model, IdTokenizer(), max_batch=2, isolate_failures=True)
    first = engine.add([5, 6], params)
    engine.step()
    engine.step()
    grow = KVCache.grow

    def half_then_fail(cache, max_len):
        cache.k[0] = torch.cat([cache.k[0], torch.zeros_like(cache.k[0])], 2)  # one layer grown, then no memory
        raise MemoryError("no memory for the cache")

    monkeypatch.setattr(KVCache, "grow", half_then_fail)
    big = engine.add(list(range(3, 30)), params)
    events = engine.step()
    assert isinstance(big.error, MemoryError) and big.sequences[0].finish_reason == "error"
    assert any(e.sequence.request is big and e.finished for e in events)
    monkeypatch.setattr(KVCache, "grow", grow)
    small = engine.add([7], SamplingParams(max_new_tokens=3, temperature=0))
    engine.run([first, small])
    assert [first.sequences[0].tokens, small.sequences[0].tokens] == one_by_one(model, [[5, 6], [7]], params)[:1] + \
        one_by_one(model, [[7]], SamplingParams(max_new_tokens=3, temperature=0))
    again = engine.add(list(range(3, 30)), params)  # the cache grows past the layer grown before the failure
    engine.run([again])
    assert again.sequences[0].tokens == one_by_one(model, [list(range(3, 30))], params)[0] and engine.cache.max_len == 36
    strict = Engine(model, IdTokenizer(), max_batch=1)  # without isolate_failures the caller gets the error
    monkeypatch.setattr(KVCache, "grow", half_then_fail)
    strict.add([1], params)
    with pytest.raises(MemoryError):
        strict.step()


def test_prefill_groups_keep_the_padded_batch_within_its_token_budget():
    requests = [Request(list(range(n)), SamplingParams()) for n in (3, 6, 1, 20, 2, 2)]
    groups = prefill_groups(requests, 12)
    assert [[len(r.prompt_ids) for r in g] for g in groups] == [[3, 6], [1], [20], [2, 2]]
    assert prefill_groups([], 12) == []


def test_stop_strings_and_stop_ids_in_a_batch(hf_gpt2):
    model = load_model(hf_gpt2)
    free = one_by_one(model, [[1, 2, 3]], SamplingParams(max_new_tokens=12, temperature=0))[0]
    stop_text = f"{free[4]} "
    engine = Engine(model, IdTokenizer(), max_batch=2)
    r1 = engine.add([1, 2, 3], SamplingParams(max_new_tokens=12, temperature=0, stop=[stop_text]))
    r2 = engine.add([1, 2, 3], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[free[6]]))
    engine.run([r1, r2])
    first = free.index(free[4])
    assert r1.sequences[0].text == "".join(f"{t} " for t in free[:first]) and r1.sequences[0].finish_reason == "stop"
    assert r2.sequences[0].tokens == free[: free.index(free[6])] and r2.sequences[0].finish_reason == "stop"


def test_logprobs_are_the_models_and_alternatives_are_sorted(hf_gpt2):
    model = load_model(hf_gpt2)
    engine = Engine(model, IdTokenizer(), max_batch=1)
    r = engine.add([4, 5, 6], SamplingParams(max_new_tokens=4, temperature=0, logprobs=3))
    engine.run([r])
    s = r.sequences[0]
    ids = [4, 5, 6] + s.tokens
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    for step, (token, lp, top) in enumerate(zip(s.tokens, s.logprobs, s.top_logprobs)):
        assert lp == pytest.approx(logp[2 + step, token].item(), abs=1e-5)
        assert [t for t, _ in top][0] == token  # greedy: the chosen token is the most likely
        assert [v for _, v in top] == sorted([v for _, v in top], reverse=True) and len(top) == 3


def test_min_p_and_openai_penalties():
    from transformers.generation.logits_process import MinPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(200) * 3
    p = SamplingParams(temperature=1.0, min_p=0.1)
    expected = MinPLogitsWarper(0.1)(None, logits[None].clone())[0]
    torch.testing.assert_close(process_logits(logits, torch.tensor([], dtype=torch.long), p), expected)
    counts = torch.zeros(200)
    counts[5], counts[9] = 3, 1
    p = SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=1.0)
    out = process_logits(logits, torch.tensor([], dtype=torch.long), p, counts)
    assert out[5].item() == pytest.approx(logits[5].item() - 0.5 * 3 - 1.0)
    assert out[9].item() == pytest.approx(logits[9].item() - 0.5 - 1.0) and out[0] == logits[0]


def test_beam_search_is_token_identical_to_transformers(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    with torch.no_grad():  # sharpen the distribution so that end tokens do get chosen
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "m")
    ours = load_model(tmp_path / "m")
    ended = 0
    for seed, beams, penalty, early, with_eos in itertools.product(range(2), [2, 4], [1.0, 0.5, 2.0], [False, True, "never"],
                                                                  [False, True]):
        torch.manual_seed(seed)
        prompt = torch.randint(0, 50, (1, 6))
        eos = None
        if with_eos:  # an end token the beams really produce, so that candidates finish early
            eos = beam_search(ours, prompt[0].tolist(), beams, 12)[0][3]
        expected = hf.generate(prompt, num_beams=beams, do_sample=False, max_new_tokens=12, length_penalty=penalty,
                               early_stopping=early, eos_token_id=eos, pad_token_id=0,
                               attention_mask=torch.ones_like(prompt))[0, 6:].tolist()
        got, _ = beam_search(ours, prompt[0].tolist(), beams, 12, penalty, early, (eos,) if eos is not None else ())
        # transformers pads a sequence that finished before the longest beam with the end token
        assert expected[: len(got)] == got and all(t == eos for t in expected[len(got):]), (seed, beams, penalty, early, eos)
        ended += bool(got) and got[-1] == eos
        # the n best beams, best first, as num_return_sequences gives them
        expected = hf.generate(prompt, num_beams=beams, num_return_sequences=beams, do_sample=False, max_new_tokens=12,
                               length_penalty=penalty, early_stopping=early, eos_token_id=eos, pad_token_id=0,
                               attention_mask=torch.ones_like(prompt))[:, 6:].tolist()
        best = beam_search(ours, prompt[0].tolist(), beams, 12, penalty, early, (eos,) if eos is not None else (), n=beams)
        assert best[0][0] == got and [score for _, score in best] == sorted((score for _, score in best), reverse=True)
        for want, (tokens, _) in zip(expected, best, strict=True):
            assert want[: len(tokens)] == tokens and all(t in (eos, 0) for t in want[len(tokens):])
    assert ended >= 12  # the end-of-sequence logic was exercised


def test_generate_api_batches_beams_and_n(hf_gpt2):
    model = load_model(hf_gpt2)
    out = generate(model, ["def", "import os", "x ="], max_new_tokens=6, temperature=0)
    assert [g.token_ids for g in out] == [generate(model, p, max_new_tokens=6, temperature=0).token_ids for p in ["def", "import os", "x ="]]
    beams = generate(model, "def", max_new_tokens=6, num_beams=3)
    tok = load_tokenizer_for(model)
    assert beams.token_ids == beam_search(model, tok.encode("def"), 3, 6, eos_ids=(tok.eos_id,))[0]
    samples = generate(model, "def", max_new_tokens=5, n=2, seed=1)
    assert len(samples) == 2 and samples[0].token_ids != samples[1].token_ids
    # n with beams: the n best beams; more than num_beams, or what beams do not apply, is refused
    two = generate(model, "def", max_new_tokens=6, num_beams=3, n=2)
    assert [g.token_ids for g in two] == [t for t, _ in beam_search(model, tok.encode("def"), 3, 6, eos_ids=(tok.eos_id,), n=2)]
    assert two[0].token_ids == beams.token_ids
    for bad, message in [(dict(n=4), "n \\(4\\) must not exceed num_beams \\(3\\)"),
                         (dict(frequency_penalty=1.2), "beam search takes no frequency"),
                         (dict(logprobs=1), "gives no logprobs"),
                         (dict(temperature=0.7), "draws nothing: temperature, top_k"),
                         (dict(seed=3), "would be ignored"), (dict(top_p=0.9), "would be ignored")]:
        with pytest.raises(LmforgeError, match=message):
            generate(model, "def", max_new_tokens=6, num_beams=3, **bad)


def test_generation_ends_at_the_models_end_token_as_well_as_the_tokenizers(hf_gpt2):
    """transformers' generate stops at the eos_token_id of generation_config.json (where it names one; config.json's
    otherwise, and not config.json's where the two differ); the engine stops there and at the tokenizer's."""
    import json

    model = load_model(hf_gpt2)
    free = Engine(model, IdTokenizer(), max_batch=1)
    r = free.add([5, 6, 7], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[]))
    free.run([r])
    tokens = r.sequences[0].tokens
    end = next(t for t in tokens if t != tokens[0])  # (a token after the first that the model really writes)
    unused = min(set(range(100)) - set(tokens))
    config = json.loads((hf_gpt2 / "config.json").read_text())
    cut = tokens[: tokens.index(end)]
    for in_config, in_generation, expected in [(end, None, cut), (unused, end, cut), (end, unused, tokens)]:
        (hf_gpt2 / "config.json").write_text(json.dumps({**config, "eos_token_id": in_config}))
        (hf_gpt2 / "generation_config.json").write_text(json.dumps({"eos_token_id": in_generation}))
        engine = Engine(load_model(hf_gpt2), IdTokenizer(), max_batch=1)
        r = engine.add([5, 6, 7], SamplingParams(max_new_tokens=8, temperature=0))
        engine.run([r])
        assert r.sequences[0].tokens == expected, (in_config, in_generation)


def test_context_limit_errors_and_truncation(hf_gpt2):
    model = load_model(hf_gpt2)
    engine = Engine(model, IdTokenizer(), max_batch=2)
    with pytest.raises(LmforgeError, match="exceeds the model's context of 64"):
        engine.add(list(range(60)), SamplingParams(max_new_tokens=10))
    r = engine.add(list(range(60)), SamplingParams(max_new_tokens=10, temperature=0, truncate=True))
    assert len(r.prompt_ids) == 54
    with pytest.raises(LmforgeError, match="exceed the engine's 2 rows"):
        engine.add([1], SamplingParams(n=3))


def test_int8_quantisation_keeps_perplexity_close(hf_gpt2, data_dir):
    import numpy as np

    from lmforge.train.loop import pretrain

    # a model that has learnt something, so perplexity means something
    run = pretrain(data=str(data_dir), out=str(data_dir.parent / "int8-run"), model="tiny", n_layer=2, n_head=2, n_embd=64,
                   block_size=64, max_steps=60, eval_interval=60, threads=1, tensorboard=False, progress=False, overwrite=True)
    model = load_model(run["checkpoint"] + "/model")
    ids = np.fromfile(next(data_dir.glob("val_*.bin")), dtype=np.uint16)[:2000].tolist()
    base, quantized = perplexity(model, ids), perplexity(quantize_int8(model), ids)
    assert abs(quantized - base) / base < 0.05
    q = quantize_int8(model)
    assert generate(q, "def", max_new_tokens=5, temperature=0).token_ids == generate(model, "def", max_new_tokens=5, temperature=0).token_ids


def test_inverse_cdf_sampling_follows_the_distribution_and_skips_zeros():
    from lmforge.infer.engine import sample

    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample(probs, g) for _ in range(20_000)]), minlength=6).float() / 20_000
    assert counts[0] == counts[2] == counts[5] == 0
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)


@pytest.mark.slow
def test_compiled_static_decode_gives_the_same_tokens():
    torch.manual_seed(0)
    from lmforge.model.config import Config
    from lmforge.model.gpt import build_model

    model = build_model(Config(vocab_size=500, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]

    def run(compile):
        engine = Engine(model, IdTokenizer(), max_batch=4, compile=compile)
        requests = [engine.add(p, SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[])) for p in prompts]
        engine.run(requests)
        return [r.sequences[0].tokens for r in requests]

    assert run(True) == run(False)


def test_the_engine_refuses_prompts_that_are_no_token_ids_of_its_model(tmp_path):
    """An id outside the vocabulary was an IndexError deep in the embedding; a string was read as ids."""
    import pytest

    from lmforge.errors import LmforgeError
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model.config import Config
    from lmforge.model.gpt import build_model

    model = build_model(Config(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()

    class Ids:
        eos_id = 0

        def decode(self, ids):
            return ""

    engine = Engine(model, Ids(), max_batch=2)
    params = SamplingParams(max_new_tokens=2, temperature=0)
    for ids, message in [([3, 64], r"prompt token id 64 is outside the model's vocabulary \(0 to 63\)"),
                         ([-1], "prompt token id -1 is outside"), ("text", "takes the prompt's token ids")]:
        with pytest.raises(LmforgeError, match=message):
            engine.add(ids, params)
