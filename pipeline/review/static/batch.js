"use strict";
// Batch page: one row per slide of the output folder, from /api/batch.
(async function () {
  const response = await fetch("/api/batch");
  const data = await response.json();
  const body = document.querySelector("#slides tbody");
  let cells = 0, failed = 0;
  for (const s of data.slides) {
    cells += s.cells;
    if (s.status === "failed") failed += 1;
    const tr = document.createElement("tr");
    tr.className = "status-" + s.status;
    const name = s.has_gallery
      ? `<a href="/slide/${encodeURIComponent(s.stem)}">${escape(s.stem)}</a>` : escape(s.stem);
    const reasons = Object.entries(s.rejected_by_reason).map(([r, n]) => `${escape(r)} ${n}`).join(", ");
    const pictures = s.pictures.map(p => `<a href="/files/${encodeURIComponent(p)}">${escape(p.split(".").slice(-2, -1)[0])}</a>`).join(" ");
    tr.innerHTML = `<td>${name}</td><td>${escape(s.status)}</td><td class="num">${s.cells}</td>` +
      `<td class="num">${s.candidates}</td><td>${reasons}</td><td class="num">${s.padded}</td>` +
      `<td class="num">${s.seconds == null ? "" : Number(s.seconds).toFixed(1)}</td><td>${pictures}</td>` +
      `<td class="error">${escape(s.error)}</td>`;
    body.appendChild(tr);
  }
  document.getElementById("summary").textContent =
    `${data.slides.length} slides, ${cells} cells, ${failed} failed`;
})();

function escape(text) {
  const div = document.createElement("div");
  div.textContent = text == null ? "" : String(text);
  return div.innerHTML;
}
