"use strict";
// Slide page: the slide in OpenSeadragon with every candidate drawn on a canvas over it, the gallery
// grid beside it, and labelling with the keyboard. window.review exposes the state to the tests.

const stem = document.body.dataset.stem;
const api = `/api/slide/${encodeURIComponent(stem)}`;
const state = {
  info: null, cells: [], candidates: [], labels: {}, annotator: null,
  hidden: new Set(), items: [], position: -1, undo: [], selectedCandidate: -1, viewer: null, unsaved: 0,
};
// Labels still on their way to the server: ask before the tab closes.
window.addEventListener("beforeunload", event => { if (state.unsaved > 0) event.preventDefault(); });
window.review = state;

function rows(table) {
  return table.rows.map(r => Object.fromEntries(table.columns.map((c, i) => [c, r[i]])));
}

function escape(text) {
  const div = document.createElement("div");
  div.textContent = text == null ? "" : String(text);
  return div.innerHTML;
}

function outcomeOf(c) { return c.accepted ? "accepted" : (c.reason || "rejected"); }

async function getJSON(url, options) {
  const response = await fetch(url, options);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${await response.text()}`);
  return response.json();
}

// --- annotator -----------------------------------------------------------------------------------

function askAnnotator() {
  const dialog = document.getElementById("annotator-dialog");
  document.getElementById("annotator-input").value = state.annotator || "";
  dialog.showModal();
}

async function setAnnotator(name) {
  state.annotator = name;
  localStorage.setItem("review.annotator", name);
  document.getElementById("annotator-name").textContent = name;
  const data = await getJSON(`${api}/labels/${encodeURIComponent(name)}`);
  state.labels = data.labels;
  state.undo = [];
  render();
}

// --- viewer --------------------------------------------------------------------------------------

function setupViewer() {
  if (state.info.viewer_error) {
    const box = document.getElementById("viewer-error");
    box.textContent = state.info.viewer_error;
    box.hidden = false;
    document.getElementById("viewer").hidden = true;
    return;
  }
  const viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: "/static/openseadragon/images/",
    tileSources: `/dzi/${encodeURIComponent(stem)}.dzi`,
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    maxZoomPixelRatio: 2,
    animationTime: 0.6,
    gestureSettingsMouse: { clickToZoom: false },
    // The 2D canvas drawer: OpenSeadragon's WebGL one is slower where WebGL is emulated in software
    // (remote desktops, headless browsers), and a slide's tiles need no GPU effects.
    drawer: "canvas",
  });
  state.viewer = viewer;
  const canvas = document.createElement("canvas");
  canvas.id = "overlay";
  viewer.container.appendChild(canvas);
  const draw = () => drawOverlay(canvas);
  viewer.addHandler("update-viewport", draw);
  viewer.addHandler("resize", draw);
  viewer.addHandler("open", draw);
  viewer.addHandler("canvas-click", event => {
    if (!event.quick) return;
    const item = viewer.world.getItemAt(0);
    if (!item) return;
    const point = item.viewerElementToImageCoordinates(event.position);
    const scale = imageScale(item);
    pickCandidate(point.x, point.y, 8 / scale);
  });
}

function imageScale(item) {
  const a = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
  const b = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 0));
  return (b.x - a.x) / 1000;
}

function radiusPx(c) { return Math.sqrt(c.area_um2 / Math.PI) / state.info.mpp; }

function drawOverlay(canvas) {
  const viewer = state.viewer;
  const item = viewer.world.getItemAt(0);
  const width = viewer.container.clientWidth, height = viewer.container.clientHeight;
  if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  if (!item) return;
  const origin = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
  const scale = imageScale(item);
  const colours = Object.fromEntries(state.info.outcomes.map(o => [o.name, o.colour]));
  ctx.lineWidth = 2;
  state.candidates.forEach((c, j) => {
    const outcome = outcomeOf(c);
    if (state.hidden.has(outcome)) return;
    const x = origin.x + c.x_px * scale, y = origin.y + c.y_px * scale;
    const r = Math.max(4, radiusPx(c) * scale + 3);
    if (x < -r || y < -r || x > width + r || y > height + r) return;
    ctx.strokeStyle = colours[outcome] || "#5a5a5a";
    ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.stroke();
  });
  const selected = state.candidates[state.selectedCandidate];
  if (selected) {
    const x = origin.x + selected.x_px * scale, y = origin.y + selected.y_px * scale;
    const r = Math.max(8, radiusPx(selected) * scale + 8);
    ctx.lineWidth = 4; ctx.strokeStyle = "#ffffff";
    ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.stroke();
    ctx.lineWidth = 2; ctx.strokeStyle = "#000000";
    ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.stroke();
  }
}

function redraw() { if (state.viewer) state.viewer.forceRedraw(); const c = document.getElementById("overlay"); if (c) drawOverlay(c); }

function flyTo(c) {
  const viewer = state.viewer;
  const item = viewer && viewer.world.getItemAt(0);
  if (!item) return;
  const side = 3 * (state.info.crop_um || 25) / state.info.mpp;
  viewer.viewport.fitBounds(item.imageToViewportRectangle(c.x_px - side / 2, c.y_px - side / 2, side, side));
}

function pickCandidate(x, y, slack) {
  let best = -1, bestDistance = Infinity;
  state.candidates.forEach((c, j) => {
    if (state.hidden.has(outcomeOf(c))) return;
    const d = Math.hypot(c.x_px - x, c.y_px - y);
    if (d <= radiusPx(c) + slack && d < bestDistance) { best = j; bestDistance = d; }
  });
  if (best < 0) return;
  const position = state.items.findIndex(it => it.candidate === best);
  if (position >= 0) select(position, false);
  else { state.selectedCandidate = best; showDetails({ candidate: best, cell: state.candidates[best].cell_index }); redraw(); }
}

// --- legend and filters --------------------------------------------------------------------------

function setupLegend() {
  const legend = document.getElementById("legend");
  for (const o of state.info.outcomes) {
    const label = document.createElement("label");
    label.className = "legend-item";
    label.innerHTML = `<input type="checkbox" checked data-outcome="${escape(o.name)}">` +
      `<span class="swatch" style="border-color:${o.colour}"></span>${escape(o.name)} <b>${o.count}</b>`;
    label.querySelector("input").addEventListener("change", e => {
      if (e.target.checked) state.hidden.delete(o.name); else state.hidden.add(o.name);
      redraw();
    });
    legend.appendChild(label);
  }
  const reason = document.getElementById("filter-reason");
  reason.innerHTML = `<option value="accepted">gallery cells (${state.info.n_cells})</option>` +
    state.info.outcomes.filter(o => o.name !== "accepted")
      .map(o => `<option value="${escape(o.name)}">rejected: ${escape(o.name)} (${o.count})</option>`).join("") +
    `<option value="*">all candidates (${state.info.n_candidates})</option>`;
  const labelFilter = document.getElementById("filter-label");
  labelFilter.innerHTML = `<option value="*">any</option><option value="-">unlabelled</option>` +
    `<option value="+">labelled</option>` +
    state.info.labels.map(l => `<option value="${escape(l.name)}">${escape(l.name)}</option>`).join("");
  for (const id of ["filter-reason", "filter-quality", "filter-label"]) {
    // Leave the keys to labelling once a filter is chosen.
    document.getElementById(id).addEventListener("change", e => { e.target.blur(); state.position = -1; render(); });
  }
  document.getElementById("key-list").innerHTML = state.info.labels
    .map(l => `<span class="key"><kbd>${escape(l.key)}</kbd> ${escape(l.name.replaceAll("_", " "))}</span>`).join("");
}

function filteredItems() {
  const reason = document.getElementById("filter-reason").value;
  const minQuality = Number(document.getElementById("filter-quality").value) || 0;
  const labelFilter = document.getElementById("filter-label").value;
  let items;
  if (reason === "accepted") {
    items = state.cells.map((c, i) => ({ cell: i, candidate: c.candidate_index ?? -1, row: c }));
  } else {
    items = [];
    state.candidates.forEach((c, j) => {
      if (reason === "*" || outcomeOf(c) === reason) {
        const cell = c.cell_index >= 0 ? c.cell_index : -1;
        items.push({ cell, candidate: j, row: cell >= 0 ? state.cells[cell] : c });
      }
    });
  }
  return items.filter(it => {
    if ((it.row.quality ?? 0) < minQuality) return false;
    const label = it.cell >= 0 ? state.labels[it.cell] : undefined;
    if (labelFilter === "*") return true;
    if (labelFilter === "-") return !label;
    if (labelFilter === "+") return !!label;
    return label === labelFilter;
  });
}

// --- grid ----------------------------------------------------------------------------------------

function cropUrl(it) {
  return it.cell >= 0 ? `/slide/${encodeURIComponent(stem)}/cell/${it.cell}.jpg`
    : `/slide/${encodeURIComponent(stem)}/candidate/${it.candidate}.jpg`;
}

function render() {
  const keep = state.items[state.position];
  state.items = filteredItems();
  if (keep) state.position = state.items.findIndex(it => it.cell === keep.cell && it.candidate === keep.candidate);
  const grid = document.getElementById("grid");
  grid.textContent = "";
  const fragment = document.createDocumentFragment();
  state.items.forEach((it, position) => {
    const tile = document.createElement("figure");
    tile.className = "tile";
    tile.dataset.position = position;
    if (it.cell >= 0) tile.dataset.cell = it.cell;
    const label = it.cell >= 0 ? state.labels[it.cell] : undefined;
    const quality = it.row.quality == null ? "" : Number(it.row.quality).toFixed(2);
    const name = it.cell >= 0 ? `#${it.cell}` : `cand. ${it.candidate}`;
    tile.innerHTML = `<img loading="lazy" width="96" height="96" alt="${name}" src="${cropUrl(it)}">` +
      `<figcaption><span class="index">${name}</span> q ${quality}` +
      (it.row.padded ? ` <span class="padded" title="crop padded with white at the slide edge">padded</span>` : "") +
      (it.cell < 0 ? ` <span class="rejected">${escape(state.candidates[it.candidate].reason)}</span>` : "") +
      `</figcaption><div class="label-badge">${label ? escape(label.replaceAll("_", " ")) : ""}</div>`;
    if (label) tile.classList.add("labelled");
    if (position === state.position) tile.classList.add("selected");
    tile.addEventListener("click", () => { grid.focus({ preventScroll: true }); select(position, true); });
    fragment.appendChild(tile);
  });
  grid.appendChild(fragment);
  const labelled = Object.keys(state.labels).length;
  document.getElementById("grid-count").textContent =
    `${state.items.length} shown; ${labelled} of ${state.info.n_cells} cells labelled`;
}

function select(position, fly) {
  if (position < 0 || position >= state.items.length) return;
  const grid = document.getElementById("grid");
  const old = grid.querySelector(".tile.selected");
  if (old) old.classList.remove("selected");
  state.position = position;
  const it = state.items[position];
  const tile = grid.querySelector(`.tile[data-position="${position}"]`);
  if (tile) { tile.classList.add("selected"); tile.scrollIntoView({ block: "nearest" }); }
  state.selectedCandidate = it.candidate;
  showDetails(it);
  if (fly) flyTo(it.row);
  redraw();
}

function showDetails(it) {
  const box = document.getElementById("details");
  const candidate = it.candidate >= 0 ? state.candidates[it.candidate] : null;
  const row = it.cell >= 0 ? state.cells[it.cell] : candidate;
  const features = Object.entries(row)
    .filter(([k, v]) => typeof v === "number" || typeof v === "boolean")
    .map(([k, v]) => `<tr><th>${escape(k)}</th><td>${typeof v === "number" ? Number(v.toPrecision(5)) : v}</td></tr>`)
    .join("");
  const title = it.cell >= 0 ? `cell #${it.cell}` : `candidate ${it.candidate} (${escape(outcomeOf(candidate))}, not in the gallery)`;
  const label = it.cell >= 0 ? (state.labels[it.cell] || "unlabelled") : "";
  box.innerHTML = `<h2>${title} <span class="label-now">${escape(label)}</span></h2>` +
    `<img class="big" alt="${title}" src="${cropUrl(it.cell >= 0 ? it : { cell: -1, candidate: it.candidate })}">` +
    `<table class="features">${features}</table>`;
}

// --- labels --------------------------------------------------------------------------------------

// Labels are shown and the selection moves on at once; the requests go out one after the other, so
// fast typing never labels one cell twice or loses the order of a label and its undo.
let pending = Promise.resolve();

function setLabel(cell, label) {
  if (label) state.labels[cell] = label; else delete state.labels[cell];
  updateTile(cell);
  const annotator = state.annotator;
  state.unsaved += 1;
  pending = pending.then(() => getJSON(`${api}/labels/${encodeURIComponent(annotator)}`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ cell, label }),
  })).then(data => {
    if (annotator === state.annotator) { state.labels = data.labels; updateTile(cell); }
      }).catch(error => {
    alert(`label not saved: ${error.message}`);
    getJSON(`${api}/labels/${encodeURIComponent(annotator)}`).then(data => { state.labels = data.labels; render(); });
  }).finally(() => { state.unsaved -= 1; });
  return pending;
}

function updateTile(cell) {
  const label = state.labels[cell];
  const tile = document.querySelector(`#grid .tile[data-cell="${cell}"]`);
  if (tile) {
    tile.querySelector(".label-badge").textContent = label ? label.replaceAll("_", " ") : "";
    tile.classList.toggle("labelled", !!label);
  }
  const now = document.querySelector("#details .label-now");
  const it = state.items[state.position];
  if (now && it && it.cell === cell) now.textContent = label || "unlabelled";
  const labelled = Object.keys(state.labels).length;
  document.getElementById("grid-count").textContent =
    `${state.items.length} shown; ${labelled} of ${state.info.n_cells} cells labelled`;
}

function labelSelected(label) {
  const it = state.items[state.position];
  if (!it || it.cell < 0) return;
  if (!state.annotator) { askAnnotator(); return; }
  state.undo.push({ cell: it.cell, previous: state.labels[it.cell] || null });
  setLabel(it.cell, label);
  select(Math.min(state.position + 1, state.items.length - 1), false);
}

function undo() {
  const last = state.undo.pop();
  if (!last) return;
  setLabel(last.cell, last.previous);
  const position = state.items.findIndex(it => it.cell === last.cell);
  if (position >= 0) select(position, false);
}

function onKey(event) {
  if (event.target.closest("input, select, textarea, dialog")) return;
  const keys = Object.fromEntries(state.info.labels.map(l => [l.key, l.name]));
  if (event.key === "ArrowRight" || event.key === "ArrowDown") select(Math.max(0, state.position + 1), false);
  else if (event.key === "ArrowLeft" || event.key === "ArrowUp") select(Math.max(0, state.position - 1), false);
  else if (event.key === "Enter") { const it = state.items[state.position]; if (it) flyTo(it.row); }
  else if (event.key === "Backspace" || (event.key === "z" && (event.ctrlKey || event.metaKey))) undo();
  else if (!event.ctrlKey && !event.metaKey && !event.altKey && keys[event.key.toLowerCase()]) labelSelected(keys[event.key.toLowerCase()]);
  else if (event.key === "?" ) labelSelected("unsure");
  else return;
  event.preventDefault();
}

// --- start ---------------------------------------------------------------------------------------

(async function start() {
  const [info, cells, candidates] = await Promise.all([
    getJSON(api), getJSON(`${api}/cells`), getJSON(`${api}/candidates`),
  ]);
  state.info = info; state.cells = rows(cells); state.candidates = rows(candidates);
  const rejected = info.n_candidates - info.n_cells;
  document.getElementById("slide-summary").textContent =
    `${info.n_cells} cells, ${info.n_candidates} candidates (${rejected} rejected), ${info.mpp} um/px`;
  setupLegend();
  setupViewer();
  render();
  document.addEventListener("keydown", onKey);
  document.getElementById("annotator-change").addEventListener("click", askAnnotator);
  document.getElementById("annotator-form").addEventListener("submit", () => {
    const name = document.getElementById("annotator-input").value.trim();
    if (name) setAnnotator(name);
  });
  const saved = localStorage.getItem("review.annotator");
  if (saved) await setAnnotator(saved); else askAnnotator();
  if (state.items.length) select(0, false);
  document.body.dataset.ready = "1";
})().catch(error => {
  document.body.insertAdjacentHTML("afterbegin", `<p class="fatal">${escape(error.message)}</p>`);
});
