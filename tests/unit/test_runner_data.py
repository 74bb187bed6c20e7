"""Data layer of runner/qlora_runner.py: reading, splitting, formatting, tokenizing
(padding-free batches: tests/unit/test_runner_kernels.py).

Uses the real tiny tokenizer in configs/tiny/model (bos <s>, eos </s>, pad <pad>; it adds <s>
at the start and has no chat template)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.helpers import load_runner_module

ROOT = Path(__file__).resolve().parents[2]
RUNNER_PATH = ROOT / "runner" / "qlora_runner.py"
TOKENIZER_DIR = ROOT / "configs" / "tiny" / "model"
EXAMPLE_CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


runner = load_runner_module()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is a cat?"},
    {"role": "assistant", "content": "An animal."},
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert tokenizer.chat_template is None  # the fallback tests rely on it
    return tokenizer


@pytest.fixture(scope="module")
def chat_tok():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def data_section(**values) -> "runner.DataSection":
    values.setdefault("path", "data.jsonl")
    return runner.from_dict(runner.DataSection, values, "data")


def job(tmp_path: Path, **data_values) -> "runner.JobConfig":
    data_values.setdefault("path", "data.jsonl")
    return runner.from_dict(runner.JobConfig, {"model": {"base": "m"}, "data": data_values})


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize(records, tokenizer, max_length=256, **data_values):
    data = data_section(max_length=max_length, **data_values)
    examples = runner.format_records(records, data, tokenizer, "data.path")
    return runner.tokenize_split(examples, tokenizer, max_length)


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive trained positions, as token ids."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token, "a trained label is the token itself"
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def animals(n: int) -> list[dict]:
    return [{"instruction": f"Question number {i}?", "input": "", "output": f"Answer {i}."} for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Formats and labels
# ---------------------------------------------------------------------------------------------


def test_tokenizer_adds_bos(tok):
    assert runner.adds_bos(tok)
    assert (tok.bos_token_id, tok.eos_token_id) == (tok.convert_tokens_to_ids("<s>"), tok.convert_tokens_to_ids("</s>"))


def test_completion_trains_every_token(tok):
    text = "A dog has 4 legs. A cat lives in a house."
    out = tokenize([{"text": text}], tok, format="completion")
    (ids,), (labels,) = out.input_ids, out.labels
    assert ids == [tok.bos_token_id] + ids_of(tok, text) + [tok.eos_token_id]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert labels[0] == -100  # BOS: nothing predicts it
    assert labels[1:] == ids[1:]  # every text token and the EOS are trained
    assert labels[-1] == tok.eos_token_id
    assert out.trained_tokens == len(ids) - 1 and out.tokens == len(ids)
    assert (out.truncated, out.dropped) == (0, 0)


def test_completion_custom_text_field(tok):
    out = tokenize([{"body": "hello world"}], tok, format="completion", text_field="body")
    assert out.input_ids[0][1:-1] == ids_of(tok, "hello world")


def test_instruction_labels_only_the_answer(tok):
    record = {"instruction": "How many legs does a dog have?", "input": "", "output": "A dog has 4 legs."}
    out = tokenize([record], tok, format="instruction")
    (ids,), (labels,) = out.input_ids, out.labels
    prompt = "### Instruction:\nHow many legs does a dog have?\n\n### Response:\n"
    assert prompt == runner.DEFAULT_PROMPT_NO_INPUT.format(instruction=record["instruction"])
    prompt_ids = [tok.bos_token_id] + ids_of(tok, prompt)
    answer_ids = ids_of(tok, "A dog has 4 legs.") + [tok.eos_token_id]
    assert ids == prompt_ids + answer_ids
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert labels[len(prompt_ids) :] == answer_ids
    assert tok.decode(ids[: len(prompt_ids)]) == "<s>" + prompt
    assert tok.decode(labelled_runs(ids, labels)[0]) == "A dog has 4 legs.</s>"


def test_instruction_with_input_uses_the_input_template(tok):
    record = {"instruction": "Translate to French.", "input": "the cat", "output": "le chat"}
    out = tokenize([record], tok)
    (ids,), (labels,) = out.input_ids, out.labels
    prompt = "### Instruction:\nTranslate to French.\n\n### Input:\nthe cat\n\n### Response:\n"
    assert prompt == runner.DEFAULT_PROMPT_WITH_INPUT.format(instruction="Translate to French.", input="the cat")
    prompt_ids = [tok.bos_token_id] + ids_of(tok, prompt)
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert labels[len(prompt_ids) :] == ids_of(tok, "le chat") + [tok.eos_token_id]


def test_instruction_empty_input_uses_the_no_input_template(tok):
    examples = runner.format_records(
        [{"instruction": "Hi", "input": "", "output": "a"}, {"instruction": "Hi", "output": "b"}], data_section(), tok, "data.path"
    )
    for example in examples:
        assert example.segments[0].text == "### Instruction:\nHi\n\n### Response:\n"
        assert "### Input" not in example.segments[0].text


def test_instruction_custom_prompt_template_and_fields(tok):
    template = "Q: {instruction}\nContext: {input}\nA: "
    records = [{"q": "Where does the cat live?", "ctx": "pets", "a": "In a house."}, {"q": "Why?", "a": "Because."}]
    data = data_section(prompt_template=template, instruction_field="q", input_field="ctx", output_field="a")
    examples = runner.format_records(records, data, tok, "data.path")
    assert [s.text for s in examples[0].segments] == ["Q: Where does the cat live?\nContext: pets\nA: ", "In a house."]
    assert [s.text for s in examples[1].segments] == ["Q: Why?\nContext: \nA: ", "Because."]
    assert [s.trained for s in examples[0].segments] == [False, True]
    out = runner.tokenize_split(examples, tok, 256)
    prompt_ids = [tok.bos_token_id] + ids_of(tok, "Q: Where does the cat live?\nContext: pets\nA: ")
    assert out.input_ids[0][: len(prompt_ids)] == prompt_ids
    assert out.labels[0] == [-100] * len(prompt_ids) + ids_of(tok, "In a house.") + [tok.eos_token_id]


def test_instruction_text_with_literal_input_placeholder_is_kept(tok):
    # An instruction that itself contains "{input}" (common in code datasets: f-strings, format
    # strings) must reach the prompt unchanged; the placeholder belongs to the template only.
    record = {"instruction": "What does print(f'{input}') show?", "output": "The value of input."}
    (example,) = runner.format_records([record], data_section(), tok, "data.path")
    assert example.segments[0].text == "### Instruction:\nWhat does print(f'{input}') show?\n\n### Response:\n"


def test_chat_fallback_trains_every_assistant_turn(tok):
    segments = runner.render_chat(CONVERSATION, tok)
    assert [(s.text, s.trained, s.eos_after) for s in segments] == [
        ("### System:\nBe brief.\n\n### User:\nHi there\n\n### Assistant:\n", False, False),
        ("Hello.", True, True),
        ("\n\n### User:\nWhat is a cat?\n\n### Assistant:\n", False, False),
        ("An animal.", True, True),
    ]
    out = tokenize([{"messages": CONVERSATION}], tok, format="chat")
    (ids,), (labels,) = out.input_ids, out.labels
    runs = labelled_runs(ids, labels)
    assert [tok.decode(r) for r in runs] == ["Hello.</s>", "An animal.</s>"]
    untrained = tok.decode([t for t, l in zip(ids, labels) if l == -100])
    for text in ("Be brief.", "Hi there", "What is a cat?", "### User:", "### Assistant:"):
        assert text in untrained
    assert "Hello" not in untrained and "animal" not in untrained
    assert ids[0] == tok.bos_token_id and labels[0] == -100


def test_chat_fallback_three_assistant_turns_and_trailing_user(tok):
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "uno"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "dos"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "tres"},
        {"role": "user", "content": "never answered"},
    ]
    out = tokenize([{"conv": messages}], tok, format="chat", messages_field="conv")
    runs = labelled_runs(out.input_ids[0], out.labels[0])
    assert [tok.decode(r) for r in runs] == ["uno</s>", "dos</s>", "tres</s>"]
    assert "never answered" not in tok.decode(out.input_ids[0])  # nothing to learn after the last answer


def test_chat_messages_as_json_text(tok):
    # CSV cells hold the messages list as JSON text.
    out = tokenize([{"messages": json.dumps(CONVERSATION)}], tok, format="chat")
    assert [tok.decode(r) for r in labelled_runs(out.input_ids[0], out.labels[0])] == ["Hello.</s>", "An animal.</s>"]


def test_chat_with_tokenizer_template(chat_tok):
    segments = runner.render_chat(CONVERSATION, chat_tok)
    assert [(s.text, s.trained) for s in segments] == [
        ("<|system|>\nBe brief.</s><|user|>\nHi there</s><|assistant|>\n", False),
        ("Hello.</s>", True),
        ("<|user|>\nWhat is a cat?</s><|assistant|>\n", False),
        ("An animal.</s>", True),
    ]
    assert "".join(s.text for s in segments) == chat_tok.apply_chat_template(CONVERSATION, tokenize=False)
    out = tokenize([{"messages": CONVERSATION}], chat_tok, format="chat")
    (ids,), (labels,) = out.input_ids, out.labels
    runs = labelled_runs(ids, labels)
    assert [chat_tok.decode(r) for r in runs] == ["Hello.</s>", "An animal.</s>"]
    assert runs[0] == ids_of(chat_tok, "Hello.") + [chat_tok.eos_token_id]
    untrained = chat_tok.decode([t for t, l in zip(ids, labels) if l == -100])
    assert untrained == "<s><|system|>\nBe brief.</s><|user|>\nHi there</s><|assistant|>\n<|user|>\nWhat is a cat?</s><|assistant|>\n"
    # one </s> per message, all from the template: no EOS added on top
    assert ids.count(chat_tok.eos_token_id) == len(CONVERSATION)


def test_chat_without_assistant_message(tok):
    records = [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "hello?"}]}]
    with pytest.raises(runner.DataError) as excinfo:
        runner.format_records(records, data_section(format="chat"), tok, "data.path")
    assert excinfo.value.exit_code == 4
    assert "data.path: example 2 has no assistant message" in str(excinfo.value)


def test_chat_malformed_messages(tok):
    with pytest.raises(runner.DataError, match=r"example 1: messages must be a list of \{role, content\} objects"):
        runner.format_records([{"messages": [{"role": "user"}]}], data_section(format="chat"), tok, "data.path")


# ---------------------------------------------------------------------------------------------
# Length: truncation, dropping, packing
# ---------------------------------------------------------------------------------------------


def test_truncation_to_max_length(tok):
    text = " ".join(f"word{i}" for i in range(60))
    full = [tok.bos_token_id] + ids_of(tok, text) + [tok.eos_token_id]
    assert len(full) > 16
    out = tokenize([{"text": text}, {"text": "short"}], tok, max_length=16, format="completion")
    assert out.truncated == 1 and out.dropped == 0
    assert out.input_ids[0] == full[:16]
    assert out.labels[0] == [-100] + full[1:16]
    assert out.input_ids[1] == [tok.bos_token_id] + ids_of(tok, "short") + [tok.eos_token_id]
    assert all(len(ids) <= 16 for ids in out.input_ids)


def test_truncation_keeps_the_start_of_the_answer(tok):
    record = {"instruction": "Hi", "output": " ".join(["long answer"] * 30)}
    prompt_len = 1 + len(ids_of(tok, runner.DEFAULT_PROMPT_NO_INPUT.format(instruction="Hi")))
    out = tokenize([record], tok, max_length=prompt_len + 5)
    assert out.truncated == 1 and out.dropped == 0
    assert len(out.input_ids[0]) == prompt_len + 5
    assert out.labels[0][:prompt_len] == [-100] * prompt_len
    assert out.labels[0][prompt_len:] == ids_of(tok, record["output"])[:5]


def test_prompt_longer_than_max_length_is_dropped(tok):
    long = {"instruction": " ".join(["tell me about the animals"] * 20), "output": "No."}
    short = {"instruction": "Hi", "output": "ok"}
    out = tokenize([long, short, long], tok, max_length=40)
    assert out.dropped == 2 and out.truncated == 2
    assert len(out.input_ids) == len(out.labels) == len(out.examples) == 1
    assert out.examples[0].segments[0].text == "### Instruction:\nHi\n\n### Response:\n"
    assert out.input_ids[0][-1] == tok.eos_token_id


def test_prepare_data_every_prompt_too_long(tmp_path, tok):
    write_jsonl(tmp_path / "data.jsonl", [{"instruction": "a very long question " * 10, "output": "x"}] * 20)
    cfg = job(tmp_path, max_length=16, splits={"train": 0.8, "validation": 0.1, "test": 0.1})
    with pytest.raises(runner.DataError) as excinfo:
        runner.prepare_data(cfg, tmp_path, tok)
    assert excinfo.value.exit_code == 4
    message = str(excinfo.value)
    assert "data.max_length=16" in message and "raise data.max_length" in message


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------

RECORDS = [
    {"instruction": "What does a cow say?", "input": "", "output": "Moo."},
    {"instruction": "Name a bird.", "input": "small", "output": "A sparrow."},
    {"instruction": "How many legs has a spider?", "input": "", "output": "Eight."},
]


def read(path: Path, key: str = "data.path"):
    return runner.read_records(str(path), True, data_section(), key)


def test_read_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n   \n" + json.dumps(RECORDS[2]))
    assert read(path) == RECORDS


def test_read_json_list_and_data_key(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(RECORDS))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": RECORDS, "version": 1}))
    assert read(tmp_path / "list.json") == RECORDS
    assert read(tmp_path / "wrapped.json") == RECORDS


def test_read_json_not_a_list(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"rows": RECORDS}))
    with pytest.raises(runner.DataError, match="must hold a JSON list of examples"):
        read(tmp_path / "d.json")


def test_read_csv(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(RECORDS)
    assert read(path) == RECORDS


def test_read_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    assert read(path) == RECORDS


def test_read_folder_of_mixed_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", RECORDS[:1])
    (folder / "b.json").write_text(json.dumps(RECORDS[1:2]))
    pq.write_table(pa.Table.from_pylist(RECORDS[2:]), folder / "sub" / "c.parquet")
    (folder / "notes.txt").write_text("not data")  # ignored in a folder
    (folder / "README.md").write_text("# ignored")
    assert read(folder) == RECORDS  # files in sorted path order, recursively


def test_read_folder_with_uppercase_extension(tmp_path):
    # A single file is matched case-insensitively (data.JSONL reads fine); a folder holding the
    # same file must not claim it has no .jsonl files.
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "DATA.JSONL", RECORDS)
    assert read(folder / "DATA.JSONL") == RECORDS
    assert read(folder) == RECORDS


def test_read_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("hi")
    with pytest.raises(runner.DataError, match="has no .jsonl, .json, .csv, .parquet files"):
        read(tmp_path / "empty")


def test_prepare_data_reads_relative_to_config_dir(tmp_path, tok):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "d.jsonl", animals(10))
    prepared = runner.prepare_data(job(tmp_path, path="sub/d.jsonl"), tmp_path, tok)
    assert prepared.total_examples == 10


# ---------------------------------------------------------------------------------------------
# Data errors
# ---------------------------------------------------------------------------------------------


def data_error(fn, *args) -> str:
    with pytest.raises(runner.DataError) as excinfo:
        fn(*args)
    assert excinfo.value.exit_code == 4 == runner.EXIT_DATA
    return str(excinfo.value)


def test_missing_file(tmp_path, tok):
    message = data_error(runner.prepare_data, job(tmp_path, path="nope.jsonl"), tmp_path, tok)
    assert message.startswith("data.path: ")
    assert str(tmp_path / "nope.jsonl") in message and "does not exist" in message


def test_missing_validation_file(tmp_path, tok):
    write_jsonl(tmp_path / "data.jsonl", animals(10))
    message = data_error(runner.prepare_data, job(tmp_path, validation_path="val.jsonl"), tmp_path, tok)
    assert message.startswith("data.validation_path: ") and str(tmp_path / "val.jsonl") in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    message = data_error(read, path)
    assert message == f"data.path: {path} has no examples; add some, or point data.path at the right file"


def test_empty_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\n")
    assert "has no examples" in data_error(read, path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text(json.dumps(RECORDS[0]) + "\n")
    message = data_error(read, path)
    assert "data.path: cannot read d.txt: unknown file format '.txt'" in message


def test_invalid_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n{not json\n" + json.dumps(RECORDS[2]) + "\n")
    message = data_error(read, path)
    assert f"data.path: {path} line 3 is not valid JSON" in message


def test_invalid_json_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[{\"a\": 1},")
    assert f"data.path: cannot parse {path}" in data_error(read, path)


def test_record_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS[0], ["a", "list"]])
    assert f"{path} example 2 is list, expected an object" in data_error(read, path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    assert "is not UTF-8 text" in data_error(read, path)


def test_field_missing_names_field_and_setting(tok):
    records = [RECORDS[0], {"instruction": "Hi", "answer": "ho"}]
    message = data_error(runner.format_records, records, data_section(), tok, "data.path")
    assert "data.path: example 2 has no field 'output'" in message
    assert "present fields: instruction, answer" in message
    assert "set data.output_field" in message


def test_field_empty_counts_as_missing(tok):
    message = data_error(runner.format_records, [{"instruction": "", "output": "x"}], data_section(), tok, "data.path")
    assert "example 1 has no field 'instruction'" in message and "data.instruction_field" in message


def test_completion_field_missing(tok):
    message = data_error(runner.format_records, [{"body": "x"}], data_section(format="completion"), tok, "data.test_path")
    assert message.startswith("data.test_path: example 1 has no field 'text'") and "data.text_field" in message


def test_chat_field_missing(tok):
    message = data_error(runner.format_records, [{"conversation": []}], data_section(format="chat"), tok, "data.path")
    assert "has no field 'messages'" in message and "data.messages_field" in message


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def fractions(train, validation, test):
    return runner.SplitsSection(train=train, validation=validation, test=test)


def expected_sizes(n, splits):
    def size(fraction):
        return 0 if fraction <= 0 else max(1, round(n * fraction))

    n_test, n_val = size(splits.test), size(splits.validation)
    return n - n_val - n_test, n_val, n_test


def test_split_same_seed_same_split():
    records = animals(100)
    a = runner.split_records(records, fractions(0.8, 0.1, 0.1), 7, False, False)
    b = runner.split_records(list(records), fractions(0.8, 0.1, 0.1), 7, False, False)
    assert a == b


def test_split_different_seed_different_split():
    records = animals(100)
    a = runner.split_records(records, fractions(0.8, 0.1, 0.1), 1, False, False)
    b = runner.split_records(records, fractions(0.8, 0.1, 0.1), 2, False, False)
    assert a[2] != b[2] and a[1] != b[1]
    assert sorted(map(json.dumps, a[2] + a[1] + a[0])) == sorted(map(json.dumps, b[2] + b[1] + b[0]))


@pytest.mark.parametrize(
    "n, split, sizes",
    [
        (100, (0.8, 0.1, 0.1), (80, 10, 10)),
        (384, (0.8, 0.1, 0.1), (308, 38, 38)),
        (10, (0.5, 0.3, 0.2), (5, 3, 2)),
        (5, (0.9, 0.05, 0.05), (3, 1, 1)),  # a split asked for is never empty
        (50, (1.0, 0.0, 0.0), (50, 0, 0)),
        (50, (0.9, 0.0, 0.1), (45, 0, 5)),
    ],
)
def test_split_sizes_follow_fractions(n, split, sizes):
    records = animals(n)
    train, val, test = runner.split_records(records, fractions(*split), 42, False, False)
    assert (len(train), len(val), len(test)) == sizes == expected_sizes(n, fractions(*split))
    # a partition: every record exactly once
    assert sorted(r["instruction"] for r in train + val + test) == sorted(r["instruction"] for r in records)


def test_split_files_replace_their_fraction():
    records = animals(100)
    train, val, test = runner.split_records(records, fractions(0.8, 0.1, 0.1), 42, True, False)
    assert (len(train), len(val), len(test)) == (90, 0, 10)
    train, val, test = runner.split_records(records, fractions(0.8, 0.1, 0.1), 42, True, True)
    assert (len(train), len(val), len(test)) == (100, 0, 0)


def test_split_too_few_examples():
    message = data_error(runner.split_records, animals(2), fractions(0.8, 0.1, 0.1), 42, False, False)
    assert "data.path: 2 examples are too few for splits 0.8/0.1/0.1" in message


def test_prepare_data_with_split_files(tmp_path, tok):
    write_jsonl(tmp_path / "data.jsonl", animals(40))
    val = [{"instruction": f"Validation {i}?", "output": "v"} for i in range(3)]
    test = [{"instruction": f"Test {i}?", "output": "t"} for i in range(4)]
    write_jsonl(tmp_path / "val.jsonl", val)
    write_jsonl(tmp_path / "test.jsonl", test)
    cfg = job(tmp_path, validation_path="val.jsonl", test_path="test.jsonl", splits={"train": 0.8, "validation": 0.1, "test": 0.1})
    prepared = runner.prepare_data(cfg, tmp_path, tok)
    assert prepared.total_examples == 40
    assert len(prepared.train.input_ids) == 40  # both fractions replaced: train keeps everything
    assert [e.segments[0].text for e in prepared.validation.examples] == [
        runner.DEFAULT_PROMPT_NO_INPUT.format(instruction=r["instruction"]) for r in val
    ]
    assert [e.segments[0].text for e in prepared.test.examples] == [
        runner.DEFAULT_PROMPT_NO_INPUT.format(instruction=r["instruction"]) for r in test
    ]


def test_prepare_data_only_test_file(tmp_path, tok):
    write_jsonl(tmp_path / "data.jsonl", animals(40))
    write_jsonl(tmp_path / "test.jsonl", animals(3))
    cfg = job(tmp_path, test_path="test.jsonl", splits={"train": 0.8, "validation": 0.1, "test": 0.1})
    prepared = runner.prepare_data(cfg, tmp_path, tok)
    assert (len(prepared.train.input_ids), len(prepared.validation.input_ids), len(prepared.test.input_ids)) == (36, 4, 3)


def test_prepare_data_no_validation_or_test(tmp_path, tok):
    write_jsonl(tmp_path / "data.jsonl", animals(12))
    prepared = runner.prepare_data(job(tmp_path, splits={"train": 1.0, "validation": 0.0, "test": 0.0}), tmp_path, tok)
    assert prepared.validation is None and prepared.test is None
    assert len(prepared.train.input_ids) == 12


def test_prepare_data_split_seed_is_stable(tmp_path, tok):
    write_jsonl(tmp_path / "data.jsonl", animals(60))
    first = runner.prepare_data(job(tmp_path, split_seed=3), tmp_path, tok)
    again = runner.prepare_data(job(tmp_path, split_seed=3), tmp_path, tok)
    other = runner.prepare_data(job(tmp_path, split_seed=4), tmp_path, tok)
    assert first.test.input_ids == again.test.input_ids and first.train.input_ids == again.train.input_ids
    assert first.test.input_ids != other.test.input_ids


def test_prepare_data_example_config(tok):
    cfg = runner.load_config(EXAMPLE_CONFIG)
    data_file = (EXAMPLE_CONFIG.parent / cfg.data.path).resolve()
    n = sum(1 for line in data_file.read_text().splitlines() if line.strip())
    prepared = runner.prepare_data(cfg, EXAMPLE_CONFIG.parent, tok)
    assert prepared.total_examples == n
    sizes = expected_sizes(n, cfg.data.splits)
    for split in (prepared.train, prepared.validation, prepared.test):
        assert split.dropped == 0 and split.truncated == 0
    assert (len(prepared.train.input_ids), len(prepared.validation.input_ids), len(prepared.test.input_ids)) == sizes
    assert all(len(ids) <= cfg.data.max_length for ids in prepared.train.input_ids)
    # instruction format: every example has trained answer tokens ending in EOS
    for ids, labels in zip(prepared.train.input_ids, prepared.train.labels):
        assert ids[0] == tok.bos_token_id and labels[0] == -100
        assert ids[-1] == labels[-1] == tok.eos_token_id
    # the held-out splits share no prompt with train
    train_prompts = {e.segments[0].text for e in prepared.train.examples}
    assert not train_prompts & {e.segments[0].text for e in prepared.test.examples}
