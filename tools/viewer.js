"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const PAGE = 20;  // groups (or items) rendered at a time
const app = document.getElementById("app");

// --- helpers: every string from the data becomes a text node or an attribute value, never HTML
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of kids.flat()) if (has(c) && c !== false) e.append(c instanceof Node ? c : String(c));
  return e;
}
function sv(tag, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);  // a namespace name, not a request
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
const num = x => typeof x === "number" && isFinite(x);
const has = x => x !== null && x !== undefined;
const yes = x => x === 1 || x === true;  // accuracy / correct: 1 or true
const fmt = (x, d = 3) => !num(x) ? "\u2013" : Number.isInteger(x) ? String(x) : x.toFixed(Math.abs(x) >= 1000 ? 0 : d);
const pct = x => num(x) ? (100 * x).toFixed(1) + "%" : "\u2013";
const sgn = (x, d = 2) => num(x) ? (x >= 0 ? "+" : "") + x.toFixed(d) : "\u2013";
const uniq = xs => [...new Set(xs.filter(has))].sort((a, b) => a < b ? -1 : a > b ? 1 : 0);
const dot = parts => parts.filter(has).join(" \u00b7 ");
function quantile(arrays, q) {  // of |x| over the arrays (at most ~50k values looked at)
  let n = 0;
  for (const a of arrays) n += a ? a.length : 0;
  const stride = Math.max(1, Math.floor(n / 50000)), v = [];
  let i = 0;
  for (const a of arrays) if (a) for (const x of a) if (i++ % stride === 0 && num(x)) v.push(Math.abs(x));
  v.sort((a, b) => a - b);
  return v.length ? v[Math.min(v.length - 1, Math.floor(q * (v.length - 1)))] : 0;
}
const alpha = (v, max) => (0.04 + 0.8 * Math.min(1, Math.abs(v) / (max || 1))).toFixed(3);
const ORANGE = "240, 90, 20", GREEN = "26, 152, 80", RED = "215, 48, 39", BLUE = "33, 102, 172";
const heat = (v, max) => num(v) ? `rgba(${ORANGE}, ${alpha(v, max)})` : null;  // light -> dark orange
const diverge = (v, max, pos, neg) => num(v) ? `rgba(${v >= 0 ? pos : neg}, ${alpha(v, max)})` : null;
const swatch = (...c) => el("span", {class: "sw", style: `background:linear-gradient(to right,${c.join(",")})`});
const light = c => `rgba(${c},.04)`, dark = c => `rgba(${c},.84)`;
const legend = parts => el("div", {class: "legend"}, parts);

function images(idx) {  // small images (the embedded task's 64 px) at 128 px, pixels kept sharp
  return el("div", {class: "imgs"}, (idx || []).map(i => {
    const im = D.images[i];
    if (!im || !im.src) return el("div", {class: "missing"}, "missing image: " + (im ? im.path : i));
    return el("img", {src: im.src, title: im.path, alt: "image", class: im.width < 128 ? "small" : null});
  }));
}
function question(q, options) {
  const box = el("div", {class: "q"}, q.replace(/\n?<image>/g, ""));
  for (const [i, o] of (options || []).entries()) box.append("\n" + String.fromCharCode(65 + i) + ". " + o);
  return box;
}
// a response as token spans. color: undefined (not tokenized: plain text) or i -> CSS colour, or null for "no value"
// (grey); crit: indices to outline; info: i -> tooltip text (made on first hover, not for every token up front)
function tokens(pieces, color, crit, info) {
  const box = el("div", {class: "resp"}), c = new Set(crit || []), frag = document.createDocumentFragment();
  for (let i = 0; i < pieces.length; i++) {
    const s = document.createElement("span");
    s.className = "tok" + (c.has(i) ? " crit" : "") + (pieces[i] === "" ? " empty" : "");
    s.textContent = pieces[i] === "" ? "\u2205" : pieces[i];  // a token that decodes to nothing: a mark
    const bg = color ? color(i) : undefined;
    if (bg === null) s.classList.add("na");
    else if (bg) s.style.backgroundColor = bg;
    s.dataset.i = i;
    frag.append(s);
  }
  box.append(frag);
  box._info = info;
  return box;
}
document.addEventListener("mouseover", e => {
  const t = e.target, info = t.parentNode && t.parentNode._info;
  if (t.classList && t.classList.contains("tok") && !t.title && info) t.title = info(+t.dataset.i);
});
function buttons(id, values, labels, current, onpick) {  // one of several, current on
  const box = el("span", {class: "btns", id});
  for (const v of values) box.append(el("button", {"data-v": v, class: v === current ? "on" : null, onclick: e => {
    for (const b of box.children) b.classList.toggle("on", b === e.currentTarget);
    onpick(v);
  }}, labels[v] || v));
  return box;
}
function selectBox(id, values, labels, current, onpick) {  // (current as an attribute: it shows in the DOM)
  const s = el("select", {id, onchange: () => onpick(s.value)},
               values.map(v => el("option", {value: v, selected: v === current}, labels[v] || v)));
  return s;
}
// the first view can come from the URL: rollouts.html#step=5&filter=wrong&page=2 (a link to a view; the tests
// read the DOM of such views). choices: key -> the values its control offers; anything else is ignored
function fromHash(st, choices) {
  for (const [k, v] of new URLSearchParams(location.hash.slice(1))) {
    if (k === "page" && /^[1-9]\d*$/.test(v)) st.page = +v - 1;  // from 1, as shown; pager() clamps it
    else if (Object.hasOwn(choices, k) && choices[k].map(String).includes(v)) st[k] = num(st[k]) ? +v : v;
  }
}
const FILTERS = ["all", "correct", "wrong", "truncated"];  // of the samples (items) shown
function table(head, rows, cls) {  // rows: arrays of cells, or {cls, cells}
  return el("table", {class: cls}, el("tr", {}, head.map(h => el("th", {}, h))),
            rows.map(r => el("tr", {class: r.cls || null}, (r.cells || r).map(c => el("td", {}, c)))));
}
function pager(n, st, redraw) {
  const pages = Math.max(1, Math.ceil(n / PAGE));
  st.page = Math.min(st.page, pages - 1);
  const go = d => () => { st.page += d; redraw(); };
  return el("span", {}, el("button", {id: "prev", disabled: st.page === 0, onclick: go(-1)}, "\u25c0"),
            el("span", {id: "page"}, ` page ${st.page + 1}/${pages} `),
            el("button", {id: "next", disabled: st.page >= pages - 1, onclick: go(1)}, "\u25b6"));
}

// --- a small plot. series: {pts: [[x, y or null]], color, axis: "left" | "right", err: [spread], dotsOnly}
// o: {w, h, xname, marks: [x] (dotted lines), cursor: true (svg._cursor(x) moves a dotted line)}
function plot(title, series, o = {}) {
  const W = o.w || 250, H = o.h || 130, L = 44, R = series.some(s => s.axis === "right") ? 44 : 10, T = 18, B = 20;
  const svg = sv("svg", {class: "plot", width: W, height: H, viewBox: `0 0 ${W} ${H}`});
  const ok = p => num(p[0]) && num(p[1]);
  const span = (vals, pad) => {
    let a = Math.min(...vals), b = Math.max(...vals);
    if (!vals.length) [a, b] = [0, 1];
    if (a === b) [a, b] = [a - (pad ? Math.abs(a) * 0.1 || 0.5 : 1), b + (pad ? Math.abs(b) * 0.1 || 0.5 : 1)];
    return [a, b];
  };
  const [x0, x1] = span(series.flatMap(s => s.pts.filter(ok).map(p => p[0])), false);
  const yr = axis => span(series.filter(s => (s.axis || "left") === axis).flatMap(s => s.pts.flatMap((p, i) => {
    const e = s.err && num(s.err[i]) ? s.err[i] : 0;
    return ok(p) ? [p[1] - e, p[1] + e] : [];
  })), true);
  const ranges = {left: yr("left"), right: yr("right")};
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const Y = (y, axis) => { const [a, b] = ranges[axis || "left"]; return H - B - (y - a) / (b - a) * (H - T - B); };
  const fx = v => Number.isInteger(v) ? String(v) : v.toFixed(x1 - x0 < 1 ? 3 : x1 - x0 < 10 ? 2 : 0);
  svg.append(sv("text", {x: 4, y: 12, class: "title"}, title),
             sv("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}),
             sv("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}),
             sv("text", {x: L - 3, y: T + 8, "text-anchor": "end"}, fmt(ranges.left[1])),
             sv("text", {x: L - 3, y: H - B, "text-anchor": "end"}, fmt(ranges.left[0])),
             sv("text", {x: L, y: H - 6}, fx(x0)),
             sv("text", {x: W - R, y: H - 6, "text-anchor": "end"}, (o.xname || "step") + " " + fx(x1)));
  if (R > 10) svg.append(sv("line", {x1: W - R, y1: T, x2: W - R, y2: H - B, class: "axis"}),
                         sv("text", {x: W - R + 3, y: T + 8}, fmt(ranges.right[1])),
                         sv("text", {x: W - R + 3, y: H - B}, fmt(ranges.right[0])));
  for (const s of series) {
    let d = "", pen = false;  // a gap (null) lifts the pen
    for (const p of s.pts) {
      if (!ok(p)) { pen = false; continue; }
      d += (pen ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1], s.axis).toFixed(1);
      pen = true;
    }
    if (!s.dotsOnly) svg.append(sv("path", {d, class: "line", stroke: s.color, "data-n": s.pts.filter(ok).length}));
    s.pts.forEach((p, i) => {
      if (!ok(p)) return;
      const [x, y] = p, cx = X(x).toFixed(1);
      if (s.err && num(s.err[i])) {
        const [lo, hi] = [Y(y - s.err[i], s.axis), Y(y + s.err[i], s.axis)];
        svg.append(sv("line", {x1: cx, x2: cx, y1: lo, y2: hi, stroke: s.color}));
      }
      if (s.pts.length > 40 && !s.dotsOnly) return;  // dots only where they can be told apart
      svg.append(sv("circle", {cx, cy: Y(y, s.axis).toFixed(1), r: 2.5, fill: s.color}));
    });
  }
  for (const m of o.marks || []) svg.append(sv("line", {x1: X(m), x2: X(m), y1: T, y2: H - B, class: "cursor"}));
  if (o.cursor) {
    const c = sv("line", {y1: T, y2: H - B, class: "cursor", visibility: "hidden"});
    svg.append(c);
    svg._cursor = x => {
      const on = num(x) && x >= x0 && x <= x1;
      if (on) { c.setAttribute("x1", X(x)); c.setAttribute("x2", X(x)); }
      c.setAttribute("visibility", on ? "visible" : "hidden");
    };
  }
  return svg;
}

// --- GRPO run: curves from log.jsonl, then the dumped groups of rollouts.jsonl, one step at a time
const CURVES = [["reward", "reward"], ["accuracy", "accuracy"], ["format", "format"],
  ["resp_len", "mean response length"], ["truncated", "truncated share"], ["clip_frac", "clip fraction"],
  ["gnorm", "grad norm"], ["entropy", "mean entropy"], ["critical_entropy", "critical-token entropy"],
  ["high_entropy_share", "high-entropy share"], ["val_accuracy", "val accuracy"]];
function runCurves(log) {  // -> [the section, its plots]
  const box = el("div", {id: "curves"}, el("h2", {}, "Run curves (log.jsonl)"));
  if (!log) return [el("div", {}, box, el("p", {class: "note"}, "no log.jsonl in this directory")), []];
  const plots = el("div", {class: "plots"}), missing = [], svgs = [];
  for (const [key, label] of CURVES) {
    const pts = log.filter(r => key in r).map(r => [r.step, r[key]]);  // null: a gap
    const vals = pts.filter(p => num(p[1]));
    if (!vals.length) { missing.push(key); continue; }
    const svg = plot(`${label}: ${fmt(vals[vals.length - 1][1])}`, [{pts, color: "#1f77b4"}], {cursor: true});
    svg.setAttribute("data-key", key);
    plots.append(svg);
    svgs.push(svg);
  }
  box.append(plots);
  if (missing.length) {
    box.append(el("p", {class: "note", id: "curves-missing"}, "not in log.jsonl (no curve): " + missing.join(", ")));
  }
  return [box, svgs];
}

function renderRollouts() {
  app.append(el("h1", {}, "GRPO rollouts: " + D.title), el("div", {class: "muted"}, D.source));
  const [curves, svgs] = runCurves(D.log);
  app.append(curves, el("h2", {}, "Rollouts (rollouts.jsonl)"));
  const G = D.groups;
  const note = text => app.append(el("p", {class: "note"}, text));
  if (!G) return note("no rollouts.jsonl in this directory (grpo.py writes it every dump_every steps)");
  if (!G.length) return note("rollouts.jsonl is empty");
  for (const g of G) g.allEqual = g.samples.length > 0 && g.samples.every(s => s.reward === g.samples[0].reward);
  const S = G.flatMap(g => g.samples);
  const advlogp = s => s.logp && num(s.advantage) ? i => -s.advantage * s.logp[i] : null;  // > 0: pushed up
  const scale = {entropy: quantile(S.map(s => s.entropy), 0.98) || 1, dlogp: quantile(S.map(s => s.dlogp), 1) || 1e-6,
                 advlogp: quantile(S.map(s => advlogp(s) && s.logp.map((_, i) => advlogp(s)(i))), 0.98) || 1};
  const MODES = {
    entropy: {label: "entropy", off: !S.some(s => s.entropy),
              color: s => s.entropy ? i => heat(s.entropy[i], scale.entropy) : null,
              legend: () => ["low ", swatch(light(ORANGE), dark(ORANGE)),
                             ` high entropy (${fmt(scale.entropy, 2)} nats and above)`]},
    advlogp: {label: "advantage \u00d7 log-prob", off: !S.some(s => s.logp),
              color: s => advlogp(s) ? i => diverge(advlogp(s)(i), scale.advlogp, GREEN, RED) : null,
              legend: () => ["pushed down (A < 0) ", swatch(dark(RED), light(RED), light(GREEN), dark(GREEN)),
                             " pushed up (A > 0); darker: larger |A \u00d7 log p|",
                             ` (${fmt(scale.advlogp, 2)} and above)`]},
    dlogp: {label: "train \u2212 rollout log-prob", off: !S.some(s => s.dlogp),
            color: s => s.dlogp ? i => diverge(s.dlogp[i], scale.dlogp, RED, BLUE) : null,
            legend: () => ["trainer lower ", swatch(dark(BLUE), light(BLUE), light(RED), dark(RED)),
                           ` trainer higher (train_logp \u2212 logp, up to ${scale.dlogp.toExponential(1)});`,
                           " grey: no train_logp"]},
  };
  const steps = uniq(G.map(g => g.step)), domains = uniq(G.map(g => g.domain));
  const st = {step: steps[steps.length - 1], mode: "entropy", filter: "all", domain: "", groups: "all", page: 0};
  const GROUPS = ["all", "equal", "varied"];
  fromHash(st, {step: steps, mode: Object.keys(MODES).filter(k => !MODES[k].off), filter: FILTERS, groups: GROUPS,
                domain: domains});
  const okSample = s => st.filter === "all" || (st.filter === "correct" ? yes(s.accuracy)
    : st.filter === "wrong" ? !yes(s.accuracy) : s.finish_reason === "length");
  const okGroup = g => g.step === st.step && (!st.domain || g.domain === st.domain) &&
    (st.groups === "all" || (st.groups === "equal") === g.allEqual);
  const set = (k, v) => { st[k] = v; st.page = 0; draw(); };
  const list = el("div", {id: "list"}), count = el("span", {id: "count"}), pg = el("span", {}), leg = el("div", {});
  const modes = el("span", {}, "colour: ", Object.entries(MODES).map(([k, m]) => el("label", {},
    el("input", {type: "radio", name: "mode", value: k, checked: k === st.mode, disabled: m.off,
                 onchange: () => set("mode", k)}),
    " " + m.label + (m.off ? " (not in this dump)" : ""), " ")));
  const bar = el("div", {class: "bar"},
    el("label", {}, "step ", selectBox("step", steps.map(String), {}, String(st.step), v => set("step", +v))),
    el("span", {class: "muted"}, `(${steps.length} dumped steps)`), modes,
    el("span", {}, "samples: ", buttons("filter", FILTERS, {}, st.filter, v => set("filter", v))),
    el("span", {}, "groups: ", buttons("groups", GROUPS,
                                       {equal: "all-equal only (A = 0)", varied: "hide all-equal"}, st.groups,
                                       v => set("groups", v))),
    domains.length ? el("label", {}, "domain ", selectBox("domain", ["", ...domains], {"": "all"}, st.domain,
                                                            v => set("domain", v))) : null,
    pg, count);
  app.append(bar, leg, list);

  function sampleCard(g, s, k) {
    const acc = yes(s.accuracy), trunc = s.finish_reason === "length", good = "badge " + (acc ? "ok" : "bad");
    const head = el("div", {class: "shead"}, el("b", {}, "#" + k),
      el("span", {class: good}, `reward ${fmt(s.reward, 2)}: acc ${fmt(s.accuracy)}, fmt ${fmt(s.format)}`),
      el("span", {class: "badge"}, "A " + sgn(s.advantage)),
      el("span", {class: good}, `pred ${has(s.pred) ? s.pred : "none"} / gold ${g.answer}`),
      el("span", {}, `${fmt(s.n_tokens)} tok`),
      el("span", {class: "badge" + (trunc ? " warn" : "")}, s.finish_reason || "?"),
      s.critical.length ? el("span", {}, `${s.critical.length} critical`) : null,
      st.mode === "dlogp" && !s.dlogp ? el("span", {class: "muted"}, "no train_logp") : null);
    const info = i => [`#${i} ${JSON.stringify(s.pieces[i])}`, s.entropy && `entropy ${fmt(s.entropy[i])}`,
      s.logp && `logp ${fmt(s.logp[i], 4)}`, s.dlogp && `train \u2212 rollout ${s.dlogp[i]}`,
      advlogp(s) && `A \u00d7 logp ${fmt(-advlogp(s)(i), 4)}`].filter(x => x).join(" | ");
    const color = s.tokenized ? MODES[st.mode].color(s) || (() => null) : undefined;
    return el("div", {class: "sample " + (acc ? "correct" : "wrong") + (trunc ? " truncated" : "")}, head,
              tokens(s.pieces, color, s.critical, s.tokenized ? info : null));
  }
  function groupCard(g, shown) {
    const nc = g.samples.filter(s => yes(s.accuracy)).length;
    const mean = g.samples.reduce((a, s) => a + (s.reward || 0), 0) / (g.samples.length || 1);
    return el("div", {class: "group"},
      el("div", {class: "ghead"}, dot([`step ${g.step}`, has(g.prompt_index) ? `prompt ${g.prompt_index}` : null, g.id,
        g.domain, g.difficulty, `${nc}/${g.samples.length} correct`, `mean reward ${fmt(mean, 2)}`,
        g.allEqual ? "all equal: zero advantage" : null])),
      el("div", {class: "prompt"}, images(g.images),
         el("div", {}, question(g.question, g.options), el("div", {class: "gold"}, "gold: " + g.answer))),
      el("div", {class: "samples"}, shown.map(k => sampleCard(g, g.samples[k], k))));
  }
  function draw() {
    const shown = [];  // [group, indices of its samples that pass the filter]
    for (const g of G) {
      if (!okGroup(g)) continue;
      const ks = g.samples.map((s, k) => okSample(s) ? k : -1).filter(k => k >= 0);
      if (ks.length) shown.push([g, ks]);
    }
    pg.replaceChildren(pager(shown.length, st, draw));
    const n = shown.reduce((a, x) => a + x[1].length, 0);
    count.textContent = `${shown.length} groups, ${n} samples at step ${st.step}`;
    leg.replaceChildren(legend([...MODES[st.mode].legend(), "; ", el("span", {class: "tok crit"}, "critical"),
                                " tokens outlined; hover a token for its numbers"]));
    list.replaceChildren(...shown.slice(st.page * PAGE, (st.page + 1) * PAGE).map(([g, ks]) => groupCard(g, ks)));
    for (const s of svgs) s._cursor(st.step);
  }
  draw();
}

// --- eval run: summary and breakdown tables, then the items; --compare: a second run beside the first
function renderEval() {
  const A = D.items, C = D.compare, SA = D.summary, K = ["domain", "subject", "difficulty"];
  const key = r => r.id + "\u0000" + r.run;
  const B = C ? new Map(C.items.map(r => [key(r), r])) : null;
  app.append(el("h1", {}, "Evaluation: " + D.title + (C ? " vs " + C.title : "")),
             el("div", {class: "muted"}, D.source + (C ? " | " + C.source : "")));
  const metrics = s => [pct(s.accuracy) + (num(s.accuracy_std) ? " \u00b1 " + pct(s.accuracy_std) : ""),
                        pct(s["pass@" + s.k]), pct(s.format), fmt(s.mean_tokens, 1), pct(s.truncation_rate),
                        fmt(s.n_items), fmt(s.k)];
  app.append(el("h2", {}, "Summary (summary.json)"),
             table(["run", "accuracy", "pass@k", "format", "mean tokens", "truncated", "items", "k"],
                   [[D.title, ...metrics(SA)], ...(C ? [[C.title, ...metrics(C.summary)]] : [])], "summary"));
  const tabs = el("div", {class: "tables", id: "breakdown"});
  for (const k of K) {
    const a = SA["by_" + k] || {}, b = C ? C.summary["by_" + k] || {} : null, n = SA["n_by_" + k] || {};
    const groups = uniq([...Object.keys(a), ...Object.keys(b || {})]);
    if (!groups.length) continue;
    tabs.append(table(C ? [k, D.title, C.title, "\u0394", "n"] : [k, "accuracy", "n"], groups.map(g => C
      ? [g, pct(a[g]), pct(b[g]), num(a[g]) && num(b[g]) ? sgn(100 * (a[g] - b[g]), 1) : "\u2013", fmt(n[g])]
      : [g, pct(a[g]), fmt(n[g])]), "by_" + k));
  }
  if (tabs.children.length) app.append(el("h2", {}, "By domain / subject / difficulty"), tabs);
  const scale = quantile([...A, ...(C ? C.items : [])].map(r => r.entropy), 0.98) || 1;
  const rows = A.map(r => ({a: r, b: B ? B.get(key(r)) || null : null}));
  const flip = r => !r.b || yes(r.a.correct) === yes(r.b.correct) ? "" : yes(r.a.correct) ? "a" : "b";
  const st = {filter: "all", flip: C ? "any" : "all", domain: "", subject: "", difficulty: "", page: 0};
  const FLIPS = ["any", "a", "b", "all"];
  const vals = Object.fromEntries(K.map(k => [k, uniq(A.map(r => has(r[k]) ? String(r[k]) : null))])
                                   .filter(([, v]) => v.length > 1));  // a select box each
  fromHash(st, {filter: FILTERS, flip: C ? FLIPS : [], ...vals});
  const ok = r => (st.filter === "all" || (st.filter === "correct" ? yes(r.a.correct)
      : st.filter === "wrong" ? !yes(r.a.correct) : yes(r.a.truncated))) &&
    (st.flip === "all" || (st.flip === "any" ? flip(r) !== "" : flip(r) === st.flip)) &&
    K.every(k => !st[k] || String(r.a[k]) === st[k]);
  const set = (k, v) => { st[k] = v; st.page = 0; draw(); };
  const list = el("div", {id: "list"}), count = el("span", {id: "count"}), pg = el("span", {});
  const bar = el("div", {class: "bar"},
    el("span", {}, "items: ", buttons("filter", FILTERS, {}, st.filter, v => set("filter", v))));
  if (C) {
    const na = rows.filter(r => flip(r) === "a").length, nb = rows.filter(r => flip(r) === "b").length;
    bar.append(el("span", {}, "compare: ", buttons("flip", FLIPS, {any: `flipped (${na + nb})`,
      a: `${D.title} right, ${C.title} wrong (${na})`, b: `${D.title} wrong, ${C.title} right (${nb})`,
      all: "all items"}, st.flip, v => set("flip", v))));
  }
  for (const k of K.filter(k => vals[k])) {
    bar.append(el("label", {}, k + " ", selectBox(k, ["", ...vals[k]], {"": "all"}, st[k], v => set(k, v))));
  }
  bar.append(pg, count);
  app.append(el("h2", {}, "Responses (responses.jsonl)"), bar, legend(["tokens coloured by entropy: low ",
    swatch(light(ORANGE), dark(ORANGE)), ` high (${fmt(scale, 2)} nats and above); hover a token for its number`]),
    list);
  function response(r, title) {
    const c = yes(r.correct), good = "badge " + (c ? "ok" : "bad");
    const info = i => `#${i} ${JSON.stringify(r.pieces[i])}` + (r.entropy ? ` | entropy ${fmt(r.entropy[i])}` : "");
    const color = r.tokenized ? (r.entropy ? i => heat(r.entropy[i], scale) : () => null) : undefined;
    return el("div", {class: "sample " + (c ? "correct" : "wrong")},
      el("div", {class: "shead"}, title ? el("b", {}, title) : null, el("span", {class: good}, c ? "correct" : "wrong"),
        el("span", {class: good}, `pred ${has(r.pred) ? r.pred : "none"} / answer ${r.answer}`),
        el("span", {}, `format ${fmt(r.format)}`), el("span", {}, `${fmt(r.n_tokens)} tok`),
        yes(r.truncated) ? el("span", {class: "badge warn"}, "truncated") : null,
        el("span", {}, `mean entropy ${fmt(r.mean_entropy)}`),
        r.tokenized ? null : el("span", {class: "muted"}, "(no token pieces in this dump)")),
      tokens(r.pieces, color, null, r.tokenized ? info : null));
  }
  function draw() {
    const shown = rows.filter(ok);
    pg.replaceChildren(pager(shown.length, st, draw));
    count.textContent = `${shown.length} of ${rows.length} items`;
    list.replaceChildren(...shown.slice(st.page * PAGE, (st.page + 1) * PAGE).map(r => el("div", {class: "item"},
      el("div", {class: "ihead"}, dot([r.a.id, `run ${r.a.run}`, ...K.map(k => r.a[k])])),
      el("div", {class: "prompt"}, images(r.a.images), question(r.a.question, r.a.options)),
      !C ? response(r.a) : el("div", {class: "pair"}, response(r.a, D.title),
                               r.b ? response(r.b, C.title) : el("div", {class: "note"}, "not in " + C.title)))));
  }
  draw();
}

// --- entropy.py: the checkpoints, critical-token entropy and accuracy against step, correlation, selection
function kv(obj, prefix = "") {  // a nested object -> [key, value] rows
  const out = [], show = x => num(x) ? fmt(x, 4) : x === null ? "\u2013" : String(x);
  for (const [k, v] of Object.entries(obj || {})) {
    if (v && typeof v === "object" && !Array.isArray(v)) out.push(...kv(v, prefix + k + "."));
    else out.push([prefix + k, Array.isArray(v) ? v.map(show).join(", ") : show(v)]);
  }
  return out;
}
function renderEntropy() {
  const R = D.report, rows = R.rows, sel = R.selection || {}, cfg = R.config || {};
  app.append(el("h1", {}, "Critical-token entropy: " + D.title), el("div", {class: "muted"}, D.source),
             el("div", {class: "muted"}, ["data", "group_size", "temperature", "max_new_tokens", "limit", "select", "threshold"]
               .filter(k => k in cfg).map(k => `${k}=${JSON.stringify(cfg[k])}`).join("  ")));
  const name = r => String(r.ckpt || r.path || "?").replace(/\/+$/, "").split("/").slice(-2).join("/");
  const COLS = [["step", r => fmt(r.step)], ["seed", r => fmt(r.seed)],
    ["accuracy", r => pct(r.accuracy) + (num(r.accuracy_std) ? " \u00b1 " + pct(r.accuracy_std) : "")],
    ["accuracy_se", r => pct(r.accuracy_se)],
    ["test_accuracy", r => pct(r.test_accuracy) +
      (num(r.test_accuracy_se) ? " \u00b1 " + pct(r.test_accuracy_se) : "")],
    ["critical_entropy", r => fmt(r.critical_entropy, 4)],
    ["critical_entropy_per_response", r => fmt(r.critical_entropy_per_response, 4)],
    ["critical_count", r => fmt(r.critical_count)], ["mean_entropy", r => fmt(r.mean_entropy, 4)],
    ["high_entropy_share", r => pct(r.high_entropy_share)], ["format", r => pct(r.format)],
    ["mean_tokens", r => fmt(r.mean_tokens, 1)], ["n_responses", r => fmt(r.n_responses)],
    ["seconds", r => fmt(r.seconds, 1)]].filter(([k]) => rows.some(r => has(r[k])));
  const si = num(sel.index) ? sel.index : -1;
  const cells = (r, i) => [name(r) + (i === si ? "  \u25c0 selected" : ""), ...COLS.map(c => c[1](r))];
  app.append(el("h2", {}, `Checkpoints (${rows.length})`),
             table(["checkpoint", ...COLS.map(c => c[0].replace(/_/g, " "))],
                   rows.map((r, i) => ({cls: i === si ? "selected" : null, cells: cells(r, i)})), "ckpts"));
  const byStep = rows.every(r => num(r.step)), xOf = (r, i) => byStep ? r.step : i;
  const seeds = uniq(rows.map(r => r.seed)), idx = rows.map((r, i) => [r, i]);
  const sets = seeds.length > 1 ? seeds.map(s => idx.filter(([r]) => r.seed === s)) : [idx];  // one line a seed
  const BLUES = ["#1f77b4", "#6baed6", "#08519c", "#9ecae1"], REDS = ["#d62728", "#fc9272", "#a50f15", "#fcbba1"];
  const series = sets.flatMap((set, j) => [
    {pts: set.map(([r, i]) => [xOf(r, i), r.critical_entropy]), color: BLUES[j % 4]},
    {pts: set.map(([r, i]) => [xOf(r, i), r.accuracy]), err: set.map(([r]) => r.accuracy_std), color: REDS[j % 4],
     axis: "right"}]);
  app.append(el("h2", {}, "Against step"), el("div", {class: "plots", id: "plots"},
    plot("critical-token entropy (blue, left) and accuracy (red, right)", series,
         {w: 560, h: 260, xname: byStep ? "step" : "checkpoint", marks: si >= 0 ? [xOf(rows[si], si)] : []}),
    plot("accuracy against critical-token entropy",
         [{pts: rows.map(r => [r.critical_entropy, r.accuracy]), color: "#444", dotsOnly: true}],
         {w: 330, h: 260, xname: "entropy"})),
    legend(["dotted line: the selected checkpoint; bars: \u00b1 the accuracy's spread over the k samples"]));
  if (Object.keys(R.correlation || {}).length) {
    app.append(el("h2", {}, "Correlation with accuracy"), table(["", "value"], kv(R.correlation), "kv correlation"));
  }
  app.append(el("h2", {}, "Selection"), Object.keys(sel).length ? table(["", "value"], kv(sel), "kv selection")
    : el("p", {class: "note"}, "no selection in entropy.json"));
  for (const k of Object.keys(R).filter(k => !["rows", "correlation", "selection", "config"].includes(k))) {
    app.append(el("h2", {}, k), el("pre", {class: "json"}, JSON.stringify(R[k], null, 1)));  // anything else, as JSON
  }
}

({grpo: renderRollouts, eval: renderEval, entropy: renderEntropy})[D.kind]();
