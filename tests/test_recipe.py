import pytest
import yaml

from flexsurgeon.errors import RecipeError
from flexsurgeon.training.recipe import RECIPE_DIR, Recipe, available, load_recipe, parse_override, with_overrides


def test_shipped_recipes_load_and_say_what_they_are_for():
    assert {"smoke", "quick", "paper", "probe"} <= set(available())
    for name in available():
        text = (RECIPE_DIR / f"{name}.yaml").read_text()
        assert text.startswith(f"# {name}:"), name  # a comment saying what it is for
        assert isinstance(load_recipe(name), Recipe)


def test_paper_recipe_has_the_papers_settings():
    paper = load_recipe("paper")
    assert paper.sac_weights == [0.1, 0.2, 0.7]
    assert paper.sched == "onecycle" and paper.lr == 0.1
    assert paper.dropout == 0.25 and paper.pool == "linear" and paper.reg_weight > 0


def test_probe_freezes_the_backbone():
    assert load_recipe("probe").freeze_backbone


@pytest.mark.parametrize("doc,message", [
    ({"epochz": 3}, "unknown recipe field 'epochz' (did you mean 'epochs'?)"),
    ({"epochs": "three"}, "'epochs' must be an integer, got 'three'"),
    ({"epochs": 0}, "'epochs' = 0 must be at least 1"),
    ({"lr": -1}, "'lr' = -1.0 must be positive"),
    ({"sac_weights": [0.7, 0.2, 0.1]}, "must increase with depth"),
    ({"sched": "linear"}, "'sched' = 'linear' must be one of"),
    ({"optimizer": "adamm"}, "'optimizer' = 'adamm' is not an optimizer timm knows (did you mean 'adam'?)"),
    ({"optimizer": "lookahead_adamm"}, "'optimizer' = 'lookahead_adamm' is not an optimizer timm knows"),
    ({"ema": "yes"}, "'ema' must be true or false"),
    ({"ema_warmup": True}, "'ema_warmup' = True applies only with ema: true"),
    ({"freeze_epochs": 9, "epochs": 2}, "'freeze_epochs' = 9"),
    ([1, 2], "a recipe must be a mapping"),
])
def test_bad_recipe_files_name_the_key(tmp_path, doc, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_recipe_lists_the_shipped_ones():
    with pytest.raises(RecipeError, match="smoke"):
        load_recipe("nonesuch")


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("epochs: [1,\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(path))


def test_command_line_overrides_are_typed_and_checked():
    recipe = with_overrides(load_recipe("smoke"), dict([parse_override("lr=0.5"), parse_override("ema=true")]))
    assert recipe.lr == 0.5 and recipe.ema is True
    with pytest.raises(RecipeError, match="key=value"):
        parse_override("lr")
    with pytest.raises(RecipeError, match="unknown recipe field 'lrr'"):
        with_overrides(recipe, {"lrr": 1})


def test_optimizer_names_are_timms_in_any_case_with_lookahead():
    for name in ("sgd", "AdamW", "lookahead_adamw", "lamb"):
        assert with_overrides(load_recipe("smoke"), {"optimizer": name}).optimizer == name
    with pytest.raises(RecipeError, match="choose one of .*sgd.*adamw.*timm.optim.list_optimizers"):
        with_overrides(load_recipe("smoke"), {"optimizer": "nope"})


def test_an_old_timm_without_the_optimizer_registry_still_gets_one_line(monkeypatch):
    import flexsurgeon.training.recipe as recipe_module

    monkeypatch.setattr(recipe_module, "_timm_optimizers", lambda: None)  # timm < 1.0.12 has no list_optimizers
    assert with_overrides(load_recipe("smoke"), {"optimizer": "adamw"}).optimizer == "adamw"
    with pytest.raises(RecipeError, match="recipe field 'optimizer' = 'adamm' is not an optimizer this timm knows"):
        with_overrides(load_recipe("smoke"), {"optimizer": "adamm"})


def test_an_override_that_clashes_with_the_recipes_own_value_says_which_to_change():
    """--epochs 1 on a recipe that warms up for 1 epoch: the error names the recipe's field and how
    to change it; a clash in the overrides themselves stays the plain field error."""
    with pytest.raises(RecipeError) as e:
        with_overrides(load_recipe("quick"), {"epochs": 1})
    assert str(e.value) == ("recipe field 'warmup_epochs' = 1 must be below epochs: that is the recipe's value, and "
                            "with epochs=1 from the command line it must change too (--set warmup_epochs=VALUE)")
    with pytest.raises(RecipeError) as e:
        with_overrides(load_recipe("quick"), {"epochs": 2, "warmup_epochs": 2})
    assert str(e.value) == "recipe field 'warmup_epochs' = 2 must be below epochs"
    assert with_overrides(load_recipe("quick"), {"epochs": 1, "warmup_epochs": 0}).epochs == 1
