"""Build `.whl/`, the wheels a bare GPU machine lacks, on this (networked, CPU) machine:

    .venv/bin/python -m launcher.gpu_wheels            # then run: carry [".whl"], launcher/gpu_run.sh

What to carry comes from the project's own dependency list (pyproject.toml: the base dependencies and
the extras the GPU paths use, GPU_EXTRAS) and its dependencies' own (this environment's installed
metadata), less what the GPU machine already has (ON_GPU_MACHINE and their dependencies, from
../shared/notes/gpu-device.md, except what the note says is not there) and what cannot be carried
(NOT_CARRIED). Each one is pinned to the version installed here, the one the suite ran: a binary
wheel for the GPU machine's Python (3.12, manylinux x86_64) from PyPI, or, for a package PyPI has
as an sdist only (DeepSpeed), a wheel built here that must be pure Python.

`.whl/imports.txt` lists the import name of every package the GPU paths use (carried or expected
there), which `launcher/gpu_run.sh` imports before any test. The build fails (exit 1) when the
wheels and the working tree that travels with them exceed the 64 MiB carry limit.

`--only a,b` builds a subset (those and what they need that the GPU machine lacks), and
`--from-installed` packs the wheels from this environment's installed files instead of downloading
them (pure-Python packages only; for this Python, not the GPU machine's): the offline,
deterministic form the CPU tests use.

`--out` is new, empty, or this script's earlier output (its `vlpdist.atomic` marker): that is replaced
atomically (staged beside it, swapped in), anything else refused with exit 2, and the staging folder is
removed on every failure (a wheel that cannot be had, the carry limit).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
import zipfile
from base64 import urlsafe_b64encode
from hashlib import sha256
from importlib import metadata
from pathlib import Path
from typing import NoReturn

from vlpdist.errors import UserError

REPO = Path(__file__).resolve().parent.parent
GPU_EXTRAS = ("process", "train", "faiss", "test")
"""ingest is left out: Ray's wheel is too large to carry, and the GPU checks call the per-shard worker directly."""
ON_GPU_MACHINE = ("torch", "transformers", "timm", "numpy", "scipy", "pytest", "tensorboard", "safetensors", "pyarrow",
                  "psutil", "einops", "msgpack", "tqdm")
NOT_ON_GPU_MACHINE = ("deepspeed", "open-clip-torch", "webdataset", "faiss-cpu", "pydantic", "pydantic-core",
                      "annotated-types", "typing-inspection", "ray", "img2dataset", "omegaconf", "jsonschema", "referencing",
                      "rpds-py", "attrs", "jsonschema-specifications", "pycocoevalcap")
"""Named absent by the note, although this environment's copies of ON_GPU_MACHINE may depend on some."""
NOT_CARRIED = {"pycocoevalcap": "about 100 MB installed with its METEOR and SPICE jars, over the carry limit: GPU runs skip caption metrics",
               "selenium": "the run report's browser test only, which is not gpu-marked (with trio and its kin, several MB of the carry)",
               "pytest-xdist": "the CPU suite's parallel workers only: the GPU checks run in one pytest process"}
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CARRY_LIMIT_BYTES = 64 * 2**20
IMPORTS_FILE = "imports.txt"
WRITER = "launcher.gpu_wheels"  # the marker's name for a wheel folder this script wrote


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> list[str]:
    """The distribution names of `requirements` whose markers hold on the GPU machine (no extras asked)."""
    from packaging.requirements import Requirement

    names = []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": "", "python_version": PYTHON_VERSION}):
            names.append(normalize(requirement.name))
    return names


def project_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return requirement_names(project["dependencies"] + [line for extra in GPU_EXTRAS for line in extras[extra]])


def installed(name: str) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        fail(f"{name} is not installed here; run with the project's environment (.venv/bin/python)")


def dependency_closure(roots: list[str], stop: set[str]) -> list[str]:
    """`roots` and everything they need, by this environment's metadata, not walking into `stop`."""
    seen: list[str] = []
    pending = [name for name in roots if name not in stop]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.append(name)
        pending += [dep for dep in requirement_names(installed(name).requires or []) if dep not in stop and dep not in seen]
    return sorted(seen)


def on_gpu_machine() -> set[str]:
    absent = {normalize(name) for name in NOT_ON_GPU_MACHINE}
    return set(dependency_closure([normalize(name) for name in ON_GPU_MACHINE], stop=absent))


def import_names(name: str) -> list[str]:
    """The top-level modules of an installed distribution that stand for it: the one named like it
    (pytest, not also its py shim), else those its name starts with (open_clip for open-clip-torch),
    else all its public ones (PIL for pillow)."""
    dist = installed(name)
    listed = dist.read_text("top_level.txt")
    if listed:
        tops = set(listed.split())
    else:
        tops = {str(path).split("/")[0].removesuffix(".py") for path in dist.files or []
                if "/" in str(path) and str(path).endswith("/__init__.py") or "/" not in str(path) and str(path).endswith(".py")}
    tops = sorted(top for top in tops if top.isidentifier() and not top.startswith("_"))
    module_name = normalize(name).replace("-", "_")
    if module_name in tops:
        return [module_name]
    named = [top for top in tops if module_name.startswith(top.lower())]
    return named or tops


def pack_installed_wheel(name: str, out: Path) -> Path:
    """A wheel of an installed pure-Python distribution, from its installed files (RECORD rewritten)."""
    dist = installed(name)
    wheel_info = dist.read_text("WHEEL") or ""
    if "Root-Is-Purelib: true" not in wheel_info or any(str(path).endswith((".so", ".pyd")) for path in dist.files or []):
        fail(f"{name} is not a pure-Python package; --from-installed packs pure ones only")
    dist_name, version = dist.metadata["Name"].replace("-", "_"), dist.version
    path = out / f"{dist_name}-{version}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for file in sorted(dist.files or [], key=str):
            relative = str(file)
            if relative.startswith("..") or "__pycache__" in relative or relative.endswith((".pyc", "/RECORD", "INSTALLER", "REQUESTED")):
                continue
            data = Path(file.locate()).read_bytes()
            wheel.writestr(relative, data)
            digest = urlsafe_b64encode(sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{relative},sha256={digest},{len(data)}")
        info_dir = next(str(file).rsplit("/", 1)[0] for file in dist.files if str(file).endswith(".dist-info/METADATA"))
        record = f"{info_dir}/RECORD"
        wheel.writestr(record, "\n".join([*records, f"{record},,"]) + "\n")
    return path


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def fetch_wheel(name: str, out: Path) -> None:
    """The GPU machine's wheel of `name` at the version installed here, from PyPI; a pure wheel built here for an sdist."""
    pinned = f"{name}=={installed(name).version}"
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    done = pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
               *platforms, "-d", str(out), pinned)
    if done.returncode == 0:
        return
    before = set(out.iterdir())
    built = pip("wheel", "-q", "--no-deps", "-w", str(out), pinned)
    new = sorted(set(out.iterdir()) - before)
    if built.returncode != 0 or not new or not all(path.name.endswith("-none-any.whl") for path in new):
        for path in new:
            path.unlink()
        fail(f"no wheel of {pinned} for Python {PYTHON_VERSION}: {(done.stderr or built.stderr).strip().splitlines()[-1:]}")


def travelling_tree_bytes(staging: Path) -> int:
    """What travels with `.whl/` to the GPU machine: the tracked and untracked, not ignored files, less
    `staging` (the wheels being built beside `.whl/`: git does not ignore that name, and they are counted once already)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((REPO / path).stat().st_size for path in listed
               if path and (REPO / path).is_file() and not (REPO / path).resolve().is_relative_to(staging.resolve()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".whl",
                        help="the wheel folder: new, empty, or this script's earlier output (replaced as a whole)")
    parser.add_argument("--only", default=None, help="comma-separated distributions: a subset (see the module docstring)")
    parser.add_argument("--from-installed", action="store_true", help="pack this environment's pure-Python installs, no download")
    args = parser.parse_args(argv)
    try:
        return build_wheel_folder(args)
    except UserError as err:
        fail(str(err))


def build_wheel_folder(args: argparse.Namespace) -> int:
    from vlpdist.atomic import refuse_foreign_output, replace_output_dir

    refuse_foreign_output(args.out, WRITER, "--out")  # before any download

    present = on_gpu_machine()
    wanted = [normalize(name) for name in args.only.split(",")] if args.only else project_requirements()
    for name, why in NOT_CARRIED.items():
        if name in wanted:
            print(f"not carried: {name} ({why})")
    wanted = [name for name in wanted if name not in NOT_CARRIED]
    carried = dependency_closure(wanted, stop=present | set(NOT_CARRIED))
    # What the GPU paths import: the project's own requirements and what is carried for them (the
    # GPU machine's own packages' dependencies are its business: its versions differ from these).
    checked = sorted(set(carried) | set(wanted))

    # Staged beside --out and swapped in on success; any failure below (fail()'s SystemExit included) removes the staging.
    with replace_output_dir(args.out, WRITER, "--out") as staging:
        for name in carried:
            (pack_installed_wheel(name, staging) if args.from_installed else fetch_wheel(name, staging))
        (staging / IMPORTS_FILE).write_text(
            "# import name, distribution: every package the GPU paths use (launcher/gpu_run.sh imports each)\n"
            + "".join(f"{module} {name}\n" for name in checked for module in import_names(name)))

        wheels = sorted(staging.glob("*.whl"), key=lambda path: path.stat().st_size, reverse=True)
        wheel_bytes = sum(path.stat().st_size for path in wheels)
        tree_bytes = travelling_tree_bytes(staging)
        for path in wheels:
            print(f"{path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
        total = wheel_bytes + tree_bytes
        print(f"{len(wheels)} wheels, {wheel_bytes / 2**20:.1f} MiB + the working tree {tree_bytes / 2**20:.1f} MiB = "
              f"{total / 2**20:.1f} MiB of the {CARRY_LIMIT_BYTES / 2**20:.0f} MiB carry limit")
        if total > CARRY_LIMIT_BYTES:
            print(f"error: the carry would be {total / 2**20:.1f} MiB, over the {CARRY_LIMIT_BYTES / 2**20:.0f} MiB limit "
                  f"(largest: {', '.join(path.name for path in wheels[:3])})", file=sys.stderr)
            raise SystemExit(1)  # out of the with: the staging goes, --out stays as it was
    print(f"wrote {args.out} ({len(checked)} packages checked on the GPU machine, {len(carried)} carried); "
          f"run with carry [\"{args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}\"]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
