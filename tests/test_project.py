"""The project's promises about itself: CI runs the README's test command; the core package name."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    lines = (ROOT / 'README.md').read_text().splitlines()
    start = lines.index('```bash')
    end = lines.index('```', start)
    return [line for line in lines[start + 1:end] if line and not line.startswith('#')]


def test_ci_runs_the_readme_test_command():
    main_cmd, test_cmd = readme_commands()[:2]
    ci_lines = [line for line in (ROOT / '.ci' / 'run').read_text().splitlines()
                if line and not line.startswith(('#', 'set ', 'cd '))]
    assert ci_lines == [test_cmd]
    assert main_cmd.startswith('bash scripts/setup.sh && ')


def test_skipssl_does_not_shadow_the_standard_ssl_module():
    out = subprocess.run([sys.executable, '-c', 'import skipssl, ssl; print(ssl.__file__)'],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert 'site-packages' not in out.stdout and str(ROOT) not in out.stdout
