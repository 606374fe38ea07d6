"""Goal syntax, threshold search for goals and the oracle router, on synthetic scores."""

import itertools

import numpy as np
import pytest

from cascade.policy.calibrate import oracle_curve, oracle_escalations_for, simulate_cascade
from cascade.policy.goals import Goals, GoalSyntaxError, check_goals, parse_goal, parse_goals
from cascade.policy.search import cut_thresholds, search_thresholds

# -- goal syntax --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "task", "goals"),
    [
        ("accuracy>=0.99", None, Goals(min_accuracy=0.99)),
        ("accuracy=99.5%", None, Goals(min_accuracy=0.995)),
        ("cloud<=10%", None, Goals(max_cloud_share=0.1)),
        ("vision:cloud_share<=0.05", "vision", Goals(max_cloud_share=0.05)),
        ("escalation<=0.3", None, Goals(max_escalation_rate=0.3)),
        ("documents: escalation.edge-node <= 0.2", "documents",
         Goals(max_escalation_rate={"edge-node": 0.2})),
    ],
)
def test_parse_goal(text, task, goals):
    assert parse_goal(text) == (task, goals)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("accuracy", "not understood"),
        ("latency<=5", "unknown metric 'latency'"),
        ("accuracy<=0.9", "accuracy takes >="),
        ("cloud>=0.1", "cloud takes <="),
        ("accuracy>=1.5", "fraction in (0, 1]"),
        ("cloud.edge<=0.1", "only escalation takes a tier"),
    ],
)
def test_bad_goal_syntax_says_what_is_allowed(text, message):
    with pytest.raises(GoalSyntaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_goal(text)


def test_parse_goals_per_task_later_ones_win_and_maps_merge():
    goals = parse_goals(["accuracy>=0.9", "vision:accuracy>=0.99", "escalation.a<=0.1",
                         "escalation.b<=0.2", "cloud<=0.1"], ["vision", "documents"])
    assert goals["vision"] == Goals(min_accuracy=0.99, max_cloud_share=0.1,
                                    max_escalation_rate={"a": 0.1, "b": 0.2})
    assert goals["documents"].min_accuracy == 0.9
    with pytest.raises(GoalSyntaxError, match="unknown task 'audio'; allowed: vision, documents"):
        parse_goals(["audio:cloud<=0.1"], ["vision", "documents"])


def test_check_goals_reports_each_bound():
    checks = check_goals(Goals(min_accuracy=0.9, max_cloud_share=0.1, max_escalation_rate=0.2),
                         accuracy=0.95, cloud_share=0.2, escalation_rate={"a": 0.1, "top": 0.0},
                         top_tier="top")
    assert [(c.goal, c.met) for c in checks] == [
        ("accuracy>=0.9", True), ("cloud<=0.1", False), ("escalation.a<=0.2", True)]
    unknown = check_goals(Goals(min_accuracy=0.9), accuracy=None, cloud_share=0.0,
                          escalation_rate={}, top_tier="top")
    assert unknown[0].met is None


# -- threshold search ---------------------------------------------------------------------------

TWO = ["edge", "top"]
CONF = np.array([0.95, 0.9, 0.8, 0.7, 0.6])
OK = np.array([True, True, False, True, False])


def test_cut_thresholds_are_midpoints_plus_none_and_all():
    assert cut_thresholds(np.array([0.9, 0.5, 0.5])).tolist() == pytest.approx(
        [np.nextafter(0.9, 1), 0.7, 0.0])
    assert cut_thresholds(np.array([1.0, 0.5]))[0] == 1.0


def test_accuracy_goal_known_answer():
    r = search_thresholds(TWO, [CONF, np.zeros(5)], [OK, np.ones(5, bool)], Goals(min_accuracy=1.0))
    # both mistakes must reach the top; one threshold cannot skip 0.8, so 0.8..0.6 escalate.
    assert r.thresholds == pytest.approx((0.85, 0.0))
    assert r.escalations == 3 and r.outcome.accuracy == 1.0 and r.feasible


def test_cloud_budget_known_answer():
    r = search_thresholds(TWO, [CONF, np.zeros(5)], [OK, np.ones(5, bool)], Goals(max_cloud_share=0.2))
    # one request may reach the top: the least confident, which is also a mistake.
    assert r.thresholds == pytest.approx((0.65, 0.0))
    assert r.outcome.top_share == 0.2 and r.outcome.accuracy == pytest.approx(0.8)


def test_escalation_rate_goal_known_answer():
    r = search_thresholds(TWO, [CONF, np.zeros(5)], [OK, np.ones(5, bool)],
                          Goals(max_escalation_rate=0.4))
    # Up to 2 of 5 may escalate; escalating the 0.7 too would fix nothing, so only the 0.6 goes.
    assert r.thresholds == pytest.approx((0.65, 0.0))
    assert r.outcome.escalation_rate["edge"] == pytest.approx(0.2)
    tight = search_thresholds(TWO, [CONF, np.zeros(5)], [OK, np.ones(5, bool)],
                              Goals(max_escalation_rate={"edge": 0.0}))
    assert tight.thresholds[0] == 0.0 and tight.outcome.accuracy == pytest.approx(0.6)


def test_infeasible_goal_returns_the_closest_miss_and_says_why():
    r = search_thresholds(TWO, [CONF, np.zeros(5)], [OK, np.zeros(5, bool)], Goals(min_accuracy=0.9))
    assert not r.feasible
    assert r.outcome.accuracy == pytest.approx(0.6)  # answer everything at the edge: 3 of 5
    assert r.violations == ("accuracy>=0.9 (got 0.6000)",)


def _brute_force(tiers, conf, correct, goals):
    """Every combination of cut thresholds: the best (violation, escalations, -accuracy)."""
    n = len(correct[0])
    best = None
    for combo in itertools.product(*[cut_thresholds(c) for c in conf[:-1]]):
        out = simulate_cascade(tiers, conf, correct, [*combo, 0.0])
        v = 0.0
        if goals.min_accuracy is not None:
            v += max(0.0, goals.min_accuracy - out.accuracy)
        if goals.max_cloud_share is not None:
            v += max(0.0, out.top_share - goals.max_cloud_share)
        esc = round(out.escalations_per_request * n)
        key = (round(v, 9), esc, -round(out.accuracy * n)) if goals.min_accuracy is not None \
            else (round(v, 9), -round(out.accuracy * n), esc)
        best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("goals", [Goals(min_accuracy=0.85), Goals(max_cloud_share=0.15),
                                   Goals(min_accuracy=0.8, max_cloud_share=0.3)])
def test_search_matches_brute_force_on_three_tiers(seed, goals):
    rng = np.random.default_rng(seed)
    n, tiers = 24, ["a", "b", "top"]
    conf = [np.round(rng.uniform(size=n), 2) for _ in range(2)] + [np.zeros(n)]
    correct = [rng.uniform(size=n) < c for c in conf[:2]] + [rng.uniform(size=n) < 0.95]
    r = search_thresholds(tiers, conf, correct, goals, grid=1000)
    key = (round(r.violation, 9), r.escalations, -round(r.outcome.accuracy * n)) \
        if goals.min_accuracy is not None else \
        (round(r.violation, 9), -round(r.outcome.accuracy * n), r.escalations)
    assert key == _brute_force(tiers, conf, correct, goals)


def test_per_class_threshold_where_a_class_needs_one():
    # Class "a" is right whenever the edge says so; class "b" is confidently wrong half the time.
    n = 80
    conf = np.r_[np.linspace(0.6, 0.8, 40), np.linspace(0.85, 0.99, 40)]
    predicted = ["a"] * 40 + ["b"] * 40
    ok = np.r_[np.ones(40, bool), np.tile([True, False], 20)]
    tiers, top_conf, top_ok = ["edge", "top"], np.zeros(n), np.ones(n, bool)
    plain = search_thresholds(tiers, [conf, top_conf], [ok, top_ok], Goals(min_accuracy=1.0))
    assert plain.escalations == 80  # one threshold: class b's mistakes sit above all of a
    per_class = search_thresholds(tiers, [conf, top_conf], [ok, top_ok], Goals(min_accuracy=1.0),
                                  predicted=[predicted, ["a"] * n], class_min_support=10)
    assert per_class.outcome.accuracy == 1.0
    assert per_class.escalations == 40
    # Class a answers at any confidence; b keeps the tier threshold, above all of its samples.
    assert per_class.class_thresholds[0] == {"a": 0.0}
    assert per_class.thresholds[0] > 0.99


def test_per_class_thresholds_need_support():
    conf = np.r_[np.linspace(0.6, 0.8, 40), np.linspace(0.85, 0.99, 40)]
    ok = np.r_[np.ones(40, bool), np.tile([True, False], 20)]
    r = search_thresholds(["edge", "top"], [conf, np.zeros(80)], [ok, np.ones(80, bool)],
                          Goals(min_accuracy=1.0), predicted=[["a"] * 40 + ["b"] * 40, ["a"] * 80],
                          class_min_support=50)
    assert r.class_thresholds[0] == {}


# -- oracle router ------------------------------------------------------------------------------


def test_oracle_fixes_the_cheapest_mistakes_first():
    correct = [np.array([1, 0, 0, 0, 0], bool),   # endpoint: 1 of 5
               np.array([0, 1, 0, 0, 0], bool),   # sample 1 fixed one hop up
               np.array([0, 0, 1, 0, 0], bool),
               np.array([1, 1, 1, 1, 0], bool)]   # sample 3 only by the top; 4 by nobody
    esc, acc = oracle_curve(correct)
    assert esc.tolist() == pytest.approx([0, 1 / 5, 3 / 5, 6 / 5])
    assert acc.tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert oracle_escalations_for(correct, 0.6) == pytest.approx(0.6)
    assert oracle_escalations_for(correct, 0.9) is None


def test_relative_accuracy_goal_resolves_against_the_top_tier():
    assert parse_goal("accuracy>=top") == (None, Goals(max_accuracy_drop_vs_top=0.0))
    assert parse_goal("vision:accuracy>=top-0.3%") == ("vision", Goals(max_accuracy_drop_vs_top=0.003))
    with pytest.raises(GoalSyntaxError, match="only accuracy can be relative"):
        parse_goal("cloud<=top")
    goals = Goals(max_accuracy_drop_vs_top=0.01, min_accuracy=0.5)
    assert goals.resolved(0.95).min_accuracy == pytest.approx(0.94)
    # top tier right on 4 of 5: "as accurate as the top" needs only the one edge mistake fixed.
    top_ok = np.array([True, True, True, True, False])
    r = search_thresholds(TWO, [CONF, np.zeros(5)], [OK, top_ok], Goals(max_accuracy_drop_vs_top=0.0))
    assert r.outcome.accuracy == pytest.approx(0.8) and r.feasible
    checks = check_goals(Goals(max_accuracy_drop_vs_top=0.0), accuracy=0.79, cloud_share=0.0,
                         escalation_rate={}, top_tier="top", top_accuracy=0.8)
    assert checks[0].met is False
