"use strict";
// A small Markdown renderer for the chat's answers: fenced code, headings,
// lists, quotes, rules and paragraphs; code spans, bold, italic and links.
// All text is HTML-escaped before any tag is made, and links keep to
// http(s) and mailto, so a model's answer cannot inject markup or script.
(function () {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const BLOCK_START = /^\s*(```|~~~|#{1,6}\s|>|[-*+]\s|\d+[.)]\s)/;

  function escapeHtml(s) {
    return s.replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  function inline(text) {
    const codes = [];
    // Code spans first, out of reach of the other rules (NUL never reaches here).
    let s = text.replace(/`([^`\n]+)`/g, (_, code) => `\u0000${codes.push(code) - 1}\u0000`);
    s = escapeHtml(s);
    s = s.replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (whole, label, url) =>
      /^(https?:|mailto:)/i.test(url) ? `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>` : whole,
    );
    s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>").replace(/__([^_\n]+)__/g, "<strong>$1</strong>");
    s = s.replace(/\*([^*\s][^*\n]*?)\*/g, "<em>$1</em>").replace(/(^|[^\w])_([^_\s][^_\n]*?)_(?!\w)/g, "$1<em>$2</em>");
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${escapeHtml(codes[Number(i)])}</code>`);
  }

  function list(lines, i, out) {
    const ordered = /^\s*\d/.test(lines[i]);
    const item = ordered ? /^\s*\d+[.)]\s+(.*)$/ : /^\s*[-*+]\s+(.*)$/;
    const items = [];
    let m;
    while (i < lines.length && (m = lines[i].match(item))) {
      items.push(m[1]);
      i++;
      while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !item.test(lines[i])) {
        items[items.length - 1] += " " + lines[i++].trim(); // an item's continued line
      }
    }
    const tag = ordered ? "ol" : "ul";
    out.push(`<${tag}>${items.map((t) => `<li>${inline(t)}</li>`).join("")}</${tag}>`);
    return i;
  }

  function render(src) {
    const lines = src.replace(/\u0000/g, "").replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if ((m = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)/))) {
        // A fence still open (an answer being streamed) runs to the end.
        const fence = m[1];
        const body = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith(fence); i++) body.push(lines[i]);
        i++;
        const lang = m[2] ? ` class="language-${escapeHtml(m[2])}"` : "";
        out.push(`<pre><code${lang}>${escapeHtml(body.join("\n"))}</code></pre>`);
      } else if (!line.trim()) {
        i++;
      } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
        out.push(`<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`);
        i++;
      } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
        out.push("<hr>");
        i++;
      } else if (/^\s*>/.test(line)) {
        const body = [];
        while (i < lines.length && /^\s*>/.test(lines[i])) body.push(lines[i++].replace(/^\s*>\s?/, ""));
        out.push(`<blockquote>${render(body.join("\n"))}</blockquote>`);
      } else if (/^\s*([-*+]|\d+[.)])\s+/.test(line)) {
        i = list(lines, i, out);
      } else {
        const para = [lines[i++]];
        while (i < lines.length && lines[i].trim() && !BLOCK_START.test(lines[i])) para.push(lines[i++]);
        out.push(`<p>${para.map(inline).join("<br>")}</p>`);
      }
    }
    return out.join("\n");
  }

  window.renderMarkdown = render;
})();
