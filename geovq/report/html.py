"""report.html: one static page (no server; it opens from the file system) with every figure embedded and
the tables of report.md, the best PSNR of each bits-per-image group marked."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING

from geovq.report.tables import (INTRO, SETTINGS_HEADER, SUMMARY_HEADER, ceiling_lines, row_settings,
                                 summary_by_bits, title)

if TYPE_CHECKING:
    from geovq.report.runs import Runs
    from geovq.report.figures import Figure

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:nth-child(-n+3){text-align:left}tr.best{background:#e8f4e8;
font-weight:600}figure{margin:1.5em 0}img{max-width:100%;height:auto}figcaption{color:#555;font-size:0.9em}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:0.8em}"""


def html_report(runs: Runs, figures: list[Figure], out: Path, config_yaml: str) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title(runs.finished, runs.planned))}"
             f" — {esc(runs.cfg.dataset)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{esc(title(runs.finished, runs.planned))}: {esc(runs.cfg.dataset)}</h1>",
             f"<p>{esc(INTRO)}</p>",
             f"<p>Runs: {esc(', '.join(d.root.name for d in runs.dirs))}.</p><ul>"]
    parts += [f"<li>{esc(line)}</li>" for line in ceiling_lines(runs.ceilings)]
    parts.append("</ul>")
    for bits, group in summary_by_bits(runs.rows).items():
        best = max(range(len(group)), key=lambda i: group[i].psnr)
        parts.append(f"<h2>{bits:g} bits per image</h2><table><tr>"
                     + "".join(f"<th>{esc(h)}</th>" for h in SUMMARY_HEADER) + "</tr>")
        for i, line in enumerate(group):
            cells = [line.method, line.vae or "—", line.decoder, str(line.k), f"{bits:g}", f"{line.bpp:.3f}",
                     str(line.n), *line.cells]
            parts.append(f"<tr{' class=best' if i == best else ''}>" + "".join(f"<td>{esc(c)}</td>" for c in cells)
                         + "</tr>")
        parts.append("</table>")
    settings = row_settings(runs.rows)
    if settings:  # which settings each row used (a tuned sweep: every method its own)
        parts.append("<h2>Settings of each row</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in SETTINGS_HEADER)
                     + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in s) + "</tr>" for s in settings]
        parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    for figure in figures:
        data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{esc(figure.path.name)}' data-file='{esc(figure.path.name)}' "
                     f"src='data:image/png;base64,{data}'><figcaption>{esc(figure.caption)}</figcaption></figure>")
    parts.append(f"<h2>Configuration</h2><pre>{esc(config_yaml)}</pre></body></html>")
    return "\n".join(parts)
