"""The encoder-decoder (T5) on settings the other tests do not use, against transformers: position buckets whose
max_distance leaves no logarithmic range, and beam search on a model left in training mode."""

from __future__ import annotations

import pytest
import torch

from lmforge.model.checkpoint import load_model

transformers = pytest.importorskip("transformers")

from test_encoder_decoder import SOURCES, IdTokenizer, make_hf_t5  # noqa: E402


def test_a_decoder_whose_max_distance_is_within_its_exact_buckets_generates_as_transformers(tmp_path):
    """8 buckets and max_distance 4: the decoder's 4 exact buckets reach max_distance, and transformers' bucket
    arithmetic is undefined from distance 4 on (it fails there). Up to that point it generates; lmforge failed at
    the first token, as a decoding step's bias table holds the distances of later steps too."""
    from transformers import T5ForConditionalGeneration

    from lmforge.infer.engine import Engine, beam_search
    from lmforge.infer.sampling import SamplingParams

    folder = make_hf_t5(tmp_path / "hf", "v1.1", num_decoder_layers=2, relative_attention_num_buckets=8,
                        relative_attention_max_distance=4)
    theirs = T5ForConditionalGeneration.from_pretrained(folder).eval()
    ours = load_model(folder).eval()
    src = SOURCES[0]
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([src + [1]]), max_new_tokens=4, do_sample=False,
                                   eos_token_id=None)[0, 1:].tolist()
        beams = theirs.generate(torch.tensor([src]), max_new_tokens=4, num_beams=2, do_sample=False,
                                eos_token_id=None)[0, 1:].tolist()
    engine = Engine(ours, IdTokenizer(), max_batch=1)
    request = engine.add(src, SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=[]))
    engine.run([request])
    assert request.sequences[0].tokens == expected
    assert beam_search(ours, src, 2, 4)[0] == beams


def test_beam_search_on_a_model_in_training_mode_has_no_dropout(tmp_path):
    """A model object left in training mode (just fine-tuned, or built): greedy decoding set it to eval mode, beam
    search ran with dropout and gave another answer each call (transformers' from_pretrained models are in eval)."""
    from lmforge.infer.engine import beam_search

    model = load_model(make_hf_t5(tmp_path / "hf", "v1.1", dropout_rate=0.5)).eval()
    expected = beam_search(model, SOURCES[0], 3, 8, eos_ids=(1,), n=3)
    model.train()
    assert [beam_search(model, SOURCES[0], 3, 8, eos_ids=(1,), n=3) for _ in range(2)] == [expected] * 2


def test_chat_with_an_encoder_decoder_and_a_folders_max_length_are_said(tmp_path, capsys):
    """generate(t5, chat=True) wrapped the source in ChatML silently (serve refuses chat for such a model); a
    generation_config.json max_length (transformers' limit of the decoder's length) was passed over without a word."""
    import json

    from transformers import T5Config, T5ForConditionalGeneration

    from lmforge import generate
    from lmforge.errors import LmforgeError

    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).save_pretrained(tmp_path / "t5")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "t5" / "tokenizer.json"))
    (tmp_path / "t5" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1", "pad_token": "w0"}))
    with pytest.raises(LmforgeError, match="encoder-decoder reads its prompt as a source"):
        generate(str(tmp_path / "t5"), "w5 w6", chat=True, max_new_tokens=3)
    settings = json.loads((tmp_path / "t5" / "generation_config.json").read_text())
    (tmp_path / "t5" / "generation_config.json").write_text(json.dumps({**settings, "max_length": 6}))
    capsys.readouterr()
    generate(str(tmp_path / "t5"), "w5 w6", max_new_tokens=3, temperature=0)
    err = capsys.readouterr().err
    assert "max_length 6" in err and "--max-new-tokens" in err
