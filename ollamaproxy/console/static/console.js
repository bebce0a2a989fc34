// ollamaproxy console.  Plain JavaScript, no library, no build step.
//
// The admin key lives in sessionStorage (this tab only) and goes with every
// request as "Authorization: Bearer".  The live feed is a fetch() of an
// NDJSON stream, read line by line (EventSource cannot send the header).
// Every text from the proxy goes into the page as text (textContent), never
// as HTML.  Memory stays bounded for a page open all day: the history keeps
// the last HISTORY points, tables are rebuilt, not appended to.
"use strict";

(function () {
  const STORE = "ollamaproxy.console.key";
  const HISTORY = 1200;          // points: 10 minutes at 2 a second
  const WINDOW = 600;            // seconds shown in the live charts
  const STALL = 45000;           // ms without a message: reconnect
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const state = {
    key: null, feed: null, retry: 1000, lastMessage: 0, offset: 0,
    requests: [], more: 0, waiting: {}, backends: [], points: [], view: "now", usageTicket: 0,
  };

  // --- Talking to the proxy -------------------------------------------------

  class Refused extends Error {}

  async function api(path) {
    const response = await fetch(path, {
      headers: { "Authorization": "Bearer " + state.key },
      cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
    });
    if (response.status === 401 || response.status === 403) {
      throw new Refused(await errorOf(response));
    }
    if (!response.ok) throw new Error(await errorOf(response));
    return response;
  }

  async function errorOf(response) {
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") return body.error;
    } catch (e) { /* not JSON */ }
    return "HTTP " + response.status;
  }

  // --- Login ------------------------------------------------------------------

  async function login(key) {
    state.key = key;
    try {
      const response = await api("api/now");
      const now = await response.json();
      sessionStorage.setItem(STORE, key);
      $("login").hidden = true;
      $("app").hidden = false;
      applyState(now);
      state.points = (now.history || []).slice(-HISTORY);
      render();
      startFeed();
      return true;
    } catch (e) {
      logout(e instanceof Refused ? e.message : "cannot reach the proxy: " + e.message);
      return false;
    }
  }

  function logout(message) {
    sessionStorage.removeItem(STORE);
    state.key = null;
    stopFeed();
    state.requests = []; state.backends = []; state.points = []; state.waiting = {};
    for (const id of ["requests", "waiting", "queue", "usage-table", "keys"]) {
      $(id).tBodies[0].replaceChildren();
    }
    for (const id of ["backends", "quotas", "chart-streams", "chart-rate", "chart-usage", "usage-legend"]) {
      $(id).replaceChildren();
    }
    $("app").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("key").value = "";
    $("key").focus();
  }

  // --- The live feed ------------------------------------------------------------

  function startFeed() {
    stopFeed();
    const controller = new AbortController();
    state.feed = controller;
    state.lastMessage = Date.now();
    readFeed(controller).catch(() => {}).finally(() => {
      if (state.feed === controller) {
        setLive("off", "reconnecting");
        state.feed = null;
        setTimeout(() => { if (state.key && !state.feed) startFeed(); }, state.retry);
        state.retry = Math.min(state.retry * 2, 15000);
      }
    });
  }

  function stopFeed() {
    if (state.feed) {
      const feed = state.feed;
      state.feed = null;
      feed.abort();
    }
  }

  async function readFeed(controller) {
    const response = await fetch("api/feed", {
      headers: { "Authorization": "Bearer " + state.key },
      cache: "no-store", credentials: "omit", signal: controller.signal,
    });
    if (response.status === 401 || response.status === 403) {
      logout(await errorOf(response));
      return;
    }
    if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
    setLive("on", "live");
    state.retry = 1000;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      pending += decoder.decode(value, { stream: true });
      let end;
      while ((end = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, end);
        pending = pending.slice(end + 1);
        if (line.trim()) onMessage(JSON.parse(line));
      }
      if (pending.length > 4 * 1024 * 1024) throw new Error("line too long");
    }
  }

  function onMessage(message) {
    state.lastMessage = Date.now();
    if (typeof message.now === "number") state.offset = message.now - Date.now() / 1000;
    if (message.type !== "update") return;
    applyState(message);
    if (message.points) {
      state.points = message.reset ? message.points : state.points.concat(message.points);
      if (state.points.length > HISTORY) state.points = state.points.slice(-HISTORY);
    }
    if (state.view === "now" || state.view === "backends") render();
  }

  function applyState(message) {
    if (message.requests) { state.requests = message.requests; state.more = message.more || 0; }
    if (message.waiting) state.waiting = message.waiting;
    if (message.backends) state.backends = message.backends;
  }

  function setLive(kind, text) {
    const live = $("live");
    live.className = "live " + kind;
    live.textContent = text;
  }

  // A feed that went quiet (a proxy in between that dropped it): start over.
  setInterval(() => {
    if (state.key && state.feed && Date.now() - state.lastMessage > STALL) startFeed();
  }, 5000);

  // --- Helpers -----------------------------------------------------------------

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
    return tr;
  }

  function num(value) { return el("td", fmt(value), "num"); }

  function fmt(n) {
    if (n === null || n === undefined) return "–";
    return Number(n).toLocaleString("en-US", { maximumFractionDigits: 1 });
  }

  function serverNow() { return Date.now() / 1000 + state.offset; }

  function age(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s";
    return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
  }

  function when(epoch) {
    if (epoch === null || epoch === undefined) return "never";
    return new Date(epoch * 1000).toISOString().replace("T", " ").slice(0, 16) + " UTC";
  }

  // A time to the second (UTC), for events of the last minutes.
  function clock(epoch) {
    return new Date(epoch * 1000).toISOString().slice(11, 19);
  }

  function badge(text, kind) { return el("span", text, "badge " + kind); }

  function fillTable(id, rows, emptyId) {
    $(id).tBodies[0].replaceChildren(...rows);
    if (emptyId) $(emptyId).hidden = rows.length > 0;
  }

  // --- SVG charts ----------------------------------------------------------------

  function svg(tag, attrs, className) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (className) node.setAttribute("class", className);
    return node;
  }

  // Drawn in the container's own pixels, so that text is never stretched.
  function size(container, width, height) {
    return [Math.max(200, container.clientWidth || width), Math.max(80, container.clientHeight || height)];
  }

  // Lines over the last span seconds (up to WINDOW): series are [time, value] arrays.
  function lineChart(container, series, nowT, span) {
    const [W, H] = size(container, 600, 150), L = 34, B = 16;
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
    const t0 = nowT - span;
    let top = 1;
    for (const s of series) for (const [, v] of s.points) top = Math.max(top, v);
    top = niceTop(top);
    const x = (t) => L + ((t - t0) / span) * (W - L - 4);
    const y = (v) => H - B - (v / top) * (H - B - 6);
    chart.appendChild(svg("line", { x1: L, y1: H - B, x2: W, y2: H - B }, "axis"));
    for (const v of [0, top / 2, top]) {
      const label = svg("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, "tick");
      label.textContent = fmt(v);
      chart.appendChild(label);
    }
    const middle = roundAgo(span / 2);
    for (const [i, label] of [[0, "-" + ago(span)], [span - middle, "-" + ago(middle)], [span, "now"]]) {
      const text = svg("text", { x: x(t0 + i), y: H - 3, "text-anchor": i === 0 ? "start" : i === span ? "end" : "middle" }, "tick");
      text.textContent = label;
      chart.appendChild(text);
    }
    for (const s of series) {
      const pts = s.points.filter(([t]) => t >= t0);
      if (!pts.length) continue;
      // The last value holds until now: an idle proxy sends no points.
      pts.push([nowT, pts[pts.length - 1][1]]);
      const path = pts.map(([t, v], i) => (i ? "L" : "M") + x(t).toFixed(1) + " " + y(v).toFixed(1)).join(" ");
      chart.appendChild(svg("path", { d: path }, s.className));
    }
    container.replaceChildren(chart);
  }

  function ago(seconds) {
    return seconds >= 120 ? Math.round(seconds / 60) + " min" : Math.round(seconds) + " s";
  }

  // The round number of seconds at most s (s >= 10): a tick at "-79 s"
  // makes the reader do sums, one at "-60 s" does not.
  function roundAgo(s) {
    let best = 10;
    for (const r of [10, 15, 20, 30, 60, 120, 180, 300, 600]) if (r <= s) best = r;
    return best;
  }

  function niceTop(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  // The j-th name's colour: the palette's six, then hues spread by the
  // golden angle, so that no two names in one chart share a colour however
  // many there are.  Names come sorted, so a name keeps its colour as long
  // as the names around it do.
  const PALETTE = 6;

  function paint(node, j, property) {
    if (j < PALETTE) {
      node.classList.add("c" + j);
    } else {
      const hue = ((j - PALETTE) * 137.508 + 15) % 360;
      node.style[property] = `hsl(${hue.toFixed(1)}, 65%, ${j % 2 ? 42 : 58}%)`;
    }
  }

  // Bars narrower than this are unreadable (7 days by hour on a phone):
  // the chart widens instead, and scrolls.
  const MIN_SLOT = 6;
  // Pixels between two labels of the time axis, at least.
  const LABEL_GAP = 72;
  // Buckets between two labels, by bucket: whole hours and days, so that
  // labels fall on round times.
  const LABEL_STEPS = { 3600: [1, 2, 3, 6, 12, 24, 48, 96, 168], 86400: [1, 2, 7, 14, 28, 56, 91, 182] };

  // Stacked bars: buckets along x, one colour per name.
  function barChart(container, legend, buckets, names, values, width) {
    const [fits, tall] = size(container, 600, 200), L = 44, B = 18;
    const W = Math.max(fits, L + 4 + buckets.length * MIN_SLOT);
    // Leave room for the scroll bar when the chart is wider than its box.
    const H = W > fits ? tall - 16 : tall;
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
    chart.style.width = W + "px";
    chart.style.height = H + "px";
    const totals = buckets.map((b) => names.reduce((sum, n) => sum + (values.get(b + "\u0000" + n) || 0), 0));
    const top = niceTop(Math.max(1, ...totals));
    const slot = (W - L - 4) / Math.max(1, buckets.length);
    const y = (v) => (v / top) * (H - B - 6);
    chart.appendChild(svg("line", { x1: L, y1: H - B, x2: W, y2: H - B }, "axis"));
    for (const v of [0, top / 2, top]) {
      const label = svg("text", { x: L - 4, y: H - B - y(v) + 3, "text-anchor": "end" }, "tick");
      label.textContent = fmt(v);
      chart.appendChild(label);
    }
    buckets.forEach((b, i) => {
      let base = H - B;
      names.forEach((n, j) => {
        const v = values.get(b + "\u0000" + n) || 0;
        if (!v) return;
        const h = y(v);
        base -= h;
        const rect = svg("rect", { x: L + i * slot + slot * 0.1, y: base, width: slot * 0.8, height: h, "data-name": n });
        paint(rect, j, "fill");
        const title = svg("title");
        title.textContent = `${label(b, width)} ${n}: ${fmt(v)}`;
        rect.appendChild(title);
        chart.appendChild(rect);
      });
    });
    const steps = LABEL_STEPS[width] || [1];
    const step = steps.find((n) => n * slot >= LABEL_GAP) || steps[steps.length - 1];
    buckets.forEach((b, i) => {
      if (i % step) return;
      const text = svg("text", { x: L + i * slot + slot / 2, y: H - 4, "text-anchor": "middle" }, "tick");
      text.textContent = label(b, width);
      chart.appendChild(text);
    });
    container.replaceChildren(chart);
    // A chart wider than its box opens on its newest buckets.
    container.scrollLeft = container.scrollWidth;
    legend.replaceChildren(...names.map((n, j) => {
      const item = el("span");
      const swatch = el("span", null, "swatch");
      paint(swatch, j, "background");
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(n || "(no model)"));
      return item;
    }));
  }

  function label(epoch, width) {
    const iso = new Date(epoch * 1000).toISOString();
    return width === 3600 ? iso.slice(5, 13).replace("T", " ") + "h" : iso.slice(5, 10);
  }

  // --- Views ------------------------------------------------------------------------

  function render() {
    if (state.view === "now") renderNow();
    if (state.view === "backends") renderBackends();
  }

  function renderNow() {
    const now = serverNow();
    const rows = state.requests.map((r) => {
      const tr = row([
        r.user ? r.key + " / " + r.user : r.key, r.model || "–", r.route, r.client, r.backend || "–", age(now - r.started) + " ago",
        num(r.tokens), num(r.tokens_per_second),
      ]);
      const cell = el("td");
      cell.appendChild(badge(r.state, r.state === "running" ? "ok" : "queued"));
      tr.appendChild(cell);
      tr.className = "request";
      return tr;
    });
    if (state.more) rows.push(row(["…and " + state.more + " more", "", "", "", "", "", "", "", ""]));
    fillTable("requests", rows, "requests-empty");
    const waiting = Object.entries(state.waiting).sort((a, b) => b[1] - a[1]);
    fillTable("waiting", waiting.map(([k, n]) => row([k, num(n)])), "waiting-empty");
    const last = state.points.length ? state.points[state.points.length - 1] : [now, 0, 0, 0];
    $("total-running").textContent = fmt(last[1]);
    $("total-queued").textContent = fmt(last[2]);
    $("total-rate").textContent = fmt(last[3]);
    // The charts widen with the history, from a minute up to WINDOW.
    const first = state.points.length ? state.points[0][0] : now;
    const span = Math.min(WINDOW, Math.max(60, now - first));
    lineChart($("chart-streams"), [
      { points: state.points.map((p) => [p[0], p[1]]), className: "s1" },
      { points: state.points.map((p) => [p[0], p[2]]), className: "s2" },
    ], now, span);
    lineChart($("chart-rate"), [{ points: state.points.map((p) => [p[0], p[3]]), className: "s1" }], now, span);
  }

  // A loaded model's VRAM and context, as " · 4.2 GiB VRAM · ctx 8192".
  function holds(r) {
    if (!r) return "";
    const gib = (r.size_vram / 2 ** 30).toFixed(1);
    return ` · ${gib} GiB VRAM` + (r.context_length ? ` · ctx ${r.context_length}` : "");
  }

  function renderBackends() {
    const cards = state.backends.map((b) => {
      const card = el("article", null, "backend");
      card.dataset.name = b.name;
      const title = el("h3", b.name + " ");
      title.appendChild(badge(b.healthy ? "healthy" : "unhealthy", b.healthy ? "ok" : "bad"));
      card.appendChild(title);
      card.appendChild(el("div", `${b.in_flight} in flight · parallel ${b.parallel} per model`, "meta"));
      // A model the backend was seen running fewer of at once than
      // --parallel is sent only that many (its effective parallel).
      const effective = b.effective || {};
      for (const [model, limit] of Object.entries(effective)) {
        card.appendChild(el("div", `${model}: effective parallel ${limit} of ${b.parallel}`, "meta"));
      }
      for (const r of b.running) {
        const limit = effective[r.model] || b.parallel;
        card.appendChild(el("div", `${r.model}: ${r.count} of ${limit}`));
        const bar = el("div", null, "bar" + (r.count >= limit ? " full" : ""));
        const fill = el("span");
        fill.style.width = Math.min(100, (100 * r.count) / limit) + "%";
        bar.appendChild(fill);
        card.appendChild(bar);
      }
      card.appendChild(el("div", "Models" + (b.models ? ` (${b.models.length})` : " (not known yet)"), "meta"));
      const models = el("ul");
      // What each loaded model holds, from the backend's /api/ps.
      const held = new Map((b.resident || []).map((r) => [r.model, r]));
      for (const m of b.models || []) {
        models.appendChild(el("li", m + (b.loaded.includes(m) ? " · in memory" + holds(held.get(m)) : "")));
      }
      card.appendChild(models);
      if (b.errors.length) {
        card.appendChild(el("div", "Recent errors", "meta"));
        const errors = el("ul", null, "errors");
        // Newest first; a repeated error is one line with its count.
        for (const e of b.errors.slice(-5).reverse()) {
          const repeats = e.count > 1 ? ` (×${e.count} since ${clock(e.first)})` : "";
          errors.appendChild(el("li", `${clock(e.last)} ${e.error}${repeats}`));
        }
        card.appendChild(errors);
      }
      return card;
    });
    $("backends").replaceChildren(...cards);
    const waiting = Object.entries(state.waiting).sort((a, b) => b[1] - a[1]);
    fillTable("queue", waiting.map(([k, n]) => row([k, num(n)])), "queue-empty");
  }

  function usageQuery() {
    const q = new URLSearchParams({
      from: $("usage-from").value, to: $("usage-to").value, bucket: $("usage-bucket").value,
    });
    return q.toString();
  }

  async function loadUsage() {
    const ticket = ++state.usageTicket;
    $("usage-error").textContent = "";
    let data;
    try {
      data = await (await api("api/usage?" + usageQuery())).json();
      // Another choice was made while this one loaded: it draws, not this.
      if (ticket !== state.usageTicket) return;
    } catch (e) {
      if (ticket !== state.usageTicket) return;
      if (e instanceof Refused) return logout(e.message);
      $("usage-error").textContent = e.message;
      return;
    }
    const per = $("usage-per").value === "model" ? 2 : 1;
    const width = data.bucket === "hour" ? 3600 : 86400;
    const buckets = [];
    for (let t = data.from; t < data.until; t += width) buckets.push(t);
    const values = new Map();
    const names = new Set();
    for (const r of data.rows) {
      const name = r[per];
      names.add(name);
      const k = r[0] + "\u0000" + name;
      values.set(k, (values.get(k) || 0) + r[4] + r[5]);
    }
    const sorted = [...names].sort();
    $("usage-caption").textContent = `Tokens (prompt + completion) per ${data.bucket}, by ${per === 1 ? "key" : "model"}`;
    barChart($("chart-usage"), $("usage-legend"), buckets, sorted, values, width);
    fillTable("usage-table", data.rows.map((r) => row([
      label(r[0], width), r[1], r[2] || "(none)", num(r[3]), num(r[4]), num(r[5]),
    ])), "usage-empty");
    const quotas = data.quotas.map((q) => {
      const card = el("div", null, "quota");
      card.appendChild(el("strong", q.name));
      for (const [period, used, limit] of [["today", q.used_today, q.tokens_per_day], ["this month", q.used_this_month, q.tokens_per_month]]) {
        if (limit === null) continue;
        card.appendChild(el("div", `${fmt(used)} of ${fmt(limit)} tokens ${period}`));
        const bar = el("div", null, "bar" + (used >= limit ? " full" : ""));
        const fill = el("span");
        fill.style.width = Math.min(100, (100 * used) / Math.max(1, limit)) + "%";
        bar.appendChild(fill);
        card.appendChild(bar);
      }
      return card;
    });
    $("quotas").replaceChildren(...quotas);
    $("quotas-empty").hidden = quotas.length > 0;
  }

  async function exportCsv() {
    try {
      const blob = await (await api("api/usage.csv?" + usageQuery())).blob();
      const url = URL.createObjectURL(blob);
      const link = el("a");
      link.href = url;
      link.download = `ollamaproxy-usage-${$("usage-from").value}-${$("usage-bucket").value}.csv`;
      document.body.appendChild(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      if (e instanceof Refused) return logout(e.message);
      $("usage-error").textContent = e.message;
    }
  }

  async function loadKeys() {
    let data;
    try {
      data = await (await api("api/keys")).json();
    } catch (e) {
      if (e instanceof Refused) return logout(e.message);
      return;
    }
    fillTable("keys", data.keys.map((k) => {
      const limits = [];
      if (k.rpm !== null) limits.push(k.rpm + " rpm");
      if (k.max_streams !== null) limits.push(k.max_streams + " streams");
      if (k.max_keep_alive !== null) limits.push("keep_alive ≤ " + k.max_keep_alive);
      if (k.max_num_ctx !== null) limits.push("num_ctx ≤ " + k.max_num_ctx);
      if (k.weight !== 1) limits.push("weight " + k.weight);
      if (k.user_header !== null) limits.push("users by " + k.user_header);
      const quota = [];
      if (k.tokens_per_day !== null) quota.push(`${fmt(k.used_today)} / ${fmt(k.tokens_per_day)} a day`);
      if (k.tokens_per_month !== null) quota.push(`${fmt(k.used_this_month)} / ${fmt(k.tokens_per_month)} a month`);
      const expires = k.expires ? k.expires.replace("T", " ").replace("Z", " UTC") + (k.expired ? " (expired)" : "") : "never";
      return row([
        k.name, k.scopes.join(", "), k.models.length ? k.models.join(", ") : "all",
        limits.join(", ") || "none", quota.join("; ") || "none",
        k.created ? k.created.slice(0, 10) : "–", expires, when(k.last_used),
      ]);
    }));
  }

  function show(view) {
    state.view = view;
    for (const tab of document.querySelectorAll("button.tab")) {
      tab.classList.toggle("active", tab.dataset.view === view);
    }
    for (const name of ["now", "backends", "usage", "keys"]) $("view-" + name).hidden = name !== view;
    if (view === "usage") loadUsage();
    else if (view === "keys") loadKeys();
    else render();
  }

  // --- Start ------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key").value.trim();
      $("key").value = "";
      if (key) login(key);
    });
    $("logout").addEventListener("click", () => logout(""));
    for (const tab of document.querySelectorAll("button.tab")) {
      tab.addEventListener("click", () => show(tab.dataset.view));
    }
    $("usage-form").addEventListener("submit", (event) => { event.preventDefault(); loadUsage(); });
    // A new choice redraws at once, without Show.
    for (const id of ["usage-bucket", "usage-per", "usage-from", "usage-to"]) {
      $(id).addEventListener("change", () => { if ($("usage-form").checkValidity()) loadUsage(); });
    }
    $("usage-csv").addEventListener("click", exportCsv);
    const today = new Date().toISOString().slice(0, 10);
    const weekAgo = new Date(Date.now() - 6 * 86400000).toISOString().slice(0, 10);
    $("usage-from").value = weekAgo;
    $("usage-to").value = today;
    // Ages move on between messages.
    setInterval(() => { if (state.key && state.view === "now") renderNow(); }, 1000);
    const saved = sessionStorage.getItem(STORE);
    if (saved) login(saved); else $("key").focus();
  });
})();
