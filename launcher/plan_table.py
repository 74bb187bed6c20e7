"""`launch plan` as a person reads it: the need line, the offers table and a short footer,
fitted to the console's width. Rendering only: the rows come planned, evaluated and sorted from
offers.plan (fitting first, cheapest whole job first); nothing here decides what fits or costs.

The table shows one line per kind of offer (provider, GPU, GPU count, market, and why it misses,
if it does): its cheapest row, with how many more rows of that kind there are ("+289 more in 20
regions"). `--all` shows every row.

Width: a ladder of layouts (LAYOUTS), widest first: instance type, full region, the count in
its own column ("+289 more in 20 regions"), headers spelled out ("est. total $"). Each step gives
up one more thing: the instance type; then the long region and count ("Oregon, US", "+289 in 20
regions"); the long headers ("total $"); $/h and market become one column ("0.526 spot"); the
region goes and the count joins the note; the count's short form ("+289 more"); a near miss's
count (its reason stays); the → column (the mark leads the provider cell); the VRAM column;
last, terse reasons ("too small"). The first layout whose widest line fits `console.width` is
printed with fixed column widths, so no header is cut and no note wraps. A console narrower
than the last layout (about 65 columns for the shipped catalogs) gets it with rich's wrapping."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Sequence

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from launcher import estimate
from launcher.offers import PlannedOffer
from launcher.providers.base import Offer

MISS_LINES = 3  # near misses shown below the fitting offers, when --rows leaves room
CHOICE_MARK = "→"
UNRENTABLE_MARK = "†"


# ---------------------------------------------------------------------------------------------
# grouping
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfferGroup:
    """Rows of one kind of offer, in plan order: the first is the best (cheapest whole job)."""

    indices: tuple[int, ...]  # positions in the plan's rows
    rows: tuple[PlannedOffer, ...]

    @property
    def best(self) -> PlannedOffer:
        return self.rows[0]

    @property
    def index(self) -> int:
        return self.indices[0]

    @property
    def more(self) -> int:
        """Rows of this kind besides the best one."""
        return len(self.rows) - 1

    @property
    def regions(self) -> int:
        """Distinct regions over the whole group (the best one's included)."""
        return len({p.offer.region for p in self.rows if p.offer.region})

    def more_text(self, form: str = "long") -> str:
        """"+14 regions" when each other row is another region; else "+289 more in 20 regions"
        (long), "+289 in 20 regions" (short) or "+289 more" (tiny); "" for a group of one."""
        if not self.more:
            return ""
        others = {p.offer.region for p in self.rows[1:] if p.offer.region} - {self.best.offer.region}
        if len(others) == self.more:
            return f"+{self.more} region{'s' if self.more > 1 else ''}"
        if self.regions > 1 and form != "tiny":
            return f"+{self.more} {'more ' if form == 'long' else ''}in {self.regions} regions"
        return f"+{self.more} more"


def group_key(p: PlannedOffer) -> Hashable:
    """What makes two rows the same kind of offer: provider, GPU, GPU count, market, the machine a
    --target names, and the reason it misses (a fitting row and a capped one stay apart)."""
    o = p.offer
    return (o.provider, o.target, o.gpu, o.gpu_count, o.interruptible, p.fits, p.why_not)


def group_offers(rows: Sequence[PlannedOffer], *,
                 key: Callable[[PlannedOffer], Hashable] = group_key) -> list[OfferGroup]:
    """The rows grouped by `key`, in the order each group's first row comes (the rows are sorted,
    so that row is the group's best and the groups stay sorted)."""
    found: dict[Hashable, list[int]] = {}
    for index, p in enumerate(rows):
        found.setdefault(key(p), []).append(index)
    return [OfferGroup(tuple(ix), tuple(rows[i] for i in ix)) for ix in found.values()]


def each_row(rows: Sequence[PlannedOffer]) -> list[OfferGroup]:
    """Every row its own group (`--all`)."""
    return [OfferGroup((i,), (p,)) for i, p in enumerate(rows)]


def select(groups: Sequence[OfferGroup], limit: int) -> list[OfferGroup]:
    """At most `limit` lines (never fewer than one): the fitting groups first, cheapest first;
    then near misses, cheapest first, only in the room left and at most MISS_LINES of them;
    when nothing fits, every line may be a near miss."""
    limit = max(1, limit)
    fitting = [g for g in groups if g.best.fits][:limit]
    misses = [g for g in groups if not g.best.fits]
    room = limit - len(fitting)
    if fitting:
        room = min(room, MISS_LINES)
    return fitting + misses[:room]


# ---------------------------------------------------------------------------------------------
# cell texts
# ---------------------------------------------------------------------------------------------

_REASONS = [  # offers.py's reasons, (pattern, short, tiny); anything else is shown as it is
    (r"too small: ([\d.]+) of ([\d.]+) GB", r"too small: \1/\2 GB", "too small"),
    (r"above the \$([\d.]+)/h cap", r"above $\1/h cap", "above $/h cap"),
    (r"above the \$([\d.]+) total cap", r"above $\1 total cap", "above total cap"),
    (r"spot", "asked for on-demand", "not asked for"),  # the row is spot, on-demand was asked for
    (r"on-demand", "asked for spot", "not asked for"),
    (r"(\d+) GPUs?, (\d+) asked for", r"asked for \2 GPUs", "not asked for"),
    (r"not a CUDA GPU the runner supports", "not a CUDA GPU", "not CUDA"),
]


def short_reason(why_not: str, form: str = "short") -> str:
    """A miss's reason (offers.py's words) in fewer: "too small: 14.4/16.1 GB", "above $1.50/h
    cap"; `form` "tiny": "too small", "above $/h cap"."""
    for pattern, short, tiny in _REASONS:
        match = re.fullmatch(pattern, why_not)
        if match:
            text = match.expand(short if form == "short" else tiny).replace(" 1 GPUs", " 1 GPU")
            return re.sub(r"\$(\d+)\.00\b", r"$\1", text)  # "$20.00 total cap" -> "$20 total cap"
    return why_not


def short_region(region: Optional[str]) -> str:
    """"us-east-1" as it is; Vast.ai's "Hafnarfjarðarkaupstaður, IS, EU" as "IS", "Oregon, US, NA"
    as "Oregon, US" (the continent goes; a long place name gives way to its country)."""
    if not region:
        return "-"
    parts = [part.strip() for part in region.split(",")]
    if len(parts) < 3:
        return region
    place, country = parts[0], parts[1]
    return f"{place}, {country}" if place and len(place) <= 12 else country or region


def _hours(p: PlannedOffer) -> str:
    if p.est_hours is None:
        return "-"
    h = p.est_hours
    return (f"{h:.2f}" if h < 10 else f"{h:.1f}" if h < 1000 else f"{h:,.0f}") + ("*" if p.calibrated else "")


def _usd(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10_000 else f"{value:,.0f}"


def _market(o: Offer) -> str:
    if o.target is not None:
        return "own"
    return "spot" if o.interruptible else "on-demand"


def _gpu(o: Offer) -> str:
    return "no GPU" if o.gpu is None else f"{o.gpu_count}x {o.gpu}"


# ---------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    instance: bool = True  # an instance-type column
    region: Optional[str] = "long"  # long | short | None (dropped: the "+N" count says how many)
    vram: bool = True
    merge_market: bool = False  # "0.526 spot" in the $/h column
    more_column: bool = True  # the "+N" count in a column of its own, else at the end of the note
    count: str = "long"  # the count's form (OfferGroup.more_text): long | short | tiny
    miss_count: bool = True  # False: a near miss's note gives only its reason
    note: str = "short"  # the reason's form (short_reason): short | tiny
    short_headers: bool = False
    mark_column: bool = True  # False: the → mark leads the provider's cell


def _ladder() -> list[Layout]:
    """The layouts, widest first; each step gives up one more thing."""
    steps = [dict(instance=False), dict(region="short", count="short"), dict(short_headers=True),
             dict(merge_market=True), dict(region=None, more_column=False), dict(count="tiny"),
             dict(miss_count=False), dict(mark_column=False), dict(vram=False), dict(note="tiny")]
    layouts, given_up = [Layout()], {}
    for step in steps:
        given_up.update(step)
        layouts.append(Layout(**given_up))
    return layouts


LAYOUTS = _ladder()


@dataclass(frozen=True)
class _Column:
    header: str
    right: bool = False


def _columns(layout: Layout) -> list[_Column]:
    s = layout.short_headers
    cols = ([_Column("")] if layout.mark_column else []) + [_Column("provider")]
    if layout.region:
        cols.append(_Column("region"))
    if layout.instance:
        cols.append(_Column("instance"))
    cols.append(_Column("GPU"))
    if layout.vram:
        cols.append(_Column("VRAM", right=True))
    cols.append(_Column("$/h", right=not layout.merge_market))
    if not layout.merge_market:
        cols.append(_Column("market"))
    cols += [_Column("hours" if s else "est. hours", right=True),
             _Column("total $" if s else "est. total $", right=True)]
    if layout.more_column:
        cols.append(_Column("more"))
    cols.append(_Column("note"))
    return cols


def _cells(group: OfferGroup, layout: Layout, chosen: bool, any_chosen: bool, rentable: bool) -> list[str]:
    p, o = group.best, group.best.offer
    provider = o.provider + ("" if rentable else UNRENTABLE_MARK)
    mark = CHOICE_MARK if chosen else ""
    if layout.mark_column:
        cells = [mark, provider]
    else:
        cells = [f"{mark or ' '} {provider}" if any_chosen else provider]
    if layout.region:
        where = o.region or o.target  # own boxes: the --target that reaches them
        cells.append((where or "-") if layout.region == "long" else short_region(where))
    if layout.instance:
        cells.append(o.instance_type or "-")
    cells.append(_gpu(o))
    if layout.vram:
        cells.append("-" if o.vram_gb is None else f"{o.vram_gb:.0f} GB")
    if layout.merge_market:
        cells.append(f"{o.usd_per_hour:.3f} {_market(o)}")
    else:
        cells += [f"{o.usd_per_hour:.3f}", _market(o)]
    cells += [_hours(p), _usd(p.est_total_usd)]
    reason = short_reason(p.why_not, layout.note) if p.why_not else ""
    count = group.more_text(layout.count) if layout.miss_count or not reason else ""
    if layout.more_column:
        cells += [count, reason]
    else:
        cells.append(", ".join(part for part in (reason, count) if part))
    return cells


def _table(layout: Layout, lines: list[list[str]], styles: list[str], widths: Optional[list[int]]) -> Table:
    """`widths`: each column's width, fixed (nothing wraps or is cut, and rich need not measure
    every cell again); None: rich's own widths, wrapping where it must."""
    table = Table(title="offers, cheapest whole job first", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, collapse_padding=True, title_justify="left")
    for i, column in enumerate(_columns(layout)):
        table.add_column(column.header, justify="right" if column.right else "left",
                         width=widths[i] if widths else None, no_wrap=widths is not None)
    for cells, style in zip(lines, styles):
        table.add_row(*(Text(c) for c in cells), style=style)
    return table


def _can_rent(offer: Offer, rentable: Callable[[Offer], bool]) -> bool:
    """A machine named with --target is not rented: it is never marked, whatever `rentable` says."""
    return offer.target is not None or rentable(offer)


def _widths(layout: Layout, lines: list[list[str]]) -> list[int]:
    """Each column's widest cell, its header included."""
    return [max(cell_len(c) for c in column) for column in zip([c.header for c in _columns(layout)], *lines)]


def _width(console: Console, layout: Layout, widths: list[int]) -> int:
    """The table's width with these columns, borders and padding counted as rich draws them."""
    unbounded = console.options.update_width(1_000_000)  # a table measures itself clamped to the options' width
    return Measurement.get(console, unbounded, _table(layout, [], [], widths)).maximum


def fitted_table(console: Console, groups: Sequence[OfferGroup], choice: Optional[int],
                 rentable: Callable[[Offer], bool]) -> Table:
    """The offers table in the widest layout that fits the console."""
    marks = [choice is not None and choice in g.indices for g in groups]
    can = [_can_rent(g.best.offer, rentable) for g in groups]
    styles = ["" if ok else "dim" for ok in can]
    for layout in LAYOUTS:
        lines = [_cells(g, layout, m, any(marks), ok) for g, m, ok in zip(groups, marks, can)]
        widths = _widths(layout, lines)
        if _width(console, layout, widths) <= console.width:
            return _table(layout, lines, styles, widths)
    return _table(layout, lines, styles, None)


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------


def need_lines(need: Any) -> tuple[str, str]:
    """What the job needs; its tokens, and how they were counted (JobNeed.lengths_source where
    it has one, else whether the count is an upper bound)."""
    how = [w for w, on in (("padding-free", getattr(need, "padding_free", False)),
                           ("no full logits", getattr(need, "fused_loss", False))) if on]
    first = (f"need: {need.vram_gb:.1f} GB of GPU memory ({need.facts.total_params / 1e9:.2f}B params, "
             f"micro batch {need.micro_batch} x {need.seq_len} tokens{''.join(', ' + w for w in how)})")
    source = getattr(need, "lengths_source", None)
    if need.tokens is None:
        second = "training tokens: unknown, so no hours or $" + (f" (lengths from {source})" if source else "")
    else:
        source = source or ("max_length (upper bound)" if need.tokens_bound else "local data")
        second = f"training tokens: {'≤ ' if need.tokens_bound else ''}{need.tokens:,}, from {source}"
    return [first, second]


def footer_lines(shown: Sequence[OfferGroup], groups: Sequence[OfferGroup], rows: Sequence[PlannedOffer],
                 show_all: bool, unrentable: Sequence[OfferGroup], choice: Optional[int]) -> list[str]:
    lines = []
    if unrentable:
        pick = any(choice in g.indices for g in unrentable)
        lines.append(f"{UNRENTABLE_MARK} priced only: `launch` cannot rent it from here"
                     f"{f', the {CHOICE_MARK} pick included' if pick else ''}.")
    any_calibrated = any(g.best.calibrated for g in shown)
    calibrated = "; * calibrated by your runs on that GPU" if any_calibrated else ""
    lines.append(f"hours: {estimate.time_model_summary()}{calibrated}.")
    lines.append(f"total $ = (hours + {estimate.STARTUP_HOURS:g} h start-up) x $/h.")
    if show_all:
        lines.append(f"{len(rows):,} offers.")
    elif len(shown) < len(groups):
        lines.append(f"showing {len(shown)} of {len(groups)} kinds ({len(rows):,} offers): "
                     "more with --rows N, each with --all.")
    elif len(groups) < len(rows):
        lines.append(f"{len(groups)} kinds of {len(rows):,} offers: each with --all.")
    return lines


def render_plan(console: Console, rows: Sequence[PlannedOffer], choice: Optional[int], need: Any, *,
                limit: int, show_all: bool, rentable: Callable[[Offer], bool]) -> None:
    """Print the need, the offers table and the footer.

    `rows`, `choice`: offers.plan's answer (sorted; `choice` indexes `rows`, None when nothing
    fits). The table has one line per kind of offer (group_offers), at most `limit` of them
    (never fewer than one): fitting kinds first; the near misses take what room is left, at most
    MISS_LINES, or every line when nothing fits. `show_all`: every row, ungrouped, whatever
    `limit` says. The chosen offer is marked →; an offer `rentable` says `launch` cannot rent
    is dim and marked † (never a machine named with --target: that one is not rented)."""
    first, tokens = need_lines(need)
    console.print(first, highlight=False, markup=False)
    console.print(Padding(Text(tokens), (0, 0, 0, len("need: "))))  # wrapped lines keep the indent
    if not rows:
        console.print("no offers match the GPU and providers asked for", highlight=False, markup=False)
        return
    groups = each_row(rows) if show_all else group_offers(rows)
    shown = groups if show_all else select(groups, limit)
    console.print(fitted_table(console, shown, choice, rentable))
    unrentable = [g for g in shown if not _can_rent(g.best.offer, rentable)]
    for line in footer_lines(shown, groups, rows, show_all, unrentable, choice):
        console.print(line, highlight=False, markup=False)


__all__ = ["OfferGroup", "group_key", "group_offers", "each_row", "select", "short_reason", "short_region",
           "render_plan", "fitted_table", "Layout", "LAYOUTS"]
