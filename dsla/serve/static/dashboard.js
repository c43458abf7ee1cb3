// The live page of `dsla serve` (dsla/serve/dashboard.py serves it). Plain JS, no dependencies.
// Polls GET /v1/dsla/dashboard about once a second and redraws; forces plans with POST /v1/dsla/plan.
// Server text (reasons, errors) only ever goes into textContent, never into HTML.
"use strict";
(() => {
  const POLL_MS = 1000;
  const KEEP_S = 600; // samples older than this are dropped (the server keeps ten minutes too)
  const KEY_NAME = "dsla.apiKey"; // sessionStorage: gone when the tab closes
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  let key = sessionStorage.getItem(KEY_NAME);
  let samples = []; // oldest first
  let changes = []; // plan changes (the plan view's history), oldest first
  let data = null; // the latest GET /v1/dsla/dashboard body
  let timer = null;
  let polling = false;

  // ---- small helpers ---------------------------------------------------------------------------
  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "text") e.textContent = v;
      else if (k === "data") Object.assign(e.dataset, v);
      else if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  const fmtBytes = (b) => b == null ? "–" : b >= 2 ** 30 ? (b / 2 ** 30).toFixed(2) + " GiB"
    : b >= 2 ** 20 ? (b / 2 ** 20).toFixed(1) + " MiB" : b >= 1024 ? (b / 1024).toFixed(1) + " KiB" : b + " B";
  const fmtNum = (x) => x == null ? "–" : Number.isInteger(x) ? String(x) : Math.abs(x) >= 100 ? x.toFixed(0)
    : Math.abs(x) >= 1 ? x.toFixed(2) : x.toFixed(3);
  const fmtPct = (x) => x == null ? "unknown" : (x >= 0 ? "+" : "") + (100 * x).toFixed(1) + "%";
  const fmtTime = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  const list = (xs) => "[" + xs.join(", ") + "]";
  // A fold frees the layer's KV but adds its DSLA state: short requests can come out negative.
  const freed = (b) => b >= 0 ? "freed " + fmtBytes(b) : "added " + fmtBytes(-b);

  async function call(method, path, body) {
    const headers = {};
    if (key) headers.Authorization = "Bearer " + key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers, cache: "no-store", credentials: "omit",
                                  body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await r.text();
    let json = null;
    try { json = JSON.parse(text); } catch (e) { json = null; }
    return { status: r.status, ok: r.ok, json, text };
  }
  // The API's own words: the OpenAI-style error message, else the body as it came.
  const apiError = (res) => `HTTP ${res.status}` + (res.json && res.json.error
    ? `${res.json.error.code ? " " + res.json.error.code : ""}: ${res.json.error.message}` : `: ${res.text}`);

  function setStatus(cls, text) {
    const s = $("status");
    s.className = "status " + cls;
    s.textContent = text;
  }

  // ---- polling ---------------------------------------------------------------------------------
  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(poll, ms === undefined ? POLL_MS : ms);
  }

  async function poll() {
    if (polling) return schedule();
    polling = true;
    try {
      const since = samples.length ? "?since=" + samples[samples.length - 1].time : "";
      let res;
      try {
        res = await call("GET", "/v1/dsla/dashboard" + since);
      } catch (e) {
        setStatus("stale", "no connection: retrying");
        return schedule();
      }
      if (res.status === 401) return showKeyGate(key ? apiError(res) : "");
      if (!res.ok || !res.json) {
        setStatus("stale", apiError(res));
        return schedule();
      }
      data = res.json;
      const cut = data.server_time - KEEP_S;
      // With ?since the server sends only what is new; the first answer has everything it keeps.
      // A change newer than the last sample comes again with every poll until the next sample: keep it once.
      const seen = changes.length ? changes[changes.length - 1].time : -Infinity;
      changes = (since ? changes.concat(data.plan.history.filter((e) => e.time > seen)) : data.plan.history)
        .filter((e) => e.time >= cut);
      samples = samples.concat(data.samples).filter((s) => s.time >= cut);
      $("keygate").hidden = true;
      $("main").hidden = false;
      render();
      setStatus(data.alive ? "ok" : "stale", data.alive ? "live · " + fmtTime(data.server_time)
        : "engine not running");
      schedule();
    } finally {
      polling = false;
    }
  }

  function showKeyGate(message) {
    $("main").hidden = true;
    $("keygate").hidden = false;
    $("key-error").textContent = message;
    setStatus("stale", "API key needed");
    $("key").focus();
  }

  $("keyform").addEventListener("submit", (ev) => {
    ev.preventDefault();
    key = $("key").value;
    $("key").value = "";
    sessionStorage.setItem(KEY_NAME, key);
    samples = [];
    changes = [];
    schedule(0);
  });

  // ---- drawing ---------------------------------------------------------------------------------
  function render() {
    const p = data.plan;
    const last = samples[samples.length - 1] || {};
    $("model").textContent = data.model;
    $("summary").textContent = `policy ${p.policy} · ratio ${p.ratio.toFixed(2)} (${p.dsla_layers.length} of `
      + `${p.num_layers} layers DSLA) · running ${fmtNum(last.running)} · waiting ${fmtNum(last.waiting)} · `
      + `${fmtNum(last.tokens_per_s)} tokens/s`;
    renderLayers(p);
    renderSignals(p);
    renderQuality(p);
    renderMemory(p);
    renderControl(p);
    renderCharts(p);
    renderEvents();
  }

  function renderLayers(p) {
    const dsla = new Set(p.dsla_layers);
    const rank = new Map(p.converted_order.map((l, i) => [l, i + 1]));
    const rest = [...Array(p.num_layers).keys()].filter((i) => !p.order.includes(i));
    const next = p.next_candidate.layer;
    const strip = $("layers");
    strip.replaceChildren(...p.order.concat(rest).map((i, pos) => {
      const isDsla = dsla.has(i);
      const inOrder = pos < p.order.length;
      const cls = "layer " + (isDsla ? "dsla" : "attn") + (i === next ? " next" : "") + (inOrder ? "" : " untrained");
      const title = `layer ${i}: ${isDsla ? "DSLA" + (rank.has(i) ? ` (converted ${rank.get(i)}.)` : "") : "attention"}`
        + (inOrder ? `, ${pos + 1}. in the conversion order` : ", not in the conversion order (no DSLA weights)")
        + (i === next ? "; the next candidate" : "");
      return el("div", { class: cls, title, data: { layer: i, kind: isDsla ? "dsla" : "attention" } },
                String(i), el("small", { text: inOrder ? "#" + (pos + 1) : "–" }));
    }));
    $("next-note").textContent = next != null ? `next: layer ${next}`
      : `no next candidate: ${p.next_candidate.blocked}`;
  }

  const SIGNAL_NAMES = { queued_prompt_tokens: "queued prompt tokens", queue_depth: "queue depth",
                         oldest_wait_s: "oldest wait, s", cache_fraction: "cache / budget",
                         ttft_s: "recent TTFT, s", tpot_s: "recent TPOT, s" };

  function renderSignals(p) {
    $("signals").replaceChildren(...p.signals.map((s) => {
      const v = s.value == null ? 0 : s.value;
      const bar = el("div", { class: "bar" });
      let state = "";
      if (s.convert != null) {
        const top = Math.max(s.convert * 1.25, v) || 1;
        state = v >= s.convert ? "over" : v > s.revert ? "hyst" : "";
        bar.append(el("div", { class: "fill " + state }), el("div", { class: "tick revert" }),
                   el("div", { class: "tick convert" }));
        bar.children[0].style.width = (100 * v / top) + "%";
        bar.children[1].style.left = (100 * s.revert / top) + "%";
        bar.children[2].style.left = (100 * s.convert / top) + "%";
        bar.title = `revert at ≤ ${fmtNum(s.revert)}, convert at ≥ ${fmtNum(s.convert)}`;
      }
      return el("div", { class: "sig", data: { signal: s.name, state: state || "calm" } },
                el("span", { text: SIGNAL_NAMES[s.name] || s.name }), bar,
                el("span", { class: "val", text: fmtNum(s.value) + (s.convert != null ? " / " + fmtNum(s.convert) : "") }));
    }));
    const d = p.controller && p.controller.last_decision;
    $("decision").textContent = p.controller ? (d ? `policy: ${d.action}, ${d.reason}` : "policy: no decision yet")
      : "static policy: no thresholds; the plan changes only when forced";
  }

  function renderQuality(p) {
    const q = p.quality;
    const box = $("quality");
    if (!q.curve.length) {
      box.replaceChildren(el("p", { class: "note", text: "No eval report on this server: start `dsla serve` with "
        + "--quality-report REPORT (from `dsla eval`) to see the expected perplexity increase." }));
      return;
    }
    const bar = el("div", { class: "bar" }, el("div", { class: "fill" }));
    const top = Math.max(q.budget || 0, q.expected_increase || 0, ...q.curve.map((c) => c[1])) || 1;
    bar.children[0].style.width = (100 * Math.max(0, q.expected_increase || 0) / top) + "%";
    if (q.budget != null) {
      const t = el("div", { class: "tick convert" });
      t.style.left = (100 * q.budget / top) + "%";
      bar.append(t);
      if (q.expected_increase != null && q.expected_increase > q.budget) bar.children[0].className = "fill over";
    }
    box.replaceChildren(
      el("div", { class: "big", text: fmtPct(q.expected_increase) }),
      el("p", { class: "note", text: `expected perplexity increase at ratio ${p.ratio.toFixed(2)} (the served `
        + `student's eval report)` }), bar,
      el("p", { class: "note", text: q.budget != null ? `quality budget ${fmtPct(q.budget)}` : "no quality budget set" }),
      el("p", { class: "note", text: "measured: " + q.curve.map((c) => `${c[0].toFixed(2)} → ${fmtPct(c[1])}`).join(", ") }));
  }

  function renderMemory(p) {
    const m = p.memory;
    const used = m.kv_bytes + m.dsla_state_bytes;
    const top = Math.max(m.cache_budget_bytes, used) || 1;
    const bar = el("div", { class: "bar" }, el("div", { class: "fill kv" }), el("div", { class: "fill state" }));
    bar.children[0].style.width = (100 * m.kv_bytes / top) + "%";
    bar.children[1].style.left = (100 * m.kv_bytes / top) + "%";
    bar.children[1].style.width = (100 * m.dsla_state_bytes / top) + "%";
    const lc = m.last_conversion;
    $("memory").replaceChildren(
      el("div", { class: "kv-row" }, el("span", { text: "KV (attention layers)" }), el("span", { text: fmtBytes(m.kv_bytes) })),
      el("div", { class: "kv-row" }, el("span", { text: "DSLA state" }), el("span", { text: fmtBytes(m.dsla_state_bytes) })),
      el("div", { class: "kv-row" }, el("span", { text: "budget" }), el("span", { text: fmtBytes(m.cache_budget_bytes) })),
      bar,
      el("p", { class: "note", text: lc ? `last conversion (${lc.source}, ${fmtTime(lc.time)}): layers `
        + `${list(lc.converted)} ${freed(lc.freed_bytes)}, folding ${lc.in_flight_folded} in-flight caches`
        : "no conversion yet" }));
  }

  // ---- control ---------------------------------------------------------------------------------
  function renderControl(p) {
    const on = data.plan_control;
    const todo = p.order.filter((i) => !p.dsla_layers.includes(i));
    $("control-note").textContent = on ? "Forces the plan through POST /v1/dsla/plan (the policy may change it "
      + "again later)." : "Read-only: this server runs with --no-plan-control.";
    $("convert-next").disabled = !on || !todo.length;
    $("revert-last").disabled = !on || !p.converted_order.length;
    $("revert-all").disabled = !on || !p.dsla_layers.length;
    $("apply-ratio").disabled = !on;
    $("ratio-input").disabled = !on;
  }

  async function force(body) {
    const out = $("control-result");
    out.className = "result";
    out.textContent = "…";
    let res;
    try {
      res = await call("POST", "/v1/dsla/plan", { ...body, reason: "live page" });
    } catch (e) {
      out.className = "result error";
      out.textContent = "no connection: " + e.message;
      return;
    }
    if (!res.ok || !res.json) {
      out.className = "result error";
      out.textContent = apiError(res);
      if (res.status === 401) showKeyGate(apiError(res));
      return;
    }
    const c = res.json.change;
    out.textContent = `HTTP ${res.status}: converted ${list(c.converted)}, reverted ${list(c.reverted)} → ratio `
      + `${c.ratio.toFixed(2)}` + (c.converted.length ? `; folded ${c.in_flight_folded} in-flight caches, `
      + freed(c.freed_bytes) : "");
    schedule(0);
  }

  $("convert-next").addEventListener("click", () => {
    const p = data.plan;
    const next = p.order.find((i) => !p.dsla_layers.includes(i));
    if (next !== undefined) force({ layers: p.converted_order.concat([next]) });
  });
  $("revert-last").addEventListener("click", () => force({ layers: data.plan.converted_order.slice(0, -1) }));
  $("revert-all").addEventListener("click", () => force({ ratio: 0 }));
  $("ratio-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    force({ ratio: Number($("ratio-input").value) });
  });

  // ---- timeline --------------------------------------------------------------------------------
  function chart(name, label, series, p, opts) {
    const span = Number($("span").value);
    const t1 = data.server_time, t0 = t1 - span;
    const W = Math.max(200, $("charts").clientWidth || 800), H = 90;
    const shown = samples.filter((s) => s.time >= t0);
    let ymax = opts.ymax;
    if (ymax == null) {
      ymax = 0;
      for (const s of shown) for (const se of series) ymax = Math.max(ymax, se.get(s) || 0);
      ymax = ymax > 0 ? ymax * 1.1 : 1;
    }
    const x = (t) => (W * (t - t0) / span).toFixed(1);
    const y = (v) => (H - 3 - (H - 6) * Math.min(v, ymax) / ymax).toFixed(1);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
                              "aria-label": label, "data-chart": name });
    root.append(svg("line", { class: "grid", x1: 0, x2: W, y1: y(ymax / 2), y2: y(ymax / 2) }));
    for (const se of series) {
      const pts = [];
      for (const s of shown) {
        const v = se.get(s);
        if (v == null) continue;
        if (se.step && pts.length) pts.push(`${x(s.time)},${pts[pts.length - 1].split(",")[1]}`);
        pts.push(`${x(s.time)},${y(v)}`);
      }
      root.append(svg("polyline", { class: se.cls, fill: "none", "stroke-width": 1.8, points: pts.join(" ") }));
    }
    for (const e of changes) {
      if (e.time < t0) continue;
      const m = svg("line", { class: "marker " + (e.source === "api" ? "api" : "policy"), x1: x(e.time), x2: x(e.time),
                             y1: 0, y2: H, "data-source": e.source, "data-ratio": e.ratio });
      m.append(svg("title", {}, `${fmtTime(e.time)} ${e.source}: ${e.reason}`));
      root.append(m);
    }
    const lastS = shown[shown.length - 1];
    if (lastS) root.dataset.last = series.map((se) => se.get(lastS)).join(",");
    const legend = el("span", {}, el("b", { text: label + " " }),
                      ...series.map((se) => el("span", { class: "swatch-" + se.cls.slice(-1),
                        text: ` ● ${se.name} ${lastS ? fmtNum(se.get(lastS)) : "–"}` })));
    return el("div", { class: "chart" }, el("div", { class: "label" }, legend,
              el("span", { text: `max ${opts.fmt ? opts.fmt(ymax) : fmtNum(ymax)}` })), root);
  }

  function renderCharts(p) {
    const mib = (s) => s.kv_bytes / 2 ** 20;
    $("charts").replaceChildren(
      chart("ratio", "conversion ratio", [{ name: "ratio", cls: "series-a", step: true, get: (s) => s.ratio }], p, { ymax: 1 }),
      chart("requests", "requests", [{ name: "running", cls: "series-b", get: (s) => s.running },
                                     { name: "waiting", cls: "series-c", get: (s) => s.waiting }], p, {}),
      chart("tokens", "tokens/s", [{ name: "generated", cls: "series-b", get: (s) => s.tokens_per_s }], p, {}),
      chart("memory", "cache MiB", [{ name: "KV", cls: "series-b", get: mib },
                                    { name: "DSLA state", cls: "series-a", get: (s) => s.dsla_state_bytes / 2 ** 20 }],
            p, {}));
  }

  function renderEvents() {
    const items = changes.slice(-50).reverse().map((e) => el("li",
      { data: { source: e.source, converted: e.converted.join(","), reverted: e.reverted.join(","), ratio: e.ratio } },
      el("span", { class: "when", text: fmtTime(e.time) + " " }),
      el("span", { class: "src " + (e.source === "api" ? "api" : "policy"), text: e.source }),
      el("span", { text: (e.converted.length ? ` +${list(e.converted)}` : "") + (e.reverted.length ? ` −${list(e.reverted)}` : "")
        + ` → ratio ${e.ratio.toFixed(2)}` + (e.converted.length ? `, ${freed(e.freed_bytes)} (${e.in_flight_folded} `
        + "in flight)" : "") + " · " }),
      el("span", { class: "reason", text: e.reason })));
    $("events").replaceChildren(...(items.length ? items : [el("li", { class: "note", text: "no plan change yet" })]));
  }

  $("span").addEventListener("change", () => data && render());
  window.addEventListener("resize", () => data && renderCharts(data.plan));
  poll();
})();
