// The search page: a query (text, image or both), a ranking mode and facet filters -> POST
// /search with ground=1 -> a grid of results, each with its grounding box drawn on a canvas
// over the image, and the answer's facet counts as chips that toggle a filter. Boxes are drawn
// in pure magenta (#ff00ff) so a screenshot test can find them.
"use strict";

const BOX_COLOUR = "#ff00ff";
const form = document.getElementById("search-form");
const statusLine = document.getElementById("status");
const grid = document.getElementById("results");
const facetBar = document.getElementById("facets");
// chosen filters: facet -> set of values (one facet: any of its values; several: all)
const chosen = new Map();
let lastQuery = null;

function apiKey() {
  return sessionStorage.getItem("eclip-api-key");
}

async function api(url, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("X-API-Key", key);
  let response = await fetch(url, { ...options, headers });
  if (response.status === 401) {
    const entered = window.prompt("API key");
    if (entered) {
      sessionStorage.setItem("eclip-api-key", entered);
      headers.set("X-API-Key", entered);
      response = await fetch(url, { ...options, headers });
    }
  }
  return response;
}

// With an API key the image request needs the header, which <img src> cannot send: fetch it
// and show a blob URL instead.
async function imageSource(url) {
  if (!apiKey()) return url;
  const response = await api(url);
  if (!response.ok) throw new Error(`image ${response.status}`);
  return URL.createObjectURL(await response.blob());
}

function drawBox(canvas, box) {
  const rect = canvas.getBoundingClientRect();
  canvas.width = Math.max(1, Math.round(rect.width));
  canvas.height = Math.max(1, Math.round(rect.height));
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!box) return;
  const [x0, y0, x1, y1] = box;
  ctx.strokeStyle = BOX_COLOUR;
  ctx.lineWidth = 4;
  ctx.strokeRect(x0 * canvas.width + 2, y0 * canvas.height + 2,
                 Math.max(4, (x1 - x0) * canvas.width - 4), Math.max(4, (y1 - y0) * canvas.height - 4));
}

function card(result) {
  const el = document.createElement("article");
  el.className = "card";
  el.dataset.productId = result.product_id;
  el._box = result.box;
  const frame = document.createElement("div");
  frame.className = "frame";
  const img = document.createElement("img");
  img.alt = result.title || result.product_id;
  const canvas = document.createElement("canvas");
  frame.append(img, canvas);
  const title = document.createElement("div");
  title.className = "title";
  title.textContent = result.title || result.product_id;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = `#${result.rank} ${result.product_id} · score ${result.score.toFixed(3)}` +
    (result.category ? ` · ${result.category}` : "");
  if (result.category) el.dataset.category = result.category;
  el.append(frame, title, meta);
  const loaded = new Promise((resolve) => {
    img.onload = () => { drawBox(canvas, result.box); resolve(); };
    img.onerror = () => resolve();
  });
  if (result.image_url) {
    imageSource(result.image_url).then((src) => { img.src = src; }).catch(() => {});
  }
  return [el, loaded];
}

function toggle(key, value) {
  const values = chosen.get(key) || new Set();
  if (values.has(value)) values.delete(value); else values.add(value);
  if (values.size) chosen.set(key, values); else chosen.delete(key);
  if (lastQuery) search(...lastQuery).catch((error) => { statusLine.textContent = String(error); });
}

function showFacets(facets) {
  facetBar.replaceChildren();
  for (const [key, counts] of Object.entries(facets || {})) {
    const row = document.createElement("div");
    row.className = "facet";
    row.dataset.facet = key;
    const name = document.createElement("span");
    name.className = "facet-name";
    name.textContent = key;
    row.append(name);
    for (const [value, count] of Object.entries(counts)) {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = "chip" + ((chosen.get(key) || new Set()).has(value) ? " active" : "");
      chip.dataset.value = value;
      chip.textContent = `${value} (${count})`;
      chip.addEventListener("click", () => toggle(key, value));
      row.append(chip);
    }
    facetBar.append(row);
  }
}

async function search(text, file, k) {
  lastQuery = [text, file, k];
  const body = new FormData();
  if (text) body.append("text", text);
  if (file) body.append("image", file);
  body.append("k", String(k));
  body.append("ground", "1");
  const mode = document.getElementById("mode").value;
  if (text) body.append("mode", mode);
  for (const [key, values] of chosen) {
    for (const value of values) body.append("filters", `${key}=${value}`);
  }
  document.body.dataset.state = "searching";
  statusLine.textContent = "searching…";
  const response = await api("/search", { method: "POST", body });
  const data = await response.json();
  if (!response.ok) {
    const err = data.error || {};
    statusLine.textContent = `error ${response.status}${err.field ? ` (${err.field})` : ""}: ${err.message}`;
    document.body.dataset.state = "error";
    return;
  }
  grid.replaceChildren();
  showFacets(data.facets);
  const pending = [];
  for (const result of data.results) {
    const [el, loaded] = card(result);
    grid.append(el);
    pending.push(loaded);
  }
  const filters = [...chosen].map(([key, values]) => `${key}: ${[...values].join(" or ")}`).join("; ");
  statusLine.textContent = `${data.results.length} results in ${data.took_ms} ms` + (filters ? ` (${filters})` : "");
  await Promise.all(pending);
  document.body.dataset.state = "done";
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = document.getElementById("q").value.trim();
  const file = document.getElementById("image").files[0];
  const k = Number(document.getElementById("k").value) || 12;
  if (!text && !file) { statusLine.textContent = "type a query or choose an image"; return; }
  search(text, file, k).catch((error) => { statusLine.textContent = String(error); });
});

window.addEventListener("resize", () => {
  for (const canvas of grid.querySelectorAll("canvas")) {
    const el = canvas.closest(".card");
    if (el && el._box) drawBox(canvas, el._box);
  }
});

// /?q=red+shirt&k=8&mode=hybrid&filter=category%3Dshirt runs that search on load (links,
// bookmarks, the browser test); filter repeats
const params = new URLSearchParams(window.location.search);
if (params.get("q")) {
  document.getElementById("q").value = params.get("q");
  if (params.get("k")) document.getElementById("k").value = params.get("k");
  if (params.get("mode")) document.getElementById("mode").value = params.get("mode");
  for (const expression of params.getAll("filter")) {
    const at = expression.indexOf("=");
    if (at > 0) {
      const key = expression.slice(0, at), value = expression.slice(at + 1);
      chosen.set(key, (chosen.get(key) || new Set()).add(value));
    }
  }
  search(params.get("q"), null, Number(params.get("k")) || 12)
    .catch((error) => { statusLine.textContent = String(error); });
}
