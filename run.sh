#!/usr/bin/env bash
# The README's two commands:
#   bash run.sh book   set up .venv, execute every chapter (cpu profile), build the site into _build/html
#   bash run.sh test   set up .venv, run the test suite
# PROFILE=gpu bash run.sh book executes the GPU profile instead (needs a GPU and hub access).
#   bash run.sh vendor re-creates book/vendor/ (the site's JavaScript) from npm at the pins below
# BOOK_CACHE=<dir> bash run.sh book re-executes only the chapters that changed since they were cached there (CI).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  local py="$VENV/bin/python"
  if ! "$py" -c "import torch" 2>/dev/null; then
    # The CPU build; a bare `torch` would pull a multi-GB CUDA build.
    "$py" -m pip install -q "torch==2.13.0"
  fi
  "$py" -m pip install -q -r requirements.txt
  "$py" -m pip install -q --no-deps -e .
  "$py" -m ipykernel install --sys-prefix --name python3 >/dev/null
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
  rm -rf "$VENDOR_DIR/html-manager" "$VENDOR_DIR/requirejs" "$VENDOR_DIR/mathjax"
  mkdir -p "$VENDOR_DIR/html-manager" "$VENDOR_DIR/requirejs" "$VENDOR_DIR/mathjax/output/chtml/fonts"
  # embed-amd.js finds its Font Awesome fonts next to itself; browsers use the woff2 of each @font-face
  cp "$hm/dist/embed-amd.js" "$hm"/dist/*.woff2 "$VENDOR_DIR/html-manager/"
  cp "$hm/dist/embed.js.LICENSE.txt" "$VENDOR_DIR/html-manager/THIRD-PARTY-LICENSES.txt"
  cp "$rq/require.js" "$VENDOR_DIR/requirejs/"
  # the -full bundle has every TeX extension built in (no lazy loads); fonts are looked up next to it
  cp "$mj/es5/tex-chtml-full.js" "$mj/LICENSE" "$VENDOR_DIR/mathjax/"
  cp -r "$mj/es5/output/chtml/fonts/woff-v2" "$VENDOR_DIR/mathjax/output/chtml/fonts/"
  rm -rf "$tmp"
  printf '%s\n' "${VENDOR_PINS[@]}" > "$VENDOR_DIR/PINS"
  python3 - "$VENDOR_DIR" <<'PY'
import hashlib, sys
from pathlib import Path
d = Path(sys.argv[1])
files = sorted(p.relative_to(d).as_posix() for sub in ("html-manager", "requirejs", "mathjax") for p in (d / sub).rglob("*") if p.is_file())
(d / "SHA256SUMS").write_text("".join(f"{hashlib.sha256((d / f).read_bytes()).hexdigest()}  {f}\n" for f in files))
PY
  vendor_ok
}

chapter_key() {  # what an executed chapter depends on: its notebook, the profile, sinkutils/**, the pins
  python3 - "$1" "$2" <<'PY'
import hashlib, sys
from pathlib import Path
chapter, profile = sys.argv[1:]
files = [Path(f"chapters/{chapter}.ipynb"), Path(f"profiles/{profile}.yml"), Path("requirements.txt")]
files += sorted(p for p in Path("sinkutils").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
digest = hashlib.sha256()
for path in files:
    digest.update(path.as_posix().encode() + b"\0" + path.read_bytes())
print(digest.hexdigest()[:20])
PY
}

book() {
  local py="$VENV/bin/python" profile=${PROFILE:-cpu}
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  if [ -z "${BOOK_CACHE:-}" ]; then
    "$py" -m sinkutils.book --profile "$profile"
    return
  fi
  # Executed chapters are kept in $BOOK_CACHE as <chapter>-<key>.ipynb; a hit is copied into the stage and
  # not run again, the others are executed, then the site is built over all of them.
  local stage=_build/stage/chapters nb ch key missing=() keep=()
  mkdir -p "$BOOK_CACHE" "$stage"
  for nb in chapters/[0-9][0-9]_*.ipynb; do
    ch=$(basename "$nb" .ipynb)
    key="$ch-$(chapter_key "$ch" "$profile").ipynb"
    keep+=("$key")
    if [ -f "$BOOK_CACHE/$key" ]; then
      cp "$BOOK_CACHE/$key" "$stage/$ch.ipynb"
    else
      missing+=("$ch")
    fi
  done
  echo "chapters reused from $BOOK_CACHE: $(( ${#keep[@]} - ${#missing[@]} )); to execute: ${missing[*]:-none}" >&2
  if [ ${#missing[@]} -eq 0 ]; then
    "$py" -m sinkutils.book --profile "$profile" --only  # no chapter: the assignments (seconds), then the site
  else
    "$py" -m sinkutils.book --profile "$profile" --only "${missing[@]}"
    for ch in "${missing[@]}"; do
      cp "$stage/$ch.ipynb" "$BOOK_CACHE/$ch-$(chapter_key "$ch" "$profile").ipynb"
    done
  fi
  for nb in "$BOOK_CACHE"/*.ipynb; do  # drop what no chapter uses any more
    [[ " ${keep[*]} " == *" $(basename "$nb") "* ]] || rm -f "$nb"
  done
}

case "${1:-}" in
  vendor)
    vendor
    ;;
  book)
    setup
    vendor
    book
    ;;
  test)
    setup
    shift
    HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: bash run.sh book | test [pytest args] | vendor" >&2
    exit 2
    ;;
esac
