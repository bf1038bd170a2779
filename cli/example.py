"""``basins example [DIR]``: write the built-in example bundle."""

from __future__ import annotations

import click

from .common import Timer, print_json, stderr_console


@click.command()
@click.argument("directory", default="basins-example", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data order and initialisation.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No logs on stderr.")
def example(directory: str, seed: int, as_json: bool, quiet: bool) -> None:
    """Train a small MLP classifier on a built-in dataset and write DIRECTORY/model.pt.

    The bundle holds the model (a torch.export archive), the data and the loss, so every
    command runs on it with no other option:

    \b
      basins example
      basins hessian basins-example/model.pt
    """
    from basins.files.example import make_example

    log = stderr_console(quiet)
    with Timer() as t, log.status("training the example model", spinner="dots"):
        path = make_example(directory, seed=seed)
    log.print(f"wrote {path} in {t.seconds:.1f} s")
    if as_json:
        print_json({"bundle": path, "seed": seed, "wall_seconds": t.seconds})
    else:
        click.echo(path)
