"""Build-time helpers of comtip's docs (a local Sphinx extension, loaded by ``conf.py``).

1. Copy the tutorials ``../tutorials/*.ipynb`` into ``docs/tutorials/`` (git-ignored), so that myst-nb renders them
   with the outputs they were committed with. A notebook is copied only when its bytes changed (incremental
   builds stay incremental), and copies whose source notebook is gone are removed.
2. Write the ``--help`` of the ``comtip`` command and of each subcommand into ``docs/generated/cli_help.md``
   (git-ignored), straight from :func:`comtip.cli.build_parser`; ``cli.md`` includes it. No sphinx-argparse needed.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

HELP_WIDTH = 100  # columns of the rendered --help text


def copy_tutorials(src: Path, dst: Path) -> list[str]:
    """Copy ``src/*.ipynb`` into ``dst`` when changed; return the notebook names."""
    dst.mkdir(parents=True, exist_ok=True)
    names = []
    for nb in sorted(src.glob("*.ipynb")):
        names.append(nb.name)
        target = dst / nb.name
        if not target.exists() or target.read_bytes() != nb.read_bytes():
            shutil.copyfile(nb, target)
    for stale in dst.glob("*.ipynb"):
        if stale.name not in names:
            stale.unlink()
    return names


def _help(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_WIDTH)  # argparse reads the terminal width from $COLUMNS
    try:
        return parser.format_help().rstrip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def cli_help_markdown() -> str:
    """The help of ``comtip`` and of each subcommand, as MyST Markdown (one section per command)."""
    from comtip.cli import build_parser

    parser = build_parser()
    parts = ["## `comtip`", "", "```text", _help(parser), "```", ""]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        parts += [f"## `comtip {name}`", "", "```text", _help(sub), "```", ""]
    return "\n".join(parts)


def write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` unless it already holds exactly that."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _builder_inited(app) -> None:
    cfg = app.config
    copy_tutorials(Path(cfg.comtip_tutorials_src), Path(cfg.comtip_tutorials_dst))
    write_if_changed(Path(cfg.comtip_cli_help), cli_help_markdown())


def setup(app):
    """Register the config values and the build-time hook."""
    app.add_config_value("comtip_tutorials_src", "", "env", types=[str])
    app.add_config_value("comtip_tutorials_dst", "", "env", types=[str])
    app.add_config_value("comtip_cli_help", "", "env", types=[str])
    # config-inited runs before Sphinx lists the source files, so the copied notebooks are found
    app.connect("config-inited", lambda app, config: _builder_inited(app))
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
