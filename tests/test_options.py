"""Every option takes effect or is refused: a converted folder's conversion is the folder's, and a
resume continues the run it names."""
from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from flexsurgeon.cli.main import main

DATA = "synthetic:classes=4,train=32,val=16,size=64"


def _finetune(*args):
    result = CliRunner().invoke(main, ["finetune", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


@pytest.mark.parametrize("option, words", [
    (["--pool", "linear"], "--pool is chosen at convert; {dir} has pool softmax: convert again, or finetune from "
                           "the model name"),
    (["--dropout", "0.5"], "--dropout is chosen at convert; {dir} has dropout 0.0"),
    (["--img-size", "96"], "--img-size is chosen at convert; {dir} has img_size 64"),
    (["--set", "pool=linear"], "--pool is chosen at convert; {dir} has pool softmax"),
    (["--sac-weights", "0.2,0.3,0.5"], "--sac-weights is chosen at convert; {dir} has sac_weights"),
    (["--sac-stages", "1"], "--sac-stages applies when converting a model name; {dir} is converted already"),
    (["--in-chans", "1"], "--in-chans applies when converting a model name"),
    (["--random-init"], "--weights/--random-init applies when converting a model name"),
])
def test_a_conversion_option_given_with_a_converted_folder_is_refused_before_any_run(converted, tmp_path, option,
                                                                                   words):
    run = tmp_path / "run"
    code, output = _finetune(converted, "--data", DATA, "--recipe", "smoke", *option, "-o", run)
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert code == 1 and len(errors) == 1 and words.format(dir=converted) in errors[0], output
    assert not run.exists()


def test_a_recipe_files_conversion_fields_give_way_to_the_folders_and_the_run_records_what_it_used(converted,
                                                                                                  tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"epochs": 1, "batch_size": 16, "pool": "linear", "dropout": 0.5,
                                      "img_size": 96, "workers": 0}))
    run = tmp_path / "run"
    code, output = _finetune(converted, "--data", DATA, "--recipe", recipe, "-o", run)
    assert code == 0, output
    assert f"note: the recipe's pool linear does not apply: {converted} was converted with softmax" in output
    used = yaml.safe_load((run / "recipe.yaml").read_text())
    assert (used["pool"], used["dropout"], used["img_size"]) == ("softmax", 0.0, 64)


def test_resume_with_another_source_is_refused_naming_both(converted, tmp_path):
    run = tmp_path / "run"
    code, output = _finetune(converted, "--data", DATA, "--recipe", "smoke", "--epochs", "1", "-o", run)
    assert code == 0, output
    code, output = _finetune("resnet10t", "--random-init", "--data", DATA, "--recipe", "smoke", "--epochs", "2",
                             "-o", run, "--resume")
    assert code == 1 and f"Error: {run} is a run of {converted}, not of resnet10t: resume it with {converted}" \
        in output, output
    code, output = _finetune(converted, "--data", DATA, "--recipe", "smoke", "--epochs", "2", "-o", run, "--resume")
    assert code == 0 and "after epoch 1" in output, output
