"""``basins llc`` on a Hugging Face GPT-2 directory with named-input data and ``--loss causal-lm``:
it runs at its defaults, nβ counts valid tokens, and with a given step size its chains equal an
SGLD written here independently (the hand-written float64 token cross-entropy, plain autograd on
the module's own parameters, the documented seeds and starts, the same noise)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

pytest.importorskip("transformers")

from basins.analyses.llc import llc  # noqa: E402
from basins.cli.main import main  # noqa: E402
from basins.engine.problem import Problem  # noqa: E402
from tests.hf_models import VOCAB, sum_count_causal_lm, tiny_gpt2  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (6, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[4, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model = tiny_gpt2()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("llc") / "gpt2"
    model.save_pretrained(str(path))
    torch.save({"input_ids": ids, "attention_mask": mask}, path.parent / "tok.pt")
    return {"model": model, "ids": ids, "mask": mask, "labels": labels, "dir": path}


def test_llc_cli_defaults_on_gpt2_directory(gpt2: dict[str, object]) -> None:
    d = gpt2["dir"]
    r = CliRunner().invoke(main, ["llc", str(d), "--data", str(d.parent / "tok.pt"), "--loss", "causal-lm",  # type: ignore[operator]
                                  "--json", "-q"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    valid = int((gpt2["labels"][:, 1:] != -100).sum())  # type: ignore[index]
    assert out["num_terms"] == valid == 45 and "valid tokens" in out["nbeta_rule"]
    assert out["nbeta"] == pytest.approx(valid / math.log(valid), rel=1e-12)
    assert math.isfinite(out["llc"]) and out["llc_ci"][0] < out["llc"] < out["llc_ci"][1]
    # --draws auto (the default): 1000, doubled until the diagnostics pass and the s.e. ≤ 4% of λ̂, or the budget
    assert out["num_burnin"] == 1000 and out["minibatch"] == 6
    assert out["num_draws"] in (1000, 2000, 4000, 8000, 15000)
    assert out["llc_stderr"] <= 0.04 * abs(out["llc"]) or out["num_burnin"] + out["num_draws"] == 16000
    assert not out["restarts"] and isinstance(out["converged"], bool)


def _hand_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over valid tokens, in float64 from the logits."""
    logits = model(input_ids=ids, attention_mask=mask).logits.to(torch.float64)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)


def _seed(ss: np.random.SeedSequence) -> int:
    return int(ss.generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)


def test_llc_equals_independent_sgld_with_the_same_noise(gpt2: dict[str, object]) -> None:
    model, ids, mask, labels = gpt2["model"], gpt2["ids"], gpt2["mask"], gpt2["labels"]
    problem = Problem(model, {"input_ids": ids, "attention_mask": mask}, labels, "causal-lm")  # type: ignore[arg-type]
    eps, burn, draws, C, seed, gamma = 2e-4, 30, 120, 3, 5, 1.0
    res = llc(problem, step_size=eps, num_burnin=burn, num_draws=draws, num_chains=C, seed=seed, quadratic=False)

    # ---- the same SGLD, written independently
    params = [p for _, p in model.named_parameters()]  # type: ignore[union-attr]
    w_star = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    P = w_star.numel()
    N = int((labels[:, 1:] != -100).sum())  # type: ignore[index]
    nb = N / math.log(N)

    def set_w(w: torch.Tensor) -> None:
        a = 0
        with torch.no_grad():
            for p in params:
                p.copy_(w[a : a + p.numel()].reshape(p.shape))
                a += p.numel()

    def loss_grad(w: torch.Tensor) -> tuple[float, torch.Tensor]:
        set_w(w)
        loss = _hand_loss(model, ids, mask, labels)  # type: ignore[arg-type]
        grads = torch.autograd.grad(loss, params)
        return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])

    try:
        L0 = loss_grad(w_star)[0]
        traces = torch.zeros(C, draws, dtype=torch.float64)
        for c, kid in enumerate(np.random.SeedSequence(seed).spawn(C)):
            noise_ss, _, start_ss = kid.spawn(3)
            noise = torch.Generator().manual_seed(_seed(noise_ss))
            aux = torch.Generator().manual_seed(_seed(start_ss))
            u = torch.randn(P, generator=aux, dtype=torch.float64)
            u = u / u.norm()
            r = float(torch.rand((), generator=aux, dtype=torch.float64)) ** (1 / P) / math.sqrt(gamma)
            while not nb * (loss_grad(w_star + r * u)[0] - L0) <= P / 2:
                r /= 2
            w = w_star + r * u
            xi = torch.randn(P, generator=noise, dtype=torch.float64)
            for t in range(burn + draws):
                L, g = loss_grad(w)
                if t >= burn:
                    traces[c, t - burn] = nb * (L - L0)
                drift = nb * g + gamma * (w - w_star)
                xi_next = torch.randn(P, generator=noise, dtype=torch.float64)  # Leimkuhler–Matthews
                w = w - 0.5 * eps * drift + 0.5 * math.sqrt(eps) * (xi + xi_next)
                xi = xi_next
    finally:
        set_w(w_star)
    assert torch.allclose(res.traces, traces, rtol=1e-7, atol=1e-7 * float(traces.abs().max())), \
        float((res.traces - traces).abs().max())
    ref = float(traces.mean())
    assert abs(res.llc - ref) <= 1e-6 * max(1.0, abs(ref)) <= res.llc_stderr


def test_user_loss_returning_sum_and_count(gpt2: dict[str, object]) -> None:
    """A ``(sum, count)`` user loss: the minibatch estimate on the whole data is L itself, and the chains run."""
    ids, mask, labels = gpt2["ids"], gpt2["mask"], gpt2["labels"]
    problem = Problem(gpt2["model"], {"input_ids": ids, "attention_mask": mask}, labels,  # type: ignore[arg-type]
                      sum_count_causal_lm)
    assert problem.pair_loss and problem.num_terms == 45
    from basins.engine.minibatch import MinibatchLoss

    mb = MinibatchLoss(problem, 6)
    v = mb.value(problem.theta0[None], mb.batch_at(torch.arange(6)[None]))
    assert float(v[0]) == pytest.approx(problem.loss_at_optimum, rel=1e-12)
    r = llc(problem, num_burnin=20, num_draws=40, minibatch=3, quadratic=False)
    assert math.isfinite(r.llc) and r.minibatch == 3


def test_cli_refined_llc_of_a_block(gpt2: dict[str, object]) -> None:
    d: Path = gpt2["dir"]  # type: ignore[assignment]
    r = CliRunner().invoke(main, ["llc", str(d), "--data", str(d.parent / "tok.pt"), "--loss", "causal-lm",
                                  "--params", "transformer.h.0.attn.*", "--draws", "60", "--burnin", "30",
                                  "--no-quadratic", "--json", "-q"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["block"] == "transformer.h.0.attn.*" and out["num_params"] == out["block_num_params"] < 2040
