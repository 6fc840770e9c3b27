"""A plain `--rehearse` of a recipe whose start model is another run's future export says where to
point it (the rehearsal of that run), before any check of the missing directory itself."""

import pytest

from conftest import REPO_ROOT
from pipeline.__main__ import main
from pipeline.exit_codes import ExitCode

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("recipe, key, path", [("eval_gpu", "eval.model_path", "runs/dpo_gpu/export"),
                                               ("dpo_gpu", "dpo.init", "runs/sft_gpu/export")])
def test_rehearsing_a_recipe_started_from_a_future_export_names_the_rehearsal_to_point_at(recipe, key, path, capsys,
                                                                                           monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    assert main(["run", f"recipes/{recipe}.yaml", "--rehearse"]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert f"{key}: {path} is not a PPLLaVA model directory yet" in err
    assert f"point {key} at that rehearsal's export, e.g. {key}=<its run_dir>/rehearsal/export" in err
