"""Rendering of monitor and steer results for the terminal (rich) and as a self-contained HTML page.

Every function here is pure: it takes a :class:`~emovec.runtime.MonitorResult` (or plain strings) and returns a
rich renderable, a string or a JSON-ready dict. Nothing is printed or written here; the CLI does that.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Any

import torch
from rich.table import Table
from rich.text import Text

from emovec.runtime import MonitorResult

__all__ = [
    "emotion_text",
    "layer_cosine",
    "mean_emotions",
    "monitor_html",
    "monitor_json",
    "monitor_table",
    "steer_table",
    "strength_style",
    "strongest_emotion",
    "token_label",
]

_WHITESPACE = {"\n": "↵", "\r": "␍", "\t": "⇥"}


def token_label(token: str) -> str:
    """A token as one visible line: newlines, carriage returns and tabs become arrows."""
    for raw, shown in _WHITESPACE.items():
        token = token.replace(raw, shown)
    return token


def layer_cosine(result: MonitorResult, layer: int | None = None, b: int = 0) -> torch.Tensor:
    """(T_b, K) cosines of the real tokens of sequence ``b`` at monitored ``layer`` (default: the first)."""
    li = result.layers.index(layer) if layer is not None else 0
    return result.cosine[b][result.mask[b]][:, li]


def strongest_emotion(result: MonitorResult, layer: int | None = None, b: int = 0,
                      tokens: Sequence[bool] | None = None) -> str:
    """The concept with the highest mean cosine over the tokens (``tokens``: which to count, default all)."""
    values = layer_cosine(result, layer, b)
    if tokens is not None and any(tokens):
        values = values[torch.tensor(list(tokens), dtype=torch.bool)]
    if values.shape[0] == 0:
        return result.names[0]
    return result.names[int(values.mean(0).argmax())]


def mean_emotions(result: MonitorResult, start: int = 0, end: int | None = None, b: int = 0, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` concepts with the highest mean cosine over real tokens ``start:end`` of sequence ``b``, averaged
    over every monitored layer; empty when that span holds no token."""
    values = result.cosine[b][result.mask[b]][start:end]  # (T, L, K)
    if values.shape[0] == 0:
        return []
    mean = values.mean(dim=(0, 1))
    best = mean.topk(min(k, mean.shape[0]))
    return [(result.names[i], float(v)) for v, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)]


def strength_style(value: float, scale: float) -> str:
    """A rich style for a cosine: warm (yellow to red) when positive, cool (cyan to blue) when negative, brighter
    and bolder the closer ``|value|`` is to ``scale`` (the largest magnitude shown)."""
    level = 0.0 if scale <= 0 or not math.isfinite(value) else min(1.0, abs(value) / scale)
    if value >= 0:
        rgb = (255, round(225 - 160 * level), round(120 - 120 * level))
    else:
        rgb = (round(150 - 130 * level), round(210 - 60 * level), 255)
    bold = " bold" if level >= 0.66 else ""
    dim = " dim" if level < 0.2 else ""
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]}){bold}{dim}"


def emotion_text(pairs: Sequence[tuple[str, float]], scale: float | None = None, sep: str = "  ") -> Text:
    """``calm +0.123  happy +0.045 ...`` coloured by strength (relative to ``scale``, default the largest)."""
    if scale is None:
        scale = max((abs(v) for _, v in pairs), default=0.0)
    text = Text()
    for i, (name, value) in enumerate(pairs):
        if i:
            text.append(sep)
        text.append(f"{name} {value:+.3f}", style=strength_style(value, scale))
    return text


def monitor_table(result: MonitorResult, *, top: int = 3, b: int = 0, emotion: str | None = None,
                  special: Sequence[bool] | None = None, title: str | None = None) -> Table:
    """Per token, the ``top`` concepts by cosine, strongest first, one column per rank; with ``emotion``, also that
    concept's cosine. With several monitored layers each token gets one row per layer (and a ``layer`` column).
    ``special`` marks tokens to dim (e.g. chat-template tokens). Colours are relative to the largest |cosine| shown."""
    tokens = result.tokens[b] if result.tokens else [str(i) for i in result.token_ids[b][result.mask[b]].tolist()]
    scale = float(result.cosine[b][result.mask[b]].abs().max()) if result.mask[b].any() else 0.0
    several = len(result.layers) > 1
    table = Table(title=title, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("pos", justify="right", style="dim", no_wrap=True)
    table.add_column("token", overflow="fold")
    if several:
        table.add_column("layer", justify="right", style="dim", no_wrap=True)
    for rank in range(min(top, len(result.names))):
        table.add_column(f"#{rank + 1}", overflow="fold")
    if emotion is not None:
        table.add_column(emotion, justify="right", no_wrap=True)
    tops = {layer: result.top(b, layer=layer, k=top) for layer in result.layers}
    column = result.names.index(emotion) if emotion is not None else None
    values = {layer: layer_cosine(result, layer, b) for layer in result.layers} if column is not None else {}
    for t, token in enumerate(tokens):
        label = Text(token_label(token), style="dim" if special is not None and special[t] else "")
        for i, layer in enumerate(result.layers):
            cells: list[Any] = [str(t), label] if i == 0 else ["", ""]
            if several:
                cells.append(str(layer))
            cells += [emotion_text([pair], scale) for pair in tops[layer][t]]
            if column is not None:
                value = float(values[layer][t, column])
                cells.append(Text(f"{value:+.3f}", style=strength_style(value, scale)))
            table.add_row(*cells, end_section=several and i == len(result.layers) - 1)
    return table


def steer_table(plain: str, steered: str, steered_title: str, plain_title: str = "plain") -> Table:
    """The plain and the steered generation side by side, in two equal columns."""
    table = Table(show_lines=True, expand=True, header_style="bold")
    table.add_column(plain_title, ratio=1, overflow="fold")
    table.add_column(steered_title, ratio=1, overflow="fold")
    table.add_row(Text(plain), Text(steered))
    return table


def monitor_json(result: MonitorResult, *, top: int = 5, b: int = 0, **extra: Any) -> dict[str, Any]:
    """A JSON-ready dict: names, layers, and per token its text, id and top concepts at each layer."""
    tokens = result.tokens[b] if result.tokens else None
    ids = result.token_ids[b][result.mask[b]].tolist()
    tops = {layer: result.top(b, layer=layer, k=top) for layer in result.layers}
    rows = []
    for t, token_id in enumerate(ids):
        rows.append({
            "index": t, "id": token_id, "token": tokens[t] if tokens else None,
            "top": {str(layer): [[name, round(value, 6)] for name, value in tops[layer][t]] for layer in result.layers},
        })
    return {**extra, "names": list(result.names), "layers": list(result.layers), "measure": "cosine", "tokens": rows}


def _script_json(data: Any) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(data, ensure_ascii=True, separators=(",", ":")).replace("<", "\\u003c").replace(
        ">", "\\u003e").replace("&", "\\u0026")


def _background(value: float, scale: float) -> str:
    alpha = 0.0 if scale <= 0 else min(1.0, abs(value) / scale) * 0.85
    rgb = "255,122,0" if value >= 0 else "40,120,255"
    return f"rgba({rgb},{alpha:.3f})"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;
background:#fafafa;color:#222}
h1{font-size:1.3rem;margin:0 0 .3rem}
.meta{color:#555;font-size:.9rem;margin:.2rem 0 1rem}
.controls{margin:0 0 1rem;font-size:.95rem}
select{font-size:.95rem}
#text{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word;
line-height:1.9;background:#fff;padding:1rem;border:1px solid #ddd;border-radius:6px}
.tok{border-radius:3px;cursor:default}
.tok:hover{outline:1px solid #333}
.tok.special{color:#999}
.nl{color:#bbb}
#tip{position:fixed;display:none;pointer-events:none;background:#222;color:#eee;padding:.45rem .6rem;
border-radius:5px;font:12px/1.45 ui-monospace,Menlo,Consolas,monospace;white-space:pre;z-index:10;
box-shadow:0 2px 8px rgba(0,0,0,.3)}
.legend{font-size:.85rem;color:#555;margin-top:.8rem}
.swatch{display:inline-block;width:1.2em;height:.9em;vertical-align:middle;border-radius:2px;margin:0 .2em}
"""

_JS = """
(function(){
const D=JSON.parse(document.getElementById('emovec-data').textContent);
const spans=[...document.querySelectorAll('#text .tok')];
const tip=document.getElementById('tip');
const emo=document.getElementById('emotion'), lay=document.getElementById('layer');
spans.forEach(s=>s.removeAttribute('title'));
function bg(v,scale){const a=scale>0?Math.min(1,Math.abs(v)/scale)*0.85:0;
  return (v>=0?'rgba(255,122,0,':'rgba(40,120,255,')+a.toFixed(3)+')';}
function paint(){const l=+lay.value,k=+emo.value,V=D.values[l];
  let scale=0;for(const row of V)scale=Math.max(scale,Math.abs(row[k]));
  spans.forEach((s,t)=>{s.style.background=bg(V[t][k],scale);});
  document.getElementById('scale').textContent=scale.toFixed(3);
  document.getElementById('emotion-name').textContent=D.names[k];}
function fmt(v){return (v>=0?'+':'')+v.toFixed(3);}
function tipText(t){const l=+lay.value,row=D.values[l][t],k=+emo.value;
  const order=row.map((v,i)=>i).sort((a,b)=>row[b]-row[a]).slice(0,D.top);
  const w=Math.max(...order.map(i=>D.names[i].length),D.names[k].length);
  let s=JSON.stringify(D.tokens[t])+'  (#'+t+', layer '+D.layers[l]+')\\n';
  s+=order.map(i=>D.names[i].padEnd(w)+' '+fmt(row[i])).join('\\n');
  if(!order.includes(k))s+='\\n'+'-'.repeat(w)+'\\n'+D.names[k].padEnd(w)+' '+fmt(row[k]);
  return s;}
spans.forEach((s,t)=>{
  s.addEventListener('mouseenter',()=>{tip.textContent=tipText(t);tip.style.display='block';});
  s.addEventListener('mousemove',e=>{const x=Math.min(e.clientX+14,window.innerWidth-tip.offsetWidth-8);
    const y=e.clientY+18+tip.offsetHeight>window.innerHeight?e.clientY-tip.offsetHeight-10:e.clientY+18;
    tip.style.left=x+'px';tip.style.top=y+'px';});
  s.addEventListener('mouseleave',()=>{tip.style.display='none';});});
emo.addEventListener('change',paint);lay.addEventListener('change',paint);
paint();
})();
"""


def token_spans(result: MonitorResult, *, emotion: str, layer: int, top: int = 5, b: int = 0,
                special: Sequence[bool] | None = None) -> tuple[list[str], float]:
    """One ``<span class="tok">`` per real token of sequence ``b``, coloured by the cosine of ``emotion`` at
    ``layer`` (full colour at the largest |cosine| in the text, returned as the scale), titled with its ``top``
    concepts."""
    k = result.names.index(emotion)
    tokens = result.tokens[b] if result.tokens else [str(i) for i in result.token_ids[b][result.mask[b]].tolist()]
    values = layer_cosine(result, layer, b)
    scale = float(values[:, k].abs().max()) if values.shape[0] else 0.0
    tops = result.top(b, layer=layer, k=top)
    spans = []
    for t, token in enumerate(tokens):
        classes = "tok special" if special is not None and special[t] else "tok"
        tip = "\n".join(f"{name} {value:+.3f}" for name, value in tops[t])
        shown = html.escape(token.replace("\r", ""), quote=False)
        if "\n" in token:  # keep the line break, and show where it is
            shown = shown.replace("\n", '<span class="nl">↵</span>\n')
        spans.append(f'<span class="{classes}" style="background:{_background(float(values[t, k]), scale)}" '
                     f'title="{html.escape(tip, quote=True)}">{shown}</span>')
    return spans, scale


def monitor_html(result: MonitorResult, *, emotion: str | None = None, layer: int | None = None, top: int = 5,
                 b: int = 0, special: Sequence[bool] | None = None, title: str = "emovec monitor",
                 subtitle: str = "") -> str:
    """A self-contained HTML page (inline CSS and JS, nothing fetched): every token is a span whose background
    shows the cosine of ``emotion`` (default: the strongest on average) at ``layer`` (default: the first), with a
    tooltip listing the token's ``top`` concepts; a menu switches the emotion (and the layer). Without JavaScript
    the page keeps the initial colouring and shows the tooltips as plain titles."""
    if layer is None:
        layer = result.layers[0]
    li = result.layers.index(layer)
    if emotion is None:
        emotion = strongest_emotion(result, layer, b, [not s for s in special] if special is not None else None)
    k = result.names.index(emotion)
    tokens = result.tokens[b] if result.tokens else [str(i) for i in result.token_ids[b][result.mask[b]].tolist()]
    per_layer = [layer_cosine(result, lay, b) for lay in result.layers]  # L x (T, K)
    spans, scale = token_spans(result, emotion=emotion, layer=layer, top=top, b=b, special=special)

    emotion_options = "".join(
        f'<option value="{i}"{" selected" if i == k else ""}>{html.escape(name)}</option>'
        for i, name in enumerate(result.names))
    layer_options = "".join(
        f'<option value="{i}"{" selected" if i == li else ""}>{lay}</option>' for i, lay in enumerate(result.layers))
    data = {
        "names": list(result.names), "layers": list(result.layers), "tokens": list(tokens), "top": top,
        "values": [[[round(v, 5) for v in row] for row in lv.tolist()] for lv in per_layer],
    }
    layer_hidden = "" if len(result.layers) > 1 else ' style="display:none"'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">{html.escape(subtitle)}</p>
<div class="controls">
<label>highlight <select id="emotion">{emotion_options}</select></label>
<label{layer_hidden}> at layer <select id="layer">{layer_options}</select></label>
</div>
<div id="text">{"".join(spans)}</div>
<p class="legend">Background: cosine of <b id="emotion-name">{html.escape(emotion)}</b> with each token's residual
stream, <span class="swatch" style="background:rgba(255,122,0,.85)"></span>positive /
<span class="swatch" style="background:rgba(40,120,255,.85)"></span>negative, full colour at |cosine| =
<span id="scale">{scale:.3f}</span> (the largest in this text). Hover a token for its top {top} concepts.</p>
<div id="tip"></div>
<script type="application/json" id="emovec-data">{_script_json(data)}</script>
<script>{_JS}</script>
</body>
</html>
"""
