// The developer portal's pages, drawn from the portal's JSON. Every value from an API
// document or the server goes in as text (never as HTML).
"use strict";

const state = { me: null, catalog: null, docs: {}, lastKey: null };

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (method !== "GET" && state.me) headers["x-csrf-token"] = state.me.csrf;
  const resp = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await resp.json(); } catch (_) { data = null; }
  return { status: resp.status, ok: resp.ok, data };
}

function notice(kind, text, id) {
  return h("div", { class: "notice " + kind, id: id || null, role: kind === "error" ? "alert" : null }, text);
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes.flat(2).filter(n => n !== null && n !== undefined && n !== false));
}

async function loadMe() {
  const r = await api("GET", "/portal/api/me");
  state.me = r.ok ? r.data : null;
  document.body.classList.toggle("signed-in", !!state.me);
  document.getElementById("who").textContent = state.me ? state.me.email : "";
}

async function catalog() {
  if (!state.catalog) {
    const r = await api("GET", "/apis");
    state.catalog = r.ok && Array.isArray(r.data) ? r.data : [];
  }
  return state.catalog;
}

// The latest public document, or one version's.
async function doc(service, version) {
  const id = service + "@" + (version || "");
  if (!state.docs[id]) {
    const path = version
      ? "/portal/api/apis/" + encodeURIComponent(service) + "/versions/" + encodeURIComponent(version)
      : "/apis/" + encodeURIComponent(service) + "/openapi.json";
    const r = await api("GET", path);
    if (!r.ok) return null;
    state.docs[id] = r.data;
  }
  return state.docs[id];
}

// === views ===

async function viewCatalog() {
  const apis = await catalog();
  const grid = h("div", { class: "grid", id: "catalog" });
  const search = h("input", { class: "search", id: "search", type: "search", placeholder: "Search APIs by name or description", "aria-label": "Search APIs" });
  const draw = () => {
    const q = search.value.trim().toLowerCase();
    const hits = apis.filter(a => !q || [a.service, a.title, a.description].some(s => (s || "").toLowerCase().includes(q)));
    grid.replaceChildren(...hits.map(a => h("a", { class: "card api-card", href: "#/apis/" + encodeURIComponent(a.service), "data-service": a.service },
      h("div", { class: "row" }, h("span", { class: "title" }, a.title || a.service), h("span", { class: "pill" }, a.version)),
      h("div", { class: "muted" }, a.description || "No description."),
      h("div", { class: "muted mono" }, a.service + " · " + a.paths + (a.paths === 1 ? " path" : " paths")))));
    if (!hits.length) grid.append(h("p", { class: "muted" }, apis.length ? "No API matches “" + q + "”." : "No public APIs yet."));
  };
  search.addEventListener("input", draw);
  draw();
  show(h("h1", {}, "APIs"), h("p", { class: "muted" }, "The APIs this gateway publishes. Sign up to get a key and try them."), search, grid);
}

function resolve(d, node, depth) {
  let n = node;
  for (let i = 0; n && n.$ref && i < 32; i++) {
    const path = n.$ref.replace(/^#\//, "").split("/").map(p => p.replace(/~1/g, "/").replace(/~0/g, "~"));
    n = path.reduce((o, k) => (o ? o[k] : undefined), d);
  }
  return n || {};
}

function typeOf(d, s) {
  const r = resolve(d, s);
  if (r.type === "array") return "array of " + typeOf(d, r.items || {});
  if (s && s.$ref) return s.$ref.split("/").pop();
  return r.type || (r.allOf ? "object" : r.oneOf ? "one of" : "any");
}

function schemaTree(d, schema, depth) {
  const s = resolve(d, schema);
  if (depth > 6) return h("li", { class: "muted" }, "…");
  let props = s.properties || {};
  let required = s.required || [];
  if (s.allOf) for (const part of s.allOf) { const p = resolve(d, part); props = Object.assign({}, props, p.properties || {}); required = required.concat(p.required || []); }
  if (s.type === "array" && s.items) {
    const items = resolve(d, s.items);
    if (items.properties) return schemaTree(d, s.items, depth + 1);
  }
  const names = Object.keys(props);
  if (!names.length) return h("li", {}, h("span", { class: "type" }, typeOf(d, schema)));
  return names.map(name => {
    const p = props[name];
    const inner = resolve(d, p);
    const nested = inner.properties || (inner.type === "array" && resolve(d, inner.items || {}).properties);
    return h("li", {},
      h("span", { class: "name" }, name),
      h("span", { class: "type" }, typeOf(d, p)),
      required.includes(name) ? h("span", { class: "req" }, "required") : null,
      inner.description ? h("span", { class: "muted" }, " — " + inner.description) : null,
      nested ? h("ul", {}, schemaTree(d, p, depth + 1)) : null);
  });
}

function methodClass(m) {
  return ["get", "post", "put", "patch", "delete"].includes(m) ? "m-" + m : "m-other";
}

async function viewReference(service, version) {
  const d = await doc(service, version);
  if (!d) return show(notice("error", version ? "Version " + version + " of " + service + " is not published." : "No public API named " + service + "."));
  const listed = await api("GET", "/portal/api/apis/" + encodeURIComponent(service) + "/versions");
  const versions = listed.ok ? listed.data.map(v => v.version) : [];
  const current = version || ((state.catalog || []).find(a => a.service === service) || {}).version;
  const picker = versions.length > 1 ? h("select", { id: "version", "aria-label": "Version" },
    versions.map(v => h("option", { value: v, selected: v === current }, v))) : null;
  if (picker) picker.addEventListener("change", () => { location.hash = "#/apis/" + encodeURIComponent(service) + "/v/" + encodeURIComponent(picker.value); });
  const info = d.info || {};
  const server = (d.servers && d.servers[0] && d.servers[0].url) || "";
  const schemes = (d.components && d.components.securitySchemes) || {};
  const keyScheme = Object.values(schemes).find(s => s.type === "apiKey");
  const ops = [];
  for (const [path, item] of Object.entries(d.paths || {})) {
    for (const [method, op] of Object.entries(item)) {
      if (!["get", "put", "post", "delete", "options", "head", "patch", "trace"].includes(method)) continue;
      ops.push(operation(d, service, path, method, op, (item.parameters || []).concat(op.parameters || [])));
    }
  }
  show(h("h1", {}, info.title || service),
    tabs(service, "reference"),
    h("div", { class: "row pick" }, picker ? [h("span", {}, "Version"), picker] : null,
      h("span", { class: "pill" }, (info.version || "")), server ? h("span", { class: "mono" }, server) : null),
    info.description ? h("p", { class: "muted" }, info.description) : null,
    keyScheme ? h("p", { class: "muted" }, "Authentication: an API key in the " + keyScheme.in + " ", h("code", {}, keyScheme.name), ".") : null,
    h("div", { id: "operations" }, ops.length ? ops : h("p", { class: "muted" }, "This API publishes no paths.")));
}

function tabs(service, active) {
  const t = (name, label, href) => h("a", { href, class: active === name ? "active" : null }, label);
  return h("div", { class: "tabs" },
    t("reference", "Reference", "#/apis/" + encodeURIComponent(service)),
    t("changelog", "Changelog", "#/apis/" + encodeURIComponent(service) + "/changelog"));
}

function operation(d, service, path, method, op, params) {
  const resolved = params.map(p => resolve(d, p));
  const paramTable = resolved.length ? h("table", {},
    h("tr", {}, h("th", {}, "Parameter"), h("th", {}, "In"), h("th", {}, "Type"), h("th", {}, "")),
    resolved.map(p => h("tr", {}, h("td", { class: "mono" }, p.name), h("td", {}, p.in),
      h("td", {}, typeOf(d, p.schema || {})), h("td", {}, p.required || p.in === "path" ? h("span", { class: "req pill bad" }, "required") : "")))) : null;
  const body = op.requestBody ? resolve(d, op.requestBody) : null;
  const bodySchema = body && body.content && Object.values(body.content)[0] && Object.values(body.content)[0].schema;
  const responses = Object.entries(op.responses || {}).map(([code, r]) => {
    const rr = resolve(d, r);
    const media = rr.content ? Object.values(rr.content)[0] : null;
    return h("div", {}, h("h3", {}, h("span", { class: "pill " + (code.startsWith("2") ? "ok" : "bad") }, code), " ", rr.description || "",
      media && media.schema ? h("span", { class: "type" }, " · " + typeOf(d, media.schema)) : null),
      media && media.schema ? h("ul", { class: "schema" }, schemaTree(d, media.schema, 0)) : null);
  });
  return h("section", { class: "op", "data-op": method.toUpperCase() + " " + path },
    h("div", { class: "head" }, h("span", { class: "method " + methodClass(method) }, method.toUpperCase()),
      h("span", { class: "mono" }, path), h("span", { class: "muted" }, op.summary || "")),
    h("div", { class: "body" },
      op.description ? h("p", { class: "muted" }, op.description) : null,
      paramTable ? [h("h3", {}, "Parameters"), paramTable] : null,
      bodySchema ? [h("h3", {}, "Request body"), h("ul", { class: "schema" }, schemaTree(d, bodySchema, 0))] : null,
      h("h3", {}, "Responses"), responses,
      tryPanel(service, path, method, resolved, !!bodySchema)));
}

function tryPanel(service, path, method, params, hasBody) {
  if (!state.me) {
    return h("div", { class: "try" }, h("span", { class: "muted" }, "Try it out: "), h("a", { href: "#/signin" }, "sign in"), h("span", { class: "muted" }, " with a key."));
  }
  const inputs = {};
  const fields = params.filter(p => p.in === "path" || p.in === "query").map(p => {
    inputs[p.name] = h("input", { "data-param": p.name, placeholder: p.name + (p.in === "path" ? " (path)" : " (query)") });
    return h("div", {}, h("label", {}, p.name), inputs[p.name]);
  });
  const key = h("input", { class: "try-key mono", placeholder: "your API key (trk_…)", value: state.lastKey || "" });
  const bodyInput = hasBody ? h("textarea", { class: "try-body", placeholder: "{ }" }) : null;
  const out = h("div", { class: "try-result" });
  const send = h("button", { class: "primary try-send" }, "Send");
  send.addEventListener("click", async () => {
    let p = path;
    const query = [];
    for (const prm of params) {
      const v = inputs[prm.name] ? inputs[prm.name].value : "";
      if (prm.in === "path") p = p.replace("{" + prm.name + "}", encodeURIComponent(v));
      else if (prm.in === "query" && v) query.push(encodeURIComponent(prm.name) + "=" + encodeURIComponent(v));
    }
    if (query.length) p += "?" + query.join("&");
    send.disabled = true;
    const r = await api("POST", "/portal/api/try", { service, method, path: p, key: key.value.trim(), body: bodyInput && bodyInput.value ? bodyInput.value : null });
    send.disabled = false;
    if (!r.ok) return out.replaceChildren(notice("error", (r.data && r.data.error) || "failed: " + r.status));
    const d = r.data;
    let text = d.body;
    try { text = JSON.stringify(JSON.parse(d.body), null, 2); } catch (_) { /* not JSON */ }
    out.replaceChildren(
      h("p", {}, h("span", { class: "pill try-status " + (d.status < 400 ? "ok" : "bad") }, String(d.status)), " ",
        h("span", { class: "mono muted" }, d.sent + " · " + d.millis + " ms")),
      h("pre", {}, text || "(empty body)"));
  });
  return h("div", { class: "try" }, h("strong", {}, "Try it out"), h("div", { class: "grid" }, fields), h("label", {}, "API key"), key,
    bodyInput ? [h("label", {}, "Body (JSON)"), bodyInput] : null, h("p", {}, send), out);
}

async function viewChangelog(service) {
  const r = await api("GET", "/portal/api/apis/" + encodeURIComponent(service) + "/versions");
  if (!r.ok) return show(notice("error", (r.data && r.data.error) || "cannot read the versions"));
  const versions = r.data.map(v => v.version);
  const title = (state.catalog || []).find(a => a.service === service);
  const from = h("select", { id: "from" }, versions.map(v => h("option", { value: v }, v)));
  const to = h("select", { id: "to" }, versions.map(v => h("option", { value: v }, v)));
  if (versions.length > 1) { from.value = versions[versions.length - 2]; to.value = versions[versions.length - 1]; }
  const out = h("div", { id: "changes" });
  const draw = async () => {
    if (from.value === to.value) return out.replaceChildren(h("p", { class: "muted" }, "Pick two different versions."));
    const c = await api("GET", "/portal/api/apis/" + encodeURIComponent(service) + "/changelog?from=" + encodeURIComponent(from.value) + "&to=" + encodeURIComponent(to.value));
    if (!c.ok) return out.replaceChildren(notice("error", (c.data && c.data.error) || "cannot compare"));
    const d = c.data;
    out.replaceChildren(
      d.breaking ? notice("error", d.breaking + (d.breaking === 1 ? " breaking change" : " breaking changes") + " from " + d.from + " to " + d.to + ".", "breaking-summary")
        : notice("ok", "No breaking changes from " + d.from + " to " + d.to + ".", "breaking-summary"),
      h("div", { class: "card" }, d.changes.length ? d.changes.map(ch => h("div", { class: "change" + (ch.breaking ? " breaking" : "") },
        h("span", { class: "pill " + (ch.breaking ? "bad" : "ok") }, ch.breaking ? "breaking" : ch.kind),
        h("span", { class: "loc" }, ch.location), h("span", { class: "muted" }, ch.breaking ? ch.kind + ": " + ch.detail : ch.detail)))
        : h("p", { class: "muted" }, "The two versions do not differ.")));
  };
  from.addEventListener("change", draw);
  to.addEventListener("change", draw);
  show(h("h1", {}, (title && title.title) || service), tabs(service, "changelog"),
    versions.length < 2 ? h("p", { class: "muted" }, "Only one version is published: nothing to compare yet.") :
      [h("div", { class: "row pick" }, h("span", {}, "From"), from, h("span", {}, "to"), to), out]);
  if (versions.length > 1) await draw();
}

function credentialsForm(kind) {
  const signup = kind === "signup";
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const email = h("input", { id: kind + "-email", type: "email", autocomplete: "username", required: true });
  const password = h("input", { id: kind + "-password", type: "password", autocomplete: signup ? "new-password" : "current-password", required: true, minlength: signup ? 10 : null });
  const invite = signup ? h("input", { id: "signup-invite", class: "mono", value: params.get("invite") || "" }) : null;
  const out = h("div", { id: kind + "-result" });
  const submit = h("button", { class: "primary", id: kind + "-submit", type: "submit" }, signup ? "Create account" : "Sign in");
  const form = h("form", { class: "narrow card" },
    h("label", {}, "Email"), email, h("label", {}, signup ? "Password (10 characters or more)" : "Password"), password,
    signup ? [h("label", {}, "Invite"), invite] : null, h("p", {}, submit), out);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    submit.disabled = true;
    const body = { email: email.value, password: password.value };
    if (signup && invite.value.trim()) body.invite = invite.value.trim();
    const r = await api("POST", "/portal/api/" + kind, body);
    submit.disabled = false;
    if (r.status === 202) return out.replaceChildren(notice("warn", r.data.message));
    if (!r.ok) return out.replaceChildren(notice("error", (r.data && r.data.error) || "failed: " + r.status));
    state.me = r.data;
    await loadMe();
    location.hash = "#/keys";
  });
  return form;
}

function viewSignup() {
  show(h("h1", {}, "Sign up"), h("p", { class: "muted" }, "An invite from the API's operators makes your account work at once. Where they allow sign-ups without one, your account waits for their approval."), credentialsForm("signup"));
}

function viewSignin() {
  show(h("h1", {}, "Sign in"), credentialsForm("signin"), h("p", { class: "muted" }, "No account? ", h("a", { href: "#/signup" }, "Sign up"), "."));
}

async function viewKeys(fresh) {
  if (!state.me) return viewSignin();
  const r = await api("GET", "/portal/api/keys");
  if (!r.ok) return show(notice("error", (r.data && r.data.error) || "cannot read your keys"));
  const label = h("input", { id: "key-label", placeholder: "a label, e.g. laptop or ci", value: "" });
  const create = h("button", { class: "primary", id: "key-create" }, "Create key");
  const out = h("div", { id: "key-result" }, fresh || null);
  const issued = (d) => {
    state.lastKey = d.key;
    return [notice("warn", "Copy your key now: it is shown once, and the mesh keeps only its digest."),
      h("div", { class: "secret", id: "new-key" }, d.key), h("p", {}, h("a", { href: "#/" }, "Try it on an API →"))];
  };
  create.addEventListener("click", async () => {
    create.disabled = true;
    const c = await api("POST", "/portal/api/keys", { label: label.value.trim() });
    create.disabled = false;
    if (!c.ok) return out.replaceChildren(notice("error", (c.data && c.data.error) || "failed"));
    viewKeys(h("div", {}, issued(c.data)));
  });
  const rows = r.data.keys.map(k => {
    const rotate = h("button", { class: "rotate" }, "Rotate");
    const revoke = h("button", { class: "danger revoke" }, "Revoke");
    rotate.addEventListener("click", async () => {
      const c = await api("POST", "/portal/api/keys/" + encodeURIComponent(k.id) + "/rotate");
      if (!c.ok) return out.replaceChildren(notice("error", (c.data && c.data.error) || "failed"));
      viewKeys(h("div", {}, notice("ok", "Key " + k.id + " rotated: the old one stops working within seconds."), issued(c.data)));
    });
    revoke.addEventListener("click", async () => {
      const c = await api("DELETE", "/portal/api/keys/" + encodeURIComponent(k.id));
      if (!c.ok) return out.replaceChildren(notice("error", (c.data && c.data.error) || "failed"));
      if (state.lastKey) state.lastKey = null;
      viewKeys(notice("ok", "Key " + k.id + " revoked.", "revoked"));
    });
    return h("tr", { class: "key-row", "data-id": k.id }, h("td", { class: "mono" }, k.id), h("td", {}, h("div", { class: "row end" }, rotate, revoke)));
  });
  const q = r.data.quota;
  show(h("h1", {}, "API keys"),
    h("p", { class: "muted" }, "Consumer ", h("code", {}, r.data.consumer), q ? " · quota " + JSON.stringify(q.limit) : " · no quota set"),
    out,
    h("div", { class: "card" }, h("div", { class: "row" }, label, create)),
    rows.length ? h("table", { id: "keys" }, h("tr", {}, h("th", {}, "Key"), h("th", { class: "num" }, "")), rows)
      : h("p", { class: "muted", id: "keys" }, "No keys yet."));
}

async function viewUsage() {
  if (!state.me) return viewSignin();
  const r = await api("GET", "/portal/api/usage");
  if (!r.ok) return show(notice("error", (r.data && r.data.error) || "cannot read your usage"));
  const q = r.data.quota;
  const rows = [];
  for (const day of r.data.days) {
    for (const [route, c] of Object.entries(day.routes)) {
      rows.push(h("tr", { class: "usage-row", "data-day": day.day, "data-route": route },
        h("td", {}, day.day), h("td", { class: "mono" }, route), h("td", { class: "num requests" }, c.requests),
        h("td", { class: "num" }, c.refused), h("td", { class: "num" }, c.errors)));
    }
  }
  show(h("h1", {}, "Usage"),
    h("p", { class: "muted" }, "Requests with your keys, per day (UTC) and route, added up over every gateway replica; updated every few seconds."),
    h("div", { class: "card" }, h("strong", {}, "Quota: "), q ? h("span", { class: "mono", id: "quota" }, JSON.stringify(q.limit) + (q.burst ? " (burst " + q.burst + ")" : "")) : h("span", { class: "muted", id: "quota" }, "none set")),
    rows.length ? h("table", { id: "usage" }, h("tr", {}, h("th", {}, "Day"), h("th", {}, "Route"), h("th", { class: "num" }, "Requests"), h("th", { class: "num" }, "Refused"), h("th", { class: "num" }, "5xx")), rows)
      : h("p", { class: "muted", id: "usage" }, "No requests yet."));
}

// === routing ===

async function route() {
  const hash = location.hash.split("?")[0] || "#/";
  const parts = hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll("#nav [data-nav]")) a.classList.toggle("active", a.dataset.nav === (parts[0] || "apis"));
  try {
    if (!parts.length || (parts[0] === "apis" && parts.length === 1)) await viewCatalog();
    else if (parts[0] === "apis" && parts[2] === "changelog") { await catalog(); await viewChangelog(parts[1]); }
    else if (parts[0] === "apis" && parts[2] === "v") { await catalog(); await viewReference(parts[1], parts[3]); }
    else if (parts[0] === "apis") { await catalog(); await viewReference(parts[1]); }
    else if (parts[0] === "signup") viewSignup();
    else if (parts[0] === "signin") viewSignin();
    else if (parts[0] === "keys") await viewKeys();
    else if (parts[0] === "usage") await viewUsage();
    else show(notice("error", "No such page."));
  } catch (e) {
    show(notice("error", "Something went wrong: " + e));
  }
  document.body.dataset.view = parts.join("/") || "apis";
}

document.getElementById("signout").addEventListener("click", async () => {
  await api("POST", "/portal/api/signout");
  state.me = null;
  state.lastKey = null;
  await loadMe();
  location.hash = "#/";
});

window.addEventListener("hashchange", route);
loadMe().then(route);
