"""`launch plan`'s table as a person reads it: one line per kind of offer with its count, every
header whole and every row one line at 80 columns, more at 200, --rows counted exactly, the
choice and the offers `launch` cannot rent marked. Plans come from the shipped catalogs, offline."""

from __future__ import annotations

import re
import types
from collections import Counter
from functools import lru_cache

import pytest
from rich.console import Console

from launcher import config as launch_config
from launcher import estimate, offers, plan_table
from launcher.gpus import resolve
from launcher.providers.base import Offer
from tests.helpers import ROOT

WIDTHS = [80, 100, 140, 200]
HEADERS_80 = ["provider", "GPU", "$/h", "hours", "total $", "note"]
HEADERS_200 = ["provider", "region", "instance", "GPU", "VRAM", "$/h", "market", "est. hours", "est. total $",
               "more", "note"]


def only_vast(o: Offer) -> bool:
    return o.provider == "vast"


@lru_cache(maxsize=None)
def planned(name: str, constraints: str):
    """(rows, choice, need): `config` plans with the config's resources, as `launch plan` does;
    `free` with no constraints; `none` under a $/h cap nothing meets."""
    config = launch_config.load(ROOT / "configs" / f"{name}.yaml")
    need = offers.job_need(config)
    r = config.resources
    c = {"config": offers.Constraints(gpu=resolve(r.gpu), interruptible=r.interruptible,
                                      max_usd_per_hour=r.max_price, max_total_usd=r.max_total_usd),
         "free": offers.Constraints(),
         "none": offers.Constraints(max_usd_per_hour=0.01)}[constraints]
    rows, choice = offers.plan(offers.catalog_offers(ROOT / "catalogs"), need, c)
    return rows, choice, need


PLANS = [("mistral-7b-qlora", "config"), ("mistral-7b-qlora", "free"), ("mistral-7b-qlora", "none"),
         ("deepseek-r1-distill-qwen-1.5b-qlora", "config"), ("llama-3.1-8b-qlora", "config")]


def render(width: int, rows, choice, need, *, limit: int = 15, show_all: bool = False, rentable=only_vast) -> str:
    console = Console(width=width, record=True, force_terminal=False)
    plan_table.render_plan(console, rows, choice, need, limit=limit, show_all=show_all, rentable=rentable)
    return console.export_text()


def table_lines(width: int, groups, choice, rentable=only_vast) -> list[str]:
    """The table alone: title, header, rule, then one line per group if nothing wrapped."""
    console = Console(width=width, record=True, force_terminal=False)
    console.print(plan_table.fitted_table(console, groups, choice, rentable))
    return console.export_text().splitlines()


def brute_kinds(rows) -> Counter:
    return Counter((p.offer.provider, p.offer.gpu, p.offer.gpu_count, p.offer.interruptible, p.why_not) for p in rows)


# ---------------------------------------------------------------------------------------------
# grouping
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", PLANS)
def test_groups_partition_the_rows_best_first_and_count_the_rest(plan):
    rows, _, _ = planned(*plan)
    groups = plan_table.group_offers(rows)
    indices = [i for g in groups for i in g.indices]
    assert sorted(indices) == list(range(len(rows)))  # every row in exactly one group
    assert [g.index for g in groups] == sorted(g.index for g in groups)  # groups keep the plan's order
    kinds = brute_kinds(rows)
    assert len(groups) == len(kinds)
    for g in groups:
        assert list(g.indices) == sorted(g.indices) and g.best is rows[g.index]
        o = g.best.offer
        assert g.more == kinds[(o.provider, o.gpu, o.gpu_count, o.interruptible, g.best.why_not)] - 1
        # the best of a kind is its cheapest whole job
        assert all((p.est_total_usd or 0) >= (g.best.est_total_usd or 0) for p in g.rows)


def test_the_count_says_regions_or_rows_truthfully():
    def row(region: str, instance: str = "g4dn.xlarge", usd: float = 0.1) -> offers.PlannedOffer:
        offer = Offer(provider="aws", region=region, gpu="T4", gpu_count=1, vram_gb=16, usd_per_hour=usd,
                      interruptible=True, instance_type=instance)
        return offers.PlannedOffer(offer, 1.0, usd * 1.25, True, None)

    one_each = plan_table.group_offers([row("us-east-1"), row("us-west-2"), row("eu-west-1")])
    assert [g.more_text() for g in one_each] == ["+2 regions"]
    assert plan_table.group_offers([row("us-east-1"), row("us-west-2")])[0].more_text("tiny") == "+1 region"
    sizes = plan_table.group_offers([row("us-east-1"), row("us-east-1", "g4dn.2xlarge"), row("us-west-2")])[0]
    assert (sizes.more, sizes.regions) == (2, 2)
    assert [sizes.more_text(f) for f in ("long", "short", "tiny")] == [
        "+2 more in 2 regions", "+2 in 2 regions", "+2 more"]
    assert plan_table.group_offers([row("us-east-1")])[0].more_text() == ""
    # another market is another kind
    spot, demand = row("us-east-1"), row("us-east-1")
    demand = offers.PlannedOffer(Offer(**{**vars(demand.offer), "interruptible": False}), 1.0, 0.2, True, None)
    assert len(plan_table.group_offers([spot, demand])) == 2


@pytest.mark.parametrize("plan", PLANS)
def test_the_rendered_counts_match_the_raw_rows(plan):
    rows, choice, _ = planned(*plan)
    kinds = brute_kinds(rows)
    groups = plan_table.group_offers(rows)
    shown = plan_table.select(groups, 15)
    body = table_lines(200, shown, choice)[3:]
    assert len(body) == len(shown)
    for line, g in zip(body, shown):
        o = g.best.offer
        others = kinds[(o.provider, o.gpu, o.gpu_count, o.interruptible, g.best.why_not)] - 1
        counts = re.findall(r"\+(\d+) (?:more|regions?)", line)
        assert counts == ([str(others)] if others else []), line


# ---------------------------------------------------------------------------------------------
# width
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("plan", PLANS)
def test_headers_whole_and_each_row_one_line_that_fits(plan, width):
    rows, choice, need = planned(*plan)
    text = render(width, rows, choice, need)
    assert "…" not in text and "..." not in text
    assert all(len(line.rstrip()) <= width for line in text.splitlines())
    shown = plan_table.select(plan_table.group_offers(rows), 15)
    lines = table_lines(width, shown, choice)
    assert len(lines) == 3 + len(shown)  # title, header, rule, one line per row: nothing wrapped
    assert set(lines[2].strip()) == {"─"}
    header = lines[1]
    for name in HEADERS_80:
        assert re.search(rf"(^|\s){re.escape(name)}(\s|$)", header), (name, header)
    assert "\n".join(lines) in text  # render_plan prints that same table


@pytest.mark.parametrize("plan", PLANS)
def test_200_columns_show_more_than_80(plan):
    rows, choice, _ = planned(*plan)
    shown = plan_table.select(plan_table.group_offers(rows), 15)
    wide, narrow = table_lines(200, shown, choice), table_lines(80, shown, choice)
    assert wide[1].split() == " ".join(HEADERS_200).split()
    assert len(narrow[1].split()) < len(wide[1].split())
    for line, g in zip(wide[3:], shown):
        assert g.best.offer.region in line and g.best.offer.instance_type in line


def test_80_columns_merge_price_and_market_and_keep_notes_short():
    rows, choice, need = planned("mistral-7b-qlora", "config")
    lines = table_lines(80, plan_table.select(plan_table.group_offers(rows), 15), choice)
    assert "market" not in lines[1] and "region" not in lines[1]
    assert re.search(r"\d\.\d{3} spot", lines[3])
    body = "\n".join(lines[3:])
    assert "above $1.50/h cap" in body and "the $" not in body


def test_short_reasons():
    cases = {"too small: 14.4 of 16.1 GB": ("too small: 14.4/16.1 GB", "too small"),
             "above the $1.50/h cap": ("above $1.50/h cap", "above $/h cap"),
             "above the $20.00 total cap": ("above $20 total cap", "above total cap"),
             "above the $20.50 total cap": ("above $20.50 total cap", "above total cap"),
             "on-demand": ("asked for spot", "not asked for"),
             "spot": ("asked for on-demand", "not asked for"),
             "2 GPUs, 1 asked for": ("asked for 1 GPU", "not asked for"),
             "1 GPUs, 4 asked for": ("asked for 4 GPUs", "not asked for"),
             "something new": ("something new", "something new")}
    for long, (short, tiny) in cases.items():
        assert plan_table.short_reason(long) == short
        assert plan_table.short_reason(long, "tiny") == tiny
    # every reason the planner gives today has a shorter form
    reasons = {p.why_not for plan in PLANS for p in planned(*plan)[0] if p.why_not}
    assert reasons and all(len(plan_table.short_reason(r)) < len(r) or len(r) <= 9 for r in reasons)


def test_short_region():
    assert plan_table.short_region("us-east-1") == "us-east-1"
    assert plan_table.short_region("Oregon, US, NA") == "Oregon, US"
    assert plan_table.short_region("Hafnarfjarðarkaupstaður, IS, EU") == "IS"
    assert plan_table.short_region(", US, NA") == "US"
    assert plan_table.short_region(None) == "-"


# ---------------------------------------------------------------------------------------------
# --rows, --all, marks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 5, 15, 200])
@pytest.mark.parametrize("plan", PLANS)
def test_rows_is_the_most_lines_misses_included(plan, limit):
    rows, choice, need = planned(*plan)
    groups = plan_table.group_offers(rows)
    shown = plan_table.select(groups, limit)
    fitting = [g for g in groups if g.best.fits]
    misses = [g for g in groups if not g.best.fits]
    want = max(1, limit)
    assert len(shown) == min(want, len(fitting) + (min(plan_table.MISS_LINES, len(misses)) if fitting
                                                   else len(misses)))
    assert [g.best.fits for g in shown] == sorted((g.best.fits for g in shown), reverse=True)  # fits first
    if not fitting:
        assert len(shown) >= 1 and not shown[0].best.fits
    text = render(200, rows, choice, need, limit=limit)
    lines = table_lines(200, shown, choice)
    assert "\n".join(lines) in text and len(lines) - 3 == len(shown)


def test_rows_3_on_the_deepseek_config_is_3_lines():
    rows, choice, need = planned("deepseek-r1-distill-qwen-1.5b-qlora", "config")
    shown = plan_table.select(plan_table.group_offers(rows), 3)
    assert len(shown) == 3 and shown[0].best.fits and not shown[-1].best.fits
    text = render(80, rows, choice, need, limit=3)
    assert f"showing 3 of {len(plan_table.group_offers(rows))} kinds" in text


@pytest.mark.parametrize("plan", [("mistral-7b-qlora", "config"), ("mistral-7b-qlora", "none")])
def test_show_all_prints_every_row(plan):
    rows, choice, need = planned(*plan)
    text = render(200, rows, choice, need, limit=3, show_all=True)
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.strip() and set(line.strip()) == {"─"})
    body = lines[rule + 1: rule + 1 + len(rows)]
    assert len(body) == len(rows)
    assert not lines[rule + 1 + len(rows)].startswith(" ")  # the footer follows: no more rows
    assert f"{len(rows):,} offers." in text
    assert not re.search(r"\+\d+ (more|regions?)", "\n".join(body))  # ungrouped
    for line, p in zip(body, rows):
        assert p.offer.region in line and f"{p.offer.usd_per_hour:.3f}" in line


@pytest.mark.parametrize("width", [80, 200])
def test_unrentable_offers_are_marked_and_footnoted(width):
    rows, choice, need = planned("mistral-7b-qlora", "free")
    shown = plan_table.select(plan_table.group_offers(rows), 15)
    assert {g.best.offer.provider for g in shown} >= {"aws", "vast"}
    for line, g in zip(table_lines(width, shown, choice)[3:], shown):
        marked = re.search(rf"\b{g.best.offer.provider}{plan_table.UNRENTABLE_MARK}", line)
        assert bool(marked) == (g.best.offer.provider != "vast"), line
    text = render(width, rows, choice, need)
    assert "† priced only: `launch` cannot rent it from here, the → pick included." in text  # an AWS L4
    assert "† priced only: `launch` cannot rent it from here." in render(
        width, rows, choice, need, rentable=lambda o: o.provider != "vast")
    everything = render(width, rows, choice, need, rentable=lambda o: True)
    assert plan_table.UNRENTABLE_MARK not in everything


@pytest.mark.parametrize("width", [80, 200])
@pytest.mark.parametrize("plan", PLANS)
def test_the_choice_is_marked_once(plan, width):
    rows, choice, need = planned(*plan)
    shown = plan_table.select(plan_table.group_offers(rows), 15)
    body = table_lines(width, shown, choice)[3:]
    marked = [i for i, line in enumerate(body) if line.lstrip().startswith(plan_table.CHOICE_MARK)]
    if choice is None:
        assert marked == [] and plan_table.CHOICE_MARK not in render(width, rows, choice, need)
    else:
        assert marked == [0] and choice in shown[0].indices


# ---------------------------------------------------------------------------------------------
# need line and footer
# ---------------------------------------------------------------------------------------------


def test_the_need_line_says_how_tokens_were_counted():
    rows, choice, need = planned("mistral-7b-qlora", "config")
    text = " ".join(render(80, rows, choice, need).split())  # a long source wraps, indented
    assert f"need: {need.vram_gb:.1f} GB of GPU memory" in text and f"{need.tokens:,}" in text
    if getattr(need, "lengths_source", None):  # JobNeed says how it counted
        assert f"{need.tokens:,}, from {' '.join(need.lengths_source.split())}" in text
    # before JobNeed.lengths_source: the bound says it
    fields = {k: v for k, v in vars(need).items() if k != "lengths_source"}
    plain = types.SimpleNamespace(**{**fields, "tokens_bound": True})
    assert f"≤ {need.tokens:,}, from max_length (upper bound)" in render(80, rows, choice, plain)
    sourced = types.SimpleNamespace(**{**vars(need), "lengths_source": "local data, exact tokenizer",
                                       "tokens_bound": False})
    text = render(80, rows, choice, sourced)
    assert f"training tokens: {need.tokens:,}, from local data, exact tokenizer" in text
    assert all(len(line.rstrip()) <= 80 for line in text.splitlines())
    unknown = types.SimpleNamespace(**{**vars(need), "tokens": None})
    assert "training tokens: unknown" in render(80, rows, choice, unknown)


def test_the_footer_keeps_the_time_model_and_start_up():
    rows, choice, need = planned("mistral-7b-qlora", "config")
    text = " ".join(render(80, rows, choice, need).split())  # the footer is prose: rich wraps it
    assert " ".join(estimate.time_model_summary().split()) in text
    assert f"(hours + {estimate.STARTUP_HOURS:g} h start-up) x $/h" in text


def test_no_rows():
    _, _, need = planned("mistral-7b-qlora", "config")
    text = render(80, [], None, need)
    assert "no offers match" in text and "─" not in text


def test_an_own_box_shows_its_target_and_is_never_marked_unrentable():
    rows, _, need = planned("mistral-7b-qlora", "free")
    box = Offer(provider="ssh", target="ssh://me@gpu-box", gpu="NVIDIA A10G", gpu_count=2, vram_gb=22.5,
                usd_per_hour=0.4)
    mine = offers.evaluate(box, need)
    text = render(200, [mine] + list(rows[:3]), 0, need, rentable=lambda o: False)
    line = next(line for line in text.splitlines() if "ssh://me@gpu-box" in line)
    assert line.lstrip().startswith("→ ") and "ssh†" not in line and " own " in line
    assert "aws†" in text


def test_the_footer_says_what_is_left_out():
    rows, choice, need = planned("mistral-7b-qlora", "free")
    kinds = plan_table.group_offers(rows)
    assert f"showing 2 of {len(kinds)} kinds ({len(rows):,} offers): more with --rows N, each with --all." in (
        render(80, rows, choice, need, limit=2))
    two = sorted(kinds[0].indices + kinds[1].indices)
    few = [rows[i] for i in two]
    text = render(80, few, 0, need)
    assert f"2 kinds of {len(few)} offers: each with --all." in text and "showing" not in text
    assert f"{len(few)} offers." in render(80, few, 0, need, show_all=True)


def test_unrentable_rows_are_dim_on_a_terminal():
    rows, choice, need = planned("mistral-7b-qlora", "free")
    console = Console(width=200, record=True, force_terminal=True, color_system="standard")
    plan_table.render_plan(console, rows, choice, need, limit=15, show_all=False, rentable=only_vast)
    lines = console.export_text(styles=True).splitlines()
    aws = [line for line in lines if "aws†" in line]
    vast = [line for line in lines if re.search(r"\bvast\b", line) and "GB" in line]
    assert aws and vast
    assert all("\x1b[2m" in line for line in aws) and not any("\x1b[2m" in line for line in vast)
