"""Issue 17: inputs that used to give a silently wrong number, or a raw traceback, now give the right result or an
error that says what was wrong and what is valid."""
import math

import pytest
import torch

from sinkutils import interventions, measure, metrics, models, structure, trace, widgets
from tests.test_trace import eager_reference, tiny


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


def ids_of(n: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (n, t), generator=torch.Generator().manual_seed(seed))


# --- trace.record --------------------------------------------------------------------------------------------

def test_record_refuses_a_second_forward_pass(model):
    ids = ids_of(1, 8)
    with pytest.raises(RuntimeError, match="one forward pass"):
        with trace.record(model, "attn.sink"):
            model(input_ids=ids)
            model(input_ids=ids)  # used to replace the first pass's numbers silently
    with pytest.raises(RuntimeError, match="generate"):
        with trace.record(model, "resid", layers=[2]):
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with trace.record(model, "attn.sink") as rec:  # one pass per block still works, and the hooks are gone after
        model(input_ids=ids)
    assert rec["attn.sink"].shape == (3, 1, 4, 8)
    model(input_ids=ids)


def test_padding_queries_are_left_out_and_a_padded_sink_key_is_refused(model):
    ids = ids_of(2, 12, seed=1)
    right = torch.ones_like(ids)
    right[1, 8:] = 0
    maps = torch.stack(eager_reference(model, ids, right).attentions)  # (L, B, H, T, S)
    with trace.record(model, "attn.sink") as rec:
        model(input_ids=ids, attention_mask=right)
    # the mean over real queries only: row 0's queries 4..11 and row 1's 4..7
    real = torch.cat([maps[:, 0, :, 4:, 0].flatten(1), maps[:, 1, :, 4:8, 0].flatten(1)], dim=1).mean(1)
    torch.testing.assert_close(rec.sink_per_layer(), real, atol=1e-5, rtol=1e-4)

    left = torch.ones_like(ids)
    left[1, :6] = 0
    with trace.record(model, "attn.sink") as rec:
        logits = model(input_ids=ids, attention_mask=left).logits
    assert logits.isfinite().all()
    with pytest.raises(ValueError, match=r"key 0 is padding in rows \[1\]"):
        rec.sink_per_layer(min_query=0)  # was NaN
    with trace.record(model, "attn.sink", sink_index=6) as rec:  # the first real token of both rows
        model(input_ids=ids, attention_mask=left)
    assert rec.sink_per_layer(min_query=6).isfinite().all()


def test_record_on_something_that_is_not_a_causal_lm(model):
    with pytest.raises(TypeError, match="got LlamaDecoderLayer"):
        with trace.record(model.model.layers[0], "attn.sink"):
            pass


# --- layers, positions, lambda, min_query --------------------------------------------------------------------

@pytest.mark.parametrize("bad", [1.7, True, -1, 3, "1"])
def test_layers_must_be_integers_in_range(model, bad):
    with pytest.raises(ValueError, match=r"layer .* out of range: this model has layers 0\.\.2"):
        with trace.record(model, "attn.sink", layers=[bad]):
            pass
    with pytest.raises(ValueError, match=r"0\.\.2"):
        measure.attention_received(model, ids_of(1, 8), layer=bad)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        structure.qk_locking(model, ids_of(2, 8), layers=[bad])
    with pytest.raises(ValueError, match=r"0\.\.2"):
        interventions.block_aggregation(model, 2, layers=[bad]).__enter__()


def test_numpy_integers_are_layers(model):
    import numpy as np

    assert models.check_layers(model, [np.int64(2), 0]) == [2, 0]


@pytest.mark.parametrize("lam", [math.inf, -math.inf, math.nan])
def test_lambda_must_be_finite(model, lam):
    with pytest.raises(ValueError, match="lambda must be a finite number"):
        interventions.check_lambda(lam)
    with pytest.raises(ValueError, match="lambda must be a finite number"):
        measure.lambda_sweep(model, ids_of(2, 10), k=3, lambdas=[2.0, lam], applied=[0], progress=False)


def test_min_query_must_lie_in_the_sequence(model):
    ids = ids_of(2, 24)
    for bad in (-3, 24, 30, 2.5):
        with pytest.raises(ValueError, match=r"min_query=.* must be an integer in 0\.\.23 for sequences of 24"):
            measure.sink_profile(model, ids, min_query=bad)
        with pytest.raises(ValueError, match=r"min_query=.* 0\.\.23"):
            structure.qk_locking(model, ids, min_query=bad)
        with pytest.raises(ValueError, match=r"min_query=.* 0\.\.23"):
            structure.wo_alignment(model, ids, layers=[0], min_query=bad)
    assert structure.qk_locking(model, ids, min_query=23).sink.isfinite().all()
    profile = measure.sink_profile(model, ids, min_query=0)
    with trace.record(model, "attn.sink") as rec:
        model(input_ids=ids)
    torch.testing.assert_close(profile.attention_to_first, rec["attn.sink"].mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="min_query=-1"):
        metrics.sink_rate(rec["attn.sink"], min_query=-1)


# --- empty batches and widgets -------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda m, ids: measure.sink_profile(m, ids),
    lambda m, ids: measure.attention_patterns(m, ids),
    lambda m, ids: measure.variance_profile(m, ids),
    lambda m, ids: measure.attention_to(m, ids, 1),
    lambda m, ids: structure.residual_profile(m, ids),
    lambda m, ids: structure.sink_logits(m, ids, [0]),
    lambda m, ids: structure.qk_locking(m, ids),
])
def test_an_empty_batch_is_named(model, call):
    with pytest.raises(ValueError, match=r"at least 1 sequence of at least 2 tokens, got \(0, 16\)"):
        call(model, ids_of(2, 16)[:0])


def test_bounded_keeps_first_and_last_and_refuses_a_limit_below_one():
    assert widgets.bounded(range(10), 1) == [0]  # was ZeroDivisionError
    assert widgets.bounded(range(10), 2) == [0, 9]
    assert widgets.bounded(range(10), 4) == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="limit must be an integer >= 1, got 0"):
        widgets.bounded(range(10), 0)


def test_layer_head_grid_covers_the_model_within_the_render_budget():
    # SmolLM2-135M: every one of its 9 heads, layers from first to last plus the sink layer, at most 64 renders
    layers, heads = widgets.layer_head_grid(30, 9, 8, 9, keep=(12,))
    assert heads == list(range(9)) and layers[0] == 0 and layers[-1] == 29 and 12 in layers
    assert len(layers) * len(heads) <= widgets.MAX_RENDERS and len(layers) >= 6
    assert widgets.layer_head_grid(6, 8, 8, 8, keep=(2,)) == (list(range(6)), list(range(8)))  # sinkbook-tiny: all
    assert widgets.layer_head_grid(30, 9, 3, 4) == ([0, 14, 29], [0, 3, 5, 8])
    layers, heads = widgets.layer_head_grid(32, 32, 8, 8, keep=(2,), keep_heads=(1,))  # Llama-2-7B, shown first
    assert 2 in layers and 1 in heads and len(heads) == 9 and len(layers) * 9 <= widgets.MAX_RENDERS
    with pytest.raises(ValueError, match="exceed MAX_RENDERS"):
        widgets.layer_head_grid(100, 64, 8, 64, keep=(1, 2))


# --- the book runner -----------------------------------------------------------------------------------------

def test_a_stalled_cell_is_interrupted_retried_once_then_named(tmp_path):
    from sinkutils import book
    from tests.test_chapters import one_chapter_root

    # the kernel ignores the interrupt and sits idle: what the hang looked like (no CPU, no message, no reply)
    stall = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(600)"
    root = one_chapter_root(tmp_path, "99_stall", ["x = 1", "print(x)", stall], {"x": 2})
    with pytest.raises(book.ChapterFailed, match=r"chapter 99_stall: cell 3 \(starting 'import signal, time'\) made no "
                                                 r"progress for 2 s .*retried once in a fresh kernel, stalled again"):
        book.execute("99_stall", "cpu", tmp_path / "out", root=root, stall_timeout=2)


def test_a_stall_that_passes_on_the_retry_completes(tmp_path, capfd):
    from sinkutils import book
    from tests.test_chapters import one_chapter_root

    marker = tmp_path / "stalled-once"
    once = (f"import pathlib, time\nif not pathlib.Path({str(marker)!r}).exists():\n"
            f"    pathlib.Path({str(marker)!r}).touch()\n    time.sleep(600)\nprint('done', x)")
    root = one_chapter_root(tmp_path, "99_once", ["x = 1", once], {"x": 2})
    book.execute("99_once", "cpu", tmp_path / "out", root=root, stall_timeout=2)
    import nbformat

    assert nbformat.read(tmp_path / "out" / "99_once.ipynb", as_version=4).cells[-1].outputs[0]["text"] == "done 2\n"
    out, err = capfd.readouterr()
    assert "cell 2 (starting 'import pathlib, time') made no progress for 2 s" in out
    assert "retrying the chapter once in a fresh kernel" in out
    assert "TCP without encryption" not in err  # the kernel runs over IPC sockets


def test_a_busy_silent_cell_is_progress_not_a_stall(tmp_path):
    from sinkutils import book
    from tests.test_chapters import one_chapter_root

    busy = "import time\nt = time.time()\nwhile time.time() - t < 6:\n    pass\nprint('busy', x)"
    root = one_chapter_root(tmp_path, "99_busy", ["x = 1", busy], {"x": 2})
    book.execute("99_busy", "cpu", tmp_path / "out", root=root, stall_timeout=2)  # CPU counts as progress
    import nbformat

    assert nbformat.read(tmp_path / "out" / "99_busy.ipynb", as_version=4).cells[-1].outputs[0]["text"] == "busy 2\n"


class _StuckChannel:
    """A shell channel whose wait without a timeout never returns (the reply's read signal was consumed), while a
    fresh poll finds the reply once it has arrived (``arrives`` seconds in)."""

    def __init__(self, arrives: float):
        import time

        self.start, self.arrives, self.polls = time.monotonic(), arrives, []

    async def get_msg(self, timeout=None):
        import asyncio
        import time
        from queue import Empty

        self.polls.append(timeout)
        assert timeout is not None, "an unbounded wait would hang here"
        ready_in = self.start + self.arrives - time.monotonic()
        if ready_in > timeout:
            await asyncio.sleep(timeout)
            raise Empty
        await asyncio.sleep(max(0.0, ready_in))
        return {"msg_type": "execute_reply"}


def test_a_reply_whose_read_signal_was_lost_is_taken_within_a_second():
    import asyncio
    import types
    from queue import Empty

    from sinkutils import book

    kc = types.SimpleNamespace(shell_channel=_StuckChannel(arrives=2.5))
    book.bounded_shell_wait(kc)
    book.bounded_shell_wait(kc)  # once per channel
    assert asyncio.run(kc.shell_channel.get_msg(timeout=None)) == {"msg_type": "execute_reply"}
    assert kc.shell_channel.polls == [book.SHELL_RECHECK] * 3  # fresh polls of at most a second each
    late = types.SimpleNamespace(shell_channel=_StuckChannel(arrives=60))
    book.bounded_shell_wait(late)
    with pytest.raises(Empty):  # a finite timeout still ends the wait when no reply comes
        asyncio.run(late.shell_channel.get_msg(timeout=1.5))
    assert late.shell_channel.polls[0] == 1.0 and late.shell_channel.polls[1] == pytest.approx(0.5, abs=0.05)


def test_output_widget_cells_do_not_wait_for_their_timeout(tmp_path):
    """widgets.switcher's cells: many Output widgets with figure-sized outputs, whose comm messages nbclient sends on
    the shell socket while it awaits the reply (benchmarks/book_hang.py --widget-race: 25 of 140 such cells waited
    for their 15 s timeout beside a busy neighbour with nbclient's own wait)."""
    import time

    from sinkutils import book
    from tests.test_chapters import one_chapter_root

    cell = ("import ipywidgets as W\nfrom IPython.display import display\nouts = []\nfor i in range(12):\n"
            "    o = W.Output()\n    with o:\n        display({'image/png': 'iVBOR' + 'A' * 80000}, raw=True)\n"
            "    outs.append(o)\nW.VBox(outs)")
    root = one_chapter_root(tmp_path, "99_widgets", ["x = 1", *[cell] * 12], {"x": 2})
    start = time.monotonic()
    book.execute("99_widgets", "cpu", tmp_path / "out", root=root, timeout=30)
    assert time.monotonic() - start < 30  # not one cell reached its timeout


def test_a_dead_kernel_names_chapter_and_cell(tmp_path):
    from sinkutils import book
    from tests.test_chapters import one_chapter_root

    root = one_chapter_root(tmp_path, "99_dies", ["x = 1", "import os\nos._exit(1)"], {"x": 2})
    with pytest.raises(book.ChapterFailed, match=r"chapter 99_dies: cell 2 \(starting 'import os'\) lost its kernel"):
        book.execute("99_dies", "cpu", tmp_path / "out", root=root)


@pytest.mark.parametrize("profile, message", [
    ({"defaults": {"seq_lne": 64}}, r"no chapter has the parameters \['seq_lne'\] under 'defaults'"),
    ({"chapters": {"01_snik": {}}}, r"unknown chapters \['01_snik'\] under 'chapters'; choose from \['01_sink'\]"),
    ({"chapters": {"01_sink": {"n_txts": 2}}}, r"chapter 01_sink has no parameters \['n_txts'\]; its parameters are "
                                               r"\['n_texts', 'seq_len'\]"),
    ("defaults: {seq_len: 64\n", r"cpu.yml is not valid YAML: while parsing a flow mapping"),
    ({"default": {}}, r"expected a mapping with the keys 'defaults' and 'chapters', got \['default'\]"),
])
def test_profile_mistakes_are_refused_not_dropped(tmp_path, profile, message):
    import json

    from sinkutils import project
    from tests.test_chapters import one_chapter_root

    root = one_chapter_root(tmp_path, "01_sink", ["n_texts = 1\nseq_len = 8", "print(n_texts)"], {})
    (root / "profiles" / "cpu.yml").write_text(profile if isinstance(profile, str) else json.dumps(profile))
    with pytest.raises(ValueError, match=message):
        project.parameters("cpu", "01_sink", root)


def run_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_book_cli_refuses_an_unknown_param_in_one_line():
    done = run_cli("-m", "sinkutils.book", "--only", "01_sink", "--no-html", "--no-assignments", "--param", "seq_lne=3")
    assert done.returncode != 0
    assert done.stderr.strip().startswith("--param ['seq_lne']: no chapter has such a parameter")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


# --- training CLI --------------------------------------------------------------------------------------------

from tests.test_train import data_dir, tiny_cfg  # noqa: E402,F401  (the module's prepared token streams)


def train_cli(*args: str) -> str:
    """What ``python -m sinkutils.train`` exits with (its one line on stderr)."""
    from sinkutils import train

    with pytest.raises(SystemExit) as done:
        train.main(list(args))
    assert isinstance(done.value.code, str) and "\n" not in done.value.code
    return done.value.code


def test_train_cli_refuses_an_infinite_lr_in_one_line(tmp_path):
    done = run_cli("-m", "sinkutils.train", "run", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"),
                   "--lr", "inf")
    assert done.returncode == 1 and done.stderr == "error: lr must be a finite number, got inf\n"
    assert not (tmp_path / "o").exists()


def test_train_cli_mistakes_are_one_line_errors(data_dir, tmp_path):  # noqa: F811
    base = ["run", "--data-dir", data_dir, "--out-dir", str(tmp_path / "o"), "--n-layer", "1", "--d-model", "16",
            "--n-head", "2", "--n-kv-head", "2", "--d-ff", "32", "--batch-size", "2", "--steps", "4", "--device", "cpu"]
    assert train_cli(*base, "--stop-after", "-2") == "error: stop_after must be a positive step, got -2"
    assert train_cli(*base, "--grad-clip", "nan") == "error: grad_clip must be a finite number, got nan"
    assert train_cli(*base, "--seq-len", "100000").startswith("error: seq_len=100000 does not fit the train stream of ")
    missing = tmp_path / "nowhere"
    assert train_cli(*base[:1], "--data-dir", str(missing), *base[3:]) == (
        f"error: {missing} has no tokenizer or tokens.safetensors: prepare it first with "
        f"`python -m sinkutils.train prepare --data-dir {missing}`")
    assert not (tmp_path / "o").exists()  # nothing was trained


def test_a_corrupt_state_json_is_named(data_dir, tmp_path):  # noqa: F811
    from sinkutils import train

    train.train(tiny_cfg(data_dir, tmp_path / "o", steps=2, eval_every=2))
    state = tmp_path / "o" / "checkpoint" / "state.json"
    state.write_text(state.read_text()[:40])
    with pytest.raises(ValueError, match=rf"{state} is corrupt \(.*\); move .* away"):
        train.train(tiny_cfg(data_dir, tmp_path / "o", steps=4, eval_every=2))
    assert train_cli("ship", "--out-dir", str(tmp_path / "o"), "--name", "x").startswith(f"error: {state} is corrupt")


# --- models.load ---------------------------------------------------------------------------------------------

def embedded_copy(tmp_path, name="sinkbook-tiny"):
    import shutil

    dest = tmp_path / name
    shutil.copytree(models.CHECKPOINTS / name, dest)
    return dest


def test_every_embedded_model_records_and_passes_its_checksums():
    for name, folder in models.EMBEDDED.items():
        recorded = (models.CHECKPOINTS / folder / models.CHECKSUMS).read_text()
        assert "model.safetensors" in recorded and "config.json" in recorded, name
        models.verify_checksums(models.CHECKPOINTS / folder)


def test_corrupt_tensor_bytes_are_refused_naming_the_file(tmp_path, monkeypatch):
    folder = embedded_copy(tmp_path)
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-4000:-3996] = b"\xff\xff\xff\x7f"  # a NaN inside a tensor: the header still parses
    weights.write_bytes(bytes(raw))
    monkeypatch.setattr(models, "CHECKPOINTS", tmp_path)
    with pytest.raises(models.ModelNotAvailable, match=rf"{weights} is missing or corrupt: its SHA-256 differs"):
        models.load("sinkbook-tiny", device="cpu")
    with pytest.raises(models.ModelNotAvailable, match=rf"{weights} is missing or corrupt"):
        models.load(folder, device="cpu")  # a folder that records its checksums is checked too


def test_a_truncated_safetensors_file_is_named(tmp_path):
    folder = embedded_copy(tmp_path)
    (folder / models.CHECKSUMS).unlink()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(models.ModelNotAvailable, match=rf"{weights} is not a readable safetensors file"):
        models.load(folder, device="cpu")


@pytest.mark.parametrize("name, message", [
    ("", "empty model name; embedded defaults are"),
    ("./no/such/folder", r"no folder at no/such/folder; embedded defaults are"),
    ("/no/such/folder", r"no folder at /no/such/folder"),
])
def test_names_that_cannot_be_models_say_so(name, message):
    with pytest.raises(models.ModelNotAvailable, match=message):
        models.load(name, device="cpu")


def test_an_empty_folder_is_not_a_model(tmp_path):
    with pytest.raises(models.ModelNotAvailable, match=rf"{tmp_path} is not a model folder: it has no config.json"):
        models.load(tmp_path, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_sentence():
    with pytest.raises(ValueError, match=r"device 'cuda' asked for, but this torch .* sees no CUDA GPU; use "
                                         r"device='cpu'"):
        models.load("sinkbook-tiny", device="cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        models.load("sinkbook-tiny", device="gpu")
