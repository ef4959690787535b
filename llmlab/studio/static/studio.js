// llmlab studio: posts forms with the session's CSRF token, draws the live and compared charts,
// streams chat replies. No inline scripts: the Content-Security-Policy allows only this file and plotly.js.
"use strict";

const csrf = () => (document.querySelector('meta[name="csrf"]') || {}).content || "";

function flash(text, isError) {
  const box = document.getElementById("flash");
  if (!box || !text) return;
  box.textContent = text;
  box.className = isError ? "flash error" : "flash";
  box.hidden = false;
}

async function post(url, body) {
  const reply = await fetch(url, {method: "POST", body, headers: {"X-CSRF-Token": csrf()}, credentials: "same-origin"});
  let data = {};
  try { data = await reply.json(); } catch (e) { data = {error: `${reply.status} ${reply.statusText}`}; }
  return {ok: reply.ok, data};
}

function showErrors(form, data) {
  form.querySelectorAll("[data-error-for]").forEach((el) => { el.textContent = ""; });
  const errors = data.errors || (data.field ? {[data.field]: data.error} : {});
  let placed = false;
  for (const [field, message] of Object.entries(errors)) {
    const slot = form.querySelector(`[data-error-for="${CSS.escape(field)}"]`);
    if (slot) { slot.textContent = message; placed = true; slot.scrollIntoView({block: "center"}); }
  }
  if (!placed && data.error) flash(data.error, true);
}

document.addEventListener("submit", async (event) => {
  const form = event.target;
  if (!form.hasAttribute("data-post")) return;
  event.preventDefault();
  if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
  const body = new FormData(form);
  if (event.submitter && event.submitter.name) body.set(event.submitter.name, event.submitter.value);
  const buttons = form.querySelectorAll("button");
  buttons.forEach((b) => { b.disabled = true; });
  try {
    // the attribute: a control named "action" (Configure's buttons) hides the form's .action property
    const {ok, data} = await post(form.getAttribute("action"), body);
    if (!ok) { showErrors(form, data); return; }
    showErrors(form, {});
    if (data.command !== undefined) {
      const out = document.getElementById("command");
      if (out) out.textContent = data.command;
    }
    if (data.message) sessionStorage.setItem("llmlab-flash", data.message);
    if (data.redirect) window.location.href = data.redirect;
    else if (data.message) { flash(data.message); sessionStorage.removeItem("llmlab-flash"); }
  } catch (e) {
    flash(`request failed: ${e}`, true);
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
});

// an upload goes as the request body, streamed to disk by the studio (no multipart spooling)
document.addEventListener("submit", async (event) => {
  const form = event.target;
  if (!form.hasAttribute("data-upload")) return;
  event.preventDefault();
  const file = form.querySelector("input[type=file]").files[0];
  if (!file) return;
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    const reply = await fetch(`${form.action}?name=${encodeURIComponent(file.name)}`, {
      method: "POST", body: file, headers: {"X-CSRF-Token": csrf(), "Content-Type": "application/octet-stream"}});
    let data = {};
    try { data = await reply.json(); } catch (e) { data = {error: `${reply.status} ${reply.statusText}`}; }
    if (!reply.ok) { showErrors(form, data); return; }
    if (data.message) sessionStorage.setItem("llmlab-flash", data.message);
    window.location.href = data.redirect || window.location.href;
  } catch (e) {
    flash(`upload failed: ${e}`, true);
  } finally {
    button.disabled = false;
  }
});

document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const text = document.querySelector(button.dataset.copy).textContent;
  navigator.clipboard.writeText(text).then(() => flash("copied"), () => flash("select the text and copy it", true));
});

// ------------------------------------------------------------------ charts

const layout = (title) => ({
  title: {text: title, font: {size: 13}, x: 0.02, xanchor: "left"}, margin: {l: 50, r: 10, t: 30, b: 40},
  height: 240, xaxis: {title: {text: "step"}}, showlegend: true,
  legend: {orientation: "h", x: 1, xanchor: "right", y: 1.02, yanchor: "bottom"},
});

function chart(id, traces, title) {
  const el = document.getElementById(id);
  if (!el || !window.Plotly) return null;
  Plotly.newPlot(el, traces.map((name) => ({x: [], y: [], name, mode: "lines"})), layout(title || el.dataset.title),
                 {displaylogo: false, responsive: true});
  return el;
}

function liveCharts() {
  const live = document.getElementById("live");
  if (!live || !window.Plotly) return;
  const maxSteps = Number(live.dataset.maxSteps) || 0;
  chart("chart-loss", ["train", "validation"]);
  chart("chart-ppl", ["validation"]);
  chart("chart-lr", ["lr"]);
  chart("chart-speed", ["tokens/s"]);
  chart("chart-eta", ["ETA"]);
  let points = 0;
  const source = new EventSource(live.dataset.events);
  source.addEventListener("metrics", (event) => {
    const add = {}, push = (id, trace, x, y) => {
      if (y === null || y === undefined) return;
      const key = `${id}/${trace}`;
      (add[key] = add[key] || {id, trace, x: [], y: []});
      add[key].x.push(x); add[key].y.push(y);
    };
    let step = null;
    for (const r of JSON.parse(event.data)) {
      if (r.step === undefined) continue;
      step = r.step;
      if (r.loss !== undefined) {
        push("chart-loss", 0, r.step, r.loss);
        push("chart-lr", 0, r.step, r.lr);
        push("chart-speed", 0, r.step, r.tokens_per_s);
        if (maxSteps && r.time && r.step) push("chart-eta", 0, r.step, (r.time / r.step) * (maxSteps - r.step) / 60);
        points += 1;
      }
      if (r.val_loss !== undefined && r.val_loss !== null) {
        push("chart-loss", 1, r.step, r.val_loss);
        push("chart-ppl", 0, r.step, Math.exp(r.val_loss));
      }
    }
    for (const {id, trace, x, y} of Object.values(add)) Plotly.extendTraces(id, {x: [x], y: [y]}, [trace]);
    document.getElementById("points").textContent = points;
    live.dataset.points = points;
    if (step !== null) document.getElementById("step").textContent = step.toLocaleString();
  });
  source.addEventListener("status", (event) => {
    const {status} = JSON.parse(event.data), el = document.getElementById("status");
    if (el && el.textContent !== status) {
      const was = el.textContent;
      el.textContent = status;
      el.className = `status ${status}`;
      if (was === "running" && status !== "running" && document.getElementById("stop")) window.location.reload();
    }
  });
  source.addEventListener("log", (event) => {
    const log = document.getElementById("log");
    if (!log) return;
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = JSON.parse(event.data);
    if (atEnd) log.scrollTop = log.scrollHeight;
  });
  source.addEventListener("end", () => source.close());
  source.addEventListener("gone", () => source.close());
}

function compareCharts() {
  const data = document.getElementById("compare-data");
  if (!data || !window.Plotly) return;
  const {runs, ids, curves} = JSON.parse(data.textContent);
  const traces = (key) => ids.map((id, i) => {
    const rows = (curves[id] || []).filter((r) => r[key] !== undefined && r[key] !== null);
    return {x: rows.map((r) => r.step), y: rows.map((r) => r[key]), name: runs[i], mode: "lines"};
  });
  for (const [id, key] of [["compare-loss", "loss"], ["compare-val", "val_loss"]]) {
    const el = document.getElementById(id);
    Plotly.newPlot(el, traces(key), layout(el.dataset.title), {displaylogo: false, responsive: true});
  }
}

// ------------------------------------------------------------------ chat

function chatPage() {
  const form = document.getElementById("chat-form");
  if (!form) return;
  const history = [], log = document.getElementById("chat-log");
  const bubble = (role, text) => {
    const el = document.createElement("div");
    el.className = `message ${role}`;
    el.textContent = text;
    log.appendChild(el);
    return el;
  };
  document.getElementById("chat-reset").addEventListener("click", () => { history.length = 0; log.textContent = ""; });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = form.querySelector("[name=message]");
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    history.push({role: "user", content: text});
    bubble("user", text);
    const reply = bubble("assistant", "");
    reply.classList.add("streaming");
    const body = new FormData(form);
    body.set("messages", JSON.stringify(history));
    const send = form.querySelector("button[type=submit]");
    send.disabled = true;
    try {
      const response = await fetch("/chat/stream", {method: "POST", body, headers: {"X-CSRF-Token": csrf()}});
      if (!response.ok) {
        let message = `${response.status}`;
        try { message = (await response.json()).error; } catch (e) { /* not JSON */ }
        reply.textContent = message; reply.classList.add("error"); history.pop(); return;
      }
      const reader = response.body.getReader(), decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          const kind = (block.match(/^event: (.*)$/m) || [])[1] || "message";
          const data = (block.match(/^data: (.*)$/m) || [])[1];
          if (data === undefined) continue;
          const payload = JSON.parse(data);
          if (kind === "token") reply.textContent += payload;
          else if (kind === "error") { reply.textContent += `\n[${payload}]`; reply.classList.add("error"); }
          else if (kind === "done") {
            reply.dataset.tokens = payload.tokens;
            if (!reply.textContent.trim()) reply.classList.add("empty");
          }
        }
      }
      history.push({role: "assistant", content: reply.textContent});
    } finally {
      reply.classList.remove("streaming");
      send.disabled = false;
    }
  });
}

function jobLog() {
  const log = document.getElementById("log");
  const every = log && Number(log.dataset.refresh);
  if (!every) return;
  const timer = setInterval(async () => {
    const reply = await fetch(`${window.location.pathname}/log`);
    if (!reply.ok) return;
    const data = await reply.json();
    log.textContent = data.log;
    log.scrollTop = log.scrollHeight;
    document.getElementById("job-status").textContent = data.status;
    if (!["queued", "running"].includes(data.status)) { clearInterval(timer); window.location.reload(); }
    // the run has registered: reload once, for the link to its page
    else if (data.run_id && !document.querySelector(`a[href="/runs/${data.run_id}"]`)) {
      clearInterval(timer); window.location.reload();
    }
  }, every * 1000);
}

window.addEventListener("DOMContentLoaded", () => {
  const message = sessionStorage.getItem("llmlab-flash");
  if (message) { flash(message); sessionStorage.removeItem("llmlab-flash"); }
  const log = document.getElementById("log");  // a log opens at its newest lines, and then follows them
  if (log) log.scrollTop = log.scrollHeight;
  liveCharts();
  compareCharts();
  chatPage();
  jobLog();
});
