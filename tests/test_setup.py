import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    setup = [b for b in blocks if b.startswith("bash scripts/setup.sh")]
    assert len(setup) == 2, "README must hold exactly two set-up commands"
    test_cmd = next(b for b in setup if "pytest" in b)
    assert test_cmd in (ROOT / ".ci/run").read_text()
    assert "streamlit run app.py" in next(b for b in setup if "pytest" not in b)


def test_requirements_pin_every_dependency():
    for f in ("requirements.txt", "requirements-nodeps.txt", "requirements-dev.txt"):
        for line in (ROOT / f).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                assert "==" in line, f"{f}: {line} is not pinned"
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text()
    assert "aihwkit==1.1.0" in (ROOT / "requirements-nodeps.txt").read_text()
