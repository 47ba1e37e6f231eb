"""Chapter 2's two batches start alike on every tokenizer: the random-token control (``data.random_batch``) has at
position 0 the token ``data.token_batch`` puts there, BOS or, for a tokenizer without BOS (Qwen2), its EOS."""
import pytest
import torch

from sinkutils import data

WORDS = "the sink forms on the first token of every text whatever it says".split()
TEXTS = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]


def word_tokenizer(bos: bool, adds_bos: bool, eos: bool = True):
    """A word-level tokenizer: ids 0-2 are <unk>, <s>, </s>. ``bos``: it has a BOS token (Llama, Mistral, SmolLM2),
    ``adds_bos``: it also prepends it when encoding (Llama, Mistral; SmolLM2 and Qwen2 do not)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>" if bos else None,
                                   eos_token="</s>" if eos else None)


@pytest.mark.parametrize("bos, adds_bos, first", [(True, True, 1),     # Llama: BOS
                                                  (True, False, 1),    # SmolLM2: a BOS token it does not add
                                                  (False, False, 2)])  # Qwen2: no BOS, EOS opens each document
def test_random_batch_starts_with_the_token_the_text_batch_starts_with(bos, adds_bos, first):
    tok = word_tokenizer(bos, adds_bos)
    vocab_size = len(tok)
    text = data.token_batch(tok, TEXTS, n=6, length=8, seed=3)
    rand = data.random_batch(tok, vocab_size, n=6, length=8, seed=3)
    assert (text[:, 0] == first).all() and (rand[:, 0] == first).all()
    # after it, the uniform draw over the ordinary ids [4, vocab), as with a random first token
    assert torch.equal(rand[:, 1:], data.random_token_batch(vocab_size, 6, 8, bos_id=None, seed=3)[:, 1:])
    assert rand[:, 1:].min() >= 4 and rand[:, 1:].max() < vocab_size and rand[:, 1:].unique().numel() > 3


def test_a_tokenizer_with_neither_bos_nor_eos_is_refused():
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        data.random_batch(word_tokenizer(bos=False, adds_bos=False, eos=False), 20, n=2, length=4)


def stream_of(tok, texts) -> list[int]:
    """The paragraph stream token_batch cuts: each text's tokens, then EOS."""
    return [t for p in texts for t in tok(p, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]


def test_with_a_start_token_of_its_own_the_windows_are_the_seeded_offsets():
    """BOS (SmolLM2's <|im_start|> too, which its tokenizer does not add) + the window at each offset that
    ``random.Random(seed).randrange`` draws: the windows every chapter measured stay as they were."""
    import random

    for adds_bos in (True, False):
        tok = word_tokenizer(bos=True, adds_bos=adds_bos)
        stream, rng = stream_of(tok, TEXTS), random.Random(3)
        expected = [[1] + stream[s:s + 7] for s in (rng.randrange(len(stream) - 7) for _ in range(6))]
        assert data.token_batch(tok, TEXTS, n=6, length=8, seed=3).tolist() == expected


def test_without_bos_the_start_token_stands_at_position_0_only():
    """A tokenizer without BOS (Qwen2) starts the rows with EOS, which also separates the paragraphs: no row may
    hold it again, or ``origin.sink_origin`` refuses the rows (11 of these 16 did before)."""
    tok = word_tokenizer(bos=False, adds_bos=False)
    ids = data.token_batch(tok, TEXTS, n=16, length=8, seed=0)
    assert (ids[:, 0] == 2).all() and not (ids[:, 1:] == 2).any()
    stream = stream_of(tok, TEXTS)
    assert all(any(stream[s:s + 7] == row[1:] for s in range(len(stream) - 7)) for row in ids.tolist())
    assert len({tuple(r) for r in ids.tolist()}) > 8  # still spread over the text


def test_without_bos_text_shorter_than_a_row_is_refused():
    with pytest.raises(ValueError, match="no paragraph holds"):
        data.token_batch(word_tokenizer(bos=False, adds_bos=False), TEXTS, n=2, length=16)


NESTED_DEFINITIONS = '''
"""module"""
def f():
    """f"""
    class A:
        def g(self): pass
    if x:
        def h(): pass
    else:
        async def i(): pass
try:
    def j(): pass
except E:
    def k(): pass
finally:
    class B: pass
with m:
    def l(): pass
match v:
    case 1:
        def n(): pass
y = [lambda: 0 for _ in range(3)]
'''


def test_the_statement_walk_finds_every_definition_in_ast_walks_order():
    import ast

    tree = ast.parse(NESTED_DEFINITIONS)
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    want = [n for n in ast.walk(tree) if isinstance(n, kinds)]
    assert [n for n in data._statements(tree) if isinstance(n, kinds)] == want
    assert len(want) == 11  # the module, f, A, g, h, i, j, k, B, l, n


def test_docstrings_equal_a_full_ast_walk_of_the_standard_library():
    import ast

    seen, want = set(), []
    for path in data._package_files("stdlib"):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                text = data._clean(doc) if doc and len(doc) >= data.MIN_DOCSTRING_CHARS else ""
                if len(text) >= data.MIN_DOCSTRING_CHARS and text not in seen:
                    seen.add(text)
                    want.append(text)
    assert data.docstrings(("stdlib",)) == want and len(want) > 1000
    assert __import__("gc").isenabled()  # the collector paused for the parse only
