// Runs: newest first, filtered by workflow, status, what started them and when; a page at a
// time (the API's keyset cursor), refreshed live.

import { get, query } from "../api.js";
import { announce, duration, emptyRow, fill, h, redraw, runLink, status, table, when } from "../dom.js";

const STATUSES = ["pending", "running", "waiting", "succeeded", "failed", "cancelled"];
const TRIGGERS = [
  ["api", "API or console"],
  ["schedule", "Schedule"],
  ["webhook", "Git webhook"],
  ["alertmanager", "Alertmanager"],
  ["parent", "Parent run"],
];
const WINDOWS = [
  ["15m", "Last 15 minutes", 15 * 60],
  ["1h", "Last hour", 3600],
  ["24h", "Last 24 hours", 86400],
  ["7d", "Last 7 days", 7 * 86400],
  ["30d", "Last 30 days", 30 * 86400],
];
const PAGE = 50;

export async function mount(ctx) {
  const q = ctx.query;
  const filters = {
    workflow: q.get("workflow") ?? "",
    status: q.get("status") ?? "",
    trigger: q.get("trigger") ?? "",
    window: q.get("window") ?? "",
    from: q.get("from") ?? "",
    to: q.get("to") ?? "",
    before: q.get("before") ?? "",
  };
  // The workflow names (for the filter) and the first page are fetched at once.
  const names = get("/workflows");
  const glance = h("p", { id: "runs-glance", class: "glance" });
  const body = h("div", { id: "runs-table" });
  const pager = h("nav", { class: "pager", "aria-label": "Pages of runs" });
  // Filtering redraws the list in place (the address follows, to be shared): the focus stays
  // on the control being changed, whether by mouse or by arrow keys.
  const apply = (data) => {
    for (const k of Object.keys(filters)) filters[k] = data[k] ?? "";
    history.replaceState(null, "", `#/runs${query(filters)}`);
    seen = null;
    shown = null;
    refresh().catch((e) => announce(e.message, "error"));
  };
  let seen = null;
  let shown = null;
  let latest = 0;
  const refresh = async () => {
    const mine = ++latest;
    const win = WINDOWS.find((w) => w[0] === filters.window);
    // The later of the window's start and "from"; "from" and "to" are local times.
    const starts = [win ? Date.now() - win[2] * 1000 : null, filters.from ? Date.parse(filters.from) : null].filter((t) => Number.isFinite(t));
    const since = starts.length ? new Date(Math.max(...starts)).toISOString() : "";
    const until = filters.to && Number.isFinite(Date.parse(filters.to)) ? new Date(Date.parse(filters.to)).toISOString() : "";
    const [answer, summary] = await Promise.all([
      get(`/runs${query({ workflow: filters.workflow, status: filters.status, trigger: filters.trigger, since, until, before: filters.before, limit: PAGE })}`),
      get("/runs/summary"),
    ]);
    // A newer refresh (after a filter change) has been asked for: this answer is out of date.
    if (ctx.stale() || mine !== latest) return;
    // Nothing changed: leave the page alone (and the focus and selection in it).
    // (At least every half minute all the same, for the "… ago" times.)
    const signature = JSON.stringify([Math.floor(Date.now() / 30000), summary.counts, answer.next, answer.runs.map((r) => [r.id, r.status, r.error, r.finished_at, r.waiting_on])]);
    if (signature === shown) return;
    shown = signature;
    const fresh = seen ? new Set(answer.runs.filter((r) => !seen.has(r.id)).map((r) => r.id)) : new Set();
    seen = new Set(answer.runs.map((r) => r.id));
    redraw(glance, () => fill(glance, atAGlance(summary.counts)));
    redraw(body, () => fill(body, runsTable(answer.runs, fresh, filters)));
    redraw(pager, () => fill(pager, pagerLinks(filters, answer.next)));
  };
  const [{ workflows }] = await Promise.all([names, refresh()]);
  const [form, jump] = filterForm(ctx, filters, workflows.map((w) => w.name), apply);
  fill(ctx.main, h("div", { class: "page-head row" }, h("h1", {}, "Runs"), jump), glance, form, body, pager);
  return { refresh };
}

function filterForm(ctx, f, workflowNames, apply) {
  const select = (name, label, options, value) => {
    const id = `filter-${name}`;
    return h(
      "div",
      { class: "field" },
      h("label", { for: id }, label),
      h(
        "select",
        { id, name },
        h("option", { value: "" }, "Any"),
        options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)),
      ),
    );
  };
  const form = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter runs" },
    select("workflow", "Workflow", workflowNames.map((n) => [n, n]), f.workflow),
    select("status", "Status", STATUSES.map((s) => [s, s[0].toUpperCase() + s.slice(1)]), f.status),
    select("trigger", "Started by", TRIGGERS, f.trigger),
    select("window", "Created", WINDOWS.map(([v, t]) => [v, t]), f.window),
    h("div", { class: "field" }, h("label", { for: "filter-from" }, "From (local time)"),
      h("input", { id: "filter-from", name: "from", type: "datetime-local", value: f.from })),
    h("div", { class: "field" }, h("label", { for: "filter-to" }, "To"),
      h("input", { id: "filter-to", name: "to", type: "datetime-local", value: f.to })),
    h("button", { type: "reset", class: "secondary" }, "Clear filters"),
  );
  const goto = h("input", { id: "goto-run", type: "text", name: "run", placeholder: "a run id", autocomplete: "off", spellcheck: "false",
    pattern: "[0-9a-fA-F-]{36}", title: "a run id: 36 characters, e.g. 01a1ff3b-…" });
  const jump = h("form", { class: "goto", "aria-label": "Go to a run", onsubmit: (e) => {
    e.preventDefault();
    const id = goto.value.trim().toLowerCase();
    if (/^[0-9a-f-]{36}$/.test(id)) ctx.go(`#/runs/${id}`);
  } }, h("div", { class: "field" }, h("label", { for: "goto-run" }, "Go to run"), goto), h("button", { type: "submit", class: "secondary" }, "Open"));
  form.addEventListener("change", () => apply(Object.fromEntries(new FormData(form))));
  form.addEventListener("reset", (e) => {
    e.preventDefault();
    for (const el of form.elements) if (el.name) el.value = "";
    apply({});
  });
  return [form, jump];
}

function runsTable(runs, fresh, filters) {
  const rows = runs.map((r) =>
    h(
      "tr",
      { class: [r.status === "failed" ? "row-failed" : "", fresh.has(r.id) ? "row-new" : ""].join(" ").trim() || null, dataset: { run: r.id } },
      h("td", {}, status(r.status), waitingOn(r.waiting_on)),
      h("td", {}, h("a", { href: `#/runs/${r.id}` }, r.workflow)),
      h("td", {}, runLink(r.id)),
      h("td", { class: "trigger" }, r.started_by),
      h("td", {}, when(r.created_at)),
      h("td", { class: "num" }, duration(r.finished_at && r.started_at ? Date.parse(r.finished_at) - Date.parse(r.started_at) : null)),
      h("td", { class: "error-cell" }, r.error ? h("span", { title: r.error }, r.error) : ""),
    ),
  );
  const anyFilter = filters.workflow || filters.status || filters.trigger || filters.window || filters.from || filters.to;
  return table(
    "Runs, newest first",
    ["Status", "Workflow", "Run", "Started by", "Created", "Took", "Error"],
    rows.length ? rows : emptyRow(7, anyFilter ? "No run matches these filters." : "No runs yet."),
    { class: "runs" },
  );
}

/** The last 24 hours by status, each a link to those runs. */
function atAGlance(counts) {
  const order = ["failed", "waiting", "running", "pending", "cancelled", "succeeded"];
  const parts = order.filter((s) => counts[s] > 0).map((s) =>
    h("a", { href: `#/runs${query({ status: s, window: "24h" })}`, class: `badge status-${s}`, dataset: { count: s } }, `${counts[s]} ${s}`));
  return ["Last 24 hours: ", parts.length ? parts.map((p, i) => [i ? " " : "", p]) : h("span", { class: "muted" }, "no runs")];
}

/** What a run still going waits on, in a few words under its status. */
function waitingOn(w) {
  if (!w) return null;
  const text =
    w.status === "retrying" ? [`retrying ${w.name} `, when(w.until)] :
    w.kind === "signal" && w.name === "approval" ? ["for ", h("a", { href: "#/approvals" }, "approval")] :
    w.kind === "signal" ? `for signal ${w.name}` :
    w.kind === "sleep" ? ["until ", when(w.until)] :
    w.kind === "child" ? `for child run (${w.name})` : null;
  return text ? h("div", { class: "waiting-on muted" }, text) : null;
}

function pagerLinks(filters, next) {
  const base = { workflow: filters.workflow, status: filters.status, trigger: filters.trigger, window: filters.window, from: filters.from, to: filters.to };
  return [
    filters.before ? h("a", { href: `#/runs${query(base)}` }, "← Newest") : null,
    next ? h("a", { href: `#/runs${query({ ...base, before: next })}`, rel: "next" }, "Older →") : null,
  ];
}
