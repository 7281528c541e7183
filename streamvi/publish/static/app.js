// streamvi status page: polls /api/status every 2 s, fills the shell table and draws the
// plots on <canvas> by hand (no libraries: the page must work on air-gapped networks).
"use strict";

const REFRESH_MS = 2000;
const STALE_S = 10;

// A perceptually ordered palette (plasma, cut before its pale yellow end) so that the shell
// order reads from dark (low resolution) to bright (high resolution) and survives greyscale.
const PALETTE = ["#0d0887", "#4c02a1", "#7e03a8", "#a92395", "#cc4778", "#e56b5d",
                 "#f89441", "#e8a214"];

let lastOk = 0;
let failure = null;        // the service's own word that it is failed (status.failure)

function $(id) { return document.getElementById(id); }

function isNum(x) { return typeof x === "number" && Number.isFinite(x); }

function fmt(x, digits) { return isNum(x) ? x.toFixed(digits) : "–"; }

function fmtInt(x) { return isNum(x) ? Math.round(x).toLocaleString("en-US") : "–"; }

function fmtPct(x) { return isNum(x) ? (100 * x).toFixed(1) + " %" : "–"; }

function fmtDuration(s) {
  if (!isNum(s)) return "–";
  if (s < 120) return s.toFixed(0) + " s";
  if (s < 7200) return (s / 60).toFixed(0) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function shellColour(i, n) {
  if (n <= 1) return PALETTE[0];
  const t = i / (n - 1) * (PALETTE.length - 1);
  const a = Math.floor(t), b = Math.min(a + 1, PALETTE.length - 1), f = t - a;
  const ca = hexRgb(PALETTE[a]), cb = hexRgb(PALETTE[b]);
  const c = ca.map((v, k) => Math.round(v + f * (cb[k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function hexRgb(h) {
  return [1, 3, 5].map(i => parseInt(h.slice(i, i + 2), 16));
}

function setText(id, text) { $(id).textContent = text; }

// ------------------------------------------------------------------ tiles and table

function renderTiles(d) {
  const s = d.status || {};
  const c = s.counters || {};
  const shells = d.shells;
  const o = shells ? shells.overall : {};
  setText("t-crystals", fmtInt(s.crystals_merged));
  const settings = Object.entries(s.images_by_setting || {})
    .map(([op, n]) => `${fmtInt(n)} as ${op}`).join(", ");
  setText("t-crystals-note", `${fmtInt(c.crystals_received)} received · ` +
          `${fmtInt(s.duplicates)} duplicates · ${fmtInt(s.images_rejected)} left out as misfits` +
          (settings ? ` · settings: ${settings}` : ""));
  setText("t-rate", fmt(s.images_per_s, 1));
  setText("t-rate-note", `step ${fmtInt(s.steps)} · ${fmtInt(s.reflections_stored)} reflections`);
  setText("t-cut", fmt(d.merge.cc_half_cut, 1));
  renderResolution(d);
  // the training-free figure first: it moves only when data arrive
  setText("t-cchalf", isNum(o.cc_half_data) ? fmt(o.cc_half_data, 3) : fmt(o.cc_half, 3));
  const prov = ((d.feedback || {}).provisional || {});
  setText("t-ccstar", (isNum(o.cc_half_data) ? "half-set averages · " : "") +
          (isNum(o.cc_half) ? `model ${fmt(o.cc_half, 3)}${prov.cc_half ? " (provisional)" : ""}` : "") +
          (isNum(o.cc_star) ? ` · CC* ${fmt(o.cc_star, 3)}` : "") +
          (isNum(o.cc_anom) ? ` · CCanom ${fmt(o.cc_anom, 3)}${prov.cc_anom ? " (provisional)" : ""}` : ""));
  setText("t-compl", fmtPct(o.completeness));
  setText("t-mult", isNum(o.multiplicity) ? `multiplicity ${fmt(o.multiplicity, 1)}` : "");
  setText("t-queue", fmtInt(s.queue_depth));
  setText("t-lag", isNum(s.lag_p50_s) ? `lag p50 ${fmt(s.lag_p50_s, 1)} s · p95 ` +
          `${fmt(s.lag_p95_s, 1)} s` : "no lag yet");
  const rejected = Object.entries(c.messages_rejected || {})
    .concat(Object.entries(c.crystals_rejected || {}));
  const rowsRejected = Object.values(c.reflections_rejected || {}).reduce((a, b) => a + b, 0);
  setText("t-rejected", fmtInt(rejected.reduce((a, [, n]) => a + n, 0)));
  const reasons = rejected.sort((a, b) => b[1] - a[1]).map(([r, n]) => `${r} ${n}`);
  $("t-reasons").title = reasons.join("\n");
  setText("t-reasons", (reasons.length ? reasons.join(", ") : "no messages") +
          ` · ${fmtInt(rowsRejected)} rows`);
  const m = d.merge;
  const cellText = Array.isArray(m.cell) ? m.cell.map(x => fmt(x, 2)).join(" ") : m.cell;
  setText("merge", `${m.space_group}` + (m.cell ? ` · cell ${cellText}` +
          (m.cell_source && m.cell_source !== "config" ? ` (${m.cell_source})` : "") : "") +
          ` · dmin ${fmt(m.dmin, 2)} Å` + (m.anomalous ? " · anomalous" : "") +
          (isNum(s.falloff_b) ? ` · fall-off given to F: B ${s.falloff_b >= 0 ? "+" : ""}` +
           `${fmt(s.falloff_b, 2)} Å²` : "") +
          (s.partiality_advice ? " · restart with --geometric-partiality (hover)" : "") +
          (s.partiality_switch ? " · geometric partiality switched on (hover)" : "") +
          (s.dmin_advice ? ` · data beyond dmin: restart with dmin ` +
           `${fmt(s.beyond_dmin.suggested_dmin, 2)} Å (hover)` : ""));
  $("merge").title = [s.dmin_advice, s.partiality_advice].filter(Boolean).join("\n") ||
    (s.partiality_switch ? partialitySwitchText(s.partiality_switch) : "");
  setText("foot-status", `streamvi ${d.version} · up ${fmtDuration(s.uptime_s)} · device ` +
          `${s.device || "–"} · ${fmtInt(s.mtz_written)} MTZ written` +
          (s.mtz_errors ? ` (${s.mtz_errors} failed)` : ""));
}

// why the live merge took the geometric partiality (the status JSON's partiality_switch)
function partialitySwitchText(w) {
  if (w.reason === "reach") {
    return `${fmt(100 * w.share_beyond, 1)} % of the observations of ${fmtInt(w.crystals)} ` +
      "crystals that report their geometry lie beyond its reach and carry no signal (mean " +
      `I/σ ${fmt(w.signal_ratio, 3)} of near-full ones): the merge started again with the ` +
      "geometric partiality (docs/model.md, change 26)";
  }
  return `the scales' trend gave the amplitudes B ${fmt(w.falloff_b, 1)} Å² on ` +
    `${fmtInt(w.crystals)} crystals that report their geometry: the merge ` +
    "started again with the geometric partiality (docs/model.md, change 23)";
}

function renderResolution(d) {
  const fb = d.feedback;
  const res = fb && fb.resolution;
  const model = fb && fb.resolution_model;
  const prov = (fb && fb.provisional) || {};
  let value = "–", note = "fit of the half-set CC½ over shells";
  if (res) {
    if (res.state === "fit") {
      value = fmt(res.d, 2);
      note = `Å · 95 %: ${fmt(res.low, 2)}–${fmt(res.high, 2)} Å (half-set averages)`;
    } else if (res.state === "beyond_dmin") {
      value = "beyond dmin";
      note = `CC½ stays above ${fmt(res.cut, 1)} to ${fmt(d.merge.dmin, 2)} Å: the data may extend further`;
    } else if (res.state === "below_dmax") {
      value = "below";
      note = "CC½ is under the cut from the first shell on";
    } else {
      value = "–";
      note = "too few pairs for an estimate";
    }
  }
  if (model) {
    note += ` · model: ${model.state === "fit" ? fmt(model.d, 2) + " Å" : model.text}` +
            (prov.cc_half ? " (provisional)" : "");
  }
  setText("t-res", value);
  setText("t-res-note", note);
}

function fmtFigure(kind, x) {
  if (!isNum(x)) return "–";
  if (kind === "completeness") return fmtPct(x);
  if (kind === "multiplicity") return fmt(x, 1);
  return fmt(x, 3);
}

const STATE_WORDS = { reached: "reached", forecast: "forecast", out_of_reach: "out of reach",
                      no_signal: "no signal yet", too_few_pairs: "too few pairs",
                      no_figure: "no figure yet" };

function renderTargets(d) {
  const fb = d.feedback;
  const body = $("target-rows");
  if (!fb) return;
  const rows = (fb.targets || []).map(t => {
    const tr = document.createElement("tr");
    tr.className = t.reached ? "reached" : (t.state === "forecast" ? "" : "muted");
    tr.dataset.target = t.target.label;
    let now = fmtFigure(t.target.kind, t.current);
    if (isNum(t.current_low) && isNum(t.current_high)) {
      now += ` (${fmtFigure(t.target.kind, t.current_low)}–${fmtFigure(t.target.kind, t.current_high)})`;
    }
    const at = t.reached ? "–" : (isNum(t.images) ? fmtInt(t.images) +
      (isNum(t.images_low) ? ` (${fmtInt(t.images_low)}–${isNum(t.images_high) ? fmtInt(t.images_high) : "∞"})` : "") : "–");
    const state = (STATE_WORDS[t.state] || t.state) + (t.provisional ? " (provisional)" : "");
    // the target as judged (where the data end, when they end before the table's dmin)
    tr.append(cell(t.heading || t.target.text), cell(now), cell(state, t.reached ? "good" : ""),
              cell(at), cell(t.reached ? "0" : fmtInt(t.images_needed)),
              cell(t.reached ? "done" : fmtDuration(t.seconds)));
    return tr;
  });
  if (rows.length) body.replaceChildren(...rows);
  else body.replaceChildren(Object.assign(document.createElement("tr"), { className: "empty",
    innerHTML: '<td colspan="6">no targets set (target_cc_half, target_completeness, …)</td>' }));
  // pump-probe: the table is the reference condition's; every other condition's verdict
  // follows in the line below it, of its own images
  const others = Object.entries((d.status || {}).condition_feedback || {});
  const names = Object.keys((d.status || {}).condition_images || {});
  const prefix = others.length && names.length ? `${names[0]}: ` : "";
  const more = others.map(([name, o]) => `${name}: ${targetsVerdict(o)} at ` +
                                         `${fmtInt(o.n_images)} images`);
  setText("verdict", [`${prefix}${targetsVerdict(fb)} · snapshot ${fmtInt(fb.snapshot)} at ` +
                      `${fmtInt(fb.n_images)} images`, ...more].join(" · "));
}

function targetsVerdict(fb) {
  const open = (fb.targets || []).filter(t => !t.reached);
  if (!(fb.targets || []).length) return "no targets";
  if (fb.done) return "all targets reached: time to move on";
  const need = open.map(t => t.images_needed).filter(isNum);
  return `${open.length} of ${fb.targets.length} targets open` +
    (need.length ? ` · about ${fmtInt(Math.max(...need))} more images` : "");
}

function ccWithInterval(x, lo, hi, n, minPairs) {
  if (isNum(n) && n < minPairs) return "few";
  if (!isNum(x)) return "–";
  return isNum(lo) && isNum(hi) ? `${fmt(x, 3)} ±${fmt((hi - lo) / 2, 3)}` : fmt(x, 3);
}

function ccClass(x, cut) {
  if (!isNum(x)) return "";
  if (x < cut) return "low";
  if (x < 0.5) return "mid";
  return "";
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function renderTable(d) {
  const t = d.shells;
  const body = $("shell-rows");
  const foot = $("shell-overall");
  if (!t) return;
  const cut = d.merge.cc_half_cut;
  const n = t.d_min.length;
  const rows = [];
  for (let i = 0; i < n; i++) {
    const tr = document.createElement("tr");
    const first = cell(String(i + 1));
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = shellColour(i, n);
    first.prepend(sw);
    const mp = t.min_pairs;
    const pairs = (t.cc_half_data_pairs || [])[i] ?? (t.cc_half_pairs || [])[i];
    tr.append(first,
      cell(`${fmt(t.d_max[i], 2)} – ${fmt(t.d_min[i], 2)}`),
      cell(fmtPct(t.completeness[i])), cell(fmt(t.multiplicity[i], 1)),
      cell(fmt(t.i_over_sigma[i], 1)),
      cell(ccWithInterval(t.cc_half[i], (t.cc_half_low || [])[i], (t.cc_half_high || [])[i],
                          (t.cc_half_pairs || [])[i], mp), ccClass(t.cc_half[i], cut)),
      cell(ccWithInterval((t.cc_half_data || [])[i], (t.cc_half_data_low || [])[i],
                          (t.cc_half_data_high || [])[i], (t.cc_half_data_pairs || [])[i], mp),
           ccClass((t.cc_half_data || [])[i], cut)),
      cell(fmtInt(pairs)),
      cell(fmt(t.cc_star[i], 3)),
      cell(t.anomalous ? ccWithInterval(t.cc_anom[i], (t.cc_anom_low || [])[i],
                                        (t.cc_anom_high || [])[i], (t.cc_anom_pairs || [])[i], mp)
                       : "–"),
      cell(fmtInt(t.n_unique[i])));
    const res = (d.feedback || {}).resolution;
    if (res && res.state === "fit" && t.d_max[i] < res.d) tr.className = "beyond";
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  const o = t.overall;
  const tr = document.createElement("tr");
  tr.append(cell("Overall"), cell(`${fmt(o.d_max, 2)} – ${fmt(o.d_min, 2)}`),
    cell(fmtPct(o.completeness)), cell(fmt(o.multiplicity, 1)), cell(fmt(o.i_over_sigma, 1)),
    cell(ccWithInterval(o.cc_half, o.cc_half_low, o.cc_half_high, o.cc_half_pairs, t.min_pairs),
         ccClass(o.cc_half, cut)),
    cell(ccWithInterval(o.cc_half_data, o.cc_half_data_low, o.cc_half_data_high,
                        o.cc_half_data_pairs, t.min_pairs), ccClass(o.cc_half_data, cut)),
    cell(fmtInt(o.cc_half_data_pairs ?? o.cc_half_pairs)), cell(fmt(o.cc_star, 3)),
    cell(t.anomalous ? ccWithInterval(o.cc_anom, o.cc_anom_low, o.cc_anom_high,
                                      o.cc_anom_pairs, t.min_pairs) : "–"),
    cell(fmtInt(o.n_unique)));
  foot.replaceChildren(tr);
  setText("shell-note", `Each CC with ± half its 95 % interval (Fisher z); “few”: under ` +
          `${t.min_pairs} pairs, no value. CC½ model: the half-dataset posteriors (moves with ` +
          `training${((d.feedback || {}).provisional || {}).cc_half ? "; provisional now" : ""}); ` +
          `CC½ data: plain half-set averages (moves only with data).`);
  const s = d.snapshot;
  setText("snap-info", s ? `snapshot ${s.id} · ${fmtInt(s.n_images)} images · ` +
          `step ${fmtInt(s.step)} · ${new Date(s.time * 1000).toLocaleTimeString("en-GB")}` : "");
}

// ------------------------------------------------------------------ plots

function niceStep(span, target) {
  const raw = span / Math.max(target, 1);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const f = raw / mag;
  return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
}

// Tick spacing on a clock: whole seconds, minutes and hours only.
const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
                    21600, 43200, 86400];

function timeStep(span, target) {
  return TIME_STEPS.find(s => span / s <= target) || niceStep(span, target);
}

function timeLabel(t, span) {
  const opts = span < 600 ? { hour: "2-digit", minute: "2-digit", second: "2-digit" }
                          : { hour: "2-digit", minute: "2-digit" };
  return new Date(t * 1000).toLocaleTimeString("en-GB", opts);
}

// series: [{colour, width, dash, points: [[x, y], ...]}]; y may be null (gap).
// opts: aspect, yMin, yMax, yFormat, xKind ("time" | "images"), hlines [{y, colour, label}],
// marks [{x, lo, hi, colour, label}]: a forecast at x with its interval lo–hi (hi may be null)
function drawPlot(canvas, series, opts) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = Math.round(w * opts.aspect);
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  canvas.style.height = h + "px";
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const m = { l: 54, r: 12, t: 10, b: 28 };
  const pw = w - m.l - m.r, ph = h - m.t - m.b;
  const pts = series.flatMap(s => s.points.filter(p => isNum(p[0]) && isNum(p[1])));
  // where and how much was drawn, for tests and for anyone inspecting the page
  const r = canvas.getBoundingClientRect();
  canvas.dataset.points = String(pts.length);
  canvas.dataset.rect = [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height]
    .map(Math.round).join(",");
  g.font = "12px system-ui, sans-serif";
  g.strokeStyle = "#c3cad2";
  g.lineWidth = 1;
  g.strokeRect(m.l + 0.5, m.t + 0.5, pw, ph);
  if (pts.length === 0) {
    g.fillStyle = "#5f6b78";
    g.textAlign = "center";
    g.fillText("waiting for data…", m.l + pw / 2, m.t + ph / 2);
    return;
  }
  const images = opts.xKind === "images";
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  if (images) x0 = 0;
  // a forecast within reach widens the axis to show it (not beyond 4× the data's span)
  const marks = (opts.marks || []).filter(k => isNum(k.x));
  for (const k of marks) x1 = Math.max(x1, Math.min(k.x * 1.08, x0 + 4 * Math.max(x1 - x0, 1)));
  canvas.dataset.marks = String(marks.length);
  if (x1 - x0 < 1) { x0 -= 0.5; x1 += 0.5; }
  if (images) x1 += 0.03 * (x1 - x0);      // the last snapshot's dot inside the frame
  let y0 = isNum(opts.yMin) ? opts.yMin : Math.min(...pts.map(p => p[1]));
  let y1 = isNum(opts.yMax) ? opts.yMax : Math.max(...pts.map(p => p[1]));
  for (const l of opts.hlines || []) if (isNum(l.y) && !isNum(opts.yMax)) y1 = Math.max(y1, l.y);
  if (!isNum(opts.yMin) && !isNum(opts.yMax)) {
    const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
    y0 -= pad; y1 += pad;
  } else if (y1 - y0 <= 0) { y1 = y0 + 1; }
  const X = t => m.l + (t - x0) / (x1 - x0) * pw;
  const Y = v => m.t + (1 - (v - y0) / (y1 - y0)) * ph;

  // grid and labels
  g.fillStyle = "#5f6b78";
  g.strokeStyle = "#e6eaee";
  const ys = niceStep(y1 - y0, 5);
  g.textAlign = "right";
  g.textBaseline = "middle";
  // ticks as whole multiples of the step: summed steps drift (0 became −1.39e-17)
  for (let k = Math.ceil(y0 / ys); k * ys <= y1 + 1e-9; k++) {
    const v = k * ys;
    const y = Math.round(Y(v)) + 0.5;
    g.beginPath(); g.moveTo(m.l, y); g.lineTo(m.l + pw, y); g.stroke();
    g.fillText(opts.yFormat ? opts.yFormat(v, ys) : String(+v.toPrecision(3)), m.l - 6, y);
  }
  const span = x1 - x0;
  const xs = images ? niceStep(span, 6) : timeStep(span, 5);
  g.textAlign = "center";
  g.textBaseline = "top";
  for (let k = Math.ceil(x0 / xs); k * xs <= x1 + 1e-9; k++) {
    const t = k * xs;
    const x = Math.round(X(t)) + 0.5;
    g.beginPath(); g.moveTo(x, m.t); g.lineTo(x, m.t + ph); g.stroke();
    g.fillText(images ? fmtInt(t) : timeLabel(t, span), x, m.t + ph + 6);
  }
  g.save();
  g.beginPath(); g.rect(m.l, m.t, pw, ph); g.clip();
  // targets: dashed horizontal lines
  for (const l of opts.hlines || []) {
    if (!isNum(l.y) || l.y < y0 || l.y > y1) continue;
    g.save();
    g.setLineDash([5, 4]);
    g.strokeStyle = l.colour || "#b3261e";
    g.beginPath(); g.moveTo(m.l, Y(l.y)); g.lineTo(m.l + pw, Y(l.y)); g.stroke();
    if (l.label) {
      g.fillStyle = l.colour || "#b3261e";
      g.textAlign = "left"; g.textBaseline = "bottom";
      g.fillText(l.label, m.l + 4, Y(l.y) - 2);
    }
    g.restore();
  }
  // forecasts: a shaded interval and a vertical line where the target should be reached
  for (const k of marks) {
    const lo = isNum(k.lo) ? X(k.lo) : X(k.x), hi = isNum(k.hi) ? X(k.hi) : m.l + pw;
    g.save();
    g.fillStyle = k.band || "rgba(31, 111, 178, 0.12)";
    g.fillRect(Math.max(lo, m.l), m.t, Math.max(Math.min(hi, m.l + pw) - Math.max(lo, m.l), 1), ph);
    g.setLineDash([2, 3]);
    g.strokeStyle = k.colour || "#1f6fb2";
    g.lineWidth = 1.5;
    g.beginPath(); g.moveTo(X(k.x), m.t); g.lineTo(X(k.x), m.t + ph); g.stroke();
    if (k.label) {
      g.fillStyle = k.colour || "#1f6fb2";
      g.textAlign = X(k.x) > m.l + pw * 0.7 ? "right" : "left"; g.textBaseline = "top";
      g.fillText(k.label, X(k.x) + (g.textAlign === "left" ? 4 : -4), m.t + 4);
    }
    g.restore();
  }

  // data
  g.lineJoin = "round";
  for (const s of series) {
    g.strokeStyle = s.colour;
    g.lineWidth = s.width || 1.5;
    g.setLineDash(s.dash || []);
    g.beginPath();
    let pen = false;
    for (const [t, v] of s.points) {
      if (!isNum(t) || !isNum(v)) { pen = false; continue; }
      if (pen) g.lineTo(X(t), Y(v)); else g.moveTo(X(t), Y(v));
      pen = true;
    }
    g.stroke();
    if (images) {            // one dot per snapshot: where the data are, even on one image count
      g.fillStyle = s.colour;
      for (const [t, v] of s.points) {
        if (isNum(t) && isNum(v)) { g.beginPath(); g.arc(X(t), Y(v), 2.5, 0, 2 * Math.PI); g.fill(); }
      }
    }
    const last = s.points.filter(p => isNum(p[1])).pop();
    if (last && s.dot) {
      g.fillStyle = s.colour;
      g.beginPath(); g.arc(X(last[0]), Y(last[1]), 3, 0, 2 * Math.PI); g.fill();
    }
  }
  g.restore();
}

function legend(id, items) {
  const el = $(id);
  el.replaceChildren(...items.map(([text, colour]) => {
    const s = document.createElement("span");
    s.style.setProperty("--c", colour);
    s.textContent = text;
    return s;
  }));
}

function perShell(history, key, xKey) {
  const n = Math.max(0, ...history.map(h => (h[key] || []).length));
  return Array.from({ length: n }, (_, i) => history.map(h => [h[xKey], (h[key] || [])[i]]));
}

function targetOf(d, kind) {
  return ((d.feedback || {}).targets || []).find(t => t.target.kind === kind);
}

function forecastMark(t, colour) {
  if (!t || t.reached || !isNum(t.images)) return [];
  return [{ x: t.images, lo: t.images_low, hi: t.images_high, colour,
            label: `forecast ${fmtInt(t.images)} images` }];
}

function renderPlots(d) {
  const hist = d.history || [];
  const fh = d.feedback_history || [];
  const shells = d.shells;
  // CC½ of the half-set averages against images; the target's shell drawn heavier
  const ccShells = perShell(fh, "cc_half_data", "n_images");
  const n = ccShells.length;
  const cc = targetOf(d, "cc_half");
  const ccShell = cc && cc.shell ? cc.shell.index : -1;
  const ccSeries = ccShells.map((points, i) => ({
    points, colour: shellColour(i, n), width: i === ccShell ? 3 : 1.4, dot: true }));
  const hl = [{ y: d.merge.cc_half_cut, colour: "#b3261e" }];
  if (cc) hl.push({ y: cc.target.value, colour: "#2e8540", label: `target ${cc.target.text}` });
  drawPlot($("plot-cchalf"), ccSeries, {
    aspect: 0.46, xKind: "images", hlines: hl, marks: forecastMark(cc, "#2e8540"),
    yMin: Math.min(0, ...ccShells.flat().map(p => p[1]).filter(isNum)), yMax: 1 });
  setText("cap-cchalf", cc ? `· shell ${ccShell + 1} judged for the target` : "");
  if (shells) {
    legend("legend-cchalf", shells.d_min.map((dm, i) =>
      [`${i + 1}: ${fmt(shells.d_max[i], 2)}–${fmt(dm, 2)} Å`, shellColour(i, n)]));
  }
  const pct = v => (100 * v).toFixed(0) + " %";
  const compl = targetOf(d, "completeness");
  const complShells = perShell(fh, "completeness_shells", "n_images");
  const complSeries = complShells.map((points, i) => ({
    points, colour: shellColour(i, complShells.length), width: 1 }));
  complSeries.push({ points: fh.map(h => [h.n_images, h.completeness]), colour: "#1d2733",
                     width: 2.5, dot: true });
  drawPlot($("plot-compl"), complSeries, {
    aspect: 0.46, xKind: "images", yMin: 0, yMax: 1, yFormat: pct,
    hlines: compl ? [{ y: compl.target.value, colour: "#2e8540",
                       label: `target ${pct(compl.target.value)}` }] : [],
    marks: forecastMark(compl, "#2e8540") });
  const mult = targetOf(d, "multiplicity");
  legend("legend-compl", [["overall", "#1d2733"], ["shells: colours as in CC½", "#a92395"]].concat(
    compl ? [[`target ${compl.target.text}`, "#2e8540"]] : []));
  setText("cap-compl", mult ? `· multiplicity ${fmt(mult.current, 1)} (target ${fmt(mult.target.value, 0)})` : "");
  renderPeaks(d, fh);
  drawPlot($("plot-rate"), [{ points: hist.map(h => [h.time, h.images_per_s]),
                              colour: "#1f6fb2", width: 2, dot: true }],
           { aspect: 0.39, yMin: 0 });
  drawPlot($("plot-loss"), [{ points: hist.map(h => [h.time, h.loss]), colour: "#2e8540",
                              width: 2, dot: true }], { aspect: 0.39 });
}

function renderPeaks(d, fh) {
  const peaks = (d.feedback || {}).peaks;
  const fig = $("fig-peaks");
  if (!peaks) { fig.hidden = true; return; }
  fig.hidden = false;
  const atoms = Object.keys(peaks.atoms);
  const series = atoms.map((a, i) => ({
    points: fh.map(h => [h.n_images, (h.peaks || {})[a]]), colour: shellColour(i, atoms.length),
    width: 1.6, dot: true }));
  drawPlot($("plot-peaks"), series, { aspect: 0.46, xKind: "images", hlines: [{ y: 0, colour: "#c3cad2" }] });
  const sorted = atoms.map(a => [a, peaks.atoms[a]]).sort((x, y) => (y[1] ?? -1e9) - (x[1] ?? -1e9));
  legend("legend-peaks", sorted.slice(0, 8).map(([a, v]) =>
    [`${a} ${fmt(v, 1)} σ`, shellColour(atoms.indexOf(a), atoms.length)]));
  setText("cap-peaks", `· ${peaks.model} · ${fmtInt(peaks.n_reflections)} Bijvoet pairs`);
  setText("new-peaks", (peaks.new_peaks || []).length ? "strongest peaks away from the model's heavy atoms: " +
    peaks.new_peaks.map(p => `${fmt(p.sigma, 1)} σ` + (p.nearest_atom ? ` (${fmt(p.distance, 1)} Å from ${p.nearest_atom})` : ""))
      .join(", ") : "no peak above 3 σ away from the model's heavy atoms");
}

// ------------------------------------------------------------------ polling

function markLive() {
  const el = $("live");
  const age = (Date.now() - lastOk) / 1000;
  if (!lastOk) return;
  if (failure) {              // the service answers, but says it is failed: never "live"
    el.textContent = `failed: ${failure}`;
    el.title = failure;
    el.classList.add("stale");
    return;
  }
  el.title = "time since the last successful update";
  el.textContent = age < 3 ? "live" : `updated ${age.toFixed(0)} s ago`;
  el.classList.toggle("stale", age > STALE_S);
}

function renderDifferences(d) {
  const s = d.status || {};
  const pairs = Object.entries(s.differences || {});
  $("differences").hidden = pairs.length === 0;
  if (!pairs.length) return;
  const images = Object.entries(s.condition_images || {})
    .map(([c, n]) => `${c} ${fmtInt(n)}`).join(" · ");
  setText("diff-info", `images: ${images}`);
  const rows = [], foot = [];
  for (const [pair, f] of pairs) {
    const head = document.createElement("tr");
    head.append(cell(pair), cell(""), cell(""), cell(""));
    head.className = "pair";
    rows.push(head);
    f.delta_cc_half.forEach((cc, i) => {
      const tr = document.createElement("tr");
      tr.append(cell(String(i + 1)), cell(fmt(f.d_min[i], 2)), cell(fmtInt(f.pairs[i])),
                cell(fmt(cc, 3)));
      rows.push(tr);
    });
    const tr = document.createElement("tr");
    tr.append(cell(`${pair}: overall`), cell(`${fmtInt(f.reflections)} reflections`),
              cell(`${fmtInt(f.significant)} significant` +
                   (f.sigdf_calibrated === false ? " (σ not calibrated yet)" : "")),
              cell(fmt(f.delta_cc_half_overall, 3)));
    foot.push(tr);
  }
  $("diff-rows").replaceChildren(...rows);
  $("diff-overall").replaceChildren(...foot);
  const where = [];
  for (const [pair, f] of pairs) {
    const p = f.peaks || {};
    const named = (p.positive || []).concat(p.negative || []).map(x =>
      `${x.sigma >= 0 ? "+" : ""}${fmt(x.sigma, 1)} σ` +
      (x.nearest_atom ? ` at ${x.nearest_atom} (${fmt(x.distance, 1)} Å)` : ""));
    if (named.length) where.push(`${pair}: ${named.join(" · ")}`);
  }
  setText("diff-peaks", where.join("\n"));
  const hist = d.history || [];
  const series = pairs.map(([pair], i) => ({
    points: hist.filter(h => (h.differences || {})[pair])
      .map(h => [h.differences[pair].images, h.differences[pair].cc_half]),
    colour: shellColour(i, Math.max(pairs.length, 2)), width: 2, dot: true }));
  drawPlot($("plot-delta"), series, { aspect: 0.39, xKind: "images",
                                      hlines: [{ y: 0, colour: "#c3cad2" }] });
  legend("legend-delta", pairs.map(([pair], i) =>
    [pair, shellColour(i, Math.max(pairs.length, 2))]));
}

async function tick() {
  try {
    const r = await fetch("/api/status", { cache: "no-store" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const d = await r.json();
    failure = d.status.failure || null;
    renderTiles(d);
    renderTargets(d);
    renderTable(d);
    renderDifferences(d);
    renderPlots(d);
    lastOk = Date.now();
    document.body.dataset.updated = String(lastOk);
  } catch (err) {
    $("live").textContent = `no answer (${err.message})`;
    $("live").classList.add("stale");
  }
  markLive();
  setTimeout(tick, REFRESH_MS);
}

window.addEventListener("load", tick);
setInterval(markLive, 1000);
