// A small Markdown renderer for model answers. Safety rule: every piece of model text is
// HTML-escaped first; the only tags in the output are the ones built here.
"use strict";

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// Inline spans of one escaped line: `code`, **bold**, *italic*, [text](http(s) link).
function renderInline(escaped) {
  const codes = [];
  let s = escaped.replace(/`([^`]+)`/g, (_, c) => {
    codes.push("<code>" + c + "</code>");
    return "\u0000" + (codes.length - 1) + "\u0000";
  });
  s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g,
      '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => codes[Number(i)]);
}

// Block structure of a text segment (no code fences inside): headings, lists, paragraphs.
function renderBlocks(text) {
  const out = [];
  let para = [];
  let list = null; // {tag, items}
  const flushPara = () => {
    if (para.length) out.push("<p>" + para.map(renderInline).join("<br>") + "</p>");
    para = [];
  };
  const flushList = () => {
    if (list) out.push("<" + list.tag + ">" + list.items.map((i) => "<li>" + renderInline(i) + "</li>").join("") + "</" + list.tag + ">");
    list = null;
  };
  for (const raw of escapeHtml(text).split("\n")) {
    const line = raw.trimEnd();
    let m;
    if (!line.trim()) { flushPara(); flushList(); continue; }
    if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) {
      flushPara(); flushList();
      out.push("<h" + m[1].length + ">" + renderInline(m[2]) + "</h" + m[1].length + ">");
    } else if ((m = /^\s*[-*+]\s+(.*)$/.exec(line)) || (m = /^\s*\d+[.)]\s+(.*)$/.exec(line))) {
      flushPara();
      const tag = /^\s*\d/.test(line) ? "ol" : "ul";
      if (list && list.tag !== tag) flushList();
      if (!list) list = { tag, items: [] };
      list.items.push(m[1]);
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara(); flushList();
  return out.join("");
}

// Markdown to HTML; an unclosed code fence (an answer still streaming) renders as code so far.
function renderMarkdown(text) {
  const out = [];
  const fence = /```([\w+.-]*)[^\n]*\n?([\s\S]*?)(?:```|$)/g;
  let last = 0, m;
  while ((m = fence.exec(text)) !== null) {
    out.push(renderBlocks(text.slice(last, m.index)));
    const lang = m[1] ? ' class="language-' + escapeHtml(m[1]) + '"' : "";
    out.push("<pre><code" + lang + ">" + escapeHtml(m[2].replace(/\n$/, "")) + "</code></pre>");
    last = fence.lastIndex;
  }
  out.push(renderBlocks(text.slice(last)));
  return out.join("");
}
