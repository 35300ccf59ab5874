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
