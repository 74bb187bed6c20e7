"""The plan's example lengths: the shipped statistics of the ready configs' hub datasets, a sample
of another hub dataset's rows (over a fake datasets-server on loopback), and the upper bound when
neither can be had."""

from __future__ import annotations

import json
import math
import random
import threading
import urllib.parse
from types import SimpleNamespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from launcher import config as launch_config
from launcher import dataset_lengths, estimate, offers
from launcher.dataset_lengths import LengthStats
from launcher.gpus import resolve
from tests.helpers import ROOT, TINY_MODEL

FACTS = json.loads((ROOT / "launcher" / "dataset_facts.json").read_text(encoding="utf-8"))
MISTRAL = ROOT / "configs" / "mistral-7b-qlora.yaml"


def facts_entry(path: str) -> dict:
    (entry,) = [e for e in FACTS["datasets"] if e["path"] == path]
    return entry


def expanded(counts: list[list[int]]) -> list[int]:
    return [n for n, c in counts for _ in range(c)]


def job_config(tmp_path, base=MISTRAL, **changes):
    """A ready config with some keys changed ("data.path": ...), written next to the test."""
    raw = yaml.safe_load(base.read_text(encoding="utf-8"))
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return launch_config.load(path)


@pytest.fixture(autouse=True)
def fresh_samples(monkeypatch):
    """No sample carried over between tests; online unless a test says otherwise, but pointed at
    a port nothing listens on, so no test can reach the real hub."""
    dataset_lengths._SAMPLES.clear()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("QLORA_LAUNCH_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv(dataset_lengths.DATASETS_SERVER_ENV, "http://127.0.0.1:9")
    yield
    dataset_lengths._SAMPLES.clear()


# ---------------------------------------------------------------------------------------------
# the shipped statistics
# ---------------------------------------------------------------------------------------------


def test_the_mistral_ready_config_plans_with_the_shipped_alpaca_lengths():
    entry = facts_entry("yahma/alpaca-cleaned")
    measured = entry["lengths"]["mistralai/Mistral-7B-v0.3"]
    lengths = expanded(measured["counts"])
    mean = sum(min(n, 1024) for n in lengths) / len(lengths)  # the file's own numbers, the config's max_length

    config = launch_config.load(MISTRAL)
    need = offers.job_need(config)
    assert need.lengths_source.startswith("shipped statistics of yahma/alpaca-cleaned (Mistral-7B-v0.3 tokenizer")
    assert need.as_json()["lengths_source"] == need.lengths_source and need.lengths_warning is None
    assert need.seq_tokens == pytest.approx(mean)
    assert need.tokens == int(entry["examples"] * 0.98 * 1 * mean) and not need.tokens_bound
    assert offers.HUB_DATASET_EXAMPLES[("yahma/alpaca-cleaned", None, "train")] == entry["examples"] == 51_760

    # The hours drop from the upper bound's (every example at 1024 tokens) as the model says.
    a10g = offers.Offer("aws", None, "A10G", 1, 24, 1.0, False)
    gpu = resolve("A10G")
    bound_tokens = int(entry["examples"] * 0.98 * 1024)
    bound_hours = estimate.estimate_hours(need.facts, gpu, 1, bound_tokens, 1024.0, 2, True)
    hours = offers.evaluate(a10g, need).est_hours
    assert need.padding_free  # (packing: auto; these lengths pay for it)
    assert hours == pytest.approx(estimate.estimate_hours(need.facts, gpu, 1, need.tokens, mean, 2, True, packed_rows=True))
    assert hours < bound_hours * 0.5


def test_gsm8k_is_counted_whole_with_the_deepseek_tokenizer():
    entry = facts_entry("openai/gsm8k")
    measured = entry["lengths"]["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"]
    assert measured["examples"] == entry["examples"] == 7_473  # every training problem
    lengths = expanded(measured["counts"])
    need = offers.job_need(launch_config.load(ROOT / "configs" / "deepseek-r1-distill-qwen-1.5b-qlora.yaml"))
    assert need.lengths_source == "shipped statistics of openai/gsm8k (DeepSeek-R1-Distill-Qwen-1.5B tokenizer)"
    # 2 epochs of the 0.9 train split; the sum of the examples' own lengths
    assert need.tokens == int(sum(min(n, 1024) for n in lengths) * 0.9 * 2)
    assert need.seq_tokens == pytest.approx(sum(lengths) / len(lengths))


def test_ultrachat_has_no_shipped_lengths_so_the_llama_plan_keeps_the_bound_and_asks_no_one(monkeypatch):
    entry = facts_entry("HuggingFaceH4/ultrachat_200k")
    assert entry["lengths"] is None and entry["why"] and entry["examples"] == 207_865
    server = FakeDatasetsServer(total=10)
    with server.running() as url:
        monkeypatch.setenv(dataset_lengths.DATASETS_SERVER_ENV, url)
        need = offers.job_need(launch_config.load(ROOT / "configs" / "llama-3.1-8b-qlora.yaml"))
    assert server.requests == []
    assert need.lengths_source == "max_length (upper bound)" and need.lengths_warning is None
    assert need.tokens_bound and need.tokens == 2000 * 16 * 1024 and need.seq_tokens == 1024


def test_every_shipped_statistic_agrees_with_its_counts():
    for entry in FACTS["datasets"]:
        for model, m in (entry["lengths"] or {}).items():
            lengths = sorted(expanded(m["counts"]))
            assert len(lengths) == m["examples"] <= entry["examples"], (entry["path"], model)
            assert sum(lengths) / len(lengths) == pytest.approx(m["mean"], abs=0.01)
            assert lengths[-1] == m["max"]
            assert lengths[math.ceil(0.5 * len(lengths)) - 1] == m["quantiles"]["p50"]
            assert m["tokenizer"] and entry["data"]["format"]
        assert entry["lengths"] or entry["why"]


@pytest.mark.parametrize("path", ["yahma/alpaca-cleaned", "openai/gsm8k"])
def test_the_stats_give_the_capped_mean_and_the_cut_share_at_any_max_length(path):
    for model, m in facts_entry(path)["lengths"].items():
        lengths = expanded(m["counts"])
        stats = LengthStats(tuple((n, c) for n, c in m["counts"]))
        assert stats.examples == len(lengths) and stats.mean == pytest.approx(sum(lengths) / len(lengths))
        previous = 0.0
        for cap in sorted((8, 64, 100, 127, 128, 129, 256, 512, 1000, 1024, 2048, m["max"] - 1, m["max"], 10**6)):
            brute = sum(min(n, cap) for n in lengths) / len(lengths)
            assert stats.mean_capped(cap) == pytest.approx(brute, rel=1e-12), (model, cap)
            assert stats.capped_tokens(cap) == sum(min(n, cap) for n in lengths)
            assert stats.share_cut(cap) == sum(n > cap for n in lengths) / len(lengths)
            assert stats.mean_capped(cap) >= previous  # more room never shortens the mean
            previous = stats.mean_capped(cap)
        assert stats.mean_capped(m["max"]) == pytest.approx(stats.mean) and stats.share_cut(m["max"]) == 0


def test_a_different_max_length_uses_the_same_statistics(tmp_path):
    entry = facts_entry("yahma/alpaca-cleaned")
    lengths = expanded(entry["lengths"]["mistralai/Mistral-7B-v0.3"]["counts"])
    for cap in (128, 256, 2048):
        need = offers.job_need(job_config(tmp_path, **{"data.max_length": cap}))
        assert need.seq_tokens == pytest.approx(sum(min(n, cap) for n in lengths) / len(lengths))
    mean = sum(min(n, 1024) for n in lengths) / len(lengths)
    packed = offers.job_need(job_config(tmp_path, **{"data.packing": True}))
    padded = offers.job_need(job_config(tmp_path, **{"data.packing": False}))
    for need in (packed, padded):  # the same examples, the same steps: only the rows differ
        assert need.seq_tokens == pytest.approx(mean)
        assert need.tokens == int(51_760 * 0.98 * mean)
    assert packed.padding_free and packed.padded_seq_tokens is None
    # a padded micro batch of 2 pads to its longer example: E[max of two draws], by brute force
    pairs = random.Random(0).choices(lengths, k=40_000)
    sampled = sum(max(min(a, 1024), min(b, 1024)) for a, b in zip(pairs[::2], pairs[1::2])) / 20_000
    assert padded.padded_seq_tokens == pytest.approx(sampled, rel=0.02) and padded.padded_seq_tokens > mean
    assert packed.vram_gb < padded.vram_gb  # its largest micro batch is smaller than 2 x 1024


def test_another_model_on_a_shipped_dataset_takes_the_longest_counts_as_a_stand_in(tmp_path):
    config = job_config(tmp_path, **{"model.base": str(TINY_MODEL)})
    need = offers.job_need(config)
    longest = max(facts_entry("yahma/alpaca-cleaned")["lengths"].items(), key=lambda kv: kv[1]["mean"])
    lengths = expanded(longest[1]["counts"])
    assert "standing in" in need.lengths_source and longest[0].rsplit("/", 1)[-1] in need.lengths_source
    assert need.seq_tokens == pytest.approx(sum(min(n, 1024) for n in lengths) / len(lengths))


def test_a_config_that_formats_the_data_otherwise_does_not_use_the_statistics(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LAUNCH_OFFLINE", "1")
    config = job_config(tmp_path, **{"data.prompt_template": "Q: {instruction}\n{input}\nA: "})
    need = offers.job_need(config)
    assert need.lengths_source == "max_length (upper bound)" and need.tokens_bound
    assert need.tokens == int(51_760 * 0.98 * 1024)  # the examples are still known


def test_local_counts_say_how_they_were_counted():
    config = launch_config.load(ROOT / "configs" / "tiny-cpu.yaml")  # a local model with tokenizer.json
    assert offers.job_need(config, [10, 20]).lengths_source == "local data (model tokenizer)"
    assert offers.job_need(config, [10, 20], exact_counts=False).lengths_source == "local data (~4 chars/token)"
    mistral = launch_config.load(MISTRAL)  # a hub model: preflight counted ~4 chars a token
    assert offers.job_need(mistral, [200] * 10).lengths_source == "local data (~4 chars/token)"


# ---------------------------------------------------------------------------------------------
# sampling a hub dataset's rows
# ---------------------------------------------------------------------------------------------


class FakeDatasetsServer:
    """The datasets-server's /splits and /rows, as they answer: rows in pages of at most 100,
    num_rows_total, truncated_cells. `fail`: an HTTP status to answer everything with, or
    "garbage" for a body that is not JSON."""

    def __init__(self, total: int, fail=None, truncated=frozenset(), rows=None):
        self.total = total
        self.fail = fail
        self.truncated = truncated
        self.make_row = rows or (lambda i: {"instruction": f"Say {'word ' * (i % 50)}", "input": "",
                                            "output": "ok " * (1 + i % 200)})
        self.requests: list[tuple[str, dict]] = []

    def running(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlparse(self.path)
                query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
                server.requests.append((url.path, query))
                if server.fail == "garbage":
                    return self.reply(200, b"<html>busy</html>")
                if server.fail:
                    return self.reply(server.fail, b'{"error": "no"}')
                if url.path == "/splits":
                    body = {"splits": [{"dataset": query["dataset"], "config": "default", "split": "train"}]}
                else:
                    offset, length = int(query["offset"]), min(100, int(query["length"]))
                    rows = [{"row_idx": i, "row": server.make_row(i),
                             "truncated_cells": ["output"] if i in server.truncated else []}
                            for i in range(offset, min(offset + length, server.total))]
                    body = {"features": [], "rows": rows, "num_rows_total": server.total,
                            "num_rows_per_page": 100, "partial": False}
                self.reply(200, json.dumps(body).encode())

            def reply(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Running:
            def __enter__(self_inner):
                self_inner.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
                threading.Thread(target=self_inner.httpd.serve_forever, daemon=True).start()
                return f"http://127.0.0.1:{self_inner.httpd.server_address[1]}/"

            def __exit__(self_inner, *exc):
                self_inner.httpd.shutdown()
                self_inner.httpd.server_close()

        return Running()


def expected_counts(rows: list[dict], config, tokenizer=None) -> list[int]:
    """What preflight would count for these rows: the runner's formatter, then its rule."""
    from launcher import preflight

    qr = launch_config.runner_module()
    return preflight._token_counts(qr.format_records(rows, config.job.data, None, "data.path"), tokenizer)


def test_a_hub_dataset_not_shipped_is_sampled_over_the_split(tmp_path, monkeypatch):
    server = FakeDatasetsServer(total=9_000, truncated={3})
    config = job_config(tmp_path, **{"data.path": "someone/instructions"})
    with server.running() as url:
        monkeypatch.setenv(dataset_lengths.DATASETS_SERVER_ENV, url)
        need = offers.job_need(config)
        again = offers.job_need(config)  # the same process asks once
    rows_asked = [q for path, q in server.requests if path == "/rows"]
    assert [p for p, _ in server.requests] == ["/splits", "/rows", "/rows", "/rows"]
    assert [int(q["offset"]) for q in rows_asked] == [0, 3_000, 6_000]  # spread over the split
    assert all(q["dataset"] == "someone/instructions" and q["config"] == "default" and q["split"] == "train"
               for q in rows_asked)
    sampled = [server.make_row(i) for start in (0, 3_000, 6_000) for i in range(start, start + 100) if i != 3]
    counts = expected_counts(sampled, config)
    mean = sum(min(n, 1024) for n in counts) / len(counts)
    assert need.lengths_source == "299 hub rows sampled (~4 chars/token)" and need.lengths_warning is None
    assert need.seq_tokens == pytest.approx(mean)
    assert need.tokens == int(9_000 * 0.98 * mean) and not need.tokens_bound  # the split's size, from the server
    assert again == need


def test_a_sample_is_counted_with_the_local_models_tokenizer(tmp_path, monkeypatch):
    server = FakeDatasetsServer(total=150)
    config = job_config(tmp_path, **{"data.path": "someone/instructions", "data.subset": "en",
                                     "model.base": str(TINY_MODEL)})
    with server.running() as url:
        monkeypatch.setenv(dataset_lengths.DATASETS_SERVER_ENV, url)
        need = offers.job_need(config)
    assert [p for p, _ in server.requests] == ["/rows", "/rows"]  # the subset names the config: no /splits
    assert server.requests[0][1]["config"] == "en" and int(server.requests[1][1]["offset"]) == 100
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TINY_MODEL / "tokenizer.json"))
    counts = expected_counts([server.make_row(i) for i in range(150)], config, tokenizer)
    assert need.lengths_source == "150 hub rows sampled (model tokenizer)"
    assert need.seq_tokens == pytest.approx(sum(min(n, 1024) for n in counts) / len(counts))


@pytest.mark.parametrize("fail, says", [(500, "HTTP 500"), (404, "HTTP 404"), ("garbage", "not JSON")])
def test_a_failed_sample_falls_back_to_the_bound_with_a_warning(tmp_path, monkeypatch, fail, says):
    server = FakeDatasetsServer(total=500, fail=fail)
    config = job_config(tmp_path, **{"data.path": "someone/instructions"})
    with server.running() as url:
        monkeypatch.setenv(dataset_lengths.DATASETS_SERVER_ENV, url)
        need = offers.job_need(config)
    assert server.requests  # it asked
    assert need.lengths_source == "max_length (upper bound)" and need.seq_tokens == 1024
    assert need.tokens is None and need.tokens_bound  # nothing says how many examples there are
    assert says in need.lengths_warning and "someone/instructions" in need.lengths_warning
    assert "upper bound" in need.lengths_warning and need.as_json()["lengths_warning"] == need.lengths_warning


def test_an_unreachable_server_and_rows_without_the_fields_fall_back_too(tmp_path, monkeypatch):
    config = job_config(tmp_path, **{"data.path": "someone/instructions", "train.max_steps": 10})
    need = offers.job_need(config)  # the fixture's port 9 on loopback: nothing listens
    assert "could not be reached" in need.lengths_warning
    assert need.tokens == 10 * 16 * 1024 and need.tokens_bound
    dataset_lengths._SAMPLES.clear()
    server = FakeDatasetsServer(total=50, rows=lambda i: {"question": "q", "answer": "a"})
    with server.running() as url:
        monkeypatch.setenv(dataset_lengths.DATASETS_SERVER_ENV, url)
        need = offers.job_need(config)
    assert "no field 'instruction'" in need.lengths_warning and need.lengths_source == "max_length (upper bound)"


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "QLORA_LAUNCH_OFFLINE"])
def test_offline_asks_no_one(tmp_path, monkeypatch, variable):
    server = FakeDatasetsServer(total=500)
    config = job_config(tmp_path, **{"data.path": "someone/instructions"})
    with server.running() as url:
        monkeypatch.setenv(dataset_lengths.DATASETS_SERVER_ENV, url)
        monkeypatch.setenv(variable, "1")
        need = offers.job_need(config)
        unsampled = offers.job_need(config, hub_sample=False)
    assert server.requests == []
    assert need.lengths_source == unsampled.lengths_source == "max_length (upper bound)"
    assert need.lengths_warning is None and need.tokens is None


def test_the_hub_token_goes_to_the_hub_only(tmp_path, monkeypatch):
    seen = []
    server = FakeDatasetsServer(total=10)
    config = job_config(tmp_path, **{"data.path": "someone/instructions"})
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    original = dataset_lengths._get

    def spy(base, endpoint, params, token):
        seen.append(token)
        return original(base, endpoint, params, token)

    monkeypatch.setattr(dataset_lengths, "_get", spy)
    with server.running() as url:
        monkeypatch.setenv(dataset_lengths.DATASETS_SERVER_ENV, url)
        offers.job_need(config)
    assert seen and all(token is None for token in seen)


def test_the_largest_padding_free_micro_batch_is_its_longest_examples():
    stats = dataset_lengths.LengthStats.of([5, 300, 40, 2000, 70, 300])
    assert stats.largest_batch_tokens(1024, 1) == 1024  # cut at max_length
    assert stats.largest_batch_tokens(1024, 3) == 1024 + 300 + 300
    assert stats.largest_batch_tokens(256, 3) == 3 * 256
    assert stats.largest_batch_tokens(1024, 10) == 5 + 300 + 40 + 1024 + 70 + 300  # fewer examples than the batch


def test_the_plan_packs_as_the_runner_will(tmp_path):
    """packing: auto decides by the same FLOPs rule on both sides; on the narrow tiny model 16 even
    examples are cheaper padded, 16 uneven ones packed. Without lengths: padded (nothing to save)."""
    qr = launch_config.runner_module()
    config = launch_config.load(ROOT / "configs" / "tiny-cpu.yaml")
    facts = estimate.model_facts(str(TINY_MODEL), TINY_MODEL)
    from transformers import AutoConfig  # the runner reads the model's own config (transformers: test side only)

    assert qr.ComputeShape.of(AutoConfig.from_pretrained(TINY_MODEL)) == qr.ComputeShape(
        facts.matmul_params, facts.num_layers, facts.q_dim)
    even, uneven = [60] * 300, [4] * 280 + [64] * 20
    for lengths in (even, uneven):
        need = offers.job_need(config, lengths, exact_counts=True)
        runner_choice, _ = qr.choose_padding_free("auto", _model_of(TINY_MODEL), False, lengths,
                                                  config.job.train.micro_batch_size)
        assert need.padding_free is runner_choice
    assert offers.job_need(config, uneven, exact_counts=True).padding_free
    assert not offers.job_need(config, even, exact_counts=True).padding_free


def _model_of(path):
    """A stand-in for the loaded model: the runner reads only its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = "sdpa"
    return SimpleNamespace(config=config)
