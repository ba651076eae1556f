"""Prefetch policies: built-ins on hand-made event sequences, the contract suite over every
registered policy, the guard, and the registry."""

from __future__ import annotations

import logging
import math
import sys
from array import array
from pathlib import Path

import pytest

from hiradix.config import PrefetchConfig, WaitMode, load_config
from hiradix.policies.base import (
    ArrivalEvent,
    Cold,
    EmptyTreeView,
    FinishEvent,
    GuardedPolicy,
    PathView,
    PrefetchPolicy,
    Stage,
    TickEvent,
    TierRun,
    validate_plans,
)
from hiradix.policies.registry import (
    create_policy,
    register_policy,
    registered_policies,
    resolve_policy_class,
)
from hiradix.types import Tier

ROOT = Path(__file__).resolve().parent.parent


def path(*blocks: int, block: int = 512, tail: int = 0) -> PathView:
    tokens = array("q")
    for b in blocks:
        tokens.extend(range(b * 1000, b * 1000 + block))
    tokens.extend(range(10**9, 10**9 + tail))
    return PathView(tokens, "ns")


def arrival(
    now: float, view: PathView, rid: str = "r", sid: str | None = None, run: TierRun | None = None
) -> ArrivalEvent:
    return ArrivalEvent(now, rid, "ns", view, run or TierRun(), sid)


def finish(now: float, view: PathView, rid: str = "r", sid: str | None = None) -> FinishEvent:
    return FinishEvent(now, rid, "ns", view, sid)


class CapView(EmptyTreeView):
    def capacity(self, tier: Tier) -> float:
        return 1e6


def tick(now: float) -> TickEvent:
    return TickEvent(now, CapView())


def config(policy: str, **options: object) -> PrefetchConfig:
    return PrefetchConfig(policy, options, WaitMode.BEST_EFFORT, 0.05, 0.02)


def stages(plans: object) -> list[Stage]:
    return [p for p in validate_plans(plans) if isinstance(p, Stage)]


# --------------------------------------------------------------------------- built-ins


def test_arrival_stages_the_l3_run() -> None:
    policy = create_policy(config("arrival"))
    view = path(1, 2, 3, 4)
    plans = stages(policy.on_arrival(arrival(0.0, view, run=TierRun(512, 512, 1024))))
    assert len(plans) == 1 and plans[0].tier is Tier.L2 and len(plans[0].tokens) == 2048
    assert policy.on_arrival(arrival(0.0, view, run=TierRun(2048, 0, 0))) == ()


@pytest.mark.parametrize("with_id", [True, False])
def test_session_is_staged_before_it_returns(with_id: bool) -> None:
    policy = create_policy(config("session", lead_s=5.0, l1_lead_s=1.0))
    sid = "chat-1" if with_id else None
    turn1 = path(1, 2, 3)
    policy.on_arrival(arrival(0.0, turn1, "a", sid))
    policy.on_finish(finish(2.0, turn1, "a", sid))
    turn2 = path(1, 2, 3, 4, 5)
    policy.on_arrival(arrival(32.0, turn2, "b", sid))  # think time 30 s learned
    policy.on_finish(finish(34.0, turn2, "b", sid))
    # expected back at 34 + 30 = 64: nothing before 59, L2 at 59, L1 at 63
    for now in range(35, 59):
        assert stages(policy.on_tick(tick(float(now)))) == []
    l2 = stages(policy.on_tick(tick(59.0)))
    assert [(p.tier, len(p.tokens)) for p in l2] == [(Tier.L2, len(turn2))]
    assert l2[0].deadline == pytest.approx(64.0)
    assert stages(policy.on_tick(tick(62.0))) == []
    l1 = stages(policy.on_tick(tick(63.0)))
    assert [p.tier for p in l1] == [Tier.L1]
    assert bytes(l1[0].tokens) == bytes(turn2.tokens)


def test_session_that_returned_is_not_staged_again() -> None:
    policy = create_policy(config("session", think_time_s=10.0))
    turn1 = path(7, 8)
    policy.on_finish(finish(0.0, turn1))
    policy.on_arrival(arrival(3.0, path(7, 8, 9)))  # back early: prediction void
    assert all(not stages(policy.on_tick(tick(float(t)))) for t in range(3, 40))


def test_hot_system_prompt_stays_resident() -> None:
    policy = create_policy(config("hot", min_requests=3.0, refresh_s=1.0))
    for i in range(6):  # one system prompt (blocks 1, 2), six different users
        policy.on_arrival(arrival(float(i), path(1, 2, 100 + i)))
    plans = stages(policy.on_tick(tick(6.0)))
    hot = {(p.tier, len(p.tokens)) for p in plans}
    assert hot == {(Tier.L1, 1024), (Tier.L2, 1024)}
    assert all(bytes(p.tokens) == bytes(path(1, 2).tokens) for p in plans)
    assert stages(policy.on_tick(tick(6.5))) == []  # refresh interval
    assert stages(policy.on_tick(tick(8.0)))  # and again: it stays


def test_hot_forgets_what_cooled_down() -> None:
    policy = create_policy(config("hot", min_requests=3.0, half_life_s=10.0, refresh_s=1.0))
    for i in range(4):
        policy.on_arrival(arrival(0.0, path(1, 200 + i)))
    assert stages(policy.on_tick(tick(1.0)))
    assert stages(policy.on_tick(tick(100.0))) == []


def test_pattern_one_shot_long_document_goes_cold() -> None:
    policy = create_policy(config("pattern", cold_min_tokens=4096, cold_below=0.2))
    cold = []
    for i in range(8):  # eight long documents, each read once
        doc = path(*range(1000 * (i + 1), 1000 * (i + 1) + 10))
        policy.on_arrival(arrival(float(i), doc, f"d{i}"))
        cold.append(
            any(isinstance(p, Cold) for p in policy.on_finish(finish(i + 0.5, doc, f"d{i}")))
        )
    assert cold[-1] and cold[-3:] == [True, True, True]
    assert not cold[0]  # nothing learned yet: no verdict


def test_pattern_keeps_and_stages_what_is_reused() -> None:
    policy = create_policy(config("pattern", lead_s=2.0, l1_lead_s=0.0, l2_budget=0.1))
    doc = path(1, 2, 3, 4)
    policy.on_arrival(arrival(0.0, doc, "a"))
    policy.on_finish(finish(1.0, doc, "a"))
    policy.on_arrival(arrival(21.0, doc, "b"))  # reused after 20 s
    assert not any(isinstance(p, Cold) for p in policy.on_finish(finish(22.0, doc, "b")))
    assert stages(policy.on_tick(tick(30.0))) == []
    plans = stages(policy.on_tick(tick(41.0)))  # due at 22 + 20 = 42, lead 2 s
    assert [(p.tier, len(p.tokens)) for p in plans] == [(Tier.L2, 2048)]


def test_pattern_reads_long_context_ahead_in_order() -> None:
    policy = create_policy(config("pattern", readahead_tokens=1024))
    doc = path(*range(1, 9))
    plans = stages(policy.on_arrival(arrival(0.0, doc, run=TierRun(0, 0, 4096))))
    reads = [p for p in plans if p.tier is Tier.L2]
    assert [len(p.tokens) for p in reads] == [1024, 2048, 3072, 4096]
    assert [p.priority for p in reads] == sorted((p.priority for p in reads), reverse=True)
    # then the whole cached prefix to the device while the request waits, after the reads
    assert plans[-1].tier is Tier.L1 and len(plans[-1].tokens) == 4096
    assert plans[-1].priority < min(p.priority for p in reads)
    quiet = create_policy(config("pattern", readahead_tokens=1024, arrival_l1=False))
    plans = stages(quiet.on_arrival(arrival(0.0, doc, run=TierRun(0, 0, 4096))))
    assert all(p.tier is Tier.L2 for p in plans)
    with pytest.raises(ValueError, match="arrival_l1"):
        create_policy(config("pattern", arrival_l1="yes"))


# --------------------------------------------------------------------------- contract


def _events(view_a: PathView, view_b: PathView) -> list[tuple[str, object]]:
    empty = PathView(array("q"), "ns")
    short = PathView(array("q", [1, 2, 3]), "ns")
    out: list[tuple[str, object]] = [
        ("on_tick", TickEvent(0.0, EmptyTreeView())),
        ("on_arrival", arrival(0.0, empty)),
        ("on_finish", finish(0.0, empty)),
        ("on_arrival", arrival(0.1, short, "s", run=TierRun(0, 0, 3))),
        ("on_finish", finish(0.2, short, "s")),
    ]
    for t in range(30):
        view = view_a if t % 2 else view_b
        run = TierRun(0, 512, len(view) - 512) if t % 3 else TierRun()
        out.append(("on_arrival", arrival(t * 4.0, view, f"r{t}", "sess" if t % 5 else None, run)))
        out.append(("on_finish", finish(t * 4.0 + 1, view, f"r{t}", "sess" if t % 5 else None)))
        out.append(("on_tick", tick(t * 4.0 + 2)))
    out.append(("on_tick", tick(math.inf)))
    return out


def _replay(policy: PrefetchPolicy) -> list[tuple]:
    a = path(1, 2, 3, tail=100)
    b = path(1, 2, 4, 5, 6)
    out = []
    for hook, event in _events(a, b):
        for plan in validate_plans(getattr(policy, hook)(event)):
            tier = plan.tier if isinstance(plan, Stage) else None
            extra = (plan.deadline, plan.priority) if isinstance(plan, Stage) else ()
            out.append(
                (
                    hook,
                    type(plan).__name__,
                    plan.namespace,
                    bytes(memoryview(array("q", plan.tokens))),
                    tier,
                    extra,
                )
            )
    return out


@pytest.mark.parametrize("name", sorted(registered_policies()))
def test_contract_every_registered_policy(name: str) -> None:
    first = _replay(create_policy(config(name)))
    assert first == _replay(create_policy(config(name)))  # deterministic
    for _, kind, namespace, tokens, tier, _ in first:
        assert kind in ("Stage", "Cold") and namespace == "ns" and tokens
        assert tier in (None, Tier.L1, Tier.L2)


@pytest.mark.parametrize("name", sorted(registered_policies()))
def test_contract_guarded_policy_never_disables_a_builtin(name: str) -> None:
    guarded = GuardedPolicy(create_policy(config(name)))
    for hook, event in _events(path(1, 2), path(1, 3)):
        getattr(guarded, hook)(event)
    assert not guarded.disabled, guarded.reason


def test_builtins_are_registered() -> None:
    assert {"none", "arrival", "session", "hot", "pattern"} <= set(registered_policies())


# --------------------------------------------------------------------------- guard


class Raises(PrefetchPolicy):
    name = "raises"

    def on_arrival(self, event: ArrivalEvent) -> list:
        raise RuntimeError("boom")


class Nonsense(PrefetchPolicy):
    name = "nonsense"

    def on_tick(self, event: TickEvent) -> list:
        return ["stage everything please"]  # type: ignore[list-item]


class BadTier(PrefetchPolicy):
    name = "bad_tier"

    def on_finish(self, event: FinishEvent) -> list:
        return [Stage("ns", (1, 2), Tier.L3, 0.0, 0)]


@pytest.mark.parametrize(
    ("cls", "hook", "event", "why"),
    [
        (Raises, "on_arrival", arrival(0.0, path(1)), "RuntimeError: boom"),
        (Nonsense, "on_tick", tick(0.0), "returned a str"),
        (BadTier, "on_finish", finish(0.0, path(1)), "Stage.tier"),
    ],
)
def test_guard_disables_a_faulty_policy_with_one_line(
    caplog: pytest.LogCaptureFixture, cls: type, hook: str, event: object, why: str
) -> None:
    guarded = GuardedPolicy(cls())
    with caplog.at_level(logging.ERROR, logger="hiradix.policies.base"):
        assert getattr(guarded, hook)(event) == ()
        for _ in range(3):  # disabled for good: no more calls, no more lines
            assert getattr(guarded, hook)(event) == ()
            assert guarded.on_arrival(arrival(0.0, path(1))) == ()
    assert guarded.disabled and why in (guarded.reason or "")
    lines = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lines) == 1
    assert lines[0].getMessage().startswith(f"hiradix: prefetch policy {cls.name!r} disabled: ")


def test_validate_plans_rejects_non_sequences() -> None:
    for bad in (None, "x", {Stage("ns", (1,))}, 3):
        with pytest.raises(TypeError):
            validate_plans(bad)
    with pytest.raises(TypeError):
        validate_plans([Stage("ns", (1, "2"))])
    with pytest.raises(TypeError):
        validate_plans([Stage("ns", (1,), Tier.L2, math.nan)])
    assert validate_plans([Cold("ns", array("q", [1]))])


def test_plan_tokens_outside_int64_are_refused_by_the_guard() -> None:
    """Issue 16 item 10: ``Stage(ns, (2**70,))`` passed validation and then overflowed
    ``array('q')`` outside the guard, killing every scheduler."""
    for bad in ((2**70,), (-(2**63) - 1,), memoryview(array("Q", [1]))):
        with pytest.raises(TypeError):
            validate_plans([Stage("ns", bad)])

    class Huge(PrefetchPolicy):
        name = "huge"

        def on_arrival(self, event):
            return [Stage(event.namespace, (2**70,))]

    guarded = GuardedPolicy(Huge())
    event = ArrivalEvent(0.0, "r", None, PathView(array("q", [1, 2]), None), TierRun(0, 0, 0))
    assert guarded.on_arrival(event) == ()  # refused and the policy disabled, no exception
    assert guarded.on_arrival(event) == ()


# --------------------------------------------------------------------------- registry


class Outside(PrefetchPolicy):
    name = "outside"

    def __init__(self, *, depth: int = 1) -> None:
        self.depth = depth


def test_registry_by_name_and_by_module_path() -> None:
    assert type(create_policy(config("session"))).name == "session"
    policy = create_policy(config("test_policies:Outside", depth=3))
    assert type(policy).__name__ == "Outside" and policy.depth == 3  # type: ignore[attr-defined]


def test_registry_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="allowed: .*arrival.*hot.*none.*pattern.*session"):
        create_policy(config("clairvoyant"))
    with pytest.raises(ValueError, match="cannot import"):
        resolve_policy_class("no_such_module_xyz:Policy")
    with pytest.raises(ValueError, match="no 'Missing'"):
        resolve_policy_class("test_policies:Missing")
    with pytest.raises(ValueError, match="not a subclass"):
        resolve_policy_class("math:pi")


def test_registry_rejects_duplicates_and_bad_options() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_policy("session", Outside)
    with pytest.raises(ValueError, match="prefetch.options.bogus: unknown option"):
        create_policy(config("session", bogus=1))
    with pytest.raises(ValueError, match="lead_s"):
        create_policy(config("session", lead_s=-1))


def test_example_custom_policy_loads_from_its_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    sys.modules.pop("custom_policy", None)
    loaded = load_config(ROOT / "examples" / "custom_policy.yaml")
    policy = create_policy(loaded.prefetch)
    assert type(policy).__name__ == "EveryOther" and policy.every == 2  # type: ignore[attr-defined]
    guarded = GuardedPolicy(policy)
    view = path(1, 2, 3)
    run = TierRun(0, 0, 1536)
    got = [guarded.on_arrival(arrival(float(i), view, run=run)) for i in range(4)]
    assert [len(p) for p in got] == [0, 1, 0, 1] and not guarded.disabled


def test_tree_view_resident_run_is_read_only() -> None:
    from hiradix.policies.views import RadixTreeView
    from hiradix.tree import RadixTree

    tree = RadixTree(4)
    tokens = array("q", range(16))
    tree.insert("ns", tokens, range(16))
    tree.insert("ns", array("q", range(8)) + array("q", [99] * 8), range(16))
    view = RadixTreeView(tree, {Tier.L1: 64.0, Tier.L2: 0.0})
    before = [(n.id, n.last_access, len(n)) for n in tree.iter_nodes()]
    assert view.resident_run("ns", tokens) == TierRun(16, 0, 0)
    assert view.resident_run("ns", array("q", range(12))) == TierRun(12, 0, 0)
    assert view.resident_run("ns", array("q", [7] * 8)) == TierRun()
    assert view.resident_run("other", tokens) == TierRun()
    assert [(n.id, n.last_access, len(n)) for n in tree.iter_nodes()] == before


class ResidentView(CapView):
    def resident_run(self, namespace: object, tokens: object) -> TierRun:
        return TierRun(0, 10**9, 0)


@pytest.mark.parametrize("name", ["session", "pattern"])
def test_staging_skips_resident_paths_and_keeps_a_budget(name: str) -> None:
    policy = create_policy(config(name, lead_s=2.0, l2_budget=0.001))
    for i in range(5):  # five prefixes, each reused after 20 s
        doc = path(10 * i + 1, 10 * i + 2, 10 * i + 3, 10 * i + 4)
        for k, t in enumerate((0.0, 20.0)):
            policy.on_arrival(arrival(t + i * 0.01, doc, f"{i}-{k}", f"s{i}"))
            policy.on_finish(finish(t + i * 0.01 + 1, doc, f"{i}-{k}", f"s{i}"))
    assert stages(policy.on_tick(TickEvent(60.0, ResidentView()))) == []  # all resident
    policy = create_policy(config(name, lead_s=2.0, l2_budget=0.001))
    for i in range(5):
        doc = path(10 * i + 1, 10 * i + 2, 10 * i + 3, 10 * i + 4)
        for k, t in enumerate((0.0, 20.0)):
            policy.on_arrival(arrival(t + i * 0.01, doc, f"{i}-{k}", f"s{i}"))
            policy.on_finish(finish(t + i * 0.01 + 1, doc, f"{i}-{k}", f"s{i}"))
    first = stages(policy.on_tick(tick(39.5)))
    assert len(first) == 1  # 1000-token budget: one path per tick, the rest deferred
    assert all(p.tier is Tier.L2 for p in first)
