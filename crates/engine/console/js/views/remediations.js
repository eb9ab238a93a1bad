// Remediations: each alert Alertmanager sent, the playbook it ran, the actions planned and
// taken with what the cluster answered, and the outcome; and the alert episodes a
// guardrail held back, with why.

import { get } from "../api.js";
import { emptyRow, fill, h, runLink, status, table, when } from "../dom.js";

export async function mount(ctx) {
  const runs = h("section", { "aria-labelledby": "remediations-h" });
  const episodes = h("section", { "aria-labelledby": "episodes-h" });
  fill(ctx.main, h("div", { class: "page-head" }, h("h1", {}, "Remediations")), runs, episodes);
  const refresh = async () => {
    const [{ remediations }, { episodes: eps }] = await Promise.all([get("/remediations?limit=100"), get("/alerts/episodes")]);
    if (ctx.stale()) return;
    fill(runs, h("h2", { id: "remediations-h" }, "Playbook runs"),
      table("Remediation runs, newest first", ["Alert", "Playbook", "Status", "Planned", "Taken", "Outcome", "Resolved in", "Run"],
        remediations.length ? remediations.map(remediation) : emptyRow(8, "No remediation has run."), { class: "remediations" }));
    fill(episodes, h("h2", { id: "episodes-h" }, "Alert episodes"),
      table("Alert episodes, newest first", ["Alert", "Target", "Firing since", "What dayshift did", "Why", "Run"],
        eps.length ? eps.slice(0, 100).map(episode) : emptyRow(6, "No alert has been received."), { class: "episodes" }));
  };
  await refresh();
  return { refresh };
}

function remediation(r) {
  const labels = r.alert?.labels ?? {};
  return h("tr", { class: r.status === "failed" ? "row-failed" : null },
    h("td", {}, h("strong", {}, labels.alertname ?? "alert"), h("div", { class: "labels" },
      Object.entries(labels).filter(([k]) => k !== "alertname").map(([k, v]) => h("code", {}, `${k}=${v}`)))),
    h("td", {}, r.playbook),
    h("td", {}, status(r.status)),
    h("td", {}, Array.isArray(r.plan) ? h("ul", { class: "plain" }, r.plan.map((p) => h("li", {}, p))) : h("span", { class: "muted" }, "—")),
    h("td", {}, Array.isArray(r.taken) && r.taken.length
      ? h("ul", { class: "plain" }, r.taken.map((t) => h("li", {}, t.action, h("div", { class: "muted mono" }, JSON.stringify(t.response)))))
      : h("span", { class: "muted" }, "—")),
    h("td", {}, r.error ? h("span", { class: "error-text" }, r.error) : String(r.outcome ?? "")),
    h("td", { class: "num" }, r.time_to_resolve_seconds ? `${Math.round(r.time_to_resolve_seconds)} s` : "—"),
    h("td", {}, runLink(r.id), h("div", { class: "muted" }, when(r.created_at))));
}

function episode(e) {
  return h("tr", { class: e.outcome === "held-back" || e.outcome === "failed" ? "row-held" : null },
    h("td", {}, h("strong", {}, e.labels?.alertname ?? "alert"), h("div", { class: "muted" }, e.route)),
    h("td", {}, h("code", {}, e.target)),
    h("td", {}, when(e.starts_at), e.resolved_at ? h("div", { class: "muted" }, "resolved ", when(e.resolved_at)) : null),
    h("td", {}, h("span", { class: `badge outcome-${e.outcome}` }, e.outcome)),
    h("td", {}, e.detail ?? ""),
    h("td", {}, e.run_id ? runLink(e.run_id) : "—"));
}
