"""The demo's self-contained HTML report: inline CSS, figures embedded as data URIs, no script needed."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#fafafa;color:#1d1d1f}
main{max-width:1040px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:36px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px}.lead{font-size:16px}
code,.cmd{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
.cmd{background:#f0f0f3;border:1px solid #e2e2e6;border-radius:6px;padding:6px 10px;margin:6px 0 12px;
 white-space:pre-wrap;word-break:break-word}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13.5px}
th,td{border-bottom:1px solid #e4e4e4;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f2f2f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;border:1px solid #eee;border-radius:4px;background:#fff}
.figs{display:flex;flex-wrap:wrap;gap:12px}.figs img{max-width:48%}
.chat{background:#fff;border:1px solid #e4e4e4;border-radius:8px;padding:10px 14px;margin:8px 0}
.role{font-weight:600;color:#555;font-size:13px;margin-top:6px}
.tok{border-radius:3px;padding:0 1px;white-space:pre-wrap}.tok.special{color:#aaa}.nl{color:#bbb}
.finding{background:#eef5ff;border-left:3px solid #4477aa;padding:6px 12px;margin:8px 0}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;vertical-align:middle}
"""


def image(path: str | Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def table(columns: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            text = f"{value:+.3f}" if isinstance(value, float) else str(value)
            cells.append(f'<td class="num">{html.escape(text)}</td>' if i in numeric else f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def command(text: str) -> str:
    return f'<div class="cmd">$ {html.escape(text)}</div>'


def section(title: str, *parts: str, anchor: str = "") -> str:
    anchor_attr = f' id="{html.escape(anchor)}"' if anchor else ""
    return f"<section{anchor_attr}><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def page(title: str, subtitle: str, sections: list[str]) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<h1>{html.escape(title)}</h1>
<p class="meta">{html.escape(subtitle)}</p>
{"".join(sections)}
</main>
</body>
</html>
"""
