"""The `lmforge` command: thin subcommands over the Python API.

A mistake in the input prints one line, ``lmforge: error: ...``, and exits with status 2;
``--debug`` (anywhere on the line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmforge import __version__
from lmforge.errors import LmforgeError


def _refuse_terminal_stdin(what: str) -> None:
    """``-`` reads standard input: when that is the terminal, nothing is piped in and the command would wait
    silently for text the user does not know it is being asked for."""
    if sys.stdin is None or sys.stdin.isatty():
        raise LmforgeError(f"- reads {what} from standard input, but nothing is piped in (it is the terminal); pipe "
                           f"it in (`cat FILE | lmforge ...`) or pass it on the command line")


def cmd_tokenizer_train(args) -> None:
    from lmforge.data.corpus import warn_non_utf8_files
    from lmforge.tokenizer import train_tokenizer

    if "-" in args.inputs:
        _refuse_terminal_stdin("the corpus")
    tok = train_tokenizer(args.inputs or None, args.out, args.vocab_size, args.min_frequency, args.text_field,
                          progress=not args.quiet, overwrite=args.overwrite, encoder=args.encoder,
                          sentinels=args.sentinels, min_chars=args.min_chars)
    print(f"cleaning: {tok.train_stats.summary()}")
    warn_non_utf8_files(tok.train_stats.non_utf8_files)
    print(f"saved a {tok.vocab_size}-token byte-level BPE to {tok.path}")


def cmd_prepare(args) -> None:
    from lmforge.data.corpus import warn_non_utf8_files
    from lmforge.data.prepare import prepare

    if "-" in args.inputs:
        _refuse_terminal_stdin("the corpus")
    meta = prepare(
        args.inputs or None, args.tokenizer, args.out, args.val_fraction, args.seed, args.min_chars, args.workers,
        args.text_field, args.shard_tokens, args.overwrite, progress=not args.quiet,
    )
    stats = meta["cleaning"]
    print(
        f"cleaning: {stats['documents']} documents read, {stats['dropped_duplicates']} exact duplicates and "
        f"{stats['dropped_short']} shorter than {meta['min_chars']} characters dropped, "
        + (f"{stats['null_texts']} rows whose text is null skipped, " if stats["null_texts"] else "")
        + f"{stats['control_chars_removed']} control characters removed"
    )
    warn_non_utf8_files(stats["non_utf8_files"])
    for split, info in meta["splits"].items():
        if not info["tokens"]:
            print(f"{split}: no documents")
            continue
        per = info["bytes"] / info["tokens"]
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens ({per:.2f} bytes/token) "
              f"in {len(info['shards'])} shard(s)")
    print(f"wrote {args.out}")


def cmd_pretrain(args, extra: list[str]) -> None:
    from lmforge.train.config import parse_overrides
    from lmforge.train.loop import pretrain

    summary = pretrain(args.config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                       **parse_overrides(extra))
    if summary["checkpoint"] and not summary.get("already_done"):
        print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens; latest checkpoint {summary['checkpoint']}")


def _load_for_inference(args, seq2seq: bool = False):
    """The decoder (or, with ``seq2seq``, also an encoder-decoder) and tokenizer of ``--model``, int8-quantised
    with ``--int8``."""
    from lmforge.model.checkpoint import load_decoder, load_generator, load_tokenizer_for
    from lmforge.utils import pick_device

    int8 = getattr(args, "int8", False)
    device = pick_device(args.device, int8)
    dtype = _inference_dtype(args, device)
    model = (load_generator if seq2seq else load_decoder)(args.model, device, dtype)
    tokenizer = load_tokenizer_for(model, getattr(args, "tokenizer", None))
    if int8:
        from lmforge.infer.engine import quantize_int8

        source = model.source
        model = quantize_int8(model)
        model.source = source
    return model, tokenizer


def _inference_dtype(args, device):
    """The weights' precision for --dtype (int8 quantises fp32 weights), said in one line on stderr."""
    import torch

    from lmforge.model.checkpoint import weights_precision

    if getattr(args, "int8", False):
        if args.dtype not in ("auto", "float32"):
            raise LmforgeError("--int8 quantises float32 weights; leave out --dtype or pass --dtype float32")
        return torch.float32
    choice = weights_precision(args.model, device, args.dtype)
    if choice.news:
        print(f"precision: {choice.reason}", file=sys.stderr, flush=True)
    return choice.torch_dtype


def _sampling_from(args, model, **overrides):
    """The sampling flags given; for those not given, what the model's folder recommends (its
    generation_config.json; for beam search, which samples nothing, only what it applies), else the command's
    defaults."""
    from lmforge.infer.generate import SamplingParams
    from lmforge.infer.sampling import describe_sampling, recommended_for_beams, recommended_sampling

    own = {"temperature": args.own_temperature, "top_p": args.own_top_p, "top_k": 0, "min_p": 0.0,
           "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0}
    given = {name: getattr(args, name) for name in own if getattr(args, name) is not None}
    recommended = recommended_for_beams(model) if overrides.get("num_beams", 1) > 1 else recommended_sampling(model)
    taken = {k: v for k, v in recommended.items() if k not in given}
    if taken:
        folder = getattr(model, "base_source", None) or model.source
        print(f"sampling: {describe_sampling(taken)}, as {folder}/generation_config.json recommends (flags override)",
              file=sys.stderr, flush=True)
    values = dict(own, **recommended, **given, frequency_penalty=args.frequency_penalty,
                  presence_penalty=args.presence_penalty, seed=args.seed)
    values.update(overrides)
    params = SamplingParams(**values)
    params.validate()
    return params


def cmd_generate(args) -> None:
    from lmforge.infer.generate import SamplingParams, chat_prompt, generate, prompt_ids, stream_generate

    from lmforge.data.corpus import read_stdin_text

    prompt = args.prompt
    if prompt == "-":
        _refuse_terminal_stdin("the prompt")
        prompt = read_stdin_text()
        if not prompt:  # (a pipe that gave nothing: not the deliberate "" of a generation from nothing)
            raise LmforgeError("- read an empty prompt from standard input; pipe the prompt in, or pass \"\" to "
                               "generate from nothing")
    from lmforge.model.gpt import GPT

    model, tokenizer = _load_for_inference(args, seq2seq=True)
    seq2seq = not isinstance(model, GPT)  # the prompt is the encoder's source
    from lmforge.utils import stop_strings

    if "" in (args.stop or []):
        raise LmforgeError("--stop \"\" is empty: give the text to stop before (\\n for a newline)")
    text, stops = prompt, SamplingParams(stop=[s for given in args.stop or [] for s in stop_strings(given)])
    rendered = False
    if args.system and (tokenizer.chat_template is None or args.raw or seq2seq):  # (it would be dropped)
        raise LmforgeError("--system goes into the chat template, and this generation uses none (" + (
            "--raw" if args.raw else "the model has no chat template") + "): put the instruction in the prompt")
    if tokenizer.chat_template is not None and not args.raw and not seq2seq:
        # A chat model: the prompt is the user's message, answered through the model's template.
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        text, stops = chat_prompt(tokenizer, messages, stops, model)
        rendered = True
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:  # the folder's setting, else up to 128, never more than the context leaves
        from lmforge.infer.sampling import recommended_length

        room = model.config.block_size - (0 if seq2seq else max(len(prompt_ids(model, tokenizer, text, rendered)), 1))
        max_new_tokens = max(1, min(recommended_length(model) or 128, room))
    params = _sampling_from(args, model, max_new_tokens=max_new_tokens, stop=stops.stop, stop_token_ids=stops.stop_token_ids,
                            truncate=args.truncate, n=args.n, num_beams=args.num_beams, length_penalty=args.length_penalty,
                            early_stopping={"false": False, "true": True}.get(args.early_stopping, args.early_stopping))
    from lmforge.model.gpt import use_fast_kernels

    # (rows a step; silent: a mistake in the request must stay the one line said)
    use_fast_kernels(model, max(params.n, params.num_beams))
    if args.echo:
        sys.stdout.write(prompt)
    if params.num_beams > 1 or params.n > 1:
        # (the prompt as given: generate renders the template itself, or reads plain text as plain text)
        results = generate(model, prompt, tokenizer, chat=rendered, system=args.system, **vars(params))
        for i, g in enumerate(results if isinstance(results, list) else [results]):
            kind = "beam" if params.num_beams > 1 else "sample"
            sys.stdout.write((f"--- {kind} {i + 1} ---\n" if params.n > 1 else "") + g.text + "\n")
        return
    # The engine checks the prompt against the context (and truncates it, warning once, with --truncate).
    for piece in stream_generate(model, tokenizer, text, params, rendered=rendered):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args) -> None:
    from lmforge.infer.chat import chat_session

    retriever = _retriever(args)
    model, tokenizer = _load_for_inference(args)
    context = model.config.block_size
    from lmforge.infer.sampling import recommended_length

    default = min(recommended_length(model) or 256, context // 2)  # (the folder's setting, else up to 256)
    params = _sampling_from(args, model, max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None
                            else default)
    if params.max_new_tokens >= context:  # (said now, not as "too long" at every message)
        raise LmforgeError(f"--max-new-tokens {params.max_new_tokens} leaves no room for a message in the model's "
                           f"context of {context} tokens; pass fewer (default: {default})")
    if args.system:  # the system prompt stays in every turn: one that leaves no room is said now, too
        from lmforge.infer.chat import fit_conversation

        try:
            fit_conversation(tokenizer, [{"role": "system", "content": args.system}, {"role": "user", "content": "hi"}],
                             params, context)
        except LmforgeError as e:
            if "too long" not in str(e):  # (another trouble with the template is said as it is)
                raise
            raise LmforgeError(f"--system leaves no room for a message and the answer ({params.max_new_tokens} "
                               f"tokens) in the model's context of {context} tokens; shorten it or lower "
                               f"--max-new-tokens") from None
    from lmforge.model.gpt import use_fast_kernels

    use_fast_kernels(model, 1)  # one answer at a time
    chat_session(model, tokenizer, params, args.system, retriever=retriever)


def _retriever(args):
    """The index that answers come from (--index), opened before the model loads: a wrong path fails at once."""
    from lmforge.infer.retrieval import Index, Retriever, Router
    from lmforge.utils import pick_device

    given = [f"--{name.replace('_', '-')}" for name in ("retrieve_k", "min_score", "retrieve_mode")
             if getattr(args, name, None) is not None]
    device = pick_device(args.device, getattr(args, "int8", False))  # (beside an --int8 model: the CPU)
    k = 3 if getattr(args, "retrieve_k", None) is None else args.retrieve_k
    min_score = 0.3 if getattr(args, "min_score", None) is None else args.min_score
    mode = getattr(args, "retrieve_mode", None) or "dense"
    if getattr(args, "route", None):
        if args.index:
            raise LmforgeError("give --index or --route, not both (a routes file names an index per intent)")
        return Router(args.route, min_score=min_score, mode=mode, k=k, device=device)
    if not getattr(args, "index", None):
        if given:  # (they would change nothing)
            raise LmforgeError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to answers from an "
                               f"index: add --index (or --route)")
        return None
    return Retriever(Index(args.index, device), k=k, min_score=min_score, mode=mode)


def _index_options(parser) -> None:
    parser.add_argument("--index", default=None, help="answer from this index (`lmforge index`): each turn retrieves "
                        "passages, and the answer lists its sources")
    parser.add_argument("--retrieve-k", type=int, default=None, help="passages put before each question (default 3)")
    parser.add_argument("--min-score", type=float, default=None, help="below this cosine similarity of the closest "
                        "passage, the answer is \"I don't know\" (default 0.3)")
    parser.add_argument("--retrieve-mode", choices=["dense", "bm25", "hybrid"], default=None,
                        help="how passages are ranked (see `lmforge search --mode`; default dense)")
    parser.add_argument("--route", default=None, metavar="ROUTES.yaml",
                        help="intent routing: a classifier picks, for each turn, the index that answers it or a fixed "
                             "answer (see README)")


def cmd_finetune(args, extra: list[str]) -> None:
    from lmforge.train.config import FinetuneConfig, parse_overrides
    from lmforge.train.finetune import finetune

    summary = finetune(args.config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                       **parse_overrides(extra, FinetuneConfig))
    if summary["checkpoint"] and not summary.get("already_done"):
        print(f"done: {summary['steps']} steps; latest checkpoint {summary['checkpoint']}")


def cmd_reward(args, extra: list[str]) -> None:
    from lmforge.train.config import RewardConfig, parse_overrides
    from lmforge.train.preference import train_reward

    summary = train_reward(args.config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                           **parse_overrides(extra, RewardConfig))
    if summary["checkpoint"] and not summary.get("already_done"):
        print(f"done: {summary['steps']} steps; latest checkpoint {summary['checkpoint']}")


def cmd_dpo(args, extra: list[str]) -> None:
    from lmforge.train.config import DPOConfig, parse_overrides
    from lmforge.train.preference import dpo

    summary = dpo(args.config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                  **parse_overrides(extra, DPOConfig))
    if summary["checkpoint"] and not summary.get("already_done"):
        print(f"done: {summary['steps']} steps; latest checkpoint {summary['checkpoint']}")


def cmd_rl(args, extra: list[str]) -> None:
    from lmforge.train.config import RLConfig, parse_overrides
    from lmforge.train.rl import rl

    summary = rl(args.config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                 **parse_overrides(extra, RLConfig))
    if summary["checkpoint"] and not summary.get("already_done"):
        print(f"done: {summary['steps']} steps; latest checkpoint {summary['checkpoint']}")


def cmd_reward_score(args) -> None:
    import json

    from lmforge.data.examples import _raw_rows
    from lmforge.train.preference import reward_scores, scoring_problem
    from lmforge.utils import pick_device

    if args.batch_size < 1:
        raise LmforgeError("--batch-size must be at least 1")
    if bool(args.input) == (args.prompt is not None or args.answer is not None):
        raise LmforgeError("give either --prompt and --answer, or --input FILE of {\"prompt\", \"answer\"} rows")
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise LmforgeError(f"--input {path} " + ("is a folder; give the JSONL file in it" if path.is_dir()
                                                     else "does not exist"))
        rows, lines = [], []
        for number, row in _raw_rows(path):  # (every row checked before the model loads)
            problem = row if isinstance(row, str) else scoring_problem(row)
            if problem:
                raise LmforgeError(f"{path} row {number}: {problem}" if path.suffix.lower() == ".parquet"
                                   else f"{path}:{number}: {problem}")
            rows.append(row)
            lines.append(number)
        if not rows:
            raise LmforgeError(f"--input {path} holds no rows to score")
    else:
        if args.prompt is None or args.answer is None:
            raise LmforgeError("--prompt and --answer go together")
        rows, lines = [{"prompt": args.prompt, "answer": args.answer}], None
    scores = reward_scores(args.model, rows, batch_size=args.batch_size, device=pick_device(args.device),
                           source=args.input or "", say_cut=True,
                           lines=lines if lines and Path(args.input).suffix.lower() != ".parquet" else None)
    for row, score in zip(rows, scores):
        print(json.dumps({**row, "reward": score}, ensure_ascii=False) if args.input else f"{score:.6f}")


def cmd_merge(args) -> None:
    from lmforge.model.checkpoint import (load_adapted, load_tokenizer_for,
                                          refuse_overwriting_sources, resolve_model_dir, save_model, stored_precision)
    from lmforge.utils import check_output_dir

    out = check_output_dir(args.out, args.overwrite, ("a model folder", "config.json"))
    adapter = resolve_model_dir(args.adapter)
    if not (adapter / "adapter_config.json").exists():
        raise LmforgeError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    refuse_overwriting_sources(out, adapter)
    model = load_adapted(adapter, merge=True, base=args.base, force=args.force)
    refuse_overwriting_sources(out, model.base_source)
    model.to(stored_precision(model.base_source))  # (as `convert` of the adapter writes it: in the base's precision)
    save_model(model, out, load_tokenizer_for(model))
    print(f"merged {adapter} into {model.base_source}; wrote {out}")


def cmd_classify(args) -> None:
    from lmforge.eval.fewshot import DEFAULT_TEMPLATE, classify
    from lmforge.model.checkpoint import language_model, load_model, load_tokenizer_for, model_kind
    from lmforge.model.gpt import GPT, use_fast_kernels
    from lmforge.utils import pick_device

    model = load_model(args.model, pick_device(args.device))
    if not isinstance(model, GPT):  # (it generates nothing either way: it scores each label's text)
        from lmforge.model.encoder import Encoder

        instead = ("to classify with an encoder, fine-tune a classification head on labelled examples: `lmforge "
                   f"finetune --model {model.source} --train EXAMPLES.jsonl` (rows {{\"text\", \"label\"}}), or embed "
                   f"the texts (`lmforge embed`)" if isinstance(model, Encoder)
                   else "an encoder-decoder is not supported here yet")
        raise LmforgeError(f"{model.source} is {model_kind(model)}: `lmforge classify` scores each label by a decoder "
                           f"language model's log-likelihood of it (gpt2, llama, qwen2, mistral); {instead}")
    model = language_model(model)
    use_fast_kernels(model, 8)  # (scored 8 rows at a time: the kernels measured fastest on this CPU; silent)
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    result = classify(model, load_tokenizer_for(model), args.data, labels, args.shots, args.selection, args.seed,
                      args.template or DEFAULT_TEMPLATE, args.description, args.demos, args.skip_bad_lines)
    print(f"{result['examples']} examples, {result['shots']}-shot: accuracy {result['accuracy']:.4f}, "
          f"macro-F1 {result['macro_f1']:.4f}, MCC {result['mcc']:.4f}")
    print(format_confusion(result["confusion"]))
    predicted = set(result["predictions"])
    if len(predicted) == 1:
        from lmforge.utils import warn

        warn(f"the model answered {next(iter(predicted))!r} for every example: the accuracy is that label's share "
             "of the data, not skill; try more --shots, --selection balanced or another --template")


def format_confusion(confusion: dict) -> str:
    """Rows: the true label; columns: the predicted one."""
    labels = list(confusion)
    corner = "true / predicted"
    width = max(8, *(len(str(label)) + 2 for label in labels))
    first = max(len(corner), *(len(str(label)) for label in labels)) + 2
    lines = [f"{corner:<{first}}" + "".join(f"{str(p):>{width}}" for p in labels)]
    for t in labels:
        lines.append(f"{str(t):<{first}}" + "".join(f"{confusion[t][p]:>{width}}" for p in labels))
    return "\n".join(lines)


def cmd_embed(args) -> None:
    import json

    from lmforge.model.checkpoint import load_model, load_tokenizer_for
    from lmforge.model.encoder import Encoder, declared_max_length, embed, sentence_recipe
    from lmforge.utils import pick_device, warn

    from lmforge.data.corpus import read_stdin_text

    if "-" in args.texts and len(args.texts) > 1:
        raise LmforgeError("- reads the texts from stdin: give it alone, or give the texts themselves")
    if args.texts == ["-"]:
        _refuse_terminal_stdin("the texts")
    given = read_stdin_text().splitlines() if args.texts == ["-"] else args.texts
    texts = [t for t in given if t.strip()]
    if not texts:
        raise LmforgeError("no text to embed; pass one or more texts, or - to read one per line from stdin")
    if len(texts) < len(given):  # (the rows of the output are the texts kept, in order)
        warn(f"skipped {len(given) - len(texts)} blank text(s): the output has a row for each of the other "
             f"{len(texts)}")
    if args.max_length is not None and args.max_length < 2:
        raise LmforgeError(f"--max-length {args.max_length} leaves no room for text; give 2 or more")
    model = load_model(args.model, pick_device(args.device))
    if not isinstance(model, Encoder):
        from lmforge.model.checkpoint import model_kind

        raise LmforgeError(f"{model.source} is {model_kind(model)}; `lmforge embed` needs an encoder (bert) model folder")
    tokenizer = load_tokenizer_for(model)
    max_length = args.max_length or declared_max_length(model.source)
    reads = min(max_length or model.config.block_size, model.config.block_size)
    prompt = sentence_recipe(model.source).prompt  # (the folder's default prompt goes before each text)
    long = sum(len(tokenizer.encode(prompt + t, add_special_tokens=True)) > reads for t in texts)
    if long:
        warn(f"{long} text(s) longer than the {reads} tokens the encoder reads: each embedding is of its start only")
    vectors = embed(model, tokenizer, texts, max_length=max_length, normalize=not args.no_normalize)
    fmt = args.format or ("matrix" if len(texts) > 1 else "json")
    if fmt == "json":
        print(json.dumps([{"text": t, "embedding": [round(x, 7) for x in v.tolist()]} for t, v in zip(texts, vectors)]))
        return
    import torch.nn.functional as F

    unit = F.normalize(vectors, dim=1)
    sims = unit @ unit.T
    print("      " + "".join(f"{f'[{j}]':>9}" for j in range(len(texts))))
    for i, text in enumerate(texts):
        row = "".join(f"{sims[i, j].item():9.4f}" for j in range(len(texts)))
        print(f"{f'[{i}]':<6}{row}   {text if len(text) <= 60 else text[:57] + '...'}")


def cmd_index(args) -> None:
    from lmforge.infer.retrieval import build_index

    result = build_index(args.docs, args.model, args.out, passage_tokens=args.passage_tokens, overlap=args.overlap,
                         ann=args.ann, progress=not args.quiet, dtype=args.dtype, device=args.device)
    print(f"indexed {result['passages']:,} passages of {result['files']} file(s) into {result['out']} "
          f"({result['embedded']:,} embedded, {result['reused']:,} unchanged)")
    print(f"precision: {result['precision']}")


def cmd_search(args) -> None:
    import json

    from lmforge.data.corpus import read_stdin_text
    from lmforge.infer.retrieval import Index

    if args.query == "-":
        _refuse_terminal_stdin("the question")
    query = read_stdin_text() if args.query == "-" else args.query
    from lmforge.utils import pick_device

    hits = Index(args.index, pick_device(args.device), exact=args.exact).search(query, args.k, args.mode)
    if not hits:
        print("no passage matches")
    for hit in hits:
        if args.json:
            print(json.dumps({"rank": hit.rank, "score": hit.score, **hit.passage.to_dict(), **hit.scores},
                             ensure_ascii=False))
            continue
        text = " ".join(hit.passage.text.split())
        print(f"{hit.rank}. [{hit.score:.4f}] {hit.passage.source}\n   {text if len(text) <= 300 else text[:297] + '...'}")


def cmd_convert(args) -> None:
    from lmforge.model.checkpoint import convert

    out = convert(args.src, args.out, args.dtype, args.max_shard_size, args.overwrite, force=args.force)
    print(f"wrote {out}")


def cmd_plan(args) -> None:
    from lmforge.train.plan import format_plan, plan

    if args.measured:
        from lmforge.train.plan import compare_measured

        given = [f"--{name.replace('_', '-')}" for name, default in (
            ("model", None), ("gpus", 8), ("gpu", "h100"), ("tokens", None), ("mfu", 0.4), ("seq_len", None),
            ("micro_batch", 1), ("price", None)) if getattr(args, name) != default]
        if given:  # (they would change nothing: the run's own model and layout are compared)
            raise LmforgeError(f"--measured compares the run's own model and layout with the plan: drop "
                               f"{', '.join(given)} (or plan without --measured)")
        print(compare_measured(args.measured))
        return
    if not args.model:
        raise LmforgeError("plan needs --model (a preset or a model folder), or --measured RUN")
    print(format_plan(plan(args.model, args.gpus, args.gpu, args.tokens, args.mfu, args.seq_len, args.micro_batch, args.price)))


def cmd_serve(args) -> None:
    from lmforge.model.checkpoint import parse_size
    from lmforge.serve.server import ServerSettings, serve

    settings = ServerSettings(max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
                              max_n=args.max_n, max_body_bytes=parse_size(args.max_body), api_key=args.api_key,
                              model_name=args.name or "lmforge", allow_any_model=args.allow_any_model)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        from lmforge.utils import warn

        warn(f"listening on {args.host}: other machines can reach this server" + ("" if settings.api_key or
             __import__("os").environ.get("LMFORGE_API_KEY") else "; consider --api-key"))
    if args.int8 and args.dtype not in ("auto", "float32"):
        raise LmforgeError("--int8 quantises float32 weights; leave out --dtype or pass --dtype float32")
    serve(args.model, args.host, args.port, settings, args.int8, args.device, args.compile, args.dtype,
          args.embedding_model, _retriever(args))


def cmd_eval(args) -> None:
    from lmforge.eval.evaluate import evaluate, format_results
    from lmforge.eval.tasks import resolve_tasks, text_task

    models = args.model or []
    tasks = resolve_tasks([t for t in (args.tasks or "").split(",") if t], args.limit, args.seed, args.shots)
    if args.text:
        tasks.append(text_task(args.text))
    out = args.out
    if out is None and models and (Path(models[0]) / "metrics.jsonl").exists():
        out = str(Path(models[0]) / "eval.json")  # a training run keeps its evaluation (`lmforge report` shows it)
    if out is not None:  # (said before the models run, not when their results cannot be written)
        from lmforge.utils import file_above

        blocking = file_above(Path(out))
        if blocking is not None:
            raise LmforgeError(f"--out {out} lies under {blocking}, which is a file; give a .json file path in a "
                               f"folder")
    results = evaluate(models, tasks, args.data, args.split, args.batch_size, args.stride, args.max_tokens,
                       progress=not args.quiet, out=out, dtype=args.dtype, device=args.device)
    print(format_results(results))
    if results.get("kept_from_earlier"):
        print(f"kept the earlier results in {out} for: {', '.join(results['kept_from_earlier'])}")
    if results.get("replaced"):
        print(f"replaced the earlier results in {out}, which were of {results['replaced']}")
    if out:
        print(f"wrote {out}")


def cmd_baseline(args, extra: list[str]) -> None:
    from lmforge.eval.baselines import train_lstm, train_ngram

    if args.kind == "ngram":
        lstm_only = [f"--{name.replace('_', '-')}" for name in ("n_embd", "hidden", "n_layer", "config")
                     if getattr(args, name) is not None] + (["--resume"] if args.resume else [])
        if extra or lstm_only:
            raise LmforgeError(f"the n-gram baseline takes --order and --discount, not {' '.join(extra + lstm_only)}")
        info = train_ngram(args.data, args.out, 3 if args.order is None else args.order,
                           0.75 if args.discount is None else args.discount, args.overwrite)
        print(f"counted {info['train_tokens']:,} tokens: " + ", ".join(f"{n:,} {k}-grams" for k, n in info["ngrams"].items()))
        print(f"wrote {args.out}")
        return
    from lmforge.train.config import parse_overrides

    ngram_only = [flag for flag, value in (("--order", args.order), ("--discount", args.discount)) if value is not None]
    if ngram_only:
        raise LmforgeError(f"{' and '.join(ngram_only)} set the n-gram baseline; the LSTM takes --n-embd, --hidden, "
                           f"--n-layer and training settings")
    overrides = parse_overrides(extra)
    shape = {k: v for k, v in (("n_embd", args.n_embd), ("hidden", args.hidden), ("n_layer", args.n_layer)) if v is not None}
    if any(v < 1 for v in shape.values()):
        raise LmforgeError("--n-embd, --hidden and --n-layer must be at least 1")
    summary = train_lstm(args.data, args.out, progress=not args.quiet, config=args.config, overwrite=args.overwrite,
                         resume=args.resume, **shape, **overrides)
    if not summary.get("already_done"):
        print(f"done: {summary['steps']} steps; latest checkpoint {summary['checkpoint']}")


def cmd_lm_eval(args, extra: list[str]) -> None:
    try:
        import lmforge.eval.harness  # noqa: F401  (registers the "lmforge" model)
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise LmforgeError("lm-evaluation-harness is not installed; pip install 'lmforge[harness]' (or lm-eval)") from None
    _check_lm_eval_arguments(extra)
    argv, sys.argv = sys.argv, ["lm_eval", *extra]  # (the harness reads its own command line)
    try:
        cli_evaluate()
    except ValueError as e:
        import traceback

        # The harness refuses what it was given (a task it does not know, none at all) with a ValueError of its own:
        # that is the input's mistake, said in one line. One raised in lmforge's code is a bug, and stays a traceback.
        frames = traceback.extract_tb(e.__traceback__)
        if not frames or "lm_eval" not in Path(frames[-1].filename).parts:
            raise
        from lmforge.utils import first_line

        hint = ("; `lmforge lm-eval ls tasks` lists the harness's tasks, and --include_path FOLDER adds your own "
                "task YAML files" if "task" in str(e).lower() else "")
        raise LmforgeError(f"lm-eval: {first_line(e).rstrip('.')}{hint}") from e
    finally:
        sys.argv = argv


def _check_lm_eval_arguments(extra: list[str]) -> None:
    """An --include_path that is not there, said first: the harness passes over it, and then knows none of its tasks
    (or runs a task of its own of the same name)."""
    for i, token in enumerate(extra):
        flag, eq, value = token.partition("=")
        if flag not in ("--include_path", "--include-path"):
            continue
        path = value if eq else (extra[i + 1] if i + 1 < len(extra) and not extra[i + 1].startswith("-") else "")
        if not path:
            raise LmforgeError("--include_path needs the folder of your task YAML files")
        if not Path(path).exists():
            raise LmforgeError(f"--include_path {path} does not exist; give the folder of your task YAML files")


def cmd_report(args) -> None:
    from lmforge.eval.report import write_report

    print(f"wrote {write_report(args.run)}")


def _config_keys_help(finetune=False) -> str:
    """``finetune``: False (pretrain), True (finetune), or the config class of another training command."""
    from lmforge.train.config import FinetuneConfig, TrainConfig, config_keys

    cls = finetune if isinstance(finetune, type) else (FinetuneConfig if finetune else TrainConfig)
    lines = ["config keys (default): meaning"]
    for f in config_keys(cls):
        lines.append(f"  --{f.name.replace('_', '-'):<22} ({f.default!r}) {f.metadata.get('help', '')}")
    return "\n".join(lines)


def dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="precision of the weights; auto: the checkpoint's own, unless it is measured slow here")


def sampling_options(p: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    # (None: not given; then what the model's generation_config.json recommends, else the default said here)
    p.set_defaults(own_temperature=temperature, own_top_p=top_p)
    recommends = "; unless the model's generation_config.json recommends another"
    p.add_argument("--temperature", type=float, help=f"0 means greedy (default: {temperature}{recommends})")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (default: 0, off)")
    p.add_argument("--top-p", type=float, help=f"nucleus sampling (default: {top_p})")
    p.add_argument("--min-p", type=float, help="drop tokens below this fraction of the top probability (default: 0)")
    p.add_argument("--repetition-penalty", type=float, help="(default: 1, off)")
    p.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this many tokens (default: 0, off)")
    p.add_argument("--min-new-tokens", type=int, help="hold the end token back until this many are written (default: 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def _run_arguments(parser) -> None:
    """The flags every training command has besides its config keys."""
    parser.add_argument("--config", help="YAML file of config keys")
    parser.add_argument("--resume", nargs="?", const=True, choices=("auto",),
                        help="continue from the run folder's latest checkpoint; --resume auto: continue if it has "
                             "one, else start (for torchrun --max-restarts)")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run folder and start over")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="Train, fine-tune, run and evaluate language models.")
    p.add_argument("--version", action="version", version=f"lmforge {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def inputs(sp):
        sp.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="files or folders of .txt .md .py .jsonl .parquet, or - for stdin "
                             "(default: this Python's standard library)")
        sp.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text (default: text)")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tt = tok_sub.add_parser("train", help="train a tokenizer.json on a corpus")
    inputs(tt)
    tt.add_argument("--out", default="tokenizer", help="folder to write tokenizer.json into (default: tokenizer)")
    tt.add_argument("--vocab-size", type=int, default=8192,
                    help="tokens in the vocabulary, the 4 reserved special tokens included (default: 8192)")
    tt.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    tt.add_argument("--min-chars", type=int, default=64,
                    help="leave out documents shorter than this, as prepare does (default: 64; 0 keeps every one)")
    tt.add_argument("--overwrite", action="store_true", help="replace the tokenizer in a non-empty --out folder")
    tt.add_argument("--encoder", action="store_true",
                    help="also reserve [CLS], [SEP] and [MASK] for an encoder (pretrain --objective mlm)")
    tt.add_argument("--sentinels", type=int, default=0,
                    help="add T5's <extra_id_0> ... <extra_id_N-1> at the end (pretrain --objective span; T5 has 100)")
    tt.set_defaults(func=cmd_tokenizer_train)

    pr = sub.add_parser("prepare", help="clean, split and tokenize a corpus into shards")
    inputs(pr)
    pr.add_argument("--tokenizer", required=True, help="tokenizer.json, or a folder holding one")
    pr.add_argument("--out", default="data", help="output folder (default: data)")
    pr.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default: 0.05)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    pr.add_argument("--min-chars", type=int, default=64, help="drop documents shorter than this (default: 64)")
    pr.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count; 0: none)")
    pr.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    pr.set_defaults(func=cmd_prepare)

    pt = sub.add_parser(
        "pretrain", help="train a model from scratch (or continue one)", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Any config key can be given as --key value (for example --max-steps 200 --lr 3e-4);\n"
                    "these override --config.",
        epilog=_config_keys_help(),
    )
    _run_arguments(pt)
    pt.set_defaults(func=cmd_pretrain)

    ge = sub.add_parser("generate", help="continue a prompt with a model")
    ge.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    ge.add_argument("--model", required=True, help="a model folder, or a run folder (its latest checkpoint)")
    ge.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the model folder's)")
    ge.add_argument("--max-new-tokens", type=int, default=None,
                    help="default: 128, or what the context leaves after the prompt")
    sampling_options(ge, temperature=1.0, top_p=1.0)
    ge.add_argument("--stop", action="append", metavar="TEXT",
                    help="stop before this text (repeatable; \\n, \\t: a newline, a tab; \\\\: a backslash)")
    ge.add_argument("-n", "--n", type=int, default=1, help="number of samples")
    ge.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    ge.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / length ** this")
    ge.add_argument("--early-stopping", choices=["false", "true", "never"], default="false",
                    help="beam search: true ends once num-beams beams have ended; false (default) and never go on "
                         "while a running beam can still win (transformers' early_stopping)")
    ge.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    ge.add_argument("--truncate", action="store_true", help="keep the end of a prompt that does not fit the context")
    ge.add_argument("--raw", action="store_true", help="do not apply the model's chat template to the prompt")
    ge.add_argument("--system", help="system prompt (chat models)")
    ge.add_argument("--device", default="auto")
    dtype_option(ge)
    ge.add_argument("--int8", action="store_true", help="int8 weights for CPU inference (PyTorch dynamic quantisation)")
    ge.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="talk with a model in the terminal, through its chat template")
    ch.add_argument("--model", required=True, help="a model folder, an adapter folder or a run folder")
    ch.add_argument("--system", help="system prompt")
    ch.add_argument("--max-new-tokens", type=int, default=None, help="default: 256, or half the model's context if smaller")
    sampling_options(ch, temperature=0.7, top_p=0.95)
    ch.add_argument("--device", default="auto")
    dtype_option(ch)
    ch.add_argument("--int8", action="store_true", help="int8 weights for CPU inference (PyTorch dynamic quantisation)")
    _index_options(ch)
    ch.set_defaults(func=cmd_chat)

    ft = sub.add_parser(
        "finetune", help="adapt a model to examples: SFT, classification, QA; full, linear probe or LoRA",
        allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Any config key can be given as --key value (for example --method lora --lora-r 16);\n"
                    "these override --config. The task comes from the examples' fields.",
        epilog=_config_keys_help(finetune=True),
    )
    _run_arguments(ft)
    ft.set_defaults(func=cmd_finetune)

    from lmforge.train.config import DPOConfig, RewardConfig, RLConfig

    pairs = ('from JSONL/CSV/Parquet rows {"prompt", "chosen", "rejected"} (strings or message lists; '
             'optional "margin")')
    for name, cls, func, what, source in (
        ("reward", RewardConfig, cmd_reward, "train a reward model on preference pairs (Bradley-Terry)", pairs),
        ("dpo", DPOConfig, cmd_dpo, "align a causal LM with preference pairs: DPO, IPO or conservative DPO", pairs),
        ("rl", RLConfig, cmd_rl, "improve a causal LM against a reward: PPO, GRPO, RLOO or REINFORCE",
         'from JSONL/CSV/Parquet prompts {"prompt", other fields for the reward}'),
    ):
        sp = sub.add_parser(
            name, help=what, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
            description=f"{what[0].upper()}{what[1:]}, {source}.\n"
                        "Any config key can be given as --key value; these override --config.",
            epilog=_config_keys_help(cls),
        )
        _run_arguments(sp)
        sp.set_defaults(func=func)

    rs = sub.add_parser("reward-score", help="score (prompt, answer) pairs with a reward model")
    rs.add_argument("--model", required=True, help="a reward model folder, adapter folder or `lmforge reward` run")
    rs.add_argument("--prompt", help="the prompt (with --answer)")
    rs.add_argument("--answer", help="the answer to score (with --prompt)")
    rs.add_argument("--input", help='JSONL/CSV/Parquet rows {"prompt", "answer"}; prints each row with its "reward"')
    rs.add_argument("--batch-size", type=int, default=16)
    rs.add_argument("--device", default="auto")
    rs.set_defaults(func=cmd_reward_score)

    mg = sub.add_parser("merge", help="fold a LoRA adapter into its base model and save the result")
    mg.add_argument("adapter", help="an adapter folder (adapter_config.json) or a LoRA run folder")
    mg.add_argument("--out", required=True, help="the folder to write the merged model to")
    mg.add_argument("--base", help="the base model folder (default: the one the adapter records); its weights must "
                    "be the ones the adapter was trained on")
    mg.add_argument("--force", action="store_true", help="merge even into weights other than the adapter's base")
    mg.add_argument("--overwrite", action="store_true")
    mg.set_defaults(func=cmd_merge)

    cl = sub.add_parser("classify", help="few-shot classification by label log-likelihood (no training)")
    cl.add_argument("data", help="JSONL/CSV/Parquet of {\"text\", \"label\"} examples to classify")
    cl.add_argument("--model", required=True)
    cl.add_argument("--labels", required=True, help="comma-separated label names, e.g. positive,negative")
    cl.add_argument("--shots", type=int, default=0, help="demonstrations in each prompt (0: zero-shot)")
    cl.add_argument("--selection", default="random", choices=["random", "first", "balanced"])
    cl.add_argument("--demos", help="file to draw demonstrations from (default: the other examples of DATA)")
    cl.add_argument("--template", default=None, help="one example's template, with {text} and {label} (label last)")
    cl.add_argument("--description", default="", help="a task description put first in every prompt")
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--skip-bad-lines", action="store_true", help="skip malformed examples (counted and said) "
                    "instead of stopping")
    cl.add_argument("--device", default="auto")
    cl.set_defaults(func=cmd_classify)

    em = sub.add_parser("embed", help="sentence embeddings from an encoder (BERT) model")
    em.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed, or - to read one per line from stdin")
    em.add_argument("--model", required=True, help="an encoder model folder (e.g. sentence-transformers all-MiniLM-L6-v2)")
    em.add_argument("--format", choices=["json", "matrix"], default=None,
                    help="json: the vectors; matrix: cosine similarities (default for two or more texts)")
    em.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    em.add_argument("--no-normalize", action="store_true", help="mean-pooled vectors without L2 normalisation")
    em.add_argument("--device", default="auto")
    em.set_defaults(func=cmd_embed)

    ix = sub.add_parser("index", help="index documents for search and retrieval-augmented chat")
    ix.add_argument("docs", nargs="+", metavar="DOCS", help=".txt, .md or .jsonl files (FAQ rows {\"question\", \"answer\"} "
                    "or {\"text\"}), or folders of them")
    ix.add_argument("--model", required=True, help="the encoder that embeds passages (e.g. all-MiniLM-L6-v2)")
    ix.add_argument("--out", required=True, help="the index folder (an existing index is updated: only changed files "
                    "are embedded again)")
    ix.add_argument("--passage-tokens", type=int, default=200, help="encoder tokens per passage (default 200)")
    ix.add_argument("--overlap", type=int, default=40, help="tokens shared by neighbouring passages (default 40)")
    ix.add_argument("--ann", action="store_true", help="also build an approximate (HNSW) index for large collections "
                    "(needs FAISS: pip install 'lmforge[ann]')")
    ix.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="precision of the encoder's matrix products: auto (default) takes bf16 autocast where this "
                    "machine runs it measurably faster (vectors within 1e-4 cosine of fp32's); queries are embedded in fp32")
    ix.add_argument("--device", default="auto", help="where the encoder runs: auto (CUDA when present), cpu, cuda "
                    "or cuda:N")
    ix.add_argument("--quiet", action="store_true", help="no progress bar")
    ix.set_defaults(func=cmd_index)

    se = sub.add_parser("search", help="the passages of an index that best answer a question")
    se.add_argument("index", help="an index folder written by `lmforge index`")
    se.add_argument("query", help="the question, or - to read it from stdin")
    se.add_argument("-k", type=int, default=5, help="passages to show (default 5)")
    se.add_argument("--mode", choices=["dense", "bm25", "hybrid"], default="dense",
                    help="dense (default): by meaning (the encoder); bm25: by words (product codes, error numbers); "
                         "hybrid: both, fused by reciprocal rank")
    se.add_argument("--exact", action="store_true", help="search every vector even when the index has an --ann graph")
    se.add_argument("--json", action="store_true", help="one JSON object per passage")
    se.add_argument("--device", default="auto", help="where the query is embedded: auto (CUDA when present), cpu, "
                    "cuda or cuda:N")
    se.set_defaults(func=cmd_search)

    cv = sub.add_parser("convert", help="read a model folder and write it as a Hugging Face folder")
    cv.add_argument("src", help="a model folder (gpt2, llama, qwen2, mistral, bert; safetensors or .bin), a run folder, "
                    "or a LoRA adapter folder (merged into its base)")
    cv.add_argument("out", help="the folder to write")
    cv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights (default: keep)")
    cv.add_argument("--max-shard-size", default="5GB", help="largest safetensors file before sharding (default: 5GB)")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    cv.add_argument("--force", action="store_true", help="an adapter: merge it even into weights other than its base")
    cv.set_defaults(func=cmd_convert)

    pl = sub.add_parser("plan", help="compute, time, cost and per-GPU memory of a pretraining run")
    pl.add_argument("--model", help="a preset (e.g. llama-7b) or a model folder")
    pl.add_argument("--measured", metavar="RUN", help="instead: the plan's memory per process for a run folder's "
                                                      "model and layout, beside what the run measured")
    pl.add_argument("--gpus", type=int, default=8)
    pl.add_argument("--gpu", default="h100", help="h100, h200, a100-80gb or a100-40gb")
    pl.add_argument("--tokens", type=float, default=None, help="training tokens (default: 20 per parameter)")
    pl.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed (default: 0.4)")
    pl.add_argument("--seq-len", type=int, default=None, help="sequence length (default: context, at most 4096)")
    pl.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward pass")
    pl.add_argument("--price", type=float, default=None, help="USD per GPU-hour (default: the table's assumption)")
    pl.set_defaults(func=cmd_plan)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a chat page")
    sv.add_argument("--model", required=True, help="a model folder, an adapter folder or a run folder (an encoder "
                    "folder serves POST /v1/embeddings only)")
    sv.add_argument("--embedding-model", default=None, metavar="ENCODER",
                    help="also answer POST /v1/embeddings with this encoder (e.g. all-MiniLM-L6-v2)")
    _index_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0: any free port)")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or set LMFORGE_API_KEY)")
    sv.add_argument("--name", default=None, help="the model id clients see (default: the folder's name); requests "
                    "naming another model get 404 model_not_found")
    sv.add_argument("--allow-any-model", action="store_true", help="answer requests whatever model they name")
    sv.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    sv.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    sv.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    sv.add_argument("--max-n", type=int, default=8, help="largest n a request may ask for")
    sv.add_argument("--max-body", default="1MB", help="largest request body (default: 1MB)")
    sv.add_argument("--int8", action="store_true", help="int8 weights for CPU inference")
    sv.add_argument("--compile", action="store_true", help="torch.compile the decode step (static shapes)")
    sv.add_argument("--device", default="auto")
    dtype_option(sv)
    sv.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="perplexity and task scores; baselines beside the Transformer",
                        epilog="example: lmforge eval --model runs/demo/train --model runs/demo/ngram "
                        "--data runs/demo/data --tasks examples/tasks/python_syntax.yaml,brackets --shots 3")
    ev.add_argument("--model", action="append", help="a model, run or baseline folder (repeat to compare on --data)")
    ev.add_argument("--tasks", help="comma-separated built-in task names (arithmetic, copy, reverse, brackets) or YAML files")
    ev.add_argument("--text", help="a text file to compute perplexity and bits per byte on")
    ev.add_argument("--data", help="a prepared-data folder: compare the models' perplexity on its --split")
    ev.add_argument("--split", default="val", help="with --data: the split to score (default val)")
    ev.add_argument("--stride", type=int, default=None, help="perplexity: a window of the context length every STRIDE tokens (default: half the context)")
    ev.add_argument("--max-tokens", type=int, default=None, help="with --data: score at most this many tokens")
    ev.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    ev.add_argument("--shots", type=int, default=None, help="demonstrations per prompt (overrides the task files)")
    ev.add_argument("--seed", type=int, default=None,
                    help="draws the demonstrations and the built-in tasks' data (default 0, or a task file's seed)")
    ev.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    ev.add_argument("--out", help="save the results as JSON here (default for a run folder: RUN/eval.json)")
    dtype_option(ev)
    ev.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval)

    bl = sub.add_parser("baseline", help="train an n-gram (Kneser-Ney) or LSTM language model on prepared data",
                        allow_abbrev=False, epilog="The LSTM trains with pretrain's loop: it takes the same --config "
                        "YAML and --key value training settings (--max-steps, --lr, --micro-batch-size, ...).")
    bl.add_argument("--kind", choices=["ngram", "lstm"], required=True)
    bl.add_argument("--data", required=True, help="a prepared-data folder (its train split)")
    bl.add_argument("--out", required=True)
    bl.add_argument("--order", type=int, default=None, help="n-gram order (default 3)")
    bl.add_argument("--discount", type=float, default=None, help="Kneser-Ney discount (default 0.75)")
    bl.add_argument("--n-embd", type=int, default=None, help="LSTM embedding width (default 256)")
    bl.add_argument("--hidden", type=int, default=None, help="LSTM hidden width (default 512)")
    bl.add_argument("--n-layer", type=int, default=None, help="LSTM layers (default 2)")
    bl.add_argument("--config", help="LSTM: a training YAML (e.g. the Transformer's: same tokens, same schedule)")
    bl.add_argument("--overwrite", action="store_true", help="delete an existing output folder and start over")
    bl.add_argument("--resume", action="store_true", help="LSTM: continue the run in --out from its latest checkpoint")
    bl.add_argument("--quiet", action="store_true")
    bl.set_defaults(func=cmd_baseline)

    le = sub.add_parser("lm-eval", help="run lm-evaluation-harness with lmforge's model registered as 'lmforge'",
                        add_help=False)
    le.set_defaults(func=cmd_lm_eval)

    rp = sub.add_parser("report", help="write report.md and plots for a training run")
    rp.add_argument("run", help="the run folder")
    rp.set_defaults(func=cmd_report)
    return p


def _clean_text_arguments(args) -> None:
    """Arguments whose bytes were not UTF-8 get U+FFFD and a warning, as text read from files does."""
    from lmforge.data.corpus import text_from_os

    for name, value in vars(args).items():
        option = name if name in ("prompt", "texts", "inputs") else f"--{name.replace('_', '-')}"
        if isinstance(value, str):
            setattr(args, name, text_from_os(value, option))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            setattr(args, name, [text_from_os(v, option) for v in value])


class _ReaderMayLeave:
    """stdout for a training command: when the reader of a pipe goes away (``lmforge pretrain ... | head``), the
    run goes on writing its progress nowhere, rather than stopping before its next checkpoint."""

    def __init__(self, stream):
        self.stream = stream

    def _guarded(self, method, *args):
        try:
            return getattr(self.stream, method)(*args)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())  # (and so for the interpreter's own flush at exit)
            os.close(devnull)
            return len(args[0]) if args else None

    def write(self, text: str):
        return self._guarded("write", text)

    def flush(self):
        return self._guarded("flush")

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _out_of_memory(error: BaseException) -> str | None:
    """The one line for an allocation that failed (a model, batch or cache larger than the memory here; its size
    comes from the input, so it is the input's to change), or None for another error."""
    import re

    text = str(error)
    if isinstance(error, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower():
        asked = re.search(r"tried to allocate (\d+) bytes", text, re.IGNORECASE)
        size = f" ({int(asked.group(1)) / 1e9:,.1f} GB asked for)" if asked else ""
        gpu = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
        size = f" ({gpu.group(1)} asked for)" if gpu and not size else size
        return (f"out of memory{size}: ask for less (a smaller model, --micro-batch-size, --batch-size, -n or "
                f"--max-new-tokens) or run where there is more memory")
    return None


def _say_error(message: str) -> None:
    """The one error line. Under torchrun the processes of a machine often meet the same mistake (a path, a
    setting) at once: the first to say it says it for all of them (a marker file per launch and message);
    a message of one process alone ("process 1: ...") is said by it."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        import hashlib
        import tempfile

        try:  # (the launcher's start time too: its process id alone may come again in a later launch)
            launch = f"{os.getppid()} {Path(f'/proc/{os.getppid()}/stat').read_text().split()[21]}"
        except (OSError, IndexError):
            launch = f"{os.getppid()} {os.environ.get('TORCHELASTIC_RUN_ID')} {os.environ.get('MASTER_PORT')}"
        key = hashlib.sha256(f"{launch} {message}".encode()).hexdigest()[:32]
        try:
            os.close(os.open(Path(tempfile.gettempdir()) / f"lmforge-said-{key}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another process of this launch said it
        except OSError:
            pass  # (no marker possible: say it)
    print(f"lmforge: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _clean_text_arguments(args)
    takes_keys = (cmd_pretrain, cmd_finetune, cmd_reward, cmd_dpo, cmd_rl, cmd_baseline, cmd_lm_eval)
    if extra and args.func not in takes_keys:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    trains = (cmd_pretrain, cmd_finetune, cmd_reward, cmd_dpo, cmd_rl, cmd_baseline)
    stdout = sys.stdout
    try:
        if args.func in trains and args.resume is True and args.overwrite:  # ("--resume auto" may empty a dead run)
            raise LmforgeError("--resume continues the run in --out and --overwrite deletes it to start over; give "
                               "one of them")
        if args.func in trains:  # a run outlives a reader of its output that goes away (`| head`)
            sys.stdout = _ReaderMayLeave(stdout)
        if args.func in takes_keys:
            args.func(args, extra)
        else:
            args.func(args)
    except LmforgeError as e:
        if debug:
            raise
        _say_error(str(e))
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0  # the reader (say, `| head`) has gone
    except (MemoryError, RuntimeError) as e:
        if debug or not _out_of_memory(e):
            raise
        _say_error(_out_of_memory(e))
        return 2
    except OSError as e:
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        # (a path through a file, "afile/sub": say which part is in the way)
        hint = "; a part of this path is a file, not a folder" if isinstance(e, NotADirectoryError) else ""
        _say_error(f"{e.strerror or e}{where}{hint}")
        return 2
    finally:
        sys.stdout = stdout
    return 0
