"""The main job on the built-in default model (grows with each pipeline step that lands)."""

from __future__ import annotations

import sys

from quantmix.model.catalog import load_catalog
from quantmix.planning.recipe import RecipeSpec, parse_shorthand, resolve
from quantmix.planning.size import render_size_table, size_report
from quantmix.reports.tables import render_catalog

DEMO_FTYPES = ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "IQ4_XS")


def run_demo(model: str) -> int:
    """Build the fixtures, print the catalog of ``model`` and its size under stock and shorthand mixes."""
    from quantmix.cli import fixture_model_dir, fixture_names
    from quantmix.fixtures.store import registered_fixtures
    from quantmix.fixtures.text import NAMES, text_path

    for name in NAMES:
        print(f"text {name}: {text_path(name)}", file=sys.stderr)
    for name in registered_fixtures():
        print(f"fixture {name}: {fixture_model_dir(name)}", file=sys.stderr)
    path = fixture_model_dir(model) if model in fixture_names() else model
    cat = load_catalog(path)
    print(render_catalog(cat))
    for ftype in DEMO_FTYPES:
        print()
        print(render_size_table(size_report(resolve(cat, RecipeSpec(ftype=ftype), imatrix_present=True))))
    moe = load_catalog(fixture_model_dir("smollm2-moe"))
    print()
    print(render_size_table(size_report(resolve(moe, parse_shorthand("Q6_K-IQ4_XS-IQ4_XS-Q5_K")))))
    return 0
