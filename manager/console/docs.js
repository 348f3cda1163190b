// The API docs page: the operations of /openapi.json as text (no third-party script on the
// origin that keeps the console's token; every value goes into the page as text).
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function schemaName(schema) {
  if (!schema) return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.type === "array") return `${schemaName(schema.items)}[]`;
  if (schema.anyOf) return schema.anyOf.map(schemaName).join(" | ");
  return schema.type || "";
}

async function main() {
  const spec = await (await fetch("/openapi.json")).json();
  const root = document.getElementById("operations");
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const [method, op] of Object.entries(item)) {
      const params = (op.parameters || []).map((p) => el("li", {}, `${p.name} (${p.in}${p.required ? ", required" : ""}): ${schemaName(p.schema)}`));
      const body = op.requestBody && op.requestBody.content ? Object.entries(op.requestBody.content).map(([type, c]) => el("li", {}, `body ${type}: ${schemaName(c.schema)}`)) : [];
      const answers = Object.entries(op.responses || {}).map(([code, r]) => el("li", {}, `${code}: ${r.description || ""}`));
      root.append(el("section", { class: "card" },
        el("h2", {}, `${method.toUpperCase()} ${path}`),
        op.summary ? el("p", {}, op.summary) : null,
        op.description ? el("p", { class: "muted" }, op.description) : null,
        el("ul", {}, params, body, answers)));
    }
  }
  const schemas = spec.components && spec.components.schemas ? spec.components.schemas : {};
  for (const [name, schema] of Object.entries(schemas)) {
    const fields = Object.entries(schema.properties || {}).map(([field, s]) => el("li", {}, `${field}: ${schemaName(s)}${(schema.required || []).includes(field) ? " (required)" : ""}`));
    root.append(el("section", { class: "card" }, el("h2", {}, name), el("ul", {}, fields)));
  }
}

main();
