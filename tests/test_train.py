"""train: a killed and resumed run ends bit-identical to an uninterrupted one; resuming another run's folder
is refused without touching it; bad configs fail in validate(); the schedule has its shape; every variant
learns; train() is exactly the plain loop; torchrun with 2 processes follows the single-process run."""
import dataclasses
import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sinkutils import data, train, variants

VARIANTS = sorted(variants.VARIANTS)


def _texts(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    nouns = "cat dog model layer token head query key value sink norm weight".split()
    verbs = "sees moves attends normalises scales keeps drops finds".split()
    adjs = "small large first last quiet sparse dense causal".split()
    return [" ".join(f"the {r.choice(adjs)} {r.choice(nouns)} {r.choice(verbs)} the {r.choice(nouns)}."
                     for _ in range(r.randint(2, 5))) for _ in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """A tokenizer and token streams laid out as ``prepare`` writes them, from a few hundred short texts."""
    out = tmp_path_factory.mktemp("data")
    tokenizer = train.build_tokenizer(_texts(300, 0), vocab_size=160)
    tokenizer.save_pretrained(out / "tokenizer")
    save_file({"train": train._stream(tokenizer, _texts(300, 0)), "val": train._stream(tokenizer, _texts(60, 1))},
              out / "tokens.safetensors")
    (out / "corpus.json").write_text(json.dumps({"train": "generated sentences", "val": "generated sentences",
                                                 "train_docs": 300, "environment": "tests"}))
    return str(out)


def tiny_cfg(data_dir: str, out_dir, **overrides) -> train.TrainConfig:
    base = dict(n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64, seq_len=32, batch_size=4, steps=8,
                lr=1e-2, warmup=2, eval_every=3, eval_batches=1, ckpt_every=100, threads=1, device="cpu")
    return train.TrainConfig(data_dir=data_dir, out_dir=str(out_dir), **(base | overrides))


def weights(out_dir) -> dict:
    return load_file(Path(out_dir) / "checkpoint" / "model.safetensors")


def without_time(log: list) -> list:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in log]


@pytest.mark.parametrize("variant", ["baseline", "gated"])
def test_resumed_run_equals_uninterrupted_run(data_dir, tmp_path, variant):
    whole = train.train(tiny_cfg(data_dir, tmp_path / "whole", variant=variant))
    cfg = tiny_cfg(data_dir, tmp_path / "split", variant=variant)
    train.train(cfg, stop_after=5)  # the "kill": a checkpoint at step 5, between two evaluations
    assert json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())["step"] == 5
    assert not (tmp_path / "split" / "model").exists()
    resumed = train.train(cfg)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(variants.SUBMODULES.get(variant, "-") in k for k in a) == (variant in variants.SUBMODULES)
    assert without_time(whole["log"]) == without_time(resumed["log"])
    assert [e["step"] for e in resumed["log"]] == [3, 6, 8]


def test_crash_between_checkpoint_swaps_resumes_from_the_old_one(data_dir, tmp_path):
    train.train(tiny_cfg(data_dir, tmp_path / "whole"))
    cfg = tiny_cfg(data_dir, tmp_path / "split")
    train.train(cfg, stop_after=5)
    (tmp_path / "split" / "checkpoint").rename(tmp_path / "split" / "checkpoint.old")  # killed mid-swap
    train.train(cfg)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "split" / "checkpoint.old").exists()


def test_resume_into_another_runs_folder_is_refused(data_dir, tmp_path):
    train.train(tiny_cfg(data_dir, tmp_path, steps=4), stop_after=2)
    ckpt = tmp_path / "checkpoint"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.iterdir()}
    with pytest.raises(ValueError, match=r"different run.*'lr': \(0.01, 0.02\)"):
        train.train(tiny_cfg(data_dir, tmp_path, steps=4, lr=2e-2))
    with pytest.raises(ValueError, match="variant"):
        train.train(tiny_cfg(data_dir, tmp_path, steps=4, variant="sigmoid"))
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.iterdir()}
    # what may change between resumes (evaluation cadence, threads) does not block it
    assert train.train(tiny_cfg(data_dir, tmp_path, steps=4, eval_every=2, threads=0))["log"][-1]["step"] == 4


def test_data_folder_may_move_but_not_change(data_dir, tmp_path):
    import shutil

    train.train(tiny_cfg(data_dir, tmp_path / "run", steps=4), stop_after=2)
    moved = shutil.copytree(data_dir, tmp_path / "moved")  # same tokens, another place: resumes
    assert train.train(tiny_cfg(str(moved), tmp_path / "run", steps=4))["log"][-1]["step"] == 4
    other = shutil.copytree(data_dir, tmp_path / "other")
    streams = load_file(other / "tokens.safetensors")
    save_file({"train": streams["train"].flip(0).contiguous(), "val": streams["val"]}, other / "tokens.safetensors")
    train.train(tiny_cfg(data_dir, tmp_path / "run2", steps=4), stop_after=2)
    with pytest.raises(ValueError, match="other token streams"):
        train.train(tiny_cfg(str(other), tmp_path / "run2", steps=4))


@pytest.mark.parametrize("field, value, message", [
    ("variant", "softmax1", "choose one of .*headwise_rmsnorm"),
    ("n_head", 3, "n_head=3 must divide d_model=32"),
    ("n_kv_head", 3, "n_kv_head=3 must divide n_head=4"),
    ("lr", -1e-3, "lr must be positive"),
    ("eval_every", 0, "eval_every must be positive"),
    ("synthetic_frac", 1.5, r"\[0, 1\]"),
    ("device", "tpu9", "'auto', 'cpu', 'cuda'"),
])
def test_bad_config_fails_in_validate(field, value, message):
    cfg = dataclasses.replace(tiny_cfg("unused", "unused"), **{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()
    with pytest.raises(ValueError, match=message):  # before touching the (missing) data dir
        train.train(cfg)


def test_lr_schedule_warmup_then_cosine():
    cfg = train.TrainConfig(data_dir="d", out_dir="o", lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 35: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
                60: 0.55, 110: 0.1}
    for step, lr in expected.items():
        assert train.lr_at(cfg, step) == pytest.approx(lr, abs=1e-12), step
    after = [train.lr_at(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_learns(data_dir, tmp_path, variant):
    log = train.train(tiny_cfg(data_dir, tmp_path, variant=variant, steps=12, eval_every=4))["log"]
    val = [e["val_loss"] for e in log]
    assert val == sorted(val, reverse=True) and val[-1] < val[0] - 0.5, val
    assert log[-1]["train_loss"] < math.log(160) - 1
    assert len(log[-1]["sink_per_layer"]) == 2
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_train_is_exactly_the_plain_loop(data_dir, tmp_path):
    """The single-process path (no DDP wrapper, full batch) against the loop written out by hand."""
    from transformers import AutoTokenizer

    cfg = tiny_cfg(data_dir, tmp_path, variant="headwise_rmsnorm", steps=5)
    train.train(cfg)
    tok = AutoTokenizer.from_pretrained(Path(data_dir) / "tokenizer")
    stream = load_file(Path(data_dir) / "tokens.safetensors")["train"]
    model = train.make_model(cfg, len(tok))
    opt = train.make_optimizer(model, cfg)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = train.lr_at(cfg, step)
        ids = train.batch(stream, cfg, step, tok.bos_token_id, len(tok))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    saved = weights(tmp_path)
    for name, p in model.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], p), name
    gains = [g for g in opt.param_groups if g["weight_decay"] == 0.0][0]["params"]
    assert any(p.shape == (4, 8) for p in gains)  # the head-wise gain is not weight-decayed


def test_cli_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["run", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--variant" in text and "--out-dir" in text and "sigmoid" in text


def test_cli_stop_after_then_ship_writes_the_command_that_regenerates_it(data_dir, tmp_path):
    flags = ["--n-layer", "1", "--d-model", "32", "--n-head", "4", "--n-kv-head", "4", "--d-ff", "64", "--seq-len", "32",
             "--batch-size", "4", "--steps", "8", "--warmup", "2", "--eval-every", "2", "--eval-batches", "1",
             "--threads", "1", "--device", "cpu"]
    train.main(["run", "--data-dir", data_dir, "--out-dir", str(tmp_path / "run"), *flags, "--stop-after", "4"])
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and [r["step"] for r in state["log"]] == [2, 4]
    dest = train.ship(str(tmp_path / "run"), "cli-model", dest_root=tmp_path / "shipped")
    card = (dest / "MODEL_CARD.md").read_text()
    assert "--steps 8" in card and "--stop-after 4" in card and "4 steps of 4 x 32 tokens" in card


def test_the_regenerate_command_reproduces_every_field_that_decides_the_weights(data_dir, tmp_path, monkeypatch):
    """The model card's ``run`` line, read by the CLI, gives the shipped run's ``run_fields`` and stopping step:
    what it leaves out (``MACHINE_FIELDS``, which ``run_fields`` also frees) is all that may differ."""
    import shlex

    flags = ["--variant", "sigmoid", "--n-layer", "1", "--d-model", "32", "--n-head", "4", "--n-kv-head", "2",
             "--d-ff", "64", "--seq-len", "32", "--batch-size", "4", "--steps", "6", "--warmup", "1", "--lr", "0.01",
             "--weight-decay", "0.5", "--eval-every", "2", "--eval-batches", "1", "--threads", "1", "--device", "cpu"]
    train.main(["run", "--data-dir", data_dir, "--out-dir", str(tmp_path / "run"), *flags, "--stop-after", "2"])
    dest = train.ship(str(tmp_path / "run"), "card-model", dest_root=tmp_path / "shipped")
    card = (dest / "MODEL_CARD.md").read_text().splitlines()
    line = next(line for line in card if line.startswith("python -m sinkutils.train run "))
    argv = [{"DATA": data_dir, "RUN": str(tmp_path / "again")}.get(a, a) for a in shlex.split(line)[3:]]
    seen = []
    monkeypatch.setattr(train, "train", lambda cfg, stop_after=None: seen.append((cfg, stop_after)))
    train.main(argv)
    shipped = train.TrainConfig(**json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["config"])
    [(cfg, stop_after)] = seen
    assert cfg.run_fields() == shipped.run_fields() and stop_after == 2
    differ = {k for k, v in dataclasses.asdict(cfg).items() if v != getattr(shipped, k)}
    assert differ == {"out_dir", "threads", "device"} and differ <= set(train.MACHINE_FIELDS)


def test_untied_run_resumes_ships_and_loads_with_its_own_lm_head(data_dir, tmp_path):
    from sinkutils import models

    flags = ["--n-layer", "1", "--d-model", "32", "--n-head", "4", "--n-kv-head", "4", "--d-ff", "64", "--seq-len", "32",
             "--batch-size", "4", "--steps", "6", "--warmup", "2", "--eval-every", "3", "--eval-batches", "1",
             "--threads", "1", "--device", "cpu", "--tie-embeddings", "false"]
    train.main(["run", "--data-dir", data_dir, "--out-dir", str(tmp_path / "whole"), *flags])
    train.main(["run", "--data-dir", data_dir, "--out-dir", str(tmp_path / "split"), *flags, "--stop-after", "3"])
    train.main(["run", "--data-dir", data_dir, "--out-dir", str(tmp_path / "split"), *flags])
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert "lm_head.weight" in a and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], a["model.embed_tokens.weight"])
    dest = train.ship(str(tmp_path / "whole"), "untied", dest_root=tmp_path / "shipped")
    assert "untied embeddings" in (dest / "MODEL_CARD.md").read_text()
    assert "--tie-embeddings False" in (dest / "MODEL_CARD.md").read_text()
    model, _ = models.load(str(dest), device="cpu")
    assert torch.equal(model.lm_head.weight.detach(), a["lm_head.weight"])
    save_file({k: v for k, v in a.items() if k != "lm_head.weight"}, tmp_path / "whole" / "checkpoint" / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*lm_head"):  # an untied model without its lm_head is refused
        train.ship(str(tmp_path / "whole"), "broken", dest_root=tmp_path / "shipped")
    with pytest.raises(SystemExit):
        train.main(["run", "--data-dir", data_dir, "--out-dir", str(tmp_path / "x"), "--tie-embeddings", "maybe"])


# Run by torchrun in place of ``-m sinkutils.train``: the real CLI, with train_step and _save wrapped to log, per rank,
# the rows each step trained on and every checkpoint written, and to SIGKILL a rank once before a chosen step.
SPY = """
import json, os, signal, sys
from pathlib import Path
from sinkutils import train

rank, folder = int(os.environ["RANK"]), Path(os.environ["SPY_DIR"])
kills = dict(k.split(":") for k in os.environ.get("SPY_KILL", "").split(",") if k)  # rank -> step

def note(**entry):
    with (folder / f"rank{rank}.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\\n")

def train_step(model, opt, cfg, ids, step, real=train.train_step):
    marker = folder / f"killed-{rank}"
    if kills.get(str(rank)) == str(step) and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    note(step=step, rows=ids.tolist())
    return real(model, opt, cfg, ids, step)

def save(model, opt, cfg, step, *args, real=train._save):
    note(saved=step)
    return real(model, opt, cfg, step, *args)

train.train_step, train._save = train_step, save
train.main(sys.argv[1:])
"""


def test_torchrun_two_processes_follow_the_single_process_run_through_kills(data_dir, tmp_path):
    """2 CPU processes (gloo), each half of every batch: the single-process trajectory up to float summation order,
    also when a rank is killed and the same command is run again: rank 1 is killed before step 3, and in the rerun
    rank 0 before step 5; each rerun resumes from the last checkpoint. Every checkpoint is written by rank 0 alone,
    and the two ranks' rows of each step are the two halves of the one-process batch."""
    from transformers import AutoTokenizer

    args = dict(variant="gated", steps=8, eval_every=4, ckpt_every=2)
    single = train.train(tiny_cfg(data_dir, tmp_path / "one", **args))
    cfg = tiny_cfg(data_dir, tmp_path / "two", **args)
    (tmp_path / "spy.py").write_text(SPY)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env |= {"SPY_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    stdout = ""
    for kill, ok in (("1:3", False), ("0:5", False), ("", True)):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              str(tmp_path / "spy.py"), "run", *train.cli_flags(cfg)], capture_output=True, text=True,
                             timeout=120, env=env | {"SPY_KILL": kill}, cwd=Path(__file__).parents[1])
        assert (run.returncode == 0) == ok, (kill, run.stderr[-3000:])
        stdout += run.stdout
    assert (tmp_path / "killed-0").exists() and (tmp_path / "killed-1").exists()
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    log = json.loads((tmp_path / "two" / "checkpoint" / "state.json").read_text())["log"]
    assert [e["step"] for e in log] == [e["step"] for e in single["log"]] == [4, 8]
    for x, y in zip(single["log"], log):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-5)
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-5)
    assert stdout.count("step 4: val") == 1 and stdout.count("step 8: val") == 1  # only rank 0 reports
    entries = {r: [json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    # three runs: from step 0 (rank 1 killed before step 3), resumed at 2 (rank 0 killed before 5), resumed at 4 to
    # the end; the rank not killed may have begun the step the other died before. Checkpoints: by rank 0 only.
    for r in (0, 1):
        steps = [e["step"] for e in entries[r] if "step" in e]
        assert [s for prev, s in zip(steps, steps[1:]) if s <= prev] == [2, 4] and steps[-1] == 7, (r, steps)
    assert [e["saved"] for e in entries[0] if "saved" in e] == [2, 4, 6, 8]
    assert not [e for e in entries[1] if "saved" in e]
    assert not (tmp_path / "two" / "checkpoint.tmp").exists()
    tokenizer = AutoTokenizer.from_pretrained(Path(data_dir) / "tokenizer")
    stream = load_file(Path(data_dir) / "tokens.safetensors")["train"]
    half = cfg.batch_size // 2
    for step in range(cfg.steps):
        whole = train.batch(stream, cfg, step, tokenizer.bos_token_id, len(tokenizer)).tolist()
        shards = {r: [e["rows"] for e in entries[r] if e.get("step") == step] for r in (0, 1)}
        for r in (0, 1):  # every attempt that ran the step gave each rank its own half, nothing else
            assert shards[r] and all(rows == whole[r * half:(r + 1) * half] for rows in shards[r]), (step, r)


def test_run_distributed_starts_torchrun_and_stops_where_asked(data_dir, tmp_path, monkeypatch):
    """``train.run_distributed`` (chapter 6's ``retrain_processes``): torchrun with every field as a flag and
    ``--stop-after``, the one-process run's weights; a failed torchrun raises, naming the run."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = tiny_cfg(data_dir, tmp_path / "one", steps=6, eval_every=3)
    two = dataclasses.replace(one, out_dir=str(tmp_path / "two"))
    train.train(one, stop_after=4)
    train.run_distributed(two, 2, stop_after=4)
    assert json.loads((tmp_path / "two" / "checkpoint" / "state.json").read_text())["step"] == 4
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(subprocess, "run", lambda cmd, env: subprocess.CompletedProcess(cmd, 1))  # a rank failed
    with pytest.raises(RuntimeError, match="torchrun on 2 processes failed.*two"):
        train.run_distributed(two, 2)


def test_document_bos_opens_every_document_and_keeps_the_stream():
    """"documents": BOS before the first document and after every EOS but a final one; nothing else moves."""
    stream = torch.tensor([5, 6, 2, 7, 8, 9, 2, 10, 2], dtype=torch.int32)
    out = train.with_document_bos(stream, bos_id=1, eos_id=2)
    assert out.tolist() == [1, 5, 6, 2, 1, 7, 8, 9, 2, 1, 10, 2]
    assert torch.equal(out[out != 1], stream)


@pytest.mark.parametrize("bos", train.BOS_MODES)
def test_rows_follow_the_bos_mode(bos):
    """"always" puts BOS at position 0 and nowhere else; "never" and "documents" are plain windows of the
    stream they are given, so position 0 is whatever token the offset lands on."""
    stream = torch.arange(4, 404, dtype=torch.int32)  # no special token anywhere
    cfg = train.TrainConfig(data_dir="-", out_dir="-", seq_len=16, batch_size=8, bos=bos)
    rows = train.batch(stream, cfg, step=3, bos_id=1, vocab_size=404)
    assert rows.shape == (8, 16)
    if bos == "always":
        assert (rows[:, 0] == 1).all() and (rows[:, 1:] != 1).all()
        assert (rows[:, 2:] - rows[:, 1:-1] == 1).all()
    else:
        assert (rows != 1).all() and (rows[:, 1:] - rows[:, :-1] == 1).all()
        assert len(set(rows[:, 0].tolist())) > 1  # position 0 is an ordinary, varying token


@pytest.mark.parametrize("task", ["random", "bigram_backcopy"])
def test_synthetic_rows_replace_the_first_share_of_each_batch(task):
    """synthetic_frac 0.25 of 8 rows: the first 2 rows are the task's sequences (uniform ids >= 4, or Bigram-Backcopy
    over ids 4 .. 4 + synthetic_vocab), drawn from (seed, step); the other 6 are the text windows of a batch without
    them; BOS still opens every row."""
    stream = torch.arange(4, 404, dtype=torch.int32)
    cfg = train.TrainConfig(data_dir="-", out_dir="-", seq_len=16, batch_size=8, synthetic_frac=0.25,
                            synthetic_task=task, synthetic_vocab=20)
    rows = train.batch(stream, cfg, step=3, bos_id=1, vocab_size=404)
    text = train.batch(stream, dataclasses.replace(cfg, synthetic_frac=0.0), step=3, bos_id=1, vocab_size=404)
    assert (rows[:, 0] == 1).all() and torch.equal(rows[2:], text[2:]) and not torch.equal(rows[:2], text[:2])
    synthetic = rows[:2, 1:]
    if task == "random":
        assert torch.equal(synthetic, data.random_token_batch(404, 2, 15, bos_id=None, seed=3))
    else:
        assert torch.equal(synthetic, data.bigram_backcopy(2, 15, 24, seed=3))
        assert ((synthetic >= 4) & (synthetic < 24)).all()


def test_bigram_backcopy_follows_its_two_rules():
    """Guo et al.'s task, checked token by token: after a trigger the token before the trigger comes back;
    elsewhere the next token is one of the previous token's `branching` successors (a table fixed across seeds)."""
    seqs = torch.cat([data.bigram_backcopy(16, 64, 40, seed=s, n_triggers=4, branching=3) for s in (1, 2)])
    followers: dict[int, set] = {}
    triggers = set()
    for row in seqs.tolist():
        for t in range(2, len(row)):
            followers.setdefault(row[t - 1], set()).add(row[t])
    for tok, nxt in followers.items():  # a trigger's followers are whatever preceded it: many; others at most 3
        if len(nxt) > 3:
            triggers.add(tok)
    assert 1 <= len(triggers) <= 4
    for row in seqs.tolist():
        for t in range(2, len(row)):
            if row[t - 1] in triggers:
                assert row[t] == row[t - 2]
    assert all(len(nxt) <= 3 for tok, nxt in followers.items() if tok not in triggers)


def test_unknown_bos_mode_is_refused():
    with pytest.raises(ValueError, match="unknown bos 'sometimes'; choose one of"):
        train.TrainConfig(data_dir="-", out_dir="-", bos="sometimes").validate()


def test_compiled_run_follows_the_eager_run(data_dir, tmp_path):
    """--compile (torch.compile, attention on SDPA's math path) trains the same model: after 4 steps every
    weight agrees with the eager run's to float tolerance, and a compiled run resumes an eager checkpoint."""
    eager = tiny_cfg(data_dir, tmp_path / "eager", steps=4, bos="never")
    train.train(eager)
    fast = dataclasses.replace(eager, out_dir=str(tmp_path / "compiled"), compile=True)
    train.train(fast, stop_after=2)
    train.train(dataclasses.replace(fast, compile=False), stop_after=3)  # compile is free across resumes
    train.train(fast)
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
