"""pyproject promises transformers >=4.48,<6; this holds it to that promise.

requirements.txt pins the newest release, which the rest of the suite runs on. Here the oldest release pyproject
admits and one in between (``compat.OTHER_TESTED_RELEASES``) are installed beside it (pip --target, put first on
PYTHONPATH of a subprocess) and must pass the unit tests of trace, models, variants and interventions, and load
every embedded model and measure the very numbers the pin measures (one script, MEASURE, run on each): a Colab
runtime that keeps its own 4.x transformers gets the same book.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from sinkutils import compat, models

ROOT = Path(__file__).resolve().parents[1]
UNIT_TESTS = ["tests/test_trace.py", "tests/test_models.py", "tests/test_variants.py", "tests/test_interventions.py"]

# Run in the subprocess and here: each embedded model's token ids and sink profile on the same held-out rows.
MEASURE = """
import json, sys, transformers
from sinkutils import data, measure, models
out = {"transformers": transformers.__version__}
for name in sorted(models.EMBEDDED):
    model, tok = models.load(name)
    ids = data.token_batch(tok, data.python_docs(), n=4, length=64, seed=3)
    prof = measure.sink_profile(model, ids)
    out[name] = {"ids": ids.tolist(), "tokenizer": type(tok).__name__,
                 "attention_to_first": prof.attention_to_first.tolist(), "first_norm": prof.first_norm.tolist()}
print("MEASURED " + json.dumps(out))
"""


def _pyproject_range() -> SpecifierSet:
    text = (ROOT / "pyproject.toml").read_text()
    return SpecifierSet(re.search(r'"transformers([^"]+)"', text).group(1))


@pytest.fixture(scope="module", params=sorted(compat.OTHER_TESTED_RELEASES, key=Version))
def release(request) -> tuple[str, dict]:
    """(version, env) with that transformers release first on PYTHONPATH; installed once per environment."""
    version = request.param
    target = Path(sys.prefix) / "sinkbook-transformers" / version
    if not (target / "transformers" / "__init__.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(target), f"transformers=={version}",
                        *compat.OTHER_TESTED_RELEASES[version]], check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    return version, env


def test_the_tested_releases_are_the_range_pyproject_promises():
    """The oldest tested release is the range's lower bound, every one lies in the range, and the pin too."""
    admitted = _pyproject_range()
    pinned = re.search(r"^transformers==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    releases = sorted(compat.OTHER_TESTED_RELEASES, key=Version)
    assert all(v in admitted for v in [*releases, pinned])
    lower = next(s.version for s in admitted if s.operator == ">=")
    assert Version(releases[0]).release[:2] == Version(lower).release[:2]
    assert Version(releases[-1]) < Version(pinned)


def test_shipped_checkpoints_are_written_for_every_version():
    """What 4.x reads: the tokenizer class both versions know and RoPE's theta at the top level (5.x reads
    rope_parameters); make_portable keeps 5.x's values."""
    for name in models.EMBEDDED:
        folder = models.CHECKPOINTS / models.EMBEDDED[name]
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        cfg = json.loads((folder / "config.json").read_text())
        assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in tok
        assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]


def test_make_portable_rewrites_what_save_pretrained_writes(tmp_path):
    """A model and tokenizer saved by this transformers, then made portable: the keys 4.x needs, the values
    kept, and the folder loads here with the same logits; a RoPE type without a 4.x form is refused."""
    model, tok = models.load(models.DEFAULT)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    compat.make_portable(tmp_path)
    models.write_checksums(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    again, tok2 = models.load(tmp_path)
    ids = models.encode(tok, model, "Return the sum of a and b.")
    assert torch.equal(ids, models.encode(tok2, again, "Return the sum of a and b."))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'linear' has no 4.x form"):
        compat.make_portable(tmp_path)


def test_unit_tests_pass_on_every_supported_release(release):
    version, env = release
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *UNIT_TESTS],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"transformers {version}:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"


def _measure(env: dict) -> dict:
    run = subprocess.run([sys.executable, "-c", MEASURE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.split("MEASURED ", 1)[1])


@pytest.fixture(scope="module")
def pinned() -> dict:
    """MEASURE on the pinned transformers, once for every release compared with it."""
    return _measure(dict(os.environ, PYTHONPATH=str(ROOT)))


def test_embedded_models_measure_the_same_on_every_supported_release(release, pinned):
    """Same token ids, same attention to token 0 and token-0 norm per layer (to float rounding) as on the pin."""
    version, env = release
    theirs = _measure(env)
    assert theirs["transformers"] == version and pinned["transformers"] != version
    for name in models.EMBEDDED:
        assert theirs[name]["ids"] == pinned[name]["ids"], name
        for key, atol in (("attention_to_first", 1e-6), ("first_norm", 1e-5)):
            torch.testing.assert_close(torch.tensor(theirs[name][key]), torch.tensor(pinned[name][key]),
                                       rtol=1e-5, atol=atol)


def test_default_rope_theta_reads_both_layouts():
    """5.x's rope_parameters, 4.x's rope_theta/rope_scaling: the same base; other kinds of RoPE refused."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    assert compat.default_rope_theta(LlamaConfig(rope_theta=500000.0)) == 500000.0
    assert compat.default_rope_theta(SimpleNamespace(rope_theta=10000.0, rope_scaling=None)) == 10000.0
    plain = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 3.0})
    assert compat.default_rope_theta(plain) == 3.0
    with pytest.raises(ValueError, match="'llama3'"):
        compat.default_rope_theta(SimpleNamespace(rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
