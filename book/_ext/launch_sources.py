"""Point launch buttons (Binder, Colab, JupyterHub) at the clean source notebook in notebooks/, not at the
executed copy in book/, which is generated and not committed."""
import re

EXECUTED = re.compile(r"\bbook(/|%2F)(\d\d_[A-Za-z0-9_]+\.ipynb)")


def _rewrite(entry):
    if isinstance(entry, dict):
        if isinstance(entry.get("url"), str):
            entry["url"] = EXECUTED.sub(r"notebooks\1\2", entry["url"])
        for value in entry.values():
            if isinstance(value, list):
                for item in value:
                    _rewrite(item)


def rewrite_launch_urls(app, pagename, templatename, context, doctree):
    for button in context.get("header_buttons", []):
        _rewrite(button)


def setup(app):
    # after sphinx-book-theme has added its launch buttons (default priority 500)
    app.connect("html-page-context", rewrite_launch_urls, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
