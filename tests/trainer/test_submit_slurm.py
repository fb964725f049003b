"""``megabatch submit slurm`` without a cluster: the script it renders (--dry-run), the
config beside it, and bad input (one line, non-zero, nothing written). A real Slurm runs
the script in test_slurm_jobs.py."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from megabatch.trainer.cli import main
from megabatch.trainer.slurm import SlurmOptions, fill, render, time_limit_seconds
from tests.trainer.runs import ZERO2, overrides


def _submit(capsys, data: Path, run: Path, *options: str, **extra) -> tuple[int, str, str]:
    status = main(["submit", "slurm", *overrides(data, run, **extra), *options])
    out, err = capsys.readouterr()
    return status, out, err


def test_dry_run_writes_the_job_script_and_the_resolved_config(data, tmp_path, capsys,
                                                              monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    run = Path("runs") / "clip"  # relative: the job gets it absolute, and --chdir here
    status, out, err = _submit(
        capsys, data, run, "--nodes=2", "--gpus-per-node=4", "--cpus-per-task=8",
        "--time=2-00:00:00", "--partition=gpu", "--account=vision", "--qos=high",
        "--constraint=h100", "--sbatch-option=--mail-type=END", "--warning-s=600",
        "--max-requeues=3", "--dry-run",
    )  # fmt: skip
    assert status == 0, err
    folder = tmp_path / run / "submit"
    script = (folder / "megabatch.sbatch").read_text()
    assert f"sbatch --parsable {folder / 'megabatch.sbatch'}" in out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --time=2-00:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --account=vision", "#SBATCH --qos=high",
                 "#SBATCH --constraint=h100", "#SBATCH --mail-type=END", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --signal=USR2@600",
                 f"#SBATCH --chdir={tmp_path}", f"#SBATCH --output={tmp_path / run}/slurm-%j.log",
                 "#SBATCH --job-name=megabatch-clip",
                 f"megabatch.trainer.cli train {folder / 'config.yaml'}",
                 '"${restarts}" -lt 3', 'scontrol requeue "${SLURM_JOB_ID}"'):  # fmt: skip
        assert line in script, line
    assert "DS_ACCELERATOR=cpu" not in script  # GPU ranks
    assert "{{" not in script
    assert subprocess.run(["bash", "-n", str(folder / "megabatch.sbatch")]).returncode == 0
    assert os.access(folder / "megabatch.sbatch", os.X_OK)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["run_dir"] == str(tmp_path / run)
    assert config["train"]["max_steps"] == 6  # the overrides are in the resolved config
    assert not (folder / "jobs.txt").exists()  # nothing was submitted


def test_a_cpu_job_sets_deepspeed_to_the_cpu_and_omits_an_unset_time(data, tmp_path, capsys):
    status, _, err = _submit(capsys, data, tmp_path / "run", "--tasks-per-node=2", "--dry-run")
    assert status == 0, err
    script = (tmp_path / "run" / "submit" / "megabatch.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --gpus-per-node" not in script
    assert "export DS_ACCELERATOR=cpu" in script and "export OMP_NUM_THREADS=4" in script
    assert "#SBATCH --time" not in script  # the partition's default limit


@pytest.mark.parametrize(
    "options,extra,message",
    [
        (["--nodes=0"], {}, "--nodes must be >= 1, got 0"),
        (["--gpus-per-node=-1"], {}, "--gpus-per-node must be >= 0"),
        (["--warning-s=30"], {}, "--warning-s must be in [60, 65535], got 30"),
        (["--time=ten"], {}, "--time 'ten': expected minutes, MM:SS"),
        (["--time=9"], {}, "--time 9 leaves no time to train"),
        (["--partition=a b"], {}, "--partition 'a b': expected one word"),
        (["--sbatch-option=mail-type=END"], {}, "expected one sbatch option"),
        (["--max-requeues=-1"], {}, "--max-requeues must be >= 0"),
        # The config is checked for the job's world size (4 ranks), as the ranks would.
        (["--nodes=2", "--tasks-per-node=2"], {"batch.global_batch_size": 32},
         "batch.global_batch_size is 32 but micro_batch_size x accumulation_steps x world "
         "size = 8 x 2 x 4 = 64"),
        ([], {"optim.lrr": 1}, "unknown key optim.lrr"),
        ([], {"data.train": "/nonexistent/shards"}, "data.train"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_writes_nothing(data, tmp_path, capsys, options,
                                                         extra, message):  # fmt: skip
    status, out, err = _submit(capsys, data, tmp_path / "run", *options, "--dry-run", **extra)
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("megabatch submit slurm: error: ") and message in err, err
    assert not (tmp_path / "run").exists()


def test_without_sbatch_the_script_is_kept_and_the_error_says_so(data, tmp_path, capsys,
                                                                 monkeypatch):  # fmt: skip
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch (nor anything else)
    status, out, err = _submit(capsys, data, tmp_path / "run")
    assert status == 1
    assert len(err.strip().splitlines()) == 1, err
    assert "sbatch not found on PATH" in err
    assert (tmp_path / "run" / "submit" / "megabatch.sbatch").is_file()


def test_a_refusing_sbatch_is_one_line_exit_1(data, tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"  # what sbatch prints for a partition that does not exist
    fake.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: gpu' >&2\n"
                    "echo 'sbatch: error: Batch job submission failed' >&2\nexit 1\n")  # fmt: skip
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    status, out, err = _submit(capsys, data, tmp_path / "run", "--partition=gpu")
    assert status == 1
    assert err.strip() == (f"megabatch submit slurm: error: sbatch refused "
                           f"{tmp_path / 'run' / 'submit' / 'megabatch.sbatch'}: "
                           "sbatch: error: invalid partition specified: gpu")  # fmt: skip


@pytest.mark.parametrize(
    "text,seconds",
    [("90", 5400), ("5:30", 330), ("1:00:00", 3600), ("2-12", 216000),
     ("1-02:03", 93780), ("1-00:00:10", 86410)],
)  # fmt: skip
def test_slurm_time_limits(text, seconds):
    assert time_limit_seconds(text) == seconds


def test_a_template_field_without_a_value_is_an_error():
    with pytest.raises(ValueError, match="template fields without a value: python"):
        fill("srun {{python}} {{config}}", {"config": "c.yaml"})


def test_shell_words_are_quoted(tmp_path):
    options = SlurmOptions(python="/opt/my envs/python")
    script = render(options, tmp_path / "a b" / "config.yaml", tmp_path / "run", tmp_path)
    assert (
        f"srun '/opt/my envs/python' -m megabatch.trainer.cli train '{tmp_path}/a b/config.yaml'"
        in script
    )


def test_a_run_whose_checkpoint_this_config_may_not_resume_is_refused_at_submission(
    data, zero2_run, capsys
):
    # The session's finished 1-rank ZeRO-2 run: submitted again as 2 ranks with another
    # micro-batch, the job would stop at its first start; it is said now instead.
    status, out, err = _submit(capsys, data, zero2_run, "--tasks-per-node=2", "--dry-run",
                               **{**ZERO2, "batch.micro_batch_size": 4})  # fmt: skip
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot resume" in err and "2 rank(s): it was written by 1" in err, err
    assert not (zero2_run / "submit").exists()
