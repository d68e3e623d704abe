// discomv browse: a hash-routed page over the JSON endpoints (no framework, no build step).
// Every value from the manifests goes into the page as text (h() never parses HTML).
"use strict";

const app = document.getElementById("app");
const show = (...nodes) => app.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined));
const STEP_HZ = 50;

function h(tag, attrs, ...children) {
  const el = document.createElementNS(tag === "svg" || attrs?.svg ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml", tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "svg" || v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}
const s = (tag, attrs, ...children) => h(tag, { ...attrs, svg: true }, ...children);
const fmt = (v) => (v === null || v === undefined ? "" : typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : String(v));
const statusCell = (status) => h("span", { class: `status-${status}` }, status ?? "");
const weightsCell = (w) => (w === "random-init" ? h("span", { class: "badge random", title: "random-init weights: not for data" }, "random-init") : w ?? "");

async function api(path) {
  const r = await fetch(path);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

// ---------------------------------------------------------------- tables

const NUMERIC = new Set(["frame_similarity", "vocal_residual", "alignment", "clips", "shards", "clip_index", "start_s",
  "n_music_beats", "n_video_beats"]);
const RANGES = ["frame_similarity", "vocal_residual", "alignment"];

async function tablePage(kind, query) {
  const params = new URLSearchParams(query);
  const [facets, page] = await Promise.all([api(`/api/facets/${kind}`), api(`/api/table/${kind}?${params}`)]);
  const go = (changes) => {
    const next = new URLSearchParams(params);
    for (const [k, v] of Object.entries(changes)) (v === "" || v === null) ? next.delete(k) : next.set(k, v);
    if (!("offset" in changes)) next.delete("offset");
    location.hash = `#/${kind}?${next}`;
  };
  const filters = h("div", { class: "filters" },
    Object.entries(facets).map(([name, values]) => h("label", {}, name.replace("_", " "),
      h("select", { name, onchange: (e) => go({ [name]: e.target.value }) },
        h("option", { value: "" }, "all"),
        values.map((v) => h("option", { value: v, selected: params.get(name) === String(v) }, v))))),
    RANGES.filter((r) => page.columns.includes(r)).map((r) => h("label", {}, r.replace("_", " "),
      h("span", {}, ["min", "max"].map((end) => h("input", {
        type: "number", step: "any", placeholder: end, name: `${r}_${end}`, value: params.get(`${r}_${end}`) ?? "",
        onchange: (e) => go({ [`${r}_${end}`]: e.target.value }) }))))),
    h("label", {}, "search", h("input", { type: "search", value: params.get("q") ?? "", placeholder: "key or reason",
      onchange: (e) => go({ q: e.target.value }) })));
  const sort = params.get("sort") || "key";
  const desc = params.get("order") === "desc";
  const head = h("tr", {}, page.columns.map((c) => h("th", {
    class: c === sort ? `sorted${desc ? " desc" : ""}` : null, "data-col": c,
    onclick: () => go({ sort: c, order: c === sort && !desc ? "desc" : "" }) }, c.replaceAll("_", " "))));
  const body = page.rows.map((row) => h("tr", {
    class: "row", "data-key": row.key, "data-status": row.status,
    onclick: () => { location.hash = `#/${kind === "clips" ? "clip" : "candidate"}/${row.key}`; } },
    page.columns.map((c) => h("td", { class: NUMERIC.has(c) ? "num" : null },
      c === "status" ? statusCell(row[c]) : c === "weights" ? weightsCell(row[c]) : fmt(row[c])))));
  const last = Math.min(page.offset + page.limit, page.total);
  const pager = h("div", { class: "pager" },
    h("button", { disabled: page.offset === 0, onclick: () => go({ offset: Math.max(0, page.offset - page.limit) }) }, "‹ prev"),
    h("span", { id: "count" }, `${page.total ? page.offset + 1 : 0}–${last} of ${page.total} ${kind}`),
    h("button", { disabled: last >= page.total, onclick: () => go({ offset: page.offset + page.limit }) }, "next ›"));
  show(h("h1", {}, kind), filters, pager,
    h("table", { id: "table", "data-kind": kind, "data-total": page.total }, h("thead", {}, head), h("tbody", {}, body)));
}

// ---------------------------------------------------------------- shared blocks

function retryBlock(retry, reason, status, stage) {
  if (!retry && !reason) return null;
  return h("section", { id: "outcome" }, h("h2", {}, `${status} at ${stage}`),
    reason ? h("p", { class: `reason status-${status}` }, reason) : null,
    retry ? [h("pre", { id: "retry" }, retry.command), h("p", { class: "muted" }, retry.note)] : null);
}

function lineageBlock(rows) {
  const skip = new Set(["stage", "status", "reason", "finished_at", "stage_version", "weights", "node", "key"]);
  return h("section", { id: "lineage" }, h("h2", {}, `lineage (${rows.length} rows; discomv audit --key)`),
    h("table", { class: "lineage" }, rows.map((r) => h("tr", {},
      h("td", {}, r.stage), h("td", {}, statusCell(r.status)),
      h("td", {}, h("div", {}, r.reason ?? "", " ", h("span", { class: "muted" },
        `${r.finished_at ?? ""} v${r.stage_version ?? "?"} `), weightsCell(r.weights)),
        h("div", { class: "fields" }, Object.entries(r).filter(([k]) => !skip.has(k))
          .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : fmt(v)}`).join(" · ")))))));
}

function heat(v) {  // similarity → colour: 0 white … 1 dark red; negative → blue
  const x = Math.max(-1, Math.min(1, v));
  return x >= 0 ? `rgb(255,${Math.round(255 - 200 * x)},${Math.round(255 - 220 * x)})`
    : `rgb(${Math.round(255 + 200 * x)},${Math.round(255 + 120 * x)},255)`;
}

async function framesBlock(videoKey, manifestSimilarity) {
  const box = h("section", { id: "frames" }, h("h2", {}, "the frames the filter samples"), h("p", { class: "muted" }, "decoding…"));
  api(`/api/frames/${videoKey}`).then((f) => {
    if (f.error) { box.replaceChildren(h("h2", {}, "frames"), h("p", { class: "error" }, f.error)); return; }
    const grid = h("div", { class: "frames" }, f.frames.map((name, i) => h("figure", {},
      h("img", { src: `/frames/${videoKey}/${name}`, alt: `frame ${i}`, loading: "lazy" }),
      `#${i}${f.same_as[i] !== i ? ` = #${f.same_as[i]}` : ""}`)));
    const matrix = h("table", { class: "matrix", id: "matrix" }, f.matrix.map((row, i) => h("tr", {},
      row.map((v, j) => h("td", { style: `background:${heat(v)}`, title: `#${i} × #${j}: ${v.toFixed(3)}` },
        i === j ? "" : v.toFixed(2))))));
    box.replaceChildren(h("h2", {}, `the ${f.frames.length} frames the filter samples`),
      h("p", { class: "muted" }, `similarity (mean over pairs) ${fmt(f.similarity)} recomputed with ${f.embedder}` +
        `; manifest frame_similarity ${fmt(manifestSimilarity)}; decoder ${f.decoder}`), grid, h("h2", {}, "similarity matrix"), matrix);
  }).catch((e) => box.replaceChildren(h("p", { class: "error" }, String(e))));
  return box;
}

// ---------------------------------------------------------------- candidate page

async function candidatePage(key) {
  const p = await api(`/api/candidate/${key}`);
  const c = p.candidate;
  const clips = p.clips.length ? h("section", { id: "clips" }, h("h2", {}, `${p.clips.length} clips`),
    h("table", {}, p.clips.map((k) => h("tr", { class: "row", onclick: () => { location.hash = `#/clip/${k.key}`; } },
      h("td", {}, h("a", { href: `#/clip/${k.key}` }, k.key)), h("td", { class: "num" }, fmt(k.start_s)),
      h("td", {}, statusCell(k.status)), h("td", {}, k.stage), h("td", {}, k.reason ?? ""))))) : null;
  show(
    h("h1", {}, key), h("p", {}, c.title ?? "", " · ", c.source ?? "", " · ", statusCell(c.status), ` at ${c.stage} · weights `,
      weightsCell(c.weights)),
    retryBlock(p.retry, c.reason, c.status, c.stage),
    h("section", { id: "stages" }, h("h2", {}, "stages"), h("table", {}, Object.entries(p.stages).map(([name, r]) =>
      h("tr", {}, h("td", {}, name), h("td", {}, statusCell(r.status)), h("td", {}, r.reason ?? ""), h("td", {}, weightsCell(r.weights)))))),
    p.has_video ? await framesBlock(key, c.frame_similarity) : h("section", {}, h("p", { class: "muted" }, "no downloaded video: no frames to show")),
    clips, lineageBlock(p.lineage));
}

// ---------------------------------------------------------------- clip page

function timeline(beats, duration) {
  const W = 1000, H = 190, steps = (beats.music_beats || []).length || Math.round(duration * STEP_HZ);
  const x = (t) => (t / steps) * W;
  const lanes = { music: [8, 48], video: [58, 98], weights: [108, 178] };
  const marks = [];
  for (const [name, lane] of [["music", lanes.music], ["video", lanes.video]]) {
    (beats[`${name}_beats`] || []).forEach((v, t) => { if (v > 0) marks.push(s("line", { class: `mark ${name}`, x1: x(t), x2: x(t), y1: lane[0], y2: lane[1], "data-step": t })); });
  }
  const curve = (values, lane, cls) => {
    if (!values || !values.length) return null;
    const max = Math.max(...values, 1e-9);
    return s("polyline", { class: `curve ${cls}`, points: values.map((v, t) => `${x(t)},${lane[1] - (v / max) * (lane[1] - lane[0])}`).join(" ") });
  };
  const w = beats.beat_weights || [];
  const wmax = Math.max(...w, 1), wmin = Math.min(...w, 0);
  const weights = w.length ? s("polyline", { class: "weights", points: w.map((v, t) => `${x(t)},${lanes.weights[1] - ((v - wmin) / (wmax - wmin || 1)) * (lanes.weights[1] - lanes.weights[0])}`).join(" ") }) : null;
  const playhead = s("line", { class: "playhead", id: "playhead", x1: 0, x2: 0, y1: 0, y2: H });
  const svg = s("svg", { class: "timeline", id: "timeline", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none",
    "data-steps": steps, "data-music-beats": marks.filter((m) => m.classList.contains("music")).length,
    "data-video-beats": marks.filter((m) => m.classList.contains("video")).length },
    s("text", { class: "lane-label", x: 4, y: 20 }, "music onsets"), s("text", { class: "lane-label", x: 4, y: 70 }, "video beats"),
    s("text", { class: "lane-label", x: 4, y: 120 }, `beat weights (${fmt(wmin)}–${fmt(wmax)})`),
    curve(beats.onset_envelope, lanes.music, "onset"), curve(beats.flow_magnitude, lanes.video, "flow"),
    marks, weights, playhead);
  return { svg, playhead, x: (seconds) => x(seconds * STEP_HZ) };
}

async function clipPage(key) {
  const p = await api(`/api/clip/${key}`);
  const c = p.clip;
  const dur = p.duration_s;
  const video = p.video ? h("video", { id: "video", src: p.video.url, muted: true, playsinline: true, controls: true,
    preload: "auto", "data-offset": p.video.offset_s }) : null;
  if (video) video.muted = true;  // the attribute alone does not mute an element made by script
  const instr = p.instrumental ? h("audio", { id: "instrumental", src: p.instrumental.url, preload: "auto",
    "data-offset": p.instrumental.offset_s }) : null;
  let mode = instr ? "instrumental" : "mix";
  const clipTime = () => (video ? video.currentTime - p.video.offset_s : instr ? instr.currentTime - p.instrumental.offset_s : 0);
  const sync = () => {
    if (!instr || !video) return;
    const want = p.instrumental.offset_s + clipTime();
    if (Math.abs(instr.currentTime - want) > 0.12) instr.currentTime = want;
    if (mode === "instrumental" && !video.paused && instr.paused) instr.play().catch(() => {});
    if ((mode !== "instrumental" || video.paused) && !instr.paused) instr.pause();
  };
  const setMode = (m) => {
    mode = m;
    if (video) video.muted = m !== "mix";
    for (const b of buttons.querySelectorAll("button")) b.classList.toggle("on", b.dataset.mode === m);
    sync();
  };
  const buttons = h("div", { class: "controls" },
    instr ? h("button", { "data-mode": "instrumental", onclick: () => setMode("instrumental") }, "instrumental") : null,
    video ? h("button", { "data-mode": "mix", onclick: () => setMode("mix") }, "original mix") : null,
    h("button", { onclick: () => { if (video) { video.currentTime = p.video.offset_s; video.play(); } } }, "⟲ clip start"));
  const tl = timeline(p.beats, dur);
  if (video) {
    video.addEventListener("loadedmetadata", () => { video.currentTime = p.video.offset_s; });
    for (const ev of ["play", "pause", "seeked", "timeupdate"]) video.addEventListener(ev, sync);
    video.addEventListener("timeupdate", () => { if (clipTime() > dur) video.currentTime = p.video.offset_s; });
    tl.svg.addEventListener("click", (e) => {
      const box = tl.svg.getBoundingClientRect();
      video.currentTime = p.video.offset_s + ((e.clientX - box.left) / box.width) * dur;
    });
  }
  const frame = () => {
    if (!document.body.contains(tl.svg)) return;
    const t = Math.max(0, Math.min(dur, clipTime()));
    tl.playhead.setAttribute("x1", tl.x(t)); tl.playhead.setAttribute("x2", tl.x(t));
    requestAnimationFrame(frame);
  };
  const n = (arr) => (arr || []).filter((v) => v > 0).length;
  show(
    h("h1", {}, key),
    h("p", {}, h("a", { href: `#/candidate/${c.video_key}` }, c.video_key), ` · clip ${c.clip_index} at ${fmt(c.start_s)} s · `,
      statusCell(c.status), ` at ${c.stage} · split ${c.split ?? "-"} · ${c.shard ?? ""} `, weightsCell(c.weights)),
    retryBlock(p.retry, c.reason, c.status, c.stage),
    h("section", { id: "player" }, h("div", { class: "player" }, video ?? h("p", { class: "muted" }, "no video in media or shard"), instr),
      buttons, h("p", { class: "muted" }, `video: ${p.video?.from ?? "-"}; instrumental: ${p.instrumental?.from ?? "-"}; ` +
        `vocal residual ${fmt(c.vocal_residual)} · alignment ${fmt(c.alignment)} · ${n(p.beats.music_beats)} music onsets, ` +
        `${n(p.beats.video_beats)} video beats (${p.beats.source ?? "no beats"})`),
      tl.svg),
    await framesBlock(c.video_key, c.frame_similarity),
    lineageBlock(p.lineage));
  if (instr) setMode("instrumental");
  requestAnimationFrame(frame);
}

// ---------------------------------------------------------------- router

async function route() {
  const [path, query] = location.hash.slice(1).split("?");
  const parts = (path || "/").split("/").filter(Boolean);
  try {
    if (parts[0] === "clip" && parts[1]) await clipPage(decodeURIComponent(parts[1]));
    else if (parts[0] === "candidate" && parts[1]) await candidatePage(decodeURIComponent(parts[1]));
    else await tablePage(parts[0] === "clips" ? "clips" : "candidates", query || "");
  } catch (e) {
    show(h("p", { class: "error" }, String(e.message || e)));
  }
  document.body.dataset.ready = location.hash || "#/";
}
api("/api/info").then((i) => { document.getElementById("where").textContent = `${i.manifest_root} · ${i.config}`; });
window.addEventListener("hashchange", route);
route();
