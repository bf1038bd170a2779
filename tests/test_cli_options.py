"""One meaning per option name across commands, destinations named like the library's parameters,
and the flag named in a library error from the error's ``param``."""

from __future__ import annotations

import re
from collections import defaultdict

import click
import pytest

from basins.cli.common import LibraryOption, flag_errors, flag_of
from basins.cli.main import COMMANDS, main
from basins.errors import InputError, ReportError

#: every option name that more than one command has with different help: the meaning (a pattern)
#: its help says in each of them. A new shared name must be added here, with one meaning.
SHARED_MEANINGS = {
    "--atol": r"Absolute part of the (threshold|cutoff)",
    "--chunk": r"Points per (vmap call|batched loss evaluation)",
    "--deflate": r"slq: top eigenpairs",
    "--json": r"JSON",
    "--lanczos-steps": r"Lanczos steps per probe",
    "--method": r"dense.*(slq|stochastic Lanczos quadrature)",
    "--output": r"(report|figure)",
    "-o": r"(report|figure)",
    "--per-block": r"per block of parameters",
    "--plot": r"[Dd]raw .* to this \.png/\.pdf/\.svg",
    "--points": r"Grid points",
    "--probes": r"[Pp]robe vectors",
    "--quiet": r"No .*on stderr",
    "-q": r"No .*on stderr",
    "--rtol": r"rtol·",
    "--seed": r"[Ss]eed",
    "--top-k": r"(Eigenvalues wanted at each end|Eigenvectors spanning the top family)",
}


def _options() -> dict[str, list[tuple[str, click.Option]]]:
    ctx = click.Context(main)
    uses: dict[str, list[tuple[str, click.Option]]] = defaultdict(list)
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        assert command is not None
        for p in command.params:
            if isinstance(p, click.Option):
                for flag in [*p.opts, *p.secondary_opts]:
                    uses[flag].append((name, p))
    return uses


def test_each_option_name_has_one_destination_and_one_meaning() -> None:
    for flag, uses in _options().items():
        dests = {p.name for _, p in uses}
        assert len(dests) == 1, (flag, sorted(dests))
        helps = {p.help for _, p in uses}
        if len(helps) > 1:
            assert flag in SHARED_MEANINGS, (flag, [c for c, _ in uses])
            for command, p in uses:
                assert re.search(SHARED_MEANINGS[flag], p.help or ""), (flag, command, p.help)


def test_steps_are_training_steps_and_lanczos_steps_have_their_own_name() -> None:
    uses = _options()
    assert {p.name for _, p in uses["--steps"]} == {"train_steps"}
    assert {c for c, _ in uses["--steps"]} == {"hessian", "spectrum", "nullity", "features", "volume", "llc",
                                               "evidence", "landscape"}
    assert {c for c, _ in uses["--lanczos-steps"]} == {"spectrum", "nullity", "evidence"}
    assert {p.name for _, p in uses["--lanczos-steps"]} == {"num_steps"}  # the library's parameter


def test_destinations_are_the_library_parameters() -> None:
    """The options a command passes on under their own names are parameters of its library call."""
    import inspect

    from basins.analyses.evidence import evidence
    from basins.analyses.features import feature_analysis
    from basins.analyses.hessian import hessian_eigenvalues
    from basins.analyses.landscape import landscape_slice, linear_path
    from basins.analyses.llc import llc
    from basins.analyses.nullity import nullity
    from basins.analyses.spectrum import hessian_spectrum
    from basins.analyses.volume.probe import probe_problem
    from basins.problems import open_problem

    calls = {"hessian": [hessian_eigenvalues], "spectrum": [hessian_spectrum], "nullity": [nullity],
             "features": [feature_analysis], "llc": [llc], "evidence": [evidence], "volume": [probe_problem],
             "landscape": [landscape_slice, linear_path]}
    common = {"model", "train_steps", "data", "loss", "arch", "base_model", "params", "include_frozen",
              "output_path", "trust_pickle", "batch_size", "max_samples", "stream", "dtype", "device", "seed",
              "memory_bytes", "hvp_route", "output", "force", "as_json", "quiet", "debug"}
    own = {"hessian": {"eigenvectors", "strict", "cold", "per_block"}, "spectrum": {"plot_path"},
           "llc": {"per_block"}, "volume": {"samples", "plot_path", "k"}}  # volume: k is hessian's -k (top_k here)
    ctx = click.Context(main)
    for name, fns in calls.items():
        command = main.get_command(ctx, name)
        assert command is not None
        library = {p for fn in fns for p in inspect.signature(fn).parameters}
        for p in command.params:
            if p.name not in common and p.name not in own.get(name, set()):
                assert p.name in library, (name, p.name)
    assert {"data", "loss", "params", "memory_bytes", "hvp_route", "include_frozen"} <= set(
        inspect.signature(open_problem).parameters)


@click.command()
@click.option("--loss")
@click.option("--memory", "memory_bytes")
@click.option("--max-hvps", cls=LibraryOption, library_names=("max_matvecs",), type=int)
@click.option("--probes", "num_probes", type=int)
@click.option("-k", "--top-k", "k", type=int)
@click.option("--trace-hvps", "hvps_for_trace", type=int)
def _cmd(loss: str, memory_bytes: str, max_hvps: int, num_probes: int, k: int, hvps_for_trace: int) -> None:
    pass


@pytest.mark.parametrize(("error", "shown"), [
    (InputError("must be ≥ 2, got 1", param="num_probes"), "--probes: must be ≥ 2, got 1"),  # by destination
    (InputError("k must be between 1 and P", param="k"), "--top-k: k must be between 1 and P"),  # the long name
    (InputError("trace_hvps must be ≥ 4", param="trace_hvps"), "--trace-hvps: trace_hvps must be ≥ 4"),  # by name
    (InputError("num_probes must be ≥ 2"), "--probes: num_probes must be ≥ 2"),  # the message names it
    (InputError("unknown num_probes 'x'"), "--probes: unknown num_probes 'x'"),
    (ReportError("num_probes is odd", param="num_probes"), "--probes: num_probes is odd"),  # same type
    (InputError("nothing to do with options"), "nothing to do with options"),
    (InputError("loss is not finite at θ*"), "loss is not finite at θ*"),  # a word, not the --loss option
    (InputError("bad loss function", param="loss"), "--loss: bad loss function"),
    (InputError("memory_bytes must be ≥ 0"), "--memory: memory_bytes must be ≥ 0"),
    (InputError("max_matvecs=1 is too few"), "--max-hvps: max_matvecs=1 is too few"),  # a name below the call
    (InputError("--probes: already named", param="num_probes"), "--probes: already named"),
    (InputError("other_param must be 1", param="other_param"), "other_param must be 1"),
    # hints naming other parameters are spelled as flags; quoted text is left alone
    (InputError("k too large; raise memory_bytes or lower hvps_for_trace", param="k"),
     "--top-k: k too large; raise --memory or lower --trace-hvps"),
    (InputError("no 'memory_bytes.pt'; pass loss='mse' (memory_bytes=3)", param="num_probes"),
     "--probes: no 'memory_bytes.pt'; pass --loss mse (--memory 3)"),
])
def test_library_errors_get_the_flag(error: InputError, shown: str) -> None:
    with click.Context(_cmd), pytest.raises(InputError) as info, flag_errors():
        raise error
    assert str(info.value) == shown and type(info.value) is type(error) and info.value.param == error.param
    assert flag_of("k", _cmd.params) == "--top-k"


def test_library_names_that_clash_with_other_options() -> None:
    """The library's ``output`` (a model output's field) is ``--model-output``, not ``-o/--output``
    (``output_path``); landscape's ``other`` (the other checkpoint) is ``--to``."""
    ctx = click.Context(main)
    for name in ("hessian", "landscape"):
        command = main.get_command(ctx, name)
        assert command is not None and flag_of("output", command.params) == "--model-output"
        assert flag_of("output_path", command.params) == "--output"
    landscape = main.get_command(ctx, "landscape")
    assert landscape is not None and flag_of("other", landscape.params) == "--to"


def test_library_error_through_a_command(tmp_path) -> None:
    """The flag is found on the running command: nullity's --probes (destination num_probes)."""
    from click.testing import CliRunner

    from basins.files.loading import save_bundle
    from tests.models import classification_data, mlp

    x, y = classification_data(20)
    save_bundle(str(tmp_path / "m.pt"), mlp().eval(), x, y, "cross-entropy")
    r = CliRunner().invoke(main, ["hessian", str(tmp_path / "m.pt"), "-k", "100000", "-q"])
    assert r.exit_code == 2 and "--top-k: k must be between 1 and the number of parameters" in r.stderr


def test_steps_in_a_lanczos_command_says_what_it_now_means(model_files, monkeypatch) -> None:  # noqa: ANN001
    """``--steps`` changed meaning (Lanczos steps → training steps) in spectrum, nullity and evidence: a
    command that has ``--lanczos-steps`` says so when ``--steps`` is on its command line, and only then."""
    from click.testing import CliRunner

    from basins.cli.main import main

    for argv, said in ((["--steps", "80"], True), (["--train-steps", "80"], False), ([], False)):
        args = ["spectrum", str(model_files.bundle), "--probes", "2", "--lanczos-steps", "4", *argv]
        monkeypatch.setattr("sys.argv", ["basins", *args])
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        assert ("--lanczos-steps (they were --steps" in " ".join(r.stderr.split())) is said, (argv, r.stderr)
