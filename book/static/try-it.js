// The "try it" page (book/try_it.md): an embedded model run in the reader's browser on the reader's text.
// Everything it loads is next to it in _static/: ONNX Runtime Web and the tokenizer reader (vendored from npm,
// book/vendor/), the models exported at build by sinkutils.browser (_static/browser/). No request goes anywhere
// else. The displayed numbers are sinkutils' (tests/test_browser_page.py compares them within 1e-4):
//   attention to token 0: trace.Recorder.sink_per_layer (mean over heads and queries >= MIN_QUERY)
//   attention to k: the mean over heads and queries after k of the weight on key k
//   norms: the residual stream's L2 norm after each layer (trace "resid" index l + 1), token 0 and the mean of the others
import * as ort from "./onnxruntime-web/ort.wasm.min.mjs";
import { Tokenizer } from "./tokenizers/tokenizers.min.mjs";

const MIN_QUERY = 4;  // sinkutils' default: early queries attend to few keys, so their weight on token 0 is trivially high
const here = (path) => new URL(path, import.meta.url).href;
ort.env.wasm.wasmPaths = here("./onnxruntime-web/");
ort.env.wasm.numThreads = 1;  // the threaded path needs cross-origin isolation, which a static host does not give

const $ = (id) => document.getElementById(id);
const state = { sessions: {}, result: null, busy: false, pending: false, updates: 0, lastMs: null };
window.sinkbookTryIt = state;  // read by the browser test

function causalMask(T, k) {  // sinkutils.browser.additive_mask: 0 where a query may attend, MASKED where not
  const m = new Float32Array(T * T).fill(state.manifest.masked);
  for (let q = 0; q < T; q++) {
    for (let j = 0; j <= q; j++) {
      if (q !== k || j === k) m[q * T + j] = 0;
    }
  }
  return m;
}

function encode(text, bos) {
  const ids = state.tokenizer.encode(text, { add_special_tokens: false }).ids;
  return bos ? [state.manifest.bos, ...ids] : ids;
}

async function session(name) {
  if (!state.sessions[name]) {
    const entry = state.manifest.models.find((m) => m.name === name);
    state.sessions[name] = ort.InferenceSession.create(here("./browser/" + entry.file),
                                                       { executionProviders: ["wasm"] });
  }
  return state.sessions[name];
}

function summarise(att, norms, L, H, T, k) {
  const rows = [];
  for (let l = 0; l < L; l++) {
    let s0 = 0, n0 = 0, sk = 0, nk = 0;
    for (let h = 0; h < H; h++) {
      const base = (l * H + h) * T * T;
      for (let q = MIN_QUERY; q < T; q++) { s0 += att[base + q * T]; n0++; }
      if (k !== null) for (let q = k + 1; q < T; q++) { sk += att[base + q * T + k]; nk++; }
    }
    const out = norms.subarray((l + 1) * T, (l + 2) * T);
    let others = 0;
    for (let t = 1; t < T; t++) others += out[t];
    rows.push({ layer: l, to0: n0 ? s0 / n0 : null, toK: nk ? sk / nk : null, norm0: out[0],
                normOthers: T > 1 ? others / (T - 1) : null });
  }
  return rows;
}

const fmt = (x) => (x === null || x === undefined ? "–" : x.toFixed(5));

function render() {
  const r = state.result;
  if (!r) return;
  $("try-rows").innerHTML = r.rows.map((row) =>
    `<tr><td>${row.layer}</td><td class="try-to0">${fmt(row.to0)}</td><td class="try-tok">${fmt(row.toK)}</td>` +
    `<td class="try-norm0">${fmt(row.norm0)}</td><td class="try-normothers">${fmt(row.normOthers)}</td></tr>`).join("");
  $("try-k-head").textContent = r.k === null ? "to k (off)" : `to k = ${r.k}`;
  $("try-tokens").textContent = `${r.ids.length} tokens: ` + r.tokens.map((t, i) => `${i}:${t}`).join(" ");
  drawMap();
}

function drawMap() {
  const r = state.result;
  if (!r) return;
  const l = Number($("try-layer").value), h = Number($("try-head").value), T = r.T;
  $("try-layer-out").textContent = l;
  $("try-head-out").textContent = h;
  const canvas = $("try-map");
  canvas.width = canvas.height = T;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(T, T);
  const base = (l * r.H + h) * T * T;
  for (let i = 0; i < T * T; i++) {
    const v = Math.max(0, Math.min(1, r.att[base + i]));
    const c = Math.round(255 * (1 - v));  // white (0) to dark blue (1)
    img.data.set([c, c, 255 - Math.round(120 * v), 255], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
}

async function update() {
  if (state.busy) { state.pending = true; return; }
  state.busy = true;
  try {
    do {
      state.pending = false;
      const start = performance.now();
      const name = $("try-model").value;
      let ids = encode($("try-text").value, $("try-bos").checked);
      if (ids.length > state.manifest.max_tokens) ids = ids.slice(0, state.manifest.max_tokens);
      const T = ids.length;
      if (T < 2) { $("try-status").textContent = "Type at least two tokens."; state.result = null; break; }
      const kInput = $("try-k");
      kInput.max = String(T - 1);
      const k = $("try-block").checked ? Math.min(Math.max(1, Number(kInput.value) || 1), T - 1) : null;
      const entry = state.manifest.models.find((m) => m.name === name);
      const sess = await session(name);
      const out = await sess.run({
        input_ids: new ort.Tensor("int64", BigInt64Array.from(ids.map(BigInt)), [1, T]),
        attention_mask: new ort.Tensor("float32", causalMask(T, k), [1, 1, T, T]),
      });
      const att = out.attentions.data, norms = out.hidden_norms.data;
      state.result = { name, ids, T, k, H: entry.heads, att, tokens: ids.map((i) => state.tokenizer.decode([i])),
                       rows: summarise(att, norms, entry.layers, entry.heads, T, k) };
      render();
      state.lastMs = performance.now() - start;
      state.updates++;
      $("try-status").textContent = `${name} (${entry.variant}) ran here, in this browser, on ${T} tokens` +
        `${k === null ? "" : `, token ${k} blocked from aggregating`}: ${state.lastMs.toFixed(0)} ms.` +
        (ids.length === state.manifest.max_tokens ? ` Cut to the first ${state.manifest.max_tokens} tokens.` : "");
    } while (state.pending);
  } catch (err) {
    $("try-status").textContent = "Error: " + err.message;
    console.error(err);
  } finally {
    state.busy = false;
  }
}

async function main() {
  state.manifest = await (await fetch(here("./browser/models.json"))).json();
  const [tj, tc] = await Promise.all(["tokenizer.json", "tokenizer_config.json"].map(
    async (f) => (await fetch(here("./browser/" + f))).json()));
  state.tokenizer = new Tokenizer(tj, tc);
  const select = $("try-model");
  select.innerHTML = state.manifest.models.map((m) =>
    `<option value="${m.name}">${m.name} (${m.variant}, ${(m.bytes / 1e6).toFixed(1)} MB)</option>`).join("");
  const first = state.manifest.models[0];
  $("try-layer").max = String(first.layers - 1);
  $("try-head").max = String(first.heads - 1);
  for (const id of ["try-text", "try-model", "try-bos", "try-block", "try-k"]) {
    $(id).addEventListener(id === "try-text" || id === "try-k" ? "input" : "change", update);
  }
  for (const id of ["try-layer", "try-head"]) $(id).addEventListener("input", drawMap);
  await update();
  state.ready = true;
}

main().catch((err) => {
  $("try-status").textContent = "Could not start: " + err.message;
  console.error(err);
});
