from dataclasses import dataclass, field
from typing import Optional

import pytest

from sentdisc.config import parse
from sentdisc.model import ModelConfig


@dataclass
class Run:
    lr: float = 5e-4
    epochs: int = 1
    use_gpu: bool = False
    name: Optional[str] = None
    grid: list[float] = field(default_factory=lambda: [0.5, 1.0])


def test_defaults_yaml_and_cli_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  rnn_size: 128\n  rnn_type: lstm\nlr: 0.01\nuse_gpu: true\n")
    model, run = parse([ModelConfig, Run], ["--config", str(cfg), "--rnn_size", "64",
                                            "--grid", "0.1,0.2", "--no-use_gpu"])
    assert model.rnn_size == 64 and model.rnn_type == "lstm" and model.embed_size == 64
    assert run.lr == 0.01 and run.use_gpu is False and run.grid == [0.1, 0.2] and run.epochs == 1


def test_unknown_yaml_key_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rnn_sise: 3\n")
    with pytest.raises(SystemExit):
        parse([ModelConfig, Run], ["--config", str(cfg)])
    err = capsys.readouterr().err
    assert "c.yaml" in err and "rnn_sise" in err


def test_bad_values_are_clear(capsys):
    with pytest.raises(SystemExit):
        parse([ModelConfig, Run], ["--epochs", "two"])
    assert "epochs must be int" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse([ModelConfig, Run], ["--rnn_type", "gru"])
    assert "rnn_type must be one of" in capsys.readouterr().err


def test_an_empty_yaml_value_names_the_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  rnn_size:\n")
    with pytest.raises(SystemExit):
        parse([ModelConfig, Run], ["--config", str(cfg)])
    err = capsys.readouterr().err
    assert "c.yaml" in err and "rnn_size must be int, got an empty value" in err, err


def test_cli_lists_commands(capsys):
    from sentdisc.cli import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("pretrain", "transfer", "heatmap", "generate", "data preprocess", "convert-openai"):
        assert cmd in out
    assert main(["nope"]) == 2


def test_a_key_in_the_wrong_section_names_file_section_and_key(tmp_path, capsys):
    from sentdisc.config import OutputConfig
    from sentdisc.train import TrainConfig

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  rnn_size: 16\ntrain:\n  experiment_dir: /tmp/x\n")
    with pytest.raises(SystemExit):
        parse([ModelConfig, TrainConfig, OutputConfig], ["--config", str(cfg)])
    err = capsys.readouterr().err
    assert "c.yaml" in err and "section 'train'" in err and "'experiment_dir'" in err
    assert "belongs in section 'output'" in err
    cfg.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(SystemExit):
        parse([ModelConfig, TrainConfig], ["--config", str(cfg)])
    assert "unknown section 'optim'" in capsys.readouterr().err


def test_path_fields_expand_environment_variables(tmp_path, monkeypatch):
    from sentdisc.config import OutputConfig

    monkeypatch.setenv("RUNS_ROOT", str(tmp_path))
    (out,) = parse([OutputConfig], ["--experiment_dir", "${RUNS_ROOT}/exp"])
    assert out.experiment_dir == f"{tmp_path}/exp" and out.run_dir == f"{tmp_path}/exp/default"
    with pytest.raises(ValueError, match="plain folder name"):
        _ = OutputConfig(str(tmp_path), "../up").run_dir


@pytest.mark.parametrize("flags,said", [
    (["--split", "0,1,1"], "split '0,1,1': the first proportion, training's, must be above 0"),
    (["--split", "8,x,1"], "split '8,x,1': expected proportions like 1000,1,1"),
    (["--max_record_bytes", "-3"], "--max_record_bytes must be at least 64, got -3"),
    (["--read_task_bytes", "0"], "--read_task_bytes must be at least 1, got 0")])
def test_data_flags_that_cannot_work_fail_with_the_flags(flags, said, capsys):
    from sentdisc.recipes import pretrain

    with pytest.raises(SystemExit) as e:  # parsed with the flags: no Ray has started
        pretrain.main(["--train", "corpus", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and said in err, err
