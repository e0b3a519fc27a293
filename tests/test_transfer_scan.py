"""Transfer attacks inside a scan: the battery stage, `--access none`, results and report."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import auditor
from auditor.access import Access
from auditor.attacks import BY_LABEL
from auditor.battery import AttackReport, Battery, RunReport, SurrogateSet, build_battery, run_battery
from auditor.cli import main
from auditor.errors import AuditError
from auditor.models import ModelInfo, TorchModel, load_model
from auditor.report.build import build_view
from auditor.report.render import _environment
from auditor.report.transfer import transfer_view
from auditor.results import TIMING_FIELDS, dump, transfer_entry
from auditor.scan import resolve_surrogates
from auditor.surrogates import Surrogate

METHODS = ("transfer-ifgsm-linf", "transfer-mi-di-ti-linf")


class CountingModule(nn.Module):
    """Wraps a module and counts the images it is shown."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return self.module(x)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDITOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_transfer_costs_the_target_one_query_per_sample_per_run(tiny_cnn, mnist_test):
    x, y = mnist_test.x[:40], mnist_test.y[:40]
    target = CountingModule(copy.deepcopy(tiny_cnn))
    model = TorchModel(target, ModelInfo("tiny", "state-dict", "0", (1, 28, 28), 10), device="cpu")
    # the surrogates: two other networks (a perturbed copy and an MLP), alone and as an ensemble
    other = copy.deepcopy(tiny_cnn)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    sets = (SurrogateSet("cnn", (other,)), SurrogateSet("mlp", (mlp,)), SurrogateSet("ensemble", (other, mlp)))
    battery = Battery(Access.NONE, "linf", tuple(BY_LABEL[name] for name in METHODS))
    eps_list = [0.1, 0.2]
    outcome = run_battery(battery, model, x, y, eps_list=eps_list, budget=None, seed=0, surrogates=sets)
    clean_wrong = int((outcome.clean_pred != y).sum())
    # every run sees the samples robust at its ε when the transfer stage began, the same for all
    for report in outcome.attacks:
        assert [(run.eps, run.surrogate) for run in report.runs] == [
            (eps, group.name) for eps in (0.2, 0.1) for group in sets
        ]
        assert {run.samples for run in report.runs} == {len(y) - clean_wrong}
        assert all(set(run.queries) == {1} for run in report.runs)
    runs = len(METHODS) * len(sets) * len(eps_list)
    # the clean predictions, one verification per sample per run, and nothing else
    assert target.rows == len(y) + runs * (len(y) - clean_wrong)


def test_transfer_attacks_need_surrogates():
    with pytest.raises(AuditError, match="--access none runs only transfer attacks"):
        build_battery(Access.NONE, "linf")
    battery = build_battery(Access.NONE, "linf", transfer=True)
    assert battery.attacks and all(a.access == Access.NONE for a in battery.attacks)
    with pytest.raises(AuditError, match="needs surrogate models"):
        build_battery(Access.HARD_LABEL, "linf", [METHODS[0]])
    # at any level, given surrogates, they follow the level's own attacks
    labels = [a.label for a in build_battery(Access.HARD_LABEL, "linf", transfer=True).attacks]
    assert labels[0] == "sign-opt-linf" and labels[-1] == "random-noise-linf"
    assert METHODS[0] in labels and labels.index(METHODS[0]) > labels.index("hop-skip-jump-linf")


def test_access_none_scan_writes_the_matrix_and_the_report(example_onnx, cache, tmp_path):
    out = tmp_path / "scan"
    with pytest.raises(SystemExit) as exit_info:
        main(["scan", str(example_onnx), "--access", "none", "--train-surrogates", "3", "--data", "mnist",
              "-n", "30", "--eps", "0.2", "--attacks", ",".join(METHODS), "--out", str(out)])
    assert exit_info.value.code == 0
    results = json.loads((out / "results.json").read_text())
    transfer = results["transfer"]
    assert [s["name"] for s in transfer["surrogates"]] == ["mlp", "cnn", "resnet"]
    assert all(0.5 < s["clean_accuracy"] <= 1 for s in transfer["surrogates"])
    assert transfer["sets"] == ["mlp", "cnn", "resnet", "ensemble"] and transfer["baseline"] == METHODS[0]
    matrix = transfer["matrix"]["0.2"]
    assert set(matrix) == set(METHODS) and all(set(row) == set(transfer["sets"]) for row in matrix.values())
    # the worst case over the matrix is the robust accuracy
    broken = [s for s in results["samples"] if s["broken_by"] not in (None, "clean")]
    assert broken and all(s["broken_by"] in METHODS for s in broken)
    assert results["robust_accuracy"]["0.2"] <= 1 - max(max(row.values()) for row in matrix.values()) * \
        transfer["samples"]["0.2"] / results["data"]["n"] + 1e-6
    # transfer attacks alone overstate robust accuracy: a warning, not an info line
    assert {(c["id"], c["level"]) for c in results["checks"]} >= {("transfer-only", "warning")}
    assert "access-limited" not in {c["id"] for c in results["checks"]}
    html = (out / "report.html").read_text()
    assert "Transfer attacks" in html and 'class="data heatmap"' in html
    assert (out / "report.pdf").stat().st_size > 0
    # the surrogates are cached: a second scan trains nothing
    cached = sorted(p.name for p in (cache / "surrogates").iterdir())
    assert len(cached) == 3
    again = auditor.scan(example_onnx, "mnist", access="none", samples=30, eps=[0.2], attacks=list(METHODS),
                         train_surrogates=3, command=results["manifest"]["command"])
    assert sorted(p.name for p in (cache / "surrogates").iterdir()) == cached
    # from the cache, results.json is the one training gave, the weights' sha256 included
    assert all(len(s["sha256"]) == 64 for s in transfer["surrogates"])
    assert _untimed(json.loads(dump(again.results))) == _untimed(results)


def _untimed(results: dict) -> dict:
    """``results`` without the fields that differ between two runs with the same seed."""
    kept = {key: value for key, value in results.items() if key not in TIMING_FIELDS}
    kept["attacks"] = [{k: v for k, v in attack.items() if k != "seconds"} for attack in results["attacks"]]
    return kept


def test_bad_surrogate_input_is_one_clear_error(example_onnx, cache, tmp_path, mnist_test):
    with pytest.raises(AuditError, match="--access none runs only transfer attacks"):
        auditor.scan(example_onnx, "mnist", access="none", samples=10)
    with pytest.raises(AuditError, match="file not found"):
        auditor.scan(example_onnx, "mnist", access="none", samples=10, surrogates=[tmp_path / "missing.onnx"])
    npz = tmp_path / "data.npz"
    import numpy as np

    np.savez(npz, x=mnist_test.x[:20].numpy(), y=mnist_test.y[:20].numpy())
    with pytest.raises(AuditError, match="needs a training split"):
        auditor.scan(example_onnx, str(npz), access="none", train_surrogates=1)
    # a negative count said "give --surrogate PATH or --train-surrogates K"
    with pytest.raises(AuditError, match="^--train-surrogates must be >= 0, got -1$"):
        auditor.scan(example_onnx, "mnist", access="none", samples=10, train_surrogates=-1)


def test_report_heat_map_states_rates_gains_and_the_best_cell():
    results = {"transfer": {
        "surrogates": [{"name": "mlp", "source": "trained", "clean_accuracy": 0.93}],
        "sets": ["mlp", "ensemble"], "baseline": "transfer-ifgsm-linf", "samples": {"0.2": 50},
        "matrix": {"0.2": {"transfer-ifgsm-linf": {"mlp": 0.5, "ensemble": 0.6},
                           "transfer-mi-linf": {"mlp": 0.62, "ensemble": 0.58}}},
    }}
    view = transfer_view(results)
    (matrix,) = view.matrices
    assert matrix.eps == "0.2" and matrix.samples == 50
    base, mi = matrix.rows
    assert base.baseline and [c.text for c in base.cells] == ["50.0 %", "60.0 %"] and base.cells[0].gain == ""
    assert [c.gain for c in mi.cells] == ["+12.0", "-2.0"]
    assert matrix.best == ("Best: transfer-mi-linf from mlp, 62.0 % of the samples, "
                           "against 50.0 % for transfer-ifgsm-linf (+12.0 points).")
    assert view.surrogates[0].clean_accuracy == "93.0 %"
    assert transfer_view({"transfer": None}) is None


def test_surrogates_must_have_the_models_classes_and_a_weak_one_is_flagged(example_onnx, tmp_path):
    """A surrogate with other classes is one clear error (two of them crashed
    stacking their logits); a pickled surrogate loads with trust_pickle, as
    the model does; an untrained surrogate gets a weak-surrogate warning."""
    torch.manual_seed(0)

    def linear(classes: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, classes))

    twelve = tmp_path / "twelve.pt"
    torch.jit.trace(linear(12), torch.zeros(1, 1, 28, 28)).save(str(twelve))
    with pytest.raises(AuditError, match=r"surrogate .*twelve.pt has 12 classes, the model 10"):
        auditor.scan(example_onnx, "mnist", access="none", samples=8, eps=[0.2], surrogates=[twelve])
    pickled = tmp_path / "untrained.pth"
    torch.save(linear(10), pickled)
    with pytest.raises(AuditError, match=r"surrogate .*untrained.pth: .*--trust-pickle"):
        auditor.scan(example_onnx, "mnist", access="none", samples=8, eps=[0.2], surrogates=[pickled])
    audit = auditor.scan(example_onnx, "mnist", access="none", samples=8, eps=[0.2], surrogates=[pickled],
                         attacks=["transfer-ifgsm"], trust_pickle=True)
    (weak,) = [check for check in audit.results["checks"] if check["id"] == "weak-surrogate"]
    assert weak["level"] == "warning" and weak["message"].startswith("surrogate untrained.pth classifies")


def _transfer_html(baseline: str | None) -> str:
    results = {"transfer": {
        "surrogates": [{"name": "mlp", "source": "trained", "sha256": "ab" * 32, "clean_accuracy": 0.93}],
        "sets": ["mlp"], "baseline": baseline, "samples": {"0.2": 50},
        "matrix": {"0.2": {"transfer-mi-linf": {"mlp": 0.62}}},
    }}
    view = SimpleNamespace(transfer=transfer_view(results))
    return " ".join(_environment().get_template("_transfer.html.j2").render(view=view).split())


def test_report_promises_a_gain_over_i_fgsm_only_where_it_ran():
    """Without plain I-FGSM (--attacks chose others) the lead still promised
    each cell's gain over it, and no cell had one."""
    assert "gain over" not in _transfer_html(None)
    assert "the method's examples fooled." in _transfer_html(None)
    assert "with its gain over transfer-ifgsm-linf (plain I-FGSM)" in _transfer_html("transfer-ifgsm-linf")
    assert '<td class="mono">' + "ab" * 32 + "</td>" in _transfer_html(None)


def test_logit_loss_and_rap_without_late_start_are_chosen_by_name_only():
    """They were unreachable: no label named them."""
    default = {a.label for a in build_battery(Access.NONE, "linf", transfer=True).attacks}
    chosen = build_battery(Access.NONE, "l2", ["transfer-mi-di-ti-logit", "transfer-mi-di-ti-rap-no-ls"], transfer=True)
    assert [a.label for a in chosen.attacks] == ["transfer-mi-di-ti-logit-l2", "transfer-mi-di-ti-rap-no-ls-l2"]
    assert "transfer-mi-di-ti-rap-linf" in default and not {"transfer-mi-di-ti-logit-linf",
                                                            "transfer-mi-di-ti-rap-no-ls-linf"} & default
    assert "transfer-mi-di-ti-rap-no-ls-linf" not in build_battery(
        Access.NONE, "linf", ["transfer-ifgsm"], transfer=True).left_out


def test_auditor_attacks_lists_the_on_request_transfer_methods(capsys):
    with pytest.raises(SystemExit):
        main(["attacks"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["transfer-mi-di-ti-logit-linf"][4] == rows["transfer-mi-di-ti-rap-no-ls-l2"][4] == "no"
    assert rows["transfer-mi-di-ti-rap-linf"][4] == "yes"


class Quantised(nn.Module):
    """Input quantisation to 8 bits: an all-zero input gradient almost everywhere."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 255) / 255)


def _export(module: nn.Module, path) -> None:
    """Save ``module`` as a torch.export program of any batch size, in the mode it is in."""
    program = torch.export.export(module, (torch.zeros(2, 1, 28, 28),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))


def test_randomised_and_gradient_masked_surrogates_are_flagged_and_scans_reproducible(
    example_onnx, tiny_cnn, tmp_path
):
    """A surrogate exported in train mode (dropout on) gave another robust
    accuracy in each run of a seeded scan, and no check said it was random;
    a quantised one masked its gradients unflagged. File surrogates are
    recorded with the sha256 the model loader computes."""
    dropout, quantised = tmp_path / "dropout.pt2", tmp_path / "quantised.pt2"
    _export(nn.Sequential(*copy.deepcopy(tiny_cnn[:2]), nn.Dropout(0.5), *copy.deepcopy(tiny_cnn[2:])).train(),
            dropout)
    _export(Quantised(copy.deepcopy(tiny_cnn)).eval(), quantised)

    def run() -> dict:
        return auditor.scan(example_onnx, "mnist", access="none", samples=30, eps=[0.15], seed=4,
                            surrogates=[dropout, quantised], attacks=["transfer-ifgsm"]).results

    first, second = run(), run()
    assert _untimed(first) == _untimed(second)
    checks = {check["id"]: check for check in first["checks"]}
    assert checks["randomised-surrogate"]["message"].startswith("surrogate dropout.pt2 gave different outputs")
    assert checks["surrogate-zero-gradients"]["message"].startswith(
        "surrogate quantised.pt2 has an all-zero input gradient of its logit margin on 30 of 30")
    assert [s["sha256"] for s in first["transfer"]["surrogates"]] == [
        load_model(path, device="cpu").info.sha256 for path in (dropout, quantised)]
    # where transfer attacks were all that ran, masked surrogate gradients may overstate robust accuracy
    assert first["transfer"]["matrix"]["0.15"]["transfer-ifgsm-linf"]["quantised.pt2"] == 0
    assert first["robust_accuracy"]["0.15"] > 0 and "surrogate-zero-gradients" in build_view(first).verdict.caveat


def _best_sentence(matrix: dict) -> str:
    results = {"transfer": {"surrogates": [], "sets": ["cnn", "mlp"], "baseline": "transfer-ifgsm-linf",
                            "samples": {"0.3": 50}, "matrix": {"0.3": matrix}}}
    return transfer_view(results).matrices[0].best


def test_report_best_cell_leaves_the_baseline_out_and_breaks_ties_by_gain():
    """At 100 % from the cnn, the best cell was the first maximum: the
    baseline itself, "+0.0 points" against itself."""
    base = {"cnn": 1.0, "mlp": 0.4}
    tied = {"transfer-ifgsm-linf": base, "transfer-mi-linf": {"cnn": 1.0, "mlp": 0.9},
            "transfer-di-linf": {"cnn": 0.9, "mlp": 1.0}}
    assert _best_sentence(tied) == ("Best: transfer-di-linf from mlp, 100.0 % of the samples, "
                                    "against 40.0 % for transfer-ifgsm-linf (+60.0 points).")
    no_gain = {"transfer-ifgsm-linf": base, "transfer-mi-linf": {"cnn": 1.0, "mlp": 0.3}}
    assert _best_sentence(no_gain) == ("Best: transfer-mi-linf from cnn, 100.0 % of the samples; "
                                       "no method beats transfer-ifgsm-linf from the same surrogates.")
    alone = {"transfer-ifgsm-linf": base}
    assert _best_sentence(alone) == "Best: transfer-ifgsm-linf from cnn, 100.0 % of the samples."


def test_surrogate_sets_have_distinct_names_and_a_file_counts_once(tmp_path, mnist_test):
    """Two files with one basename, a file named like the ensemble and one
    named like a zoo model: each set keeps its own name (one name made the
    matrix keep a single column for two sets); the same file twice, under
    any path, is one clear error."""
    torch.manual_seed(0)
    paths = [tmp_path / "a" / "surrogate.pt", tmp_path / "b" / "surrogate.pt", tmp_path / "c" / "ensemble",
             tmp_path / "c" / "mlp", tmp_path / "c" / "other.pt"]
    for path in paths:
        path.parent.mkdir(exist_ok=True)
        linear = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        torch.jit.trace(linear, torch.zeros(1, 1, 28, 28)).save(str(path))
    x, y = mnist_test.x[:8], mnist_test.y[:8]
    found, sets = resolve_surrogates(paths, 0, mnist_test, x, y, 10, 0)
    names = ["a/surrogate.pt", "b/surrogate.pt", "c/ensemble", "c/mlp", "other.pt"]
    assert [s.name for s in found] == names and [s.source for s in found] == [str(p) for p in paths]
    assert [group.name for group in sets] == [*names, "ensemble"]
    again = tmp_path / "b" / ".." / "a" / "surrogate.pt"
    twice = r"surrogate .*/a/surrogate.pt is given twice \(also as .*a/surrogate.pt\)"
    with pytest.raises(AuditError, match=twice):
        resolve_surrogates([paths[0], paths[3], again], 0, mnist_test, x, y, 10, 0)
    with pytest.raises(AuditError, match=r"surrogate .*mlp is given twice; give each surrogate once$"):
        resolve_surrogates([paths[3], paths[3]], 0, mnist_test, x, y, 10, 0)


def test_transfer_matrix_refuses_two_runs_for_one_cell():
    """Two runs of one method on two sets of one name overwrote each other."""
    runs = tuple(RunReport(0.2, 10, broken, 10, 0.0, surrogate="surrogate.pt") for broken in (8, 1))
    report = AttackReport(BY_LABEL[METHODS[0]], runs, 10, (), {}, None)
    surrogates = [Surrogate("surrogate.pt", nn.Identity(), f"{folder}/surrogate.pt", "0" * 64) for folder in "ab"]
    sets = tuple(SurrogateSet(s.name, (s.module,)) for s in surrogates)
    with pytest.raises(ValueError, match="two runs of transfer-ifgsm-linf on surrogate set 'surrogate.pt'"):
        transfer_entry(surrogates, sets, [report], [0.2])
