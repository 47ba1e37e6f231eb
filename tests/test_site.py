"""The built site works offline in a real browser: every chapter page loads its figures, typesets its math,
renders its widgets, and moving a slider switches the pre-rendered output, with no request leaving the local
server and no console errors.

The site is built here from chapter 1, executed by papermill (as ``sinkutils.book`` runs it) with a tiny
random-init Llama saved to a temp folder, so neither the embedded model nor the network is needed. Set
``SINKBOOK_SITE=_build/html`` to test a site built by ``bash run.sh book`` instead (CI does, after the build).
The browser is headless Chromium (Debian package ``chromium``), driven over the Chrome DevTools Protocol on
``--remote-debugging-pipe`` (stdlib only: no chromedriver, no websocket library). Screenshots of every chapter page
at 1280 and 390 px (``NN_name-1280.png``, ``NN_name-390.png``), of the landing page and of every widget before and
after its slider moves are kept under ``artifacts/site/`` (CI uploads ``artifacts/``; the test prints the folder).

Without Chromium the static checks still run: the pages load only local files, the scoreboard renders, and each
chapter's Colab and download buttons point at that chapter's notebook.
"""
from __future__ import annotations

import base64
import fcntl
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
import yaml

from sinkutils import book, models, project, release, scoreboard
from limits import STALL

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
#: the reason tests/conftest.py counts apart (``bash run.sh test`` installs Chromium where it can)
NO_CHROMIUM = "needs chromium: not installed (Debian: apt-get install chromium): the real-browser checks need it"
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
ARTIFACTS = project.ROOT / "artifacts" / "site"
VENDOR = project.ROOT / "book" / "vendor"
#: chapters executed for the test build (each one papermill run, ~15 s on two CPU cores)
SITE_CHAPTERS = ["01_sink"]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--mute-audio",
         "--window-size=1280,900",
         # any host but the local server fails at once: a CDN reference shows up as an error, never as a hang
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
#: console messages that are not failures (regex on the message text); keep this short and say why
CONSOLE_ALLOW: list[tuple[str, str]] = [
    (r"Identifier 'THEBE_JS_URL' has already been declared",
     "sphinx-thebe 0.3.1 adds its inline config script with app.add_js_file(None, body=...) after the builder "
     "is set up; Sphinx 7.4 then lists it twice (filename None and ''), so the identical second copy fails to "
     "re-declare its consts. Nothing is lost: the first copy ran, and thebe (live code) is off."),
    (r"/favicon\.ico\)?$",
     "Chromium asks every site for /favicon.ico; the book sets no favicon."),
]
LOCAL_SCHEMES = ("data:", "blob:", "about:")
#: Page weight: what a chapter page loads on a first visit (cache off), in MB. The shared part (theme, require.js,
#: the widget manager with its fonts, MathJax with its fonts) is the same on every page; the page's own HTML carries
#: its figures and its widgets' pre-rendered outputs. Budget: each page at most PAGE_BUDGET_MB in all, of which its
#: own HTML at most HTML_BUDGET_MB (figures as 256-colour PNGs, plots.png: chapter 2, the heaviest, 4.7 -> 1.9 MB).
PAGE_BUDGET_MB, HTML_BUDGET_MB = 10.5, 2.0
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


# --------------------------------------------------------------------------------------------------------------
# The site: built from an executed chapter (or SINKBOOK_SITE), served on 127.0.0.1 from a thread
# --------------------------------------------------------------------------------------------------------------

def random_llama(path: Path) -> Path:
    """A tiny random-init Llama with a word-level tokenizer, saved like any local model folder."""
    import torch
    import transformers as tf

    from tests.test_models import save_with_tokenizer

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    save_with_tokenizer(tf.LlamaForCausalLM(cfg).eval(), path)
    return path


def build_site(root: Path, chapters: list[str]) -> Path:
    """The book's own pipeline on a temp root holding ``chapters`` only: stage, papermill, jupyter-book -W."""
    for name in ("_config.yml", "book"):
        src = project.ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / name)
    (root / "chapters").mkdir()
    for chapter in chapters:
        shutil.copy2(project.ROOT / "chapters" / f"{chapter}.ipynb", root / "chapters")
    toc = yaml.safe_load((project.ROOT / "_toc.yml").read_text())
    for part in toc["parts"]:  # the toc without the chapters (and assignments) not built: a missing page fails -W
        part["chapters"] = [c for c in part["chapters"] if not c["file"].startswith(("chapters/", "assignments/"))
                            or c["file"] in [f"chapters/{ch}" for ch in chapters]]
    (root / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    (root / "profiles").mkdir()
    model = random_llama(root / "model")
    (root / "profiles" / "site.yml").write_text(yaml.safe_dump({"defaults": {"model_name": str(model), "n_texts": 8}}))
    stage_dir = book.stage(root)
    for chapter in chapters:
        book.execute(chapter, "site", stage_dir / "chapters", root=root, timeout=300, stall_timeout=STALL)
    # the scoreboard on fewer sequences than the cpu profile's 32: the same pages, seconds faster
    small = scoreboard.Settings(n_texts=8)
    return book.build_html(stage_dir, root=root, board=scoreboard.measure({models.DEFAULT: small}, variants=small))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if os.environ.get("SINKBOOK_SITE"):
        html = Path(os.environ["SINKBOOK_SITE"]).resolve()
        assert (html / "index.html").exists(), f"SINKBOOK_SITE={html} holds no built site"
        return html
    return build_site(tmp_path_factory.mktemp("site"), SITE_CHAPTERS)


def chapter_pages(html: Path) -> list[str]:
    return sorted(p.relative_to(html).as_posix() for p in (html / "chapters").glob("*.html"))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(site):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


# --------------------------------------------------------------------------------------------------------------
# A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3: commands in, fd 4: replies out,
# each message JSON followed by a NUL byte)
# --------------------------------------------------------------------------------------------------------------

class Chromium:
    def __init__(self, exe: str, profile_dir: Path):
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4: bash moves the child's pipe ends there
        # (moved to fds >= 10 first, so that no redirection can overwrite another) and closes the originals
        child_in, child_out = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, out_w))
        os.close(cmd_r)
        os.close(out_w)
        wire = f'exec "$0" "$@" 3<&{child_in} 4>&{child_out} {child_in}<&- {child_out}>&-'
        self.log = open(profile_dir / "chromium.log", "wb")
        self.proc = subprocess.Popen(["bash", "-c", wire, exe, *FLAGS, f"--user-data-dir={profile_dir / 'profile'}",
                                      "--remote-debugging-pipe", "about:blank"], pass_fds=(child_in, child_out),
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        os.close(child_in)
        os.close(child_out)
        self._w, self._r = cmd_w, out_r
        self._lock = threading.Lock()
        self._next = 0
        self._waiting: dict[int, threading.Event] = {}
        self._replies: dict[int, dict] = {}
        self.events: list[tuple[str | None, str, dict]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.call("Browser.getVersion", timeout=60)

    def _read(self):
        buf = b""
        while chunk := os.read(self._r, 1 << 20):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    self._replies[msg["id"]] = msg
                    self._waiting.pop(msg["id"]).set()
                else:
                    self.events.append((msg.get("sessionId"), msg["method"], msg.get("params", {})))

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        with self._lock:
            self._next += 1
            msg_id = self._next
            done = self._waiting[msg_id] = threading.Event()
            data = json.dumps({"id": msg_id, "method": method, "params": params,
                               **({"sessionId": session} if session else {})}).encode() + b"\0"
            while data:
                data = data[os.write(self._w, data):]
        if not done.wait(timeout):
            raise TimeoutError(f"no reply to {method} in {timeout} s (chromium exit code {self.proc.poll()})")
        reply = self._replies.pop(msg_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        self._reader.join(timeout=10)  # the browser is gone, so its pipe has reached EOF
        os.close(self._r)
        self.log.close()


class Page:
    """One tab: navigation, evaluation, and the console / network events it produced."""

    def __init__(self, browser: Chromium):
        self.browser = browser
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Network.setCacheDisabled", cacheDisabled=True)  # every page weighed as on a first visit
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params) -> dict:
        return self.browser.call(method, session=self.session, **params)

    def open(self, url: str, timeout: float = 30):
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", timeout, "page load")

    def evaluate(self, expression: str, await_promise: bool = False):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        end = time.time() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.time() > end:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}: {expression}")
            time.sleep(0.2)

    def screenshot(self, path: Path, clip: dict | None = None):
        if clip is None:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": 1280, "height": min(size["height"], 12000)}
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip={**clip, "scale": 1})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def _events(self, method: str) -> list[dict]:
        return [p for s, m, p in self.browser.events if s == self.session and m == method]

    def requests(self) -> list[str]:
        return [p["request"]["url"] for p in self._events("Network.requestWillBeSent")]

    def loaded(self) -> dict[str, int]:
        """Bytes received per URL so far (``Network.loadingFinished``'s encodedDataLength)."""
        urls = {p["requestId"]: p["request"]["url"] for p in self._events("Network.requestWillBeSent")}
        out: dict[str, int] = {}
        for p in self._events("Network.loadingFinished"):
            url = urls.get(p["requestId"], p["requestId"])
            out[url] = max(out.get(url, 0), p["encodedDataLength"])
        return out

    def errors(self) -> list[str]:
        found = []
        for p in self._events("Runtime.consoleAPICalled"):
            if p["type"] in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        for p in self._events("Runtime.exceptionThrown"):
            d = p["exceptionDetails"]
            found.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
        for p in self._events("Log.entryAdded"):
            if p["entry"]["level"] == "error":
                found.append(f"log: {p['entry']['text']} ({p['entry'].get('url', '')})")
        for p in self._events("Network.loadingFailed"):
            if not p.get("canceled"):
                found.append(f"network: {p['errorText']}")
        return [e for e in found if not any(re.search(pat, e) for pat, _why in CONSOLE_ALLOW)]

    def close(self):
        self.browser.call("Target.closeTarget", targetId=self.call("Target.getTargetInfo")["targetInfo"]["targetId"])


@pytest.fixture(scope="module")
def browser(server):
    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    with tempfile.TemporaryDirectory(prefix="sinkbook-chromium-") as tmp:
        chromium = Chromium(CHROMIUM, Path(tmp))
        try:
            yield chromium
        finally:
            chromium.close()


# --------------------------------------------------------------------------------------------------------------
# In-page checks (JavaScript evaluated in the page)
# --------------------------------------------------------------------------------------------------------------

JS_MATH = """(() => {
  const math = [...document.querySelectorAll('article span.math, article div.math')];
  const art = document.querySelector('article').cloneNode(true);
  art.querySelectorAll('mjx-container, pre, code, script, style, .cell_output, .widget-subarea').forEach(e => e.remove());
  const text = art.textContent;
  return {math: math.length, typeset: math.filter(e => e.querySelector('mjx-container')).length,
          merror: document.querySelectorAll('mjx-merror').length,
          raw: (text.match(/\\$[^$\\n]+\\$|\\\\\\(|\\\\\\[/g) || []).slice(0, 5)};
})()"""

JS_IMAGES = """[...document.querySelectorAll('article img')].map(i => ({
  src: i.src.slice(0, 80), complete: i.complete, width: i.naturalWidth, widget: !!i.closest('.widget-subarea')}))"""

JS_WIDGETS = """[...document.querySelectorAll('script[type="%s"]')].map(s => {
  const area = s.previousElementSibling;
  const ok = !!area && area.classList.contains('widget-subarea') && area.childElementCount > 0;
  return {rendered: ok, sliders: ok ? area.querySelectorAll('.widget-slider, .slider-container').length : 0,
          error: ok ? /Error displaying widget/.test(area.textContent) : false};
})""" % WIDGET_VIEW

# what widget i shows now: its slider readouts and the images that are visible
JS_WIDGET_STATE = """(i => {
  const area = document.querySelectorAll('script[type="%s"]')[i].previousElementSibling;
  const visible = [...area.querySelectorAll('img')].filter(img => img.checkVisibility());
  const r = area.getBoundingClientRect();
  return {readouts: [...area.querySelectorAll('.widget-readout')].map(e => e.textContent || e.value),
          images: visible.map(img => img.src.length + ':' + img.src.slice(-48)),
          rect: {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}};
})""" % WIDGET_VIEW


# sideways scrolling: how far the page is wider than the window, and the elements of the article that scroll
# sideways inside themselves (code, output, tables)
JS_OVERFLOW = """(() => {
  const inner = [...document.querySelectorAll('article *')].filter(e => {
    const o = getComputedStyle(e).overflowX;
    return (o === 'auto' || o === 'scroll') && e.scrollWidth > e.clientWidth + 1;
  });
  return {page: document.documentElement.scrollWidth - document.documentElement.clientWidth,
          scrolling: inner.length, examples: inner.map(e => e.tagName + '.' + e.className)};
})()"""
#: the widths a reader reads at: a laptop and a phone
WIDTHS = {"desktop": 1280, "phone": 390}
#: display equations wider than their column (MathJax 3 does not break lines: a wide one would scroll sideways)
JS_WIDE_MATH = """[...document.querySelectorAll('article mjx-container[display="true"]')].filter(m => {
  const math = m.querySelector('mjx-math');
  return math && math.getBoundingClientRect().width > m.parentElement.clientWidth + 1;
}).map(m => m.getAttribute('aria-label') || m.textContent.slice(0, 60))"""
#: output paragraphs that are a markdown table left unparsed (a header rule: |---| or, after smartquotes, |—|)
JS_RAW_TABLES = """[...document.querySelectorAll('article .cell_output p')].map(p => p.textContent)
  .filter(t => /\\|\\s*(---|\u2014)\\s*\\|/.test(t)).map(t => t.slice(0, 80))"""
#: how many characters of code the content column holds without wrapping (the chapters are formatted to fit)
JS_CODE_COLUMN = """(() => {
  const pre = [...document.querySelectorAll('article div.cell:not(.tag_hide-input) div.cell_input pre')]
    .find(p => p.offsetParent !== null);
  if (!pre) return null;
  const probe = document.createElement('span');
  probe.style.whiteSpace = 'pre';
  probe.textContent = 'x'.repeat(200);
  pre.appendChild(probe);
  const char = probe.getBoundingClientRect().width / 200;
  probe.remove();
  const style = getComputedStyle(pre);
  return (pre.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight)) / char;
})()"""
CODE_WIDTH = tomllib.loads((project.ROOT / "chapters" / "ruff.toml").read_text())["line-length"]


def png_width(path: Path) -> int:
    """The pixel width in a PNG's header."""
    return int.from_bytes(path.read_bytes()[16:20], "big")


class _Refs(HTMLParser):
    """Every script src, stylesheet / icon href and img src of a page."""

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "img", "iframe") and a.get("src"):
            self.refs.append(a["src"])
        if tag == "link" and a.get("href") and set((a.get("rel") or "").split()) & {"stylesheet", "icon", "preload", "modulepreload"}:
            self.refs.append(a["href"])


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------

def test_vendored_assets_match_pins_and_checksums():
    pins = re.search(r"VENDOR_PINS=\(\n(.*?)\n\)", (project.ROOT / "run.sh").read_text(), re.S).group(1)
    assert (VENDOR / "PINS").read_text().split() == [w.strip('"') for w in pins.split()], \
        "book/vendor is from other versions than run.sh pins: run `bash run.sh vendor`"
    listed = {}
    for line in (VENDOR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, f"book/vendor/{name} changed"
    present = {p.relative_to(VENDOR).as_posix() for p in VENDOR.rglob("*") if p.is_file()}
    assert present - set(listed) == {"PINS", "SHA256SUMS", "README.md"}, "unlisted files in book/vendor"


def test_config_loads_vendored_scripts():
    cfg = yaml.safe_load((project.ROOT / "_config.yml").read_text())["sphinx"]["config"]
    static = [project.ROOT / p for p in cfg["html_static_path"]]
    assert VENDOR in static
    for script in [cfg["mathjax_path"], *filter(None, cfg["nb_ipywidgets_js"])]:  # "" is an inline script
        assert "://" not in script and any((d / script).is_file() for d in static), f"{script} is not vendored"


def test_pages_reference_only_local_files(site):
    pages = sorted(site.rglob("*.html"))
    assert any(p.parent.name == "chapters" for p in pages)
    for page in pages:
        parser = _Refs()
        parser.feed(page.read_text(encoding="utf-8"))
        remote = [r for r in parser.refs if re.match(r"[a-z][a-z0-9+.-]*:|//", r) and not r.startswith(LOCAL_SCHEMES)]
        assert not remote, f"{page.relative_to(site)} loads {remote}"
    text = (site / chapter_pages(site)[0]).read_text(encoding="utf-8")
    assert "_static/mathjax/tex-chtml-full.js" in text and "_static/html-manager/embed-amd.js" in text


@needs_chromium
def test_chapter_pages_work_offline_in_chromium(site, server, browser, capsys):
    pages = chapter_pages(site)
    assert pages, "the site has no chapter pages"
    report = {}
    for rel in pages:
        name = Path(rel).stem
        page = Page(browser)
        try:
            page.open(server + rel)
            # math: every math node typeset by the vendored MathJax, no TeX left as text
            if page.evaluate("document.querySelectorAll('article .math').length"):
                page.wait_for("window.MathJax && MathJax.startup && MathJax.startup.promise && "
                              "document.querySelectorAll('article mjx-container').length > 0", 30, "MathJax")
                page.evaluate("MathJax.startup.promise.then(() => true)", await_promise=True)
            math = page.evaluate(JS_MATH)
            assert math["typeset"] == math["math"] and not math["merror"], f"{name}: math not typeset: {math}"
            assert not math["raw"], f"{name}: raw TeX in the page text: {math['raw']}"
            # figures: every image loaded
            page.wait_for("[...document.querySelectorAll('article img')].every(i => i.complete)", 30, "images")
            images = page.evaluate(JS_IMAGES)
            assert [i for i in images if not i["widget"]], f"{name}: no figure on the page"
            assert all(i["width"] > 0 for i in images), f"{name}: broken images {[i for i in images if not i['width']]}"
            # widgets: every saved view rendered by the vendored manager
            n_views = page.evaluate(f"document.querySelectorAll('script[type=\"{WIDGET_VIEW}\"]').length")
            if n_views:
                page.wait_for(f"({JS_WIDGETS}).every(w => w.rendered)", 30, "widgets to render")
            widgets = page.evaluate(JS_WIDGETS)
            assert not [w for w in widgets if w["error"]], f"{name}: a widget failed to display"
            page.screenshot(ARTIFACTS / f"{name}-1280.png")
            # tables that cells display (widgets.table) are tables, not paragraphs of pipes
            raw = page.evaluate(JS_RAW_TABLES)
            assert not raw, f"{name}: markdown tables shown as text: {raw}"
            column = page.evaluate(JS_CODE_COLUMN)
            assert column and column >= CODE_WIDTH, \
                f"{name}: the content column holds {column} characters of code, the chapters are formatted to {CODE_WIDTH}"
            # sliders: moving the first slider of each widget switches the pre-rendered output, no kernel
            for i, w in enumerate(widgets):
                if not w["sliders"]:
                    continue
                before = page.evaluate(f"({JS_WIDGET_STATE})({i})")
                assert before["images"], f"{name}: widget {i} shows no image"
                page.screenshot(ARTIFACTS / f"{name}-widget{i}-before.png", before["rect"])
                move_first_slider(page, i)
                page.wait_for(f"JSON.stringify(({JS_WIDGET_STATE})({i}).images) !== {json.dumps(json.dumps(before['images']))}",
                              10, f"widget {i}'s output to change after its slider moved")
                after = page.evaluate(f"({JS_WIDGET_STATE})({i})")
                assert after["readouts"] != before["readouts"], f"{name}: widget {i}'s slider did not move"
                page.screenshot(ARTIFACTS / f"{name}-widget{i}-after.png", after["rect"])
            # nothing but the local server was asked for anything, and nothing failed
            remote = [u for u in page.requests() if not u.startswith((server, *LOCAL_SCHEMES))]
            assert not remote, f"{name}: requests left the local server: {remote}"
            assert not page.errors(), f"{name}: console errors: {page.errors()}"
            loaded = page.loaded()  # weighed before the width changes below (which may fetch more)
            # no sideways scrolling at 1280 px and at a phone's 390 px (a screenshot at each)
            overflow = {"desktop": page.evaluate(JS_OVERFLOW) | {"math": page.evaluate(JS_WIDE_MATH)}}
            page.call("Emulation.setDeviceMetricsOverride", width=WIDTHS["phone"], height=844, deviceScaleFactor=1,
                      mobile=True)
            time.sleep(0.5)
            overflow["phone"] = page.evaluate(JS_OVERFLOW) | {"math": page.evaluate(JS_WIDE_MATH)}
            size = page.call("Page.getLayoutMetrics")["cssContentSize"]
            page.screenshot(ARTIFACTS / f"{name}-390.png", {"x": 0, "y": 0, "width": WIDTHS["phone"],
                                                            "height": min(size["height"], 12000)})
            page.call("Emulation.setDeviceMetricsOverride", width=WIDTHS["desktop"], height=900, deviceScaleFactor=1,
                      mobile=False)
            # code, output, tables and display equations fit the column at both widths
            for width, found in overflow.items():
                assert found["page"] <= 0 and not found["scrolling"] and not found["math"], \
                    f"{name}: scrolls sideways at {WIDTHS[width]} px: {found}"
            shots = {w: ARTIFACTS / f"{name}-{w}.png" for w in WIDTHS.values()}
            assert {w: png_width(path) for w, path in shots.items()} == {w: w for w in WIDTHS.values()}, shots
            # page weight, against the budget stated at the top
            own = (site / rel).stat().st_size / 1e6  # the document as served (DevTools may count it short)
            total = (sum(loaded.values()) - loaded.get(server + rel, 0)) / 1e6 + own
            report[name] = {"figures": len([i for i in images if not i["widget"]]), "math": math["math"],
                            "widgets": len(widgets), "requests": len(page.requests()), "loaded_mb": round(total, 2),
                            "html_mb": round(own, 2), "sideways": overflow, "code_column_chars": round(column),
                            "screenshots": [path.name for path in shots.values()]}
            assert own <= HTML_BUDGET_MB, f"{name}: its HTML is {own:.2f} MB, over the budget of {HTML_BUDGET_MB} MB"
            assert total <= PAGE_BUDGET_MB, f"{name}: loads {total:.2f} MB, over the budget of {PAGE_BUDGET_MB} MB"
        finally:
            page.close()
    (ARTIFACTS / "report.json").write_text(json.dumps(report, indent=1))
    with capsys.disabled():
        print(f"\nscreenshots of {len(report)} chapter pages at {sorted(WIDTHS.values())} px: {ARTIFACTS}")


class _Buttons(HTMLParser):
    """Every link of a page: (its classes, its title, its href)."""

    def __init__(self):
        super().__init__()
        self.links: list[tuple[set[str], str, str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.links.append((set((a.get("class") or "").split()), a.get("title") or "", a["href"]))


def test_colab_and_download_buttons_open_this_chapter(site):
    """Colab opens this chapter's notebook from the repository of the release coordinates (pyproject.toml) on the
    branch the site names; the download button serves this chapter's executed notebook."""
    repo = release.coordinates()["slug"]
    branch = yaml.safe_load((project.ROOT / "_config.yml").read_text())["repository"]["branch"]
    pages = chapter_pages(site)
    assert pages, "the site has no chapter pages"
    for rel in pages:
        name = Path(rel).stem
        parser = _Buttons()
        parser.feed((site / rel).read_text(encoding="utf-8"))
        colab = [href for classes, title, href in parser.links if "btn" in classes and "Colab" in title]
        assert colab == [f"https://colab.research.google.com/github/{repo}/blob/{branch}/chapters/{name}.ipynb"], \
            f"{name}: the Colab button opens {colab}"
        assert (project.ROOT / "chapters" / f"{name}.ipynb").is_file()  # the file Colab opens, in this checkout
        download = [href for classes, _, href in parser.links if "btn-download-source-button" in classes]
        assert len(download) == 1 and download[0].endswith(f"/chapters/{name}.ipynb"), f"{name}: download {download}"
        served = (site / rel).parent / download[0]
        assert served.is_file(), f"{name}: the download button's {download[0]} is not in the site"
        got = [c.source for c in nbformat.reads(served.read_text(encoding="utf-8"), as_version=4).cells]
        source = [c.source for c in nbformat.read(project.ROOT / "chapters" / f"{name}.ipynb", as_version=4).cells]
        rest = iter(got)  # every cell of the chapter, in order (papermill adds its injected-parameters cell)
        assert all(any(cell == g for g in rest) for cell in source), f"{name}: the download is not this chapter"


VERDICT_CELLS = r"<strong>(agrees|DEPARTS|n/a)</strong>"


def test_scoreboard_page_renders_every_claim(site):
    page = (site / "book" / "scoreboard.html").read_text(encoding="utf-8")
    rows = [r for r in re.findall(r"<tr[^>]*>(.*?)</tr>", page, re.S) if "<th" not in r]
    assert len(rows) >= 20, f"the scoreboard has {len(rows)} rows"  # chapters 1-6: every claim of_model decides
    for row in rows:
        assert re.search(VERDICT_CELLS, row), f"a scoreboard row without a verdict: {row[:200]}"
    for link in set(re.findall(r'href="(\.\./chapters/[^"#]+)#([^"]+)"', page)):  # built chapters: the anchor exists
        target = (site / "book" / link[0]).resolve()
        if target.exists():
            assert f'id="{link[1]}"' in target.read_text(encoding="utf-8"), f"no section #{link[1]} in {link[0]}"


@needs_chromium
def test_landing_page_shows_chain_figure_and_scoreboard(site, server, browser):
    page = Page(browser)
    try:
        page.open(server + "book/intro.html")
        page.wait_for("[...document.querySelectorAll('article img')].every(i => i.complete)", 30, "images")
        chain = page.evaluate("[...document.querySelectorAll('article figure img')].map(i => "
                              "({src: i.src, width: i.naturalWidth, top: i.getBoundingClientRect().top}))")
        assert chain and "scoreboard_chain" in chain[0]["src"] and chain[0]["width"] > 0, chain
        assert chain[0]["top"] < 900, "the chain figure does not head the landing page"
        caption = page.evaluate("document.querySelector('article figure figcaption').textContent")
        assert "coloured by its verdict" in caption
        verdicts = page.evaluate("[...document.querySelectorAll('article table strong')].map(e => e.textContent)")
        assert len(verdicts) >= 20 and set(verdicts) <= {"agrees", "DEPARTS", "n/a"}
        assert not page.errors(), page.errors()
        page.screenshot(ARTIFACTS / "intro.png")
    finally:
        page.close()


def move_first_slider(page: Page, i: int):
    """A real key press on the focused slider handle, as a reader would: one step right (left at the end)."""
    handle = page.evaluate(f"""(() => {{
      const area = document.querySelectorAll('script[type="{WIDGET_VIEW}"]')[{i}].previousElementSibling;
      const h = area.querySelector('[role=slider]');
      if (!h) return null;
      h.scrollIntoView({{block: 'center'}});
      h.focus();
      return {{focused: document.activeElement === h,
               at_end: Number(h.getAttribute('aria-valuenow')) >= Number(h.getAttribute('aria-valuemax'))}};
    }})()""")
    assert handle and handle["focused"], f"widget {i}: no focusable slider handle"
    key, code = ("ArrowLeft", 37) if handle["at_end"] else ("ArrowRight", 39)
    for kind in ("keyDown", "keyUp"):
        page.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code,
                  nativeVirtualKeyCode=code)
