"""``megabatch status RUN``: where a run stands from its run directory alone. The run
directories are written by hand (a real config.yaml, metrics.jsonl records as the loop
writes them, checkpoint folders with their marker); no training."""

import argparse
import json
import math
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from megabatch.trainer.config import dump_config, load_config
from megabatch.trainer.status import (
    EXIT_BAD_INPUT,
    RunStatus,
    StatusError,
    add_status_command,
    duration,
    format_status,
    read_metrics,
    run_status,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0
GLOBAL_BATCH = 256  # micro 64 x accumulation 2 x world size 2


# --------------------------------------------------------------------------- run folders
def record(step: int, time: float, **values) -> dict:
    """A logged step as Trainer._log writes it."""
    base = {"loss": 3.5, "lr": 1e-3, "logit_scale": 14.3, "samples_per_s": 256.0,
            "step_time_s": 1.0, "data_wait_fraction": 0.1, "skipped_samples": 0.0,
            "nonfinite_steps": 0.0, "samples_seen": float(step * GLOBAL_BATCH)}  # fmt: skip
    return {"step": step, "time": time, **base, **values}


def eval_record(step: int, time: float, top1: float = 0.9) -> dict:
    return {"step": step, "time": time, "eval/zeroshot_top1": top1, "eval/knn_top1": 0.8}


def steps(first: int, last: int, every: int = 10, end_time: float = NOW - 30, gap_s=10.0,
          **values) -> list[dict]:  # fmt: skip
    """Logged steps first..last, ``gap_s`` apart, the last at ``end_time``."""
    numbers = list(range(first, last + 1, every))
    return [record(s, end_time - gap_s * (len(numbers) - 1 - i), **values)
            for i, s in enumerate(numbers)]  # fmt: skip


def make_run(tmp_path: Path, records: list[dict], *, max_steps: int = 1000,
             minutes: float | None = 30.0, started: float = NOW - 600,
             checkpoints: dict[int, float] | None = None, results: dict | None = None,
             starts: int = 1, name: str = "run") -> Path:  # fmt: skip
    """A run directory: config.yaml (and configs/NNN.yaml per start) as the trainer writes
    them, metrics.jsonl, and complete checkpoints ``{step: completed at}``."""
    run = tmp_path / name
    (run / "configs").mkdir(parents=True)
    config = load_config(None, [
        "task=clip", f"run_dir={run}", "batch.micro_batch_size=64", "batch.accumulation_steps=2",
        f"train.max_steps={max_steps}", "train.log_every=10", "train.checkpoint_every_steps=null",
        f"train.checkpoint_every_minutes={'null' if minutes is None else minutes}",
    ])  # fmt: skip
    extra = {"git_revision": "unknown", "world_size": 2, "global_batch_size": GLOBAL_BATCH,
             "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
             "resumed_from": "none", "changed_on_resume": "none"}  # fmt: skip
    for start in range(starts):
        dump_config(config, run / "configs" / f"{start:03d}.yaml", extra=extra)
    dump_config(config, run / "config.yaml", extra=extra)
    write_metrics(run, records)
    for step, completed in (checkpoints or {}).items():
        add_checkpoint(run, step, completed)
    if results is not None:
        (run / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return run


def write_metrics(run: Path, records: list[dict], mode: str = "w") -> None:
    with (run / "metrics.jsonl").open(mode) as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def add_checkpoint(run: Path, step: int, completed: float) -> Path:
    path = run / "checkpoints" / f"step{step:08d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "samples_seen": step * 256,
                                                "loss": 3.0, "world_size": 2}))  # fmt: skip
    (path / "COMPLETE").write_text("ok\n")
    for file in (path / "meta.json", path / "COMPLETE"):
        os.utime(file, (completed, completed))
    return path


def codes(status: RunStatus) -> list[str]:
    return [w.code for w in status.warnings]


def cli(*argv: str) -> int:
    """The handler as the megabatch parser calls it (cli.main: ``args.func(args)``)."""
    parser = argparse.ArgumentParser(prog="megabatch")
    add_status_command(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(["status", *argv])
    return args.func(args)


def status_row(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"{label:<10} "))[11:]


# --------------------------------------------------------------------------- finished
def test_a_finished_run_is_healthy_an_hour_later(tmp_path, monkeypatch, capsys):
    records = steps(10, 200, end_time=NOW - 3600, samples_per_s=262.0, step_time_s=0.98)
    records[-1]["loss"] = 3.2214
    run = make_run(
        tmp_path, [*records, eval_record(200, NOW - 3590, top1=0.95)], max_steps=200,
        checkpoints={100: NOW - 3700, 200: NOW - 3595},
        results={"step": 200, "zeroshot_top1": 0.95, "linear_probe_top1": 0.964},
    )  # fmt: skip
    status = run_status(run, now=NOW)
    assert status.state == "finished" and status.finished
    assert status.step == 200 and status.loss == pytest.approx(3.2214)
    assert status.warnings == [] and status.exit_status == 0
    assert status.eta_s is None
    assert (status.checkpoint_step, status.checkpoint_path) == (200, str(run / "checkpoints/step00000200"))  # fmt: skip
    assert status.checkpoint_age_s == pytest.approx(3595)
    # results.json (the final evaluation) over the metrics' eval record of the same step
    assert status.eval == {"zeroshot_top1": 0.95, "linear_probe_top1": 0.964}
    text = format_status(status)
    assert status_row(text, "run") == f"{run} (clip, world size 2, global batch 256)"
    assert status_row(text, "step") == "200 of 200 (100%), finished"
    assert status_row(text, "loss") == "3.2214 (step 200)"
    assert status_row(text, "throughput") == "262 samples/s, step 0.98 s, data wait 10%"
    assert status_row(text, "ETA") == "-"
    assert (
        status_row(text, "checkpoint") == f"step 200, 59m55s ago ({run}/checkpoints/step00000200)"
    )
    assert status_row(text, "skipped") == "0 samples on rank 0"
    assert status_row(text, "eval") == "zeroshot_top1 0.950  linear_probe_top1 0.964 (step 200)"
    assert text.splitlines()[-1] == "warnings   none"

    monkeypatch.setattr("time.time", lambda: NOW)
    assert cli(str(run)) == 0
    out = capsys.readouterr()
    assert out.out == text + "\n" and out.err == ""


# --------------------------------------------------------------------------- running
def test_a_running_run_has_an_eta_at_the_recent_rate(tmp_path):
    # Slow early steps do not count: the rate is the mean step time of the last 5 logs.
    early = steps(10, 450, end_time=NOW - 80, step_time_s=5.0)
    recent = [record(460 + 10 * i, NOW - 70 + 10 * i, step_time_s=t)
              for i, t in enumerate([0.8, 0.9, 1.0, 1.1, 1.2])]  # fmt: skip
    run = make_run(tmp_path, early + recent, max_steps=1000, checkpoints={400: NOW - 600})
    status = run_status(run, now=NOW)
    assert status.state == "running" and status.step == 500
    assert status.step_time_s == pytest.approx(1.0)
    assert status.eta_s == pytest.approx(500 * 1.0)
    assert status.warnings == [] and status.exit_status == 0
    text = format_status(status)
    assert status_row(text, "step") == "500 of 1000 (50%), running, last step 30s ago"
    assert status_row(text, "ETA") == "8m20s at the recent rate"
    assert status_row(text, "checkpoint").startswith("step 400, 10m00s ago")


def test_a_run_without_a_logged_step_is_starting(tmp_path):
    run = make_run(tmp_path, [], started=NOW - 120)
    status = run_status(run, now=NOW)
    assert status.state == "starting" and status.step == 0 and status.loss is None
    assert status.warnings == []
    text = format_status(status)
    assert (
        status_row(text, "step")
        == "0 of 1000 (0%), starting, no step logged yet (started 2m00s ago)"
    )
    assert status_row(text, "checkpoint") == "none yet"
    assert status_row(text, "eval") == "none yet"


# --------------------------------------------------------------------------- STALLED
@pytest.mark.parametrize(
    ("gap_s", "age_s", "stalled"),
    [
        (10.0, 14 * 60, False),  # under the 15 min floor
        (10.0, 16 * 60, True),  # over it (10 x 10 s is less)
        (200.0, 16 * 60, False),  # logs 200 s apart: 10 x 200 s = 33m20s
        (200.0, 34 * 60, True),
    ],
)
def test_stalled_after_max_of_15_minutes_and_10_logging_intervals(tmp_path, gap_s, age_s, stalled):
    run = make_run(tmp_path, steps(10, 300, end_time=NOW - age_s, gap_s=gap_s),
                   started=NOW - 7200, minutes=None, checkpoints={300: NOW - age_s})  # fmt: skip
    status = run_status(run, now=NOW)
    assert status.stall_after_s == pytest.approx(max(900.0, 10 * gap_s))
    assert codes(status) == (["STALLED"] if stalled else [])
    assert status.state == ("stopped" if stalled else "running")
    assert status.exit_status == (1 if stalled else 0)
    if stalled:
        assert status.eta_s is None
        text = format_status(status)
        assert re.search(r"stopped, last step \d+m\d\ds ago", status_row(text, "step"))
        assert status_row(text, "ETA") == "- (not running)"
        warning = status_row(text, "warnings")
        assert warning.startswith(f"STALLED: no logged step for {duration(age_s)}")
        assert "step 300" in warning  # where a restart resumes


def test_a_finished_run_is_never_stalled(tmp_path):
    run = make_run(tmp_path, steps(10, 100, end_time=NOW - 30 * 86400), max_steps=100,
                   started=NOW - 31 * 86400)  # fmt: skip
    assert codes(run_status(run, now=NOW)) == []


@pytest.mark.parametrize(("records", "stalled"), [(False, False), (True, True)])
def test_a_start_that_logged_nothing_yet_has_30_minutes(tmp_path, records, stalled):
    # Start-up (rendezvous, loading a checkpoint) gets deploy/prometheus/rules.yml's
    # STARTUP_GRACE; a start 20 min ago that has logged steps since gets the usual 15 min.
    logged = steps(10, 30, end_time=NOW - 16 * 60) if records else []
    run = make_run(tmp_path, logged, started=NOW - 20 * 60, minutes=None)
    status = run_status(run, now=NOW)
    assert codes(status) == (["STALLED"] if stalled else [])
    assert status.stall_after_s == (900.0 if records else 1800.0)
    status = run_status(run, now=NOW + 11 * 60)  # 31 min after the start
    assert codes(status) == ["STALLED"] and status.state == "stopped"
    if not records:
        assert status.warnings[0].message.startswith(
            "no logged step since the start 31m00s ago (over 30m00s of start-up)"
        )


def test_a_resumed_start_that_logged_nothing_yet_has_30_minutes(tmp_path):
    run = make_run(tmp_path, steps(10, 300, end_time=NOW - 5 * 3600), started=NOW - 20 * 60,
                   starts=2, minutes=None, checkpoints={300: NOW - 5 * 3600})  # fmt: skip
    status = run_status(run, now=NOW)
    assert (status.state, status.stall_after_s, codes(status)) == ("running", 1800.0, [])
    assert codes(run_status(run, now=NOW + 11 * 60)) == ["STALLED"]


def test_a_fresh_start_of_a_resumed_run_is_not_stalled(tmp_path):
    # The last logged step is hours old, but the run was just started again (requeued).
    run = make_run(tmp_path, steps(10, 300, end_time=NOW - 5 * 3600), started=NOW - 60,
                   starts=2, checkpoints={300: NOW - 5 * 3600})  # fmt: skip
    status = run_status(run, now=NOW)
    assert status.state == "running" and codes(status) == []
    assert status.last_activity_age_s == pytest.approx(60)


# --------------------------------------------------------------------------- INPUT-BOUND
@pytest.mark.parametrize(
    ("recent_waits", "bound"),
    [
        ([0.6, 0.6, 0.6, 0.6, 0.6], True),
        ([0.1, 0.1, 0.1, 0.1, 0.95], False),  # one slow log is not input-bound: the mean is 0.27
        ([0.5, 0.5, 0.5, 0.5, 0.5], False),  # over 0.5, not at it
    ],
)
def test_input_bound_on_the_mean_data_wait_of_the_last_5_logs(tmp_path, recent_waits, bound):
    early = steps(10, 100, end_time=NOW - 100, data_wait_fraction=0.9)
    recent = [record(110 + 10 * i, NOW - 90 + 10 * i, data_wait_fraction=w)
              for i, w in enumerate(recent_waits)]  # fmt: skip
    status = run_status(make_run(tmp_path, early + recent, checkpoints={100: NOW - 60}), now=NOW)
    assert status.data_wait_fraction == pytest.approx(sum(recent_waits) / 5)
    assert codes(status) == (["INPUT-BOUND"] if bound else [])
    if bound:
        warning = status_row(format_status(status), "warnings")
        assert warning.startswith("INPUT-BOUND: the ranks waited for data 60%")
        assert "data.num_workers" in warning


# --------------------------------------------------------------------------- NON-FINITE
def test_non_finite_when_the_last_loss_is_nan(tmp_path):
    records = steps(10, 100, end_time=NOW - 30)
    records[-1]["loss"] = float("nan")  # json.dumps writes NaN, as the sink does
    status = run_status(make_run(tmp_path, records, checkpoints={50: NOW - 200}), now=NOW)
    assert codes(status) == ["NON-FINITE"] and status.exit_status == 1
    assert math.isnan(status.loss)
    text = format_status(status)
    assert status_row(text, "loss") == "nan (step 100)"
    warning = status_row(text, "warnings")
    assert warning.startswith("NON-FINITE: the loss at step 100 is nan")
    assert "optim.lr" in warning and "step 50" in warning


def test_non_finite_when_the_last_step_is_in_a_streak(tmp_path):
    records = steps(10, 100, end_time=NOW - 30)
    records[-1]["nonfinite_steps"] = 2.0  # the loss logged is finite, the streak is not
    status = run_status(make_run(tmp_path, records), now=NOW)
    assert codes(status) == ["NON-FINITE"] and status.nonfinite_steps == 2
    assert "2 non-finite steps in a row" in status.warnings[0].message


def test_an_earlier_non_finite_streak_that_ended_is_not_a_warning(tmp_path):
    records = steps(10, 100, end_time=NOW - 30)
    records[3]["loss"], records[3]["nonfinite_steps"] = float("inf"), 1.0
    assert codes(run_status(make_run(tmp_path, records, checkpoints={90: NOW - 60}), now=NOW)) == []


# --------------------------------------------------------------------------- CHECKPOINT OVERDUE
@pytest.mark.parametrize(("age_min", "overdue"), [(59, False), (61, True)])
def test_checkpoint_overdue_after_twice_checkpoint_every_minutes(tmp_path, age_min, overdue):
    run = make_run(tmp_path, steps(10, 500, end_time=NOW - 30), minutes=30.0,
                   started=NOW - 3 * 3600, checkpoints={100: NOW - 7200, 200: NOW - 60 * age_min})  # fmt: skip
    status = run_status(run, now=NOW)
    assert codes(status) == (["CHECKPOINT OVERDUE"] if overdue else [])
    if overdue:
        message = status.warnings[0].message
        assert message.startswith("the newest complete checkpoint (step 200) is 1h01m old")
        assert "train.checkpoint_every_minutes=30" in message


def test_checkpoint_overdue_with_no_checkpoint_since_the_start(tmp_path):
    run = make_run(tmp_path, steps(10, 500, end_time=NOW - 30), minutes=30.0, started=NOW - 7200)
    status = run_status(run, now=NOW)
    assert codes(status) == ["CHECKPOINT OVERDUE"]
    assert status.warnings[0].message.startswith("no complete checkpoint 2h00m after the start")


@pytest.mark.parametrize(
    ("max_steps", "minutes", "started"),
    [
        (500, 30.0, NOW - 7200),  # finished: no more checkpoints are due
        (1000, None, NOW - 7200),  # no time-based checkpoints asked for
        (1000, 30.0, NOW - 600),  # started again 10 min ago: the save timer started again
    ],
    ids=["finished", "no-minutes", "restarted"],
)
def test_checkpoint_not_overdue(tmp_path, max_steps, minutes, started):
    run = make_run(tmp_path, steps(10, 500, end_time=NOW - 30), max_steps=max_steps,
                   minutes=minutes, started=started, checkpoints={100: NOW - 5 * 3600})  # fmt: skip
    assert "CHECKPOINT OVERDUE" not in codes(run_status(run, now=NOW))


# --------------------------------------------------------------------------- SKIPPED
@pytest.mark.parametrize(("skipped", "warned"), [(250, False), (256, False), (257, True)])
def test_skipped_over_1_percent_of_rank_0s_samples(tmp_path, skipped, warned):
    # 200 x 256 = 51200 samples seen by the 2 ranks, 25600 of them by rank 0, whose
    # loader's counts metrics.jsonl carries.
    records = steps(10, 200, end_time=NOW - 30)
    records[-1]["skipped_samples"] = float(skipped)
    status = run_status(make_run(tmp_path, records, checkpoints={200: NOW - 30}), now=NOW)
    assert (status.skipped_samples, status.samples_seen) == (skipped, 51200)
    assert codes(status) == (["SKIPPED"] if warned else [])
    text = format_status(status)
    assert (
        status_row(text, "skipped")
        == f"{skipped} samples on rank 0 ({100 * skipped / 25600:.2f}% of its 25600)"
    )
    if warned:
        assert "megabatch data inspect" in status_row(text, "warnings")


# --------------------------------------------------------------------------- metrics.jsonl
def test_a_resumed_run_takes_the_last_record_of_each_step(tmp_path):
    # First start: steps 10-50, then killed; resumed from the step-30 checkpoint, it
    # logged 30-40 again (the abandoned attempt's step 50 is not the run's progress).
    first = steps(10, 50, end_time=NOW - 600, loss=5.0)
    again = steps(30, 40, end_time=NOW - 30, loss=2.0)
    run = make_run(tmp_path, [*first, eval_record(50, NOW - 590, top1=0.1), *again],
                   starts=2, started=NOW - 60, checkpoints={30: NOW - 700})  # fmt: skip
    train, evals, unreadable = read_metrics(run / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in train] == [(10, 5.0), (20, 5.0), (30, 2.0), (40, 2.0)]
    assert evals == [] and unreadable == 0
    status = run_status(run, now=NOW)
    assert (status.step, status.loss, status.starts) == (40, 2.0, 2)
    assert status.eval == {}
    assert status_row(format_status(status), "run").endswith("global batch 256, 2 starts)")

    # It goes on past the first start's steps: those are replaced, step by step.
    write_metrics(run, steps(50, 60, end_time=NOW - 10, loss=1.5), mode="a")
    status = run_status(run, now=NOW)
    assert (status.step, status.loss) == (60, 1.5)


def test_an_evaluation_of_an_earlier_checkpoint_does_not_rewind_the_run(tmp_path):
    # `megabatch eval` appends an eval record for the checkpoint's step after the end.
    records = [
        *steps(10, 200),
        eval_record(200, NOW - 25, top1=0.9),
        eval_record(100, NOW - 5, 0.5),
    ]
    status = run_status(make_run(tmp_path, records, max_steps=200), now=NOW)
    assert status.step == 200 and status.finished
    assert (status.eval_step, status.eval["zeroshot_top1"]) == (200, 0.9)


def test_a_truncated_last_line_is_skipped(tmp_path):
    run = make_run(tmp_path, steps(10, 50, end_time=NOW - 30))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 60, "time": 1799999990.5, "loss": 2.')  # killed mid-write
    status = run_status(run, now=NOW)
    assert status.step == 50 and status.unreadable_lines == 1
    assert status_row(format_status(status), "metrics") == (
        "1 unreadable line(s) of metrics.jsonl skipped"
    )


def test_corrupt_lines_in_the_middle_are_skipped_too(tmp_path):
    run = make_run(tmp_path, [])
    lines = [json.dumps(r) for r in steps(10, 30, end_time=NOW - 30)]
    lines[1:1] = ["\x00\x00garbage", "[1, 2]", '{"no": "step"}', ""]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    status = run_status(run, now=NOW)
    assert status.step == 30 and status.unreadable_lines == 3


# --------------------------------------------------------------------------- bad input
def _bad_dirs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    no_metrics = make_run(tmp_path, [], name="no-metrics")
    (no_metrics / "metrics.jsonl").unlink()
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    return {
        "missing": (tmp_path / "missing", "not a run directory (no such directory)"),
        "file": (tmp_path / "file", "not a run directory (not a directory)"),
        "empty": (tmp_path / "empty", "not a run directory (no config.yaml)"),
        "no-metrics": (no_metrics, "not a run directory (no metrics.jsonl)"),
    }


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no-metrics"])
def test_not_a_run_directory_is_one_line_and_exit_2(tmp_path, capsys, case):
    path, reason = _bad_dirs(tmp_path)[case]
    with pytest.raises(StatusError):
        run_status(path, now=NOW)
    assert cli(str(path)) == EXIT_BAD_INPUT == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f"megabatch status: {path}: {reason}\n"


def test_a_config_this_version_cannot_build_still_gives_a_status(tmp_path):
    # A run written by another megabatch version: a key this one does not know.
    run = make_run(tmp_path, steps(10, 100, end_time=NOW - 30), max_steps=100)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text + "future_section:\n  knob: 1\n")
    status = run_status(run, now=NOW)
    assert (status.step, status.max_steps, status.state) == (100, 100, "finished")


def test_a_config_that_is_not_yaml_is_bad_input(tmp_path, capsys):
    run = make_run(tmp_path, steps(10, 100))
    (run / "config.yaml").write_text("task: [unclosed\n")
    assert cli(str(run)) == 2
    err = capsys.readouterr().err
    assert err.startswith("megabatch status: ") and str(run / "config.yaml") in err
    assert err.count("\n") == 1


# --------------------------------------------------------------------------- --json
def test_json_prints_the_same_facts(tmp_path, monkeypatch, capsys):
    records = steps(10, 100, end_time=NOW - 20 * 60)
    records[-1]["loss"] = float("nan")
    run = make_run(tmp_path, [*records, eval_record(100, NOW - 20 * 60 + 5)],
                   started=NOW - 3600, checkpoints={100: NOW - 20 * 60})  # fmt: skip
    monkeypatch.setattr("time.time", lambda: NOW)
    assert cli(str(run), "--json") == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one object, one line

    def strict(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    data = json.loads(out, parse_constant=strict)
    for key in ("run_dir", "task", "world_size", "global_batch_size", "max_steps", "step",
                "state", "loss", "samples_per_s", "step_time_s", "data_wait_fraction", "eta_s",
                "checkpoint_step", "checkpoint_path", "checkpoint_age_s", "samples_seen",
                "skipped_samples", "eval", "eval_step", "warnings", "exit_status"):  # fmt: skip
        assert key in data, key
    assert data["run_dir"] == str(run) and data["step"] == 100 and data["state"] == "stopped"
    assert data["loss"] == "nan" and data["eta_s"] is None
    assert data["checkpoint_step"] == 100 and data["checkpoint_age_s"] == pytest.approx(1200)
    assert data["eval"] == {"zeroshot_top1": 0.9, "knn_top1": 0.8}
    assert [w["code"] for w in data["warnings"]] == ["STALLED", "NON-FINITE"]
    assert all(w["message"] for w in data["warnings"]) and data["exit_status"] == 1
    assert data == run_status(run, now=NOW).to_dict()


def test_several_warnings_are_each_on_a_line_of_their_own(tmp_path):
    records = steps(10, 100, end_time=NOW - 30, data_wait_fraction=0.8)
    records[-1]["skipped_samples"] = 5000.0
    text = format_status(run_status(make_run(tmp_path, records, started=NOW - 7200), now=NOW))
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("warnings "))
    assert [line[11:].split(":")[0] for line in lines[first:]] == [
        "INPUT-BOUND", "CHECKPOINT OVERDUE", "SKIPPED"]  # fmt: skip
    assert all(line.startswith(" " * 11) for line in lines[first + 1 :])


def test_durations():
    assert [duration(s) for s in (0, 45, 750, 3 * 3600 + 5 * 60, 2 * 86400 + 4 * 3600)] == [
        "0s", "45s", "12m30s", "3h05m", "2d04h"]  # fmt: skip
    assert duration(None) == "-"


# --------------------------------------------------------------------------- the command
def test_status_imports_no_deepspeed_and_no_transformers(tmp_path):
    run = make_run(tmp_path, steps(10, 100, end_time=NOW - 30), checkpoints={100: NOW - 30})
    code = (
        "import sys\n"
        "import megabatch.trainer.status as status\n"
        "assert 'torch' not in sys.modules, 'importing status pulled in torch'\n"
        f"s = status.run_status({str(run)!r})\n"
        "assert s.checkpoint_step == 100\n"
        "heavy = sorted(m for m in ('deepspeed', 'transformers') if m in sys.modules)\n"
        "assert not heavy, f'status pulled in {heavy}'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def _cli_lists_status() -> bool:
    proc = subprocess.run([sys.executable, "-m", "megabatch.trainer.cli", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    return re.search(r"^\s+status\s", proc.stdout, re.MULTILINE) is not None


def test_megabatch_status_on_a_demo_like_run(tmp_path):
    if not _cli_lists_status():
        pytest.skip("status not wired into cli yet")
    # runs/demo-clip as `megabatch demo` leaves it: 200 steps, checkpoints 100-200.
    records = steps(10, 200, end_time=NOW - 60, samples_per_s=288.0, step_time_s=0.89)
    run = make_run(tmp_path, [*records, eval_record(200, NOW - 55, top1=0.95)], max_steps=200,
                   checkpoints={100: NOW - 150, 150: NOW - 100, 200: NOW - 58},
                   results={"step": 200, "zeroshot_top1": 0.95, "knn_top1": 0.96})  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "megabatch.trainer.cli", "status", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert status_row(text, "step") == "200 of 200 (100%), finished"
    assert status_row(text, "checkpoint").startswith("step 200, ")
    assert status_row(text, "eval") == "zeroshot_top1 0.950  knn_top1 0.960 (step 200)"
    assert text.splitlines()[-1] == "warnings   none"

    proc = subprocess.run([sys.executable, "-m", "megabatch.trainer.cli", "status", "--json",
                           str(run)], cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and json.loads(proc.stdout)["state"] == "finished"

    proc = subprocess.run([sys.executable, "-m", "megabatch.trainer.cli", "status",
                           str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"megabatch status: {tmp_path / 'nope'}: not a run directory (no such directory)"
    ]
