"""The README's generated parts (command synopsis, options table, benchmark tables) match their sources."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_generated_sections_are_up_to_date():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_tables.py"), "--check"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_readme_names_every_subcommand_and_no_invented_repository():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("match", "register", "track", "simulate", "eval", "batch", "serve", "weights", "demo"):
        assert f"meddift {command}" in text
    assert "github.com/meddift" not in text
