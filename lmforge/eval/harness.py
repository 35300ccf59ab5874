"""An lm-evaluation-harness model backed by lmforge (the harness is an optional extra).

lmforge's package metadata declares the model in the harness's ``lm_eval.models`` entry-point group,
and importing this module registers it too, so any of these runs it:

    lm_eval --model lmforge --model_args pretrained=runs/demo/train --tasks ...   # harness releases with
                                                      # plugin discovery (EleutherAI/lm-evaluation-harness#4013)
    lmforge lm-eval --model lmforge --model_args pretrained=runs/demo/train --tasks ...   # any harness >= 0.4.5
    import lmforge.eval.harness; lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=...", tasks=[...])

Model arguments: ``pretrained`` (a model or run folder), ``batch_size``, ``device`` (the harness
asks for CUDA by default; without a GPU this falls back to the CPU, as its ``hf`` model does),
``dtype`` (float32, bfloat16, float16), ``max_gen_toks``, ``int8``, ``add_bos_token``. Text is encoded as
the harness's ``hf`` model encodes it (``harness_encode``: by default with the tokenizer's leading special
tokens, Llama's <s>; ``add_bos_token`` true or false decides), and an empty context and each rolling window
start from the beginning-of-sequence token where the tokenizer names one, else from the end-of-text token.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (the harness's own models first: it reads them only into an empty registry)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lmforge.eval.loglikelihood import empty_context, harness_encode, score_tokens, split_context

DTYPES = ("float32", "bfloat16", "float16")


@register_model("lmforge")
class LmforgeLM(LM):
    def __init__(self, pretrained: str | None = None, batch_size: int | str = 8, device: str | None = None,
                 dtype: str | None = None, max_gen_toks: int = 256, int8: bool = False, add_bos_token=None,
                 **kwargs):
        super().__init__()
        import torch

        from lmforge.errors import LmforgeError
        from lmforge.model.checkpoint import load_decoder, load_tokenizer_for
        from lmforge.utils import pick_device, warn

        if not pretrained:
            raise LmforgeError("the lmforge model needs a folder: --model_args pretrained=MODEL_OR_RUN_FOLDER")
        auto = str(batch_size).startswith("auto")
        if not auto and not (str(batch_size).isdigit() and int(batch_size) >= 1):
            raise LmforgeError(f"--batch_size {batch_size!r} must be a whole number of 1 or more, or auto")
        if not str(max_gen_toks).isdigit() or int(max_gen_toks) < 1:
            raise LmforgeError(f"max_gen_toks {max_gen_toks!r} must be a whole number of 1 or more")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            warn(f"device {device!r} asked for but no CUDA GPU is visible; running on the CPU")
            device = "cpu"
        if dtype not in (None, "auto", *DTYPES):
            raise LmforgeError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        torch_dtype = getattr(torch, dtype) if dtype in DTYPES else None
        needs = "it predicts no next token, which the harness's requests score (a decoder: gpt2, llama, qwen2, mistral)"
        self.model = load_decoder(pretrained, pick_device(device or "auto"), torch_dtype, needs=needs).eval()
        self.tokenizer = load_tokenizer_for(self.model)
        if str(int8).lower() in ("1", "true"):
            from lmforge.infer.engine import quantize_int8

            self.model = quantize_int8(self.model)
        self.batch_size = 8 if auto else int(batch_size)
        from lmforge.model.gpt import use_fast_kernels

        use_fast_kernels(self.model, self.batch_size)  # (the CPU's fastest kernels; quantised weights stay as they are)
        self.max_gen_toks = int(max_gen_toks)
        self.eot = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0
        self.prefix = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.eot  # (the hf model's)
        self.pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        add_bos = None if add_bos_token in (None, "None") else str(add_bos_token).lower() in ("1", "true")
        self.encode = lambda text: harness_encode(self.tokenizer, text, add_bos)
        unused = sorted(set(kwargs) - {"max_batch_size"})  # (what the harness itself passes every model)
        if unused:
            warn(f"model_args {', '.join(unused)} are not read by the lmforge model (it reads pretrained, batch_size, "
                 f"device, dtype, max_gen_toks, int8, add_bos_token)")

    # -- chat templates (--apply_chat_template), as the hf model renders them --------------------------

    @property
    def tokenizer_name(self) -> str:
        """What the harness keys its request cache by with a chat template (the hf model: the tokenizer's path)."""
        return str(self.model.source).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template prompts are rendered with under --apply_chat_template (the harness records it)."""
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation (the task's demonstrations and question) rendered with the model's chat template, as the
        hf model renders it: ready for the assistant's turn, or, without ``add_generation_prompt`` (a task's
        gen_prefix), ending inside the last message (transformers' continue_final_message); a template that refuses
        a system message is rendered again without it."""
        from lmforge.errors import LmforgeError

        if self.tokenizer.chat_template is None:
            raise LmforgeError(f"{self.model.source} has no chat template; leave out --apply_chat_template")
        tag = "CONTINUE_FINAL_MESSAGE_TAG "  # (transformers' marker for where the last message ends)
        if not add_generation_prompt:
            chat_history = [*chat_history[:-1], {**chat_history[-1], "content": chat_history[-1]["content"] + tag}]
        try:
            text = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
        except LmforgeError:
            chat_history = [m for m in chat_history if m["role"] != "system"]
            text = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt:
            return text
        if tag.strip() not in text:
            raise LmforgeError("the chat template leaves out part of the last message, so it cannot be continued")
        at = text.rindex(tag.strip())
        return text[:at] if text[at : at + len(tag)] == tag else text[:at].rstrip()

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            if context == "":  # the harness's convention: condition on end-of-text
                pairs.append(empty_context(self.tokenizer, self.tokenizer.encode(continuation)))
            else:
                pairs.append(split_context(self.tokenizer, context, continuation, self.encode))
        return score_tokens(self.model, pairs, self.batch_size, self.pad, progress=not disable_tqdm, desc="loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Every token of each text, after end-of-text, in the harness's disjoint windows of the context length."""
        windows, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(self.encode(text), prefix_token=self.prefix,
                                                    max_seq_len=self.model.config.block_size, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        scores = score_tokens(self.model, windows, self.batch_size, self.pad, progress=not disable_tqdm, desc="rolling")
        for i, (score, _) in zip(owner, scores):
            totals[i] += score
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

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
                                    stop=until, seed=kwargs.get("seed"), skip_special_tokens=True)  # (as hf decodes)
            ids = fit_prompt(self.encode(context) or [self.prefix], params.max_new_tokens,
                             self.model.config.block_size, truncate=True)
            handles.append(engine.add(ids, params))
        with tqdm(total=len(handles), desc="generate_until", disable=disable_tqdm) as bar:
            while engine.has_work:
                engine.step()
                bar.update(sum(h.finished for h in handles) - bar.n)
        return [h.sequences[0].text for h in handles]
