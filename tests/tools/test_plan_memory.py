"""tools/plan_memory.py: the two real-size plans, a plan of a checkpoint file, bad input."""

from __future__ import annotations

import json

import pytest

from tools import plan_memory


@pytest.mark.slow
def test_examples_print_the_two_real_size_plans(capsys):
    assert plan_memory.main(["--examples"]) == 0
    out = capsys.readouterr().out
    medium, large = out.strip().split("\n\n")
    assert medium.startswith("sd35-medium (depth 24), full fine-tune, 1024x1024, batch 1, bf16, adamw8bit")
    assert large.startswith("sd35-large (depth 38), networks.lora_sd3 dim 16, 1024x1024, batch 1, bf16, adamw8bit, fp8 base")
    for plan in (medium, large):
        rows = {line[:52].strip(): line[52:].strip() for line in plan.splitlines()[2:]}
        assert float(rows["predicted peak"]) > 0 and float(rows["predicted peak without gradient checkpointing"]) > 0
        assert float(rows["predicted peak without gradient checkpointing"]) > float(rows["predicted peak"])
        assert any(line.startswith("12.0 GiB: ") for line in plan.splitlines())
    weights = {p: float(next(x for x in p.splitlines() if x.startswith("weights on the device"))[52:])
               for p in (medium, large)}
    assert 4.2 < weights[medium] < 5.0  # 2.24 B bf16 parameters + the 0.23 B pos_embed buffer
    assert 7.0 < weights[large] < 9.0  # 8.06 B parameters, block Linears in fp8


def test_plan_of_a_checkpoint_file_as_json(tiny_models, capsys):
    files = tiny_models("sd3-medium")
    argv = ["--pretrained_model_name_or_path", str(files.checkpoint), "--resolution", "128", "--json",
            "--fused_backward_pass", "--optimizer_type", "adafactor", "--budget", "1", "--device", "cpu"]
    assert plan_memory.main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["title"].startswith("sd3-medium (depth 3), full fine-tune, 128x128")
    assert plan["settings"]["fused"] == "parameter" and plan["peak"] > 0
    assert plan["smallest_blocks_to_swap"] == {"1.0": 0}  # a miniature fits 1 GiB


def test_bad_input_is_one_line(capsys):
    assert plan_memory.main(["--resolution", "1024"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--model" in err[0]
    assert plan_memory.main(["--model", "sd3-medium", "--blocks_to_swap", "30"]) == 2
    assert "at most 22" in capsys.readouterr().err
