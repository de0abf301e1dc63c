"""The report of ``predict``: a metrics table, then every prompt once with every model's answer side by side.

Two files with the same content: ``report.md`` (Markdown, for a pull request or a terminal) and
``report.html`` (one self-contained page: inline CSS, no script, no external resource, so it opens
offline and can be mailed). In the HTML page each answer marks what differs from the reference (where
the prompt has one) or else from the first model's answer: differing text is highlighted, shared text
is plain. Differences are found over words (Latin letters and digits) and single characters (CJK,
punctuation), so a Chinese answer is compared character by character.
"""

from __future__ import annotations

import difflib
import html
import re

from ..evaluation.metrics import METRIC_NAMES
from ..evaluation.prompts import Prompt

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
# A word of Latin letters/digits, a run of white space, or any other single character (one CJK character).
_PIECES = re.compile(r"[A-Za-z0-9_]+|\s+|.", re.S)

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC", sans-serif; margin: 2rem; color: #1d1d1f; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table.metrics { border-collapse: collapse; margin: 1rem 0; }
table.metrics th, table.metrics td { border: 1px solid #c8c8cc; padding: .35rem .7rem; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics td.best { font-weight: 700; background: #e7f5e9; }
.prompt { border: 1px solid #d8d8dc; border-radius: 6px; margin: 1rem 0; padding: .8rem 1rem; }
.prompt h3 { font-size: 1rem; margin: 0 0 .4rem 0; white-space: pre-wrap; }
.source { color: #6e6e73; font-size: .8rem; }
.reference { white-space: pre-wrap; margin: .4rem 0; color: #1f5130; }
.answers { display: grid; gap: .8rem; grid-template-columns: repeat(auto-fit, minmax(16rem, 1fr)); }
.answer { background: #f7f7f9; border-radius: 4px; padding: .5rem .7rem; }
.answer .model { font-weight: 600; font-size: .85rem; margin-bottom: .3rem; }
.answer .text { white-space: pre-wrap; }
.answer mark { background: #ffe08a; }
.badge { font-size: .75rem; border-radius: 3px; padding: 0 .3rem; margin-left: .3rem; background: #e0e0e6; }
.badge.match { background: #c9ecd0; }
.legend { color: #6e6e73; font-size: .85rem; }
"""


def pieces(text: str) -> list[str]:
    """``text`` cut where differences are looked for: Latin words, white-space runs, single characters."""
    return _PIECES.findall(text)


def differing_spans(text: str, against: str) -> list[tuple[str, bool]]:
    """``text`` as ``(piece, differs)`` runs: False where it matches ``against``, True where it does not."""
    ours, theirs = pieces(text), pieces(against)
    spans: list[tuple[str, bool]] = []
    matcher = difflib.SequenceMatcher(a=ours, b=theirs, autojunk=False)
    for tag, i1, i2, _, _ in matcher.get_opcodes():
        if i2 > i1:
            spans.append(("".join(ours[i1:i2]), tag != "equal"))
    return spans


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _best(results: dict[str, dict], metric: str) -> float | None:
    values = [r["mean"][metric] for r in results.values() if r["mean"][metric] is not None]
    return max(values) if values else None


def _md_cell(text: str) -> str:
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>") or " "


def markdown_report(prompts: list[Prompt], answers: dict[str, list[dict]], results: dict[str, dict]) -> str:
    """The report as Markdown: metrics table (best value bold), then each prompt with every model's answer."""
    labels = list(answers)
    lines = ["# Predictions", "", f"{len(prompts)} prompts, {len(labels)} model(s). Scores 0-100 over the prompts "
             "with a reference (BLEU-4 over characters, ROUGE over jieba words; docs/predict.md).", "",
             "| model | " + " | ".join(METRIC_NAMES) + " | scored | new tokens | stopped |",
             "|---|" + "---:|" * (len(METRIC_NAMES) + 3)]
    for label, result in results.items():
        cells = []
        for metric in METRIC_NAMES:
            value = result["mean"][metric]
            cell = _format(value)
            cells.append(f"**{cell}**" if value is not None and value == _best(results, metric) and len(results) > 1
                         else cell)
        lines.append(f"| {label} (`{result['model']}`) | " + " | ".join(cells) +
                     f" | {result['scored']} | {result['new_tokens']} | {result['finish_reasons']['stop']} |")
    for i, prompt in enumerate(prompts):
        lines += ["", f"## {i}. {_md_cell(prompt.text)}", "", f"<sub>{_md_cell(prompt.source)}</sub>", ""]
        if prompt.reference is not None:
            lines += [f"Reference: {_md_cell(prompt.reference)}", ""]
        lines += ["| model | answer |", "|---|---|"]
        lines += [f"| {label} | {_md_cell(answers[label][i]['prediction'])} |" for label in labels]
    return "\n".join(lines) + "\n"


def _answer_html(text: str, against: str | None) -> str:
    if against is None:
        return html.escape(text)
    return "".join(f"<mark>{html.escape(piece)}</mark>" if differs and piece.strip() else html.escape(piece)
                   for piece, differs in differing_spans(text, against))


def html_report(prompts: list[Prompt], answers: dict[str, list[dict]], results: dict[str, dict]) -> str:
    """The report as one self-contained HTML page (see the module's docstring)."""
    labels = list(answers)
    out = ["<!DOCTYPE html>", '<html lang="zh"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>Predictions: " + html.escape(", ".join(labels)) + "</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>Predictions</h1>",
           f"<p>{len(prompts)} prompts, {len(labels)} model(s). Scores 0&ndash;100 over the prompts with a reference "
           "(BLEU-4 over characters, ROUGE-1/2/L over jieba words, exact match); the best value of each column "
           "is shaded.</p>",
           '<table class="metrics" id="metrics"><thead><tr><th>model</th>'
           + "".join(f"<th>{m}</th>" for m in METRIC_NAMES)
           + "<th>scored</th><th>new tokens</th><th>stopped</th></tr></thead><tbody>"]
    for label, result in results.items():
        cells = []
        for metric in METRIC_NAMES:
            value = result["mean"][metric]
            best = value is not None and value == _best(results, metric) and len(results) > 1
            cells.append(f'<td class="best">{_format(value)}</td>' if best else f"<td>{_format(value)}</td>")
        out.append(f'<tr><td title="{html.escape(result["model"])}">{html.escape(label)}</td>' + "".join(cells)
                   + f"<td>{result['scored']}</td><td>{result['new_tokens']}</td>"
                   f"<td>{result['finish_reasons']['stop']}</td></tr>")
    out.append("</tbody></table>")
    out.append('<p class="legend"><mark>Highlighted</mark> text differs from the reference, or, for a prompt '
               f"without one, from the answer of {html.escape(labels[0])}.</p>")
    for i, prompt in enumerate(prompts):
        out.append(f'<section class="prompt" id="prompt-{i}"><h3>{i}. {html.escape(prompt.text)}</h3>'
                   f'<div class="source">{html.escape(prompt.source)}</div>')
        if prompt.reference is not None:
            out.append(f'<div class="reference"><b>Reference:</b> {html.escape(prompt.reference)}</div>')
        out.append('<div class="answers">')
        first = answers[labels[0]][i]["prediction"]
        for n, label in enumerate(labels):
            text = answers[label][i]["prediction"]
            if prompt.reference is not None:
                against = prompt.reference
                badge = '<span class="badge match">= reference</span>' if text.strip() == prompt.reference.strip() \
                    else ""
            else:
                against = first if n else None
                badge = f'<span class="badge">= {html.escape(labels[0])}</span>' if n and text == first else ""
            out.append(f'<div class="answer" data-model="{html.escape(label)}"><div class="model">'
                       f'{html.escape(label)}{badge}</div><div class="text">{_answer_html(text, against)}</div></div>')
        out.append("</div></section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
