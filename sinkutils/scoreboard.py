"""The reproduction scoreboard: every claim of the paper (``claims.of_model``, ``claims.of_variants``) against each
measured model, generated when the site is built (``book.build_html``), never typed by hand.

``measure`` takes the claims; ``write`` turns them into ``book/scoreboard.md`` (a row per claim, a column per model:
verdict and measurement, the paper's reference, a link to the chapter section that measures it) and
``book/scoreboard_figure.md`` and ``book/scoreboard_summary.md`` (the causal-chain figure, ``scoreboard_chain.png``,
and a compact table: the landing page includes both). ``callout`` shows the same claims inside a chapter, one short
box each (verdict, claim, the paper's value, this model's), where the chapter gives a claim's verdict.
"""
from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path

from sinkutils import claims, comparison, data, models, project

#: the causal chain of the paper, each link with the claims that test it (``Claim.key``)
CHAIN = [("token 0 does not\naggregate", "variance", ["variance_discrepancy", "variance_decays"]),
         ("variance", "super\nneurons", ["wo_aligned", "outlier_survives_wo", "super_neuron_selective"]),
         ("super\nneurons", "massive\ndimensions", ["down_column_heavy_tailed", "massive_dimensions_dominate"]),
         ("massive\ndimensions", "RMSNorm\ndirection", ["rmsnorm_locks_direction"]),
         ("RMSNorm\ndirection", "QK\nlocking", ["qk_locking"]),
         ("QK\nlocking", "sink", ["sink_from_some_layer_on", "norm_spike_with_sink"])]

#: where a claim is measured when no heading names its figure: a word of the heading of its section
SECTION = {"sink_from_some_layer_on": "Attention to token 0", "norm_spike_with_sink": "Attention to token 0",
           "variance_discrepancy": "What averaging predicts", "variance_decays": "What averaging predicts",
           "mask_moves_sink": "Block aggregation", "variance_draws_attention": "Amplifying the variance",
           "sink_is_structural": "Whose sink", "rmsnorm_locks_direction": "RMSNorm as a directional filter"}


@dataclasses.dataclass
class Settings:
    """The text a model's claims are measured on (the cpu profile's defaults)."""

    text_source: str = "python_docs"
    n_texts: int = 32
    seq_len: int = 128
    seed: int = 0
    batch_size: int = 8
    device_map: str | dict | None = None  # the model's placement (``models.load``): "auto" spreads a 70B model
    max_memory: dict | None = None


def measure(columns: dict[str, Settings], variants: Settings | None = Settings()) -> dict:
    """``{"models": {name: [Claim, ...]}, "variants": [Claim, ...]}``: ``claims.of_model`` for each model of
    ``columns`` on its settings, and ``claims.of_variants`` on the embedded variants (``comparison.SHIPPED``) on
    ``variants`` (none when None)."""
    out = {"models": {}, "variants": []}
    for name, s in columns.items():
        model, tokenizer = models.load(name, device_map=s.device_map, max_memory=s.max_memory)
        ids = data.token_batch(tokenizer, data.texts(s.text_source)[1], n=s.n_texts, length=s.seq_len, seed=s.seed)
        out["models"][name] = claims.of_model(model, ids, batch_size=s.batch_size)
        del model
    if variants is not None:
        paragraphs = data.texts(variants.text_source)[1]
        profiles = {v: comparison.variant_profile(n, paragraphs, n=variants.n_texts, length=variants.seq_len,
                                                  seed=variants.seed, batch_size=variants.batch_size)
                    for v, n in comparison.SHIPPED.items()}
        out["variants"] = claims.of_variants(profiles)
    return out


def columns(profile: str = "cpu", overrides: dict | None = None, root: Path = project.ROOT) -> dict[str, Settings]:
    """The scoreboard's columns for a build under ``profile``: the embedded default model (on its chapters'
    settings where the profile runs it, else on the cpu profile's defaults), then every model the profile ran."""
    return {models.DEFAULT: Settings()} | profile_columns(profile, overrides, root)


def ran_with(profile: str, chapter: str, overrides: dict | None = None, root: Path = project.ROOT) -> dict:
    """The parameters ``chapter`` runs with under ``profile``: its ``parameters`` cell's defaults, then the
    profile's values, then the ``overrides`` it declares (``book.execute`` injects no others)."""
    import ast

    import papermill

    declared = papermill.inspect_notebook(str(root / "chapters" / f"{chapter}.ipynb"))
    defaults = {}
    for name, spec in declared.items():
        try:
            defaults[name] = ast.literal_eval(spec["default"])
        except (ValueError, SyntaxError):  # an expression, not a literal: the profile must set it to matter here
            pass
    return defaults | project.parameters(profile, chapter, root) | {k: v for k, v in (overrides or {}).items()
                                                                      if k in declared}


def profile_columns(profile: str, overrides: dict | None = None, root: Path = project.ROOT) -> dict[str, Settings]:
    """The models a profile runs (every chapter's ``model_name`` and ``compare_models``), each on the settings of
    the chapters that run it (their text, rows and batch size: where they differ, the most common, the earliest
    on a tie): the scoreboard then measures a model on the very token ids and batch size its chapters measured and
    reads what they stored (``store``, ``SINKBOOK_STORE``) instead of measuring again."""
    runs: dict[str, list[Settings]] = {}
    for chapter in project.chapters(root):
        p = ran_with(profile, chapter, overrides, root)
        s = Settings(**{f.name: p.get(f.name, f.default) for f in dataclasses.fields(Settings)})
        for name in [p.get("model_name"), *(p.get("compare_models") or [])]:
            if name:
                runs.setdefault(name, []).append(s)
    return {name: max(ran, key=lambda s: (ran.count(s), -ran.index(s))) for name, ran in runs.items()}


# --- links to the chapter sections ----------------------------------------------------------------------------

def headings(notebook: Path) -> list[str]:
    """The markdown headings (without #) of a notebook, in order."""
    nb = json.loads(notebook.read_text())
    return [line.lstrip("#").strip() for cell in nb["cells"] if cell["cell_type"] == "markdown"
            for line in "".join(cell["source"]).splitlines() if line.startswith("#")]


def anchor(heading: str) -> str:
    """The id Sphinx gives a section titled ``heading`` (markdown: math and code marks dropped)."""
    from docutils.nodes import make_id

    return make_id(re.sub(r"[$`*]", "", heading))


def section(claim: claims.Claim, chapters_dir: Path) -> tuple[str, str]:
    """(chapter page, anchor) of the section that measures ``claim``: the heading named in ``SECTION``, else the
    first heading naming one of its figures, else the chapter's verdict section, else the chapter's top."""
    page = next(chapters_dir.glob(f"{claim.chapter:02d}_*.ipynb"), None)
    if page is None:
        return "", ""
    found = headings(page)
    figures = re.findall(r"\d+", claim.figure) if claim.figure.startswith("Fig") else []
    for test in (lambda h: claim.key in SECTION and h.startswith(SECTION[claim.key]),
                 lambda h: any(re.search(rf"\bFig {f}\b", h) for f in figures),
                 lambda h: h.startswith("What this")):
        hit = next((h for h in found[1:] if test(h)), None)
        if hit:
            return page.stem, anchor(hit)
    return page.stem, ""


# --- the pages ------------------------------------------------------------------------------------------------

def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def _link(claim: claims.Claim, chapters_dir: Path) -> str:
    page, hash_ = section(claim, chapters_dir)
    text = _cell(claim.statement)
    if not page:
        return text
    return f'<a href="../chapters/{page}.html{"#" + hash_ if hash_ else ""}">{text}</a>'


def _rows(result: dict, part: str) -> list[tuple[claims.Claim, dict[str, claims.Claim]]]:
    """One row per claim key of ``part`` ("models" or "variants"), in chapter order: (the claim on the first column
    that has it, {column: claim})."""
    by_column = result["models"] if part == "models" else {"variants": result["variants"]}
    rows: dict[str, tuple[claims.Claim, dict]] = {}
    for name, cs in by_column.items():
        for c in cs:
            rows.setdefault(c.key, (c, {}))[1][name] = c
    return sorted(rows.values(), key=lambda r: r[0].chapter)


def _columns(result: dict) -> list[str]:
    return list(result["models"]) + (["variants"] if result["variants"] else [])


def _title(column: str) -> str:
    return "the four embedded variants (chapter 6)" if column == "variants" else Path(column).name


def table(result: dict, chapters_dir: Path, compact: bool = False, part: str = "models") -> str:
    """The scoreboard as a markdown table: ``part`` "models" (a column per model, chapters 1-6) or "variants"
    (chapter 6's comparison of the embedded variants); ``compact``: verdicts only, no reference."""
    cols = list(result["models"]) if part == "models" else ["variants"]
    head = ["ch.", "claim (paper's figure)", *(map(_title, cols) if part == "models" else ["the variants"])]
    head += [] if compact else ["paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for first, by in _rows(result, part):
        cells = []
        for col in cols:
            c = by.get(col)
            cells.append("" if c is None else f"**{c.verdict}**" if compact else
                         f"**{c.verdict}**: {_cell(c.summary)}")
        row = [str(first.chapter), f"{_link(first, chapters_dir)} ({_cell(first.figure)})", *cells]
        lines.append("| " + " | ".join(row + ([] if compact else [_cell(first.reference) or "-"])) + " |")
    return "\n".join(lines)


class Callout:
    """Claims as callouts: HTML boxes in Jupyter, Colab and the site (``_repr_html_``), ``Claim.line()`` as text."""

    def __init__(self, found: list[claims.Claim]):
        self.claims = found

    def _repr_html_(self) -> str:
        return "\n".join(map(_callout_html, self.claims))

    def __repr__(self) -> str:
        return "\n".join(c.line() for c in self.claims)


def _callout_html(c: claims.Claim) -> str:
    from sinkutils.plots import VERDICT_COLORS

    color, e = VERDICT_COLORS[c.verdict], html.escape
    label = 'style="opacity: .7"'
    return (f'<div class="sinkbook-claim sinkbook-claim-{"na" if c.holds is None else c.verdict.lower()}" '
            f'style="border-left: 4px solid {color}; background: {color}14; padding: .45em .8em; margin: .6em 0; '
            f'line-height: 1.45; overflow-wrap: anywhere">'
            f'<div><strong style="color: {color}">{e(c.verdict)}</strong> &middot; {e(c.statement)} '
            f'<span {label}>({e(c.figure)})</span></div>'
            f'<div><span {label}>paper:</span> {e(c.reference or "no value to compare with")}</div>'
            f'<div><span {label}>this model:</span> {e(c.summary)}</div>'
            f'<details style="font-size: .9em"><summary {label}>counts as agreement</summary>{e(c.criterion)}'
            f'</details></div>')


def callout(*found: claims.Claim) -> Callout:
    """Each claim as one short callout, where a chapter (1-6) gives a claim's verdict: the verdict in its
    scoreboard colour (``plots.VERDICT_COLORS``), the claim and the paper's figure, the paper's value, this model's
    measurement, and the criterion folded away. Display it (``display(scoreboard.callout(c))``) or leave it last in a cell."""
    if not found:
        raise ValueError("give at least one claims.Claim")
    return Callout(list(found))


def chain_verdicts(result: dict, model: str = models.DEFAULT) -> list[tuple[str, str, str, list[claims.Claim]]]:
    """Each link of ``CHAIN`` with its verdict on ``model``: "agrees" when every claim of the link holds, "DEPARTS"
    when none does, "partly" when some do, "n/a" when none can be tested."""
    by_key = {c.key: c for c in result["models"][model]}
    out = []
    for a, b, keys in CHAIN:
        cs = [by_key[k] for k in keys if k in by_key]
        tested = [c.holds for c in cs if c.holds is not None]
        verdict = ("n/a" if not tested else "agrees" if all(tested) else "DEPARTS" if not any(tested) else "partly")
        out.append((a, b, verdict, cs))
    return out


def counts(result: dict, column: str) -> dict[str, int]:
    """How many claims agree, depart and cannot be tested in ``column``."""
    cs = result["variants"] if column == "variants" else result["models"][column]
    return {v: sum(c.verdict == v for c in cs) for v in ("agrees", "DEPARTS", "n/a")}


def _tally(result: dict) -> str:
    return "; ".join(f"{_title(col)}: " + ", ".join(f"{n} {v}" for v, n in counts(result, col).items())
                     for col in _columns(result))


def variants_part(result: dict, chapters_dir: Path, compact: bool = False) -> list[str]:
    """Chapter 6's comparison of the embedded variants (``claims.of_variants``) under its own heading, if measured."""
    if not result["variants"]:
        return []
    return ["", "Chapter 6 compares `sinkbook-tiny` with the same recipe's head-wise RMSNorm, sigmoid and gated "
            "variants:", "", table(result, chapters_dir, compact, part="variants"), ""]


def chain_model(result: dict) -> str:
    """The model the chain figure shows: the first measured model besides the embedded default (the one the profile's
    chapters analyse: SmolLM2-135M on the cpu profile, Llama-2-7B on the gpu profile), else the default."""
    return next((m for m in result["models"] if m != models.DEFAULT), models.DEFAULT)


def write(result: dict, book_dir: Path, chapters_dir: Path, model: str | None = None) -> list[Path]:
    """``scoreboard.md``, ``scoreboard_summary.md``, ``scoreboard_figure.md`` and the chain figure
    ``scoreboard_chain.png`` (on ``model``, default ``chain_model``) in ``book_dir``; the links point at
    ``chapters_dir``'s headings."""
    from sinkutils import plots

    model = model or chain_model(result)

    fig = plots.causal_chain(chain_verdicts(result, model), title=f"the paper's causal chain on {Path(model).name}")
    png = book_dir / "scoreboard_chain.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    caption = (f"The paper's causal chain, each link coloured by its verdict on `{Path(model).name}` (green: the "
               "claims that test it agree, red: they depart, amber: some do, grey: not testable here), with the "
               "claims under it (a tick for each that holds). Follow the arrows: where they turn red is where this "
               "model's sink stops following the paper's mechanism.")
    figure = "\n".join(["```{figure} scoreboard_chain.png", ":name: fig-scoreboard-chain",
                        ":alt: the causal chain coloured by verdict", "", caption, "```", ""])
    summary = "\n".join([
        f"Every claim, measured when this site was built ({_tally(result)}); the numbers and the paper's references "
        "are on the [scoreboard](scoreboard.md).", "", table(result, chapters_dir, compact=True), "",
        *variants_part(result, chapters_dir, compact=True)])
    page = "\n".join([
        "# Reproduction scoreboard", "",
        "A row per claim of the paper, a column per model measured when this site was built: each cell is the "
        "verdict and this model's measurement, the last column the paper's reference where it has one. The claims, "
        "their criteria and the numbers come from `sinkutils.claims` (the functions the chapters print and the "
        "tests assert), run here by `sinkutils.scoreboard`; each claim links to the chapter section that measures "
        f"it. In all: {_tally(result)}.", "",
        table(result, chapters_dir), "", *variants_part(result, chapters_dir)])
    paths = [book_dir / "scoreboard.md", book_dir / "scoreboard_summary.md", book_dir / "scoreboard_figure.md"]
    for path, text in zip(paths, (page, summary, figure)):
        path.write_text(text)
    return [*paths, png]
