"""Decoding cost follows the filled part of the cache, not its size, and gives the same tokens."""

import torch

from lmforge.infer.engine import Engine, static_keys
from lmforge.infer.sampling import SamplingParams
from lmforge.model.config import Config
from lmforge.model.gpt import build_model


class IdTokenizer:
    eos_id = None

    def decode(self, ids):
        return ""


def test_static_steps_attend_to_power_of_two_buckets_of_the_cache():
    assert [static_keys(n, 1024) for n in (1, 128, 129, 256, 257, 1000, 1024)] == [128, 128, 256, 256, 512, 1024, 1024]
    assert static_keys(1, 64) == 64  # never more than the cache
    # a long context still compiles at most 8 shapes (dynamo's recompile limit)
    assert len({static_keys(n, 32768) for n in range(1, 32769)}) == 8


def test_static_shape_steps_across_buckets_give_the_same_tokens_as_dynamic_ones():
    # The static path (what compile=True runs), uncompiled so that the test takes seconds: rows at different
    # positions, one crossing from the 128-key bucket to the 256-key one, and a finished row's place refilled.
    torch.manual_seed(0)
    model = build_model(Config(vocab_size=300, block_size=512, n_layer=2, n_head=2, n_embd=32)).eval()
    prompts = [[1, 2, 3], list(range(5, 115)), [9], [7, 7]]
    lengths = [30, 40, 5, 20]

    def run(static):
        engine = Engine(model, IdTokenizer(), max_batch=2)
        engine.static = static
        seen = set()
        update = engine.cache.update

        def spy(layer, start, k, v):
            seen.add(engine.cache.view_len if isinstance(start, torch.Tensor) else None)
            return update(layer, start, k, v)

        engine.cache.update = spy
        requests = [engine.add(p, SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=[]))
                    for p, n in zip(prompts, lengths)]
        engine.run(requests)
        return [r.sequences[0].tokens for r in requests], seen

    static_tokens, static_views = run(True)
    dynamic_tokens, _ = run(False)
    assert static_tokens == dynamic_tokens
    assert {128, 256} <= static_views <= {None, 128, 256}  # never the whole 512-position cache

