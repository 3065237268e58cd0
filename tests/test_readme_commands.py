"""Every command in README.md's bash blocks either runs here as written (offline, on the default model, on a CPU)
or is listed below as not runnable here, with the reason; so the README cannot drift from the programs again.

What the run changes, and why: torch.compile is disabled (TORCHDYNAMO_DISABLE=1: a --compile command runs eager;
compiling is tested in test_compile.py, and a CPU compile costs a minute per graph), and a few flags are appended
to keep the run short (argparse takes the last value: fewer new tokens, samples or evaluation tokens; output
paths in a temporary folder). Every other flag, file and default is the README's."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()

# Not runnable here: the reason. Matched as substrings of the command.
NOT_HERE = {
    "pip install": "installs packages (.ci/run does exactly this)",
    "bash scripts/prepare_llama3.sh": "downloads a gated checkpoint from the hub (needs network and HF_TOKEN)",
    "checkpoints/meta-llama/": "needs the Llama-3 checkpoint from the hub",
    ".venv-kvpress/bin/python": "runs in kvpress's own virtual environment (transformers < 5.3)",
}


def readme_commands() -> list:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()  # a trailing comment is prose
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def shorter(argv: list, tmp: Path) -> list:
    """Flags appended to keep a run short (the last value of a flag wins)."""
    prog = next((Path(a).name for a in argv if a.endswith(".py")), "")
    if prog == "eval.py":  # a smaller batch and, unless the README sets it, shorter prompts
        return ["--num_samples", "2", "--max_new_tokens", "3", "--no_progress", "--out_dir", str(tmp / "results"),
                *(["--batch_size", "2"] if "--batch_size" in argv else []),
                *([] if "--seq_length" in argv else ["--seq_length", "256"])]
    return {
        "generate.py": ["--max_new_tokens", "6"],  # > --speculate_k 4
        "perplexity.py": ["--num_eval_tokens", "128"],  # lacache's ladder needs 35 slots at half the tokens
        "visualize_eviction.py": ["--seq_length", "160", "--max_new_tokens", "2", "--out", str(tmp / "e.png")],
        "parallelize_evals.py": ["--dry_run", "--state_dir", str(tmp / "state")],
        "leaderboard.py": ["--num_samples", "1", "--seq_length", "256", "--max_new_tokens", "3", "--no_progress",
                           "--out_dir", str(tmp / "board")],
        "compare_strategies.py": ["--out_md", str(tmp / "t.md"), "--out_png", str(tmp / "c.png")],
        "benchmark.py": ["--context_lengths", "64", "--max_new_tokens", "4", "--num_runs", "1", "--batch_sizes", "1",
                         "4", "--out", str(tmp / "bench")],
        "quantize.py": [],
    }.get(prog, [])


RUNNABLE = [c for c in readme_commands() if not any(k in c for k in NOT_HERE)]


def test_every_readme_command_is_run_or_excused():
    commands = readme_commands()
    assert len(commands) >= 20
    excused = [c for c in commands if any(k in c for k in NOT_HERE)]
    assert len(RUNNABLE) + len(excused) == len(commands)
    assert len(RUNNABLE) >= 15
    for c in RUNNABLE:
        assert "..." not in c, f"a placeholder in a runnable README command: {c}"


@pytest.mark.parametrize("command", RUNNABLE, ids=lambda c: c[:60])
def test_readme_command_runs(command, tmp_path, smol_dir):
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]]
    if "compare_strategies.py" in command:  # the results it tabulates: those of a README eval command's run
        results = tmp_path / "results"
        subprocess.run([sys.executable, "eval.py", "--tasks", "niah_single_2", "--num_samples", "1", "--seq_length",
                        "256", "--max_new_tokens", "3", "--no_progress", "--out_dir", str(results),
                        "--cache_strategy", "l2", "--max_cache_length", "0.5"], cwd=REPO, check=True,
                       capture_output=True)
        argv = [str(results) if a == "results/" else a for a in argv]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(argv + shorter(argv, tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, f"{command}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
