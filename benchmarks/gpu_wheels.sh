#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the GPU machine's image lacks, for benchmarks/gpu_check.sh.
#
# The GPU machine has no network and a fixed image (Python 3.12, torch 2.11 + CUDA 13, transformers 5.17,
# peft, scikit-learn, pandas, matplotlib, safetensors, numba, pytest ...; the device tool's KINDS.md lists it).
# It lacks what the project imports for audio and saliency and what the notebooks need to run under nbclient.
# Run this here, in the repository root of the checkout that calls the device tool (the tool sends that
# checkout, and `.whl` travels through its `carry`):
#
#     benchmarks/gpu_wheels.sh            # download into .whl/, then check
#     benchmarks/gpu_wheels.sh --check    # only check: every wheel present once, its needs met, size in budget
#
# Versions are the ones the project's tests pass with here. gpu_check.sh installs on the GPU machine only the
# wheels whose distribution is missing there, so the image's own packages are never shadowed.
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=.whl
PYTHON=${PYTHON:-python3}
LIMIT_MIB=${GPU_WHEELS_LIMIT_MIB:-40}  # of the 64 MiB the device tool carries, the working tree needs the rest

# The project at run time (data_processing: soundfile, soxr; saliency: captum; listen/saliency_change:
# librosa; the paper preset: schedulefree) and what they need beyond the image.
RUNTIME=(
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 soxr==1.1.0 captum==0.9.0 schedulefree==1.4.1
  librosa==0.11.0 audioread==3.1.0 pooch==1.9.0 decorator==5.3.2 platformdirs==4.14.9
)
# The notebooks in smoke mode (tests/test_notebooks.py: nbclient with an ipykernel "python3" kernel).
NOTEBOOKS=(
  nbclient==0.11.0 nbformat==5.11.1 fastjsonschema==2.22.3 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  jupyter-client==8.10.0 jupyter-core==5.9.1 traitlets==5.16.1 pyzmq==27.3.0 tornado==6.6.1
  ipykernel==7.4.0 comm==0.2.3 debugpy==1.8.22 matplotlib-inline==0.2.2 nest-asyncio2==1.7.4
  ipython==9.19.1 ipython-pygments-lexers==1.1.1 jedi==0.20.1 parso==0.8.7 prompt-toolkit==3.0.53
  wcwidth==0.9.4 pexpect==4.9.0 ptyprocess==0.7.0 stack-data==0.6.3 executing==2.3.0 asttokens==3.0.2
  pure-eval==0.2.4
)
# In the image (KINDS.md, "Python packages already there"): a wheel's needs among these are met there.
IMAGE=(
  attrs certifi charset-normalizer filelock fsspec idna jinja2 joblib lazy-loader llvmlite markupsafe
  matplotlib msgpack numba numpy packaging pandas peft pillow psutil pygments python-dateutil pyyaml requests
  safetensors scikit-learn scipy six threadpoolctl tokenizers torch tqdm transformers typing-extensions
  urllib3
)

if [[ "${1:-}" != "--check" ]]; then
  mkdir -p "$DEST"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${RUNTIME[@]}" "${NOTEBOOKS[@]}"
fi

"$PYTHON" - "$DEST" "$LIMIT_MIB" "${RUNTIME[*]} ${NOTEBOOKS[*]}" "${IMAGE[*]}" <<'EOF'
"""Every pinned wheel is in the folder exactly once and nothing else is; each one's needs on the GPU machine
(CPython 3.12, Linux x86-64) are met by the folder or the image; the folder fits its share of the 64 MiB."""
import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

folder, limit, pinned, image = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
GPU_MACHINE = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
               "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(wheel: Path) -> list[str]:
    """The distributions a wheel needs on the GPU machine (no extras)."""
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate(GPU_MACHINE):
                out.append(norm(requirement.name))
    return out


wanted = {norm(spec.split("==")[0]): spec.split("==")[1] for spec in pinned}
found: dict[str, list[str]] = {}
problems = []
have = set(wanted) | {norm(n) for n in image}
for wheel in sorted(folder.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    found.setdefault(norm(name), []).append(version)
    problems += [f"{norm(name)} needs {r}: neither pinned nor in the image" for r in requirements(wheel) if r not in have]
for name, version in wanted.items():
    if found.get(name) != [version]:
        problems.append(f"{name}=={version}: found {found.get(name, 'nothing')}")
problems += [f"{name}: in {folder} but not pinned in gpu_wheels.sh" for name in found if name not in wanted]
size = sum(w.stat().st_size for w in folder.glob("*.whl")) / 2**20
print(f"{folder}: {sum(map(len, found.values()))} wheels, {size:.1f} MiB (limit {limit:.0f} MiB)")
if size > limit:
    problems.append(f"{size:.1f} MiB is over the {limit:.0f} MiB share of the device tool's carry")
if problems:
    print("\n".join(f"  problem: {p}" for p in problems), file=sys.stderr)
    sys.exit(1)
EOF
