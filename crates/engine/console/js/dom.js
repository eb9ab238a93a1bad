// Small helpers to build the page. Every value from the API goes in as text (never as HTML),
// so nothing a run carries can become markup or script.

/** An element: h("a", { href: "#/runs" }, "Runs"). Attributes `on*` take listeners. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/**
 * Redraws `el` with `draw()` while keeping the keyboard focus where it was: a live refresh
 * must not throw a keyboard or screen reader user back to the top of the page. The focus is
 * found again by the row it was in (`id`, `data-run`, `data-seq`, `data-schedule`), so rows
 * arriving above it do not move it.
 */
export function redraw(el, draw) {
  const active = document.activeElement;
  if (!active || active === el || !el.contains(active)) return draw();
  const anchor = active.closest("[id], [data-run], [data-seq], [data-schedule]");
  const root = anchor && el.contains(anchor) ? anchor : el;
  const selector = root === el ? null
    : root.id ? `#${CSS.escape(root.id)}`
    : ["run", "seq", "schedule"].filter((k) => root.dataset[k]).map((k) => `[data-${k}="${CSS.escape(root.dataset[k])}"]`)[0];
  const path = [];
  for (let n = active; n !== root; n = n.parentElement) path.unshift([...n.parentElement.children].indexOf(n));
  draw();
  let n = selector ? el.querySelector(selector) : el;
  for (const i of path) n = n?.children[i];
  if (n && n.tagName === active.tagName) n.focus({ preventScroll: true });
}

/** Replaces the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const STATUS_TEXT = {
  pending: "Pending",
  running: "Running",
  waiting: "Waiting",
  retrying: "Retrying",
  succeeded: "Succeeded",
  failed: "Failed",
  cancelled: "Cancelled",
};

/** A status badge: its word is always shown, the colour only adds to it. */
export function status(s) {
  return h("span", { class: `badge status-${s}` }, STATUS_TEXT[s] ?? s);
}

/** A timestamp: relative ("3 min ago"), with the exact local time on hover and for readers. */
export function when(iso) {
  if (!iso) return h("span", { class: "muted" }, "—");
  const d = new Date(iso);
  return h("time", { datetime: iso, title: d.toLocaleString() }, ago(d));
}

/** The exact local time. */
export function exact(iso) {
  if (!iso) return h("span", { class: "muted" }, "—");
  const d = new Date(iso);
  return h("time", { datetime: iso }, d.toLocaleString());
}

export function ago(d, now = Date.now()) {
  const s = Math.round((now - d.getTime()) / 1000);
  const future = s < 0;
  const a = Math.abs(s);
  const text =
    a < 5 ? "just now" :
    a < 60 ? `${a} s` :
    a < 3600 ? `${Math.floor(a / 60)} min` :
    a < 86400 ? `${Math.floor(a / 3600)} h ${Math.floor((a % 3600) / 60)} min` :
    `${Math.floor(a / 86400)} d ${Math.floor((a % 86400) / 3600)} h`;
  if (text === "just now") return text;
  return future ? `in ${text}` : `${text} ago`;
}

/** A duration in milliseconds, as people read it. */
export function duration(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** JSON, pretty-printed in a scrollable block. */
export function json(value, label) {
  return h("pre", { class: "json", tabindex: "0", "aria-label": label ?? "JSON" }, JSON.stringify(value, null, 2));
}

/** A run id, short (its last 8 digits: run ids are UUIDv7, whose first digits are the
 * time and alike for runs started together), linking to its page. */
export function runLink(id, text) {
  return h("a", { href: `#/runs/${id}`, class: "mono", title: String(id) }, text ?? shortId(id));
}

export function shortId(id) {
  return String(id).slice(-8);
}

/** A table with a caption (for screen readers) and column headers. */
export function table(caption, headers, rows, attrs = {}) {
  return h(
    "table",
    attrs,
    h("caption", { class: "visually-hidden" }, caption),
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows),
  );
}

/** An empty state in a table. */
export function emptyRow(columns, text) {
  return h("tr", {}, h("td", { colspan: columns, class: "empty" }, text));
}

/** A message for screen readers and sighted people: goes to the live region. */
export function announce(text, kind = "info") {
  const region = document.getElementById("announcer");
  const notice = h("p", { class: `notice notice-${kind}` }, text);
  fill(region, notice);
  // Information goes away after a while; an error stays until the next message.
  if (kind === "info") setTimeout(() => notice.remove(), 8000);
}

/** A workflow file's plan (plan mode, or what an approval step shows): each step and what it
 * would do, or what it read, or why that cannot be told before it runs. */
export function planTable(entries, caption) {
  const what = (e) => {
    if (e.read) return ["read: ", e.read];
    if (e.held) return "check held";
    if (e.skipped) return h("span", { class: "muted" }, `skipped: ${e.skipped}`);
    if (e.depends) return h("span", { class: "muted" }, e.depends);
    return e.would ?? "";
  };
  return table(caption, ["Step", "Action", "What it would do"],
    entries.map((e) => h("tr", { dataset: { step: e.step } },
      h("td", { class: "mono" }, e.finally ? `finally: ${e.step}` : e.step),
      h("td", { class: "mono" }, e.action ?? ""),
      h("td", {}, what(e)))),
    { class: "plan steps-plan" });
}
