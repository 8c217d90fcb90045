"""What readers look at: image grids, tables and kernel-free widgets for the static book."""
from __future__ import annotations

from typing import Sequence

LINE_WIDTH = 76  # characters of printed text a book page shows without scrolling (~78 at 1280 px)


def say(text: str, width: int = LINE_WIDTH) -> None:
    """Print a message wrapped to `width` columns (continuation lines indented), so that a book page shows all of
    it: an executed notebook keeps printed lines whole and the page scrolls them sideways."""
    import textwrap

    print(textwrap.fill(text, width, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False),
          flush=True)


def image_grid(images: Sequence, titles: Sequence[str] = (), columns: int = 4, suptitle: str = "",
               size: float = 2.0):
    """A matplotlib grid of PIL images with a title over each (prompt, model, seed …), each line of a title wrapped
    to the width of its image so that neighbouring titles never run into each other."""
    import textwrap

    import matplotlib.pyplot as plt

    fits = max(8, int(size * 72 / (8 * 0.6)))  # characters of an 8-pt title across one image (~0.6 em each)
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows + (0.4 if suptitle else 0)),
                                squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(images):
            axis.imshow(images[index])
            if index < len(titles):
                axis.set_title("\n".join(textwrap.fill(line, fits, break_on_hyphens=False)
                                          for line in str(titles[index]).split("\n")), fontsize=8)
    if suptitle:
        figure.suptitle(suptitle, fontsize=9)
    figure.tight_layout()
    return figure


def tabbed_tables(tables: dict, description: str = ""):
    """Toggle buttons that flip between HTML tables; linked in the browser (jslink), so it works without a kernel."""
    import ipywidgets as widgets

    names = list(tables)
    pages = [widgets.HTML(value=table if isinstance(table, str) else table.to_html()) for table in tables.values()]
    stack = widgets.Stack(children=pages, selected_index=0)
    buttons = widgets.ToggleButtons(options=names, index=0, description=description,
                                    style={"description_width": "initial"})
    widgets.jslink((buttons, "index"), (stack, "selected_index"))
    return widgets.VBox([buttons, stack])


def plot_training_log(log_history: Sequence[dict], metrics: Sequence[str], title: str = ""):
    """One panel per logged metric against the optimizer step (a Trainer's `state.log_history`)."""
    import matplotlib.pyplot as plt

    present = [m for m in metrics if any(m in row for row in log_history)]
    figure, axes = plt.subplots(1, max(len(present), 1), figsize=(3.6 * max(len(present), 1), 2.8), squeeze=False)
    for axis, metric in zip(axes.flat, present):
        rows = [row for row in log_history if metric in row]
        axis.plot([row["step"] for row in rows], [row[metric] for row in rows], marker=".")
        axis.set(xlabel="optimizer step", title=metric.replace("_", " "))
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


STAND_IN = {
    "tiny": ("**Stand-in models.** This page ran in the *tiny* profile: the LLM, the diffusion pipeline and the "
             "scorers are random-weight models of the real architectures. Their text, images and scores are "
             "noise by construction; they show that every step runs, not what the method achieves."),
    "small": ("**Partly stand-in models.** This page ran in the *small* profile: the agent LLM is the real "
              "SmolLM2-135M-Instruct, but the diffusion pipeline and the scorers are random-weight stand-ins."),
}


def stand_in_note(profile: str):
    """A Markdown note saying which outputs on the page come from stand-in models (nothing for `paper`)."""
    from IPython.display import Markdown

    return Markdown(f"> {STAND_IN[profile]}" if profile in STAND_IN else "")


def counts_table(counts: dict, what: str = "count"):
    """A dict of counts (or other scalars) as a one-column table; nested values are shown as text."""
    import pandas as pd

    return pd.DataFrame({what: {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in counts.items()}})


def json_preview(item, max_string: int = 120, max_items: int = 3):
    """Pretty JSON of a served item, long strings and lists cut (still valid JSON), as a code block."""
    import json

    from IPython.display import Markdown

    def cut(value):
        if isinstance(value, str):
            return value if len(value) <= max_string else value[:max_string] + "…"
        if isinstance(value, list):
            return [cut(v) for v in value[:max_items]] + (
                [f"… {len(value) - max_items} more"] if len(value) > max_items else [])
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    text = json.dumps(cut(item), indent=1, ensure_ascii=False)
    return Markdown(f"```json\n{text}\n```")
