"""Byte-level BPE tokenizers, trained and stored the Hugging Face way (``tokenizer.json``).

The BPE itself is the Rust ``tokenizers`` library; this module chooses its settings, reserves the
special tokens later stages need, and wraps loading so any existing ``tokenizer.json`` (GPT-2's,
a WordPiece BERT's) works the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lmforge.errors import LmforgeError
from lmforge.utils import atomic_write_json, atomic_write_text, first_line, read_json

END_OF_TEXT = "<|endoftext|>"
# ChatML turn markers for chat fine-tuning, and a padding token, reserved from the start so a
# pretrained checkpoint never needs its vocabulary resized later.
SPECIAL_TOKENS = [END_OF_TEXT, "<|im_start|>", "<|im_end|>", "<|pad|>"]
# Names other tokenizers use for the end-of-sequence token, tried in order when
# tokenizer_config.json does not say.
_EOS_CANDIDATES = [END_OF_TEXT, "</s>", "<|im_end|>", "<eos>", "[SEP]"]
_PAD_CANDIDATES = ["<|pad|>", "<pad>", "[PAD]"]
# What an encoder's masked-LM pretraining needs: reserved when a tokenizer is trained for an encoder
# (after the four above, so their ids do not move), and found under BERT's or RoBERTa's names otherwise.
ENCODER_TOKENS = ["[CLS]", "[SEP]", "[MASK]"]
_ENCODER_CANDIDATES = {"cls_token": ["[CLS]", "<s>"], "sep_token": ["[SEP]", "</s>"], "mask_token": ["[MASK]", "<mask>"]}
END_OF_TURN = "<|im_end|>"
# ChatML, the default for a model whose tokenizer_config.json has no chat_template. It is what
# transformers' apply_chat_template renders for the same template string.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# The special tokens a transformers tokenizer class has by default (where tokenizer_config.json and
# special_tokens_map.json name none): transformers fills them in, and chat templates read them.
_CLASS_TOKENS = {
    "LlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "CodeLlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "GPT2Tokenizer": {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT},
    "Qwen2Tokenizer": {"eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT, "unk_token": END_OF_TEXT},
    "T5Tokenizer": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "BertTokenizer": {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                      "mask_token": "[MASK]"},
    "GemmaTokenizer": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
}
# The byte each character of a byte-level BPE vocabulary (GPT-2's, Llama 3's, Qwen's) stands for: printable bytes
# as themselves, the others as the characters from U+0100 on, in order (GPT-2's bytes_to_unicode)
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
_BYTE_LEVEL = {chr(b): b for b in _PRINTABLE} | {chr(256 + i): b for i, b in
                                                 enumerate(b for b in range(256) if b not in _PRINTABLE)}
_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")  # (an AddedToken's)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _add_configured_tokens(hf: HFTokenizer, config: dict) -> None:
    """Make the added tokens what transformers makes them on loading: an entry of tokenizer_config.json's
    added_tokens_decoder that differs from tokenizer.json's is added again (its flags win), and every special token
    the files name (bos_token ... mask_token, additional and extra special tokens) is an added token marked special:
    a new one where the vocabulary lacks it. (Otherwise "</s>" in a text was pieces of "<", "/s", ">", and an eos
    token not flagged special stayed in text decoded without special tokens.)"""
    decoder = config.get("added_tokens_decoder")
    existing = {t.content: t for t in hf.get_added_tokens_decoder().values()}
    for spec in decoder.values() if isinstance(decoder, dict) else []:
        if isinstance(spec, dict) and isinstance(spec.get("content"), str):
            # (a token special in tokenizer.json stays special: the Rust library's decode still skips it)
            special = bool(spec.get("special")) or getattr(existing.get(spec["content"]), "special", False)
            token = AddedToken(**{**{k: spec[k] for k in _TOKEN_FIELDS if k in spec}, "special": special})
            if spec["content"] not in existing or existing[spec["content"]].__getstate__() != token.__getstate__():
                (hf.add_special_tokens if token.special else hf.add_tokens)([token])
    named = [config.get(key) for key in _SPECIAL_KEYS]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key)
        named += value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
    existing = {t.content: t for t in hf.get_added_tokens_decoder().values()}
    for value in named:
        spec = value if isinstance(value, dict) else {"content": value}
        if isinstance(spec.get("content"), str) and spec["content"] and not getattr(existing.get(spec["content"]),
                                                                                      "special", False):
            flags = {"normalized": False, **{k: spec[k] for k in _TOKEN_FIELDS if k in spec}, "special": True}
            hf.add_special_tokens([existing.get(spec["content"]) or AddedToken(**flags)])


def _read_config(path: Path) -> dict:
    return read_json(path, "tokenizer configuration") if path.exists() else {}


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and English contractions."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the facts lmforge needs: end-of-text id, hash, save/load."""

    def __init__(self, hf: HFTokenizer, config: dict | None = None):
        # Some tokenizer.json files pad or truncate every encoding (MiniLM's pads to 128);
        # lmforge pads and truncates where it needs to, so encode() returns exactly the text's tokens.
        hf.no_padding()
        hf.no_truncation()
        self.hf = hf
        self.config = dict(config or {})
        # a folder's own settings (tokenizer_config.json, special_tokens_map.json): saved as they are, nothing added
        self.configured = bool(self.config)
        if self.config.get("split_special_tokens"):  # (transformers: special-token text in a text is plain text)
            hf.encode_special_tokens = True
        # transformers cleans decoded text up where tokenizer_config.json asks, except after a BPE (where it would
        # take spaces the text has), unless told to all the same
        self.cleans_up = bool(self.config.get("clean_up_tokenization_spaces")) and (
            type(hf.model).__name__ != "BPE"
            or bool(self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
        self.eos_id = self._find_special(self.config.get("eos_token"), _EOS_CANDIDATES)
        self.pad_id = self._find_special(self.config.get("pad_token"), _PAD_CANDIDATES)
        self.cls_id, self.sep_id, self.mask_id = (self._find_special(self.config.get(key), names)
                                                  for key, names in _ENCODER_CANDIDATES.items())
        # T5's span-corruption sentinels: <extra_id_0> and the ids below it, <extra_id_k> = sentinel_id - k
        self.sentinel_id = hf.token_to_id("<extra_id_0>")
        self.sentinels = 0
        while self.sentinel_id is not None and hf.token_to_id(f"<extra_id_{self.sentinels}>") == self.sentinel_id - self.sentinels:
            self.sentinels += 1

    def _find_special(self, configured, candidates: list[str]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        for token in ([configured] if configured else []) + candidates:
            token_id = self.hf.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    # -- loading and saving -------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.json`` from a file or a folder holding one (a model folder, a run)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            where = f"{path} has no tokenizer.json" if path.is_dir() else f"{path} not found"
            raise LmforgeError(f"{where}; train one with `lmforge tokenizer train` or point at a folder that has one")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception on a bad file
            raise LmforgeError(f"{file} is not a valid tokenizer.json ({first_line(e)}); re-create it") from None
        config = _read_config(file.parent / "tokenizer_config.json")
        # What transformers also reads: the chat template in a file of its own (how transformers >= 4.50 saves
        # it; it wins over tokenizer_config.json's), the special tokens of special_tokens_map.json (older
        # folders), and the tokenizer class's defaults (LlamaTokenizer's <s>, </s>, <unk>) where neither says.
        jinja = file.parent / "chat_template.jinja"
        if jinja.is_file():
            try:
                config["chat_template"] = jinja.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise LmforgeError(f"{jinja} is not UTF-8 text; fix or delete it") from None
        # (transformers 5 reads special_tokens_map.json only for a tokenizer_config.json without added_tokens_decoder,
        # and then it wins; lmforge also takes the tokens it names that tokenizer_config.json does not)
        overrides = "added_tokens_decoder" not in config
        for key, value in _read_config(file.parent / "special_tokens_map.json").items():
            if overrides and key in _SPECIAL_KEYS:
                config[key] = value
            else:
                config.setdefault(key, value)
        for key, value in _CLASS_TOKENS.get(str(config.get("tokenizer_class", "")).removesuffix("Fast"), {}).items():
            if key not in config and hf.token_to_id(value) is not None:
                config[key] = value
        _add_configured_tokens(hf, config)
        tok = cls(hf, config)
        tok.path = file
        # transformers 4.54+'s named templates, one file each: when there are any, they and chat_template.jinja (as
        # "default") are the templates, whatever tokenizer_config.json says, as transformers reads them
        extra = sorted((file.parent / "additional_chat_templates").glob("*.jinja"))
        if extra:
            tok.named_templates = {"default": config["chat_template"]} if jinja.is_file() else {}
            for template in extra:
                try:
                    tok.named_templates[template.stem] = template.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    raise LmforgeError(f"{template} is not UTF-8 text; fix or delete it") from None
        # (a folder whose only setting is its chat template names no special token: saved as a bare one is)
        tok.configured = any((file.parent / name).is_file() for name in ("tokenizer_config.json",
                                                                         "special_tokens_map.json"))
        return tok

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that ``transformers`` reads: a folder's own
        settings as they were; for a tokenizer lmforge trained (or a bare tokenizer.json), the special tokens it has
        under their roles."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", self.hf.to_str(pretty=True))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        config.update(self.config)
        # special_tokens_map.json's {"content": ..., "lstrip": ...}: transformers 5 refuses it in tokenizer_config.json
        # (the token, flags and all, is in tokenizer.json's added tokens: its text says which)
        for key in _SPECIAL_KEYS:
            if isinstance(config.get(key), dict):
                config[key] = self._token_text(key)
        if isinstance(config.get("additional_special_tokens"), list):
            config["additional_special_tokens"] = [t.get("content") if isinstance(t, dict) else t
                                                   for t in config["additional_special_tokens"]]
        if not self.configured:  # (a folder's tokenizer gets no token it did not name: lmforge finds them again)
            if self.eos_id is not None:
                config.setdefault("eos_token", self.hf.id_to_token(self.eos_id))
                config.setdefault("bos_token", self.hf.id_to_token(self.eos_id))
            if self.pad_id is not None:
                config.setdefault("pad_token", self.hf.id_to_token(self.pad_id))
            for key, token_id in (("cls_token", self.cls_id), ("sep_token", self.sep_id), ("mask_token", self.mask_id)):
                if token_id is not None:
                    config.setdefault(key, self.hf.id_to_token(token_id))
        single = self.hf.encode("a").ids
        if (self.cls_id is not None and self.sep_id is not None and single[:1] == [self.cls_id]
                and single[-1:] == [self.sep_id] and any(self.hf.encode("a", "b").type_ids)):
            # BERT's [CLS] a [SEP] b [SEP] with segment ids: without this, transformers 5's PreTrainedTokenizerFast
            # returns no token_type_ids and a (prompt, answer) pair scores differently there than here. (Not for
            # Llama's or T5's pair templates, whose models take no token_type_ids: generate would refuse them.)
            config.setdefault("model_input_names", ["input_ids", "token_type_ids", "attention_mask"])
        atomic_write_json(folder / "tokenizer_config.json", config)
        source = getattr(self, "path", None)
        named = source.parent / "additional_chat_templates" if source is not None else None
        if named is not None and named.is_dir() and named.resolve() != (folder / named.name).resolve():
            # (transformers 4.54+'s named templates, one file each, beside the default in chat_template.jinja)
            for template in sorted(named.glob("*.jinja")):
                (folder / named.name).mkdir(exist_ok=True)
                atomic_write_text(folder / named.name / template.name, template.read_text(encoding="utf-8"))
            if isinstance(config.get("chat_template"), str):
                atomic_write_text(folder / "chat_template.jinja", config["chat_template"])

    # -- chat ----------------------------------------------------------------------------------

    named_templates: dict[str, str] | None = None  # additional_chat_templates/ (with chat_template.jinja's)

    def _named(self) -> dict[str, str] | None:
        """The templates by name, where a folder names several (a list in tokenizer_config.json, or
        additional_chat_templates/); None where it has one or none."""
        if self.named_templates:
            return self.named_templates
        template = self.config.get("chat_template")
        if isinstance(template, list):
            return {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return None

    @property
    def chat_template(self) -> str | None:
        """The ``chat_template`` of tokenizer_config.json or chat_template.jinja (the "default" one when several are
        named, else the first: whether there is one at all; rendering picks as ``_template_for`` says)."""
        named = self._named()
        if named is not None:
            return named.get("default") or next(iter(named.values()), None)
        return self.config.get("chat_template")

    def _template_for(self, tools) -> str | None:
        """The template transformers renders ``tools`` (or none) with: of several named ones, "tool_use" where tools
        are given and there is one, else "default"; several without a default are refused, as transformers
        refuses them."""
        named = self._named()
        if named is None:
            return self.chat_template
        if tools and named.get("tool_use"):
            return named["tool_use"]
        if named.get("default"):
            return named["default"]
        raise LmforgeError(f"the tokenizer has several chat templates ({', '.join(sorted(map(str, named)))}) and none "
                           f"named default, so which one to use is not said (transformers refuses it too); name one "
                           f"default in tokenizer_config.json, or keep one as chat_template.jinja")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tools: list | None = None) -> str:
        """Render ``messages`` with the model's template (ChatML when it has none), as transformers does."""
        return self._render(messages, add_generation_prompt, tools)

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list | None,
                mark_generation: bool = False) -> str:
        """``apply_chat_template``; with ``mark_generation``, what the template's ``{% generation %}`` blocks write
        (the assistant's part, in templates written for transformers' ``return_assistant_tokens_mask``) is
        enclosed in ``_GENERATION_MARKS``."""
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", _generation_block()])
        env.mark_generation = mark_generation
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        # (as transformers: a message's keys set to None are left out, so `is defined` and `in` read them as absent)
        messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
        try:
            template = env.from_string(self._template_for(tools) or DEFAULT_CHAT_TEMPLATE)
            # as transformers renders: the special tokens the tokenizer has (one it lacks is undefined)
            special = {k: self._token_text(k) for k in _SPECIAL_KEYS if self._token_text(k)}
            extra = self.config.get("additional_special_tokens")
            if isinstance(extra, list):
                special["additional_special_tokens"] = [t.get("content") if isinstance(t, dict) else t for t in extra]
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                   documents=None, **special)
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
            # (a template is code from the model's folder: what it raises is said in one line)
            raise LmforgeError(f"the chat template failed: {e}") from None

    def _token_text(self, key: str) -> str:
        value = self.config.get(key)
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    @property
    def end_of_turn_id(self) -> int | None:
        """The special token the chat template ends an assistant's turn with (ChatML's <|im_end|>, Llama 3's
        <|eot_id|>, Gemma's <end_of_turn>, Phi-3's <|end|>, Llama 2's </s>), found by rendering a short
        conversation; with no template, ChatML's (lmforge's default), when the vocabulary has it."""
        template = self.chat_template
        if not hasattr(self, "_end_of_turn") or self._end_of_turn[0] != template:
            self._end_of_turn = (template, self._find_end_of_turn() if template else self.hf.token_to_id(END_OF_TURN))
        return self._end_of_turn[1]

    def _find_end_of_turn(self) -> int | None:
        answer = "\u2603 yes"  # (a snowman: text no template writes of its own)
        try:
            text = self.apply_chat_template([{"role": "user", "content": "\u2603 question"},
                                             {"role": "assistant", "content": answer}])
        except LmforgeError:  # a template that refuses this conversation: ChatML's marker, if any
            return self.hf.token_to_id(END_OF_TURN)
        after = text[text.rfind(answer) + len(answer):] if answer in text else ""
        return next((i for i in self.encode(after) if i in self.special_ids), None)

    @property
    def special_ids(self) -> set[int]:
        """The ids of the added tokens marked special."""
        return {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    def encode_chat(self, messages: list[dict], tools: list | None = None) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and its loss mask: 1 on what each assistant turn adds after
        its header (the content and the end-of-turn token, so the model learns to stop), 0 elsewhere.
        Where the template marks the assistant's part with ``{% generation %}``, that part (as transformers'
        ``return_assistant_tokens_mask``); otherwise what each assistant turn adds to the conversation before it.
        A token is learned when any of its characters is (as transformers: a word joined to the header's space)."""
        marked = self._render(messages, False, tools, mark_generation=True)
        marks = _GENERATION_MARKS[0] in marked
        regions = _generation_regions(marked) if marks else None
        if regions is not None:
            text = marked.replace(_GENERATION_MARKS[0], "").replace(_GENERATION_MARKS[1], "")
        else:  # (no {% generation %} block: the marked rendering is the plain one)
            text = self.apply_chat_template(messages, tools=tools) if marks else marked
            regions = [self._turn_region(messages, i, text, tools) for i, m in enumerate(messages)
                       if isinstance(m, dict) and m.get("role") == "assistant"]
        enc = self.hf.encode(text, add_special_tokens=False)
        mask = [int(any(start < b and end > a for a, b in regions)) for start, end in enc.offsets]
        return enc.ids, mask

    def _turn_region(self, messages: list[dict], i: int, text: str, tools: list | None) -> tuple[int, int]:
        """Where assistant turn ``i`` is in the rendered conversation ``text``: from the end of the conversation
        before it with the generation prompt, to the end of its content and end-of-turn token."""
        cannot = LmforgeError("the chat template does not render a conversation as a prefix of the next turn; "
                              "lmforge cannot tell which tokens are the assistant's (a template that marks them "
                              "with {% generation %} ... {% endgeneration %} can be learned from)")
        before = self.apply_chat_template(messages[:i], add_generation_prompt=True, tools=tools)
        if not text.startswith(before):
            raise cannot
        start = len(before)
        end_of_turn = self.hf.id_to_token(self.end_of_turn_id) if self.end_of_turn_id is not None else None
        upto = self.apply_chat_template(messages[: i + 1], tools=tools)
        if text.startswith(upto) and upto.startswith(before):
            turn = upto[start:].rstrip()  # (a trailing newline is not learned)
            if end_of_turn and end_of_turn in turn:  # (nor what a template writes after the turn's end at the
                turn = turn[:turn.index(end_of_turn) + len(end_of_turn)]  # very end: Phi-3's <|endoftext|>)
            return start, start + len(turn)
        # A template that writes the last turn otherwise than the same turn further on (Phi-3's end-of-text after
        # the last, Qwen3's empty thinking block in the last): the turn's content where it is in the whole
        content = messages[i].get("content")
        found = text.find(content, start) if isinstance(content, str) else -1
        if found < 0 or (end_of_turn and end_of_turn in text[start:found]):
            raise cannot
        end = found + len(content)
        return start, end + (len(end_of_turn) if end_of_turn and text.startswith(end_of_turn, end) else 0)

    # -- use -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in the text map to their special ids.

        ``add_special_tokens`` applies the tokenizer's own template (BERT's [CLS] ... [SEP]).
        """
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence token tokenizer_config.json (or the files read with it) names, if any."""
        token = self._token_text("bos_token")
        return self.hf.token_to_id(token) if token else None

    @functools.cached_property
    def prefix_ids(self) -> list[int]:
        """The special tokens the tokenizer's own template puts before a text (Llama's and Mistral's <s>, Llama 3's
        <|begin_of_text|>, Gemma's <bos>; none for GPT-2's, Qwen's or lmforge's own)."""
        plain = self.hf.encode("a", add_special_tokens=False).ids
        full = self.hf.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start]
        return []

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt written as plain text, as transformers' ``tokenizer(text)`` gives them to a
        decoder: the tokenizer's leading special tokens (``prefix_ids``), then the text's. (Nothing is put after
        a prompt: it is continued.) A rendered chat template writes its own special tokens: ``encode`` it."""
        return self.prefix_ids + self.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens included, as transformers' ``decode`` gives it (cleaned up where the
        tokenizer asks: ``cleans_up``)."""
        text = self.hf.decode(list(ids), skip_special_tokens=False)
        return clean_up_tokenization(text) if self.cleans_up else text

    def token_bytes(self, token: int) -> bytes:
        """The bytes ``token`` stands for: those of its text, but for a byte-level BPE's or a byte-fallback
        (``<0xE2>``) piece of a character, its own bytes rather than U+FFFD's (what ``decode`` writes for it)."""
        from lmforge.infer.detokenize import BYTE_TOKEN

        text = self.decode([token])
        if "\ufffd" not in text:
            return text.encode("utf-8")
        name = self.hf.id_to_token(token) or ""
        if BYTE_TOKEN.fullmatch(name):
            return bytes([int(name[3:5], 16)])
        if name and all(c in _BYTE_LEVEL for c in name):
            return bytes(_BYTE_LEVEL[c] for c in name)
        return text.encode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON, to check a dataset and a model use the same tokenizer."""
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()

    def tokenizes_as(self, other: Tokenizer) -> bool:
        """Whether ``other`` turns text into the same ids: the same file, or the same vocabulary, merges,
        normalisation, pre-tokenisation and added tokens (a copy transformers saved again may differ in padding,
        truncation or key order, which change no id)."""
        if self.sha256 == other.sha256:
            return True

        def essentials(tok: Tokenizer) -> str:
            spec = json.loads(tok.hf.to_str())
            added = sorted((t.get("id"), t.get("content")) for t in spec.get("added_tokens") or [])
            return json.dumps([spec.get("model"), spec.get("normalizer"), spec.get("pre_tokenizer"), added],
                              sort_keys=True)

        return essentials(self) == essentials(other)


# What ``{% generation %}`` blocks write is enclosed in these while a loss mask is made (Unicode noncharacters,
# which no text holds: a conversation holding one is rendered unmarked)
_GENERATION_MARKS = ("\ufdd0", "\ufdd1")


@functools.cache
def _generation_block():
    """The extension class (made at first use: jinja2 is imported only where a template is rendered)."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        """transformers' ``{% generation %} ... {% endgeneration %}``: the assistant's part of a template, written
        as it is (enclosed in ``_GENERATION_MARKS`` while a loss mask is made)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_write"), [], [], body).set_lineno(lineno)

        def _write(self, caller):
            text = caller()
            return f"{_GENERATION_MARKS[0]}{text}{_GENERATION_MARKS[1]}" if self.environment.mark_generation else text

    return GenerationBlock


def _generation_regions(marked: str) -> list[tuple[int, int]] | None:
    """The (start, end) of each marked part in the text without the marks; None where the marks do not pair up
    (a message that held one of them)."""
    regions, offset, start = [], 0, None
    for position, char in enumerate(marked):
        if char in _GENERATION_MARKS:
            opening = char == _GENERATION_MARKS[0]
            if opening == (start is not None):
                return None
            if opening:
                start = position - offset
            else:
                regions.append((start, position - offset))
                start = None
            offset += 1
    return regions if start is None else None


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' ``tojson`` filter for chat templates: plain ``json.dumps`` (Jinja's own escapes HTML
    characters and sorts keys)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def new_byte_level_bpe() -> HFTokenizer:
    """An untrained GPT-2 style byte-level BPE: every byte is a symbol, so nothing is unknown."""
    hf = HFTokenizer(models.BPE())
    # No normaliser: tokenisation must be lossless; cleaning (NFC etc.) belongs to `prepare`.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    return hf


# The largest --vocab-size trained: 8x the largest vocabularies in use (Gemma's 262,144).
MAX_VOCAB_SIZE = 1 << 21


def train_tokenizer(
    inputs: Sequence[str] | None = None,
    out: str | os.PathLike = "tokenizer",
    vocab_size: int = 8192,
    min_frequency: int = 2,
    text_field: str = "text",
    progress: bool = True,
    overwrite: bool = False,
    encoder: bool = False,
    sentinels: int = 0,
    min_chars: int = 64,
) -> Tokenizer:
    """Train a byte-level BPE on ``inputs`` (files, folders, ``-``; default: the Python stdlib).

    The text is cleaned exactly as ``prepare`` cleans it, so the merges fit the data they will
    tokenise. Saves ``tokenizer.json`` and ``tokenizer_config.json`` in ``out``. ``encoder`` also
    reserves [CLS], [SEP] and [MASK] for masked-LM pretraining, and makes ``encode(...,
    add_special_tokens=True)`` give "[CLS] text [SEP]" (and "[CLS] a [SEP] b [SEP]" for a pair), as BERT's does.
    ``sentinels`` adds T5's ``<extra_id_0>`` ... at the end of the vocabulary (``<extra_id_0>`` last, the others
    counting down), for span corruption; ``vocab_size`` counts them. Documents shorter than ``min_chars`` are left
    out, as ``prepare`` leaves them out (0 keeps every one: a corpus of short sentences).
    """
    from lmforge.data.corpus import CorpusStats, corpus_inputs, read_clean_documents

    inputs = corpus_inputs(inputs)
    n_byte_symbols = 256
    special_tokens = SPECIAL_TOKENS + (ENCODER_TOKENS if encoder else [])
    if sentinels < 0:
        raise LmforgeError(f"--sentinels {sentinels} must be 0 or more")
    if sentinels >= vocab_size > 0:
        raise LmforgeError(f"--sentinels {sentinels} leaves no room in --vocab-size {vocab_size}, which counts them "
                           f"(T5 has 100)")
    if vocab_size > MAX_VOCAB_SIZE:  # (the Rust trainer takes 64-bit sizes, and allocates for the vocabulary asked)
        raise LmforgeError(f"--vocab-size {vocab_size} is too large: at most {MAX_VOCAB_SIZE:,} tokens (the largest "
                           f"vocabularies in use have about 256,000)")
    if vocab_size - sentinels < n_byte_symbols + len(special_tokens) + 1:
        raise LmforgeError(
            f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least "
            f"{n_byte_symbols + len(special_tokens) + 1 + sentinels} (256 bytes + special tokens + sentinels + 1 merge)"
        )
    if min_chars < 0:
        raise LmforgeError(f"--min-chars {min_chars} must be 0 or more")
    if not 0 <= min_frequency < 2**63:  # (a pair count, 64 bits in the Rust trainer)
        raise LmforgeError(f"--min-frequency {min_frequency} must be a pair count from 0 to {2**63 - 1} (default 2)")
    from lmforge.utils import check_output_dir, refuse_overwriting_sources

    # (a tokenizer that data was prepared with is not replaced by accident; nor a folder of something else)
    out = check_output_dir(out, overwrite, ("a tokenizer folder", "tokenizer.json"))
    refuse_overwriting_sources(out, *(i for i in inputs or [] if str(i) != "-"))  # ("-": stdin)
    hf = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - sentinels,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    stats = CorpusStats()
    documents = (doc.text for doc in read_clean_documents(inputs, text_field, min_chars, stats))
    hf.train_from_iterator(documents, trainer=trainer)
    if stats.kept == 0:
        raise LmforgeError(f"the corpus has no documents left after cleaning ({stats.summary()}); pass files with some "
                           f"text in them, or lower min_chars ({min_chars}) for a corpus of short texts")
    if sentinels:
        from tokenizers import AddedToken

        hf.add_special_tokens([AddedToken(f"<extra_id_{k}>", special=True) for k in reversed(range(sentinels))])
    if encoder:
        cls, sep = (hf.token_to_id(t) for t in ENCODER_TOKENS[:2])
        hf.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                          special_tokens=[("[CLS]", cls), ("[SEP]", sep)]),
        ])
    tok = Tokenizer(hf)
    tok.save(out)
    tok.path = Path(out) / "tokenizer.json"
    tok.train_stats = stats
    return tok
