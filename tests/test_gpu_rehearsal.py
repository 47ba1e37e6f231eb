"""The gpu profile rehearsed end to end on CPU, as a newcomer runs it: ``PROFILE=gpu bash run.sh book``.

Stand-ins (``sinkutils.standins``) are written into a fresh Hugging Face cache exactly as the hub leaves it: tiny
random-init models saved with ``save_pretrained`` under the real repo ids of the profile (Llama-2-7B, Llama-3-8B
with grouped-query attention) and of the other supported families (Mistral-7B with its sliding window, Qwen2-7B with
q/k/v biases and no BOS), and WikiText-2's parquet file under its dataset repo. The hub itself is unreachable (its
endpoint is a closed local port), so the run must fall back to the cache on its own. Every chapter then executes
with the profile's own parameters, shrunk only in size (sequence length, sample count, the retrained models' size;
chapter 6 trains on the CPU since there is no GPU). The executed notebooks must show the profile's models and
WikiText-2, not a fallback.

Also here: the preflight (a gated model without a token or without access, a missing cache) stops the book before
any chapter with one message that says how to log in and where to accept the licence.
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import pytest
import yaml

from sinkutils import models, project, standins

ROOT = project.ROOT
#: sizes only: the profile's lengths and counts shrunk so that six chapters run in minutes on two CPU cores
SHRINK = {"seq_len": 64, "n_texts": 2, "compare_len": 64, "retrain_vocab": 300}
RETRAIN_SHRINK = {"n_layer": 2, "d_model": 64, "n_head": 2, "n_kv_head": 2, "d_ff": 128, "seq_len": 64,
                  "batch_size": 4, "steps": 4, "stop_after": 4, "warmup": 1, "eval_every": 2, "ckpt_every": 2,
                  "device": "cpu"}  # no GPU here: the one setting that is not a size
IGNORE = shutil.ignore_patterns(".git", ".venv", "_build", "training", "artifacts", "__pycache__", ".pytest_cache",
                                "*.egg-info")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def installed_env_is_current() -> bool:
    """run.sh's stamp says .venv holds requirements-gpu.txt's pins (else run.sh would pip-install from the copy)."""
    stamp = Path(sys.prefix) / ".sinkbook-installed"
    if not stamp.exists():
        return False
    want = subprocess.run(["bash", "-c", "source run.sh && install_key requirements-gpu.txt"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    return want in stamp.read_text().splitlines()


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    standins.build(home)
    return home


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the working tree: the book writes _build/ there, not into the developer's checkout."""
    if not installed_env_is_current():
        pytest.fail("the environment is not what run.sh would install (no current .venv/.sinkbook-installed): "
                    "run `bash run.sh test`, which installs it and then runs the tests")
    dest = tmp_path_factory.mktemp("checkout") / "sinkbook"
    shutil.copytree(ROOT, dest, ignore=IGNORE, symlinks=True)
    return dest


def run_book(checkout: Path, hf_home: Path, args: list[str], timeout: int = 1500) -> subprocess.CompletedProcess:
    """``PROFILE=gpu bash run.sh book ARGS`` with the hub unreachable and no offline switch set by us."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE")}
    env |= {"PROFILE": "gpu", "HF_HOME": str(hf_home), "VENV": sys.prefix,
            "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    params = [f"--param={k}={json.dumps(v)}" for k, v in SHRINK.items()]
    return subprocess.run(["bash", "run.sh", "book", "--no-html", "--no-assignments", *params, *args],
                          cwd=checkout, env=env, capture_output=True, text=True, timeout=timeout)


def executed(checkout: Path, chapter: str) -> tuple[dict, str]:
    """(the parameters papermill injected, all text the chapter printed or displayed: its tables and callouts
    are markdown)."""
    nb = nbformat.read(checkout / "_build" / "stage" / "chapters" / f"{chapter}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{chapter}: {errors[0]['ename']}: {errors[0]['evalue']}"
    injected = next(c for c in code if "injected-parameters" in c.metadata.get("tags", []))
    params = {}
    for line in injected.source.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            params[name] = eval(value)  # papermill writes Python literals
    shown = ("text/markdown", "text/plain")  # a displayed table's text/plain is only its repr
    text = "".join(o.get("text", "") + "".join(next((o["data"][m] for m in shown if m in o.get("data", {})), ""))
                   for c in code for o in c.get("outputs", []))
    return params, text


def test_gpu_profile_runs_every_chapter_offline_from_the_hub_cache(checkout, hf_home):
    profile = project.parameters("gpu", "06_headwise")
    retrain = profile["retrain_overrides"] | RETRAIN_SHRINK
    done = run_book(checkout, hf_home, [f"--param=retrain_overrides={json.dumps(retrain)}",
                                        f"--param=retrain_dir={json.dumps(str(hf_home.parent / 'retrain'))}"])
    assert done.returncode == 0, f"run.sh book failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert "is not reachable: using the cache at " + str(hf_home / "hub") in done.stdout
    for chapter in project.chapters():
        params, text = executed(checkout, chapter)
        gpu = project.parameters("gpu", chapter)
        assert params["model_name"] == gpu["model_name"] == "llama-2-7b"
        assert params["text_source"] == gpu["text_source"] == "wikitext2"
        assert params["seq_len"] == 64
        if chapter != "06_headwise":  # chapter 6's first print is about its model only
            assert "from wikitext2" in text, f"{chapter} did not measure on WikiText-2:\n{text[:400]}"
        for other in gpu.get("compare_models") or []:
            assert other in text, f"{chapter}: compare model {other} not reported"
    _, text = executed(checkout, "01_sink")
    assert "llama-2-7b: 3 layers x 4 heads; 2 sequences of 64 tokens from wikitext2" in text
    _, text = executed(checkout, "04_super_neurons")  # the reference values name the shape they hold for
    assert "| (4096, 11008) | (64, 128) | DIFFERS |" in text  # the row: quantity, published, measured, verdict
    _, text = executed(checkout, "06_headwise")
    assert "budget: 4 steps for each of 4 variants" in text


@pytest.mark.xdist_group("gpu-rehearsal-other-models")  # minutes: beside the llama rehearsal (conftest.py)
@pytest.mark.parametrize("name", ["mistral-7b", "qwen2-7b"])
def test_chapters_run_unchanged_on_mistral_and_qwen2(checkout, hf_home, name):
    chapters = [c for c in project.chapters() if c != "06_headwise"]  # chapter 6's model only draws Fig 13
    done = run_book(checkout, hf_home, [f"--param=model_name={name}", "--param=compare_models=[]", "--only", *chapters])
    assert done.returncode == 0, f"run.sh book failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    for chapter in chapters:
        params, text = executed(checkout, chapter)
        assert params["model_name"] == name
        assert f"{name}: 3 layers" in text and "from wikitext2" in text, text[:400]
    _, text = executed(checkout, "04_super_neurons")
    assert f"{name}: no published reference values" in text


def test_standins_are_laid_out_as_the_hub_leaves_them(hf_home):
    for name in standins.FULL:
        repo = standins.cache_folder(hf_home, models.HUB[name])
        commit = (repo / "refs" / "main").read_text()
        snapshot = repo / "snapshots" / commit
        for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            link = snapshot / file
            assert link.is_symlink() and link.resolve().parent == (repo / "blobs").resolve(), file
        config = json.loads((snapshot / "config.json").read_text())
        assert config["model_type"] == standins.FULL[name]["model_type"]
        assert config["num_key_value_heads"] == standins.TINY[name]["num_key_value_heads"]
    assert json.loads((standins.cache_folder(hf_home, models.HUB["mistral-7b"]) / "snapshots" /
                       (standins.cache_folder(hf_home, models.HUB["mistral-7b"]) / "refs" / "main").read_text() /
                       "config.json").read_text())["sliding_window"] == 4096
    data_repo = standins.cache_folder(hf_home, standins.WIKITEXT_REPO, "dataset")
    assert (data_repo / "snapshots" / (data_repo / "refs" / "main").read_text() / standins.WIKITEXT_FILE).is_file()


# ------------------------------------------------------------------------------------------------ preflight


class FakeHub(http.server.BaseHTTPRequestHandler):
    """A hub that answers every gated-model auth-check with 403 GatedRepo, as huggingface.co does."""

    seen: list = []

    def _answer(self):
        FakeHub.seen.append((self.command, self.path, self.headers.get("authorization")))
        if self.path.endswith("/auth-check"):
            self.send_response(403)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to this model is restricted")
        else:
            self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    FakeHub.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def preflight_run(tmp_path, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env |= {"HF_HOME": str(tmp_path / "hf_home")} | env_extra
    return subprocess.run([sys.executable, "-m", "sinkutils.book", "--profile", "gpu", "--no-html",
                           "--no-assignments", "--only", "01_sink", "04_super_neurons"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_gated_model_without_token_stops_before_any_chapter_saying_how_to_log_in(tmp_path, fake_hub):
    done = preflight_run(tmp_path, HF_ENDPOINT=fake_hub)
    assert done.returncode != 0
    for repo in ("meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B"):
        assert f"{repo} is gated and no Hugging Face token is set: accept its licence at https://huggingface.co/{repo}" \
            in done.stderr
    assert "hf auth login" in done.stderr and "HF_TOKEN" in done.stderr
    assert "chapters and assignments" not in done.stderr + done.stdout  # no chapter started
    paths = [p for _, p, _ in FakeHub.seen]
    assert "/api/models/meta-llama/Llama-2-7b-hf/auth-check" in paths
    assert not [p for p in paths if "/resolve/" in p], "nothing may download before access is known"


def test_gated_model_with_a_token_lacking_access_names_the_licence_page(tmp_path, fake_hub):
    done = preflight_run(tmp_path, HF_ENDPOINT=fake_hub, HF_TOKEN="hf_rehearsal")
    assert done.returncode != 0
    assert ("meta-llama/Llama-2-7b-hf is gated and your token has no access yet: accept its licence at "
            "https://huggingface.co/meta-llama/Llama-2-7b-hf") in done.stderr
    assert ("GET", "/api/models/meta-llama/Llama-2-7b-hf/auth-check", "Bearer hf_rehearsal") in FakeHub.seen


def test_offline_without_the_models_in_the_cache_lists_each_missing_thing(tmp_path):
    done = preflight_run(tmp_path, HF_HUB_OFFLINE="1")
    assert done.returncode != 0
    assert f"offline (HF_HUB_OFFLINE=1): using the cache at {tmp_path / 'hf_home' / 'hub'}" in done.stderr
    assert "meta-llama/Llama-2-7b-hf is not in the cache (missing config.json" in done.stderr
    assert "meta-llama/Meta-Llama-3-8B is not in the cache" in done.stderr
    assert "WikiText-2 (Salesforce/wikitext/wikitext-2-raw-v1/test-00000-of-00001.parquet) is not in the cache" \
        in done.stderr


def test_cpu_profile_needs_no_hub():
    from sinkutils import preflight

    assert preflight.needs("cpu", project.chapters()) == ([], False)
    repos, wikitext = preflight.needs("gpu", project.chapters())
    assert repos == ["meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B"] and wikitext
    assert preflight.needs("gpu", ["01_sink"], {"model_name": "mistral-7b", "text_source": "python_docs"}) == (
        ["mistralai/Mistral-7B-v0.1"], False)


# ------------------------------------------------------------------------------------------- run.sh, gpu profile


def sourced(script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` after ``source run.sh`` (which defines its functions and runs nothing)."""
    return subprocess.run(["bash", "-c", f"source run.sh\n{script}"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_run_sh_installs_the_gpu_profiles_extras():
    stub = 'setup() { echo "setup $1"; }; vendor() { :; }; book() { echo "book $*"; }\n'
    gpu = sourced(stub + "PROFILE=gpu main book --only 01_sink")
    cpu = sourced(stub + "PROFILE=cpu main book")
    test = sourced(stub + 'main test --co -q 2>/dev/null || true; echo done', {"VENV": "/nonexistent"})
    assert gpu.stdout.splitlines() == ["setup requirements-gpu.txt", "book --only 01_sink"], gpu.stderr
    assert cpu.stdout.splitlines()[0] == "setup requirements.txt"
    assert test.stdout.splitlines()[0] == "setup requirements-gpu.txt"
    extras = (ROOT / "requirements-gpu.txt").read_text().splitlines()
    assert "-r requirements.txt" in extras and any(line.startswith("pyarrow==") for line in extras)
    import pyarrow  # noqa: F401 - installed by run.sh test, as the rehearsal needs


def test_run_sh_leaves_the_hub_on_for_the_gpu_profile(tmp_path):
    """cpu: HF_HUB_OFFLINE=1 (nothing to download); gpu: unset, so the hub is used when reachable."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text('#!/bin/sh\necho "offline=${HF_HUB_OFFLINE-unset} args=$*"\n')
    (venv / "bin" / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "BOOK_CACHE")} | {"VENV": str(venv)}
    gpu = subprocess.run(["bash", "-c", "source run.sh; PROFILE=gpu book --only 01_sink"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    cpu = subprocess.run(["bash", "-c", "source run.sh; PROFILE=cpu book"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert gpu.stdout.strip() == "offline=unset args=-m sinkutils.book --profile gpu --only 01_sink"
    assert cpu.stdout.strip() == "offline=1 args=-m sinkutils.book --profile cpu"


def test_gpu_profile_lists_only_supported_models():
    spec = yaml.safe_load((ROOT / "profiles" / "gpu.yml").read_text())
    named = {spec["defaults"]["model_name"]}
    for chapter in (spec.get("chapters") or {}).values():
        named |= set((chapter or {}).get("compare_models") or [])
    assert named <= set(standins.FULL), f"the rehearsal has no stand-in for {named - set(standins.FULL)}"


# ------------------------------------------------------------------------------- benchmarks/gpu_check.py


def test_gpu_check_runs_the_profiles_own_models_and_text(tmp_path):
    """The lent-GPU script runs what users run: the profile's model names and WikiText-2, through the cache."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    before = os.environ.get("HF_HOME")
    rows = gpu_check.main(["--shape", "tiny", "--device", "cpu", "--chapters", "01_sink", "--work", str(tmp_path),
                           "--param", "n_texts=2", "--param", "seq_len=64"])
    assert os.environ.get("HF_HOME") == before  # the stand-in cache is the chapters' only
    assert [r["chapter"] for r in rows] == ["01_sink"] and rows[0]["error"] is None, rows
    nb = nbformat.read(tmp_path / "executed" / "01_sink.ipynb", as_version=4)
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])).source
    assert "model_name = \"llama-2-7b\"" in injected and "text_source = \"wikitext2\"" in injected
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "llama-2-7b: 3 layers x 4 heads; 2 sequences of 64 tokens from wikitext2" in printed
    assert sorted(p.name for p in (tmp_path / "hf_home-tiny" / "hub").iterdir()) == [
        "datasets--Salesforce--wikitext", "models--meta-llama--Llama-2-7b-hf"]
