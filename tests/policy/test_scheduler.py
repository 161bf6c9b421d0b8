"""Intra-layer scheduler: the paper's worked example, hand-worked cases, invariants, greedy vs exact."""

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrimoe.config import ExpertShape, HardwareProfile, LatencyCurve, LinearFit, Transfer
from hybrimoe.policy import scheduler as sched
from hybrimoe.policy.costs import CostModel

SCHEDULES = (
    sched.schedule_hybrid,
    sched.schedule_hybrid_paper,
    sched.schedule_hybrid_unmemoized,
    sched.schedule_exact,
    sched.schedule_static,
    sched.schedule_gpu_only,
    sched.schedule_cpu_only,
)


def make_costs(
    cpu=(0.0, 1.0), gpu=(1.0, 0.3), load_ms=3.0, first_extra_ms=0.0, accelerator=True
) -> CostModel:
    """cpu_ms(n) = cpu[0] + cpu[1] * n, gpu_ms(n) = gpu[0] + gpu[1] * n, a copy takes load_ms."""
    profile = HardwareProfile(
        name="unit",
        expert_shape=ExpertShape(hidden_size=8, intermediate_size=8),
        cpu_expert=LatencyCurve(fit=LinearFit(*cpu)),
        dense_layer=LatencyCurve(fit=LinearFit(0.0, 0.0)),
        gpu_expert=LatencyCurve(fit=LinearFit(*gpu)) if accelerator else None,
        transfer=Transfer(expert_load_ms=load_ms, h2d_pinned_gbps=1.0) if accelerator else None,
        cpu_first_expert_extra_ms=first_extra_ms,
    )
    return CostModel(profile)


A, B, C, D, E = range(5)


def test_paper_worked_example():
    # Loads are token counts: CPU queue A:1, B:1, C:3; resident E:1, D:4.
    # Unit costs: cpu_ms(n) = n, gpu_ms(n) = 1 + 0.3 n (D 2.2, C 1.9, E 1.3), a copy takes 3.
    # t=0: PCIe copies C (GPU done at max(3, 2.2) + 1.9 = 4.9 < CPU done at 1 + 1 + 3 = 5);
    #      GPU runs D until 2.2; CPU runs A, then B; at t=2 the GPU is still busy with D and the
    #      CPU has no non-resident expert left, so it takes E (until 3); C arrives at 3 and runs on
    #      the GPU until 4.9.
    # The CPU guards of `schedule_hybrid` agree: E on the CPU ends at 3, on the GPU at 3.5.
    costs = make_costs()
    for schedule in (sched.schedule_hybrid, sched.schedule_hybrid_paper):
        plan = schedule({A: 1, B: 1, C: 3, D: 4, E: 1}, {D, E}, costs)
        assert plan.cpu == (A, B, E)
        assert plan.gpu == (D,)
        assert plan.load == (C,)
        assert plan.cpu_end_ms == pytest.approx(3.0)
        assert plan.gpu_end_ms == pytest.approx(4.9)
        assert plan.load_done_ms == pytest.approx((3.0,))
        assert plan.finish_ms == pytest.approx(4.9)
        assert plan == plan._replace() and hash(plan) == hash(plan._replace())
        with pytest.raises(AttributeError):
            plan.finish_ms = 0.0
    # The exact optimum copies A instead (GPU D, E, then A ends at 4.8; CPU B, C ends at 4).
    assert sched.schedule_exact({A: 1, B: 1, C: 3, D: 4, E: 1}, {D, E}, costs).finish_ms == pytest.approx(4.8)


def test_paper_example_baselines():
    costs = make_costs()
    counts, resident = {A: 1, B: 1, C: 3, D: 4, E: 1}, {D, E}
    static = sched.schedule_static(counts, resident, costs)
    assert (static.gpu, static.load, static.cpu) == ((D, E), (), (A, B, C))
    assert static.finish_ms == pytest.approx(5.0)
    offload = sched.schedule_gpu_only(counts, resident, costs)
    assert (offload.gpu, offload.load, offload.cpu) == ((D, E), (C, B, A), ())
    # D, E until 3.5; C arrives 3 -> 5.4; B arrives 6 -> 7.3; A arrives 9 -> 10.3.
    assert offload.finish_ms == pytest.approx(10.3)
    assert offload.pcie_end_ms == pytest.approx(9.0)
    cpu = sched.schedule_cpu_only(counts, resident, costs)
    assert cpu.cpu == (A, B, C, E, D) and cpu.finish_ms == pytest.approx(10.0)


def test_decode_copies_while_they_help():
    # 8 experts of 1 token, 2 resident; CPU 1 per expert, GPU 0.1, copy 2. Copying 2 experts
    # balances the engines: CPU runs 4 (ends 4), GPU the 2 resident + 2 copied (ends 4.1).
    costs = make_costs(cpu=(0.0, 1.0), gpu=(0.1, 0.0), load_ms=2.0)
    counts = dict.fromkeys(range(8), 1)
    plan = sched.schedule_hybrid(counts, {6, 7}, costs)
    assert len(plan.load) == 2 and len(plan.cpu) == 4 and plan.gpu == (6, 7)
    assert plan.finish_ms == pytest.approx(4.1)
    assert plan.finish_ms == pytest.approx(sched.schedule_exact(counts, {6, 7}, costs).finish_ms)


def test_busy_copy_engine_means_no_copies():
    costs = make_costs(cpu=(0.0, 1.0), gpu=(0.1, 0.0), load_ms=2.0)
    counts = dict.fromkeys(range(8), 1)
    plan = sched.schedule_hybrid(counts, {6, 7}, costs, pcie_free_at_ms=100.0)
    assert plan.load == () and plan.pcie_end_ms == 100.0
    assert plan.finish_ms == pytest.approx(sched.schedule_static(counts, {6, 7}, costs).finish_ms)


def test_cpu_first_expert_extra_cost():
    # One non-resident expert: CPU would take 10 + 1, a copy and GPU run 2 + 0.1.
    costs = make_costs(cpu=(0.0, 1.0), gpu=(0.1, 0.0), load_ms=2.0, first_extra_ms=10.0)
    plan = sched.schedule_hybrid({5: 1}, set(), costs)
    assert plan.load == (5,) and plan.cpu == () and plan.finish_ms == pytest.approx(2.1)
    cheap = make_costs(cpu=(0.0, 1.0), gpu=(0.1, 0.0), load_ms=2.0, first_extra_ms=0.5)
    plan = sched.schedule_hybrid({5: 1}, set(), cheap)
    assert plan.cpu == (5,) and plan.finish_ms == pytest.approx(1.5)


def test_idle_cpu_takes_lowest_load_resident_experts():
    # All four resident with equal loads; CPU and GPU both take 1 per expert. The GPU takes from the
    # front of the resident queue (lowest id on ties), the CPU steals from the back.
    costs = make_costs(cpu=(0.0, 1.0), gpu=(1.0, 0.0))
    plan = sched.schedule_hybrid(dict.fromkeys(range(4), 1), set(range(4)), costs)
    assert plan.gpu == (0, 1) and plan.cpu == (3, 2) and plan.load == ()
    assert plan.finish_ms == pytest.approx(2.0)


def test_copied_expert_joins_gpu_queue_in_load_order():
    # Resident loads 5 and 1; non-resident 6, copied at once (arrives at 1). When the GPU finishes
    # expert 0 at 1, it takes the copied 6-token expert before the 1-token resident one.
    costs = make_costs(cpu=(0.0, 10.0), gpu=(1.0, 0.0), load_ms=1.0)
    plan = sched.schedule_hybrid({0: 5, 1: 1, 2: 6}, {0, 1}, costs)
    assert plan.load == (2,) and plan.cpu == ()
    assert plan.gpu == (0, 1)
    assert plan.finish_ms == pytest.approx(3.0)
    # The paper's rule lets the idle CPU take resident expert 1 although it needs 10 there.
    paper = sched.schedule_hybrid_paper({0: 5, 1: 1, 2: 6}, {0, 1}, costs)
    assert paper.cpu == (1,) and paper.finish_ms == pytest.approx(10.0)


def test_cpu_leaves_an_expert_to_the_copy_engine_when_that_is_faster():
    # Two non-resident experts of 16 and 40 tokens, CPU 2 per token, copies 0.5, GPU 0.2: the
    # paper's rule starts the 16-token expert on the CPU at once (32 ms); the guard copies both.
    costs = make_costs(cpu=(0.0, 2.0), gpu=(0.2, 0.0), load_ms=0.5)
    plan = sched.schedule_hybrid({0: 16, 1: 40}, set(), costs)
    assert plan.cpu == () and plan.load == (1, 0)
    assert plan.finish_ms == pytest.approx(1.2)
    assert sched.schedule_hybrid_paper({0: 16, 1: 40}, set(), costs).finish_ms == pytest.approx(32.0)


def test_without_accelerator_everything_runs_on_cpu():
    costs = make_costs(accelerator=False)
    counts = {A: 1, B: 1, C: 3, D: 4, E: 1}
    for fn in SCHEDULES:
        plan = fn(counts, set(), costs)
        assert plan.gpu == () and plan.load == ()
        assert sorted(plan.cpu) == sorted(counts)
        assert plan.finish_ms == pytest.approx(10.0)


def test_exact_refuses_large_layers():
    counts = dict.fromkeys(range(sched.EXACT_MAX_EXPERTS + 1), 1)
    with pytest.raises(ValueError):
        sched.schedule_exact(counts, set(), make_costs())


def test_empty_layer():
    for fn in SCHEDULES:
        plan = fn({}, set(), make_costs(), 1.5)
        assert plan.finish_ms == 0.0 and plan.pcie_end_ms == 1.5


def random_layer(rng: random.Random):
    """A random layer and cost model: CPU linear in tokens, GPU nearly flat, copies constant."""
    n = rng.randint(1, 9)
    experts = rng.sample(range(64), n)
    if rng.random() < 0.5:
        counts = dict.fromkeys(experts, 1)
    else:
        counts = {e: rng.choice((1, 1, 2, 3, 5, 8, 16, 40)) for e in experts}
    resident = {e for e in experts if rng.random() < 0.4}
    costs = make_costs(
        cpu=(rng.uniform(0.0, 0.5), rng.uniform(0.2, 2.0)),
        gpu=(rng.uniform(0.02, 0.3), rng.uniform(0.0, 0.02)),
        load_ms=rng.uniform(0.3, 4.0),
        first_extra_ms=rng.uniform(0.0, 1.0),
    )
    pcie_free_at_ms = rng.choice((0.0, 0.0, rng.uniform(0.0, 5.0)))
    return counts, resident, costs, pcie_free_at_ms


def check_valid(plan, counts, resident):
    placed = plan.gpu + plan.load + plan.cpu
    assert sorted(placed) == sorted(counts), "every expert placed exactly once"
    assert set(plan.gpu) <= set(resident)
    assert not set(plan.load) & set(resident)
    assert len(plan.load_done_ms) == len(plan.load)
    assert plan.finish_ms == pytest.approx(max(plan.cpu_end_ms, plan.gpu_end_ms))


def test_greedy_versus_exact_on_random_layers():
    # Measured with this seed: guarded worst 1.004, paper's rule 24.2; over 3000 layers of other
    # seeds the guarded worst was 1.14 and the paper's rule's 55.
    rng = random.Random(2025)
    worst = {sched.schedule_hybrid: (1.0, None), sched.schedule_hybrid_paper: (1.0, None)}
    for _ in range(200):
        counts, resident, costs, pcie0 = random_layer(rng)
        exact = sched.schedule_exact(counts, resident, costs, pcie0)
        check_valid(exact, counts, resident)
        for schedule in worst:
            greedy = schedule(counts, resident, costs, pcie0)
            check_valid(greedy, counts, resident)
            assert greedy.finish_ms >= exact.finish_ms - 1e-9
            ratio = greedy.finish_ms / exact.finish_ms
            if ratio > worst[schedule][0]:
                worst[schedule] = (ratio, (counts, resident, pcie0))
        for baseline in (sched.schedule_static, sched.schedule_gpu_only, sched.schedule_cpu_only):
            assert baseline(counts, resident, costs, pcie0).finish_ms >= exact.finish_ms - 1e-9
    guarded, paper = worst[sched.schedule_hybrid], worst[sched.schedule_hybrid_paper]
    print(f"\nworst greedy/exact over 200 random layers: {guarded[0]:.3f} (paper's rule: {paper[0]:.3f})")
    assert guarded[0] < 1.5, f"worst greedy/exact ratio {guarded[0]:.3f} on {guarded[1]}"


def test_memo_matches_unmemoized_and_relabels():
    rng = random.Random(7)
    for _ in range(300):
        counts, resident, costs, pcie0 = random_layer(rng)
        for _ in range(2):  # the second call hits the memo
            assert sched.schedule_hybrid(counts, resident, costs, pcie0) == sched.schedule_hybrid_unmemoized(
                counts, resident, costs, pcie0
            )
            assert sched.schedule_hybrid_paper(
                counts, resident, costs, pcie0
            ) == sched.schedule_hybrid_unmemoized(counts, resident, costs, pcie0, guarded=False)
        # Same loads under other ids: the memoized result maps ranks back to the new ids.
        relabel = dict(zip(counts, rng.sample(range(100, 200), len(counts))))
        counts2 = {relabel[e]: n for e, n in counts.items()}
        resident2 = {relabel[e] for e in resident}
        assert sched.schedule_hybrid(counts2, resident2, costs, pcie0) == sched.schedule_hybrid_unmemoized(
            counts2, resident2, costs, pcie0
        )


@settings(max_examples=150, deadline=None)
@given(
    loads=st.lists(st.integers(1, 50), min_size=0, max_size=10),
    resident_mask=st.integers(0, (1 << 10) - 1),
    load_ms=st.floats(0.05, 10.0),
    gpu_ms=st.floats(0.01, 2.0),
    pcie0=st.floats(0.0, 10.0),
)
def test_schedules_are_valid_and_no_better_than_exact(loads, resident_mask, load_ms, gpu_ms, pcie0):
    counts = {e: n for e, n in enumerate(loads)}
    resident = {e for e in counts if resident_mask >> e & 1}
    costs = make_costs(cpu=(0.1, 0.5), gpu=(gpu_ms, 0.01), load_ms=load_ms, first_extra_ms=0.3)
    exact = sched.schedule_exact(counts, resident, costs, pcie0)
    for fn in SCHEDULES:
        plan = fn(counts, resident, costs, pcie0)
        check_valid(plan, counts, resident)
        assert plan.finish_ms >= exact.finish_ms - 1e-9
        assert plan.pcie_end_ms >= pcie0


def brute_force_ms(counts, resident, costs, pcie0):
    """Every split and every copy order; the GPU runs residents, then copies as they arrive."""
    experts = list(counts)
    best = float("inf")
    for sides in itertools.product((False, True), repeat=len(experts)):
        on_cpu = [e for e, gpu in zip(experts, sides) if not gpu]
        copies = [e for e, gpu in zip(experts, sides) if gpu and e not in resident]
        cpu_end = (costs.cpu_first_extra_ms + sum(costs.cpu_ms(counts[e]) for e in on_cpu)) if on_cpu else 0.0
        resident_ms = sum(costs.gpu_ms(counts[e]) for e, gpu in zip(experts, sides) if gpu and e in resident)
        for order in itertools.permutations(copies):
            t, arrival = resident_ms, pcie0
            for e in order:
                arrival += costs.load_ms
                t = max(t, arrival) + costs.gpu_ms(counts[e])
            best = min(best, max(cpu_end, t))
    return best


def test_exact_matches_brute_force_over_copy_orders():
    rng = random.Random(11)
    for _ in range(60):
        counts, resident, costs, pcie0 = random_layer(rng)
        counts = dict(list(counts.items())[:6])
        exact = sched.schedule_exact(counts, resident, costs, pcie0)
        assert exact.finish_ms == pytest.approx(brute_force_ms(counts, resident, costs, pcie0))
