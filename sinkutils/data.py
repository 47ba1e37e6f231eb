"""Text sources for every chapter: WikiText-2 when reachable, an offline corpus otherwise, random tokens.

BOS handling (the sink numbers depend on it): every sequence this module hands to a model starts with the
tokenizer's BOS token at position 0, as Llama's and Mistral's tokenizers do by default (Qwen2's has no BOS: its
EOS ``<|endoftext|>``, the document separator, takes that place; see ``start_token``). ``random_batch`` keeps that
first token and draws the rest uniformly, so "random tokens" means random *content* after a normal first token;
``random_token_batch(..., bos_id=None)`` makes position 0 random too.
"""
from __future__ import annotations

import ast
import bisect
import collections
import contextlib
import gc
import importlib.util
import random
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import torch

#: Packages whose docstrings form the offline training corpus. The standard library is always there.
CORPUS_PACKAGES = ("stdlib", "torch", "numpy", "transformers")
MIN_DOCSTRING_CHARS = 200


def _package_files(package: str) -> list[Path]:
    if package == "stdlib":
        root = Path(textwrap.__file__).parent
        return sorted(p for p in root.glob("*.py"))  # top level only: no tests, no site-packages
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0])
    return sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "tests" not in p.parts)


def _clean(doc: str) -> str:
    """Keep prose: drop doctest lines (``ast.get_docstring`` already removed the indentation)."""
    lines = [ln for ln in doc.splitlines() if not ln.lstrip().startswith((">>>", "..."))]
    return "\n".join(lines).strip()


def docstrings(packages: tuple[str, ...] = CORPUS_PACKAGES) -> list[str]:
    """Docstrings (module, class, function) of installed packages, deduplicated, in a stable order (``ast.walk``'s).

    Parsing ~5,600 files builds millions of AST objects: with the cyclic garbage collector paused (an AST has no
    cycles; each tree is freed by reference counting) and only statements walked (an expression holds no
    definition), the same list takes 10 s instead of 25 s."""
    seen, out = set(), []
    with _collector_paused():
        for package in packages:
            for path in _package_files(package):
                try:
                    tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
                except (SyntaxError, ValueError):
                    continue
                for node in _statements(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                            text = _clean(doc)
                            if len(text) >= MIN_DOCSTRING_CHARS and text not in seen:
                                seen.add(text)
                                out.append(text)
    return out


_HOLDS_DEFINITIONS = (ast.stmt, ast.excepthandler, ast.match_case)


def _statements(tree: ast.AST) -> Iterator[ast.AST]:
    """``ast.walk`` (breadth first) pruned to the nodes that can hold a definition: statements, except handlers and
    match cases. Pruning subtrees with none of them keeps the kept nodes' order."""
    todo = collections.deque([tree])
    while todo:
        node = todo.popleft()
        todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, _HOLDS_DEFINITIONS))
        yield node


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def python_docs() -> list[str]:
    """The Python language reference topics shipped with CPython (``pydoc_data``): the held-out text.

    It is never part of the training corpus, so it is fair held-out English for measuring the sink.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions split pydoc_data out
        raise RuntimeError("pydoc_data is missing from this Python; install the full standard library") from err
    return [topics[k].strip() for k in sorted(topics) if len(topics[k]) >= MIN_DOCSTRING_CHARS]


#: WikiText-2 (raw), test split: the hub dataset repo and the parquet file ``wikitext2`` reads
WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT_FILE = "wikitext-2-raw-v1/test-00000-of-00001.parquet"


def wikitext2() -> list[str] | None:
    """WikiText-2 raw paragraphs (the test split, as the paper measures on), else None.

    The parquet file ``WIKITEXT_FILE`` of the hub dataset ``WIKITEXT_REPO`` is read with ``pyarrow`` (the gpu
    profile's extra, ``requirements-gpu.txt``): downloaded once when the hub is reachable, from the Hugging Face
    cache (``HF_HOME``) when it is not or ``HF_HUB_OFFLINE=1``. None when pyarrow is missing or neither has it.
    """
    if importlib.util.find_spec("pyarrow") is None:
        return None
    try:
        import pyarrow.parquet as pq
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(WIKITEXT_REPO, WIKITEXT_FILE, repo_type="dataset")
        lines = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except Exception:  # offline without the cache, hub unreachable: the caller falls back or says why
        return None
    return [t.strip() for t in lines if t and len(t.strip()) >= MIN_DOCSTRING_CHARS]


def texts(source: str = "auto") -> tuple[str, list[str]]:
    """Held-out analysis text by name: ``"wikitext2"``, ``"python_docs"`` or ``"auto"`` (first that works).

    Returns ``(name_used, paragraphs)`` so a chapter can print which text it measured on.
    """
    choices = ("auto", "wikitext2", "python_docs")
    if source not in choices:
        raise ValueError(f"unknown text source {source!r}; choose one of {choices}")
    if source in ("auto", "wikitext2"):
        rows = wikitext2()
        if rows:
            return "wikitext2", rows
        if source == "wikitext2":
            need = ("pyarrow is not installed (`PROFILE=gpu bash run.sh book` installs it, or "
                    "`.venv/bin/python -m pip install -r requirements-gpu.txt`)"
                    if importlib.util.find_spec("pyarrow") is None else
                    f"{WIKITEXT_REPO}/{WIKITEXT_FILE} is neither downloadable (hub unreachable or HF_HUB_OFFLINE=1) "
                    f"nor in the Hugging Face cache (HF_HOME={_hf_home()})")
            raise RuntimeError(f"WikiText-2 is not available here: {need}; or use source='python_docs' or 'auto'")
    return "python_docs", python_docs()


def _hf_home() -> str:
    from huggingface_hub import constants

    return constants.HF_HOME


def start_token(tokenizer) -> int:
    """The id every sequence starts with: the tokenizer's BOS, or for a tokenizer without one (Qwen2) its EOS,
    the document separator Qwen2 sees at the start of every packed document in pre-training."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start the sequences with")


def token_batch(tokenizer, paragraphs: list[str], n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``n`` sequences of exactly ``length`` tokens, each BOS (``start_token``) + a window of one paragraph stream.

    Paragraphs are joined (EOS between them) and cut at seeded random offsets, so every row is real text. A
    tokenizer without BOS (Qwen2) starts the rows with its EOS, which also separates the paragraphs: its windows
    are drawn among those that hold no separator, so position 0 is the only start token in a row, as with BOS
    (``origin``'s probes move that token). SmolLM2-135M's tokenizer has a BOS, ``<|im_start|>``, that it leaves to
    the chat template to add: it starts the rows, as it starts every conversation the model was tuned on.
    """
    if length < 2:
        raise ValueError(f"length must be at least 2 (BOS + one token), got {length}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not paragraphs:
        raise ValueError("no text given: paragraphs is empty")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for p in paragraphs:
        stream += tokenizer(p, add_special_tokens=False)["input_ids"] + [eos]
    body = length - 1
    if len(stream) <= body:
        raise ValueError(f"the text has {len(stream)} tokens, fewer than the {body} each sequence needs")
    rng = random.Random(seed)
    start = start_token(tokenizer)
    if start != eos:
        offsets = [rng.randrange(len(stream) - body) for _ in range(n)]
    else:
        separators = [i for i, t in enumerate(stream) if t == eos] + [len(stream)]
        clear = [s for s in range(len(stream) - body)
                 if separators[bisect.bisect_left(separators, s)] >= s + body]  # the next separator lies past it
        if not clear:
            raise ValueError(f"no paragraph holds the {body} tokens each sequence needs (the rows start with EOS, "
                             f"which also separates paragraphs); give longer text or a smaller length")
        offsets = [rng.choice(clear) for _ in range(n)]
    rows = [[start] + stream[s:s + body] for s in offsets]
    return torch.tensor(rows, dtype=torch.long)


def random_batch(tokenizer, vocab_size: int, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``token_batch``'s control in chapter 2 (Fig 1, 23): the same first token (``start_token``: BOS, or EOS for
    a tokenizer without BOS) and uniformly random tokens after it, so only the content differs from real text."""
    return random_token_batch(vocab_size, n, length, bos_id=start_token(tokenizer), seed=seed)


def random_token_batch(vocab_size: int, n: int, length: int, bos_id: int | None, seed: int = 0,
                       low: int = 4) -> torch.Tensor:
    """Uniform random token ids in ``[low, vocab_size)``: the chapter-2 check that variance discrepancy is
    positional, not semantic. With ``bos_id`` the first column is BOS; with None it is random too."""
    if low >= vocab_size:
        raise ValueError(f"low={low} must be below vocab_size={vocab_size}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab_size, (n, length), generator=g)
    if bos_id is not None:
        ids[:, 0] = bos_id
    return ids


def describe_environment() -> str:
    """One line saying which corpus inputs were available (for model cards and logs)."""
    import numpy, transformers  # noqa: E401 - versions only

    return (f"python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}, "
            f"transformers {transformers.__version__}")


def bigram_backcopy(n: int, length: int, vocab_size: int, seed: int, n_triggers: int = 8,
                    branching: int = 4, low: int = 4) -> torch.Tensor:
    """The Bigram-Backcopy task of Guo et al. 2024 ("Active-Dormant Attention Heads"): after a trigger
    token the next token repeats the token before the trigger; otherwise it follows a fixed sparse bigram
    table. Heads that only matter after triggers learn to park their attention: a fast route to a sink.
    The table and triggers are fixed (seed 0); ``seed`` only draws the sequences."""
    table_gen = torch.Generator().manual_seed(0)
    succ = torch.randint(low, vocab_size, (vocab_size, branching), generator=table_gen)
    triggers = torch.zeros(vocab_size, dtype=torch.bool)
    triggers[torch.randint(low, vocab_size, (n_triggers,), generator=table_gen)] = True
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, length, dtype=torch.long)
    out[:, 0] = torch.randint(low, vocab_size, (n,), generator=g)
    choice = torch.randint(0, branching, (n, length), generator=g)
    for t in range(1, length):
        prev = out[:, t - 1]
        nxt = succ[prev, choice[:, t]]
        if t >= 2:
            nxt = torch.where(triggers[prev], out[:, t - 2], nxt)
        out[:, t] = nxt
    return out
