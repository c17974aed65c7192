"""Building the CLI (every command's startup, `lorakit --help`) loads no torch or transformers: the config classes the
options are generated from live in torch-free modules."""

import subprocess
import sys


def test_building_the_cli_imports_no_torch():
    code = ("import sys, lorakit.cli.main; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing lorakit.cli.main loaded {out.stdout.strip()}"
