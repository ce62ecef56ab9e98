"""scripts/gpu_wheels.sh: which of php-run's resolved dependencies it downloads for a GPU machine.

pip is replaced by a stand-in (``GPU_WHEELS_PIP``) that writes a resolution report shaped like pip's
``--report`` and "downloads" a file per requirement, so what is tested is the script's own part: the
project itself, the machine's packages (however spelt) and its GPU stack left out, the rest fetched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RESOLVED = [  # (name as pip reports it, version, url)
    ("php-runner", "0.1.0", "file:///checkout"),
    ("SQLAlchemy", "2.1.9", "https://files/sqlalchemy.whl"),
    ("PyYAML", "6.0.4", "https://files/pyyaml.whl"),
    ("typing_extensions", "4.16.0", "https://files/typing_extensions.whl"),
    ("pydantic_core", "2.50.5", "https://files/pydantic_core.whl"),
    ("torch", "2.7.1", "https://files/torch.whl"),
    ("torchvision", "0.22.1", "https://files/torchvision.whl"),
    ("nvidia-cublas-cu12", "12.6.4.1", "https://files/cublas.whl"),
    ("triton", "3.3.1", "https://files/triton.whl"),
    ("Mako", "1.4.3", "https://files/mako.whl"),
]

FAKE_PIP = '''
import json, sys
from pathlib import Path
args = sys.argv[1:]
if args[0] == "install":
    items = [{"metadata": {"name": n, "version": v}, "download_info": {"url": u, **({"dir_info": {}} if u.startswith("file") else {})}}
             for n, v, u in json.loads(Path(sys.argv[0]).with_name("resolved.json").read_text())]
    Path(args[args.index("--report") + 1]).write_text(json.dumps({"install": items}))
elif args[0] == "download":
    folder = Path(args[args.index("-d") + 1])
    for line in Path(args[args.index("-r") + 1]).read_text().split():
        (folder / (line.replace("==", "-") + ".whl")).write_text("")
'''


def _run(tmp_path: Path, present: str) -> subprocess.CompletedProcess:
    (tmp_path / "resolved.json").write_text(json.dumps(RESOLVED))
    (tmp_path / "pip.py").write_text(FAKE_PIP)
    (tmp_path / "present.txt").write_text(present)
    env = {**os.environ, "GPU_WHEELS_DIR": str(tmp_path / "whl"), "GPU_WHEELS_PIP": f"{sys.executable} {tmp_path}/pip.py"}
    return subprocess.run(["bash", "scripts/gpu_wheels.sh", str(tmp_path / "present.txt")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_it_fetches_what_the_machine_lacks_and_leaves_out_its_packages_and_gpu_stack(tmp_path):
    # pip freeze spelling, a comment, and names spelt unlike pip's report
    finished = _run(tmp_path, "# the machine's packages\npyyaml==6.0.1\ntyping-extensions\nPydantic-Core==2.0\n")
    assert finished.returncode == 0, finished.stderr
    assert sorted(path.name for path in (tmp_path / "whl").iterdir()) == [
        "Mako-1.4.3.whl", "SQLAlchemy-2.1.9.whl"]
    assert "2 wheels in" in finished.stderr


def test_the_shipped_image_list_leaves_out_pyyaml_and_typing_extensions_and_keeps_sqlalchemy(tmp_path):
    present = (REPO / "scripts/gpu_image_packages.txt").read_text()
    finished = _run(tmp_path, present)
    assert finished.returncode == 0, finished.stderr
    fetched = sorted(path.name for path in (tmp_path / "whl").iterdir())
    assert "SQLAlchemy-2.1.9.whl" in fetched and not any(name.startswith(("PyYAML", "typing_ext")) for name in fetched)


def test_a_missing_package_list_is_a_one_line_error(tmp_path):
    finished = subprocess.run(["bash", "scripts/gpu_wheels.sh", str(tmp_path / "absent.txt")], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    assert finished.returncode == 2 and finished.stderr.count("\n") == 1 and "absent.txt" in finished.stderr
