// The playground page: combinations of adapters, each at its own weight, generated side by side as they stream
// (free text, JSON schema, regex or a tool call per column), merges built from the store's LoRA adapters, the whole
// comparison in the URL, and the operator's view. No dependencies and no build step; it talks only to this server's
// API: /info, /adapters, /generate_stream, /v1/chat/completions (tool calls) and /operator, with the visitor's API key
// when the server has keys.

const MAX_COLUMNS = 4;
const TOP_N = 5; // alternatives per token (the server's most)
const MAX_WEIGHT = 10; // |weight| the API accepts (README, "Weighted mixes")
const OPERATOR_SECONDS = 3;
const KEY_STORAGE = "mixserve-api-key";
const DEMO = { model: "mixserve-demo", columns: [[], ["pirate"], ["pirate", "british"]] };
const TIERS = {
  loaded: "resident on the model's device",
  host: "evicted, kept in host memory",
  available: "in the store, not loaded",
  loading: "being loaded",
  error: "its last load failed",
  merge: "a merge built on this page: computed by the server when a column first uses it",
};
// the API's merge strategies (server/adapters/merges.py), and which take a density or a majority sign method
const MERGE_METHODS = ["linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune", "svd", "ties_svd",
  "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"];
const usesDensity = (method) => /^(ties|dare|magnitude_prune)/.test(method);
const usesSign = (method) => /^(ties|dare_ties)/.test(method);
const MERGE_FORM = /^merge:([a-z_]+)\(([^();]*)(?:;([^()]*))?\)$/;
const DEFAULT_SCHEMA = {
  type: "object",
  additionalProperties: false,
  required: ["name", "count"],
  properties: { name: { type: "string", maxLength: 12 }, count: { type: "integer", minimum: 0, maximum: 99 } },
};
const DEFAULT_TOOL = {
  name: "count_animals",
  description: "How many animals someone has",
  parameters: {
    type: "object",
    additionalProperties: false,
    required: ["owner", "animal"],
    properties: { owner: { enum: ["Alice", "Bob", "Grace"] }, animal: { enum: ["cats", "dogs", "birds"] } },
  },
};
const pretty = (value) => JSON.stringify(value, null, 2);
const defaultMode = () => ({ kind: "text", schema: pretty(DEFAULT_SCHEMA), regex: "[A-Z][a-z]+ has [0-9]+ (cats|dogs)\\.", tool: pretty(DEFAULT_TOOL), choice: "named" });

const $ = (selector, root = document) => root.querySelector(selector);

const page = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  info: null,
  adapters: [], // /adapters?all=true, as the key may see them
  merges: [], // canonical names of the merges built on this page
  // {entries: [{name, weight}] in the order picked, mode, view, request: what it last sent (see request()), controller:
  // cancels its run, combination, tokens}
  columns: [],
  shared: readShared(), // the state a shared link carries, until the adapters are known
  generation: 0, // counts Generate presses: only the latest one's end enables Generate again
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
    return messageOf(await response.json()) ?? response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// {"error": "..."} natively, {"error": {"message": ...}} on /v1
const messageOf = (body) => (typeof body.error === "string" ? body.error : body.error?.message);

async function getJSON(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

// --- connecting, and the API key

async function connect() {
  page.info = await getJSON("/info");
  const { model_id, model_device_type, model_dtype, model_quantization } = page.info;
  const quantized = model_quantization && model_quantization !== "none" ? [model_quantization] : [];
  $("#model").textContent = [model_id, model_device_type, model_dtype, ...quantized].join(" · ");
  await loadAdapters();
  if (page.key) $("#change-key").hidden = false; // also after a reload, with the tab's key
  const first = !page.columns.length;
  if (first && page.shared) restore(page.shared);
  const dropped = keepUsable();
  // the demo opens generating its comparison, and so does a shared link; another model waits for the visitor
  const visible = page.adapters.map((a) => a.name);
  const demo = model_id === DEMO.model && DEMO.columns.flat().every((name) => visible.includes(name));
  if (first && !page.columns.length) {
    const names = demo ? DEMO.columns : [[], ...visible.slice(0, 1).map((n) => [n])];
    page.columns = names.map((list) => newColumn(list.map((name) => ({ name, weight: 1 }))));
  }
  if (!first) for (const id of ["#merge-note", "#sweep-note"]) $(id).textContent = ""; // they may name the last key's adapters
  const shared = page.shared;
  page.shared = null;
  renderPickers();
  renderColumns();
  saveState();
  noteDropped(dropped);
  if (first && (demo || shared)) $("#generate-form").requestSubmit();
}

// leaves out of the merges and the columns what this key may not use; how many adapters were left out
function keepUsable() {
  const visible = new Set(page.adapters.map((a) => a.name));
  const before = page.merges.length + page.columns.reduce((n, c) => n + c.entries.length, 0);
  page.merges = page.merges.filter((name) => mergeSources(name).every((source) => visible.has(source)));
  const usable = new Set([...visible, ...page.merges]);
  for (const column of page.columns) {
    const kept = column.entries.filter((e) => usable.has(e.name));
    if (kept.length !== column.entries.length) Object.assign(column, { entries: kept, combination: null, request: null });
  }
  return before - page.merges.length - page.columns.reduce((n, c) => n + c.entries.length, 0);
}

function noteDropped(count) {
  if (count) $("#share-note").textContent = `Left out ${count} adapters or merges that this key may not use.`;
}

// a link opened in this tab (only its #state differs): its comparison replaces this one, and generates
function followLink() {
  const state = readShared();
  if (!state || !page.info || location.hash === page.savedHash) return;
  stopColumns(page.columns);
  restore(state);
  const dropped = keepUsable();
  renderPickers();
  renderColumns();
  saveState();
  noteDropped(dropped);
  $("#generate-form").requestSubmit();
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

// --- the adapters (and this page's merges), and which columns use them: every picker lists only these

async function loadAdapters() {
  const { adapters } = await getJSON("/adapters?all=true");
  page.adapters = adapters;
}

function pickable() {
  const listed = new Set(page.adapters.map((a) => a.name));
  const merges = page.merges.filter((name) => !listed.has(name)).map((name) => ({ name, type: "merge", state: "merge" }));
  return [...page.adapters, ...merges];
}

function renderPickers() {
  renderMatrix();
  renderSweep();
  renderMerge();
}

function renderMatrix() {
  const head = document.createElement("tr");
  for (const label of ["Adapter", "Type", "Tier"]) head.append(cell("th", label, { scope: "col" }));
  page.columns.forEach((_, i) => head.append(cell("th", `${i + 1}`, { scope: "col", title: `Column ${i + 1}` })));
  $("#matrix thead").replaceChildren(head);

  const all = pickable();
  const query = $("#search").value.trim().toLowerCase();
  const shown = all.filter((a) => !query || a.name.toLowerCase().includes(query) || (a.type ?? "").toLowerCase().includes(query));
  const focused = document.activeElement?.closest("#matrix") ? document.activeElement.getAttribute("aria-label") : null;
  $("#matrix tbody").replaceChildren(...shown.map(adapterRow));
  if (focused) [...document.querySelectorAll("#matrix input")].find((box) => box.getAttribute("aria-label") === focused)?.focus();
  $("#adapters-note").textContent = all.length
    ? `${shown.length} of ${all.length} adapters. Tick an adapter in a column to add it to that column's combination; set its weight in the column.`
    : "The store has no adapter this key may use.";
}

function adapterRow(adapter) {
  const row = document.createElement("tr");
  row.append(cell("th", adapter.name, { scope: "row" }), cell("td", adapter.type ?? "?"));
  const tier = cell("span", adapter.state, { className: `tier tier-${adapter.state}`, title: TIERS[adapter.state] ?? "" });
  row.append(cell("td", tier));
  page.columns.forEach((column, i) => {
    const box = cell("input", null, { type: "checkbox", checked: column.entries.some((e) => e.name === adapter.name) });
    box.setAttribute("aria-label", `${adapter.name} in column ${i + 1}`);
    box.addEventListener("change", () => pick(column, adapter.name, box.checked));
    row.append(cell("td", box, { className: "pick" }));
  });
  return row;
}

function pick(column, name, on) {
  column.entries = column.entries.filter((e) => e.name !== name);
  if (on) column.entries.push({ name, weight: 1 });
  column.combination = null;
  showCombination(column);
  renderWeights(column);
  saveState();
}

function renderSweep() {
  const select = $("#sweep-adapter");
  const chosen = select.value || page.columns[0]?.entries[0]?.name; // a restored sweep shows its adapter
  select.replaceChildren(...pickable().map((a) => cell("option", a.name, { value: a.name, selected: a.name === chosen })));
  $("#sweep-run").disabled = !select.options.length;
}

// one adapter at several weights, one column each (the first column's output mode for all)
function sweep(event) {
  event.preventDefault();
  const note = $("#sweep-note");
  const name = $("#sweep-adapter").value;
  const weights = $("#sweep-weights").value.split(/[\s,]+/).filter(Boolean).map(Number);
  const bad = weights.filter((w) => !validWeight(w));
  if (!name || !weights.length || bad.length || weights.length > MAX_COLUMNS) {
    note.textContent = bad.length || !weights.length
      ? `Weights are numbers from -${MAX_WEIGHT} to ${MAX_WEIGHT}, separated by commas.`
      : `At most ${MAX_COLUMNS} weights: one column each.`;
    return;
  }
  const mode = { ...(page.columns[0]?.mode ?? defaultMode()) };
  stopColumns(page.columns);
  page.columns = weights.map((weight) => newColumn([{ name, weight }], mode));
  note.textContent = `${weights.length} columns: ${name} at ${weights.map(weightText).join(", ")}.`;
  renderPickers();
  renderColumns();
  saveState();
  $("#generate-form").requestSubmit();
}

const validWeight = (w) => Number.isFinite(w) && Math.abs(w) <= MAX_WEIGHT;

// Python's repr of a float without ".0", as the server writes weights: 0.3, 1, -1.25, 1e-05
function weightText(w) {
  if (Object.is(w, -0)) return "-0";
  if (w !== 0 && Math.abs(w) < 1e-4) return w.toExponential().replace(/e([+-])(\d)$/, "e$10$2");
  return String(w);
}

// --- merges: built from the listed LoRA adapters, named as the API names them, then used like any adapter

function renderMerge() {
  const sources = page.adapters.filter((a) => (a.type ?? "").toUpperCase() === "LORA" && !a.name.startsWith("merge:"));
  const kept = new Map([...document.querySelectorAll("#merge-sources .source")].map((row) => [row.dataset.name, row]));
  $("#merge-sources").replaceChildren(...sources.map((a) => kept.get(a.name) ?? mergeSource(a.name)));
  $("#merge-empty").hidden = sources.length > 0;
  const method = $("#merge-method").value;
  $("#merge-density-field").hidden = !usesDensity(method);
  $("#merge-sign-field").hidden = !usesSign(method);
}

function mergeSource(name) {
  const row = cell("div", null, { className: "source" });
  row.dataset.name = name;
  const box = cell("input", null, { type: "checkbox" });
  box.setAttribute("aria-label", `${name} in the merge`);
  const weight = cell("input", null, { type: "number", min: -MAX_WEIGHT, max: MAX_WEIGHT, step: "any", value: "1", className: "merge-weight" });
  weight.setAttribute("aria-label", `Weight of ${name} in the merge`);
  const label = cell("label", box);
  label.append(` ${name}`);
  row.append(label, weight);
  return row;
}

function mergeName() {
  const method = $("#merge-method").value;
  const sources = [...document.querySelectorAll("#merge-sources .source")]
    .filter((row) => $("input[type=checkbox]", row).checked)
    .map((row) => [row.dataset.name, Number($(".merge-weight", row).value)]);
  if (!sources.length) throw new Error("Tick at least one adapter to merge.");
  const bad = sources.filter(([, w]) => !validWeight(w));
  if (bad.length) throw new Error(`Merge weights are numbers from -${MAX_WEIGHT} to ${MAX_WEIGHT} (${bad.map(([n]) => n).join(", ")}).`);
  const options = [];
  if (usesDensity(method)) {
    const density = Number($("#merge-density").value);
    if (!(density > 0 && density <= 1)) throw new Error("The density is a number in (0, 1].");
    options.push(`density=${weightText(density)}`);
  }
  if (usesSign(method)) options.push(`majority_sign_method=${$("#merge-sign").value}`);
  const listed = sources.map(([n, w]) => `${n}@${weightText(w)}`).join(",");
  return `merge:${method}(${listed}${options.length ? `;${options.join(",")}` : ""})`;
}

function addMerge(event) {
  event.preventDefault();
  const note = $("#merge-note");
  let name;
  try {
    name = mergeName();
  } catch (error) {
    note.textContent = error.message;
    return;
  }
  if (!page.merges.includes(name)) page.merges.push(name);
  note.textContent = `Added ${name}: tick it in a column.`;
  renderMatrix();
  renderSweep();
  saveState();
}

function mergeSources(name) {
  const found = MERGE_FORM.exec(name);
  return found ? found[2].split(",").map((part) => part.slice(0, part.lastIndexOf("@"))) : [name];
}

// --- the columns

function newColumn(entries, mode = defaultMode()) {
  const column = { entries: entries.map((e) => ({ ...e })), mode: { ...mode }, request: null, combination: null, tokens: [] };
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
  $(".mode-kind", view).addEventListener("change", () => setMode(column, { kind: $(".mode-kind", view).value }));
  for (const [selector, key] of [[".schema", "schema"], [".regex", "regex"], [".tool", "tool"], [".choice", "choice"]]) {
    $(selector, view).addEventListener(selector === ".choice" ? "change" : "input", (event) => setMode(column, { [key]: event.target.value }, false));
  }
  for (const type of ["input", "change"]) $(".mode", view).addEventListener(type, () => ($(".mode-note", view).textContent = ""));
  $(".apply-all", view).addEventListener("click", () => {
    for (const other of page.columns) if (other !== column) setMode(other, column.mode);
    $(".mode-note", view).textContent = "Every column uses this output mode now.";
  });
  showMode(column);
  return column;
}

function renderColumns() {
  $("#columns").replaceChildren(...page.columns.map((c) => c.view));
  $("#columns").dataset.count = page.columns.length;
  page.columns.forEach((column, i) => {
    const view = column.view;
    const n = i + 1;
    $(".title", view).textContent = `Column ${n}`;
    $(".output", view).setAttribute("aria-label", `Text generated by column ${n}`);
    $(".remove", view).setAttribute("aria-label", `Remove column ${n}`);
    $(".remove", view).disabled = page.columns.length === 1;
    $(".mode-kind", view).setAttribute("aria-label", `Output of column ${n}`);
    $(".schema", view).setAttribute("aria-label", `JSON schema of column ${n}`);
    $(".regex", view).setAttribute("aria-label", `Regex of column ${n}`);
    $(".tool", view).setAttribute("aria-label", `Tool of column ${n}: a function definition`);
    $(".choice", view).setAttribute("aria-label", `tool_choice of column ${n}`);
    $(".apply-all", view).setAttribute("aria-label", `Use column ${n}'s output mode in every column`);
    view.querySelectorAll(".copy button").forEach((b) => b.setAttribute("aria-label", `Copy column ${n}'s request as ${b.textContent}`));
    showCombination(column);
    renderWeights(column);
  });
  $("#add-column").disabled = page.columns.length >= MAX_COLUMNS;
}

function addColumn() {
  if (page.columns.length >= MAX_COLUMNS) return;
  page.columns.push(newColumn([]));
  renderMatrix();
  renderColumns();
  saveState();
}

function removeColumn(column) {
  const index = page.columns.indexOf(column);
  stopColumns([column]);
  page.columns = page.columns.filter((c) => c !== column);
  renderMatrix();
  renderColumns();
  saveState();
  const next = $(".remove", page.columns[Math.min(index, page.columns.length - 1)].view);
  (next.disabled ? $("#add-column") : next).focus(); // not lost to <body>
}

// the combination as picked, in the API's canonical form for weights: pirate@0.3+digits
const spec = (entries) => entries.map((e) => (e.weight === 1 ? e.name : `${e.name}@${weightText(e.weight)}`)).join("+");

function showCombination(column) {
  const label = $(".combination", column.view);
  if (column.combination !== null) {
    label.textContent = column.combination || "base model";
    label.title = "the canonical combination the server applied (x-adapters)";
  } else {
    label.textContent = spec(column.entries) || "base model";
    label.title = "as picked; the server's canonical order shows once generated";
  }
}

// a slider and a number per adapter of the column, kept equal
function renderWeights(column) {
  const n = page.columns.indexOf(column) + 1;
  $(".weights", column.view).replaceChildren(
    ...column.entries.map((entry) => {
      const row = cell("div", null, { className: "weight" });
      const range = cell("input", null, { type: "range", min: -MAX_WEIGHT, max: MAX_WEIGHT, step: 0.05, value: entry.weight });
      const number = cell("input", null, { type: "number", min: -MAX_WEIGHT, max: MAX_WEIGHT, step: "any", value: entry.weight });
      range.setAttribute("aria-label", `Weight of ${entry.name} in column ${n} (slider)`);
      number.setAttribute("aria-label", `Weight of ${entry.name} in column ${n}`);
      const problem = cell("span", "", { className: "error weight-error", id: `weight-error-${n}-${entry.name}` });
      problem.setAttribute("role", "alert");
      number.setAttribute("aria-describedby", problem.id);
      const set = (source, other) => {
        const weight = Number(source.value);
        const ok = source.value !== "" && validWeight(weight);
        number.setAttribute("aria-invalid", String(!ok));
        problem.textContent = ok ? "" : `A weight is a number from -${MAX_WEIGHT} to ${MAX_WEIGHT}: Generate waits for one.`;
        if (!ok) return;
        entry.weight = weight;
        other.value = weight;
        column.combination = null;
        showCombination(column);
        saveState();
      };
      range.addEventListener("input", () => set(range, number));
      number.addEventListener("input", () => set(number, range));
      row.append(cell("span", entry.name, { className: "name", title: entry.name }), range, number, problem);
      return row;
    }),
  );
}

function setMode(column, changes, redraw = true) {
  Object.assign(column.mode, changes);
  if (redraw) showMode(column);
  saveState();
}

function showMode(column) {
  const { view, mode } = column;
  $(".mode-kind", view).value = mode.kind;
  $(".schema", view).value = mode.schema;
  $(".regex", view).value = mode.regex;
  $(".tool", view).value = mode.tool;
  $(".choice", view).value = mode.choice;
  for (const kind of ["json", "regex", "tool"]) {
    view.querySelectorAll(`.mode-${kind}`).forEach((field) => (field.hidden = mode.kind !== kind));
  }
}

// --- generating: /generate_stream, or /v1/chat/completions for a tool call

function settings() {
  const seed = $("#seed").value.trim();
  return {
    prompt: $("#prompt").value,
    maxTokens: Number($("#max-tokens").value),
    temperature: Number($("#temperature").value),
    seed: seed === "" ? null : Number(seed),
  };
}

// the API's weighted form: a bare name at weight 1, else {"name", "weight"}
const adapterList = (entries) => entries.map((e) => (e.weight === 1 ? e.name : { name: e.name, weight: e.weight }));

function parseOwn(text, what) {
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`the ${what} is not JSON: ${error.message}`);
  }
}

// {path, body, spec, mode}: what a column sends for these settings, and the output mode it was sent with
function request(column, s) {
  const { mode, entries } = column;
  const adapters = adapterList(entries);
  if (mode.kind === "tool") {
    const tool = parseOwn(mode.tool, "tool definition");
    const choice = mode.choice === "named" ? { type: "function", function: { name: tool?.name } } : mode.choice;
    const body = {
      model: page.info.model_id,
      adapters,
      messages: [{ role: "user", content: s.prompt }],
      tools: [{ type: "function", function: tool }],
      tool_choice: choice,
      max_tokens: s.maxTokens,
      temperature: s.temperature,
      ...(s.seed !== null ? { seed: s.seed } : {}),
      stream: true,
    };
    return { path: "/v1/chat/completions", body, spec: spec(entries), mode: { ...mode } };
  }
  const parameters = { max_new_tokens: s.maxTokens, details: true, top_n_tokens: TOP_N };
  if (s.temperature > 0) parameters.temperature = s.temperature; // else greedy
  if (s.seed !== null) parameters.seed = s.seed;
  if (mode.kind === "json") parameters.grammar = { type: "json", value: parseOwn(mode.schema, "JSON schema") };
  if (mode.kind === "regex") parameters.grammar = { type: "regex", value: mode.regex };
  return { path: "/generate_stream", body: { inputs: s.prompt, adapters, parameters }, spec: spec(entries), mode: { ...mode } };
}

async function generate(event) {
  event.preventDefault();
  const invalid = $('#columns input[aria-invalid="true"]');
  if (invalid) {
    invalid.focus(); // its message says the range; nothing is sent with a weight other than the one shown
    return;
  }
  stopColumns(page.columns);
  const generation = ++page.generation;
  $("#generate").disabled = true;
  $("#stop").disabled = false;
  const s = settings();
  await Promise.allSettled(page.columns.map((column) => run(column, s)));
  if (page.generation !== generation) return;
  $("#generate").disabled = false;
  $("#stop").disabled = true;
  loadAdapters().then(renderPickers, () => {}); // tiers change as adapters load
}

// a removed or replaced column's request is cancelled with it
function stopColumns(list) {
  for (const column of list) column.controller?.abort();
}

async function run(column, s) {
  const view = column.view;
  const controller = (column.controller = new AbortController());
  const signal = controller.signal;
  Object.assign(column, { request: null, combination: null, tokens: [] });
  $(".output", view).replaceChildren();
  $(".token-info", view).hidden = true;
  $(".snippet", view).hidden = true;
  $(".parsed", view).hidden = true;
  showCombination(column);
  const stats = $(".stats", view);
  stats.textContent = "waiting…";
  view.dataset.state = "running";
  // live regions rewritten per token: a screen reader announces them once, when the column ends
  const live = view.querySelectorAll("[aria-live]");
  live.forEach((region) => region.setAttribute("aria-busy", "true"));
  const started = performance.now();
  let first = null;
  let last = null;
  let finish = "";
  const calls = []; // a chat answer's tool calls: {name, arguments}
  let usage = null; // a chat answer's last chunk counts its tokens: a call's opening is not streamed as text
  const show = () => {
    const count = usage?.completion_tokens ?? column.tokens.length; // a chat chunk may hold several tokens
    const parts = [`${count} tokens`];
    if (first !== null) parts.unshift(`time to first token ${Math.round(first - started)} ms`);
    if (count > 1 && last > first) parts.push(`${((count - 1) / ((last - first) / 1000)).toFixed(1)} tokens/s`);
    if (finish) parts.push(finish);
    stats.replaceChildren(...parts.flatMap((part, i) => [...(i ? [" · "] : []), cell("span", part, { className: "stat" })]));
  };
  try {
    column.request = request(column, s);
    const response = await api(column.request.path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(column.request.body),
      signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    column.combination = response.headers.get("x-adapters") ?? "";
    showCombination(column);
    const chat = column.request.path !== "/generate_stream";
    for await (const event of serverSentEvents(response.body)) {
      const problem = messageOf(event);
      if (problem) throw new Error(problem);
      if (chat) {
        usage = event.usage ?? usage;
        const choice = event.choices?.[0];
        if (!choice) continue;
        const text = readDelta(choice.delta ?? {}, calls);
        if (choice.finish_reason) finish = choice.finish_reason;
        if (!text && !choice.finish_reason) continue;
        if (text) appendText(column, text);
      } else {
        appendToken(column, event.token, event.top_tokens);
        if (event.generated_text !== null) finish = event.details?.finish_reason ?? "done";
      }
      last = performance.now();
      first ??= last;
      show();
    }
    showParsed(column, finish, calls);
    view.dataset.state = "done";
  } catch (error) {
    view.dataset.state = error.name === "AbortError" ? "stopped" : "error";
    stats.textContent = error.name === "AbortError" ? "stopped" : `error: ${error.message}`;
    if (error instanceof Unauthorized) askForKey(error.message);
  } finally {
    if (column.controller === controller) {
      column.controller = null;
      live.forEach((region) => region.removeAttribute("aria-busy"));
    }
  }
}

// a chat chunk's text (content, then each call's arguments as written), the calls gathered by index
function readDelta(delta, calls) {
  let text = delta.content ?? "";
  for (const part of delta.tool_calls ?? []) {
    const call = (calls[part.index ?? 0] ??= { name: null, arguments: "" });
    call.name = part.function?.name ?? call.name;
    call.arguments += part.function?.arguments ?? "";
    text += part.function?.arguments ?? "";
  }
  return text;
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
      if (data && data !== "[DONE]") yield JSON.parse(data);
    }
  }
}

// --- what a constrained column wrote: parsed, and checked against its schema, regex or tool

// judged by what the column sent (its output mode may have been changed since)
function showParsed(column, finish, calls) {
  const { view, request: sent } = column;
  const { mode } = sent;
  const text = $(".output", view).textContent;
  const cut = finish === "length" ? " It was cut at max tokens: raise Max tokens." : "";
  const box = $(".parsed", view);
  const verdict = (ok, message) => cell("p", message, { className: `verdict ${ok === null ? "note" : ok ? "valid" : "invalid"}` });
  const judged = ([ok, message]) => verdict(ok, ok ? message : `${message}${cut}`);
  let parts = [];
  if (mode.kind === "json") {
    const parsed = parseValue(text);
    if (!parsed.ok) parts = [verdict(false, `Not JSON.${cut}`)];
    else parts = [judged(checked(parsed.value, sent.body.parameters.grammar.value, "the schema")), cell("pre", pretty(parsed.value))];
  } else if (mode.kind === "regex") {
    let matches = null;
    try {
      matches = new RegExp(`^(?:${mode.regex})$`, "u").test(text);
    } catch {
      parts = [verdict(false, "This browser cannot read the regex to check the text.")];
    }
    if (matches !== null) parts = [verdict(matches, matches ? "Matches the regex." : `Does not match the regex.${cut}`)];
  } else if (mode.kind === "tool") {
    const tool = sent.body.tools[0].function;
    parts = calls.filter(Boolean).flatMap((call) => {
      const args = parseValue(call.arguments);
      const title = cell("p", null, { className: "call" });
      title.append("Call ", cell("code", call.name ?? "?"));
      if (call.name !== tool.name) return [title, verdict(false, `${call.name} is not the listed function ${tool.name}.`)];
      if (!args.ok) return [title, verdict(false, `Its arguments are not JSON.${cut}`)];
      return [title, judged(checked(args.value, tool.parameters ?? {}, `${tool.name}'s parameters`)), cell("pre", pretty(args.value))];
    });
    if (!parts.length && mode.choice === "auto") parts = [verdict(null, `No tool call: the model answered with text, as tool_choice auto allows.${cut}`)];
    else if (!parts.length && cut) parts = [verdict(false, `No tool call: it was cut at max tokens before the call was complete (the server sends a call whole): raise Max tokens.`)];
    else if (!parts.length) parts = [verdict(false, "No tool call: the model answered with text.")];
  }
  box.replaceChildren(...parts);
  box.hidden = !parts.length;
}

function parseValue(text) {
  try {
    return { ok: true, value: JSON.parse(text) };
  } catch {
    return { ok: false };
  }
}

function checked(value, schema, what) {
  const unchecked = new Set();
  const problems = validate(value, schema, "$", unchecked);
  const skipped = unchecked.size ? ` (not checked here: ${[...unchecked].join(", ")})` : "";
  return problems.length
    ? [false, `Does not validate against ${what}: ${problems.join("; ")}.${skipped}`]
    : [true, `Valid against ${what}.${skipped}`];
}

// JSON Schema's common keywords, enough for the page to say whether an answer validates; others are named, not checked
const CHECKED = new Set(["type", "enum", "const", "properties", "required", "additionalProperties", "items", "minimum",
  "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
  "anyOf", "oneOf", "allOf", "title", "description", "default", "examples", "$schema"]);

function validate(value, schema, path, unchecked) {
  if (schema === false) return [`${path} is not allowed`];
  if (schema === null || typeof schema !== "object") return [];
  for (const key of Object.keys(schema)) if (!CHECKED.has(key)) unchecked.add(key);
  const problems = [];
  const type = typeOf(value);
  const types = schema.type === undefined ? null : [].concat(schema.type);
  if (types && !types.some((t) => t === type || (t === "number" && type === "integer"))) problems.push(`${path} is ${type}, not ${types.join(" or ")}`);
  const same = (a) => JSON.stringify(a) === JSON.stringify(value);
  if (Array.isArray(schema.enum) && !schema.enum.some(same)) problems.push(`${path} is not one of ${JSON.stringify(schema.enum)}`);
  if ("const" in schema && !same(schema.const)) problems.push(`${path} is not ${JSON.stringify(schema.const)}`);
  if (type === "string") {
    const length = [...value].length;
    if (length < (schema.minLength ?? 0)) problems.push(`${path} is shorter than ${schema.minLength}`);
    if (length > (schema.maxLength ?? Infinity)) problems.push(`${path} is longer than ${schema.maxLength}`);
    if (typeof schema.pattern === "string") {
      try {
        if (!new RegExp(schema.pattern, "u").test(value)) problems.push(`${path} does not match ${schema.pattern}`);
      } catch {
        unchecked.add("pattern");
      }
    }
  }
  if (type === "number" || type === "integer") {
    if (value < (schema.minimum ?? -Infinity)) problems.push(`${path} is below ${schema.minimum}`);
    if (value > (schema.maximum ?? Infinity)) problems.push(`${path} is above ${schema.maximum}`);
    if (typeof schema.exclusiveMinimum === "number" && value <= schema.exclusiveMinimum) problems.push(`${path} is not above ${schema.exclusiveMinimum}`);
    if (typeof schema.exclusiveMaximum === "number" && value >= schema.exclusiveMaximum) problems.push(`${path} is not below ${schema.exclusiveMaximum}`);
  }
  if (type === "object") {
    const properties = schema.properties ?? {};
    for (const name of schema.required ?? []) if (!(name in value)) problems.push(`${path}.${name} is missing`);
    for (const [name, item] of Object.entries(value)) {
      const where = `${path}.${name}`;
      if (name in properties) problems.push(...validate(item, properties[name], where, unchecked));
      else if (schema.additionalProperties === false) problems.push(`${where} is not allowed`);
      else problems.push(...validate(item, schema.additionalProperties, where, unchecked));
    }
  }
  if (type === "array") {
    if (value.length < (schema.minItems ?? 0)) problems.push(`${path} has fewer than ${schema.minItems} items`);
    if (value.length > (schema.maxItems ?? Infinity)) problems.push(`${path} has more than ${schema.maxItems} items`);
    value.forEach((item, i) => problems.push(...validate(item, schema.items, `${path}[${i}]`, unchecked)));
  }
  const passing = (list) => (Array.isArray(list) ? list.filter((s) => !validate(value, s, path, unchecked).length).length : null);
  if (Array.isArray(schema.allOf) && passing(schema.allOf) !== schema.allOf.length) problems.push(`${path} fails allOf`);
  if (Array.isArray(schema.anyOf) && passing(schema.anyOf) === 0) problems.push(`${path} fails anyOf`);
  if (Array.isArray(schema.oneOf) && passing(schema.oneOf) !== 1) problems.push(`${path} fails oneOf`);
  return problems;
}

function typeOf(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "array";
  if (typeof value === "number") return Number.isInteger(value) ? "integer" : "number";
  return typeof value; // string, boolean, object
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

// a chat answer's text: no per-token details on this route
function appendText(column, text) {
  column.tokens.push(null);
  $(".output", column.view).append(text);
}

// --- copy as curl / Python: the column as shown (its adapters, weights and mode, the page's settings)

function showSnippet(column, format) {
  const box = $(".snippet", column.view);
  let text;
  let changed = false;
  try {
    const shown = request(column, settings());
    changed = column.request !== null && JSON.stringify(shown.body) !== JSON.stringify(column.request.body);
    const chat = shown.path !== "/generate_stream";
    const write = { curl: curlSnippet, openai: chat ? openaiChatSnippet : openaiSnippet, hub: chat ? hubChatSnippet : hubSnippet }[format];
    text = write(shown);
  } catch (error) {
    text = `Cannot write this request: ${error.message}`;
  }
  $("code", box).textContent = text;
  box.dataset.format = format;
  box.hidden = false;
  const copied = $(".copied", box);
  const stale = changed ? "The column changed since it generated: this is the request Generate sends now. " : "";
  copied.textContent = `${stale}Select the text to copy it.`;
  navigator.clipboard?.writeText(text).then(
    () => (copied.textContent = `${stale}Copied to the clipboard.`),
    () => {},
  );
}

const shell = (text) => `'${text.replaceAll("'", `'\\''`)}'`;

// a Python literal of a JSON value (a JSON string or number is one already)
function py(value) {
  if (value === null || value === undefined) return "None";
  if (typeof value === "boolean") return value ? "True" : "False";
  if (Array.isArray(value)) return `[${value.map(py).join(", ")}]`;
  if (typeof value === "object") return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${py(v)}`).join(", ")}}`;
  return JSON.stringify(value);
}

function curlSnippet({ path, body }) {
  const lines = [`curl -sN ${location.origin}${path}`, "  -H 'Content-Type: application/json'"];
  if (page.key) lines.push('  -H "Authorization: Bearer $MIXSERVE_API_KEY"');
  lines.push(`  -d ${shell(JSON.stringify(body))}`);
  return lines.join(" \\\n");
}

function pythonKey() {
  return page.key ? ["import os", 'os.environ["MIXSERVE_API_KEY"]'] : [null, '"none"'];
}

function openaiClient() {
  const [imports, key] = pythonKey();
  return [...(imports ? [imports] : []), "from openai import OpenAI", "", `client = OpenAI(base_url=${py(`${location.origin}/v1`)}, api_key=${key})`];
}

// vLLM's extra fields carry a column's constraint on /v1/completions
function guided(grammar) {
  if (!grammar) return [];
  return [`extra_body=${py({ [grammar.type === "json" ? "guided_json" : "guided_regex"]: grammar.value })}`];
}

function openaiSnippet({ body, spec }) {
  const p = body.parameters;
  const args = [
    `model=${py(spec || page.info.model_id)}`,
    `prompt=${py(body.inputs)}`,
    `max_tokens=${p.max_new_tokens}`,
    `temperature=${p.temperature ?? 0}`,
    ...(p.seed != null ? [`seed=${p.seed}`] : []),
    `logprobs=${p.top_n_tokens}`,
    ...guided(p.grammar),
    "stream=True",
  ];
  return [
    ...openaiClient(),
    "stream = client.completions.create(",
    ...args.map((a) => `    ${a},`),
    ")",
    "for chunk in stream:",
    "    if chunk.choices:",
    '        print(chunk.choices[0].text, end="", flush=True)',
    "print()",
  ].join("\n");
}

function chatArguments({ body, spec }) {
  return [
    `model=${py(spec || page.info.model_id)}`,
    `messages=${py(body.messages)}`,
    `tools=${py(body.tools)}`,
    `tool_choice=${py(body.tool_choice)}`,
    `max_tokens=${body.max_tokens}`,
    `temperature=${body.temperature}`,
    ...(body.seed != null ? [`seed=${body.seed}`] : []),
    "stream=True",
  ];
}

// both clients stream a chat answer alike: its text, then each call's arguments as written
const CHAT_LOOP = [
  "    if not chunk.choices:",
  "        continue",
  "    delta = chunk.choices[0].delta",
  '    print(delta.content or "", end="")',
  "    for call in delta.tool_calls or []:",
  '        print(call.function.arguments or "", end="", flush=True)',
  "print()",
];

function openaiChatSnippet(sent) {
  return [
    ...openaiClient(),
    "stream = client.chat.completions.create(",
    ...chatArguments(sent).map((a) => `    ${a},`),
    ")",
    "for chunk in stream:",
    ...CHAT_LOOP,
  ].join("\n");
}

function hubChatSnippet(sent) {
  const [imports, key] = pythonKey();
  return [
    ...(imports ? [imports] : []),
    "from huggingface_hub import InferenceClient",
    "",
    `client = InferenceClient(base_url=${py(location.origin)}, api_key=${key})`,
    "for chunk in client.chat_completion(",
    ...chatArguments(sent).map((a) => `    ${a},`),
    "):",
    ...CHAT_LOOP,
  ].join("\n");
}

function hubSnippet({ body, spec }) {
  const p = body.parameters;
  const [imports, key] = pythonKey();
  const args = [
    py(body.inputs),
    ...(spec ? [`adapter_id=${py(spec)}`] : []),
    `max_new_tokens=${p.max_new_tokens}`,
    ...(p.temperature ? [`temperature=${p.temperature}`] : []),
    ...(p.seed != null ? [`seed=${p.seed}`] : []),
    ...(p.grammar ? [`grammar=${py(p.grammar)}`] : []),
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

// --- the page's state in the URL (#state=...): prompt, parameters, merges, columns with weights and modes

function saveState() {
  if (page.shared || !page.columns.length) return; // a shared link not yet restored stays as it is
  const s = settings();
  const state = {
    prompt: s.prompt,
    max_tokens: s.maxTokens,
    temperature: s.temperature,
    seed: s.seed,
    merges: page.merges,
    columns: page.columns.map(({ entries, mode }) => ({
      adapters: entries.map((e) => [e.name, e.weight]),
      mode: { kind: mode.kind, ...MODE_FIELDS[mode.kind].reduce((kept, key) => ({ ...kept, [key]: mode[key] }), {}) },
    })),
  };
  page.savedHash = `#${new URLSearchParams({ state: JSON.stringify(state) })}`;
  history.replaceState(null, "", page.savedHash);
}

const MODE_FIELDS = { text: [], json: ["schema"], regex: ["regex"], tool: ["tool", "choice"] };
const TOOL_CHOICES = ["named", "required", "auto"]; // the column's tool_choice options

function readShared() {
  const text = new URLSearchParams(location.hash.slice(1)).get("state");
  if (!text) return null;
  try {
    const state = JSON.parse(text);
    return state && typeof state === "object" && Array.isArray(state.columns) && state.columns.length ? state : null;
  } catch {
    return null;
  }
}

// what a shared link holds, read as untrusted: anything malformed is left at its default
function restore(state) {
  if (typeof state.prompt === "string") $("#prompt").value = state.prompt;
  if (Number.isInteger(state.max_tokens) && state.max_tokens >= 1) $("#max-tokens").value = state.max_tokens;
  if (Number.isFinite(state.temperature) && state.temperature >= 0) $("#temperature").value = state.temperature;
  $("#seed").value = Number.isInteger(state.seed) && state.seed >= 0 ? state.seed : "";
  page.merges = (Array.isArray(state.merges) ? state.merges : []).filter((n) => typeof n === "string" && MERGE_FORM.test(n));
  page.columns = state.columns.slice(0, MAX_COLUMNS).map((shared) => {
    const listed = Array.isArray(shared?.adapters) ? shared.adapters : [];
    const entries = listed.filter((e) => Array.isArray(e) && typeof e[0] === "string" && validWeight(e[1]));
    const mode = defaultMode();
    const given = shared?.mode ?? {};
    if (Object.hasOwn(MODE_FIELDS, given.kind)) mode.kind = given.kind;
    for (const key of MODE_FIELDS[mode.kind]) if (typeof given[key] === "string") mode[key] = given[key];
    if (!TOOL_CHOICES.includes(mode.choice)) mode.choice = defaultMode().choice;
    return newColumn(entries.map(([name, weight]) => ({ name, weight })), mode);
  });
}

async function copyLink() {
  saveState();
  const note = $("#share-note");
  try {
    await navigator.clipboard.writeText(location.href);
    note.textContent = "Link copied: it opens this comparison.";
  } catch {
    note.textContent = "The address bar holds the link to this comparison.";
  }
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
$("#merge-method").append(...MERGE_METHODS.map((m) => cell("option", m, { value: m, selected: m === "ties" })));
$("#sweep-form").addEventListener("submit", sweep);
$("#merge-form").addEventListener("submit", addMerge);
$("#merge-method").addEventListener("change", renderMerge);
$("#share").addEventListener("click", copyLink);
for (const type of ["input", "change"]) $("#generate-form").addEventListener(type, saveState);
$("#generate-form").addEventListener("submit", (event) => generate(event).catch(failed));
$("#stop").addEventListener("click", () => stopColumns(page.columns));
window.addEventListener("hashchange", followLink);
$("#tab-compare").addEventListener("click", () => showTab("compare"));
$("#tab-operator").addEventListener("click", () => showTab("operator"));
$(".tabs").addEventListener("keydown", tabKeys);
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && !$("#view-operator").hidden) pollOperator();
  else clearTimeout(page.operatorTimer);
});
connect().catch(failed);
