"""plotly.js once per output folder, beside the HTML figures that load it with <script src="plotly.min.js">.

Embedding it made every figure ~4.6 MB (three figures of `make final`: 14 MB);
one copy per folder keeps each HTML file to its own data (kilobytes) and still
opens offline, from file://, with no server or network, as long as the folder
is copied whole.
"""

from __future__ import annotations

from pathlib import Path

import plotly

from cnnlib.atomic import write_atomic

BUNDLE = "plotly.min.js"


def write_bundle(folder: Path) -> str:
    """Write folder/plotly.min.js unless an identical copy is there; returns the src to use."""
    text = plotly.offline.get_plotlyjs()
    path = Path(folder) / BUNDLE
    if not path.is_file() or path.stat().st_size != len(text.encode()) or path.read_text() != text:
        write_atomic(path, text)
    return BUNDLE
