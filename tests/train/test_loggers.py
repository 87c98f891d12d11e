"""Run names, groups, tags and ids for wandb, and the choice between logging online and offline."""

from __future__ import annotations

import pytest

from gpt.train.loggers import choose_wandb_mode, run_label, wandb_fields


def test_wandb_fields_name_group_and_tag_by_the_overrides():
    fields = wandb_fields(["model=small", "optim.lr=3e-4", "seed=2", "hydra.run.dir=x"], "/tmp/run")
    assert fields["name"] == "model=small,optim.lr=3e-4,seed=2"
    assert fields["group"] == "model=small,optim.lr=3e-4"  # seeds of one configuration together
    assert fields["tags"] == ["model=small", "optim.lr=3e-4", "seed=2"]
    assert fields["resume"] == "allow"
    # the id comes from the run dir alone: a resumed run continues the same wandb run
    assert fields["id"] == wandb_fields([], "/tmp/run")["id"] != wandb_fields([], "/tmp/other")["id"]
    assert len(fields["id"]) == 16
    assert run_label([]) == "defaults"
    assert run_label(["ckpt_path=last", "hydra.run.dir=x"]) == "defaults"
    assert wandb_fields(["data.path=" + "x" * 100], "/tmp/run")["tags"] == ["data.path=" + "x" * 54]


@pytest.fixture
def no_account(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_wandb_logs_offline_without_credentials_and_online_with_them(no_account, monkeypatch):
    assert choose_wandb_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    no_account.write_text("machine api.wandb.ai login user password secret\n")
    assert choose_wandb_mode() == "online"
    monkeypatch.delenv("WANDB_MODE")
    no_account.write_text("machine elsewhere.example login user password secret\n")
    assert choose_wandb_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert choose_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's choice is kept
    assert choose_wandb_mode() == "disabled"
