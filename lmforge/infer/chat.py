"""`lmforge chat`: a multi-turn conversation in the terminal, through the model's chat template.

Answers stream as they are generated. Ctrl-C stops the current answer (what was said so far is
kept); Ctrl-D or /exit quits. Commands: /reset, /show, /save FILE, /system TEXT, /help.
"""

from __future__ import annotations

import json
import sys

from lmforge.data.corpus import text_from_os
from lmforge.errors import LmforgeError
from lmforge.infer.generate import SamplingParams, chat_prompt, stream_generate

HELP = ("commands: /reset (forget the conversation), /show (print it), /save FILE (write it as JSON), "
        "/system TEXT (set the system prompt), /exit; //TEXT sends TEXT beginning with /; Ctrl-C stops an answer, "
        "Ctrl-D quits")
COMMANDS = ("/exit", "/quit", "/reset", "/show", "/save", "/system", "/help", "/?")


def fit_conversation(tokenizer, messages: list[dict], params: SamplingParams, context: int) -> tuple[list[dict], int]:
    """Drop the oldest turns (never the system prompt or the last message) until the prompt and the
    answer fit the context; returns (messages, number of messages dropped). A turn goes whole, the user's message
    with the answers after it, so the conversation still begins with a user's message (templates such as
    Llama 2's and Mistral's refuse one that does not)."""
    dropped = 0
    messages = list(messages)
    while True:
        prompt, _ = chat_prompt(tokenizer, messages, params)
        if len(tokenizer.encode(prompt)) + params.max_new_tokens <= context:
            return messages, dropped
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise LmforgeError(f"the message is too long for the model's context of {context} tokens "
                               f"(with {params.max_new_tokens} for the answer); shorten it or lower --max-new-tokens")
        del messages[first]
        dropped += 1
        while len(messages) - first > 1 and messages[first]["role"] != "user":
            del messages[first]
            dropped += 1


def chat_session(model, tokenizer, params: SamplingParams, system: str | None = None, read=input, out=sys.stdout,
                 retriever=None) -> list[dict]:
    """Run the conversation loop; returns the messages when the user quits. With a ``retriever`` (an index),
    each answer is generated from the passages retrieved for it, which are listed after it."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    out.write(f"Chatting with {model.source}. {HELP}\n")
    while True:
        try:
            line = text_from_os(read("you> "), "your message")
        except EOFError:
            out.write("\n")
            return messages
        except KeyboardInterrupt:
            out.write("\n")
            continue
        text = line.strip()
        if not text:
            continue
        command, _, argument = text.partition(" ")
        if text.startswith("//"):  # a message that begins with "/", written "//..."
            text = text[1:]
        elif text.startswith("/") and command not in COMMANDS:
            out.write(f"unknown command {command}; to send a message that begins with /, begin it with //\n{HELP}\n")
            continue
        elif text.startswith("/"):
            if command in ("/exit", "/quit"):
                return messages
            if command == "/reset":
                messages = [m for m in messages if m["role"] == "system"]
                out.write("(conversation cleared)\n")
            elif command == "/show":
                for m in messages:
                    out.write(f"{m['role']}: {m['content']}\n")
            elif command == "/save":
                if not argument:
                    out.write("usage: /save FILE\n")
                    continue
                try:  # ("x": a file already there is kept, never overwritten)
                    with open(argument.strip(), "x", encoding="utf-8") as f:
                        f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
                    out.write(f"(saved {len(messages)} messages to {argument.strip()})\n")
                except FileExistsError:
                    out.write(f"cannot save: {argument.strip()} already exists; give a new file name\n")
                except OSError as e:
                    out.write(f"cannot save to {argument.strip()}: {e.strerror or e}\n")
            elif command == "/system":
                messages = [m for m in messages if m["role"] != "system"]
                if argument:
                    messages.insert(0, {"role": "system", "content": argument})
                out.write("(system prompt set)\n" if argument else "(system prompt removed)\n")
            else:  # /help
                out.write(HELP + "\n")
            continue
        messages.append({"role": "user", "content": text})
        try:
            messages, dropped = fit_conversation(tokenizer, messages, params, model.config.block_size)
        except LmforgeError as e:
            messages.pop()
            out.write(f"error: {e}\n")
            continue
        if dropped:
            out.write(f"(dropped the {dropped} oldest message(s) to fit the context)\n")
        grounding = retriever.ground(messages) if retriever is not None else None
        if grounding is not None and grounding.refusal:
            out.write(f"assistant> {grounding.refusal}\n")
            messages.append({"role": "assistant", "content": grounding.refusal})
            continue
        if grounding is not None:
            try:  # the passages go into this turn's prompt only; the conversation keeps the question as asked
                prompt_messages, _ = fit_conversation(tokenizer, grounding.messages, params, model.config.block_size)
            except LmforgeError:
                hits = len(grounding.hits)
                fix = ("lower --retrieve-k" if hits > 1 else "index with a smaller --passage-tokens, or use a model "
                       "with a longer context")
                out.write(f"error: the {hits} retrieved passage(s) do not fit the model's context of "
                          f"{model.config.block_size} tokens; {fix}\n")
                messages.pop()
                continue
        else:
            prompt_messages = messages
        prompt, sampling = chat_prompt(tokenizer, prompt_messages, params, model)
        out.write("assistant> ")
        out.flush()
        answer = []
        try:
            for piece in stream_generate(model, tokenizer, prompt, sampling, rendered=True):
                answer.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        if grounding is not None:
            routed = f" (intent: {grounding.intent})" if grounding.intent is not None else ""
            out.write("sources: " + ", ".join(f"[{h.rank}] {h.passage.source}" for h in grounding.hits) + routed + "\n")
        messages.append({"role": "assistant", "content": "".join(answer)})
