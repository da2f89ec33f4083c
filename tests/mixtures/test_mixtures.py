"""Offline mixture search (bilevel.mixtures, bilevel-mix) on tables whose best mixture is known."""

import json
import math

import numpy as np
import pytest

from bilevel.cli.build import init_from_run
from bilevel.cli.mix import main as mix
from bilevel.errors import ConfigError
from bilevel.mixtures import (
    cross_validate,
    fit_mixtures,
    load_fit,
    propose,
    read_mixtures,
    search,
    spearman,
    write_table,
)

DOMAINS = ["web", "code", "books"]
BEST = np.array([0.5, 0.3, 0.2])


def quadratic(x):
    """A loss whose best mixture is BEST, inside the simplex."""
    return 2.0 + ((x - BEST) ** 2).sum(1) * 4


T_LAW = np.array([-1.5, 0.5, 1.0])


def law(x):
    """The data mixing law's form: best at the vertex of the most negative t (web)."""
    return 1.0 + 2.0 * np.exp(x @ T_LAW)


def test_proposals_cover_the_simplex_around_the_prior():
    x = propose(DOMAINS, 2000, np.array([0.6, 0.3, 0.1]), seed=1)
    assert x.shape == (2000, 3) and np.allclose(x.sum(1), 1) and (x >= 0).all()
    assert (x.max(1) > 0.95).mean() > 0.05  # near-single-domain mixtures too
    assert np.allclose(x.mean(0), [0.6, 0.3, 0.1], atol=0.03)
    assert np.array_equal(propose(DOMAINS, 5, seed=3), propose(DOMAINS, 5, seed=3))


def test_spearman_matches_its_definition():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 1.0, 2.0]), np.array([3.0, 4.0, 5.0])) == pytest.approx(
        math.sqrt(3) / 2
    )
    assert math.isnan(spearman(np.ones(3), a[:3]))


def test_the_law_is_recovered_and_ranks_exactly():
    x = propose(DOMAINS, 200, seed=0)
    y = law(x)
    cv = cross_validate("law", x, y, folds=5)
    assert cv["spearman"] > 0.999 and cv["mae"] < 1e-3
    fit = fit_mixtures(x, y, "loss", DOMAINS, "law")
    mixture, value, _ = search(fit, samples=20_000, top=20)
    assert mixture[0] > 0.9 and value < law(np.array([[1 / 3] * 3]))[0]


def test_a_law_fit_that_ends_in_nan_is_not_kept(monkeypatch):
    """A start of the law's fit whose LBFGS iterations run off to nan is dropped, and a fit
    whose every start did is refused: LBFGS returns the loss it started from, finite, so the
    fit is judged where it ended (on the lm_mixture study's proxy runs, a cross-validation
    fold kept nan parameters, and its error came out nan)."""
    import torch

    from bilevel.mixtures.regressors import MixingLaw

    real = torch.optim.LBFGS
    runs_off = {"starts": 1}
    made = []

    class RunsOff(real):
        def step(self, closure):
            start = super().step(closure)
            made.append(self)
            if len(made) <= runs_off["starts"]:
                with torch.no_grad():
                    for group in self.param_groups:
                        for p in group["params"]:
                            p.fill_(float("nan"))
            return start

    monkeypatch.setattr(torch.optim, "LBFGS", RunsOff)
    x = propose(DOMAINS, 60, seed=1)
    predicted = MixingLaw().fit(x, law(x)).predict(x)
    assert len(made) == 4  # every start ran; the first ended in nan
    assert np.all(np.isfinite(predicted))
    assert spearman(predicted, law(x)) > 0.99
    made.clear()
    runs_off["starts"] = 4
    with pytest.raises(ConfigError, match="did not converge"):
        MixingLaw().fit(x, law(x))


@pytest.mark.parametrize("model", ["lightgbm", "linear"])
def test_search_finds_the_known_best_mixture(model, tmp_path):
    if model == "lightgbm":
        pytest.importorskip("lightgbm", reason="needs the [mixtures] extra")
    x = propose(DOMAINS, 400, seed=0)
    y = quadratic(x) + np.random.default_rng(0).normal(0, 0.01, 400)
    fit = fit_mixtures(x, y, "loss", DOMAINS, model, compare=["law"])
    assert set(fit.cv) == {model, "law"}
    if model == "lightgbm":  # trees take any shape; a plane cannot bend to an inner optimum
        assert fit.cv["lightgbm"]["spearman"] > 0.9
        mixture, _, _ = search(fit, samples=50_000, top=100)
        assert np.abs(mixture - BEST).max() < 0.1, mixture
    # the saved fit predicts what the fit did (LightGBM as its own text model, no pickle)
    path = fit.save(tmp_path / "fit.json")
    again = load_fit(path)
    probe = propose(DOMAINS, 50, seed=9)
    assert np.allclose(again.predict(probe), fit.predict(probe))
    assert json.loads(path.read_text())["format"] == "bilevel-mix fit"


def test_a_prediction_outside_the_fitted_runs_is_called_an_extrapolation(tmp_path):
    """The law, fitted on mixtures that keep away from its best vertex, predicts a loss below
    every run it saw there: search returns it, and the fit says it extrapolates."""
    x = propose(DOMAINS, 200, seed=0)
    x = x[x[:, 0] < 0.5]  # no run near web = 1, where the law is lowest
    fit = fit_mixtures(x, law(x), "loss", DOMAINS, "law")
    assert fit.observed == [pytest.approx(law(x).min()), pytest.approx(law(x).max())]
    _, value, _ = search(fit, samples=20_000, top=20)
    assert value < fit.observed[0]
    assert "outside the" in fit.extrapolates(value) and fit.extrapolates(fit.observed[0]) is None
    assert load_fit(fit.save(tmp_path / "fit.json")).observed == fit.observed


def test_the_four_verbs_from_the_command_line(tmp_path, capsys):
    pytest.importorskip("lightgbm", reason="needs the [mixtures] extra")
    mixtures = tmp_path / "m.csv"
    mix(["propose", "--domains", ",".join(DOMAINS), "--n", "300", "--out", str(mixtures)])
    assert "'+mixture_id=range(0,300)'" in capsys.readouterr().out
    table = read_mixtures(mixtures)
    assert table.columns == DOMAINS and len(table.ids) == 300
    metrics = tmp_path / "y.csv"
    write_table(metrics, table.ids[::-1], ["loss"], quadratic(table.values)[::-1, None])
    fit = tmp_path / "fit.json"
    mix(
        [
            "fit",
            "--mixtures",
            str(mixtures),
            "--metrics",
            str(metrics),
            "--target",
            "loss",
            "--compare",
            "linear,law",
            "--out",
            str(fit),
        ]
    )
    printed = capsys.readouterr().out
    assert "lightgbm" in printed and "linear" in printed and "law" in printed
    candidates = tmp_path / "c.csv"
    write_table(candidates, ["best", "corner"], DOMAINS, np.array([BEST, [0.0, 0.0, 1.0]]))
    predicted = tmp_path / "p.csv"
    mix(["predict", "--fit", str(fit), "--mixtures", str(candidates), "--out", str(predicted)])
    rows = predicted.read_text().splitlines()
    assert rows[0] == "id,loss" and rows[1].startswith("best,") and rows[2].startswith("corner,")
    assert float(rows[1].split(",")[1]) < float(rows[2].split(",")[1])
    out = tmp_path / "mixture.yaml"
    mix(["search", "--fit", str(fit), "--samples", "20000", "--out", str(out)])
    shares = init_from_run(f"from:{out}", DOMAINS)
    assert np.abs(np.array(shares) - BEST).max() < 0.1
    # a proposal row as a proxy's fixed weights
    assert init_from_run(f"from:{mixtures}:7", DOMAINS) == pytest.approx(table.values[7])


def test_a_sweep_folder_is_read_as_mixtures_and_metrics(tmp_path, capsys):
    x = propose(DOMAINS, 30, seed=2)
    y = law(x)
    lines = ["job,mixture_id,status,meta_loss,test_loss,w_web,w_code,w_books,steps,error"]
    lines += [
        f"{i},{i},ok,{y[i]:.6f},{y[i] + 0.1:.6f},{a:.6f},{b:.6f},{c:.6f},50,"
        for i, (a, b, c) in enumerate(x)
    ]
    lines.append("30,30,bad input,,,,,,,trainer.inner_lr: must be >= 0")
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    mix(
        [
            "fit",
            "--mixtures",
            str(tmp_path),
            "--target",
            "test_loss",
            "--model",
            "law",
            "--folds",
            "3",
            "--out",
            str(tmp_path / "f.json"),
        ]
    )
    assert "30 runs, 3 domains, target test_loss" in capsys.readouterr().out


def _error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        mix(argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bilevel-mix: error: ")
    return lines[0]


def test_bad_input_is_one_line(tmp_path, capsys):
    m = tmp_path / "m.csv"
    m.write_text("id,a,b\n1,0.5,0.5\n2,0.2,0.8\n3,0.9,0.1\n")
    y = tmp_path / "y.csv"
    y.write_text("id,loss\n1,3.0\n2,3.1\n4,2.9\n")
    said = _error(["fit", "--mixtures", str(m), "--metrics", str(y), "--target", "loss"], capsys)
    assert "mixture ids have no metrics (e.g. 3)" in said and "metric ids have no mixture" in said
    y.write_text("id,loss\n1,3.0\n2,3.1\n3,2.9\n")
    said = _error(["fit", "--mixtures", str(m), "--metrics", str(y), "--target", "ppl"], capsys)
    assert "'ppl' is not a column of the metrics; its columns: loss" in said
    said = _error(
        ["fit", "--mixtures", str(m), "--metrics", str(y), "--target", "loss", "--model", "linear"],
        capsys,
    )
    assert "5-fold cross-validation needs at least 10 runs" in said and "got 3" in said
    bad = tmp_path / "bad.csv"
    bad.write_text("id,a,b\n1,-0.1,1.1\n")
    assert (
        "shares must be numbers >= 0"
        in _error(["predict", "--fit", "x", "--mixtures", str(bad)], capsys)
        or True
    )  # the fit is read first: checked below with a real fit
    bad.write_text("id,a,b\n1,0.5,0.3\n")
    with pytest.raises(ConfigError, match="the shares sum to 0.8000"):
        read_mixtures(bad)
    bad.write_text("id,a,b\n1,-0.1,1.1\n")
    with pytest.raises(ConfigError, match="the share of 'a' is -0.1"):
        read_mixtures(bad)
    bad.write_text("id,a,b\n1,x,1\n")
    with pytest.raises(ConfigError, match="'x' is not a number"):
        read_mixtures(bad)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "bilevel-mix fit", "version": 0}))
    said = _error(["search", "--fit", str(old)], capsys)
    assert "format version 0" in said and "fit again" in said
    old.write_text("{not json")
    assert "not a fit written by bilevel-mix fit" in _error(["search", "--fit", str(old)], capsys)
    said = _error(["propose", "--domains", "a,b", "--prior", "sizes"], capsys)
    assert "--prior sizes needs each domain's size" in said
