// The web chat: streams /v1/chat/completions (fetch + ReadableStream SSE parsing), keeps the
// multi-turn history in memory, and renders replies with the local markdown renderer. With the
// interpreter toggle on, turns go to /v1/agent/chat and its agent events are rendered instead.
// No external resources: the page must work on machines without internet access.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const els = {
    messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"),
    clear: $("clear"), system: $("system"), temperature: $("temperature"),
    topP: $("top-p"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
    settings: $("settings"), settingsToggle: $("settings-toggle"), status: $("status"),
    modelName: $("model-name"), interpreterRow: $("interpreter-row"),
    interpreter: $("interpreter"), composer: $("composer"),
  };
  const KEY_STORE = "internlm2.apiKey";
  const state = { model: null, history: [], controller: null, features: {}, agentSession: null };

  // -- settings ---------------------------------------------------------------------------
  els.apiKey.value = localStorage.getItem(KEY_STORE) || "";
  els.apiKey.addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, els.apiKey.value.trim());
    loadModel();
  });
  for (const [input, out] of [[els.temperature, $("temperature-value")], [els.topP, $("top-p-value")]]) {
    const show = () => { out.textContent = input.value; };
    input.addEventListener("input", show);
    show();
  }
  els.settingsToggle.addEventListener("click", () => {
    const open = els.settings.hidden;
    els.settings.hidden = !open;
    els.settingsToggle.setAttribute("aria-expanded", String(open));
  });

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = els.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function setStatus(text) { els.status.textContent = text || ""; }

  async function loadModel() {
    try {
      const health = await (await fetch("/health")).json();
      state.model = health.model;
      state.features = health.features || {};
      els.modelName.textContent = health.model || "";
      // The interpreter needs the agent integration on the server; hidden until it says so.
      els.interpreterRow.hidden = !state.features.interpreter;
      // Leave room for the conversation within the session: at most half of it by default.
      const cap = Math.min(health.max_tokens_limit || Infinity,
                           health.session_len ? Math.floor(health.session_len / 2) : Infinity);
      if (Number.isFinite(cap)) {
        els.maxTokens.max = health.max_tokens_limit || cap;
        if (Number(els.maxTokens.value) > cap) els.maxTokens.value = cap;
      }
      if (health.auth && !els.apiKey.value.trim()) {
        setStatus("This server needs an API key: open Settings.");
      }
    } catch (e) {
      setStatus("Cannot reach the server: " + e.message);
    }
  }

  // -- rendering --------------------------------------------------------------------------
  function scrollDown() { els.messages.scrollTop = els.messages.scrollHeight; }

  function addBubble(role, cls) {
    const div = document.createElement("div");
    div.className = "msg " + (cls || role);
    const label = document.createElement("div");
    label.className = "role";
    label.textContent = role;
    const content = document.createElement("div");
    content.className = "content";
    const tools = document.createElement("div");
    tools.className = "tools";
    div.append(label, content, tools);
    els.messages.append(div);
    scrollDown();
    return { div, content, tools };
  }

  function toolBlock(title, body) {
    const d = document.createElement("details");
    d.className = "tool";
    const s = document.createElement("summary");
    s.textContent = title;
    const pre = document.createElement("pre");
    pre.textContent = body;
    d.append(s, pre);
    return d;
  }

  function prettyJson(text) {
    try { return JSON.stringify(JSON.parse(text), null, 2); } catch (e) { return text; }
  }

  // Action blocks the server returns as text (a request without `tools`, or the interpreter)
  // are shown as collapsible blocks too; the rest of the text goes through markdown.
  const ACTION_RE = /<\|action_start\|>\s*<\|(plugin|interpreter)\|>\n?([\s\S]*?)(?:<\|action_end\|>|$)/g;

  function renderContent(el, text) {
    el.replaceChildren();
    let pos = 0;
    let m;
    const addText = (t) => {
      if (!t.trim()) return;
      const div = document.createElement("div");
      div.innerHTML = Markdown.render(t);
      el.append(...div.childNodes);
    };
    ACTION_RE.lastIndex = 0;
    while ((m = ACTION_RE.exec(text)) !== null) {
      addText(text.slice(pos, m.index));
      if (m[1] === "plugin") {
        let name = "?";
        try { name = JSON.parse(m[2]).name || "?"; } catch (e) { /* still streaming */ }
        el.append(toolBlock("Tool call: " + name, prettyJson(m[2].trim())));
      } else {
        el.append(toolBlock("Code (interpreter)", m[2].trim()));
      }
      pos = ACTION_RE.lastIndex;
      if (m[0].length === 0) break;
    }
    addText(text.slice(pos));
  }

  function renderToolCalls(box, calls) {
    box.replaceChildren(...calls.filter(Boolean).map((c) =>
      toolBlock("Tool call: " + (c.name || "?"), prettyJson(c.arguments || ""))));
  }

  function showMessage(msg) {
    if (msg.role === "tool") {
      const b = addBubble("tool result", "assistant");
      b.content.append(toolBlock("Result" + (msg.name ? " of " + msg.name : ""), msg.content || ""));
      return;
    }
    const b = addBubble(msg.role);
    if (msg.role === "user") b.content.textContent = msg.content;
    else renderContent(b.content, msg.content || "");
    if (msg.tool_calls) {
      renderToolCalls(b.tools, msg.tool_calls.map((c) => c.function));
    }
  }

  els.messages.addEventListener("click", (ev) => {
    const btn = ev.target.closest("button.copy");
    if (!btn) return;
    const code = btn.parentElement.querySelector("code").textContent;
    const done = () => { btn.textContent = "Copied"; setTimeout(() => { btn.textContent = "Copy"; }, 1200); };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(code).then(done, () => fallbackCopy(code, done));
    } else {
      fallbackCopy(code, done);
    }
  });

  function fallbackCopy(text, done) {
    const ta = document.createElement("textarea");
    ta.value = text;
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.append(ta);
    ta.select();
    try { document.execCommand("copy"); done(); } catch (e) { /* nothing more to try */ }
    ta.remove();
  }

  // -- streaming --------------------------------------------------------------------------
  // Yields each JSON event of a server-sent-event body; stops at [DONE].
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  function setBusy(busy) {
    document.body.dataset.state = busy ? "streaming" : "idle";
    els.send.disabled = busy;
    els.stop.disabled = !busy;
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    return resp.status + " " + resp.statusText;
  }

  // -- the agent (code interpreter) -------------------------------------------------------
  // Only PNG data: URLs or same-origin paths become <img> sources; anything else is dropped.
  function safeImageUrl(u) {
    if (typeof u !== "string") return null;
    if (/^data:image\/png;base64,[A-Za-z0-9+/=]+$/.test(u)) return u;
    if (/^\/v1\/agent\/files\/[A-Za-z0-9_-]+\/[A-Za-z0-9._-]+$/.test(u)) return u;
    return null;
  }

  // Renders /v1/agent/chat events into one assistant bubble: streamed words (markdown), code
  // and tool calls as collapsible blocks, results with their figures, the final answer.
  function agentView(bubble) {
    let cur = null;  // { step, el, text }: the words of the current step
    let final = null;
    const textEl = (step) => {
      if (!cur || cur.step !== step) {
        const el = document.createElement("div");
        el.className = "agent-text";
        bubble.content.append(el);
        cur = { step, el, text: "" };
      }
      return cur;
    };
    const note = (cls, text) => {
      const div = document.createElement("div");
      div.className = cls;
      div.textContent = text;
      bubble.content.append(div);
    };
    return {
      get final() { return final; },
      event(ev) {
        if (ev.type === "text") {
          const t = textEl(ev.step);
          t.text += ev.text || "";
          t.el.innerHTML = Markdown.render(t.text);  // markdown.js escapes the text
        } else if (ev.type === "action") {
          const block = ev.code != null
            ? toolBlock("Code (interpreter)", ev.code)
            : toolBlock("Tool call: " + (ev.name || "?"), JSON.stringify(ev.arguments || {}, null, 2));
          block.classList.add("code-action");
          block.open = true;
          bubble.content.append(block);
          cur = null;
        } else if (ev.type === "result") {
          const box = document.createElement("div");
          box.className = "agent-result";
          let body = ev.text || "";
          if (ev.name === "interpreter" && ev.stdout !== undefined) {
            body = [ev.stdout, ev.stderr, ev.value, ev.error].filter((x) => x)
              .map((x) => String(x).replace(/\n$/, "")).join("\n") || "(no output)";
            if (ev.timed_out) body += "\n[timed out]";
          }
          const block = toolBlock("Result" + (ev.name ? " of " + ev.name : ""), body);
          block.open = true;
          box.append(block);
          for (const im of ev.images || []) {
            const src = safeImageUrl(im.url) || safeImageUrl(im.path);
            if (!src) continue;
            const img = document.createElement("img");
            img.src = src;
            img.alt = im.name || "figure";
            box.append(img);
          }
          bubble.content.append(box);
          cur = null;
        } else if (ev.type === "error") {
          if (ev.fatal) throw new Error(ev.text || "server error");
          note("agent-note", ev.text || "");
          cur = null;
        } else if (ev.type === "final") {
          final = ev.text || "";
          if (ev.reason === "max_steps") {
            note("agent-note agent-final", final);
          } else if (cur && cur.step === ev.step) {
            cur.el.classList.add("agent-final");
          } else {
            const t = textEl(ev.step);
            t.text = final;
            t.el.innerHTML = Markdown.render(final);
            t.el.classList.add("agent-final");
          }
        }
      },
    };
  }

  async function sendAgent(messages, bubble) {
    const body = {
      messages, interpreter: true,
      temperature: Number(els.temperature.value), top_p: Number(els.topP.value),
    };
    const maxTokens = parseInt(els.maxTokens.value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    if (state.agentSession) body.session_id = state.agentSession;
    const view = agentView(bubble);
    let resp = await fetch("/v1/agent/chat", {
      method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (resp.status === 404 && body.session_id) {  // the session expired: start a fresh one
      state.agentSession = null;
      delete body.session_id;
      resp = await fetch("/v1/agent/chat", {
        method: "POST", headers: headers(), body: JSON.stringify(body),
        signal: state.controller.signal,
      });
    }
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const ev of sseEvents(resp)) {
      if (ev.type === "session") { state.agentSession = ev.session_id; continue; }
      view.event(ev);
      scrollDown();
    }
    return view.final;
  }

  async function send(text) {
    state.history.push({ role: "user", content: text });
    showMessage({ role: "user", content: text });
    const messages = [];
    const system = els.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.history);
    const body = {
      model: state.model, messages, stream: true,
      temperature: Number(els.temperature.value), top_p: Number(els.topP.value),
    };
    const maxTokens = parseInt(els.maxTokens.value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    const agent = Boolean(state.features.interpreter && els.interpreter.checked);

    const bubble = addBubble("assistant");
    bubble.content.classList.add("cursor");
    if (agent) {
      state.controller = new AbortController();
      setBusy(true);
      setStatus("");
      try {
        const final = await sendAgent(messages, bubble);
        if (final !== null) state.history.push({ role: "assistant", content: final });
      } catch (e) {
        if (e.name === "AbortError") setStatus("Stopped.");
        else addBubble("error", "error").content.textContent = e.message;
      } finally {
        state.controller = null;
        bubble.content.classList.remove("cursor");
        if (!bubble.content.childNodes.length) bubble.div.remove();
        setBusy(false);
        els.input.focus();
      }
      return;
    }
    let content = "";
    const calls = [];
    let finish = null;
    let pending = false;
    const paint = () => {
      pending = false;
      renderContent(bubble.content, content);
      renderToolCalls(bubble.tools, calls);
      scrollDown();
    };
    const schedule = () => { if (!pending) { pending = true; requestAnimationFrame(paint); } };

    state.controller = new AbortController();
    setBusy(true);
    setStatus("");
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body),
        signal: state.controller.signal,
      });
      if (!resp.ok) throw new Error(await errorText(resp));
      for await (const ev of sseEvents(resp)) {
        if (ev.error) throw new Error(ev.error.message || "server error");
        for (const ch of ev.choices || []) {
          const d = ch.delta || {};
          if (d.content) content += d.content;
          for (const tc of d.tool_calls || []) {
            const c = calls[tc.index] || (calls[tc.index] = { id: tc.id, name: "", arguments: "" });
            if (tc.id) c.id = tc.id;
            if (tc.function && tc.function.name) c.name = tc.function.name;
            if (tc.function && tc.function.arguments) c.arguments += tc.function.arguments;
          }
          if (ch.finish_reason) finish = ch.finish_reason;
        }
        schedule();
      }
      setStatus(finish === "length" ? "Stopped at the max tokens limit." : "");
    } catch (e) {
      if (e.name === "AbortError") {
        setStatus("Stopped.");
      } else {
        const err = addBubble("error", "error");
        err.content.textContent = e.message;
      }
    } finally {
      state.controller = null;
      bubble.content.classList.remove("cursor");
      paint();
      if (content || calls.length) {
        const msg = { role: "assistant", content: content };
        if (calls.length) {
          msg.tool_calls = calls.filter(Boolean).map((c) => ({
            id: c.id, type: "function", function: { name: c.name, arguments: c.arguments || "{}" },
          }));
        }
        state.history.push(msg);
      } else if (!bubble.content.textContent) {
        bubble.div.remove();
      }
      setBusy(false);
      els.input.focus();
    }
  }

  els.composer.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = els.input.value.trim();
    if (!text || state.controller) return;
    els.input.value = "";
    send(text);
  });
  els.input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      els.composer.requestSubmit();
    }
  });
  els.stop.addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  els.clear.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    state.agentSession = null;  // a new chat gets a fresh interpreter
    els.messages.replaceChildren();
    setStatus("");
  });

  window.internlm2Chat = { state, renderMarkdown: Markdown.render };
  setBusy(false);
  loadModel();
})();
