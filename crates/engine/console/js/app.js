// The console's shell: sign-in, navigation, and the live refresh of the page shown.
//
// Pages are views in ./views/: `mount(ctx)` draws the page into `ctx.main` and returns what
// to call to refresh it. The shell calls that every few seconds while the tab is visible, so
// what is running, failing or waiting shows without reloading.

import { ApiError, get, signIn, signOut, token } from "./api.js";
import { fill, h } from "./dom.js";
import * as runs from "./views/runs.js";
import * as run from "./views/run.js";
import * as approvals from "./views/approvals.js";
import * as schedules from "./views/schedules.js";
import * as remediations from "./views/remediations.js";
import * as workflows from "./views/workflows.js";
import * as workflow from "./views/workflow.js";

const REFRESH_MS = 3000;

const routes = [
  { pattern: /^\/runs\/([0-9a-f-]{36})$/, view: run, nav: "runs" },
  { pattern: /^\/runs$/, view: runs, nav: "runs" },
  { pattern: /^\/approvals$/, view: approvals, nav: "approvals" },
  { pattern: /^\/schedules$/, view: schedules, nav: "schedules" },
  { pattern: /^\/remediations$/, view: remediations, nav: "remediations" },
  { pattern: /^\/workflows\/([^/]+)$/, view: workflow, nav: "workflows" },
  { pattern: /^\/workflows$/, view: workflows, nav: "workflows" },
];

const main = document.getElementById("main");
let me = null;
let current = null; // { refresh, timer, generation }
let generation = 0;

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/runs";
  const [path, q] = raw.split("?");
  return { path, query: new URLSearchParams(q ?? "") };
}

/** Goes to `hash` (e.g. `#/runs?status=failed`) and draws it. */
export function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

async function route() {
  stop();
  const { path, query } = parseHash();
  if (!token()) return showSignIn();
  if (!me) {
    try {
      me = await get("/whoami");
    } catch (e) {
      // A token that is not (or no longer) valid is forgotten.
      if (e instanceof ApiError && e.status === 401) signOut();
      return showSignIn(e instanceof ApiError && e.status === 401 ? e.message : undefined, e);
    }
    drawUser();
  }
  const match = routes.map((r) => ({ r, m: path.match(r.pattern) })).find((x) => x.m);
  if (!match) return go("#/runs");
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.nav === match.r.nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  // The page is drawn apart and shown only if it is still the one asked for: a slower page
  // asked for before must not replace it (the previous page stays up meanwhile).
  const mine = ++generation;
  const view = h("div", { class: "view" });
  const ctx = { main: view, params: match.m.slice(1), query, me, go, stale: () => mine !== generation };
  let mounted;
  try {
    mounted = await match.r.view.mount(ctx);
  } catch (e) {
    if (mine !== generation) return;
    return showError(e);
  }
  if (mine !== generation) return;
  fill(main, view);
  markUpdated();
  // For the benchmark (docs/benchmarks.md): when the first page of runs is on screen.
  if (match.r.view === runs && !performance.getEntriesByName("dayshift:runs-rendered").length) {
    performance.mark("dayshift:runs-rendered");
  }
  const heading = view.querySelector("h1");
  if (heading) {
    heading.setAttribute("tabindex", "-1");
    document.title = `${heading.textContent} · dayshift`;
    // After a move within the console (not on a fresh load, where the page starts at the
    // top), the heading takes the focus, so keyboard and screen reader users land on it.
    if (!firstLoad && (document.activeElement === document.body || document.activeElement === null || routedByLink)) {
      heading.focus();
    }
  }
  firstLoad = false;
  routedByLink = false;
  if (mounted?.refresh) {
    current = { refresh: mounted.refresh, generation: mine };
    schedule();
  }
}

let routedByLink = false;
let firstLoad = true;
document.addEventListener("click", (e) => {
  if (e.target.closest?.("a[href^='#/']")) routedByLink = true;
});

function schedule(delay = REFRESH_MS) {
  if (!current) return;
  clearTimeout(current.timer);
  current.timer = setTimeout(async () => {
    if (!current) return;
    if (document.visibilityState === "visible") {
      try {
        await current.refresh();
        markUpdated();
      } catch (e) {
        if (e instanceof ApiError && e.status === 401) return showSignIn(e.message);
        markOffline(e);
      }
    }
    schedule();
  }, REFRESH_MS);
  refreshBadge();
}

function stop() {
  if (current?.timer) clearTimeout(current.timer);
  current = null;
}

function markUpdated() {
  fill(document.getElementById("live"), h("span", { class: "live-dot", "aria-hidden": "true" }), "Live");
  document.getElementById("live").title = `Updated ${new Date().toLocaleTimeString()}`;
}

function markOffline(e) {
  fill(
    document.getElementById("live"),
    h("span", { class: "live-dot offline", "aria-hidden": "true" }),
    `Not updating: ${e.message}`,
  );
}

let badgeAt = 0;
async function refreshBadge() {
  if (Date.now() - badgeAt < 10000) return;
  badgeAt = Date.now();
  try {
    const { approvals: waiting } = await get("/approvals");
    const badge = document.getElementById("approvals-count");
    const mine = waiting.filter((a) => a.may_decide).length;
    fill(badge, waiting.length ? String(waiting.length) : "");
    badge.hidden = waiting.length === 0;
    badge.setAttribute("aria-label", `${waiting.length} waiting, ${mine} for you`);
  } catch {
    // The page itself shows what is wrong.
  }
}

function drawUser() {
  const user = document.getElementById("user");
  fill(
    user,
    h("span", { class: "who" }, h("span", { class: "visually-hidden" }, "Signed in as "), me.name, " ",
      h("span", { class: `badge role-${me.role}` }, me.role)),
    h("button", { type: "button", class: "secondary", onclick: () => { signOut(); me = null; fill(user); go("#/runs"); route(); } }, "Sign out"),
  );
  badgeAt = 0;
  refreshBadge();
}

function showSignIn(message, error) {
  stop();
  me = null;
  fill(document.getElementById("user"));
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off", required: true,
    "aria-describedby": "token-help", spellcheck: "false" });
  const remember = h("input", { id: "remember", type: "checkbox" });
  const form = h(
    "form",
    { class: "card sign-in", onsubmit: (e) => { e.preventDefault(); signIn(input.value, remember.checked); me = null; route(); } },
    h("h1", {}, "Sign in to dayshift"),
    message ? h("p", { class: "notice notice-error", role: "alert" }, message) : null,
    error && !(error instanceof ApiError && error.status === 401) ? h("p", { class: "notice notice-error", role: "alert" }, error.message) : null,
    h("label", { for: "token" }, "API token"),
    input,
    h("p", { id: "token-help", class: "help" },
      "A token from ", h("code", {}, "dayshift tokens create NAME --role viewer|operator|admin"),
      ", or an access token from your identity provider. It is sent only to this server's API."),
    h("div", { class: "check" }, remember, h("label", { for: "remember" }, "Keep me signed in on this device")),
    h("button", { type: "submit" }, "Sign in"),
  );
  fill(main, form);
  document.title = "Sign in · dayshift";
  input.focus();
}

function showError(e) {
  if (e instanceof ApiError && e.status === 401) return showSignIn(e.message);
  fill(main, h("h1", {}, "Something went wrong"), h("p", { class: "notice notice-error", role: "alert" }, e.message));
}

window.addEventListener("hashchange", route);
document.addEventListener("visibilitychange", () => {
  // Back to the tab: refresh at once rather than showing what was true when it was left.
  if (document.visibilityState === "visible" && current) schedule(0);
});
// Keyboard: "g r" runs, "g a" approvals, "g s" schedules, "g m" remediations, "/" filters.
let pendingG = 0;
document.addEventListener("keydown", (e) => {
  if (e.target.closest?.("input, textarea, select") || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === "g") { pendingG = Date.now(); return; }
  if (Date.now() - pendingG < 1000) {
    const to = { r: "#/runs", a: "#/approvals", s: "#/schedules", m: "#/remediations" }[e.key];
    pendingG = 0;
    if (to) { routedByLink = true; go(to); }
  } else if (e.key === "/") {
    const first = main.querySelector("form.filters select, form.filters input");
    if (first) { e.preventDefault(); first.focus(); }
  }
});

route();
