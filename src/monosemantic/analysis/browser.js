// The feature browser: renders window.MS (written by monosemantic.analysis.browser) into #app.
// Routes: #features, #neurons (tables); #features/<i>, #neurons/<i> (one unit's page).
"use strict";
const D = window.MS;
const pages = { features: {}, neurons: {} };
const waiting = {};
const NAMES = { features: "Feature", neurons: "Neuron" };
const PROXY_COLS = [["token_specificity", "token spec."], ["context_consistency", "context cons."],
                    ["logit_coherence", "logit coh."]];
let sortState = { features: ["density", false], neurons: ["density", false] };
let query = "", showDead = false;

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function tokText(id) {
  if (id < 0) return "";
  return D.vocab[id].replace(/\n/g, "⏎").replace(/\t/g, "⇥");
}
function fmt(x, d) { return x === null || x === undefined ? "–" : Number(x).toPrecision(d || 3); }

// ---- chunks of unit pages, loaded with <script> tags (file:// pages may not fetch) ----
window.MSLoaded = function (kind, chunk, data) {
  pages[kind][chunk] = data;
  (waiting[kind + chunk] || []).forEach(f => f());
  delete waiting[kind + chunk];
};
function withPage(kind, id, cb) {
  const c = Math.floor(id / D.chunk);
  if (pages[kind][c]) return cb(pages[kind][c][id % D.chunk]);
  const key = kind + c;
  const first = !waiting[key];
  (waiting[key] = waiting[key] || []).push(() => cb(pages[kind][c][id % D.chunk]));
  if (!first) return;
  const s = document.createElement("script");
  s.src = "data/" + kind + "-" + String(c).padStart(4, "0") + ".js";
  s.onerror = () => { app().innerHTML = "<p>Could not load " + esc(s.src) + ": keep the data/ folder beside index.html.</p>"; };
  document.head.appendChild(s);
}
function app() { return document.getElementById("app"); }

// ---- index ----
function header() {
  const m = D.meta;
  const splits = Object.entries(m.tokens_by_split).map(([k, v]) => v.toLocaleString() + " " + k).join(" + ");
  return `<h1>${esc(m.sae_name)}: ${m.d_sae.toLocaleString()} features, ${m.d_mlp} neurons</h1>
    <div class=meta>SAE <code>${esc(m.sae_path)}</code> · transformer <code>${esc(m.transformer)}</code><br>
    ${m.n_tokens.toLocaleString()} tokens read (${esc(splits)}; held-out split first) in ${fmt(m.wall_s, 3)} s ·
    made ${esc(m.created)}</div>`;
}
function proxyTable() {
  const rows = D.meta.proxy_summary;
  let h = `<table><tr><th>units</th><th>eligible (≥ ${D.meta.n_sample} firings)</th>` +
    PROXY_COLS.map(([, l]) => `<th>${l} median</th>`).join("") + "</tr>";
  for (const [name, s] of Object.entries(rows)) {
    h += `<tr><td>${esc(name)}</td><td class=num>${s.n_eligible} / ${s.n_units}</td>` +
      PROXY_COLS.map(([k]) => `<td class=num>${fmt(s[k + "_median"])}</td>`).join("") + "</tr>";
  }
  h += "</table><p class=small>Each proxy is measured on a uniform random sample of exactly " +
    `${D.meta.n_sample} firings per unit, so rare units are not favoured; see the README for definitions.</p>`;
  const bands = D.meta.proxy_by_density;
  if (!bands) return h;
  h += "<table><tr><th>density band</th>" + Object.keys(bands).map(k => `<th>${esc(k)}: n · ` +
    PROXY_COLS.map(([, l]) => l).join(" / ") + "</th>").join("") + "</tr>";
  bands.features.forEach((b, i) => {
    h += `<tr><td>${b.density_lo.toExponential(0)} – ${b.density_hi.toExponential(0)}</td>` +
      Object.values(bands).map(rows => `<td class=num>${rows[i].n_eligible} · ` +
        PROXY_COLS.map(([k]) => fmt(rows[i][k + "_median"])).join(" / ") + "</td>").join("") + "</tr>";
  });
  return h + "</table><p class=small>The same medians at matched firing density (units with at least " +
    `${D.meta.n_sample} firings, by density band).</p>`;
}
function tableHtml(kind) {
  const t = D.tables[kind];
  const n = t.density.length;
  const [key, asc] = sortState[kind];
  const q = query.trim().toLowerCase();
  let idx = [];
  for (let i = 0; i < n; i++) {
    if (!showDead && t.n_fires[i] === 0) continue;
    if (q && !(String(i) === q || t.label[i].toLowerCase().includes(q) ||
               t.top_tokens[i].some(([tok]) => D.vocab[tok].toLowerCase().includes(q)))) continue;
    idx.push(i);
  }
  const val = i => key === "id" ? i : key === "label" ? t.label[i] : t[key][i];
  idx.sort((a, b) => {
    let x = val(a), y = val(b);
    if (x === null) x = -Infinity;
    if (y === null) y = -Infinity;
    return (x < y ? -1 : x > y ? 1 : a - b) * (asc ? 1 : -1);
  });
  const cols = [["id", "#"], ["label", "label"], ["density", "density"], ["n_fires", "firings"], ["max", "max act"],
                ["mean", "mean act"], ["top_tokens", "top tokens (share of mass)"], ...PROXY_COLS];
  let h = `<table class=units><thead><tr>` + cols.map(([k, l]) =>
    `<th data-key="${k}" class="${k === key ? "sorted" + (asc ? " asc" : "") : ""}">${l}</th>`).join("") +
    "</tr></thead><tbody>";
  for (const i of idx) {
    h += `<tr data-unit="${kind}" data-id="${i}"><td class=num><a href="#${kind}/${i}">${i}</a></td>` +
      `<td><code>${esc(t.label[i])}</code></td><td class=num>${fmt(t.density[i])}</td>` +
      `<td class=num>${t.n_fires[i]}</td><td class=num>${fmt(t.max[i])}</td><td class=num>${fmt(t.mean[i])}</td>` +
      `<td>${t.top_tokens[i].map(([tok, s]) => `<code>${esc(JSON.stringify(D.vocab[tok]))}</code> ${Math.round(100 * s)}%`).join(", ")}</td>` +
      PROXY_COLS.map(([k]) => `<td class=num>${fmt(t[k][i])}</td>`).join("") + "</tr>";
  }
  return { html: h + "</tbody></table>", shown: idx.length };
}
function renderIndex(kind) {
  const t = D.tables[kind];
  const dead = t.n_fires.filter(x => x === 0).length;
  const imgs = Object.entries(D.images).map(([k, v]) => `<img alt="${esc(k)}" src="${v}">`).join("");
  app().innerHTML = header() + `<div class=plots>${imgs}</div><h2>Interpretability proxies</h2>${proxyTable()}` +
    `<h2>Units</h2><div class=tabs>` + Object.keys(NAMES).map(k =>
      `<a href="#${k}" class="${k === kind ? "on" : ""}">${NAMES[k]}s (${D.tables[k].density.length})</a>`).join("") +
    `</div><div class=controls><input type=search id=q placeholder="search label, token or #id" value="${esc(query)}">` +
    `<label><input type=checkbox id=dead ${showDead ? "checked" : ""}> show dead (${dead})</label>` +
    `<span id=count class=small></span></div><div id=tbl></div>`;
  const draw = () => {
    const r = tableHtml(kind);
    document.getElementById("tbl").innerHTML = r.html;
    document.getElementById("count").textContent = r.shown + " shown";
    document.querySelectorAll("th[data-key]").forEach(th => th.onclick = () => {
      const k = th.dataset.key;
      sortState[kind] = [k, sortState[kind][0] === k ? !sortState[kind][1] : k === "id" || k === "label"];
      draw();
    });
  };
  document.getElementById("q").oninput = e => { query = e.target.value; draw(); };
  document.getElementById("dead").onchange = e => { showDead = e.target.checked; draw(); };
  draw();
}

// ---- one unit ----
function contextHtml(row, withQuantile) {
  let q = "", i = 0;
  if (withQuantile) { q = `<span class=val title="cumulative share of firings up to this activation bin">≤${row[0]}%</span>`; i = 1; }
  const [value, ids, shade] = row.slice(i);
  const center = D.meta.ctx_before;
  const spans = ids.map((id, j) => {
    if (id < 0) return "";
    const a = shade[j] / 100;
    const cls = "tok" + (j === center ? " center" : "");
    return `<span class="${cls}" style="background: rgba(255, 130, 0, ${a.toFixed(2)})" title="${esc(JSON.stringify(D.vocab[id]))}: ${fmt(a)} × max">${esc(tokText(id))}</span>`;
  }).join("");
  return `<div class=ctx>${q}<span class=val>${fmt(value)}</span>${spans}</div>`;
}
function histSvg(h) {
  if (!h) return "<p class=small>never fired</p>";
  const [lo, counts] = h;
  const W = 520, H = 120, bw = W / counts.length, top = Math.max(...counts);
  const bars = counts.map((c, j) => `<rect x="${(j * bw).toFixed(1)}" y="${(H - 100 * c / top).toFixed(1)}" ` +
    `width="${Math.max(bw - 1, 1).toFixed(1)}" height="${(100 * c / top).toFixed(1)}"><title>${c}</title></rect>`).join("");
  const e = D.edges;
  return `<svg class=hist width="${W}" height="${H + 16}">${bars}<text x=0 y="${H + 13}">10^${e[lo]}</text>` +
    `<text x="${W - 40}" y="${H + 13}">10^${e[lo + counts.length]}</text></svg>` +
    `<div class=small>non-zero activations, log10 bins (${counts.reduce((a, b) => a + b, 0)} firings)</div>`;
}
function logitTable(p) {
  const cell = ([t, v]) => `<td><code>${esc(JSON.stringify(D.vocab[t]))}</code></td><td class=num>${fmt(v)}</td>`;
  let h = "<table class=logit-table><tr><th colspan=2>promoted</th><th colspan=2>suppressed</th></tr>";
  for (let i = 0; i < p.logit_pos.length; i++) h += "<tr>" + cell(p.logit_pos[i]) + cell(p.logit_neg[i]) + "</tr>";
  return h + "</table><p class=small>direct effect on the logits through the MLP output and the unembedding, " +
    "final LayerNorm linearised (its 1/σ dropped), shifted by the median over the vocabulary</p>";
}
function renderUnit(kind, id) {
  const t = D.tables[kind];
  if (!(id >= 0 && id < t.density.length)) { app().innerHTML = `<p>No ${kind} #${esc(id)}. <a href="#${kind}">back</a></p>`; return; }
  app().innerHTML = "Loading…";
  withPage(kind, id, p => {
    const links = (list, k) => list.map(([j, v]) => `<a href="#${k}/${j}">${j}</a> <span class=small>(${fmt(v)}; ${esc(D.tables[k].label[j])})</span>`).join("<br>");
    let h = `<p><a href="#${kind}">← all ${kind}</a></p><h1>${NAMES[kind]} ${id} <code>${esc(t.label[id])}</code></h1>` +
      `<div><span class=stat>density ${fmt(t.density[id])}</span><span class=stat>${t.n_fires[id]} firings</span>` +
      `<span class=stat>max ${fmt(t.max[id])}</span><span class=stat>mean ${fmt(t.mean[id])}</span>` +
      PROXY_COLS.map(([k, l]) => `<span class=stat>${l} ${fmt(t[k][id])}</span>`).join("") + "</div>" +
      `<h2>Top activations</h2><div class=top>${p.top.map(r => contextHtml(r, false)).join("") || "<p>none</p>"}</div>` +
      `<h2>Examples across the activation range</h2><p class=small>random firings from each log10 activation bin, ` +
      `strongest first; the left column is the share of firings at or below the bin</p>` +
      `<div class=quantiles>${p.quantiles.map(r => contextHtml(r, true)).join("") || "<p>none</p>"}</div>` +
      `<div class=grid><div><h2>Activation histogram</h2>${histSvg(p.hist)}</div>` +
      `<div><h2>Logit effect</h2>${logitTable(p)}</div>`;
    if (p.neurons) h += `<div><h2>Top neurons by decoder weight</h2>${links(p.neurons, "neurons")}</div>`;
    if (p.corr) h += `<div><h2>Most correlated features</h2>${links(p.corr, "features")}</div>`;
    app().innerHTML = h + "</div>";
    window.scrollTo(0, 0);
  });
}

function route() {
  const m = location.hash.match(/^#(features|neurons)(?:\/(\d+))?$/);
  if (m && m[2] !== undefined) renderUnit(m[1], Number(m[2]));
  else renderIndex(m ? m[1] : "features");
}
window.addEventListener("hashchange", route);
route();
