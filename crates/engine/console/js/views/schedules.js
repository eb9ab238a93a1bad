// Schedules: when each fires next, what its last ticks became (started, missed, skipped,
// failed), and, for admins, pause / resume / trigger now.

import { post, get } from "../api.js";
import { announce, emptyRow, exact, fill, h, runLink, shortId, table, when } from "../dom.js";

export async function mount(ctx) {
  const body = h("div", { id: "schedules" });
  const admin = ctx.me.may.administer;
  fill(ctx.main,
    h("div", { class: "page-head" }, h("h1", {}, "Schedules")),
    admin ? null : h("p", { class: "help" }, `Pausing, resuming and triggering schedules needs the admin role; you are ${ctx.me.role}.`),
    body);
  const refresh = async () => {
    const { schedules } = await get("/schedules");
    if (ctx.stale()) return;
    const focused = document.activeElement?.dataset?.action;
    fill(body, table("Schedules", ["Schedule", "Workflow", "When", "State", "Next fires", "Last ticks", admin ? "Actions" : null].filter(Boolean),
      schedules.length ? schedules.map((s) => row(s, admin, refresh)) : emptyRow(admin ? 7 : 6, "No schedules are configured (schedules: in the config file)."),
      { class: "schedules" }));
    if (focused) body.querySelector(`[data-action="${focused}"]`)?.focus();
  };
  await refresh();
  return { refresh };
}

function row(s, admin, refresh) {
  const problems = s.recent.filter((t) => t.outcome !== "started" && t.outcome !== "duplicate");
  const act = (what, label, cls) => h("button", { type: "button", class: cls, dataset: { action: `${what}:${s.name}` }, onclick: async (e) => {
    e.target.disabled = true;
    try {
      const r = await post(`/schedules/${encodeURIComponent(s.name)}/${what}`);
      announce(what === "trigger" ? `Started run ${shortId(r.run_id)} of ${s.name}.` : `Schedule ${s.name} ${what === "pause" ? "paused" : "resumed"}.`);
      await refresh();
    } catch (err) {
      announce(err.message, "error");
      e.target.disabled = false;
    }
  } }, label);
  return h("tr", { class: s.paused ? "row-paused" : null, dataset: { schedule: s.name } },
    h("th", { scope: "row" }, s.name),
    h("td", {}, h("a", { href: `#/runs?workflow=${encodeURIComponent(s.workflow)}&trigger=schedule` }, s.workflow)),
    h("td", {}, h("code", {}, s.cron), h("div", { class: "muted" }, s.timezone, ` · catch-up ${s.catch_up} · overlap ${s.overlap}`)),
    h("td", {}, s.paused ? h("span", { class: "badge status-paused" }, "Paused") : h("span", { class: "badge status-active" }, "Active")),
    h("td", {}, s.next.length ? h("ul", { class: "plain" }, s.next.slice(0, 3).map((t) => h("li", {}, exact(t), " ", h("span", { class: "muted" }, "(", when(t), ")")))) : h("span", { class: "muted" }, "none while paused")),
    h("td", {},
      h("ul", { class: "plain" }, s.recent.slice(0, 3).map((t) => h("li", {},
        h("span", { class: `badge tick-${t.outcome}` }, t.outcome), " ", when(t.tick), t.run_id ? [" ", runLink(t.run_id)] : "",
        t.detail ? h("div", { class: "muted" }, t.detail) : ""))),
      problems.length ? h("p", { class: "text-failed" }, `${problems.length} of the last ${s.recent.length} ticks did not start a run`) : null),
    admin ? h("td", { class: "row-actions" }, h("div", {},
      s.paused ? act("resume", "Resume", "secondary") : act("pause", "Pause", "secondary"),
      act("trigger", "Trigger now", null))) : null);
}
