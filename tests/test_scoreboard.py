"""The scoreboard is generated from ``sinkutils.claims``: its cells are the claims' own verdicts and measurements on
the default model, its links point at headings the chapters have, and its chain figure colours each link by the
claims' verdicts. (The rendered page is checked in ``tests/test_site.py``.)"""
from __future__ import annotations

import re

import pytest

from sinkutils import claims, data, models, project, scoreboard

SMALL = scoreboard.Settings(n_texts=8)


@pytest.fixture(scope="module")
def board():
    return scoreboard.measure({models.DEFAULT: SMALL}, variants=None)


@pytest.fixture(scope="module")
def written(board, tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    scoreboard.write(board, out, project.ROOT / "chapters")
    return out


def test_cells_are_the_claims_of_the_default_model(board, written):
    model, tokenizer = models.load(models.DEFAULT)
    ids = data.token_batch(tokenizer, data.texts(SMALL.text_source)[1], n=SMALL.n_texts, length=SMALL.seq_len,
                           seed=SMALL.seed)
    expected = claims.of_model(model, ids)  # measured again, independently of the scoreboard
    page = (written / "scoreboard.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith(("| 1 ", "| 2 ", "| 3 ", "| 4 ", "| 5 ", "| 6 "))]
    assert len(rows) == len(expected) == len(board["models"][models.DEFAULT])
    for row, claim in zip(rows, expected):
        assert claim.statement.replace("|", "\\|") in row
        assert f"**{claim.verdict}**: {claim.summary.replace('|', chr(92) + '|')}" in row, row
        if claim.reference:
            assert claim.reference in row
    counts = scoreboard.counts(board, models.DEFAULT)
    assert counts == {v: sum(c.verdict == v for c in expected) for v in ("agrees", "DEPARTS", "n/a")}
    assert f"{counts['agrees']} agrees, {counts['DEPARTS']} DEPARTS" in (written / "scoreboard_summary.md").read_text()


def test_compact_table_and_figure(board, written):
    summary = (written / "scoreboard_summary.md").read_text()
    verdicts = re.findall(r"\*\*(agrees|DEPARTS|n/a)\*\*", summary)
    assert verdicts == [c.verdict for c in board["models"][models.DEFAULT]]
    assert (written / "scoreboard_chain.png").stat().st_size > 10_000
    figure = (written / "scoreboard_figure.md").read_text()
    assert "scoreboard_chain.png" in figure and "coloured by its verdict" in figure


def test_chain_verdicts_follow_the_claims(board):
    by_key = {c.key: c for c in board["models"][models.DEFAULT]}
    links = scoreboard.chain_verdicts(board)
    assert len(links) == 6 and links[0][0].startswith("token 0") and links[-1][1] == "sink"
    for (_, _, verdict, cs), (_, _, keys) in zip(links, scoreboard.CHAIN):
        assert [c.key for c in cs] == keys  # every claim the chain names is one of_model decides
        held = [by_key[k].holds for k in keys]
        assert verdict == ("agrees" if all(held) else "DEPARTS" if not any(held) else "partly")


def test_links_point_at_chapter_headings(board):
    chapters = project.ROOT / "chapters"
    for claim in board["models"][models.DEFAULT]:
        page, anchor = scoreboard.section(claim, chapters)
        assert page.startswith(f"{claim.chapter:02d}_")
        assert anchor in [scoreboard.anchor(h) for h in scoreboard.headings(chapters / f"{page}.ipynb")], claim.key
    for key, start in scoreboard.SECTION.items():  # a renamed heading must be renamed here too
        assert any(h.startswith(start) for ch in chapters.glob("*.ipynb") for h in scoreboard.headings(ch)), key


def test_anchor_is_sphinx_section_id():
    assert scoreboard.anchor("W_O keeps token 0 an outlier (Fig 7)") == "w-o-keeps-token-0-an-outlier-fig-7"
    assert scoreboard.anchor("Block aggregation at $k$") == "block-aggregation-at-k"


def test_page_figures_are_small_pngs_of_the_same_size():
    """plots.png (what the pages embed): the same pixel size as matplotlib's PNG, at most 256 colours, smaller."""
    import base64
    import io

    import torch
    from PIL import Image

    from sinkutils import plots

    fig = plots.heatmap(torch.rand(64, 64), title="random")
    raw = io.BytesIO()
    fig.savefig(raw, format="png", bbox_inches="tight", dpi=fig.dpi)
    small = base64.b64decode(plots.png(fig))
    assert Image.open(io.BytesIO(small)).size == Image.open(io.BytesIO(raw.getvalue())).size
    assert Image.open(io.BytesIO(small)).mode == "P" and len(small) < 0.6 * len(raw.getvalue())


def test_callout_shows_verdict_claim_paper_and_this_model():
    """A chapter's callout carries the claim's own fields (escaped), coloured as the scoreboard colours the verdict."""
    from sinkutils.plots import VERDICT_COLORS

    held = claims.Claim(key="k", chapter=1, figure="Fig 3", statement="attention <sinks> from some layer on",
                        criterion="mean attention to token 0 >= 0.3", measured={"peak": 0.7},
                        summary="0.70 at layer 3", holds=True, reference="about 0.8 in Llama-2-7B")
    untestable = claims.Claim(key="n", chapter=5, figure="Fig 12", statement="QK locking", criterion="tau > 2 sd",
                              measured={}, summary="no layer after the disparity", holds=None)
    box = scoreboard.callout(held, untestable)
    page = box._repr_html_()
    first, second = page.split("\n")
    for text in ("attention &lt;sinks&gt; from some layer on", "(Fig 3)", "about 0.8 in Llama-2-7B", "0.70 at layer 3",
                 "mean attention to token 0 &gt;= 0.3", f'color: {VERDICT_COLORS["agrees"]}">agrees</strong>'):
        assert text in first, text
    assert "<sinks>" not in page
    assert f'color: {VERDICT_COLORS["n/a"]}">n/a</strong>' in second and "no value to compare with" in second
    assert repr(box) == f"{held.line()}\n{untestable.line()}"  # the text a terminal shows
    with pytest.raises(ValueError, match="at least one"):
        scoreboard.callout()


def test_each_model_is_measured_on_the_settings_of_the_chapters_that_run_it():
    """The scoreboard's column of a model uses the very rows and batch size its chapters used, so it reads what they
    stored (``store``) instead of measuring again: on the cpu profile SmolLM2-135M with chapters 1-5's settings, the
    embedded default with chapter 6's."""
    cols = scoreboard.columns("cpu")
    assert list(cols) == [models.DEFAULT, "smollm2-135m"]
    for chapter in project.chapters():
        ran = scoreboard.ran_with("cpu", chapter)
        s = cols[ran["model_name"]]
        assert (ran["text_source"], ran["n_texts"], ran["seq_len"], ran["seed"], ran["batch_size"]) == (
            s.text_source, s.n_texts, s.seq_len, s.seed, s.batch_size), chapter
    assert cols["smollm2-135m"] == scoreboard.Settings(n_texts=16, batch_size=8)
    # the chapter's own default counts where the profile sets nothing; --param overrides only what a chapter declares
    assert scoreboard.ran_with("cpu", "02_variance", {"batch_size": 4, "no_such": 1})["batch_size"] == 4
    assert "no_such" not in scoreboard.ran_with("cpu", "02_variance", {"no_such": 1})
    # chapters that disagree: the settings most of them share, the earliest on a tie (gpu: chapters 3 and 6 at
    # 32 x batch 2, chapters 4 and 5 at 32 x batch 4, chapters 1 and 2 alone)
    gpu = scoreboard.profile_columns("gpu")
    assert (gpu["llama-2-7b"].n_texts, gpu["llama-2-7b"].batch_size) == (32, 2)
    assert (gpu["llama-3-8b"].n_texts, gpu["llama-3-8b"].batch_size) == (32, 4)  # compare_models of chapters 4, 5
