// Workflows: every registered workflow (built in, or a workflow file), its version, and
// whether the signed-in person may start it.

import { get } from "../api.js";
import { emptyRow, fill, h, table } from "../dom.js";

export async function mount(ctx) {
  const body = h("div", { id: "workflows" });
  fill(ctx.main, h("div", { class: "page-head" }, h("h1", {}, "Workflows")), body);
  const { workflows } = await get("/workflows");
  fill(body, table("Workflows", ["Workflow", "Version", "What it does", "You may start it"],
    workflows.length
      ? workflows.map((w) => h("tr", { dataset: { workflow: w.name } },
        h("th", { scope: "row" }, h("a", { href: `#/workflows/${encodeURIComponent(w.name)}` }, w.name)),
        h("td", {}, `v${w.version}`),
        h("td", {}, w.description),
        h("td", {}, w.may_start ? "yes" : h("span", { class: "muted" }, `no: ${w.why_not}`))))
      : emptyRow(4, "No workflows are registered."),
    { class: "workflows" }));
  return {};
}
