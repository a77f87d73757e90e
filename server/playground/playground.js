// The playground page: combinations of adapters generated side by side as they stream, and the operator's view.
// No dependencies and no build step; it talks only to this server's API: /info, /adapters, /generate_stream and
// /operator, with the visitor's API key when the server has keys.

const MAX_COLUMNS = 4;
const TOP_N = 5; // alternatives per token (the server's most)
const OPERATOR_SECONDS = 3;
const KEY_STORAGE = "mixserve-api-key";
const DEMO = { model: "mixserve-demo", columns: [[], ["pirate"], ["pirate", "british"]] };
const TIERS = {
  loaded: "resident on the model's device",
  host: "evicted, kept in host memory",
  available: "in the store, not loaded",
  loading: "being loaded",
  error: "its last load failed",
};

const $ = (selector, root = document) => root.querySelector(selector);

const page = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  info: null,
  adapters: [], // /adapters?all=true, as the key may see them
  columns: [], // {adapters: names in the order picked, view, request: the body last sent, tokens: [{token, top}]}
  controller: null, // aborts the generation in flight
  operatorTimer: null,
};

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = new Headers(options.headers);
  if (page.key) headers.set("Authorization", `Bearer ${page.key}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) throw new Unauthorized(await errorText(response));
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return typeof body.error === "string" ? body.error : (body.error?.message ?? response.statusText);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function getJSON(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

// --- connecting, and the API key

async function connect() {
  page.info = await getJSON("/info");
  const { model_id, model_device_type, model_dtype } = page.info;
  $("#model").textContent = `${model_id} · ${model_device_type} · ${model_dtype}`;
  await loadAdapters();
  const visible = new Set(page.adapters.map((a) => a.name));
  for (const column of page.columns) column.adapters = column.adapters.filter((name) => visible.has(name));
  const first = !page.columns.length;
  // the demo opens generating its comparison; another model waits for the visitor to ask
  const demo = model_id === DEMO.model && DEMO.columns.flat().every((name) => visible.has(name));
  if (first) page.columns = (demo ? DEMO.columns : [[], ...[...visible].slice(0, 1).map((n) => [n])]).map(newColumn);
  renderMatrix();
  renderColumns();
  if (first && demo) $("#generate-form").requestSubmit();
}

function askForKey(message) {
  $("#change-key").hidden = false;
  $("#key-error").textContent = message;
  const dialog = $("#key-dialog");
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
}

async function useKey(event) {
  event.preventDefault();
  page.key = $("#key-input").value.trim();
  try {
    await connect();
  } catch (error) {
    $("#key-error").textContent = error.message;
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, page.key);
  $("#key-input").value = "";
  $("#key-dialog").close();
  if (!$("#view-operator").hidden) pollOperator();
}

function failed(error) {
  if (error instanceof Unauthorized) askForKey(page.key ? error.message : "");
  else $("#adapters-note").textContent = `Cannot reach the server: ${error.message}`;
}

// --- the adapters, and which columns use them

async function loadAdapters() {
  const { adapters } = await getJSON("/adapters?all=true");
  page.adapters = adapters;
}

function renderMatrix() {
  const head = document.createElement("tr");
  for (const label of ["Adapter", "Type", "Tier"]) head.append(cell("th", label, { scope: "col" }));
  page.columns.forEach((_, i) => head.append(cell("th", `${i + 1}`, { scope: "col", title: `Column ${i + 1}` })));
  $("#matrix thead").replaceChildren(head);

  const query = $("#search").value.trim().toLowerCase();
  const shown = page.adapters.filter(
    (a) => !query || a.name.toLowerCase().includes(query) || (a.type ?? "").toLowerCase().includes(query),
  );
  $("#matrix tbody").replaceChildren(...shown.map(adapterRow));
  $("#adapters-note").textContent = page.adapters.length
    ? `${shown.length} of ${page.adapters.length} adapters. Tick an adapter in a column to add it to that column's combination.`
    : "The store has no adapter this key may use.";
}

function adapterRow(adapter) {
  const row = document.createElement("tr");
  row.append(cell("th", adapter.name, { scope: "row" }), cell("td", adapter.type ?? "?"));
  const tier = cell("span", adapter.state, { className: `tier tier-${adapter.state}`, title: TIERS[adapter.state] ?? "" });
  row.append(cell("td", tier));
  page.columns.forEach((column, i) => {
    const box = cell("input", null, { type: "checkbox", checked: column.adapters.includes(adapter.name) });
    box.setAttribute("aria-label", `${adapter.name} in column ${i + 1}`);
    box.addEventListener("change", () => pick(column, adapter.name, box.checked));
    row.append(cell("td", box, { className: "pick" }));
  });
  return row;
}

function pick(column, name, on) {
  column.adapters = column.adapters.filter((n) => n !== name);
  if (on) column.adapters.push(name);
  column.combination = null;
  showCombination(column);
}

// --- the columns

function newColumn(adapters) {
  const column = { adapters: [...adapters], request: null, combination: null, tokens: [] };
  const view = $("#column-template").content.firstElementChild.cloneNode(true);
  column.view = view;
  $(".remove", view).addEventListener("click", () => removeColumn(column));
  $(".output", view).addEventListener("click", (event) => {
    const token = event.target.closest(".tok");
    if (token) showToken(column, Number(token.dataset.index));
  });
  $(".output", view).addEventListener("keydown", (event) => tokenKeys(column, event));
  for (const button of view.querySelectorAll(".copy button")) {
    button.addEventListener("click", () => showSnippet(column, button.dataset.format));
  }
  return column;
}

function renderColumns() {
  $("#columns").replaceChildren(...page.columns.map((c) => c.view));
  $("#columns").dataset.count = page.columns.length;
  page.columns.forEach((column, i) => {
    const view = column.view;
    $(".title", view).textContent = `Column ${i + 1}`;
    $(".output", view).setAttribute("aria-label", `Text generated by column ${i + 1}`);
    $(".remove", view).setAttribute("aria-label", `Remove column ${i + 1}`);
    $(".remove", view).disabled = page.columns.length === 1;
    view.querySelectorAll(".copy button").forEach((b) => b.setAttribute("aria-label", `Copy column ${i + 1}'s request as ${b.textContent}`));
    showCombination(column);
  });
  $("#add-column").disabled = page.columns.length >= MAX_COLUMNS;
}

function addColumn() {
  if (page.columns.length >= MAX_COLUMNS) return;
  page.columns.push(newColumn([]));
  renderMatrix();
  renderColumns();
}

function removeColumn(column) {
  page.columns = page.columns.filter((c) => c !== column);
  renderMatrix();
  renderColumns();
}

function showCombination(column) {
  const label = $(".combination", column.view);
  if (column.combination !== null) {
    label.textContent = column.combination || "base model";
    label.title = "the canonical combination the server applied (x-adapters)";
  } else {
    label.textContent = column.adapters.length ? column.adapters.join(" + ") : "base model";
    label.title = "as picked; the server's canonical order shows once generated";
  }
}

// --- generating

function settings() {
  const seed = $("#seed").value.trim();
  return {
    prompt: $("#prompt").value,
    maxTokens: Number($("#max-tokens").value),
    temperature: Number($("#temperature").value),
    seed: seed === "" ? null : Number(seed),
  };
}

function requestBody(column, s) {
  const parameters = { max_new_tokens: s.maxTokens, details: true, top_n_tokens: TOP_N };
  if (s.temperature > 0) parameters.temperature = s.temperature; // else greedy
  if (s.seed !== null) parameters.seed = s.seed;
  return { inputs: s.prompt, adapters: [...column.adapters], parameters };
}

async function generate(event) {
  event.preventDefault();
  page.controller?.abort();
  const controller = (page.controller = new AbortController());
  $("#generate").disabled = true;
  $("#stop").disabled = false;
  const s = settings();
  await Promise.allSettled(page.columns.map((column) => run(column, requestBody(column, s), controller.signal)));
  if (page.controller !== controller) return;
  page.controller = null;
  $("#generate").disabled = false;
  $("#stop").disabled = true;
  loadAdapters().then(renderMatrix, () => {}); // tiers change as adapters load
}

async function run(column, body, signal) {
  const view = column.view;
  Object.assign(column, { request: body, combination: null, tokens: [] });
  $(".output", view).replaceChildren();
  $(".token-info", view).hidden = true;
  $(".snippet", view).hidden = true;
  showCombination(column);
  const stats = $(".stats", view);
  stats.textContent = "waiting…";
  view.dataset.state = "running";
  const started = performance.now();
  let first = null;
  let last = null;
  let finish = "";
  const show = () => {
    const parts = [`${column.tokens.length} tokens`];
    if (first !== null) parts.unshift(`time to first token ${Math.round(first - started)} ms`);
    if (column.tokens.length > 1) parts.push(`${((column.tokens.length - 1) / ((last - first) / 1000)).toFixed(1)} tokens/s`);
    if (finish) parts.push(finish);
    stats.replaceChildren(...parts.flatMap((part, i) => [...(i ? [" · "] : []), cell("span", part, { className: "stat" })]));
  };
  try {
    const response = await api("/generate_stream", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    column.combination = response.headers.get("x-adapters") ?? "";
    showCombination(column);
    for await (const event of serverSentEvents(response.body)) {
      if (event.error) throw new Error(event.error);
      last = performance.now();
      first ??= last;
      appendToken(column, event.token, event.top_tokens);
      if (event.generated_text !== null) finish = event.details?.finish_reason ?? "done";
      show();
    }
    view.dataset.state = "done";
  } catch (error) {
    view.dataset.state = error.name === "AbortError" ? "stopped" : "error";
    stats.textContent = error.name === "AbortError" ? "stopped" : `error: ${error.message}`;
    if (error instanceof Unauthorized) askForKey(error.message);
  }
}

async function* serverSentEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer
        .slice(0, end)
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      buffer = buffer.slice(end + 2);
      if (data) yield JSON.parse(data);
    }
  }
}

// --- tokens: a click (or Enter) shows a token's logprob and the alternatives

function appendToken(column, token, top) {
  const index = column.tokens.length;
  column.tokens.push({ token, top: top ?? [] });
  const span = document.createElement("span");
  span.className = token.special ? "tok special" : "tok";
  span.setAttribute("role", "button");
  span.tabIndex = index === 0 ? 0 : -1; // one tab stop per column; arrows move between tokens
  span.dataset.index = index;
  if (token.special) {
    span.dataset.text = token.text; // shown by CSS: not part of the generated text
    span.setAttribute("aria-label", `special token ${token.text}`);
  } else {
    span.textContent = token.text;
  }
  $(".output", column.view).append(span);
}

function tokenKeys(column, event) {
  const span = event.target.closest(".tok");
  if (!span) return;
  const index = Number(span.dataset.index);
  const moves = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 };
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    showToken(column, index);
  } else if (event.key in moves) {
    event.preventDefault();
    const next = $(`.tok[data-index="${index + moves[event.key]}"]`, column.view);
    if (next) {
      span.tabIndex = -1;
      next.tabIndex = 0;
      next.focus();
      showToken(column, Number(next.dataset.index));
    }
  }
}

function showToken(column, index) {
  const { token, top } = column.tokens[index];
  const view = column.view;
  view.querySelectorAll(".tok.selected").forEach((t) => t.classList.remove("selected"));
  $(`.tok[data-index="${index}"]`, view).classList.add("selected");
  const head = cell("p");
  head.append(cell("strong", JSON.stringify(token.text)), ` logprob ${token.logprob.toFixed(4)} · p ${percent(token.logprob)}`);
  const table = cell("table", null, { className: "alternatives" });
  table.append(cell("caption", "Top alternatives"));
  const header = cell("tr");
  for (const label of ["Token", "Logprob", "p"]) header.append(cell("th", label, { scope: "col" }));
  table.append(header);
  for (const alt of top) {
    const row = cell("tr", null, { className: alt.id === token.id ? "chosen" : "" });
    row.append(cell("td", JSON.stringify(alt.text)), cell("td", alt.logprob.toFixed(4)), cell("td", percent(alt.logprob)));
    table.append(row);
  }
  const info = $(".token-info", view);
  info.replaceChildren(head, ...(top.length ? [table] : []));
  info.hidden = false;
}

function percent(logprob) {
  const p = 100 * Math.exp(logprob);
  return p < 0.1 ? "<0.1%" : `${p.toFixed(1)}%`;
}

// --- copy as curl / Python: the request a column sent

function showSnippet(column, format) {
  const body = column.request ?? requestBody(column, settings());
  const text = { curl: curlSnippet, openai: openaiSnippet, hub: hubSnippet }[format](body);
  const box = $(".snippet", column.view);
  $("code", box).textContent = text;
  box.dataset.format = format;
  box.hidden = false;
  const copied = $(".copied", box);
  copied.textContent = "Select the text to copy it.";
  navigator.clipboard?.writeText(text).then(
    () => (copied.textContent = "Copied to the clipboard."),
    () => {},
  );
}

const shell = (text) => `'${text.replaceAll("'", `'\\''`)}'`;
const py = (value) => JSON.stringify(value); // a JSON string or number is a Python literal too

function curlSnippet(body) {
  const lines = [`curl -sN ${location.origin}/generate_stream`, "  -H 'Content-Type: application/json'"];
  if (page.key) lines.push('  -H "Authorization: Bearer $MIXSERVE_API_KEY"');
  lines.push(`  -d ${shell(JSON.stringify(body))}`);
  return lines.join(" \\\n");
}

function pythonKey() {
  return page.key ? ["import os", 'os.environ["MIXSERVE_API_KEY"]'] : [null, '"none"'];
}

function openaiSnippet(body) {
  const p = body.parameters;
  const [imports, key] = pythonKey();
  const args = [
    `model=${py(body.adapters.length ? body.adapters.join("+") : page.info.model_id)}`,
    `prompt=${py(body.inputs)}`,
    `max_tokens=${p.max_new_tokens}`,
    `temperature=${p.temperature ?? 0}`,
    ...(p.seed != null ? [`seed=${p.seed}`] : []),
    `logprobs=${p.top_n_tokens}`,
    "stream=True",
  ];
  return [
    ...(imports ? [imports] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${py(`${location.origin}/v1`)}, api_key=${key})`,
    "stream = client.completions.create(",
    ...args.map((a) => `    ${a},`),
    ")",
    "for chunk in stream:",
    "    if chunk.choices:",
    '        print(chunk.choices[0].text, end="", flush=True)',
    "print()",
  ].join("\n");
}

function hubSnippet(body) {
  const p = body.parameters;
  const [imports, key] = pythonKey();
  const args = [
    py(body.inputs),
    ...(body.adapters.length ? [`adapter_id=${py(body.adapters.join("+"))}`] : []),
    `max_new_tokens=${p.max_new_tokens}`,
    ...(p.temperature ? [`temperature=${p.temperature}`] : []),
    ...(p.seed != null ? [`seed=${p.seed}`] : []),
    "details=True",
    `top_n_tokens=${p.top_n_tokens}`,
    "stream=True",
  ];
  return [
    ...(imports ? [imports] : []),
    "from huggingface_hub import InferenceClient",
    "",
    `client = InferenceClient(base_url=${py(location.origin)}, api_key=${key})`,
    "for event in client.text_generation(",
    ...args.map((a) => `    ${a},`),
    "):",
    "    if not event.token.special:",
    '        print(event.token.text, end="", flush=True)',
    "print()",
  ].join("\n");
}

// --- the operator's view: polled while its tab is shown

function showTab(name) {
  for (const tab of ["compare", "operator"]) {
    const on = tab === name;
    $(`#tab-${tab}`).setAttribute("aria-selected", String(on));
    $(`#tab-${tab}`).tabIndex = on ? 0 : -1;
    $(`#view-${tab}`).hidden = !on;
  }
  clearTimeout(page.operatorTimer);
  if (name === "operator") pollOperator();
}

async function pollOperator() {
  clearTimeout(page.operatorTimer);
  const status = $("#operator-status");
  try {
    const response = await api("/operator");
    if (response.status === 403) {
      $("#operator").hidden = true;
      status.textContent = `The operator's view is the whole server's: it needs an API key without namespaces (${await errorText(response)}).`;
      return;
    }
    if (response.status === 404) {
      $("#operator").hidden = true;
      status.textContent = "The operator's view is one replica's: behind the load balancer, open a replica's own address.";
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    renderOperator(await response.json());
    $("#operator").hidden = false;
    status.textContent = `Updated ${new Date().toLocaleTimeString()}, every ${OPERATOR_SECONDS} s while this tab is open.`;
  } catch (error) {
    if (error instanceof Unauthorized) return askForKey(error.message);
    status.textContent = `Cannot reach the server: ${error.message}`;
  }
  if (!$("#view-operator").hidden) page.operatorTimer = setTimeout(pollOperator, OPERATOR_SECONDS * 1000);
}

function renderOperator(data) {
  $("#queue-summary").textContent =
    `${data.running} of ${data.max_batch_size} batch rows running · ${data.waiting} waiting (queue limit ${data.max_queue})`;
  fill("#rows", data.rows, (r) => [r.state, r.adapters || "base model", r.prompt_tokens, r.generated_tokens, r.age_s.toFixed(1)], "No request running or waiting.");
  fill("#tiers", Object.entries(data.tiers), ([tier, use]) => [tierLabel(tier), use.adapters, bytes(use.bytes)], "No adapter held.");
  fill(
    "#resident",
    data.adapters,
    (a) => [a.name, a.type ?? "?", tierLabel(a.state), a.bytes == null ? "" : bytes(a.bytes), a.running_requests ?? 0, ago(a.last_used, data.time)],
    "No adapter loaded yet.",
  );
  renderActivity(data);
}

function renderActivity(data) {
  const sum = (key) => data.activity.reduce((total, i) => total + i[key], 0);
  const since = data.activity.length * data.interval_s < data.window_s ? "Since the server started" : `Last ${data.window_s / 60} min`;
  const summary = `${since}: ${sum("loads")} loads, ${sum("failed_loads")} failed loads, ${sum("evictions")} evictions (bars of ${data.interval_s} s).`;
  $("#activity-summary").textContent = summary;
  const chart = $("#activity");
  chart.setAttribute("aria-label", summary);
  const highest = Math.max(1, ...data.activity.map((i) => i.loads + i.failed_loads + i.evictions));
  const none = { loads: 0, failed_loads: 0, evictions: 0 };
  const slots = Math.max(0, Math.round(data.window_s / data.interval_s) - data.activity.length);
  chart.replaceChildren(
    ...[...Array(slots).fill(none), ...data.activity].map((i) => {
      const bar = cell("div", null, { className: "interval", title: `${i.loads} loads, ${i.failed_loads} failed, ${i.evictions} evictions` });
      for (const [key, kind] of [["evictions", "evict"], ["failed_loads", "fail"], ["loads", "load"]]) {
        const part = cell("div", null, { className: `part ${kind}` });
        part.style.height = `${(100 * i[key]) / highest}%`;
        bar.append(part);
      }
      return bar;
    }),
  );
}

function fill(selector, items, columns, empty) {
  const rows = items.map((item) => {
    const row = cell("tr");
    for (const value of columns(item)) row.append(value instanceof Node ? cell("td", value) : cell("td", String(value)));
    return row;
  });
  if (!rows.length) {
    const row = cell("tr");
    row.append(cell("td", empty, { colSpan: $(`${selector} thead tr`).children.length, className: "muted" }));
    rows.push(row);
  }
  $(`${selector} tbody`).replaceChildren(...rows);
}

const tierLabel = (tier) => cell("span", tier, { className: `tier tier-${tier}`, title: TIERS[tier] ?? "" });

function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) (n /= 1000), (i += 1);
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

const ago = (then, now) => (then == null ? "never" : `${Math.max(0, Math.round(now - then))} s ago`);

// --- wiring

function cell(tag, content = null, props = {}) {
  const element = Object.assign(document.createElement(tag), props);
  if (content !== null) element.append(content);
  return element;
}

function tabKeys(event) {
  if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
    const next = event.target.id === "tab-compare" ? "operator" : "compare";
    showTab(next);
    $(`#tab-${next}`).focus();
  }
}

$("#key-form").addEventListener("submit", useKey);
$("#change-key").addEventListener("click", () => askForKey(""));
$("#search").addEventListener("input", renderMatrix);
$("#add-column").addEventListener("click", addColumn);
$("#generate-form").addEventListener("submit", (event) => generate(event).catch(failed));
$("#stop").addEventListener("click", () => page.controller?.abort());
$("#tab-compare").addEventListener("click", () => showTab("compare"));
$("#tab-operator").addEventListener("click", () => showTab("operator"));
$(".tabs").addEventListener("keydown", tabKeys);
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && !$("#view-operator").hidden) pollOperator();
  else clearTimeout(page.operatorTimer);
});
connect().catch(failed);
