// micro dashboard: the CSRF header on htmx requests, and the agent playground's streamed replies.
(function () {
  "use strict";
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

  document.addEventListener("htmx:configRequest", (e) => { e.detail.headers["X-CSRF-Token"] = csrf(); });

  function line(log, cls, text) {
    const div = document.createElement("div");
    div.className = cls;
    div.textContent = text;  // never innerHTML: replies and tool results are data
    log.appendChild(div);
    log.scrollTop = log.scrollHeight;
    return div;
  }
  const short = (v, n) => { const s = typeof v === "string" ? v : JSON.stringify(v); return s.length > n ? s.slice(0, n - 1) + "…" : s; };

  function show(log, state, ev, runLink) {
    const kind = ev.type;
    if (kind === "text") {
      if (!state.reply) state.reply = line(log, "reply-text", "");
      state.reply.textContent += ev.text || "";
    } else if (kind === "tool_start" || kind === "tool_end") {
      state.reply = null;
      const call = ev.tool_call || {};
      if (kind === "tool_start") line(log, "tool", "→ " + (call.name || "?") + "(" + short(call.input || "", 120) + ")");
      else line(log, call.is_error ? "result fail" : "result", (call.is_error ? "✗ " : "← ") + short(call.result || "", 200));
    } else if (kind === "paused" || kind === "input_required") {
      state.reply = null;
      const rsp = ev.response || {};
      for (const p of rsp.pending || []) {
        line(log, "waits", p.kind === "question" ? "? " + p.question : "⏸ " + p.tool + "(" + short(p.input || "", 120) + ") needs approval");
      }
      if (rsp.run_id) {
        const a = document.createElement("a");
        a.href = runLink + encodeURIComponent(rsp.run_id);
        a.textContent = "Decide on run " + rsp.run_id;
        a.className = "decide-link";
        log.appendChild(a);
      }
    } else if (kind === "error") {
      line(log, "fail", "error: " + (ev.text || ""));
    }
  }

  document.addEventListener("submit", async (e) => {
    const form = e.target.closest("form[data-stream]");
    if (!form) return;
    e.preventDefault();
    const log = document.getElementById(form.dataset.stream);
    const message = form.elements.message.value;
    if (!message.trim()) return;
    line(log, "you", "you: " + message);
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    const state = { reply: null };
    const runLink = form.action.replace(/\/ui\/agents\/([^/]+)\/chat$/, "/agents/$1/runs/");
    try {
      const rsp = await fetch(form.action, { method: "POST", body: new URLSearchParams(new FormData(form)),
                                             headers: { "X-CSRF-Token": csrf() }, credentials: "same-origin" });
      if (!rsp.ok) {
        let text = rsp.statusText;
        try { text = (await rsp.json()).error.message; } catch (_) { /* not JSON */ }
        line(log, "fail", "error: " + text);
        return;
      }
      const reader = rsp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const chunk = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let name = "message", data = "";
          for (const l of chunk.split("\n")) {
            if (l.startsWith("event: ")) name = l.slice(7);
            else if (l.startsWith("data: ")) data += l.slice(6);
          }
          if (!data) continue;
          const ev = JSON.parse(data);
          if (name === "error") line(log, "fail", "error: " + ev.error.message);
          else show(log, state, ev, runLink);
        }
      }
      form.elements.message.value = "";
      if (form.elements.session) {  // a reload (or the link) reopens this session with its earlier turns
        const url = new URL(window.location.href);
        url.searchParams.set("chat_session", form.elements.session.value);
        window.history.replaceState(null, "", url);
      }
    } catch (err) {
      line(log, "fail", "error: " + err);
    } finally {
      button.disabled = false;
      line(log, "done", "");
      log.dataset.turns = String(Number(log.dataset.turns || 0) + 1);
    }
  });
})();
