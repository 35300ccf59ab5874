"""The encoder-decoder (T5 family) against transformers: conversion both ways, logits and loss, the position
buckets, incremental decoding with the cross-attention cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_model, save_model
from lmforge.model.encoder_decoder import EncoderDecoder, relative_position_bucket

transformers = pytest.importorskip("transformers")

SHAPES = {  # T5 v1.0 (ReLU, tied head, output scaled) and v1.1 / Flan-T5 (gated GELU, own head, no scaling)
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def make_hf_t5(folder: Path, shape: str, seed: int = 0, **kw) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(**{**dict(vocab_size=120, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
                         **SHAPES[shape], **kw})
    model = T5ForConditionalGeneration(config).eval()
    if shape == "v1.1":  # an untied head must differ from the embeddings to show which one is used
        with torch.no_grad():
            model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model))
        model.config.tie_word_embeddings = False
    model.save_pretrained(folder)
    return folder


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 120, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding in the source
    ids[1, 7:] = 0
    labels = torch.randint(2, 120, (3, 6), generator=g)
    labels[2, 4:] = -100  # padding in the target
    return ids, mask, labels


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_and_loss_equal_transformers_both_ways(tmp_path, shape):
    from transformers import T5ForConditionalGeneration

    folder = make_hf_t5(tmp_path / "hf", shape)
    theirs = T5ForConditionalGeneration.from_pretrained(folder).eval()
    ours = load_model(folder).eval()
    assert isinstance(ours, EncoderDecoder)
    assert ours.config.tied == (shape == "v1.0") and ours.config.scale_output == (shape == "v1.0")
    assert_parity_both_ways(ours, theirs, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["decoder_start_token_id"] == 0 and config["scale_decoder_outputs"] == (shape == "v1.0")


@torch.no_grad()
def assert_parity_both_ways(ours, theirs, out: Path) -> None:
    """lmforge's model gives transformers' logits (1e-4) and loss (1e-5); exported to ``out``, it is read back by
    transformers with the same logits and by lmforge with the very same ones."""
    from transformers import T5ForConditionalGeneration

    ids, mask, labels = batch()
    expected = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    logits, loss = ours(ids, mask, labels=labels)
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, expected.loss, atol=1e-5, rtol=1e-5)
    save_model(ours, out)
    again = T5ForConditionalGeneration.from_pretrained(out).eval()
    torch.testing.assert_close(again(input_ids=ids, attention_mask=mask, labels=labels).logits, expected.logits,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(load_model(out)(ids, mask, labels=labels)[0], logits, atol=0, rtol=0)


def test_a_tied_head_without_scaling_as_transformers_5_saves_v1_1_models(tmp_path):
    """transformers 5 writes a T5 v1.1 model as tie_word_embeddings true, scale_decoder_outputs false and no lm_head:
    lmforge reads that as a tied head without scaling and writes it so transformers 4 and 5 both read it the same."""
    from transformers import T5ForConditionalGeneration

    folder = make_hf_t5(tmp_path / "hf", "v1.0", feed_forward_proj="gated-gelu")
    config = json.loads((folder / "config.json").read_text())
    config["scale_decoder_outputs"] = False
    (folder / "config.json").write_text(json.dumps(config))
    theirs = T5ForConditionalGeneration.from_pretrained(folder).eval()
    assert not theirs.config.scale_decoder_outputs
    ours = load_model(folder).eval()
    assert ours.config.tied and not ours.config.scale_output
    ids, mask, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask, labels=labels)[0], theirs(input_ids=ids, attention_mask=mask,
                                                                             labels=labels).logits, atol=1e-4, rtol=1e-4)
    save_model(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["tie_word_embeddings"] is False and written["scale_decoder_outputs"] is False


def test_a_config_without_decoder_start_token_id_starts_from_the_pad_token(tmp_path):
    folder = make_hf_t5(tmp_path / "hf", "v1.0", pad_token_id=3)
    config = json.loads((folder / "config.json").read_text())
    config.pop("decoder_start_token_id")
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(folder).config.decoder_start_token_id == 3


@pytest.mark.parametrize("bidirectional", [True, False])
def test_position_buckets_equal_transformers(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 300)[None, :] - torch.arange(0, 40)[:, None]
    for buckets, distance in ((32, 128), (8, 20)):
        expected = T5Attention._relative_position_bucket(relative, bidirectional, buckets, distance)
        assert torch.equal(relative_position_bucket(relative, bidirectional, buckets, distance), expected)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_decoding_token_by_token_with_the_caches_gives_the_full_passs_logits(tmp_path, shape):
    model = load_model(make_hf_t5(tmp_path / "hf", shape)).eval()
    ids, mask, labels = batch()
    target = model.shift_right(labels.clamp(min=0))
    with torch.no_grad():
        memory = model.encode(ids, mask)
        full = model.decode(target, memory, mask)
        cache = [{} for _ in model.decoder.blocks]
        steps = [model.decode(target[:, t : t + 1], memory if t == 0 else None, mask, cache) for t in range(target.size(1))]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache[0]["cross"][0].shape[2] == ids.size(1)  # the encoder's keys, computed once


# -- generation through the engine ------------------------------------------------------------------


class IdTokenizer:
    eos_id = 1
    pad_id = 0

    def decode(self, ids):
        return "".join(f"{i} " for i in ids)


SOURCES = [[5, 9, 14, 22, 7, 3], [40, 41], [8, 8, 8, 17, 30, 2, 99, 11, 4]]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_and_beam_search_are_token_identical_to_transformers_generate(tmp_path, shape):
    """A batch of sources of different lengths (padded in one wave) decoded greedily, and beam search with 3 beams:
    the tokens of T5ForConditionalGeneration.generate, end token included."""
    from transformers import T5ForConditionalGeneration

    from lmforge.infer.engine import Engine, beam_search
    from lmforge.infer.sampling import SamplingParams

    # (transformers' generate sizes its cache by num_layers: a deeper decoder fails there, not here)
    folder = make_hf_t5(tmp_path / "hf", shape, num_decoder_layers=2)
    theirs = T5ForConditionalGeneration.from_pretrained(folder).eval()
    ours = load_model(folder).eval()
    engine = Engine(ours, IdTokenizer(), max_batch=4)
    requests = [engine.add(src, SamplingParams(max_new_tokens=12, temperature=0)) for src in SOURCES]
    engine.run(requests)
    for src, request in zip(SOURCES, requests):
        with torch.no_grad():
            # (the engine ends a source with the end-of-text token, as training does: transformers is given it too)
            expected = theirs.generate(torch.tensor([src + [1]]), max_new_tokens=12, do_sample=False)[0, 1:].tolist()
        seq = request.sequences[0]
        assert seq.tokens + ([seq.stop_token] if seq.stop_token is not None else []) == expected
        with torch.no_grad():
            beams = theirs.generate(torch.tensor([src]), max_new_tokens=10, num_beams=3, do_sample=False)[0, 1:].tolist()
        tokens, _ = beam_search(ours, src, 3, 10, eos_ids=(1,))
        assert tokens == [t for t in beams if t != 0]  # (transformers pads a beam that ended early)


def test_every_end_id_a_t5_folder_lists_stops_generation_and_is_written_back(tmp_path):
    """``eos_token_id: [1, X]``: transformers stops at X too; lmforge kept the first id only, and wrote it alone."""
    from transformers import T5ForConditionalGeneration

    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    folder = make_hf_t5(tmp_path / "hf", "v1.1", num_decoder_layers=2)
    src = SOURCES[0]
    with torch.no_grad():
        free = T5ForConditionalGeneration.from_pretrained(folder).generate(
            torch.tensor([src + [1]]), max_new_tokens=12, do_sample=False)[0, 1:].tolist()
    stop = next(t for t in free[1:] if t not in (0, 1))
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**config, "eos_token_id": [1, stop]}))
    with torch.no_grad():
        expected = T5ForConditionalGeneration.from_pretrained(folder).generate(
            torch.tensor([src + [1]]), max_new_tokens=12, do_sample=False)[0, 1:].tolist()
    assert expected[-1] == stop and len(expected) < 12
    ours = load_model(folder)
    engine = Engine(ours, IdTokenizer(), max_batch=1)
    request = engine.add(src, SamplingParams(max_new_tokens=12, temperature=0))
    engine.run([request])
    seq = request.sequences[0]
    assert seq.tokens + [seq.stop_token] == expected
    save_model(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [1, stop]


def test_seeded_samples_of_a_wave_are_each_requests_own_and_n_samples_differ(tmp_path):
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    model = load_model(make_hf_t5(tmp_path / "hf", "v1.1")).eval()
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, stop_token_ids=[], seed=3)
    together = Engine(model, IdTokenizer(), max_batch=8)
    requests = [together.add(src, replace_n(params, 2 if i == 0 else 1, seed=3 + 10 * i)) for i, src in enumerate(SOURCES)]
    together.run(requests)
    got = [s.tokens for r in requests for s in r.sequences]
    alone = []
    for i, src in enumerate(SOURCES):
        for k in range(2 if i == 0 else 1):
            engine = Engine(model, IdTokenizer(), max_batch=1)
            r = engine.add(src, replace_n(params, 1, seed=3 + 10 * i + k))
            engine.run([r])
            alone.append(r.sequences[0].tokens)
    assert got == alone and got[0] != got[1]


def test_requests_that_arrive_while_a_wave_runs_join_it_and_get_what_they_get_alone(tmp_path):
    """Continuous batching for an encoder-decoder: requests added while a wave decodes join it at the next step
    (the wave is not drained first), over sources longer and shorter than the wave's; each request's tokens and
    per-token log-probabilities are those it gets alone (greedy, and sampled with its seed), and once the rows that
    started first are gone the cache holds only the columns the rows left use."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    model = load_model(make_hf_t5(tmp_path / "hf", "v1.1")).eval()
    greedy = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[], logprobs=0)
    sampled = SamplingParams(max_new_tokens=9, temperature=1.0, top_k=20, stop_token_ids=[], logprobs=0, seed=5)
    plan = [(SOURCES[1], greedy), (SOURCES[2], replace_n(sampled, 2, seed=5)), (SOURCES[0], greedy),
            ([7, 7, 21], replace_n(sampled, 1, seed=9)), (SOURCES[2][:5], greedy)]

    def alone(src, params):
        engine = Engine(model, IdTokenizer(), max_batch=4)
        r = engine.add(src, params)
        engine.run([r])
        return [(s.tokens, s.logprobs) for s in r.sequences]

    engine = Engine(model, IdTokenizer(), max_batch=4)
    requests, joined, lengths = [], [], []
    for step in range(40):
        if step in (0, 2, 3, 5, 11) and len(requests) < len(plan):  # (a wave of 1 row, then newcomers as it runs)
            requests.append(engine.add(*plan[len(requests)]))
        running = len(engine.active)
        engine.step()
        if running and any(s in engine.active for s in requests[-1].sequences) and requests[-1] not in joined \
                and all(s.pos <= 1 for s in requests[-1].sequences):
            joined.append(requests[-1])
        if engine.wave is not None:
            lengths.append((engine.wave["cache"][0]["self"][0].size(2), max(s.pos for s in engine.active)))
        if not engine.has_work and len(requests) == len(plan):
            break
    assert len(joined) >= 3  # (joined a running wave; the 4-row limit held the last one back until rows freed)
    for (src, params), request in zip(plan, requests):
        got = [(s.tokens, s.logprobs) for s in request.sequences]
        want = alone(src, params)
        assert [t for t, _ in got] == [t for t, _ in want]
        for (_, a), (_, b) in zip(got, want):
            assert a == pytest.approx(b, abs=1e-4)
    assert all(columns <= longest + 1 for columns, longest in lengths[-3:])  # (the first rows' columns dropped)


def replace_n(params, n, seed):
    from dataclasses import replace

    return replace(params, n=n, seed=seed)


def test_the_generate_api_and_command_run_an_encoder_decoder(tmp_path, tokenizer_dir):
    import shutil

    from conftest import run_cli

    from lmforge import generate

    folder = make_hf_t5(tmp_path / "hf", "v1.0", vocab_size=1024)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    out = generate(str(folder), ["def f(x):", "import os"], max_new_tokens=5, temperature=0)
    assert len(out) == 2 and all(len(g.token_ids) <= 5 for g in out)
    beam = generate(str(folder), "def f(x):", max_new_tokens=5, num_beams=2)
    assert beam.token_ids
    result = run_cli("generate", "--model", str(folder), "--max-new-tokens", "4", "--temperature", "0", "def f(x):")
    assert result.returncode == 0, result.stderr


# -- seq2seq fine-tuning ----------------------------------------------------------------------------


def test_seq2seq_examples_longer_than_max_length_are_cut_keeping_their_end_token_and_said(tmp_path, tokenizer_dir,
                                                                                          capsys, monkeypatch):
    """A source keeps its end, a target its beginning, and both their end token (a target cut without it would
    teach the model never to stop), with a warning counting each."""
    import shutil

    from lmforge.tokenizer import Tokenizer
    from lmforge.train.finetune import Seq2Seq, finetune

    folder = make_hf_t5(tmp_path / "hf", "v1.1", vocab_size=1024, num_decoder_layers=1, num_layers=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    rows = [{"source": "one two three four five six seven eight nine ten", "target": "short"},
            {"source": "short", "target": "one two three four five six seven eight nine ten"},
            {"source": "short", "target": "short"}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    featurize, features = Seq2Seq.featurize, []
    monkeypatch.setattr(Seq2Seq, "featurize", lambda self, rows: features.append(featurize(self, rows)) or features[-1])
    finetune(model=str(folder), train=str(train), out=str(tmp_path / "run"), max_steps=1, max_length=6,
             micro_batch_size=3, val_fraction=0.0, threads=1, tensorboard=False, dtype="float32", progress=False)
    err = capsys.readouterr().err
    assert "1 of 3 example(s): source(s) left-truncated to their last 6 tokens" in err
    assert "1 of 3 example(s): target(s) cut to their first 6 tokens" in err
    tok = Tokenizer.load(folder)
    (long_source, _), (_, long_target), short = features[0]
    assert long_source == tok.encode(rows[0]["source"])[-5:] + [tok.eos_id]
    assert long_target == tok.encode(rows[1]["target"])[:5] + [tok.eos_id]
    assert short == (tok.encode("short") + [tok.eos_id],) * 2


def test_seq2seq_fine_tuning_learns_a_mapping_and_its_loss_is_transformers(tmp_path, tokenizer_dir):
    """{"source", "target"} pairs (reverse a list of words) train the encoder-decoder: the loss falls, a step's loss
    equals T5ForConditionalGeneration's on the same batch, generate then writes the learnt target, and
    prompt/completion examples train it the same way."""
    import shutil

    from transformers import T5ForConditionalGeneration

    from lmforge import generate
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.finetune import Seq2Seq, finetune

    folder = make_hf_t5(tmp_path / "hf", "v1.1", vocab_size=1024, num_decoder_layers=2, d_model=64, d_ff=128)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rows = [{"source": f"{a} {b}", "target": f"{b} {a}"} for a in words for b in words if a != b]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = finetune(model=str(folder), train=str(train), out=str(tmp_path / "run"), max_steps=150, lr=3e-3,
                    warmup_steps=5, micro_batch_size=10, val_fraction=0.0, eval_interval=10**6, threads=1,
                    tensorboard=False, dtype="float32", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] / 4, (losses[0], losses[-1])
    model_dir = Path(done["checkpoint"]) / "model"
    right = sum(generate(str(model_dir), r["source"], max_new_tokens=6, temperature=0).text.strip() == r["target"]
                for r in rows)
    assert right > len(rows) // 2, right
    # int8 weights (every projection and the tied-or-own head quantised) write the same targets
    from lmforge.infer.engine import quantize_int8

    fp32 = load_model(model_dir)
    int8 = quantize_int8(fp32)
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.modules())
    same = sum(generate(int8, r["source"], max_new_tokens=6, temperature=0).token_ids
               == generate(fp32, r["source"], max_new_tokens=6, temperature=0).token_ids for r in rows)
    assert same >= len(rows) - 3, same
    from conftest import run_cli

    result = run_cli("generate", "--model", str(model_dir), "--int8", "--max-new-tokens", "6", "--temperature", "0",
                     rows[0]["source"])
    assert result.returncode == 0 and rows[0]["target"] in result.stdout, result.stderr
    # the objective's loss is transformers' on the same batch
    tok = Tokenizer.load(model_dir)
    objective = Seq2Seq.__new__(Seq2Seq)
    objective.tokenizer, objective.max_length = tok, 64
    objective.model = load_model(model_dir)
    features = objective.featurize(rows[:4])
    batch = objective.collate([0, 1, 2, 3], features)
    theirs = T5ForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ours = objective.loss(objective.model.eval(), batch)
        expected = theirs(input_ids=batch["ids"], attention_mask=batch["mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # lmforge eval scores it on a generation task with BLEU and ROUGE; a choice task is refused in one line
    from lmforge.eval.evaluate import evaluate
    from lmforge.eval.tasks import load_task_file

    (tmp_path / "swap.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "swap.yaml").write_text("task: swap\ntype: generate\ndata: swap.jsonl\nprompt: '{{ source }}'\n"
                                        "target: '{{ target }}'\nmax_new_tokens: 6\nmetrics: [exact_match, bleu, rouge]\n")
    scores = evaluate(str(model_dir), [load_task_file(tmp_path / "swap.yaml")], progress=False)["tasks"]["swap"]["metrics"]
    # (two-word targets have no 3- and 4-grams, so corpus BLEU is 0 here however good the output)
    assert scores["exact_match"] > 0.5 and "bleu" in scores and scores["rouge1"] > 50, scores
    from lmforge.eval.tasks import resolve_tasks

    with pytest.raises(Exception, match="evaluated on generation tasks"):
        evaluate(str(model_dir), resolve_tasks(["brackets"], limit=4), progress=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["source"], "completion": r["target"]}) + "\n" for r in rows))
    again = finetune(model=str(folder), train=str(prompts), out=str(tmp_path / "run2"), max_steps=3, threads=1,
                     val_fraction=0.0, tensorboard=False, dtype="float32", progress=False)
    assert again["steps"] == 3 and json.loads((tmp_path / "run2" / "run.json").read_text())["task"] == "seq2seq"


def test_serve_answers_completions_from_an_encoder_decoder_and_refuses_chat_with_a_400(tmp_path, tokenizer_dir):
    """The OpenAI client's completions against a T5 folder give the engine's greedy tokens; chat (no template) and a
    source longer than the model reads are the client's mistakes: 400s with OpenAI's error shape."""
    import shutil

    import httpx

    openai = pytest.importorskip("openai")
    from test_serve import LiveServer

    from lmforge import generate
    from lmforge.model.checkpoint import load_tokenizer_for
    from lmforge.serve.server import ServerSettings, build_server_app

    folder = make_hf_t5(tmp_path / "hf", "v1.1", vocab_size=1024, num_decoder_layers=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    model = load_model(folder)
    live = LiveServer(build_server_app(model, load_tokenizer_for(model), ServerSettings(max_batch=4, model_name="t5")))
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", timeout=30, max_retries=0)
        answer = client.completions.create(model="t5", prompt="def f(x):", max_tokens=6, temperature=0)
        assert answer.choices[0].text == generate(str(folder), "def f(x):", max_new_tokens=6, temperature=0).text
        chat = httpx.post(live.url + "/v1/chat/completions", json={"model": "t5", "messages": [
            {"role": "user", "content": "hi"}]}, timeout=30)
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "chat_not_supported"
        long = httpx.post(live.url + "/v1/completions", json={"model": "t5", "prompt": "x " * 700, "max_tokens": 2},
                          timeout=30)
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        # the encoder reads the prompt and its end token: a prompt of exactly block_size tokens does not fit, streamed
        # or not (a 400 before any stream starts), and one token fewer does
        tok, context = load_tokenizer_for(model), model.config.block_size
        ids = tok.encode("x = 1\n" * context)[:context]
        full, fits = tok.decode(ids), tok.decode(ids[:-1])
        assert len(tok.encode(full)) == context and len(tok.encode(fits)) == context - 1
        for stream in (False, True):
            refused = httpx.post(live.url + "/v1/completions", json={"model": "t5", "prompt": full, "max_tokens": 2,
                                                                     "stream": stream}, timeout=30)
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
            assert f"the prompt is {context + 1} with its end token" in refused.json()["error"]["message"]
        assert client.completions.create(model="t5", prompt=fits, max_tokens=2).usage.prompt_tokens == context
    finally:
        live.stop()


def clean_run_and_a_wave_two_steps_in(model, params):
    """(SOURCES decoded in one go; an engine two steps into the same wave; its requests)."""
    from lmforge.infer.engine import Engine

    clean = Engine(model, IdTokenizer(), max_batch=4)
    expected = [clean.add(src, params) for src in SOURCES]
    clean.run(expected)
    engine = Engine(model, IdTokenizer(), max_batch=4)
    requests = [engine.add(src, params) for src in SOURCES]
    engine.step()
    engine.step()
    return expected, engine, requests


def test_a_wave_step_that_fails_after_the_decoder_pass_leaves_no_key_twice(tmp_path):
    """The step fails after the decoder wrote its keys (the rows' joint draw raised: a GPU out of memory, say):
    the cache is cut back as when the decoder itself fails, so the retried step sees each key once and the
    samples equal a run that never failed."""
    from lmforge.infer.sampling import SamplingParams

    model = load_model(make_hf_t5(tmp_path / "hf", "v1.1", num_decoder_layers=2)).eval()
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, stop_token_ids=[])
    expected, engine, requests = clean_run_and_a_wave_two_steps_in(model, params)
    past = engine.wave["cache"][0]["self"][0].size(2)

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    engine._batched_draws = fail
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    del engine._batched_draws
    assert engine.wave["cache"][0]["self"][0].size(2) == past
    engine.run(requests)
    assert [r.sequences[0].tokens for r in requests] == [r.sequences[0].tokens for r in expected]


def test_a_wave_survives_a_failed_step_and_sources_end_with_the_end_token(tmp_path, capsys):
    """A decode step that fails in its second block leaves the caches as they were: the step runs again and gives
    the tokens of a run that never failed. The engine ends each source with the end-of-text token (once), and a
    decoder asked for block_size tokens writes block_size."""
    from lmforge.infer.engine import Engine, fit_source
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model.encoder_decoder import DecoderBlock

    model = load_model(make_hf_t5(tmp_path / "hf", "v1.1", num_decoder_layers=2)).eval()
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
    expected, engine, requests = clean_run_and_a_wave_two_steps_in(model, params)
    calls, forward = [0], DecoderBlock.forward

    def fail_once(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("injected")
        return forward(self, *args, **kwargs)

    DecoderBlock.forward = fail_once
    try:
        with pytest.raises(RuntimeError, match="injected"):
            engine.step()
    finally:
        DecoderBlock.forward = forward
    engine.run(requests)
    assert [r.sequences[0].tokens for r in requests] == [r.sequences[0].tokens for r in expected]
    assert requests[0].prompt_ids == SOURCES[0] + [1] and fit_source([3, 1], 4, 10, False, 1) == [3, 1]
    # a source that fits only without its end token: refused, saying so; with truncate, cut with a warning
    with pytest.raises(LmforgeError, match=r"the source \(3 tokens \+ its end token\) exceeds the model's 3 input "
                                           r"positions; shorten it or pass --truncate to keep its last 2 tokens"):
        fit_source([3, 4, 5], 2, 3, False, 1)
    assert fit_source([3, 4, 5], 2, 3, True, 1) == [4, 5, 1]
    assert "warning: the source (3 tokens + its end token) left-truncated to its last 3" in capsys.readouterr().err
    assert fit_source([3, 4, 5], 2, 3, True, 1, say=False) == [4, 5, 1] and not capsys.readouterr().err
    model = load_model(make_hf_t5(tmp_path / "short", "v1.0", n_positions=8, num_decoder_layers=2)).eval()
    assert model.config.block_size == 8
    short = Engine(model, IdTokenizer(), max_batch=1)
    r = short.add([5, 6], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[]))
    short.run([r])
    assert len(r.sequences[0].tokens) == 8


def test_t5_folders_where_they_do_not_fit_give_one_line(tmp_path, tokenizer_dir):
    import shutil

    from lmforge.train.finetune import finetune

    folder = make_hf_t5(tmp_path / "hf", "v1.0", vocab_size=1024)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"source": "a b", "target": "b a"}) + "\n")
    for train, method, needle in ((chat, "full", "need a decoder model"), (chat, "lora", "need a decoder model"),
                                  (pairs, "linear-probe", "fine-tuned with --method full or --method lora")):
        with pytest.raises(LmforgeError, match=needle):
            finetune(model=str(folder), train=str(train), out=str(tmp_path / "out"), method=method, max_steps=1,
                     val_fraction=0.0, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape,targets", [("v1.0", "q,v"), ("v1.1", "q,k,v,o,fc,proj")])
def test_lora_fine_tuning_of_t5_writes_an_adapter_peft_loads_with_the_same_logits(tmp_path, tokenizer_dir, shape,
                                                                                 targets, capsys):
    """LoRA on the encoder-decoder: only adapters train, in the self-attention of both stacks and the decoder's
    cross-attention (PEFT's "q" matches SelfAttention.q and EncDecAttention.q); the adapter loads in PEFT on
    transformers' T5 with the logits of lmforge's merged model, and `lmforge merge` writes a T5 folder."""
    import shutil

    peft = pytest.importorskip("peft")
    from transformers import T5ForConditionalGeneration

    from lmforge.cli import main
    from lmforge.train.finetune import finetune

    base = make_hf_t5(tmp_path / "hf", shape, vocab_size=1024)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, base / name)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"source": f"reverse {a} {b}", "target": f"{b} {a}"}) + "\n"
                             for a, b in (("red", "fox"), ("blue", "sky"), ("green", "tea"), ("cold", "rain"))))
    summary = finetune(model=str(base), train=str(pairs), out=str(tmp_path / "run"), method="lora", lora_targets=targets,
                       lora_r=4, lr=1e-2, max_steps=4, micro_batch_size=2, val_fraction=0.0, progress=False, seed=3)
    adapter = Path(summary["checkpoint"]) / "model"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and not (adapter / "config.json").exists()
    expected_targets = {"v1.0": {"q", "v"}, "v1.1": {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}}[shape]
    assert set(config["target_modules"]) == expected_targets
    from safetensors.torch import load_file

    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert "base_model.model.decoder.block.2.layer.1.EncDecAttention.q.lora_A.weight" in keys
    assert "base_model.model.encoder.block.1.layer.0.SelfAttention.v.lora_B.weight" in keys
    n_modules = (2 + 3 * 2) * (2 if shape == "v1.0" else 4) + (0 if shape == "v1.0" else (2 + 3) * 3)
    assert len(keys) == 2 * n_modules

    ids, mask, labels = batch()
    ours = load_model(adapter).eval()  # the base with the adapter merged
    hf = peft.PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(base), str(adapter)).eval()
    plain = T5ForConditionalGeneration.from_pretrained(base).eval()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels).logits
        logits = ours(ids, mask, labels=labels)[0]
        assert (expected - plain(input_ids=ids, attention_mask=mask, labels=labels).logits).abs().max() > 1e-3
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = T5ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask, labels=labels).logits, expected,
                                   atol=1e-4, rtol=1e-4)
    assert "merged" in capsys.readouterr().out


@pytest.mark.parametrize("untied", [False, True])
def test_mt5_folders_load_with_transformers_logits_and_write_back_as_t5(tmp_path, untied):
    """model_type mt5 (T5 v1.1's architecture, which transformers 5 never scales before the head): as transformers 5
    saves it (tied) and as the published checkpoints are (tie_word_embeddings false, an own lm_head)."""
    from transformers import MT5Config, MT5ForConditionalGeneration

    torch.manual_seed(0)
    config = MT5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                       relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0)
    theirs = MT5ForConditionalGeneration(config).eval()
    theirs.save_pretrained(tmp_path / "mt5")
    if untied:  # a head of its own, and the field as the published mT5 configs have it
        head = torch.randn(120, 32)
        from safetensors.torch import load_file, save_file

        weights = load_file(tmp_path / "mt5" / "model.safetensors")
        save_file({**weights, "lm_head.weight": head}, tmp_path / "mt5" / "model.safetensors", metadata={"format": "pt"})
        hf_config = json.loads((tmp_path / "mt5" / "config.json").read_text())
        (tmp_path / "mt5" / "config.json").write_text(json.dumps({**hf_config, "tie_word_embeddings": False}))
        theirs = MT5ForConditionalGeneration.from_pretrained(tmp_path / "mt5").eval()
        assert torch.equal(theirs.lm_head.weight, head)
    ours = load_model(tmp_path / "mt5").eval()
    assert not ours.config.scale_output and ours.config.feed_forward == "gated-gelu"
    assert_parity_both_ways(ours, theirs, tmp_path / "ours")


def test_a_decoding_steps_position_bias_is_a_slice_of_the_full_table(tmp_path):
    """The one-query bias a decoding step takes from its table equals the bias computed from the positions, at every
    position through two growths of the table (64, then 130, then 262 columns)."""
    model = load_model(make_hf_t5(tmp_path / "hf", "v1.0")).eval()
    stack, cache = model.decoder, {}
    for position in range(200):
        step = stack.step_bias(cache, position, torch.float32)
        full = stack.position_bias(1, position + 1, position, "cpu")
        assert torch.equal(step, full), position
    assert cache["bias_table"].size(-1) == 262


@pytest.mark.parametrize("feed_forward", ["gelu", "gated-relu", "silu", "gated-gelu_new", "gated-quick_gelu",
                                          "gelu_pytorch_tanh", "gated-mish", "leaky_relu", "gated-gelu_accurate", "relu2"])
def test_every_feed_forward_activation_transformers_reads_converts_with_parity(tmp_path, feed_forward):
    """feed_forward_proj is ACT or gated-ACT of transformers' activation names; plain "gelu" is the exact GELU,
    "gated-gelu" the tanh one (test above)."""
    from transformers import T5ForConditionalGeneration

    folder = make_hf_t5(tmp_path / "hf", "v1.1", feed_forward_proj=feed_forward)
    ours = load_model(folder).eval()
    assert ours.config.feed_forward == feed_forward
    assert_parity_both_ways(ours, T5ForConditionalGeneration.from_pretrained(folder).eval(), tmp_path / "ours")


@pytest.mark.parametrize("feed_forward", ["gated-sparkle", "gelu-gated", "gated-gated-relu", "reluish"])
def test_a_feed_forward_it_does_not_know_is_one_line_naming_what_it_reads(tmp_path, feed_forward):

    folder = make_hf_t5(tmp_path / "hf", "v1.0")
    config = json.loads((folder / "config.json").read_text())
    config["feed_forward_proj"] = feed_forward
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match=r"feed_forward_proj .* is not supported; lmforge reads relu, gelu, .*gated-NAME"):
        load_model(folder)


def test_generation_starts_from_generation_config_s_decoder_start_token(tmp_path):
    """transformers' generate starts the decoder from generation_config.json's decoder_start_token_id (training from
    config.json's); lmforge read config.json's alone, and greedy and beam outputs differed from the first token."""
    from transformers import T5ForConditionalGeneration

    from lmforge.infer.engine import Engine, beam_search
    from lmforge.infer.sampling import SamplingParams

    folder = make_hf_t5(tmp_path / "hf", "v1.1", num_decoder_layers=2)
    settings = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**settings, "decoder_start_token_id": 5}))
    theirs = T5ForConditionalGeneration.from_pretrained(folder).eval()
    ours = load_model(folder)
    src = SOURCES[0]
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([src + [1]]), max_new_tokens=8, do_sample=False)[0, 1:].tolist()
        beams = theirs.generate(torch.tensor([src]), max_new_tokens=8, num_beams=3, do_sample=False)[0, 1:].tolist()
    engine = Engine(ours, IdTokenizer(), max_batch=1)
    request = engine.add(src, SamplingParams(max_new_tokens=8, temperature=0))
    engine.run([request])
    seq = request.sequences[0]
    assert seq.tokens + ([seq.stop_token] if seq.stop_token is not None else []) == expected
    assert beam_search(ours, src, 3, 8, eos_ids=(1,))[0] == [t for t in beams if t != 0]
    with torch.no_grad():  # training's start is still config.json's: the loss is transformers'
        labels = torch.tensor([[7, 8, 9, 1]])
        torch.testing.assert_close(ours(torch.tensor([src]), labels=labels)[1],
                                   theirs(input_ids=torch.tensor([src]), labels=labels).loss, atol=1e-5, rtol=0)
