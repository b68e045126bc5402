// llmrouter usage dashboard. Plain browser JavaScript, no dependencies, no build step.
//
// Reads GET /v1/usage (the caller's own rows and budgets) and, for an admin key or when
// auth is off, GET /v1/admin/usage (everyone's rows). The API key lives in this tab's
// sessionStorage only. Everything is rendered with DOM APIs (textContent, never
// innerHTML with data), so key names and model names cannot inject markup.
(function () {
  "use strict";

  const STORE = "llmrouter.dashboard.key";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const DIMENSIONS = [
    { id: "key", label: "Key", adminOnly: true },
    { id: "model", label: "Model" },
    { id: "provider", label: "Provider" },
    { id: "deployment", label: "Deployment" },
    { id: "day", label: "Day" },
    { id: "status", label: "Status" },
    { id: "user", label: "End user" },
  ];
  const METRICS = [
    { id: "requests", label: "Requests" },
    { id: "prompt_tokens", label: "Prompt tokens" },
    { id: "completion_tokens", label: "Completion tokens" },
    { id: "cached_tokens", label: "Cached tokens" },
    { id: "cost", label: "Cost (USD)" },
    { id: "cache_hits", label: "Cache hits" },
    { id: "errors", label: "Errors" },
    { id: "estimated", label: "Estimated usage" },
  ];
  const DEFAULT_DIMS = { admin: ["key", "model"], user: ["day", "model"] };
  const MAX_CHART_DAYS = 400;

  // Where the API lives: the page is served at <prefix>/dashboard.
  const API_BASE = window.location.pathname.replace(/\/dashboard\/?$/, "");

  const state = {
    key: readKey(),
    mode: null, // "admin" | "user", decided from the first /v1/usage answer
    authOff: false,
    me: null, // the /v1/usage body (key, budgets)
    dims: [],
    rows: [],
    daily: [],
    range: { since: "", until: "" },
    sort: null, // { column, descending }
    loading: false,
  };

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- storage

  function readKey() {
    try {
      return window.sessionStorage.getItem(STORE) || "";
    } catch (err) {
      return ""; // storage disabled: the key lives in memory for this page only
    }
  }

  function writeKey(value) {
    state.key = value;
    try {
      if (value) window.sessionStorage.setItem(STORE, value);
      else window.sessionStorage.removeItem(STORE);
    } catch (err) {
      /* see readKey */
    }
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, message, code, retryAfter) {
      super(message);
      this.status = status;
      this.code = code || null;
      this.retryAfter = retryAfter || null;
    }
  }

  async function api(path, params) {
    const url = new URL(API_BASE + path, window.location.origin);
    for (const [name, value] of Object.entries(params || {})) {
      if (value !== "" && value !== null && value !== undefined) url.searchParams.set(name, value);
    }
    const headers = { Accept: "application/json" };
    if (state.key) headers.Authorization = "Bearer " + state.key;
    let response;
    try {
      response = await fetch(url, { headers, cache: "no-store", credentials: "omit" });
    } catch (err) {
      throw new ApiError(0, "Could not reach the server (" + err.message + ").");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      const error = (body && body.error) || {};
      throw new ApiError(response.status, error.message || response.statusText || "request failed",
        error.code, response.headers.get("Retry-After"));
    }
    return body;
  }

  // The server's message as a sentence: one full stop, whatever it ended with.
  function sentence(text) {
    const trimmed = String(text || "").trim();
    return /[.!?…]$/.test(trimmed) ? trimmed : trimmed + ".";
  }

  function explain(err) {
    switch (err.status) {
      case 0:
        return err.message;
      case 401:
        return state.key
          ? "The server refused this API key: " + sentence(err.message) + " Check it, or enter another key."
          : "This server needs an API key to show usage.";
      case 403:
        return "This key may not see this report: " + sentence(err.message);
      case 429: {
        const wait = err.retryAfter ? " Try again in " + err.retryAfter + " s." : " Try again shortly.";
        return "Too many requests or budget used up: " + sentence(err.message) + wait;
      }
      case 404:
        return "This server has no usage API: accounting is disabled on it (accounting.enabled: false).";
      case 400:
        return "The server did not accept this query: " + sentence(err.message);
      default:
        return "The server answered " + err.status + ": " + sentence(err.message);
    }
  }

  // ---------------------------------------------------------------- formatting

  const intFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const pctFormat = new Intl.NumberFormat(undefined, { style: "percent", maximumFractionDigits: 1 });

  function fmtInt(value) {
    return intFormat.format(value || 0);
  }

  function fmtCost(value) {
    const v = Number(value) || 0;
    // Sub-cent costs are common (small or local models): keep their digits visible.
    let digits = 2;
    if (v !== 0 && Math.abs(v) < 1) digits = Math.abs(v) >= 0.01 ? 4 : 8;
    return "$" + v.toLocaleString(undefined, { minimumFractionDigits: Math.min(digits, 2), maximumFractionDigits: digits });
  }

  function fmtCell(column, value) {
    if (value === null || value === undefined || value === "") return null;
    if (column === "cost") return fmtCost(value);
    if (typeof value === "number") return fmtInt(value);
    return String(value);
  }

  // ---------------------------------------------------------------- dates (UTC days)

  function isoDay(date) {
    return date.toISOString().slice(0, 10);
  }

  function addDays(day, n) {
    const d = new Date(day + "T00:00:00Z");
    d.setUTCDate(d.getUTCDate() + n);
    return isoDay(d);
  }

  function presetRange(preset) {
    const today = isoDay(new Date());
    if (preset === "all") return { since: "", until: "" };
    if (preset === "month") return { since: today.slice(0, 8) + "01", until: today };
    return { since: addDays(today, 1 - Number(preset)), until: today };
  }

  function rangeLabel(range) {
    if (range.since && range.until) return range.since === range.until ? range.since : range.since + " to " + range.until;
    if (range.since) return "since " + range.since;
    if (range.until) return "until " + range.until;
    return "all time";
  }

  // ---------------------------------------------------------------- small DOM helpers

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function setStatus(text) {
    $("status").textContent = text || "";
  }

  function showAlert(text, kind) {
    const box = $("alert");
    box.textContent = text || "";
    box.hidden = !text;
    box.className = kind === "info" ? "alert info" : "alert";
  }

  function setBusy(busy) {
    state.loading = busy;
    for (const id of ["apply", "csv"]) $(id).disabled = busy;
    $("report").setAttribute("aria-busy", busy ? "true" : "false");
  }

  // ---------------------------------------------------------------- views

  function showLogin(message, kind) {
    $("report").hidden = true;
    $("login").hidden = false;
    $("signout").hidden = !state.key;
    $("who").hidden = true;
    showAlert(message, kind);
    setStatus("");
    $("key-input").value = "";
    $("key-input").focus();
  }

  function showReport() {
    $("login").hidden = true;
    $("report").hidden = false;
    $("signout").hidden = !state.key;
    const who = $("who");
    const key = state.me && state.me.key;
    if (key) {
      const scope = key.scopes.indexOf("admin") >= 0 ? "admin" : "user";
      who.textContent = "Key: " + key.name + " (" + key.prefix + ", " + scope + ")";
    } else {
      who.textContent = "Auth is off on this server: no key needed";
    }
    who.hidden = false;
    $("key-filter-row").hidden = state.mode !== "admin";
  }

  function buildDimensionPicker() {
    const box = $("dims");
    box.textContent = "";
    for (const dim of DIMENSIONS) {
      if (dim.adminOnly && state.mode !== "admin") continue;
      const id = "dim-" + dim.id;
      const input = el("input", { type: "checkbox", id, name: "by", value: dim.id });
      input.checked = state.dims.indexOf(dim.id) >= 0;
      const label = el("label", { for: id });
      label.append(input, document.createTextNode(dim.label));
      box.append(label);
    }
  }

  function chosenDimensions() {
    return DIMENSIONS.map((d) => d.id).filter((id) => {
      const box = $("dim-" + id);
      return box && box.checked;
    });
  }

  // ---------------------------------------------------------------- loading

  async function decideMode(range) {
    // The caller's own usage tells who the key is; it also carries its budgets.
    const me = await api("/v1/usage", { by: "day", since: range.since, until: range.until });
    state.me = me;
    if (state.key && !me.key) {
      showAlert("This server did not recognise the key, but auth is off: showing usage without a key.", "info");
    }
    if (me.key) {
      state.mode = me.key.scopes.indexOf("admin") >= 0 ? "admin" : "user";
      state.authOff = false;
    } else {
      // No key attached: auth is off, and then the admin API is open too.
      try {
        await api("/v1/admin/usage", { by: "day", since: range.since, until: range.until });
        state.mode = "admin";
      } catch (err) {
        if (err.status !== 401 && err.status !== 403) throw err;
        state.mode = "user";
      }
      state.authOff = true;
    }
    state.dims = DEFAULT_DIMS[state.mode].slice();
    buildDimensionPicker();
    return me;
  }

  async function load() {
    if (state.loading) return;
    setBusy(true);
    showAlert(null);
    setStatus("Loading usage…");
    const range = { since: $("since").value, until: $("until").value };
    try {
      let me = state.me;
      if (state.mode === null) {
        me = await decideMode(range);
      } else {
        me = await api("/v1/usage", { by: "day", since: range.since, until: range.until });
        state.me = me;
        state.dims = chosenDimensions();
      }
      const by = state.dims.join(",");
      let rows;
      let daily;
      if (state.mode === "admin") {
        const keyFilter = $("key-filter").value.trim();
        const common = { since: range.since, until: range.until, key: keyFilter };
        [rows, daily] = await Promise.all([
          api("/v1/admin/usage", Object.assign({ by }, common)).then((b) => b.data),
          api("/v1/admin/usage", Object.assign({ by: "day" }, common)).then((b) => b.data),
        ]);
      } else {
        rows = (await api("/v1/usage", { by, since: range.since, until: range.until })).data;
        daily = me.data;
      }
      state.rows = rows;
      state.daily = daily;
      state.range = range;
      state.sort = null;
      showReport();
      render();
      setStatus("Updated " + new Date().toLocaleTimeString() + ": " + rows.length + " row(s), " + rangeLabel(range) + ".");
    } catch (err) {
      handleError(err);
    } finally {
      setBusy(false);
    }
  }

  function handleError(err) {
    if (!(err instanceof ApiError)) {
      showAlert("Something went wrong in the page: " + err.message);
      setStatus("");
      throw err;
    }
    if (err.status === 401) {
      const hadKey = Boolean(state.key);
      const message = explain(err);
      writeKey("");
      state.mode = null;
      state.me = null;
      showLogin(message, hadKey ? "error" : "info");
      return;
    }
    showAlert(explain(err));
    setStatus("");
  }

  // ---------------------------------------------------------------- rendering

  function render() {
    renderTotals();
    renderBudgets();
    renderChart();
    renderTable();
  }

  function sum(rows, column) {
    return rows.reduce((total, row) => total + (Number(row[column]) || 0), 0);
  }

  function setValue(id, text, raw) {
    const node = $(id);
    node.textContent = text;
    if (raw !== undefined) node.dataset.value = String(raw);
  }

  function renderTotals() {
    const rows = state.rows;
    const requests = sum(rows, "requests");
    const prompt = sum(rows, "prompt_tokens");
    const completion = sum(rows, "completion_tokens");
    const cost = sum(rows, "cost");
    const hits = sum(rows, "cache_hits");
    const errors = sum(rows, "errors");
    setValue("total-requests", fmtInt(requests), requests);
    setValue("total-requests-sub", errors ? fmtInt(errors) + " not ok (error, cancelled, rejected or interrupted)" : "all ok");
    setValue("total-tokens", fmtInt(prompt + completion), prompt + completion);
    setValue("total-tokens-sub", fmtInt(prompt) + " prompt + " + fmtInt(completion) + " completion");
    setValue("total-cost", fmtCost(cost), Math.round(cost * 1e9) / 1e9);
    setValue("total-cost-sub", requests ? fmtCost(cost / requests) + " per request" : "");
    const ratio = requests ? hits / requests : 0;
    setValue("total-cache", requests ? pctFormat.format(ratio) : "–", ratio);
    setValue("total-cache-sub", fmtInt(hits) + " of " + fmtInt(requests) + " served from cache");
    $("range-label").textContent = "(" + rangeLabel(state.range) + ")";
  }

  function renderBudgets() {
    const budgets = (state.me && state.me.budgets) || [];
    const list = $("budgets");
    list.textContent = "";
    $("budgets-section").hidden = budgets.length === 0;
    for (const budget of budgets) {
      const item = el("li");
      const scope = budget.model ? " for " + budget.model : "";
      const title = budget.period + " budget" + scope + ": " + fmtCost(budget.spent) + " of " + fmtCost(budget.limit);
      item.append(el("strong", {}, title));
      const extra = [];
      if (budget.reserved) extra.push(fmtCost(budget.reserved) + " reserved by requests in flight");
      if (budget.soft_limit) extra.push("warning at " + fmtCost(budget.soft_limit));
      if (budget.resets_at) extra.push("resets " + new Date(budget.resets_at * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC");
      if (extra.length) item.append(el("div", { class: "muted" }, extra.join(" · ")));
      const meter = el("meter", { min: "0", max: String(budget.limit || 0), value: String(budget.spent || 0),
        "aria-label": title });
      if (budget.soft_limit) meter.setAttribute("high", String(budget.soft_limit));
      item.append(meter);
      list.append(item);
    }
  }

  function chartDays() {
    const byDay = new Map();
    for (const row of state.daily) {
      if (!row.day) continue;
      const entry = byDay.get(row.day) || { cost: 0, requests: 0 };
      entry.cost += Number(row.cost) || 0;
      entry.requests += Number(row.requests) || 0;
      byDay.set(row.day, entry);
    }
    const known = Array.from(byDay.keys()).sort();
    if (!known.length) return [];
    const last = state.range.until || known[known.length - 1];
    let first = state.range.since || known[0];
    // A long range with little data starts at its first day with usage, and at most
    // MAX_CHART_DAYS bars are drawn (the most recent ones).
    if (addDays(first, MAX_CHART_DAYS) <= last && known[0] > first) first = known[0];
    if (addDays(first, MAX_CHART_DAYS) <= last) first = addDays(last, 1 - MAX_CHART_DAYS);
    const days = [];
    for (let day = first; day <= last && days.length < MAX_CHART_DAYS; day = addDays(day, 1)) {
      const entry = byDay.get(day) || { cost: 0, requests: 0 };
      days.push({ day, cost: entry.cost, requests: entry.requests });
    }
    return days;
  }

  function niceMax(value) {
    if (value <= 0) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (value <= step * power) return step * power;
    }
    return 10 * power;
  }

  function renderChart() {
    const box = $("chart");
    box.textContent = "";
    const days = chartDays();
    if (!days.length) {
      box.append(el("p", { class: "empty" }, "No usage in this range."));
      return;
    }
    const width = Math.max(280, Math.floor(box.clientWidth - 16) || 640);
    const height = 220;
    const pad = { left: 64, right: 8, top: 10, bottom: 28 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const top = niceMax(Math.max.apply(null, days.map((d) => d.cost)));
    const peak = days.reduce((a, b) => (b.cost > a.cost ? b : a));
    const total = days.reduce((t, d) => t + d.cost, 0);
    const chart = svg("svg", {
      viewBox: "0 0 " + width + " " + height, width, height, role: "img",
      "aria-labelledby": "chart-title chart-desc",
    });
    chart.append(svg("desc", { id: "chart-desc" },
      days.length + " day(s) from " + days[0].day + " to " + days[days.length - 1].day + ", " + fmtCost(total) +
      " in all; highest " + fmtCost(peak.cost) + " on " + peak.day + "."));
    for (let i = 0; i <= 4; i++) {
      const value = (top * i) / 4;
      const y = pad.top + plotH - (plotH * i) / 4;
      chart.append(svg("line", { class: i ? "grid" : "axis", x1: pad.left, x2: width - pad.right, y1: y, y2: y }));
      chart.append(svg("text", { x: pad.left - 6, y: y + 4, "text-anchor": "end" }, fmtCost(value)));
    }
    const slot = plotW / days.length;
    const barW = Math.max(1, Math.min(48, slot * 0.8));
    const group = svg("g", { class: "bars" });
    days.forEach((d, i) => {
      const h = top ? (plotH * d.cost) / top : 0;
      const x = pad.left + slot * i + (slot - barW) / 2;
      const bar = svg("rect", {
        class: "bar", x: x.toFixed(2), y: (pad.top + plotH - h).toFixed(2), width: barW.toFixed(2),
        height: Math.max(h, d.cost > 0 ? 1 : 0).toFixed(2), "data-day": d.day, "data-cost": d.cost,
      });
      bar.append(svg("title", {}, d.day + ": " + fmtCost(d.cost) + ", " + fmtInt(d.requests) + " request(s)"));
      group.append(bar);
    });
    chart.append(group);
    // Day labels: as many as fit without overlapping (about 70 px each).
    const every = Math.max(1, Math.ceil(days.length / Math.max(1, Math.floor(plotW / 70))));
    days.forEach((d, i) => {
      if (i % every !== 0 && i !== days.length - 1) return;
      if (i !== days.length - 1 && days.length - 1 - i < every && i !== 0) return;
      // The end labels hug the plot's edges so that they are never clipped.
      let x = pad.left + slot * i + slot / 2;
      let anchor = "middle";
      if (i === 0 && days.length > 1) [x, anchor] = [pad.left, "start"];
      else if (i === days.length - 1 && days.length > 1) [x, anchor] = [width - pad.right, "end"];
      chart.append(svg("text", { x: x.toFixed(2), y: height - 8, "text-anchor": anchor }, d.day.slice(5)));
    });
    box.append(chart);
  }

  function tableColumns() {
    const columns = [];
    for (const dim of state.dims) {
      const meta = DIMENSIONS.find((d) => d.id === dim);
      columns.push({ id: dim === "key" ? "key_name" : dim, label: meta ? meta.label : dim, numeric: false, dim });
    }
    for (const metric of METRICS) columns.push({ id: metric.id, label: metric.label, numeric: true });
    return columns;
  }

  function keyLabel(row) {
    if (row.key_name) return row.key_name;
    return row.key ? row.key : null;
  }

  function cellValue(row, column) {
    if (column.dim === "key") return keyLabel(row);
    return row[column.id];
  }

  function sortedRows() {
    const rows = state.rows.slice();
    if (!state.sort) return rows;
    const columns = tableColumns();
    const column = columns.find((c) => c.id === state.sort.column);
    if (!column) return rows;
    const sign = state.sort.descending ? -1 : 1;
    rows.sort((a, b) => {
      const x = cellValue(a, column);
      const y = cellValue(b, column);
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (column.numeric ? x - y : String(x).localeCompare(String(y))) * sign;
    });
    return rows;
  }

  function renderTable() {
    const table = $("table");
    const columns = tableColumns();
    const dimLabels = state.dims.map((d) => (DIMENSIONS.find((m) => m.id === d) || { label: d }).label.toLowerCase());
    $("table-dims").textContent = dimLabels.join(", ");
    $("table-caption").textContent = "Usage by " + dimLabels.join(", ") + ", " + rangeLabel(state.range) +
      ". Select a column heading to sort.";

    const headRow = el("tr");
    for (const column of columns) {
      const th = el("th", { scope: "col", class: column.numeric ? "num" : "" });
      if (state.sort && state.sort.column === column.id) {
        th.setAttribute("aria-sort", state.sort.descending ? "descending" : "ascending");
      }
      const button = el("button", { type: "button" }, column.label);
      button.addEventListener("click", () => {
        const descending = state.sort && state.sort.column === column.id ? !state.sort.descending : column.numeric;
        state.sort = { column: column.id, descending };
        renderTable();
      });
      th.append(button);
      headRow.append(th);
    }
    table.tHead.replaceChildren(headRow);

    const body = table.tBodies[0];
    body.replaceChildren();
    const rows = sortedRows();
    if (!rows.length) {
      const tr = el("tr", { class: "empty-row" });
      tr.append(el("td", { colspan: String(columns.length) }, "No usage in this range."));
      body.append(tr);
    }
    for (const row of rows) {
      const tr = el("tr");
      columns.forEach((column, i) => {
        const value = cellValue(row, column);
        const text = fmtCell(column.id, value);
        const cell = el(i === 0 ? "th" : "td", i === 0 ? { scope: "row" } : {});
        if (column.numeric) cell.className = "num";
        if (text === null) {
          cell.textContent = column.dim === "key" ? "(no key)" : "–";
          cell.classList.add("none");
        } else {
          cell.textContent = text;
        }
        if (column.dim === "key" && row.key) cell.title = "key id " + row.key;
        tr.append(cell);
      });
      body.append(tr);
    }

    const foot = el("tr");
    columns.forEach((column, i) => {
      let text = "";
      if (i === 0) text = "Total";
      else if (column.numeric) text = fmtCell(column.id, sum(state.rows, column.id));
      const cell = el(i === 0 ? "th" : "td", i === 0 ? { scope: "row" } : {}, text);
      if (column.numeric) cell.className = "num";
      foot.append(cell);
    });
    table.tFoot.replaceChildren(foot);
  }

  // ---------------------------------------------------------------- CSV

  function csvField(value) {
    if (value === null || value === undefined) return "";
    let text = String(value);
    // A name starting with = + - @ would be run as a formula by spreadsheets.
    if (typeof value === "string" && /^[=+\-@\t\r]/.test(text)) text = "'" + text;
    return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }

  function toCsv() {
    const columns = [];
    for (const dim of state.dims) {
      columns.push(dim);
      if (dim === "key") columns.push("key_name");
    }
    for (const metric of METRICS) columns.push(metric.id);
    const lines = [columns.join(",")];
    for (const row of sortedRows()) lines.push(columns.map((c) => csvField(row[c])).join(","));
    return lines.join("\r\n") + "\r\n";
  }

  function downloadCsv() {
    const blob = new Blob([toCsv()], { type: "text/csv;charset=utf-8" });
    const url = URL.createObjectURL(blob);
    const range = (state.range.since || "start") + "_" + (state.range.until || "now");
    const link = el("a", { href: url, download: "llmrouter-usage_" + state.dims.join("-") + "_" + range + ".csv" });
    link.hidden = true;
    document.body.append(link);
    link.click();
    link.remove();
    window.setTimeout(() => URL.revokeObjectURL(url), 10000);
    setStatus("CSV with " + state.rows.length + " row(s) downloaded.");
  }

  // ---------------------------------------------------------------- wiring

  function applyPreset(preset) {
    const range = presetRange(preset);
    $("since").value = range.since;
    $("until").value = range.until;
    load();
  }

  function init() {
    const initial = presetRange("30");
    $("since").value = initial.since;
    $("until").value = initial.until;

    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("key-input").value.trim();
      if (!value) {
        showAlert("Enter an API key first.");
        $("key-input").focus();
        return;
      }
      writeKey(value);
      state.mode = null;
      state.me = null;
      load();
    });
    $("signout").addEventListener("click", () => {
      writeKey("");
      state.mode = null;
      state.me = null;
      showLogin("Key forgotten. Enter a key to see usage again.", "info");
    });
    $("filters").addEventListener("submit", (event) => {
      event.preventDefault();
      if ($("since").value && $("until").value && $("since").value > $("until").value) {
        showAlert("The start of the range is after its end.");
        return;
      }
      if (!chosenDimensions().length) {
        showAlert("Choose at least one dimension to group by.");
        return;
      }
      load();
    });
    for (const button of document.querySelectorAll("[data-preset]")) {
      button.addEventListener("click", () => applyPreset(button.dataset.preset));
    }
    $("csv").addEventListener("click", downloadCsv);

    let resizeTimer = null;
    window.addEventListener("resize", () => {
      window.clearTimeout(resizeTimer);
      resizeTimer = window.setTimeout(() => {
        if (!$("report").hidden) renderChart();
      }, 150);
    });

    load();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
