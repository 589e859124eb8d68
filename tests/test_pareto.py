"""The Pareto front on hand-made trials: dominated points, ties, one point, missing values."""

from raykfe.pareto import pareto_front


def names(front):
    return [t["name"] for t in front]


def test_dominated_points_are_dropped_and_front_is_sorted_by_cost():
    trials = [
        {"name": "a", "val_acc": 0.90, "macs": 100},
        {"name": "b", "val_acc": 0.95, "macs": 200},
        {"name": "c", "val_acc": 0.85, "macs": 150},  # worse and costlier than a
        {"name": "d", "val_acc": 0.97, "macs": 400},
        {"name": "e", "val_acc": 0.96, "macs": 500},  # dominated by d
        {"name": "f", "val_acc": 0.80, "macs": 50},
    ]
    assert names(pareto_front(trials)) == ["f", "a", "b", "d"]


def test_ties():
    trials = [
        {"name": "a", "val_acc": 0.9, "macs": 100},
        {"name": "b", "val_acc": 0.9, "macs": 100},  # exact tie: both kept
        {"name": "c", "val_acc": 0.9, "macs": 120},  # same accuracy, costlier: dominated
        {"name": "d", "val_acc": 0.8, "macs": 100},  # same cost, less accurate: dominated
    ]
    assert sorted(names(pareto_front(trials))) == ["a", "b"]


def test_one_point_and_missing_values_and_other_cost():
    assert names(pareto_front([{"name": "x", "val_acc": 0.5, "macs": 7}])) == ["x"]
    assert pareto_front([]) == []
    trials = [
        {"name": "a", "val_acc": None, "macs": 1},  # stopped before reporting
        {"name": "b", "val_acc": 0.7, "params": 10, "macs": 100},
        {"name": "c", "val_acc": 0.6, "params": 5, "macs": 200},
    ]
    assert names(pareto_front(trials)) == ["b"]  # on MACs, c is dominated by b
    assert names(pareto_front(trials, cost="params")) == ["c", "b"]
