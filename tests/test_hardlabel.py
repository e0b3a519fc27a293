"""What the hard-label attacks share: exact batching, the L∞ ray search and starts from the data."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from helpers import Counting, ball_case, label_oracle, predict
from hypothesis import given, settings
from hypothesis import strategies as st

from auditor.attacks import BY_LABEL
from auditor.attacks.base import distortion
from auditor.attacks.hardlabel.shared import BestAdversarial, Directions, SampleRandom, StartPool, subspace_factor
from auditor.attacks.hardlabel.hop_skip_jump import HopSkipJump
from auditor.attacks.hardlabel.opt import OPT
from auditor.attacks.hardlabel.random_noise import RandomNoise
from auditor.attacks.hardlabel.ray_search import Stall
from auditor.attacks.hardlabel.sign_opt import SignOPT
from auditor.battery import distortion_at, queries_to_reach
from auditor.oracles import LabelOracle

pytestmark = pytest.mark.usefixtures("one_thread")

ATTACKS = {
    "sign-opt-l2": SignOPT(k=30, n_init=10),
    "sign-opt-linf": SignOPT(norm="linf", k=30, n_init=10),
    "opt-l2": OPT(q=5, n_init=10),
    "hop-skip-jump-l2": HopSkipJump(init_num_evals=20, n_init=20),
    "hop-skip-jump-linf": HopSkipJump(norm="linf", init_num_evals=20, n_init=20),
}


@pytest.fixture(scope="module")
def model64(tiny_cnn):
    return copy.deepcopy(tiny_cnn).double()


def one_by_one(model64):
    """Labels computed image by image: the model's numbers cannot depend on the batch."""

    def labels(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model64(image[None].double()) for image in z]).argmax(1)

    return labels


@pytest.mark.parametrize("label", list(ATTACKS))
def test_batching_is_exact(model64, correct_batch, label):
    """A batch of 8 gives each sample exactly what it gets alone, with the same seed."""
    attack = ATTACKS[label]
    x, y = correct_batch[0][:8], correct_batch[1][:8]
    labels = one_by_one(model64)
    batch = attack(LabelOracle(labels, 8, 300), x, y, seed=3)
    assert batch.success.any()
    for i in range(8):
        alone = attack(LabelOracle(labels, 1, 300), x[i : i + 1], y[i : i + 1], seed=3)
        assert torch.equal(alone.x_adv[0], batch.x_adv[i]), f"sample {i}"
        assert bool(alone.success[0]) == bool(batch.success[i])
        assert int(alone.queries[0]) == int(batch.queries[i])
        assert torch.equal(alone.trace[-1][1][0], batch.trace[-1][1][i])
        for bound in (1.0, 3.0):  # queries to come within a bound, read from the trace
            reached_alone = queries_to_reach(alone.trace, bound, alone.queries)
            assert int(reached_alone[0]) == int(queries_to_reach(batch.trace, bound, batch.queries)[i])


@pytest.mark.parametrize("norm, eps", [("linf", 0.3), ("l2", 3.0)])
def test_random_noise_batching_is_exact(model64, correct_batch, norm, eps):
    """Each sample's noise comes from its own stream: its draws, and whether
    one breaks it, do not depend on the other samples in the batch."""
    attack = RandomNoise(norm=norm)
    x, y = correct_batch[0][:8], correct_batch[1][:8]
    labels = one_by_one(model64)
    batch = attack(LabelOracle(labels, 8, 16), x, y, eps=eps, seed=3)
    assert batch.success.any() and not batch.success.all()
    for i in range(8):
        alone = attack(LabelOracle(labels, 1, 16), x[i : i + 1], y[i : i + 1], eps=eps, seed=3)
        assert torch.equal(alone.x_adv[0], batch.x_adv[i]), f"sample {i}"
        assert int(alone.queries[0]) == int(batch.queries[i])


class FirstAdversarial(LabelOracle):
    """A label oracle that notes, per sample, its query count after the
    first call that returned it an adversarial label."""

    def __init__(self, labels, y, budget):
        super().__init__(labels, len(y), budget)
        self.y = y
        self.first = torch.full((len(y),), -1)

    def labels(self, x, idx=None):
        out = super().labels(x, idx)
        rows = torch.arange(len(self.y)) if idx is None else torch.as_tensor(idx)
        hit = rows[out.cpu() != self.y[rows]].unique()
        hit = hit[self.first[hit] < 0]
        self.first[hit] = self.queries()[hit]
        return out


@pytest.mark.parametrize("label", ["sign-opt-l2", "opt-l2", "hop-skip-jump-l2"])
def test_trace_shows_what_the_initialisation_found(model64, correct_batch, label):
    """The trace has the queries at which each sample's best example first
    appeared, not the queries at the end of the initialisation: a sample's
    first adversarial label is followed only by that direction's binary
    search (at most ~20 queries here) before it holds an example."""
    attack = replace(ATTACKS[label], n_init=100)
    x, y = correct_batch[0][:8], correct_batch[1][:8]
    oracle = FirstAdversarial(one_by_one(model64), y, 400)
    result = attack(oracle, x, y, seed=0)
    reached = queries_to_reach(result.trace, 1e6, result.queries)  # first held any adversarial
    found = result.success
    assert found.sum() >= 6
    assert (reached[found] >= oracle.first[found]).all()
    assert (reached[found] <= oracle.first[found] + 25).all(), (reached, oracle.first)
    # the whole initialisation costs far more: a trace read only after it would be late
    assert (reached[found] < 60).float().mean() > 0.5


class Ledger(LabelOracle):
    """A label oracle that writes down every query: the sample, its query
    number, and whether the image was adversarial and how far it lay."""

    def __init__(self, labels, x, y, norm, budget):
        super().__init__(labels, len(y), budget)
        self.x, self.y, self.norm = x, y, norm
        self.entries: list[tuple[int, int, float]] = []  # (sample, query number, distortion of an adversarial image)

    def labels(self, x, idx=None):
        before = self.queries()
        out = super().labels(x, idx)
        rows = torch.arange(len(self.y)) if idx is None else torch.as_tensor(idx)
        seen = torch.zeros(len(self.y), dtype=torch.long)
        for row, image, label in zip(rows.tolist(), x, out.tolist()):
            seen[row] += 1
            if label != int(self.y[row]):
                size = float(distortion(image[None] - self.x[row : row + 1], self.norm))
                self.entries.append((row, int(before[row] + seen[row]), size))
        return out

    def best_within(self, queries: int) -> torch.Tensor:
        """Per sample, the smallest adversarial distortion among its first ``queries`` queries."""
        best = torch.full((len(self.y),), float("inf"), dtype=torch.float64)
        for row, number, size in self.entries:
            if number <= queries:
                best[row] = min(best[row], size)
        return best

    def first_within(self, bound: float) -> torch.Tensor:
        """Per sample, the query number of its first adversarial image within ``bound`` (-1: none)."""
        first = torch.full((len(self.y),), -1, dtype=torch.long)
        for row, number, size in self.entries:
            if size <= bound and (first[row] < 0 or number < first[row]):
                first[row] = number
        return first


@pytest.mark.parametrize("label", list(ATTACKS))
def test_the_best_and_its_trace_are_exact_to_the_query(model64, correct_batch, label):
    """``x_adv`` is the closest adversarial image the attack ever queried,
    and the trace gives, per sample, the very query at which its best came
    within a bound, and its best after any number of queries: probes, step
    tries and searches all count, not only the iterate each step settles on."""
    attack = ATTACKS[label]
    x, y = correct_batch[0][:8], correct_batch[1][:8]
    oracle = Ledger(one_by_one(model64), x, y, attack.norm, 400)
    result = attack(oracle, x, y, seed=0)
    sizes = distortion(result.x_adv - x, attack.norm).double()
    assert result.success.sum() >= 6
    assert torch.allclose(sizes[result.success], oracle.best_within(400)[result.success], rtol=1e-6)
    for queries in (30, 100, 250):
        at = dict(distortion_at(result.trace, result.queries, checkpoints=(queries,)))[queries]
        assert torch.allclose(torch.tensor(at, dtype=torch.float64), oracle.best_within(queries), rtol=1e-6), queries
    for bound in sorted({float(s) for s in sizes[result.success]})[::2]:
        first = oracle.first_within(bound * (1 + 1e-9))
        reached = queries_to_reach(result.trace, bound * (1 + 1e-9), result.queries)
        assert torch.equal(reached[first > 0], first[first > 0]), bound


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 5), calls=st.integers(1, 6), repeats=st.booleans())
def test_best_adversarial_records_every_improvement_at_its_query(seed, n, calls, repeats):
    """Calls with one row per sample or several, against a row-by-row
    reference: the same best image per sample, and a trace that reads, for
    every bound and query count, what the reference saw by then."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 3, 3, generator=gen)
    spent = torch.zeros(n, dtype=torch.long)
    best = BestAdversarial(x0, "l2", lambda: spent.clone())
    seen = []  # (sample, query number, distortion) of every adversarial row
    ref_x, ref_size = x0.clone(), torch.full((n,), float("inf"))
    for _ in range(calls):
        rows = torch.randint(0, n, (3 * n,), generator=gen) if repeats else torch.randperm(n, generator=gen)
        images = (x0[rows] + torch.randn(len(rows), 1, 3, 3, generator=gen)).clamp(0, 1)
        adversarial = torch.rand(len(rows), generator=gen) < 0.6
        before = spent.clone()
        spent += torch.bincount(rows, minlength=n)
        best.record(rows, images, adversarial, before)
        number = before.clone()
        for row, image, adv in zip(rows.tolist(), images, adversarial.tolist()):
            number[row] += 1
            size = float(distortion(image[None] - x0[row : row + 1], "l2"))
            if adv:
                seen.append((row, int(number[row]), size))
                if size < ref_size[row]:
                    ref_x[row], ref_size[row] = image, size
    assert torch.equal(best.x, ref_x)
    trace = best.closed_trace()
    for bound in sorted({size for _, _, size in seen}):
        first = torch.full((n,), -1)
        for row, number, size in seen:
            if size <= bound and first[row] < 0:
                first[row] = number
        reached = queries_to_reach(trace, bound, spent)
        assert torch.equal(reached[first > 0], first[first > 0])
    for queries in range(1, int(spent.max()) + 1):
        held = dict(distortion_at(trace, spent, checkpoints=(queries,))).get(queries)
        if held is None:
            continue
        want = [min([size for row, number, size in seen if row == i and number <= queries], default=float("inf")) for i in range(n)]
        assert torch.allclose(torch.tensor(held, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)), queries


@pytest.mark.parametrize("label", ["sign-opt-l2", "hop-skip-jump-l2"])
def test_float64_images_run(model64, correct_batch, label):
    """The ray search keeps g in its own dtype (float64 images stopped it
    with 'Index put requires the source and destination dtypes match')."""
    x, y = correct_batch[0][:2].double(), correct_batch[1][:2]
    result = ATTACKS[label](LabelOracle(lambda z: model64(z).argmax(1), 2, 120), x, y, seed=0)
    assert result.success.all() and result.x_adv.dtype == torch.float64


def test_probes_per_call_do_not_change_results(model64, correct_batch):
    x, y = correct_batch[0][:6], correct_batch[1][:6]
    labels = one_by_one(model64)
    wide = SignOPT(k=30, n_init=10)(LabelOracle(labels, 6, 300), x, y, seed=1)
    counter = Counting(labels)
    narrow = SignOPT(k=30, n_init=10, max_values=40 * 28 * 28)(LabelOracle(counter, 6, 300), x, y, seed=1)
    assert torch.equal(wide.x_adv, narrow.x_adv) and torch.equal(wide.queries, narrow.queries)
    assert counter.rows == int(narrow.queries.sum())


@settings(max_examples=8, deadline=None)
@given(budget=st.integers(0, 300), seed=st.integers(0, 2**16), n=st.integers(1, 5))
def test_sign_opt_linf_never_exceeds_the_budget(model64, correct_batch, budget, seed, n):
    x, y = correct_batch[0][:n], correct_batch[1][:n]
    counter = Counting(lambda z: model64(z.double()).argmax(1))
    oracle = LabelOracle(counter, n, budget)
    result = SignOPT(norm="linf", k=20, n_init=5)(oracle, x, y, seed=seed)
    assert (result.queries <= budget).all() and torch.equal(result.queries, oracle.queries())
    assert counter.rows == int(result.queries.sum())


def test_sign_opt_linf_finds_small_linf_examples(model64, correct_batch):
    x, y = correct_batch[0][:16], correct_batch[1][:16]
    oracle = LabelOracle(lambda z: model64(z.double()).argmax(1), 16, 1500)
    result = SignOPT(norm="linf")(oracle, x, y, seed=0)
    ok = result.success
    assert ok.float().mean() > 0.9
    assert (predict(model64, result.x_adv[ok]) != y[ok]).all()
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    linf = distortion(result.x_adv - x, "linf")
    first, last = result.trace[0][1], result.trace[-1][1]
    # the trace holds L∞ distances, and the search shrinks them
    assert torch.allclose(last[ok], linf[ok].to(last.dtype), atol=1e-5)
    # measured: median L∞ 0.39 at 1,500 queries, from 0.88 after initialisation
    assert last[ok].median() < 0.6 * first[ok].median()


@pytest.mark.parametrize(("shape", "factor"), [((1, 28, 28), 2), ((3, 32, 32), 2), ((3, 64, 64), 4),
                                             ((3, 224, 224), 4), ((1, 8, 8), 1)])
def test_auto_subspace_factor(shape, factor):
    assert subspace_factor("auto", shape) == factor
    assert subspace_factor(3, shape) == 3


@pytest.mark.parametrize("attack", [SignOPT, OPT, HopSkipJump])
@pytest.mark.parametrize("subspace", [0, -1, "full", 1.5, True])
def test_bad_subspace_is_refused(attack, subspace):
    with pytest.raises(ValueError, match="subspace"):
        attack(subspace=subspace)


def test_subspace_directions_are_bilinear_upsamplings_of_per_sample_draws(correct_batch):
    x = correct_batch[0][:3]
    rows, counts = torch.tensor([0, 2]), torch.tensor([2, 3])
    lifted = Directions(SampleRandom(5, x), (1, 28, 28), 2).gaussian(rows, counts)
    coarse = SampleRandom(5, x).randn(rows, counts, (1, 14, 14))
    expected = torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)
    assert lifted.shape == (5, 1, 28, 28)
    assert torch.allclose(lifted, expected, atol=1e-6)
    # factor 1 is the full-dimensional draw itself
    full = Directions(SampleRandom(5, x), (1, 28, 28), 1).gaussian(rows, counts)
    assert torch.equal(full, SampleRandom(5, x).randn(rows, counts, (1, 28, 28)))


def test_refined_samples_draw_in_full_dimension(correct_batch):
    """After ``refine``, a sample's draws are its stream's full-dimensional
    ones; the others stay lifted from the grid; rows keep their order."""
    x = correct_batch[0][:3]
    rows, counts = torch.tensor([0, 1, 2]), torch.tensor([2, 1, 3])
    directions = Directions(SampleRandom(5, x), (1, 28, 28), 2)
    directions.refine(torch.tensor([1]))
    drawn = directions.gaussian(rows, counts)
    stream = SampleRandom(5, x)
    coarse = stream.randn(torch.tensor([0, 2]), torch.tensor([2, 3]), (1, 14, 14))
    lifted = torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)
    assert torch.allclose(drawn[[0, 1, 3, 4, 5]], lifted, atol=1e-6)
    assert torch.equal(drawn[2:3], stream.randn(torch.tensor([1]), 1, (1, 28, 28)))
    uniform = directions.uniform(torch.tensor([1]), 2)
    assert uniform.shape == (2, 1, 28, 28) and uniform.abs().max() <= 1


def test_stall_fires_when_g_falls_by_less_than_the_drop():
    stall = Stall(3, window=2, drop=0.1, device="cpu")
    rows = torch.tensor([0, 1, 2])
    history = torch.tensor([[4.0, 4.0, 4.0], [3.0, 3.9, 3.0], [2.0, 3.9, 3.0], [1.9, 3.9, 3.0]])
    fired = [stall.stalled(rows, g).tolist() for g in history]
    # no verdict before a sample has had `window` iterations; then g now against g two iterations ago
    assert fired == [[False] * 3, [False] * 3, [False, True, False], [False, True, True]]
    # drop 0 is off, even where the distance rises (HopSkipJump's can)
    never = Stall(1, window=1, drop=0.0, device="cpu")
    assert not any(bool(never.stalled(torch.tensor([0]), torch.tensor([g]))) for g in (2.0, 2.0, 2.5))


@pytest.fixture
def refined(monkeypatch) -> list[int]:
    """The number of samples each ``Directions.refine`` call switched, in order."""
    calls = []
    original = Directions.refine

    def spy(self, rows):
        calls.append(len(rows))
        original(self, rows)

    monkeypatch.setattr(Directions, "refine", spy)
    return calls


def test_hop_skip_jump_linf_never_leaves_the_subspace(model64, correct_batch, refined):
    """Its distance often rises from one iteration to the next; with the
    rule off (L∞'s default) that must not switch a sample."""
    x, y = correct_batch[0][:8], correct_batch[1][:8]
    HopSkipJump(norm="linf", init_num_evals=20, n_init=10)(LabelOracle(one_by_one(model64), 8, 2500), x, y, seed=0)
    assert len(refined) >= 7 and sum(refined) == 0


@pytest.mark.parametrize("attack", [SignOPT(k=30, n_init=10, stall_window=1, stall_drop=0.2),
                                    HopSkipJump(init_num_evals=20, n_init=20, stall_window=1, stall_drop=0.2)])
def test_a_stalled_sample_switches_and_batching_stays_exact(model64, correct_batch, refined, attack):
    """With a stall rule that fires early, samples switch as they stall (in
    two iterations at least); each still gets exactly what it gets alone,
    and the run differs from one that never switches."""
    x, y = correct_batch[0][:6], correct_batch[1][:6]
    labels = one_by_one(model64)
    batch = attack(LabelOracle(labels, 6, 400), x, y, seed=3)
    assert sum(1 for count in refined if count) >= 2  # in two iterations at least
    for i in range(6):
        alone = attack(LabelOracle(labels, 1, 400), x[i : i + 1], y[i : i + 1], seed=3)
        assert torch.equal(alone.x_adv[0], batch.x_adv[i]), f"sample {i}"
        assert int(alone.queries[0]) == int(batch.queries[i])
    never = replace(attack, stall_drop=0.0)(LabelOracle(labels, 6, 400), x, y, seed=3)
    assert not torch.equal(never.x_adv, batch.x_adv)


def test_the_stall_rule_is_recorded_as_it_ran():
    assert SignOPT().as_run(10, False).stall_drop == 0.05
    assert SignOPT(norm="linf").as_run(10, False).stall_drop == 0.0
    assert SignOPT(stall_drop=0.2).as_run(10, True).stall_drop == 0.2
    assert OPT().as_run(10, False).stall_drop == 0.0
    assert HopSkipJump().as_run(10, False).stall_drop == 0.05
    assert HopSkipJump(norm="linf").as_run(10, False).stall_drop == 0.0


@pytest.mark.parametrize("attack", [SignOPT, OPT, HopSkipJump])
@pytest.mark.parametrize("kwargs", [{"stall_window": 0}, {"stall_window": 1.5}, {"stall_drop": 1.0},
                                    {"stall_drop": -0.5}])
def test_bad_stall_rule_is_refused(attack, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        attack(**kwargs)


def test_subspace_directions_lower_sign_opt_distortion(model64, correct_batch):
    """Low-frequency directions find closer examples for the same queries
    (on the example CNN with k = 200: median L2 at 1,000 queries 2.72 -> 1.40)."""
    x, y = correct_batch[0][:12], correct_batch[1][:12]
    sizes = {}
    for subspace in (1, "auto"):
        oracle = LabelOracle(lambda z: model64(z.double()).argmax(1), 12, 600)
        result = SignOPT(k=50, n_init=20, subspace=subspace)(oracle, x, y, seed=0)
        size = distortion(result.x_adv - x, "l2")
        size[~result.success] = float("inf")
        sizes[subspace] = size.median()
    assert sizes["auto"] < 0.85 * sizes[1]


@pytest.fixture(scope="module")
def pool(mnist_test):
    return StartPool(mnist_test.x[200:400], mnist_test.y[200:400], torch.arange(200, 400))


@pytest.mark.parametrize("label", ["sign-opt-l2", "sign-opt-linf", "opt-l2", "hop-skip-jump-l2"])
def test_targeted_attacks_reach_the_target_from_a_data_image(model64, correct_batch, pool, mnist_test, label):
    attack = ATTACKS[label]
    x, y = correct_batch[0][:8], correct_batch[1][:8]
    target = (y + 3) % 10
    oracle = LabelOracle(lambda z: model64(z.double()).argmax(1), 8, 600)
    result = attack(oracle, x, y, seed=0, target=target, starts=pool)
    ok = result.success
    assert ok.float().mean() > 0.7
    assert torch.equal(predict(model64, result.x_adv[ok]), target[ok])
    assert (result.queries <= 600).all()
    # each success records the data image it started from: one of the target class
    start = result.start_index
    assert (start[ok] >= 200).all() and (start[~ok] == -1).all()
    assert torch.equal(mnist_test.y[start[ok]], target[ok])


def test_a_target_class_missing_from_the_pool_finds_no_start(model64, correct_batch, pool):
    x, y = correct_batch[0][:4], correct_batch[1][:4]
    keep = pool.y != 7
    no_sevens = StartPool(pool.x[keep], pool.y[keep], pool.index[keep])
    target = torch.full_like(y, 7)
    target[y == 7] = 1
    oracle = LabelOracle(lambda z: model64(z.double()).argmax(1), 4, 200)
    result = SignOPT(k=20, n_init=5)(oracle, x, y, target=target, starts=no_sevens)
    assert not result.success[target == 7].any()
    assert (result.start_index[target == 7] == -1).all()


@pytest.mark.parametrize("label", ["sign-opt-l2", "opt-l2", "hop-skip-jump-l2"])
def test_targeted_mode_needs_starting_images(model64, correct_batch, label):
    x, y = correct_batch[0][:2], correct_batch[1][:2]
    with pytest.raises(ValueError, match="needs starts"):
        ATTACKS[label](LabelOracle(lambda z: model64(z.double()).argmax(1), 2, 50), x, y, target=(y + 1) % 10)


def test_catalogue_has_the_linf_ray_searches():
    assert BY_LABEL["sign-opt-linf"].norm == "linf" and BY_LABEL["opt-linf"].norm == "linf"
    assert BY_LABEL["sign-opt-linf"].in_default_battery and not BY_LABEL["opt-linf"].in_default_battery


def test_targeted_hard_label_scan_records_each_start_image(example_onnx, mnist_test):
    import auditor

    audit = auditor.scan(example_onnx, "mnist", access="hard-label", samples=10, eps=[0.3], budget=150,
                         attacks=["sign-opt-linf"], target="random")
    (run,) = audit.results["attacks"][0]["runs"]
    starts = run["per_sample"]["start_index"]
    targets = {s["index"]: s["target"] for s in audit.results["samples"]}
    assert len(starts) == len(run["per_sample"]["index"]) and any(i is not None for i in starts)
    for index, start in zip(run["per_sample"]["index"], starts):
        if start is not None:  # an image of that sample's target class, from the data
            assert int(mnist_test.y[start]) == targets[index]


@pytest.mark.parametrize("label", ["sign-opt-l2", "sign-opt-linf", "opt-l2", "hop-skip-jump-l2"])
def test_untargeted_attacks_start_from_other_class_images_when_noise_never_crosses(label):
    ball, x, y, pool = ball_case()

    def labels(z):
        return ball(z).argmax(1)

    attack = ATTACKS[label]
    alone = attack(LabelOracle(labels, len(y), 400), x, y, seed=0)
    assert not alone.success.any() and alone.start_index is None

    oracle = LabelOracle(labels, len(y), 400)
    result = attack(oracle, x, y, seed=0, starts=pool)
    assert result.success.all() and (oracle.queries() <= 400).all()
    assert (labels(result.x_adv) == 1).all()
    assert set(result.start_index.tolist()) <= {105, 106, 107}  # the images inside the ball
    if attack.norm == "l2":  # at most a little above the closest adversarial point
        closest = (x - ball.centre).flatten(1).norm(dim=1) - ball.radius
        assert (distortion(result.x_adv - x, "l2") <= closest + 0.1).all()
    for i in range(len(y)):  # batching stays exact
        alone = attack(LabelOracle(labels, 1, 400), x[i : i + 1], y[i : i + 1], seed=0, starts=pool)
        assert torch.equal(alone.x_adv[0], result.x_adv[i]) and int(alone.queries[0]) == int(result.queries[i])
        assert int(alone.start_index[0]) == int(result.start_index[i])


def test_a_sample_a_random_direction_starts_ignores_the_data(model64, correct_batch, pool):
    x, y = correct_batch[0][:8], correct_batch[1][:8]
    attack = ATTACKS["hop-skip-jump-l2"]
    plain = attack(label_oracle(model64, 8, 300), x, y, seed=1)
    given = attack(label_oracle(model64, 8, 300), x, y, seed=1, starts=pool)
    assert plain.success.all()
    assert torch.equal(plain.x_adv, given.x_adv) and torch.equal(plain.queries, given.queries)
    assert given.start_index is None


def test_probe_calls_carry_fewer_images_when_images_are_larger():
    """max_values counts input values: 10,000 MNIST digits' worth is 638
    images of 3 × 64 × 64, so Sign-OPT's 200 probes per sample go three
    samples to a call, not fifty."""
    weights = torch.randn(10, 3 * 64 * 64, generator=torch.Generator().manual_seed(0))
    counter = Counting(lambda z: (z.flatten(1) @ weights.T).argmax(1))
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = (x.flatten(1) @ weights.T).argmax(1)
    result = SignOPT(k=200, n_init=10)(LabelOracle(counter, 8, 700), x, y, seed=0)
    assert result.success.all()
    assert max(counter.sizes) == 600  # three samples' probes
