"""An lm-evaluation-harness model backed by lmforge (the harness is an optional extra).

Importing this module registers the model as ``lmforge``:

    import lmforge.eval.harness                       # registers "lmforge" with lm_eval
    lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=runs/demo/train", tasks=[...])

    lmforge lm-eval --model lmforge --model_args pretrained=runs/demo/train --tasks ...   # the harness CLI

(lm-evaluation-harness 0.4 has no plugin discovery for models: its registry knows its own models and
whatever was registered in the running process, which is why the command goes through `lmforge lm-eval`.)
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lmforge.eval.loglikelihood import score_tokens, split_context


@register_model("lmforge")
class LmforgeLM(LM):
    def __init__(self, pretrained: str, batch_size: int | str = 8, device: str = "auto", max_gen_toks: int = 256,
                 int8: bool = False, **kwargs):
        super().__init__()
        from lmforge.model.checkpoint import load_decoder, load_tokenizer_for
        from lmforge.utils import pick_device

        self.model = load_decoder(pretrained, pick_device(device))
        self.tokenizer = load_tokenizer_for(self.model)
        if str(int8).lower() in ("1", "true"):
            from lmforge.infer.engine import quantize_int8

            self.model = quantize_int8(self.model)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.eot = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0
        self.pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            if context == "":  # the harness's convention: condition on end-of-text
                pairs.append(([self.eot], self.tokenizer.encode(continuation)))
            else:
                pairs.append(split_context(self.tokenizer, context, continuation))
        return score_tokens(self.model, pairs, self.batch_size, self.pad, progress=not disable_tqdm, desc="loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tokenizer.encode(text), prefix_token=self.eot, max_seq_len=self.model.config.block_size,
                context_len=1)]
            out.append(sum(score for score, _ in score_tokens(self.model, windows, self.batch_size, self.pad)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lmforge.infer.engine import Engine
        from lmforge.infer.generate import SamplingParams, fit_prompt

        engine = Engine(self.model, self.tokenizer, max_batch=self.batch_size)
        handles = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or [self.tokenizer.decode([self.eot])]
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            params = SamplingParams(max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)), temperature=temperature,
                                    stop=until, seed=kwargs.get("seed"))
            ids = fit_prompt(self.tokenizer.encode(context) or [self.eot], params.max_new_tokens,
                             self.model.config.block_size, truncate=True)
            handles.append(engine.add(ids, params))
        engine.run(handles)
        return [h.sequences[0].text for h in handles]
