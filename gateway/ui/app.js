// Sandman admin page. Data from the API is only ever put on the page as text
// (textContent, Text nodes, attribute values): never parsed as HTML.
"use strict";

const TOKEN_KEY = "sandman.token";
const REFRESH_MS = 5000;
const $ = (id) => document.getElementById(id);

let sessions = [];
let swarm = false; // the gateway runs on a Swarm: nodes, and each session's node, are shown
let sessionsShown = "";
let historyOf = null;
let pendingKey = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value);
  }
  node.append(...children.map((c) => (c instanceof Node ? c : String(c ?? "-"))));
  return node;
}

function row(...cells) {
  return el("tr", {}, ...cells.map((c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c))));
}

function say(text) {
  $("status").textContent = text;
}

function localTime(value) {
  if (!value) return "-";
  const t = new Date(value);
  const pad = (n) => String(n).padStart(2, "0");
  return `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())} ${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}`;
}

function time(value) {
  return el("td", { class: "time" }, localTime(value));
}

function span(seconds) {
  if (seconds <= 0) return "expired";
  const s = Math.floor(seconds);
  const pad = (n) => String(n).padStart(2, "0");
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${pad(Math.floor(s / 60) % 60)}m ${pad(s % 60)}s`;
  return `${Math.floor(s / 86400)}d ${pad(Math.floor(s / 3600) % 24)}h`;
}

function size(bytes) {
  if (bytes == null) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

class ApiError extends Error {}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  const data = await resp.json().catch(() => null);
  if (resp.status === 401) {
    signOut("The token was refused; sign in again.");
    throw new ApiError("unauthorized");
  }
  if (!resp.ok) {
    const message = data && data.error ? `${data.error} (${data.code})` : `HTTP ${resp.status}`;
    throw new ApiError(message);
  }
  return data;
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  $("app").hidden = true;
  $("signout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  try {
    await api("GET", "/sessions");
  } catch (err) {
    if (!(err instanceof ApiError) || err.message !== "unauthorized") {
      $("login-error").textContent = `Cannot reach the gateway: ${err.message}`;
    }
    return;
  }
  start();
}

function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  refreshAll();
}

// Sessions

function slice(s) {
  return s.mig_profile || s.gpu_uuid || "none";
}

function countdown(expiresAt) {
  return el("span", { class: "countdown", "data-expires": expiresAt }, span((Date.parse(expiresAt) - Date.now()) / 1000));
}

function tick() {
  for (const node of document.querySelectorAll("[data-expires]")) {
    node.textContent = span((Date.parse(node.dataset.expires) - Date.now()) / 1000);
  }
}

function actions(s) {
  const who = `session of ${s.user_id}`;
  return el(
    "td",
    { class: "actions" },
    el("button", { type: "button", "aria-label": `Extend ${who}`, onclick: () => extend(s) }, "Extend"),
    el("button", { type: "button", "aria-label": `Connection history of ${who}`, onclick: () => showHistory(s) }, "History"),
    el("button", { type: "button", class: "danger", "aria-label": `Delete ${who}`, onclick: () => remove(s) }, "Delete"),
  );
}

function renderSessions() {
  const shown = JSON.stringify([swarm, sessions]);
  if (shown === sessionsShown) return;
  sessionsShown = shown;
  const body = $("sessions-body");
  const focused = body.contains(document.activeElement) ? document.activeElement.getAttribute("aria-label") : null;
  body.replaceChildren(
    ...sessions.map((s) => {
      const node = swarm ? [s.node ?? "-"] : [];
      const tr = row(s.user_id, s.ssh_port, slice(s), s.state, ...node, countdown(s.expires_at), s.active_connections, actions(s));
      tr.dataset.user = s.user_id;
      return tr;
    }),
  );
  $("sessions-empty").hidden = sessions.length > 0;
  // a keyboard user keeps their place when a refresh redraws the rows
  const again = [...body.querySelectorAll("button")].find((b) => b.getAttribute("aria-label") === focused);
  if (again) again.focus();
}

async function refreshSessions() {
  sessions = await api("GET", "/sessions");
  renderSessions();
}

// Waiting list

let queueShown = "";

async function refreshQueue() {
  const data = await api("GET", "/queue");
  const shown = JSON.stringify(data);
  if (shown === queueShown) return; // a redraw would swap the buttons under the pointer
  queueShown = shown;
  $("queue-body").replaceChildren(
    ...data.queue.map((q) => {
      const button = el(
        "button",
        { type: "button", class: "danger", "aria-label": `Withdraw request of ${q.user_id}`, onclick: () => withdraw(q) },
        "Withdraw",
      );
      const tr = row(q.queue_position, q.user_id, q.mig_profile ?? "default", time(q.submitted_at), time(q.queue_expires_at), el("td", { class: "actions" }, button));
      tr.dataset.user = q.user_id;
      return tr;
    }),
  );
  $("queue-empty").hidden = data.count > 0;
}

async function withdraw(q) {
  if (!window.confirm(`Withdraw the waiting request of ${q.user_id}?`)) return;
  await act(async () => {
    await api("DELETE", `/sessions/${encodeURIComponent(q.id)}`);
    say(`Request of ${q.user_id} withdrawn.`);
  });
}

async function extend(s) {
  const minutes = Number($("extend-minutes").value);
  await act(async () => {
    const updated = await api("PATCH", `/sessions/${encodeURIComponent(s.id)}`, { extend_minutes: minutes });
    say(`Session of ${updated.user_id} now ends ${localTime(updated.expires_at)}.`);
  });
}

async function remove(s) {
  if (!window.confirm(`End the session of ${s.user_id} now? Its connections are cut; the workspace stays.`)) return;
  await act(async () => {
    await api("DELETE", `/sessions/${encodeURIComponent(s.id)}`);
    say(`Session of ${s.user_id} ended.`);
  });
}

async function act(step) {
  $("sessions-error").textContent = "";
  try {
    await step();
  } catch (err) {
    $("sessions-error").textContent = err.message;
  }
  await refreshAll();
}

// Connection history

async function showHistory(s) {
  historyOf = s;
  $("connections").hidden = false;
  $("connections-title").textContent = `Connection history: ${s.user_id} (${s.id})`;
  await refreshHistory();
  $("connections-title").scrollIntoView({ block: "nearest" });
}

async function refreshHistory() {
  if (historyOf === null) return;
  const data = await api("GET", `/sessions/${encodeURIComponent(historyOf.id)}/connections`);
  $("connections-body").replaceChildren(
    ...data.connections.map((c) =>
      row(
        time(c.started_at),
        c.ended_at ? time(c.ended_at) : "live",
        `${c.client_addr}:${c.client_port}`,
        el("code", {}, c.client_banner ?? "-"),
        el("code", {}, c.server_banner ?? "-"),
        size(c.bytes_client_to_container),
        size(c.bytes_container_to_client),
        c.reason ?? "-",
      ),
    ),
  );
}

// Create

async function refreshProfiles() {
  const [profiles, available, gpus] = await Promise.all([
    api("GET", "/gpus/profiles"), api("GET", "/gpus/available"), api("GET", "/gpus"),
  ]);
  const free = {};
  for (const item of available.available_instances) free[item.profile] = (free[item.profile] || 0) + 1;
  const select = $("create-profile");
  const chosen = select.value;
  const names = [...new Set(profiles.profiles.map((p) => p.name))];
  const shown = JSON.stringify([names, free, available.count, gpus.count]);
  if (select.dataset.shown === shown) return; // an open list is left alone
  select.dataset.shown = shown;
  const noGpus = gpus.count === 0 ? "no GPU: this host has no GPUs" : `${available.count} free slices`;
  select.replaceChildren(
    el("option", { value: "" }, `Default (${noGpus})`),
    ...names.map((name) => el("option", { value: name }, `${name} (${free[name] || 0} free)`)),
  );
  select.value = names.includes(chosen) ? chosen : "";
}

async function create(event) {
  event.preventDefault();
  $("create-error").textContent = "";
  const body = { user_id: $("create-user").value.trim(), ttl_minutes: Number($("create-ttl").value) };
  if ($("create-profile").value) body.mig_profile = $("create-profile").value;
  const keys = $("create-key").value.split("\n").map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
  if (keys.length) body.ssh_public_keys = keys;
  let created;
  try {
    say("Creating the session…");
    created = await api("POST", "/sessions", body);
  } catch (err) {
    $("create-error").textContent = err.message;
    say("");
    return;
  }
  showCreated(created);
  $("create-form").reset();
  await refreshAll();
}

function keyFile(created) {
  return `sandman-${created.ssh_user}-${created.ssh_port}.key`;
}

function showOptional(id, text) {
  $(id).textContent = text || "";
  $(id).parentElement.hidden = !text;
  $(`${id}-label`).hidden = !text;
}

function showCreated(created) {
  pendingKey = created.ssh_private_key ? { text: created.ssh_private_key, name: keyFile(created) } : null;
  const target = `${created.ssh_user}@${created.ssh_host}`;
  const command = pendingKey
    ? `ssh -i ${pendingKey.name} -p ${created.ssh_port} ${target}`
    : created.ssh_command || `ssh -p ${created.ssh_port} ${target}`;
  $("created-title").textContent = `Session for ${created.ssh_user} is ready`;
  $("created-ssh").textContent = command;
  $("created-expires").textContent = localTime(created.expires_at);
  showOptional("created-password", created.ssh_password);
  showOptional("created-known", created.ssh_known_hosts);
  $("created-known-how").hidden = !created.ssh_known_hosts;
  $("created-known-how").textContent =
    "Save it in a file of its own, ~/.ssh/sandman/known_hosts, and add at the top of " +
    `~/.ssh/config: "Host ${created.ssh_host}" with the line "UserKnownHostsFile ` +
    '~/.ssh/known_hosts ~/.ssh/sandman/known_hosts". Not in ~/.ssh/known_hosts itself: ' +
    "paramiko-based tools (Fabric, Ansible) cannot read the line there.";
  $("created-key").hidden = pendingKey === null;
  $("created-key").disabled = false;
  $("created-key").textContent = "Download private key";
  $("created").hidden = false;
  $("created").focus();
  say(`Session for ${created.ssh_user} created.`);
}

function downloadKey() {
  if (pendingKey === null) return;
  const url = URL.createObjectURL(new Blob([pendingKey.text], { type: "application/octet-stream" }));
  const link = el("a", { href: url, download: pendingKey.name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
  pendingKey = null;
  $("created-key").disabled = true;
  $("created-key").textContent = "Key downloaded (chmod 600 it)";
}

function closeCreated() {
  pendingKey = null;
  $("created").hidden = true;
  showOptional("created-password", "");
  $("create-user").focus();
}

// GPUs

function gpuPicture(gpu, holders) {
  const blocks = [];
  const addBlock = (label, memory, holder) => {
    const held = holder !== undefined;
    const block = el(
      "div",
      { class: held ? "slice held" : "slice free", role: "listitem" },
      el("span", { class: "slice-name" }, label),
      el("span", { class: "slice-holder" }, held ? holder : "free"),
    );
    block.style.flexGrow = String(Math.max(memory, 1));
    block.title = `${label}: ${held ? `held by ${holder}` : "free"}`;
    blocks.push(block);
  };
  if (!gpu.mig_enabled) {
    addBlock("whole GPU", gpu.memory_total, holders[gpu.uuid]);
  } else {
    let used = 0;
    for (const mig of gpu.mig_instances) {
      addBlock(mig.profile, mig.memory, holders[mig.uuid]);
      used += mig.memory;
    }
    const rest = gpu.memory_total - used;
    if (rest > gpu.memory_total / 16) {
      const part = el("div", { class: "slice unpartitioned", role: "listitem" }, el("span", { class: "slice-name" }, "not partitioned"));
      part.style.flexGrow = String(rest);
      blocks.push(part);
    }
  }
  const mode = gpu.mig_enabled ? "MIG" : "MIG off";
  return el(
    "figure",
    { class: "gpu" },
    el("figcaption", {}, `GPU ${gpu.index} · ${gpu.name} · ${mode} · ${size(gpu.memory_total)}`),
    el("div", { class: "slices", role: "list", "aria-label": `Slices of GPU ${gpu.index}` }, ...blocks),
  );
}

async function refreshGpus() {
  const data = await api("GET", "/gpus");
  const holders = {};
  for (const s of sessions) if (s.gpu_uuid) holders[s.gpu_uuid] = s.user_id;
  $("gpus-list").replaceChildren(
    ...(data.gpus.length ? data.gpus.map((g) => gpuPicture(g, holders)) : [el("p", { class: "hint" }, "This host has no GPUs: sessions get none.")]),
  );
}

// Nodes (Swarm only: with plain Docker the one node is this host)

async function refreshNodes() {
  const data = await api("GET", "/nodes");
  swarm = data.nodes.some((n) => n.role !== "standalone");
  $("nodes").hidden = !swarm;
  $("sessions-node").hidden = !swarm;
  $("nodes-body").replaceChildren(
    ...data.nodes.map((n) => {
      const slices = n.resources.map((r) => `${r.kind}=${r.value}`).join(", ") || "-";
      const tr = row(n.hostname + (n.gateway ? " (gateway)" : ""), n.role, n.state, n.availability, n.address ?? "-", slices);
      tr.dataset.node = n.hostname;
      return tr;
    }),
  );
}

// Audit

const DETAIL_KEYS = ["client_addr", "reason", "expires_at", "gpu_uuid", "client_banner"];

async function refreshAudit() {
  const data = await api("GET", "/audit?limit=50");
  $("audit-body").replaceChildren(
    ...data.events.map((e) =>
      row(
        time(e.at),
        e.event,
        e.user_id ?? "-",
        e.session_id ? e.session_id.slice(0, 8) : "-",
        DETAIL_KEYS.filter((k) => e[k] != null).map((k) => `${k}=${e[k]}`).join(" ") || "-",
      ),
    ),
  );
}

async function refreshAll() {
  if (!sessionStorage.getItem(TOKEN_KEY)) return;
  try {
    await refreshNodes(); // first: it decides whether the sessions show their node
    await refreshSessions();
    await Promise.all([refreshGpus(), refreshProfiles(), refreshAudit(), refreshHistory(), refreshQueue()]);
    $("sessions-error").textContent = "";
  } catch (err) {
    if (err.message !== "unauthorized") $("sessions-error").textContent = `Refresh failed: ${err.message}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", signIn);
  $("create-form").addEventListener("submit", create);
  $("created-key").addEventListener("click", downloadKey);
  $("created-close").addEventListener("click", closeCreated);
  $("signout").addEventListener("click", () => signOut("Signed out."));
  $("connections-refresh").addEventListener("click", refreshHistory);
  $("connections-close").addEventListener("click", () => {
    historyOf = null;
    $("connections").hidden = true;
  });
  $("audit-refresh").addEventListener("click", refreshAudit);
  setInterval(tick, 1000);
  setInterval(refreshAll, REFRESH_MS);
  if (sessionStorage.getItem(TOKEN_KEY)) start();
  else signOut();
});
