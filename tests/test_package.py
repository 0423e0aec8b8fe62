"""The installed project: `import nanochat` works outside the repository root."""

import subprocess
import sys


def test_nanochat_imports_from_any_folder(tmp_path):
    # the core modules must not lean on the cwd being the repository root (nor on `tasks`)
    code = (
        "import nanochat.tokenizer, nanochat.gpt, nanochat.engine, nanochat.checkpoint_manager; "
        "print(nanochat.gpt.__file__)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("gpt.py")
