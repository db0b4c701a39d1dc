import json

import pytest

from flexsurgeon.errors import PlanError
from flexsurgeon.surgery.plan import PoolEdit, SacTap, SourceSpec, SurgeryPlan, default_sac_weights


def _plan(**changes):
    fields = dict(
        source=SourceSpec("timm", "resnet18", {"num_classes": 10}), num_classes=10, in_chans=3, img_size=(64, 64),
        pools=(PoolEdit("global_pool_pool", "layer4_1_act2", 512, (2, 2), False, module="global_pool"),),
        sac=(SacTap("layer2_1_act2", 128, (8, 8), "layer2"), SacTap("layer3_1_act2", 256, (4, 4), "layer3.1", "input")),
        sac_weights=(0.1, 0.2, 0.7),
    )
    fields.update(changes)
    return SurgeryPlan(**fields)


def test_plan_round_trips_through_json():
    plan = _plan()
    assert SurgeryPlan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json())["version"] == 3
    # a builder argument given as a tuple (LeViT's depth) comes back as the tuple, not dropped
    tuples = _plan(source=SourceSpec("timm", "levit_128s", {"depth": (1, 1, 1), "num_classes": 10}))
    assert SurgeryPlan.from_json(tuples.to_json()) == tuples
    with pytest.raises(PlanError, match="source.kwargs"):
        _plan(source=SourceSpec("timm", "levit_128s", {"depth": ((1, 1), 1)}))


def test_default_weights_are_the_papers_for_two_heads_and_increase_otherwise():
    assert default_sac_weights(2) == (0.1, 0.2, 0.7)
    for k in range(0, 6):
        weights = default_sac_weights(k)
        assert len(weights) == k + 1
        assert all(b > a for a, b in zip(weights, weights[1:]))
        assert sum(weights) == pytest.approx(1.0 if k else 1.0)


@pytest.mark.parametrize("changes,message", [
    ({"sac_weights": (0.2, 0.1, 0.7)}, "must increase with depth"),
    ({"sac_weights": (0.1, 0.9)}, "needs 3 values"),
    ({"pool": "max"}, "pool 'max' is not one of softmax, linear"),
    ({"dropout": 1.5}, "dropout must be in"),
    ({"num_classes": 0}, "num_classes must be a positive integer"),
    ({"img_size": (64,)}, "img_size must be two positive integers"),
    ({"pools": ()}, "replaces no pool"),
    ({"source": SourceSpec("os", "system", {})}, "source.library 'os'"),
    ({"source": SourceSpec("timm", "os.system; rm", {})}, "is not a model name"),
    ({"source": SourceSpec("timm", "resnet18", {"act_layer": ["x"]})}, "plain values"),
    ({"pools": (PoolEdit("__import__('os')", "x", 1, (2, 2), module="m"),)}, "is not a graph node name"),
    ({"pools": (PoolEdit("pool", "x", 1, (2, 2)),)}, "replaced in place but names no module"),
    ({"pools": (PoolEdit("pool", "x", 1, (2, 2), module="a", replacement="monkeypatch"),)},
     "replacement 'monkeypatch'"),
    ({"pools": (PoolEdit("pool", "x", 1, (2, 2), module="os.system('x')"),)}, "is not a module path"),
    ({"pools": (PoolEdit("pool", "x", 1, (2, 2), module="a b"),)}, "is not a module path"),
    ({"sac": (SacTap("t", 1, (2, 2), "layer2", "both"), SacTap("u", 1, (2, 2), "layer3"))},
     "read its output, an element of it"),
    ({"sac": (SacTap("t", 1, (2, 2), "layer2", "output[-1]"),)}, "read its output, an element of it"),
    ({"sac": (SacTap("t", 1, (2, 2), "layer2", "output[0].x"),)}, "read its output, an element of it"),
    ({"version": 1}, "convert the source model again"),
])
def test_bad_plans_are_refused_with_the_field_named(changes, message):
    with pytest.raises(PlanError, match=message.replace("(", r"\(")):
        _plan(**changes)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(extra=1), "unknown field"),
    (lambda d: d.pop("pools"), "missing field"),
    (lambda d: d["pools"][0].update(evil=1), "unknown key"),
    (lambda d: d.update(pools="x"), "must be a list"),
    (lambda d: d.update(version=99), "version 99"),
])
def test_bad_plan_documents_are_refused(mutate, message):
    data = _plan().to_dict()
    data = json.loads(json.dumps(data))
    mutate(data)
    with pytest.raises(PlanError, match=message):
        SurgeryPlan.from_dict(data)


def test_plan_text_that_is_not_json_is_refused():
    with pytest.raises(PlanError, match="not valid JSON"):
        SurgeryPlan.from_json("{nope")


def test_module_paths_are_names_not_code():
    """torchvision's RegNet names blocks ``block2-4``: a path, looked up with get_submodule."""
    plan = _plan(sac=(SacTap("t", 104, (8, 8), "trunk_output.block2.block2-4.activation"),
                      SacTap("u", 256, (4, 4), "layer3")))
    assert SurgeryPlan.from_json(plan.to_json()) == plan
