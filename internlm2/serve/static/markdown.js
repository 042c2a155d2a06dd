// A small, safe markdown renderer: every piece of text is HTML-escaped before any markup is
// added, so model output can never inject elements or attributes. Supports paragraphs,
// headings, bold/italic, inline code, fenced code blocks (with a copy button), lists and
// http(s)/mailto links. An unterminated fence (while streaming) renders as code so far.
(function (global) {
  "use strict";
  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  function escapeHtml(s) { return String(s).replace(/[&<>"']/g, (c) => ESC[c]); }

  // `s` is already escaped: markup added here only wraps escaped text.
  function formatEscaped(s) {
    s = s.replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (m, label, url) => {
      if (!/^(https?:\/\/|mailto:)/i.test(url)) return m;
      return '<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + label + "</a>";
    });
    s = s.replace(/\*\*([^*\n]+?)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^*\w])\*([^*\n]+?)\*(?!\w)/g, "$1<em>$2</em>");
    return s;
  }

  function inline(text) {
    let out = "";
    for (const part of String(text).split(/(`[^`\n]+`)/g)) {
      if (part.length > 2 && part[0] === "`" && part[part.length - 1] === "`") {
        out += "<code>" + escapeHtml(part.slice(1, -1)) + "</code>";
      } else {
        out += formatEscaped(escapeHtml(part));
      }
    }
    return out;
  }

  function codeBlock(lang, code) {
    const label = lang ? '<span class="lang">' + escapeHtml(lang) + "</span>" : "";
    return '<div class="code">' + label +
      '<button type="button" class="copy">Copy</button><pre><code>' +
      escapeHtml(code) + "</code></pre></div>";
  }

  const LIST_RE = /^\s*([-*+]|\d+[.)])\s+(.*)$/;

  function render(md) {
    const lines = String(md || "").replace(/\r\n?/g, "\n").split("\n");
    const html = [];
    let para = [];
    const flush = () => {
      if (para.length) html.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flush();
        const code = [];
        let j = i + 1;
        while (j < lines.length && !lines[j].trim().startsWith(fence[1])) code.push(lines[j++]);
        html.push(codeBlock(fence[2], code.join("\n")));
        i = j;
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      if (heading) {
        flush();
        const n = heading[1].length;
        html.push("<h" + n + ">" + inline(heading[2]) + "</h" + n + ">");
        continue;
      }
      const item = line.match(LIST_RE);
      if (item) {
        flush();
        const ordered = /\d/.test(item[1]);
        const tag = ordered ? "ol" : "ul";
        const items = [];
        let j = i;
        while (j < lines.length) {
          const m = lines[j].match(LIST_RE);
          if (m && /\d/.test(m[1]) === ordered) { items.push(m[2]); j++; continue; }
          // a non-blank, non-list line right after an item continues it
          if (lines[j].trim() && !lines[j].match(LIST_RE) && /^\s+/.test(lines[j]) && items.length) {
            items[items.length - 1] += " " + lines[j].trim(); j++; continue;
          }
          break;
        }
        html.push("<" + tag + ">" + items.map((t) => "<li>" + inline(t) + "</li>").join("") + "</" + tag + ">");
        i = j - 1;
        continue;
      }
      if (!line.trim()) { flush(); continue; }
      para.push(line);
    }
    flush();
    return html.join("");
  }

  global.Markdown = { render: render, escapeHtml: escapeHtml };
})(window);
