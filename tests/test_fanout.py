"""The order in which a run hands out its pulls."""

from imagesync.sync import interleaved


def test_pulls_go_out_one_node_at_a_time_so_every_worker_starts_at_once():
    pulls = interleaved({"n2": ["a", "b", "c"], "n1": ["a"], "n3": ["x", "y"]})
    assert pulls[:3] == [("n1", "a"), ("n2", "a"), ("n3", "x")]
    assert pulls == [("n1", "a"), ("n2", "a"), ("n3", "x"), ("n2", "b"), ("n3", "y"), ("n2", "c")]


def test_nothing_missing_means_no_pulls():
    assert interleaved({}) == []
    assert interleaved({"n1": []}) == []
