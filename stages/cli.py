"""The `kdcache` command: one subcommand per stage.

    kdcache prepare | teacher | train | eval | report | inspect | run
"""

from __future__ import annotations

import click

from pipeline import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="kdcache")
def main() -> None:
    """Cache a teacher's next-token distributions once; distill many students from the cache."""


def _register() -> None:
    from stages import prepare, teacher, inspect_cmd

    main.add_command(prepare.prepare)
    main.add_command(teacher.teacher)
    main.add_command(inspect_cmd.inspect)
    for modname, attr in (("train", "train"), ("eval_cmd", "eval_"), ("report", "report"), ("run", "run"), ("export", "export")):
        try:
            mod = __import__(f"stages.{modname}", fromlist=[attr])
        except ModuleNotFoundError as e:
            if e.name != f"stages.{modname}":
                raise
            continue
        main.add_command(getattr(mod, attr))


_register()
