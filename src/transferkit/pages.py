"""The package's HTML pages (report, doctor): its jinja2 templates with the number filters they use."""

from __future__ import annotations


def _human_size(size: int | None) -> str:
    if size is None:
        return "–"
    return f"{size / 1e3:,.1f} kB" if size < 1e6 else f"{size / 1e6:,.1f} MB"


def render_template(name: str, **values) -> str:
    """One of the package's HTML templates (templates/NAME), autoescaped, with the number filters."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.PackageLoader("transferkit", "templates"),
                                     autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
    environment.filters["size"] = _human_size
    environment.filters["thousands"] = lambda n: f"{n:,}"
    return environment.get_template(name).render(**values)
