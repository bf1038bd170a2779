"""``basins llc`` and ``basins evidence`` from the command line: JSON keys, the report groups,
``basins summary`` with the four basin-size views, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from basins.cli.main import main

LLC_KEYS = {"llc", "llc_stderr", "llc_ci", "llc_ci_dof", "llc_per_chain", "ess", "nbeta", "nbeta_rule", "num_terms",
            "gamma", "step_size", "step_size_initial", "step_size_rule", "num_chains", "num_draws", "num_burnin",
            "minibatch", "converged", "restarts", "diagnostics", "num_loss_evals", "num_grads", "wall_seconds",
            "num_params", "num_examples", "llc_quadratic"}
EVIDENCE_KEYS = {"log_evidence", "log_likelihood", "log_prior", "log_occam", "logdet", "logdet_ci", "method",
                 "prior_precision", "noise_std", "curvature"}


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_llc_and_evidence_json_report_and_summary(regression_files, tmp_path: Path) -> None:
    rep = str(tmp_path / "r.h5")
    code, out, err = run("llc", regression_files.bundle, "--draws", "40", "--burnin", "10", "--json", "-o", rep,
                         "--dtype", "float64")
    assert code == 0, err
    d = json.loads(out)
    assert LLC_KEYS <= set(d), LLC_KEYS - set(d)
    assert set(d["diagnostics"]) == {"frac_below_init", "acceptance", "rhat", "trend_z", "ess", "converged",
                                     "grad_norm", "grad_noise"}
    assert "gamma_bias" not in d
    assert len(d["llc_per_chain"]) == 4 and d["num_chains"] == 4 and d["llc_ci"][0] <= d["llc"] <= d["llc_ci"][1]
    code, out, err = run("evidence", regression_files.bundle, "--curvature", "ggn", "--json", "-o", rep,
                         "--dtype", "float64")  # not a minimum: auto δ needs a PSD curvature
    assert code == 0, err
    e = json.loads(out)
    assert EVIDENCE_KEYS <= set(e), EVIDENCE_KEYS - set(e)
    assert e["log_evidence"] == e["log_likelihood"] + e["log_occam"] or abs(
        e["log_evidence"] - e["log_likelihood"] - e["log_occam"]) < 1e-9 * abs(e["log_evidence"])
    code, out, err = run("nullity", regression_files.bundle, "-o", rep, "--dtype", "float64")
    assert code == 0, err
    code, out, err = run("summary", rep)
    assert code == 0, err
    assert "four views" in out and "LLC" in out and "log evidence" in out
    code, out, err = run("summary", rep, "--json")
    groups = json.loads(out)
    assert {"llc", "evidence", "nullity"} <= set(groups)
    assert len(groups["llc"]["llc_trace"]) == 4


def test_llc_table_and_bad_usage(regression_files) -> None:
    code, out, err = run("llc", regression_files.bundle, "--draws", "20", "--burnin", "0", "--chains", "2")
    assert code == 0, err
    assert "local learning coefficient" in out
    code, _, err = run("llc", regression_files.bundle, "--step-size", "-1")
    assert code == 2
    code, _, err = run("llc", regression_files.bundle, "--step-size", "1e6", "--draws", "50", "--burnin", "0")
    assert code == 1 and "diverged" in err
    code, _, err = run("llc", regression_files.bundle, "--draws", "sometimes")
    assert code == 2 and "--draws" in err
    code, out, err = run("llc", regression_files.bundle, "--draws", "30", "--burnin", "0", "--chains", "2",
                         "--per-block", "1", "--no-quadratic")
    assert code == 0, err
    assert "weight-refined LLC per block" in out

    code, _, err = run("evidence", regression_files.bundle, "--prior-precision", "abc")
    assert code == 2


def test_llc_help_states_the_step_rule_as_the_readme_does() -> None:
    from basins.analyses.llc import STEP_RULE

    code, out, _ = run("llc", "--help")
    assert code == 0
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    flat = " ".join(out.split())
    rule = STEP_RULE.removeprefix("auto: ")
    assert rule in flat, "llc --help must state the step-size rule"
    assert rule in " ".join(readme.split()), "README must state the same step-size rule"
