// cfmodules explorer: paint a region, select channels, see hybrids. No dependencies.
"use strict";
(function () {
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
  const $ = (id) => document.getElementById(id);
  const state = {
    info: null, start: 0, selection: {}, mask: null, painting: false,
    background: null, hybridSeq: 0, hybridsVersion: 0, selectSeq: 0,
  };

  function setStatus(text, isError) {
    const el = $("status");
    el.textContent = text;
    el.style.color = isError ? "#b00" : "";
  }

  async function api(path, body) {
    const opts = body === undefined ? {} : {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
    const resp = await fetch(path, opts);
    const type = resp.headers.get("Content-Type") || "";
    if (!resp.ok) {
      let msg = resp.status + " " + resp.statusText;
      if (type.includes("json")) { msg = (await resp.json()).error || msg; }
      throw new Error(msg);
    }
    return type.includes("json") && !path.endsWith("module") ? resp.json() : resp.blob();
  }

  function count(sel) {
    return Object.values(sel).reduce((n, chans) => n + chans.length, 0);
  }

  function selectionKey(layer, ch) { return layer + "[" + ch + "]"; }

  function isSelected(layer, ch) {
    return (state.selection[layer] || []).includes(ch);
  }

  // ------------------------------------------------------------------ drawing
  function renderSelection() {
    const n = count(state.selection);
    $("selection-count").textContent = n + (n === 1 ? " channel" : " channels") + " selected";
    document.querySelectorAll(".chip").forEach((chip) => {
      chip.classList.toggle("selected", isSelected(chip.dataset.layer, +chip.dataset.channel));
    });
    document.querySelectorAll("#modules button").forEach((b) => {
      const mod = state.info.modules[+b.dataset.module];
      b.classList.toggle("active", mod !== undefined && sameSelection(mod.channels, state.selection));
    });
  }

  function sameSelection(a, b) {
    const norm = (s) => JSON.stringify(Object.keys(s).sort().filter((k) => s[k].length)
      .map((k) => [k, [...s[k]].sort((x, y) => x - y)]));
    return norm(a) === norm(b);
  }

  function setRow(rowId, urls, cls) {
    const row = $(rowId);
    while (row.cells.length > 1) { row.deleteCell(1); }
    urls.forEach((url, i) => {
      const img = document.createElement("img");
      img.src = url; img.alt = cls + " " + i; img.className = cls;
      if (rowId === "row-original1") {
        img.title = "Paint on this face";
        img.addEventListener("click", () => setBackground(url));
      }
      row.insertCell().appendChild(img);
    });
  }

  function setBackground(url) {
    const img = new Image();
    img.onload = () => { state.background = img; drawCanvas(); };
    img.src = url;
  }

  function drawCanvas() {
    const canvas = $("paint"), ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (state.background) { ctx.drawImage(state.background, 0, 0, canvas.width, canvas.height); }
    const [h, w] = state.info.map_shape;
    const sx = canvas.width / w, sy = canvas.height / h;
    ctx.fillStyle = "rgba(255, 40, 200, 0.45)";
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        if (state.mask[y * w + x]) { ctx.fillRect(x * sx, y * sy, Math.ceil(sx), Math.ceil(sy)); }
      }
    }
  }

  // ------------------------------------------------------------------ requests
  async function loadPairs() {
    setStatus("drawing pairs...");
    const data = await api("/api/pairs?start=" + state.start);
    setRow("row-original1", data.original1, "original1");
    setRow("row-original2", data.original2, "original2");
    setBackground(data.original1[0]);
  }

  async function updateHybrids() {
    const seq = ++state.hybridSeq;
    setStatus("rendering hybrids...");
    try {
      const data = await api("/api/hybrids", {selection: state.selection, start: state.start});
      if (seq !== state.hybridSeq) { return; }  // a newer request is on its way
      setRow("row-hybrid", data.hybrids, "hybrid");
      state.hybridsVersion += 1;
      document.body.dataset.hybridsVersion = String(state.hybridsVersion);
      setStatus("hybrids of " + count(data.selection) + " channels in " + data.ms + " ms");
    } catch (e) {
      if (seq === state.hybridSeq) { setStatus(e.message, true); }
    }
  }

  function setSelection(sel) {
    const clean = {};
    Object.keys(sel).forEach((k) => { if (sel[k].length) { clean[k] = [...sel[k]].sort((a, b) => a - b); } });
    state.selection = clean;
    renderSelection();
    return updateHybrids();
  }

  async function selectRegion() {
    const [h, w] = state.info.map_shape;
    const rows = [];
    for (let y = 0; y < h; y++) { rows.push(Array.from(state.mask.subarray(y * w, (y + 1) * w))); }
    const seq = ++state.selectSeq;
    try {
      const data = await api("/api/select", {mask: rows, threshold: +$("threshold").value / 100});
      if (seq !== state.selectSeq) { return; }
      $("region-info").textContent = "region: " + Math.round(100 * data.area) + "% of the image, "
        + count(data.selection) + " channels put >= " + Math.round(100 * data.threshold)
        + "% of their mass in it";
      $("scores").textContent = "Best channels for the region: " + data.scores.slice(0, 10)
        .map((s) => s.layer + "[" + s.channel + "] " + Math.round(100 * s.share) + "%").join(", ");
      await setSelection(data.selection);
    } catch (e) {
      setStatus(e.message, true);
      $("region-info").textContent = e.message;
    }
  }

  // ------------------------------------------------------------------ painting
  function paintAt(ev) {
    const canvas = $("paint"), rect = canvas.getBoundingClientRect();
    const [h, w] = state.info.map_shape;
    const cx = (ev.clientX - rect.left) / rect.width * w;
    const cy = (ev.clientY - rect.top) / rect.height * h;
    const r = +$("brush").value / rect.width * w;  // brush radius in screen pixels
    for (let y = Math.max(0, Math.floor(cy - r)); y < Math.min(h, Math.ceil(cy + r)); y++) {
      for (let x = Math.max(0, Math.floor(cx - r)); x < Math.min(w, Math.ceil(cx + r)); x++) {
        if ((x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= r * r) { state.mask[y * w + x] = 1; }
      }
    }
    drawCanvas();
  }

  function setupPainting() {
    const canvas = $("paint");
    canvas.addEventListener("pointerdown", (ev) => {
      state.painting = true;
      if (canvas.setPointerCapture) { try { canvas.setPointerCapture(ev.pointerId); } catch (e) { /* synthetic */ } }
      paintAt(ev);
    });
    canvas.addEventListener("pointermove", (ev) => { if (state.painting) { paintAt(ev); } });
    const end = () => {
      if (!state.painting) { return; }
      state.painting = false;
      if (state.mask.some((v) => v)) { selectRegion(); }
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    canvas.addEventListener("pointerleave", end);
    $("clear-region").addEventListener("click", () => {
      state.mask.fill(0); drawCanvas(); $("region-info").textContent = ""; $("scores").textContent = "";
    });
    $("threshold").addEventListener("input", () => { $("threshold-value").textContent = $("threshold").value; });
    $("threshold").addEventListener("change", () => { if (state.mask.some((v) => v)) { selectRegion(); } });
  }

  // ------------------------------------------------------------------ controls
  function buildModules() {
    const box = $("modules");
    state.info.modules.forEach((m, k) => {
      const b = document.createElement("button");
      b.type = "button"; b.dataset.module = String(k);
      const n = count(m.channels);
      b.innerHTML = '<span class="sw" style="background:' + PALETTE[k % PALETTE.length] + '"></span>';
      b.appendChild(document.createTextNode(m.name + " (" + n + ")"));
      b.addEventListener("click", () => setSelection(m.channels));
      box.appendChild(b);
    });
    const none = document.createElement("button");
    none.type = "button"; none.id = "select-none"; none.textContent = "Select none";
    none.addEventListener("click", () => setSelection({}));
    box.appendChild(none);
  }

  function showMap(u) {
    const img = $("channel-map-img");
    img.src = "/api/map/" + encodeURIComponent(u.layer) + "/" + u.channel;
    img.alt = "influence map of " + selectionKey(u.layer, u.channel);
    $("channel-map-caption").textContent = selectionKey(u.layer, u.channel) + ", module "
      + u.module + ", influence " + u.influence.toFixed(4);
  }

  function buildChannels() {
    const box = $("channels");
    state.info.units.forEach((u) => {
      const chip = document.createElement("span");
      chip.className = "chip"; chip.dataset.layer = u.layer; chip.dataset.channel = String(u.channel);
      chip.textContent = (state.info.layers.length > 1 ? u.layer + ":" : "") + u.channel;
      chip.style.background = PALETTE[u.module % PALETTE.length] + "33";
      chip.title = selectionKey(u.layer, u.channel) + " (module " + u.module + ")";
      chip.addEventListener("mouseenter", () => showMap(u));
      chip.addEventListener("click", () => {
        const sel = {};
        Object.keys(state.selection).forEach((k) => { sel[k] = [...state.selection[k]]; });
        const chans = sel[u.layer] || [];
        sel[u.layer] = chans.includes(u.channel) ? chans.filter((c) => c !== u.channel) : chans.concat([u.channel]);
        showMap(u);
        setSelection(sel);
      });
      box.appendChild(chip);
    });
  }

  function download(blob, name) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = name;
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  function setupButtons() {
    $("new-pairs").addEventListener("click", async () => {
      state.start += state.info.n_pairs;
      try { await loadPairs(); await updateHybrids(); } catch (e) { setStatus(e.message, true); }
    });
    $("download-module").addEventListener("click", async () => {
      try {
        download(await api("/api/module", {selection: state.selection, name: "selection"}), "module.json");
      } catch (e) { setStatus(e.message, true); }
    });
    $("download-png").addEventListener("click", async () => {
      try {
        download(await api("/api/hybrids.png", {selection: state.selection, start: state.start}), "hybrids.png");
      } catch (e) { setStatus(e.message, true); }
    });
  }

  async function init() {
    try {
      state.info = await api("/api/info");
      const [h, w] = state.info.map_shape;
      state.mask = new Uint8Array(h * w);
      $("model-name").textContent = state.info.model + ", layer "
        + state.info.layers.map((l) => l.name + " (" + l.channels + " channels)").join(" + ");
      buildModules(); buildChannels(); setupPainting(); setupButtons();
      await loadPairs();
      await setSelection(state.info.modules.length ? state.info.modules[0].channels : {});
      document.body.dataset.ready = "1";
    } catch (e) {
      setStatus("could not start: " + e.message, true);
    }
  }

  init();
})();
