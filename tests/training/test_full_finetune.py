"""Full fine-tune parameter groups: rates, freezing, T5 eval mode."""

from __future__ import annotations

import pytest

from library.errors import UserError
from library.models.loading import load_mmdit
from library.models.text_encoders import load_text_encoders
from library.training.full_finetune import FullModel, FullTrainSpec, param_groups


def test_groups_rates_and_freezing(tiny_models):
    files = tiny_models("sd35-medium")
    mmdit, encoders = load_mmdit(files.checkpoint), load_text_encoders(files.checkpoint)
    spec = FullTrainSpec(learning_rate=5e-5, learning_rate_te1=5e-6, learning_rate_te2=0.0, train_text_encoder=True,
                         num_last_block_to_freeze=1)
    groups = {g["name"]: g for g in param_groups(mmdit, encoders, spec)}
    assert set(groups) == {"mmdit", "clip_l"}  # te2 rate 0 = frozen, T5 not trained without --train_t5xxl
    assert groups["mmdit"]["lr"] == 5e-5 and groups["clip_l"]["lr"] == 5e-6
    last = mmdit.joint_blocks[-1]
    assert not any(p.requires_grad for p in last.parameters())
    assert all(p.requires_grad for p in mmdit.joint_blocks[0].parameters())
    assert not any(p.requires_grad for p in encoders.clip_g.parameters())
    model = FullModel(mmdit, encoders).train()
    assert model.mmdit.training and model.text_encoders["clip_l"].training
    assert not model.text_encoders["t5xxl"].training and not model.text_encoders["clip_g"].training


def test_t5_trained_stays_in_eval_and_bad_freeze(tiny_models):
    files = tiny_models("sd35-medium")
    mmdit, encoders = load_mmdit(files.checkpoint), load_text_encoders(files.checkpoint)
    groups = param_groups(mmdit, encoders, FullTrainSpec(learning_rate=1e-4, train_t5xxl=True))
    assert "t5xxl" in {g["name"] for g in groups}
    model = FullModel(mmdit, encoders).train()
    assert not model.text_encoders["t5xxl"].training  # trained, but dropout stays off
    with pytest.raises(UserError, match="num_last_block_to_freeze 9"):
        param_groups(mmdit, encoders, FullTrainSpec(learning_rate=1e-4, num_last_block_to_freeze=9))
