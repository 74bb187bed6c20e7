"""How long the job's examples are, in tokens: what sets its training tokens and its steps.

In order of preference:
1. local data: each example's count from preflight (the model's own tokenizer when the model is a
   local folder with tokenizer.json, else ~4 characters per token);
2. a hub dataset of the ready configs: the statistics shipped in launcher/dataset_facts.json
   (made by benchmarks/make_dataset_facts.py), measured with each ready model's tokenizer as the
   runner formats and tokenizes the examples; used when the config formats the data as they were
   measured (same data.format, fields and prompt template);
3. another hub dataset, when online (neither HF_HUB_OFFLINE=1 nor QLORA_LAUNCH_OFFLINE=1, the
   convention of preflight's model check): a few hundred rows from the Hugging Face
   datasets-server's /rows API (QLORA_LAUNCH_DATASETS_SERVER overrides its address), formatted
   with the runner's formatter and counted as preflight counts local data; the sample's mean;
4. otherwise every example at data.max_length: an upper bound. A failed sample says why in a
   warning.

A LengthStats holds the count of examples at each length, so the mean of min(n, max_length) and
the share cut at max_length follow for any max_length."""

from __future__ import annotations

import bisect
import functools
import importlib.util
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.config import LaunchConfig, runner_module

FACTS_FILE = Path(__file__).with_name("dataset_facts.json")
DATASETS_SERVER = "https://datasets-server.huggingface.co"
DATASETS_SERVER_ENV = "QLORA_LAUNCH_DATASETS_SERVER"  # the datasets-server's base URL (tests: a loopback fake)
SAMPLE_ROWS = 300  # rows sampled from a hub dataset: three pages of 100, spread over the split
PAGE_ROWS = 100  # the most /rows returns at once
REQUEST_TIMEOUT_S = 5.0
SAMPLE_DEADLINE_S = 10.0  # no further page is asked for after this


# ---------------------------------------------------------------------------------------------
# length statistics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthStats:
    """Examples at each length in tokens: ((length, examples), ...), ascending by length."""

    counts: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, lengths: list[int]) -> "LengthStats":
        tally: dict[int, int] = {}
        for n in lengths:
            tally[n] = tally.get(n, 0) + 1
        return cls(tuple(sorted(tally.items())))

    @functools.cached_property
    def _prefix(self) -> tuple[list[int], list[int], list[int]]:
        """Lengths, and the running count and token sum up to and including each."""
        lengths, examples, tokens = [], [], []
        c = t = 0
        for length, count in self.counts:
            c += count
            t += length * count
            lengths.append(length)
            examples.append(c)
            tokens.append(t)
        return lengths, examples, tokens

    @property
    def examples(self) -> int:
        return self._prefix[1][-1] if self.counts else 0

    @property
    def mean(self) -> float:
        return self._prefix[2][-1] / self.examples

    def capped_tokens(self, max_length: int) -> int:
        """The sum of min(n, max_length): the tokens of all examples once cut at max_length."""
        lengths, examples, tokens = self._prefix
        i = bisect.bisect_right(lengths, max_length)  # counts[:i] fit whole
        whole_examples = examples[i - 1] if i else 0
        whole_tokens = tokens[i - 1] if i else 0
        return whole_tokens + (self.examples - whole_examples) * max_length

    def mean_capped(self, max_length: int) -> float:
        """The mean of min(n, max_length): tokens per example once cut at max_length."""
        return self.capped_tokens(max_length) / self.examples

    def mean_longest_of(self, max_length: int, batch: int) -> float:
        """E[the longest of `batch` examples drawn at random, cut at max_length]: the row length a
        padded micro batch pads to (the runner's formula, which it uses to choose packing)."""
        return runner_module().mean_longest_of([(min(n, max_length), c) for n, c in self.counts], batch)

    def largest_batch_tokens(self, max_length: int, batch: int) -> int:
        """The most tokens a padding-free micro batch of `batch` examples can hold: its `batch`
        longest examples, cut at max_length. A bound, not the expected largest: which batch gets
        the long tail depends on the shuffle, and an out-of-memory error hours into a paid run
        costs more than a card sized for the worst batch."""
        left, total = batch, 0
        for length, count in reversed(self.counts):
            take = min(count, left)
            total += take * min(length, max_length)
            left -= take
            if not left:
                break
        return total

    def share_cut(self, max_length: int) -> float:
        """The share of examples longer than max_length (cut by the runner)."""
        lengths, examples, _ = self._prefix
        i = bisect.bisect_right(lengths, max_length)
        return (self.examples - (examples[i - 1] if i else 0)) / self.examples


@dataclass(frozen=True)
class MeasuredLengths:
    model: str  # the model whose tokenizer counted them
    tokenizer: str  # which tokenizer file that was, in words
    stats: LengthStats


@dataclass(frozen=True)
class DatasetFacts:
    path: str
    subset: Optional[str]
    split: str
    examples: int  # in the split: what the planner multiplies by
    data: dict[str, Any]  # the data settings the lengths were measured with (format, fields, template)
    lengths: dict[str, MeasuredLengths]  # by model id; empty: none could be measured (why)
    why: Optional[str] = None

    def matches(self, data: Any) -> bool:
        """Whether the config's data section renders the examples as they were measured."""
        return all(getattr(data, key, None) == value for key, value in self.data.items())

    def for_model(self, model: str) -> Optional[tuple[MeasuredLengths, bool]]:
        """(the lengths counted with this model's tokenizer, True), else the longest of the others
        (a stand-in that does not understate the job), False; None without lengths."""
        if model in self.lengths:
            return self.lengths[model], True
        if not self.lengths:
            return None
        return max(self.lengths.values(), key=lambda m: m.stats.mean), False


@functools.lru_cache(maxsize=None)
def shipped_facts(path: Path = FACTS_FILE) -> tuple[DatasetFacts, ...]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    facts = []
    for entry in raw["datasets"]:
        lengths = {model: MeasuredLengths(model, m["tokenizer"], LengthStats(tuple((n, c) for n, c in m["counts"])))
                   for model, m in (entry.get("lengths") or {}).items()}
        facts.append(DatasetFacts(entry["path"], entry["subset"], entry["split"], entry["examples"], entry["data"],
                                  lengths, entry.get("why")))
    return tuple(facts)


def facts_for(path: str, subset: Optional[str], split: str) -> Optional[DatasetFacts]:
    for f in shipped_facts():
        if (f.path, f.subset, f.split) == (path, subset, split):
            return f
    return None


def hub_examples() -> dict[tuple[str, Optional[str], str], int]:
    """(id, subset, split) -> examples in that split, for every hub dataset in the shipped facts."""
    return {(f.path, f.subset, f.split): f.examples for f in shipped_facts()}


# ---------------------------------------------------------------------------------------------
# what the plan uses
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExampleLengths:
    stats: Optional[LengthStats]  # None: not known; every example is taken at max_length
    examples: Optional[int]  # examples in data.path (None: not known)
    source: str  # what the lengths come from, in words: JobNeed.lengths_source
    warning: Optional[str] = None  # why a better source failed


UPPER_BOUND = "max_length (upper bound)"


def example_lengths(config: LaunchConfig, example_tokens: Optional[list[int]] = None,
                    exact: Optional[bool] = None, sample: bool = True) -> ExampleLengths:
    """The job's example lengths. `example_tokens`: each local example's count (preflight's);
    `exact`: whether those were counted with the model's tokenizer (None: as preflight would
    have, a local model folder with tokenizer.json); `sample`: may ask the hub for rows when online."""
    data = config.job.data
    if example_tokens:
        exact = model_tokenizer_file(config) is not None if exact is None else exact
        return ExampleLengths(LengthStats.of(example_tokens), len(example_tokens),
                              f"local data ({'model tokenizer' if exact else '~4 chars/token'})")
    qr = runner_module()
    _, is_local = qr.resolve_local(data.path, config.base_dir)
    if is_local:
        return ExampleLengths(None, None, UPPER_BOUND)  # not counted (preflight did not read it)
    facts = facts_for(data.path, data.subset, data.hub_split)
    if facts is not None and facts.matches(data):
        found = facts.for_model(config.job.model.base)
        if found is not None:
            measured, own = found
            short = measured.model.rsplit("/", 1)[-1]
            tokenizer = f"{short} tokenizer" if own else f"{short} tokenizer standing in"
            part = ("" if measured.stats.examples >= facts.examples
                    else f"; {measured.stats.examples:,} of {facts.examples:,} examples measured")
            return ExampleLengths(measured.stats, facts.examples,
                                  f"shipped statistics of {data.path} ({tokenizer}{part})")
        if facts.why:  # the file says why it has no lengths: keep the bound, ask no one
            return ExampleLengths(None, facts.examples, UPPER_BOUND)
    examples = facts.examples if facts is not None else None
    if not sample or offline():
        return ExampleLengths(None, examples, UPPER_BOUND)
    try:
        records, total = sample_rows(data.path, data.subset, data.hub_split)
        formatted = qr.format_records(records, data, None, "data.path")
    except (SampleError, qr.RunnerError) as e:
        return ExampleLengths(None, examples, UPPER_BOUND,
                              f"{data.path}: could not sample its lengths from the hub ({e}); taking every "
                              f"example at data.max_length={data.max_length}, an upper bound")
    from launcher import preflight  # its counting rule, the one for local data

    tokenizer = hub_model_tokenizer(config)
    counts = preflight._token_counts(formatted, tokenizer)
    how = "model tokenizer" if tokenizer is not None else "~4 chars/token"
    return ExampleLengths(LengthStats.of(counts), examples or total, f"{len(counts)} hub rows sampled ({how})")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("QLORA_LAUNCH_OFFLINE") == "1"


def model_tokenizer_file(config: LaunchConfig) -> Optional[Path]:
    """The local model folder's tokenizer.json when `tokenizers` can read it: preflight's rule
    for counting with the model's own tokenizer."""
    qr = runner_module()
    path, is_local = qr.resolve_local(config.job.model.base, config.base_dir)
    if not is_local or importlib.util.find_spec("tokenizers") is None:
        return None
    file = Path(path) / "tokenizer.json"
    return file if file.is_file() else None


def hub_model_tokenizer(config: LaunchConfig) -> Any:
    """The model's own tokenizer, when here: a local model folder's (as preflight loads it), or a
    hub model's tokenizer.json in the Hugging Face cache; None otherwise."""
    from launcher import preflight

    tokenizer = preflight._local_tokenizer(config)
    if tokenizer is not None:
        return tokenizer
    base = config.job.model.base
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    snapshots = Path(hub) / f"models--{base.replace('/', '--')}" / "snapshots"
    files = sorted(snapshots.glob("*/tokenizer.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not files or importlib.util.find_spec("tokenizers") is None:
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(files[0]))
    except Exception:  # noqa: BLE001  (an unreadable cache entry only costs the exact count)
        return None


# ---------------------------------------------------------------------------------------------
# the datasets-server
# ---------------------------------------------------------------------------------------------


class SampleError(Exception):
    """The hub's rows could not be had; the message says why."""


_SAMPLES: dict[tuple, Any] = {}  # per process: one plan asks once per dataset


def sample_rows(path: str, subset: Optional[str], split: str, rows: int = SAMPLE_ROWS) -> tuple[list[dict], int]:
    """(about `rows` rows of the split, spread over it in pages of 100, the split's size), from the
    datasets-server. Raises SampleError."""
    base = os.environ.get(DATASETS_SERVER_ENV, DATASETS_SERVER).rstrip("/")
    key = (base, path, subset, split, rows)
    if key not in _SAMPLES:
        try:
            _SAMPLES[key] = _sample(base, path, subset, split, rows)
        except SampleError as e:
            _SAMPLES[key] = e
    result = _SAMPLES[key]
    if isinstance(result, SampleError):
        raise result
    return result


def _sample(base: str, path: str, subset: Optional[str], split: str, rows: int) -> tuple[list[dict], int]:
    deadline = time.monotonic() + SAMPLE_DEADLINE_S
    token = os.environ.get("HF_TOKEN") if base == DATASETS_SERVER else None  # never to another server
    config = subset
    if config is None:
        answer = _get(base, "splits", {"dataset": path}, token)
        configs = [s.get("config") for s in answer.get("splits", []) if s.get("split") == split]
        if not configs:
            raise SampleError(f"the datasets-server lists no split {split!r}")
        config = configs[0]
    pages = max(1, -(-rows // PAGE_ROWS))
    first = _get(base, "rows", {"dataset": path, "config": config, "split": split, "offset": 0,
                                "length": min(PAGE_ROWS, rows)}, token)
    total = first.get("num_rows_total")
    if not isinstance(total, int) or total <= 0:
        raise SampleError("the datasets-server gave no num_rows_total")
    found = list(first.get("rows", []))
    end = len(found)
    for page in range(1, pages):
        offset = max(end, page * total // pages)
        if offset >= total or time.monotonic() > deadline:
            break
        answer = _get(base, "rows", {"dataset": path, "config": config, "split": split, "offset": offset,
                                     "length": min(PAGE_ROWS, total - offset)}, token)
        found += answer.get("rows", [])
        end = offset + len(answer.get("rows", []))
    whole = [r["row"] for r in found if isinstance(r, dict) and isinstance(r.get("row"), dict)
             and not r.get("truncated_cells")]  # a truncated cell would understate the length
    if not whole:
        raise SampleError("the datasets-server returned no whole rows")
    return whole, total


def _get(base: str, endpoint: str, params: dict[str, Any], token: Optional[str]) -> dict[str, Any]:
    url = f"{base}/{endpoint}?{urllib.parse.urlencode(params)}"
    headers = {"User-Agent": "qlora-launch"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=REQUEST_TIMEOUT_S) as r:
            answer = json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        raise SampleError(f"the datasets-server answered HTTP {e.code} to /{endpoint}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise SampleError(f"the datasets-server could not be reached: {getattr(e, 'reason', e)}") from None
    except ValueError:
        raise SampleError(f"the datasets-server's /{endpoint} answer is not JSON") from None
    if not isinstance(answer, dict):
        raise SampleError(f"the datasets-server's /{endpoint} answer is not an object")
    return answer
