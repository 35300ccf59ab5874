"""Fine-tuning data formats and chat templates."""

import json

import pytest

from lmforge.data.examples import read_examples
from lmforge.errors import LmforgeError
from lmforge.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row,task", [
    (CHAT, "chat"), ({"prompt": "p", "completion": "c"}, "instruction"), ({"text": "t", "label": 1}, "classification"),
    ({"text": "t", "text_pair": "u", "label": "yes"}, "classification"),
    ({"question": "Who?", "context": "It was Ann.", "answers": {"text": ["Ann"], "answer_start": [7]}}, "qa"),
])
def test_formats_are_detected_from_the_fields(tmp_path, row, task):
    assert read_examples(write_jsonl(tmp_path / "x.jsonl", [row, row])).task == task


def test_csv_and_parquet_with_nested_fields(tmp_path):
    import csv

    with open(tmp_path / "x.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "context", "answers"])
        w.writerow(["Who?", "It was Ann.", json.dumps({"text": ["Ann"], "answer_start": [7]})])
    assert read_examples(tmp_path / "x.csv").task == "qa"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "x.parquet")
    assert read_examples(tmp_path / "x.parquet").rows[1] == {"text": "b", "label": 1}


def test_a_file_a_windows_editor_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert read_examples(tmp_path / "bom.jsonl").rows == rows
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,label\na,0\n")
    assert read_examples(tmp_path / "bom.csv").rows == [{"text": "a", "label": 0}]  # (the first column is "text")


def test_malformed_lines_name_the_line_and_the_format_or_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "ok", "label": "a"}, "{not json", {"text": "ok", "label": True},
                                              {"text": "fine", "label": "b"}])
    with pytest.raises(LmforgeError, match=r"x.jsonl:2: not valid JSON .*expected \{\"text\": \"...\", \"label\""):
        read_examples(path)
    examples = read_examples(path, skip_bad_lines=True)
    assert (len(examples.rows), examples.skipped, examples.skipped_lines) == (2, 2, [2, 3])
    bad_qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Who?", "context": "It was Ann.",
                                                  "answers": {"text": ["Ann"], "answer_start": [2]}}])
    with pytest.raises(LmforgeError, match="qa.jsonl:1: answer 'Ann' is not at character 2 of the context"):
        read_examples(bad_qa)
    no_assistant = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(LmforgeError, match="at least one assistant message"):
        read_examples(no_assistant)
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"input": "x", "output": "y"}])
    with pytest.raises(LmforgeError, match="fields 'input', 'output' match no format"):
        read_examples(unknown)


@pytest.mark.parametrize("row, problem", [
    ({"prompt": 5, "completion": "c"}, "'prompt' must be a string, not a number (5)"),
    ({"prompt": "p", "completion": None}, "'completion' must be a string, not null"),
    ({"text": 5}, "'text' must be a string, not a number (5)"),
    ({"text": ["a", "b"], "label": "x"}, "'text' must be a string, not a list"),
    ({"text": "t", "label": 1.5}, "'label' must be a string or an integer, not a number (1.5)"),
    ({"source": {"a": 1}, "target": "t"}, "'source' must be a string, not an object"),
    ({"messages": "hi"}, "'messages' must be a non-empty list of messages, not a string"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 4}]},
     "message 1's 'content' must be a string, not a number (4)"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "message 0 has role 'bot'; roles are system, user and assistant"),
    ({"messages": [7]}, "message 0 must be an object"),
    ({"instruction": 5, "output": "o"}, "'instruction' must be a string, not a number (5)"),
], ids=["prompt", "completion", "text-alone", "text-list", "label", "source", "messages", "content", "role", "message",
        "alpaca"])
def test_a_field_of_the_wrong_type_is_named_with_its_type(tmp_path, row, problem):
    """A value of the wrong type was said as the fields a row lacks ({"text": 5} was "'prompt' and 'completion' must
    be strings", fields the file never had) or as a format to follow, not as what it was."""
    path = write_jsonl(tmp_path / "e.jsonl", [row])
    with pytest.raises(LmforgeError) as e:
        read_examples(path)
    assert str(e.value).startswith(f"{path}:1: {problem}"), str(e.value)


def test_chat_template_matches_transformers_apply_chat_template(tokenizer_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.load(tokenizer_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    ids = hf.apply_chat_template(CHAT["messages"], tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.encode_chat(CHAT["messages"])[0] == ids
    assert tok.apply_chat_template(CHAT["messages"][:2], add_generation_prompt=True) == \
        hf.apply_chat_template(CHAT["messages"][:2], add_generation_prompt=True, tokenize=False)
    # A template stored in tokenizer_config.json (here a Llama-2-like one) is used the same way.
    custom = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
              "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": custom}))
    tok2 = Tokenizer.load(folder)
    hf2 = transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = [m for m in CHAT["messages"] if m["role"] != "system"]
    ids2 = hf2.apply_chat_template(messages, tokenize=True)
    assert tok2.encode_chat(messages)[0] == (ids2["input_ids"] if hasattr(ids2, "keys") else ids2)


def test_loss_mask_covers_assistant_tokens_and_their_end_of_turn_only(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    ids, mask = tok.encode_chat(CHAT["messages"])
    in_loss = [tok.decode([i]) for i, m in zip(ids, mask) if m]
    # token by token: the two assistant messages and the <|im_end|> that closes each, nothing else
    expected = tok.encode("Hello! How can I help?") + [tok.end_of_turn_id] + tok.encode("4") + [tok.end_of_turn_id]
    assert [i for i, m in zip(ids, mask) if m] == expected
    assert in_loss.count("<|im_end|>") == 2
    assert "assistant" not in "".join(in_loss) and "Hi there" not in "".join(in_loss)
    # everything around them is outside the loss
    text_outside = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert text_outside.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "2+2?" in text_outside
