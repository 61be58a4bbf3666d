"""The project's promises about itself: CI runs the README's test command; the core package name."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    lines = (ROOT / 'README.md').read_text().splitlines()
    start = lines.index('```bash')
    end = lines.index('```', start)
    return [line for line in lines[start + 1 : end] if line and not line.startswith('#')]


def test_ci_runs_the_readme_test_command():
    main_cmd, test_cmd = readme_commands()[:2]
    ci_lines = [
        line
        for line in (ROOT / '.ci' / 'run').read_text().splitlines()
        if line and not line.startswith(('#', 'set ', 'cd '))
    ]
    assert ci_lines == [test_cmd]
    assert main_cmd.startswith('bash scripts/setup.sh && ')


def test_skipssl_does_not_shadow_the_standard_ssl_module():
    out = subprocess.run(
        [sys.executable, '-c', 'import skipssl, ssl; print(ssl.__file__)'],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert 'site-packages' not in out.stdout and str(ROOT) not in out.stdout


def test_console_scripts_are_installed_and_report_errors_under_their_own_name(tmp_path):
    """Every [project.scripts] entry resolves to a callable; skipssl-knn runs and names itself in its one-line
    error, as knn_eval.py does."""
    from importlib.metadata import entry_points

    import tomllib

    declared = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']
    installed = {ep.name: ep for ep in entry_points(group='console_scripts') if ep.name.startswith('skipssl-')}
    assert set(installed) == set(declared)
    for ep in installed.values():
        assert callable(ep.load()), ep.name
    script = Path(sys.executable).parent / 'skipssl-knn'
    out = subprocess.run(
        [
            str(script),
            '--checkpoint',
            'pixels',
            '--train-shards',
            str(tmp_path / 'missing'),
            '--test-shards',
            str(tmp_path / 'missing'),
            '--out-dir',
            str(tmp_path / 'out'),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith('skipssl-knn: error: train shards: ')


def test_wheel_installs_no_generic_top_level_names(tmp_path):
    """A built wheel holds exactly the project's four import names (eval/ and launch/ install as skipssl_eval and
    skipssl_launch; bench/ and tests/ stay in the repository) and every package folder of the tree."""
    import shutil
    import zipfile

    src = tmp_path / 'src'  # a copy, so the build leaves no build/ or egg-info in the checkout
    top_level_outputs = {
        '.venv',
        '.git',
        'runs',
        'data',
        '.whl',
        'build',
        'dist',
        '.mypy_cache',
        '.pytest_cache',
        '.ruff_cache',
    }
    shutil.copytree(
        ROOT,
        src,
        ignore=lambda folder, entries: [
            e for e in entries if e == '__pycache__' or (Path(folder) == ROOT and e in top_level_outputs)
        ],
    )
    build = subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'wheel',
            '-q',
            '--no-deps',
            '--no-build-isolation',
            '--isolated',
            '-w',
            'dist',
            '.',
        ],
        cwd=src,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (src / 'dist').glob('*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split('/')[0] for n in names if '.dist-info/' not in n} == {
        'skipssl',
        'skipssl_common',
        'skipssl_eval',
        'skipssl_launch',
    }
    import tomllib

    # setuptools would still ship a forgotten subpackage, as data with a deprecation warning: compare the list too
    declared = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']['packages']
    folders = {'skipssl': 'skipssl', 'skipssl_common': 'skipssl_common', 'eval': 'skipssl_eval'}
    folders['launch'] = 'skipssl_launch'
    in_tree = {
        '.'.join((name, *init.parent.relative_to(ROOT / folder).parts))
        for folder, name in folders.items()
        for init in (ROOT / folder).rglob('__init__.py')
    }
    assert sorted(declared) == sorted(in_tree)
    assert all(p.replace('.', '/') + '/__init__.py' in names for p in in_tree)


def test_code_passes_ruff_lint_and_format():
    """The style gate CI runs with the tests: ruff's lint and format check, configured in pyproject.toml."""
    ruff = [sys.executable, '-m', 'ruff']
    lint = subprocess.run([*ruff, 'check', '--output-format', 'concise', '.'], capture_output=True, text=True, cwd=ROOT)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run([*ruff, 'format', '--check', '.'], capture_output=True, text=True, cwd=ROOT)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_core_packages_pass_mypy():
    """The type gate: mypy on the core packages (skipssl, skipssl_common), as configured in pyproject.toml
    ([tool.mypy] names the files and the untyped third-party packages). Installed with the test extra."""
    check = subprocess.run([sys.executable, '-m', 'mypy'], capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr
