"""Before any chapter runs: can this machine get every hub model and text the profile asks for?

``python -m sinkutils.book`` calls ``ensure`` first. For each hub model named by the chapters' parameters
(``model_name``, ``compare_models``, ``compare``) and for WikiText-2 (``text_source: wikitext2``):

- the hub is used when it is reachable: a gated model (Llama-2, Llama-3) needs a token with access, checked with
  the hub's ``auth-check`` before anything downloads;
- the Hugging Face cache (``HF_HOME``) is used when the hub is not reachable or ``HF_HUB_OFFLINE=1``: every
  model and file must be in it already. An unreachable hub switches the chapters to offline mode
  (``HF_HUB_OFFLINE=1`` for their kernels) so they read the cache at once instead of timing out.

Every problem found is reported in one message that says how to log in and where to accept each licence.
The cpu profile's embedded models and offline text need none of this.
"""
from __future__ import annotations

import importlib.util
import os
import urllib.error
import urllib.request

from sinkutils import models, project

LOGIN = ("log in with `.venv/bin/hf auth login` (paste a read token from https://huggingface.co/settings/tokens) "
         "or `export HF_TOKEN=hf_...`")
_TRUE = {"1", "on", "yes", "true"}


class PreflightFailed(RuntimeError):
    """A model or text the profile needs cannot be had here; the message lists each and what to do."""


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_cache() -> str:
    """The hub cache folder as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 10.0) -> bool:
    """Whether the hub answers at all (any HTTP status counts; a refused or timed-out connection does not)."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint() + "/api/whoami-v2", method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def needs(profile: str, chapters: list[str], overrides: dict | None = None, root=None) -> tuple[list[str], bool]:
    """(hub repo ids the chapters load, whether any reads WikiText-2), from the profile and ``--param`` overrides
    (an override counts only in chapters that declare it, as ``book.execute`` passes it)."""
    import papermill

    root = project.ROOT if root is None else root
    repos, wikitext = [], False
    for chapter in chapters:
        declared = papermill.inspect_notebook(str(root / "chapters" / f"{chapter}.ipynb"))
        params = {k: _literal(v["default"]) for k, v in declared.items()}
        params |= project.parameters(profile, chapter, root)
        params |= {k: v for k, v in (overrides or {}).items() if k in declared}
        names = [params.get("model_name"), *(params.get("compare_models") or [])]
        compare = params.get("compare")
        names += list(compare.values()) if isinstance(compare, dict) else []
        for name in names:
            if not isinstance(name, str) or not name:
                continue
            try:
                source, local = models.resolve(name)
            except models.ModelNotAvailable:
                continue  # the chapter itself says what is wrong with the name
            if not local and source not in repos:
                repos.append(source)
        wikitext |= params.get("text_source") == "wikitext2"
    return repos, wikitext


def _literal(source: str):
    """A parameter's default as papermill reports it (its source text), as a value; None if not a literal."""
    import ast

    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return None


def _in_cache(repo_id: str, files: list[str], repo_type: str = "model") -> list[str]:
    """The files of ``files`` that the cache lacks (a sharded checkpoint's shards are added from its index)."""
    import json

    from huggingface_hub import try_to_load_from_cache

    missing = []
    for name in files:
        path = try_to_load_from_cache(repo_id, name, cache_dir=hub_cache(), repo_type=repo_type)
        if not isinstance(path, str):
            missing.append(name)
        elif name.endswith(".index.json"):
            shards = sorted(set(json.loads(open(path).read()).get("weight_map", {}).values()))
            missing += _in_cache(repo_id, shards, repo_type)
    return missing


def _weights_in_cache(repo_id: str) -> list[str]:
    """What ``models.load`` would miss in the cache: config.json, and the weights (one file or index + shards)."""
    missing = _in_cache(repo_id, ["config.json"])
    if _in_cache(repo_id, ["model.safetensors"]):
        if _in_cache(repo_id, ["model.safetensors.index.json"]) == ["model.safetensors.index.json"]:
            missing.append("model.safetensors (or model.safetensors.index.json and its shards)")
        else:
            missing += _in_cache(repo_id, ["model.safetensors.index.json"])
    return missing


def _access(repo_id: str, token: str | None) -> str | None:
    """None when the token may download ``repo_id``; else what to do."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    page = f"https://huggingface.co/{repo_id}"
    try:
        HfApi(endpoint=endpoint()).auth_check(repo_id, token=token or False)
    except GatedRepoError:
        if not token:
            return (f"{repo_id} is gated and no Hugging Face token is set: accept its licence at {page} "
                    f"(logged in), then {LOGIN}")
        return (f"{repo_id} is gated and your token has no access yet: accept its licence at {page} with the "
                f"account the token belongs to (approval can take a while), or {LOGIN} with an account that has")
    except RepositoryNotFoundError:
        return (f"{repo_id} was not found on {endpoint()}" + ("" if token else
                f" (gated and private repositories need a token: {LOGIN})"))
    except HfHubHTTPError as err:
        return f"the hub refused {repo_id}: {str(err).splitlines()[0]}"
    return None


def check(profile: str, chapters: list[str], overrides: dict | None = None, root=None) -> str:
    """Raise ``PreflightFailed`` listing every model or text the chapters cannot get; else return one line
    saying where they come from. Sets ``HF_HUB_OFFLINE=1`` when the hub is unreachable (see the module)."""
    repos, wikitext = needs(profile, chapters, overrides, root)
    if not repos and not wikitext:
        return "no hub model or hub text needed"
    from huggingface_hub import get_token

    from sinkutils import data

    problems = []
    if wikitext and importlib.util.find_spec("pyarrow") is None:
        problems.append("text_source wikitext2 reads a parquet file with pyarrow, which is not installed: "
                        "`PROFILE=gpu bash run.sh book` installs it (requirements-gpu.txt)")
    if not offline() and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # the chapters' kernels inherit it: straight to the cache
        mode = f"the hub ({endpoint()}) is not reachable: using the cache at {hub_cache()}"
    elif offline():
        mode = f"offline (HF_HUB_OFFLINE=1): using the cache at {hub_cache()}"
    else:
        mode = f"the hub ({endpoint()}) is reachable: downloading into {hub_cache()} what is missing"
    if offline():
        for repo in repos:
            missing = _weights_in_cache(repo)
            if missing:
                problems.append(f"{repo} is not in the cache (missing {', '.join(missing)}): run once where the "
                                f"hub is reachable, with access (gated models: accept the licence at "
                                f"https://huggingface.co/{repo}, then {LOGIN})")
        if wikitext and _in_cache(data.WIKITEXT_REPO, [data.WIKITEXT_FILE], "dataset"):
            problems.append(f"WikiText-2 ({data.WIKITEXT_REPO}/{data.WIKITEXT_FILE}) is not in the cache: run once "
                            f"where the hub is reachable, or use --param text_source=python_docs")
    else:
        token = os.environ.get("HF_TOKEN") or get_token()
        problems += [p for p in (_access(repo, token) for repo in repos) if p]
    if problems:
        raise PreflightFailed(f"profile {profile!r} cannot run here ({mode}):\n"
                              + "\n".join(f"- {p}" for p in problems))
    return mode


def ensure(profile: str, chapters: list[str], overrides: dict | None = None) -> None:
    """``check`` for the command line: prints where models come from, or exits with the message."""
    try:
        print(f"models and text: {check(profile, chapters, overrides)}", flush=True)
    except PreflightFailed as err:
        raise SystemExit(str(err)) from None
