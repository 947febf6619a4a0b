"""The ``orthotorch attention`` command (orthotorch.apps.attention_lm): argument validation, help text,
Ctrl-C, progress bar, and a tiny training run whose loss must fall."""

from __future__ import annotations

import argparse

import pytest

from orthotorch.apps import attention_lm, cli

TINY = ["--seq-len", "16", "--batch-size", "2", "--dim", "8", "--depth", "1", "--heads", "2",
        "--num-features", "4"]  # fmt: skip


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--steps", "-3"], "--steps"),
        (["--steps", "0"], "--steps"),
        (["--steps", "2.5"], "--steps"),
        (["--seq-len", "0"], "--seq-len"),
        (["--seq-len", "1000000000"], "--seq-len"),
        (["--batch-size", "0"], "--batch-size"),
        (["--slice-len", "0"], "--slice-len"),
        (["--dim", "0"], "--dim"),
        (["--dim", "-4"], "--dim"),
        (["--depth", "0"], "--depth"),
        (["--heads", "0"], "--heads"),
        (["--heads", "3"], "--dim"),  # 128 is not divisible by 3
        (["--num-features", "0"], "--num-features"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "fast"], "--lr"),
        (["--seed", "-1"], "--seed"),
        (["--threads", "-1"], "--threads"),
    ],
)
def test_invalid_arguments_exit_2_with_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["attention", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"error: argument {flag}:" in errors[0], err


def attention_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orthotorch")
    attention_lm.register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["attention"]


def test_help_is_plain_text_and_every_flag_has_help_and_default(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["attention", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for markup in ("``", ":func:", ":class:", ":mod:"):
        assert markup not in text
    p = attention_parser()
    flags = [a for a in p._actions if not isinstance(a, argparse._HelpAction)]
    assert len(flags) == 12
    for action in flags:
        assert action.help, action.option_strings
    assert text.count("(default:") == len(flags)


def test_ctrl_c_prints_one_line_keeps_the_partial_losses_and_exits_130(monkeypatch, capsys):
    def interrupted(**kwargs):
        kwargs["losses"].extend([5.0, 4.0, 3.0])
        raise KeyboardInterrupt

    monkeypatch.setattr(attention_lm, "train_char_lm", interrupted)
    assert cli.main(["attention", "--steps", "10", "--quiet"]) == 130
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "interrupted after 3/10 steps" in lines[0]
    assert "first 1 steps 5.000 -> last 1 steps 3.000" in lines[0]
    assert "Traceback" not in out.err


def test_progress_bar_stops_at_its_integer_total(capsys):
    losses = attention_lm.train_char_lm(
        steps=3, seq_len=16, batch_size=2, dim=8, depth=1, heads=2, num_features=4
    )
    assert len(losses) == 3
    err = capsys.readouterr().err
    assert "3/3" in err and "4/3" not in err and "3.0/" not in err


def test_train_char_lm_validates_its_arguments():
    with pytest.raises(ValueError, match="steps"):
        attention_lm.train_char_lm(steps=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        attention_lm.train_char_lm(steps=1, lr=float("nan"), progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        attention_lm.train_char_lm(steps=1, seq_len=10**9, progress=False)


def test_a_tiny_run_completes(capsys):
    code = cli.main(["attention", "--steps", "2", *TINY, "--quiet", "--slice-len", "8"])
    assert code in (0, 1)
    assert "loss (nats/byte)" in capsys.readouterr().out


def test_training_lowers_the_loss():
    losses = attention_lm.train_char_lm(
        steps=25, seq_len=32, batch_size=4, dim=32, depth=1, heads=2, num_features=16, lr=1e-2,
        progress=False, slice_len=16,
    )  # fmt: skip
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
