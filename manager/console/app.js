// The xiaozhi console: a small single-page app on the manager's API (no build step).
// Every value from the server goes into the page as text (textContent), never as HTML.
"use strict";

const state = { token: localStorage.getItem("xz_token"), me: null };
const view = document.getElementById("view");

// ---------------------------------------------------------------------------------------------
// helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function toast(text) {
  const box = document.getElementById("toast");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 3500);
}

function size(bytes) {
  if (bytes >= 1048576) return `${(bytes / 1048576).toFixed(2)} MB`;
  if (bytes >= 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${bytes} B`;
}

function when(iso) {
  if (!iso) return "never";
  const date = new Date(iso);
  return date.toLocaleString();
}

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : (Array.isArray(detail) ? detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ") : `HTTP ${status}`));
    this.status = status;
  }
}

async function api(method, path, body, isForm = false) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  let payload;
  if (body !== undefined) {
    if (isForm) payload = body;
    else { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  }
  const response = await fetch(path, { method, headers, body: payload });
  if (response.status === 401 && path !== "/api/auth/login") {
    signOut(false);
    throw new ApiError(401, "signed out: sign in again");
  }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError(response.status, data && data.detail);
  return data;
}

function form(fields, submitText, onSubmit) {
  const error = el("p", { class: "error", role: "alert", hidden: true });
  const button = el("button", { type: "submit" }, submitText);
  const node = el("form", {
    onsubmit: async (event) => {
      event.preventDefault();
      error.hidden = true;
      button.disabled = true;
      try { await onSubmit(new FormData(node), node); }
      catch (exc) { error.textContent = exc.message; error.hidden = false; }
      finally { button.disabled = false; }
    },
  }, fields, error, el("div", { class: "row" }, button));
  return node;
}

function field(label, name, attrs = {}) {
  const id = `f-${name}`;
  const input = attrs.tag === "textarea" ? el("textarea", { id, name, ...attrs, tag: null }, attrs.value || "")
    : attrs.tag === "select" ? el("select", { id, name, ...attrs, tag: null, options: null }, (attrs.options || []).map(([value, text]) => el("option", { value, selected: String(value) === String(attrs.value ?? "") }, text)))
    : el("input", { id, name, ...attrs });
  return el("div", {}, el("label", { for: id }, label), input);
}

function show(title, ...content) {
  view.replaceChildren(el("h1", {}, title), ...content.filter((c) => c !== null && c !== undefined && c !== false));
  document.title = `${title} · Xiaozhi console`;
}

// ---------------------------------------------------------------------------------------------
// sign-in

function signOut(callServer = true) {
  if (callServer && state.token) api("POST", "/api/auth/logout").catch(() => {});
  state.token = null;
  state.me = null;
  localStorage.removeItem("xz_token");
  document.getElementById("nav").hidden = true;
  location.hash = "#/signin";
}

function signInView() {
  document.getElementById("nav").hidden = true;
  view.replaceChildren(el("div", { class: "card signin" },
    el("h1", {}, "Sign in"),
    el("p", { class: "muted" }, "The first time: user admin, with the password the manager wrote at its first start (make run prints where)."),
    form([
      field("Username", "username", { autocomplete: "username", required: true, autocapitalize: "none" }),
      field("Password", "password", { type: "password", autocomplete: "current-password", required: true }),
    ], "Sign in", async (data) => {
      const answer = await api("POST", "/api/auth/login", { username: data.get("username"), password: data.get("password") });
      state.token = answer.token;
      localStorage.setItem("xz_token", answer.token);
      location.hash = "#/devices";
    })));
  document.title = "Sign in · Xiaozhi console";
}

// ---------------------------------------------------------------------------------------------
// devices

// The faces the firmware knows by name (manager/app.py EMOTIONS).
const EMOTIONS = ["neutral", "happy", "laughing", "funny", "sad", "angry", "crying", "loving", "embarrassed", "surprised", "shocked",
  "thinking", "winking", "cool", "relaxed", "delicious", "kissy", "confident", "sleepy", "silly", "confused"];

// Send notice (a small form) and Reboot (confirmed): the device must be online (409 says so).
function deviceCommands(d) {
  const name = d.alias || d.device_id;
  const path = `/api/devices/${encodeURIComponent(d.device_id)}`;
  const id = d.device_id.replace(/[^A-Za-z0-9]/g, "");
  const notice = el("details", { class: "notice" },
    el("summary", {}, "Send notice"),
    form([
      field("Message", `notice-message-${id}`, { tag: "textarea", maxlength: 300, required: true, rows: 2, placeholder: "Dinner is ready" }),
      field("Title (status bar)", `notice-status-${id}`, { maxlength: 32, placeholder: "Notice" }),
      field("Face", `notice-emotion-${id}`, { tag: "select", options: EMOTIONS.map((e) => [e, e]), value: "neutral" }),
    ], "Show on the device", async (data, node) => {
      const body = { message: data.get(`notice-message-${id}`), emotion: data.get(`notice-emotion-${id}`) };
      const status = (data.get(`notice-status-${id}`) || "").trim();
      if (status) body.status = status;
      await api("POST", `${path}/notice`, body);
      node.reset();
      toast(`Shown on ${name}.`);
    }));
  const reboot = el("button", { class: "secondary", type: "button", onclick: async () => {
    if (!confirm(`Reboot ${name} now? It restarts and reconnects when woken.`)) return;
    await api("POST", `${path}/reboot`);
    toast(`${name} is rebooting.`);
    setTimeout(route, 2000);
  } }, "Reboot");
  return [notice, reboot];
}

async function devicesView() {
  const [devices, agents] = await Promise.all([api("GET", "/api/devices"), api("GET", "/api/agents")]);
  const agentName = new Map(agents.map((a) => [a.id, a.name]));
  const agentOptions = [["", "Default assistant"], ...agents.map((a) => [a.id, a.name])];
  const cards = devices.map((d) => { const [notice, reboot] = deviceCommands(d); return el("div", { class: "card", dataset: { device: d.device_id } },
    el("div", { class: "row spread" },
      el("strong", {}, d.alias || d.device_id),
      el("span", { class: d.online ? "pill on" : "pill" }, d.online ? "online" : "offline")),
    el("p", { class: "muted" }, `${d.device_id} · ${d.board || "board unknown"} · firmware ${d.firmware_version || "?"}`),
    el("p", { class: "muted" }, `Last seen ${when(d.last_seen)} · agent: ${agentName.get(d.agent_id) || "default"}`),
    field("Agent", `agent-${d.device_id}`, {
      tag: "select", options: agentOptions, value: d.agent_id ?? "",
      onchange: async (event) => {
        const value = event.target.value;
        await api("PATCH", `/api/devices/${encodeURIComponent(d.device_id)}`, { agent_id: value ? Number(value) : null });
        toast("Agent changed: the next turn uses it.");
        route();
      },
    }),
    el("label", { class: "row" },
      el("input", { type: "checkbox", class: "check", checked: d.auto_upgrade, onchange: async (event) => {
        await api("PATCH", `/api/devices/${encodeURIComponent(d.device_id)}`, { auto_upgrade: event.target.checked });
        toast(event.target.checked ? "Firmware upgrades on." : "Firmware upgrades off.");
      } }),
      "Upgrade firmware automatically"),
    notice,
    el("div", { class: "row" },
      el("a", { class: "button", href: `#/devices/${encodeURIComponent(d.device_id)}/history` }, "History"),
      reboot,
      el("button", { class: "danger", onclick: async () => {
        if (!confirm(`Unbind ${d.alias || d.device_id}? Its history is deleted.`)) return;
        await api("DELETE", `/api/devices/${encodeURIComponent(d.device_id)}`);
        toast("Unbound.");
        route();
      } }, "Unbind"))); });
  show("Devices",
    el("div", { class: "card" },
      el("h2", {}, "Add a device"),
      el("p", { class: "muted" }, "Turn the device on: it speaks a 6-digit code. Enter it here."),
      form([
        field("Code", "code", { inputmode: "numeric", pattern: "\\d{6}", maxlength: 6, required: true, autocomplete: "one-time-code" }),
        field("Name (optional)", "alias", { maxlength: 100, placeholder: "Kitchen" }),
        field("Agent", "agent", { tag: "select", options: agentOptions }),
      ], "Add device", async (data, node) => {
        const body = { code: data.get("code"), alias: data.get("alias") || null, agent_id: data.get("agent") ? Number(data.get("agent")) : null };
        await api("POST", "/api/devices/bind", body);
        node.reset();
        toast("Device added.");
        route();
      })),
    devices.length ? el("div", { class: "grid" }, cards) : el("p", { class: "muted" }, "No devices yet."));
}

async function historyView(deviceId) {
  const [device, turns] = await Promise.all([
    api("GET", `/api/devices/${encodeURIComponent(deviceId)}`),
    api("GET", `/api/devices/${encodeURIComponent(deviceId)}/history?limit=200`),
  ]);
  const play = (t) => el("button", { type: "button", class: "secondary play", onclick: async (event) => {
    event.target.disabled = true;
    try {
      const response = await fetch(`/api/devices/${encodeURIComponent(deviceId)}/history/${t.id}/audio`, { headers: { Authorization: `Bearer ${state.token}` } });
      if (!response.ok) throw new Error(response.status === 404 ? "that recording has expired" : `HTTP ${response.status}`);
      const audio = new Audio(URL.createObjectURL(await response.blob()));
      audio.dataset.turn = t.id;
      document.body.append(audio);
      await audio.play();
    } catch (exc) { toast(exc.message); } finally { event.target.disabled = false; }
  } }, "▶ Play");
  const items = turns.slice().reverse().map((t) => el("li", { class: t.role }, t.text, t.has_audio ? play(t) : null, el("span", { class: "when" }, when(t.created_at))));
  show(`History: ${device.alias || device.device_id}`,
    el("p", {}, el("a", { href: "#/devices" }, "← Devices")),
    items.length ? el("ul", { class: "history" }, items) : el("p", { class: "muted" }, "Nothing said yet."));
}

// ---------------------------------------------------------------------------------------------
// talk: the browser as a device

let talking = null;

async function talkView() {
  const agents = await api("GET", "/api/agents");
  const status = el("p", { id: "talk-status", class: "muted" }, "Press Start and allow the microphone.");
  const statsLine = el("p", { id: "talk-stats", class: "muted", dataset: { sent: 0, received: 0, decoded: 0, turns: 0 } }, "");
  const transcript = el("ul", { class: "history", id: "talk-transcript" });
  const emotion = el("span", { class: "pill", id: "talk-emotion", title: "the assistant's mood" }, "neutral");
  const agent = field("Agent", "talk-agent", { tag: "select", options: [["", "This browser's agent"], ...agents.map((a) => [a.id, a.name])] });
  const startButton = el("button", { type: "button" }, "Start");
  const stopButton = el("button", { type: "button", class: "secondary", disabled: true }, "Stop");
  const ui = {
    status: (text) => { status.textContent = text; },
    line: (role, text) => { transcript.append(el("li", { class: role }, text)); transcript.lastChild.scrollIntoView({ block: "nearest" }); },
    emotion: (text) => { emotion.textContent = text; },
    stats: (s) => {
      Object.assign(statsLine.dataset, { sent: s.sent, received: s.received, decoded: s.decoded });
      statsLine.textContent = `sent ${s.sent} frames, received ${s.received}, played ${s.decoded}`;
    },
    turnDone: () => { statsLine.dataset.turns = Number(statsLine.dataset.turns) + 1; },
  };
  startButton.addEventListener("click", async () => {
    startButton.disabled = true;
    try {
      const chosen = agent.querySelector("select").value;
      const config = await api("GET", `/api/talk${chosen ? `?agent_id=${chosen}` : ""}`);
      talking = new window.TalkSession(config, ui);
      await talking.start();
      stopButton.disabled = false;
    } catch (exc) {
      ui.status(exc.message);
      if (talking) talking.stop();
      talking = null;
      startButton.disabled = false;
    }
  });
  stopButton.addEventListener("click", () => {
    if (talking) talking.stop();
    talking = null;
    stopButton.disabled = true;
    startButton.disabled = false;
    ui.status("Stopped.");
  });
  show("Talk",
    el("div", { class: "card" },
      el("p", { class: "muted" }, "Talk to the assistant from this browser, as a device would: your microphone goes to the server, the reply plays here."),
      agent,
      el("div", { class: "row" }, startButton, stopButton, emotion),
      status, statsLine),
    el("div", { class: "card" }, transcript));
}

// ---------------------------------------------------------------------------------------------
// agents

const MEMORY = [["short", "Remember the recent conversation"], ["summary", "Remember a summary across sessions"], ["none", "Remember nothing"]];
const LANGUAGE_NAMES = { auto: "Detect each turn", en: "English", zh: "中文 (Mandarin)", de: "Deutsch", fr: "Français", es: "Español", ja: "日本語", ko: "한국어" };

async function agentsView() {
  const agents = await api("GET", "/api/agents");
  show("Agents",
    el("p", {}, el("a", { class: "button", href: "#/agents/new" }, "New agent")),
    agents.length ? el("div", { class: "grid" }, agents.map((a) => el("div", { class: "card" },
      el("div", { class: "row spread" }, el("strong", {}, a.name), el("span", { class: "pill" }, `${a.device_count} device${a.device_count === 1 ? "" : "s"}`)),
      el("p", { class: "muted" }, a.role_prompt ? a.role_prompt.slice(0, 140) : "The server's default persona."),
      el("a", { class: "button", href: `#/agents/${a.id}` }, "Edit"))))
      : el("p", { class: "muted" }, "No agents yet: devices use the default assistant."));
}

async function agentView(id) {
  const [agent, options] = await Promise.all([
    id === "new" ? { name: "", role_prompt: "", voice: "", tts_engine: null, language: "", memory: "short", tools: null, wake_greeting: "", llm_backend: null, llm_model: "", asr_model: null, asr_hotwords: null, asr_corrections: null, timezone_offset_minutes: null } : api("GET", `/api/agents/${id}`),
    api("GET", "/api/options"),
  ]);
  const backends = options.llm_backends.map((b) => [b.name, b.name === "default" ? `Default (${b.backend}${b.model ? `, ${b.model}` : ""})` : `${b.name} (${b.backend}${b.model ? `, ${b.model}` : ""})`]);
  const asrEngines = (options.asr_engines || options.asr_models.map((name) => ({ name, type: "whisper" }))).map((e) => {
    const what = `${e.type}${e.model && e.model !== e.name ? `, ${e.model}` : ""}${e.streaming ? ", streaming" : ""}`;
    return [e.name, `${e.name} (${what})${e.name === options.asr_default ? " (default)" : ""}`];
  });
  const ttsEngines = [["", "By the reply's language"], ...(options.tts_engines || []).map((e) => [e.name, `${e.name} (${e.type}${e.languages && e.languages.length ? `; speaks ${e.languages.join(", ")} replies` : ""})${e.name === options.tts_default ? " (default)" : ""}`])];
  const languages = [["", "The server's"], ...(options.languages || ["auto", "en", "zh"]).map((l) => [l, LANGUAGE_NAMES[l] ? `${LANGUAGE_NAMES[l]} (${l})` : l])];
  if (agent.language && !languages.some(([l]) => l === agent.language)) languages.push([agent.language, agent.language]);
  const corrections = Object.entries(agent.asr_corrections || {}).map(([heard, meant]) => `${heard} => ${meant}`).join("\n");
  const nullable = (value) => (value && value.trim() ? value.trim() : null);
  show(id === "new" ? "New agent" : `Agent: ${agent.name}`,
    el("p", {}, el("a", { href: "#/agents" }, "← Agents")),
    el("div", { class: "card" }, form([
      field("Name", "name", { value: agent.name, required: true, maxlength: 100 }),
      field("Role prompt ({name} is the agent's name)", "role_prompt", { tag: "textarea", value: agent.role_prompt || "", maxlength: 8000 }),
      field("Memory", "memory", { tag: "select", options: MEMORY, value: agent.memory }),
      field("Language", "language", { tag: "select", options: languages, value: agent.language || "" }),
      field("Speech engine", "tts_engine", { tag: "select", options: ttsEngines, value: agent.tts_engine || "" }),
      field("Voice", "voice", { tag: "select", options: [["", "Default"], ...(options.voices || []).map((v) => [v, v])], value: agent.voice || "" }),
      field("LLM backend", "llm_backend", { tag: "select", options: backends, value: agent.llm_backend || "default" }),
      field("LLM model (asked of an OpenAI-compatible server; empty: the backend's)", "llm_model", { value: agent.llm_model || "", maxlength: 255 }),
      field("Speech recognition engine (multilingual ones follow the language above)", "asr_model", { tag: "select", options: asrEngines, value: agent.asr_model || options.asr_default }),
      field("Hotwords: names it should expect (comma-separated; engines that take them)", "asr_hotwords", { value: (agent.asr_hotwords || []).join(", ") }),
      field("Corrections, one a line: heard => meant (every engine)", "asr_corrections", { tag: "textarea", value: corrections }),
      field("Wake-word greeting", "wake_greeting", { value: agent.wake_greeting || "", maxlength: 255 }),
      field("Clock: minutes east of UTC (480: China, -300: New York; empty: the server's; from the device's next boot)", "timezone_offset_minutes",
        { type: "number", min: -720, max: 840, step: 15, value: agent.timezone_offset_minutes ?? "" }),
      field("Tools (comma-separated names; empty: all)", "tools", { value: (agent.tools || []).join(", ") }),
    ], id === "new" ? "Create" : "Save", async (data) => {
      const tools = data.get("tools").split(",").map((t) => t.trim()).filter(Boolean);
      const hotwords = data.get("asr_hotwords").split(/[,，]/).map((t) => t.trim()).filter(Boolean);
      const fixes = {};
      for (const line of data.get("asr_corrections").split("\n")) {
        const at = line.indexOf("=>");
        if (at > 0 && line.slice(0, at).trim()) fixes[line.slice(0, at).trim()] = line.slice(at + 2).trim();
      }
      const body = {
        name: data.get("name"), role_prompt: nullable(data.get("role_prompt")), memory: data.get("memory"),
        language: nullable(data.get("language")), voice: nullable(data.get("voice")), tts_engine: nullable(data.get("tts_engine")), wake_greeting: nullable(data.get("wake_greeting")),
        tools: tools.length ? tools : null,
        llm_backend: data.get("llm_backend") === "default" ? null : data.get("llm_backend"),
        llm_model: nullable(data.get("llm_model")),
        asr_model: data.get("asr_model") === options.asr_default ? null : data.get("asr_model"),
        asr_hotwords: hotwords.length ? hotwords : null,
        asr_corrections: Object.keys(fixes).length ? fixes : null,
        timezone_offset_minutes: data.get("timezone_offset_minutes").trim() === "" ? null : Number(data.get("timezone_offset_minutes")),
      };
      if (id === "new") await api("POST", "/api/agents", body);
      else await api("PUT", `/api/agents/${id}`, body);
      toast("Saved: devices with this agent use it from their next turn.");
      location.hash = "#/agents";
    })),
    id === "new" ? null : el("button", { class: "danger", onclick: async () => {
      if (!confirm(`Delete ${agent.name}? Its devices go back to the default assistant.`)) return;
      await api("DELETE", `/api/agents/${id}`);
      location.hash = "#/agents";
    } }, "Delete agent"));
}

// ---------------------------------------------------------------------------------------------
// firmware

async function firmwareView() {
  const images = await api("GET", "/api/firmware");
  const admin = state.me && state.me.role === "admin";
  show("Firmware",
    el("p", { class: "muted" }, "Devices of a board are offered the newest image for it at their next start, unless their owner turned upgrades off."),
    images.length ? el("div", { class: "card" }, el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "Board"), el("th", {}, "Version"), el("th", { class: "hide-phone" }, "Size"), el("th", { class: "hide-phone" }, "Uploaded"), admin ? el("th", {}) : null)),
      el("tbody", {}, images.map((f) => el("tr", {},
        el("td", {}, f.board), el("td", {}, f.version), el("td", { class: "hide-phone" }, size(f.size)), el("td", { class: "hide-phone" }, when(f.uploaded_at)),
        admin ? el("td", {}, el("button", { class: "secondary", onclick: async () => {
          if (!confirm(`Delete ${f.filename}?`)) return;
          await api("DELETE", `/api/firmware/${f.id}`);
          route();
        } }, "Delete")) : null)))))
      : el("p", { class: "muted" }, "No firmware uploaded."),
    admin ? el("div", { class: "card" }, el("h2", {}, "Upload"), form([
      field("Board type (as the device reports it)", "board", { required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]*", maxlength: 100 }),
      field("Version (numbers and dots)", "version", { required: true, pattern: "\\d+(\\.\\d+)*", maxlength: 64 }),
      field("Image (.bin)", "file", { type: "file", accept: ".bin,application/octet-stream", required: true }),
    ], "Upload", async (data, node) => {
      await api("POST", "/api/firmware", data, true);
      node.reset();
      toast("Uploaded.");
      route();
    })) : null);
}

// ---------------------------------------------------------------------------------------------
// account

async function accountView() {
  const tokens = await api("GET", "/api/tokens");
  const admin = state.me.role === "admin";
  const users = admin ? await api("GET", "/api/users") : [];
  show("Account",
    el("div", { class: "card" },
      el("p", {}, `Signed in as ${state.me.username} (${state.me.role}).`),
      el("button", { class: "secondary", onclick: () => signOut(true) }, "Sign out")),
    el("div", { class: "card" }, el("h2", {}, "Change password"), form([
      field("Current password", "old", { type: "password", autocomplete: "current-password", required: true }),
      field("New password (at least 8 characters)", "new", { type: "password", autocomplete: "new-password", minlength: 8, required: true }),
    ], "Change", async (data) => {
      await api("PUT", "/api/me/password", { old_password: data.get("old"), new_password: data.get("new") });
      toast("Password changed: sign in again.");
      signOut(false);
    })),
    el("div", { class: "card" }, el("h2", {}, "API tokens"),
      el("p", { class: "muted" }, "For scripts and home automation: Authorization: Bearer <token>."),
      tokens.length ? el("ul", {}, tokens.map((t) => el("li", {}, `${t.name} (${t.prefix}…, last used ${when(t.last_used_at)}) `,
        el("button", { class: "secondary", onclick: async () => { await api("DELETE", `/api/tokens/${t.id}`); route(); } }, "Revoke")))) : null,
      form([field("Name", "name", { required: true, maxlength: 100 })], "Create token", async (data, node) => {
        const made = await api("POST", "/api/tokens", { name: data.get("name") });
        node.replaceWith(el("p", {}, "Copy it now, it is not shown again: ", el("code", { class: "token" }, made.token)));
      })),
    admin ? el("div", { class: "card" }, el("h2", {}, "Users"),
      el("ul", {}, users.map((u) => el("li", {}, `${u.username} (${u.role}) `,
        u.id === state.me.id ? null : el("button", { class: "secondary", onclick: async (event) => {
          // Another user's API tokens and sign-ins: an admin revokes any of them.
          const tokens = await api("GET", `/api/users/${u.id}/tokens`);
          event.target.replaceWith(el("ul", { "aria-label": `tokens of ${u.username}` }, tokens.length ? tokens.map((t) => el("li", {},
            `${t.kind === "session" ? "sign-in" : t.name} (${t.prefix}…, expires ${when(t.expires_at)}) `,
            el("button", { class: "secondary", onclick: async () => { await api("DELETE", `/api/users/${u.id}/tokens/${t.id}`); toast("Revoked."); route(); } }, "Revoke"))) : el("li", { class: "muted" }, "No tokens.")));
        } }, "Tokens")))),
      form([
        field("Username", "username", { required: true, maxlength: 64, autocapitalize: "none" }),
        field("Password", "password", { type: "password", minlength: 8, required: true, autocomplete: "new-password" }),
        field("Role", "role", { tag: "select", options: [["user", "user"], ["admin", "admin"]] }),
      ], "Add user", async (data) => {
        await api("POST", "/api/users", { username: data.get("username"), password: data.get("password"), role: data.get("role") });
        toast("User added.");
        route();
      })) : null);
}

// ---------------------------------------------------------------------------------------------
// routing

async function route() {
  const path = location.hash.replace(/^#/, "") || "/devices";
  if (!state.token) { signInView(); return; }
  try {
    if (!state.me) state.me = await api("GET", "/api/me");
    document.getElementById("nav").hidden = false;
    for (const link of document.querySelectorAll("[data-nav]")) link.classList.toggle("active", path.startsWith(`/${link.dataset.nav}`));
    let match;
    if (path === "/signin") { location.hash = "#/devices"; return; }
    if (talking && path !== "/talk") { talking.stop(); talking = null; }
    if (path === "/devices") await devicesView();
    else if ((match = path.match(/^\/devices\/([^/]+)\/history$/))) await historyView(decodeURIComponent(match[1]));
    else if (path === "/talk") await talkView();
    else if (path === "/agents") await agentsView();
    else if ((match = path.match(/^\/agents\/(new|\d+)$/))) await agentView(match[1]);
    else if (path === "/firmware") await firmwareView();
    else if (path === "/account") await accountView();
    else show("Not found", el("p", {}, el("a", { href: "#/devices" }, "Devices")));
  } catch (exc) {
    if (exc.status === 401) { signInView(); return; }
    show("Something went wrong", el("p", { class: "error" }, exc.message), el("button", { onclick: route }, "Try again"));
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("unhandledrejection", (event) => { toast(event.reason && event.reason.message ? event.reason.message : "failed"); });
route();
