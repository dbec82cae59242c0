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


def _yaml_error(tmp_path, capsys, text, classes=None, argv=()):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse(classes or [ModelConfig, Run], ["--config", str(cfg), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    return line


def test_a_section_with_every_key_commented_out_is_empty(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  # rnn_size: 128\nlr: 0.01\n")
    model, run = parse([ModelConfig, Run], ["--config", str(cfg)])
    assert model.rnn_size == ModelConfig().rnn_size and run.lr == 0.01


@pytest.mark.parametrize("text, said", [
    ("model: 3\n", "c.yaml: section 'model' must be a mapping of option: value, got int 3"),
    ("model:\n  - rnn_size\n", "c.yaml: section 'model' must be a mapping of option: value, got "
                               "list"),
    ("epochs: true\n", "config FILE: epochs must be int, got the boolean True"),
    ("lr: false\n", "config FILE: lr must be float, got the boolean False"),
    ("name: [a, b]\n", "config FILE: name must be str, got a list ['a', 'b']"),
    ("run:\n  name: {a: 1}\n", "config FILE: name must be str, got a mapping {'a': 1}"),
    ("lr: 0.1\nepochs: 2\nlr: 0.2\n", "c.yaml: line 3: key 'lr' appears twice in one mapping"),
    ("model:\n  rnn_size: 8\n  rnn_size: 16\n", "c.yaml: line 3: key 'rnn_size' appears twice"),
])
def test_yaml_values_of_the_wrong_shape_name_file_and_key(tmp_path, capsys, text, said):
    line = _yaml_error(tmp_path, capsys, text)
    assert said.replace("FILE", str(tmp_path / "c.yaml")) in line, line


def test_an_unset_variable_names_the_file_and_key(tmp_path, capsys, monkeypatch):
    from sentdisc.config import OutputConfig

    monkeypatch.delenv("NO_SUCH_ROOT", raising=False)
    line = _yaml_error(tmp_path, capsys, "output:\n  experiment_dir: ${NO_SUCH_ROOT}/x\n",
                       [OutputConfig])
    assert f"config {tmp_path / 'c.yaml'}: experiment_dir: " in line
    assert "environment variable NO_SUCH_ROOT is not set" in line


def test_comma_list_fields_take_a_yaml_list(tmp_path):
    from sentdisc.labeled import LabeledDataConfig

    cfg = tmp_path / "c.yaml"
    cfg.write_text("labeleddata:\n  label_key: [books, dvd, positive]\n  labels: []\n"
                   "text_key: [a, b]\n")
    with pytest.raises(SystemExit):  # text_key is no list
        parse([LabeledDataConfig], ["--config", str(cfg)])
    cfg.write_text("labeleddata:\n  label_key: [books, dvd, positive]\n")
    (data,) = parse([LabeledDataConfig], ["--config", str(cfg)])
    assert data.label_key == "books,dvd,positive" and data.label_keys == ["books", "dvd",
                                                                          "positive"]


@pytest.mark.parametrize("flags, said", [
    (["--persist_state", "2"], "--persist_state must be -1, 0 or 1, got 2"),
    (["--weight_decay", "-0.1"], "TrainConfig.weight_decay must be a finite number >= 0"),
    (["--lr", "inf"], "TrainConfig.lr must be a finite number > 0, got inf"),
    (["--lr", "nan"], "TrainConfig.lr must be a finite number > 0, got nan"),
    (["--clip", "-1"], "TrainConfig.clip must be a finite number >= 0 (0 = off), got -1"),
])
def test_training_flags_that_cannot_work_fail_with_the_flags(flags, said, capsys):
    from sentdisc.recipes import pretrain

    with pytest.raises(SystemExit) as e:
        pretrain.main(["--train", "corpus", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and said in err, err


def test_clip_zero_still_means_off():
    from sentdisc.train import TrainConfig

    assert TrainConfig(clip=0.0).clip == 0.0


@pytest.mark.parametrize("flag", ["--seq_length", "--save_iters", "--eval_iters"])
def test_finetune_refuses_pretraining_flags_it_does_not_use(flag, capsys, tmp_path):
    from sentdisc.recipes import finetune

    with pytest.raises(SystemExit) as e:
        finetune.main(["--train", "t.csv", flag, "5"])
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert e.value.code == 2 and line.startswith(f"sentdisc finetune: error: {flag}: "
                                                 "sentdisc finetune does not use it: "), line
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train:\n  {flag[2:]}: 5\n")
    with pytest.raises(SystemExit):
        finetune.main(["--train", "t.csv", "--config", str(cfg)])
    assert f"{flag[2:]}: sentdisc finetune does not use it" in capsys.readouterr().err


def test_finetune_help_speaks_of_texts_and_hides_what_it_refuses(capsys):
    from sentdisc.recipes import finetune

    with pytest.raises(SystemExit):
        finetune.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: sentdisc finetune ")
    assert "--batch_size INT texts per batch" in out and "parallel byte streams" not in out
    for flag in ("--seq_length", "--save_iters", "--eval_iters"):
        assert flag + " " not in out.replace("--save_iters)", ""), flag


@pytest.mark.parametrize("command", ["pretrain", "transfer", "finetune", "score"])
def test_usage_and_errors_name_the_command(command, capsys):
    from sentdisc.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--no_such_flag"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"usage: sentdisc {command} [-h]" in err
    assert f"sentdisc {command}: error: unrecognized arguments: --no_such_flag" in err
