"""One canonical zoo build carried between machines: `fbh zoo export` and `fbh zoo import`.

An export is the build folder itself, marker included (manifest, digest, recipe, key): a
.tar.gz whose one top-level folder is the build's key, or a plain folder. An import trusts
nothing in it until every file has been checked against the manifest and the manifest
against its digest; only then is it installed under cache/zoo/<key>, in one rename.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from harness.digests import CorruptFile, manifest_digest, tree_files, verify_manifest
from harness.errors import FbhError
from harness.locks import file_lock
from harness.paths import cache_dir
from harness.spec import DIGEST_PATTERN
from harness.zoo import BUILDERS, DONE_MARKER, finished_marker, read_marker, replace_dir, suites_using, verify_zoo

TAR_SUFFIXES = {".tar.gz": "w:gz", ".tgz": "w:gz", ".tar": "w"}
IMPORT_FIX = ("import a .tar.gz or folder written by `fbh zoo export` (main's site workflow saves "
              "zoo-tiny-vision.tar.gz), or build the zoo here with `fbh zoo build SUITE`")


def tar_mode(path: Path) -> str | None:
    return next((mode for suffix, mode in TAR_SUFFIXES.items() if path.name.endswith(suffix)), None)


# ----------------------------------------------------------------------------- export

def export_zoo(zoo_dir: Path, dest: Path) -> Path:
    """Write a built, verified zoo to dest: a tarball when dest ends in .tar.gz / .tgz / .tar (its one
    top-level folder named by the build's key), else a new folder holding the build's files."""
    zoo_dir, dest = Path(zoo_dir), Path(dest)
    marker = finished_marker(zoo_dir)
    verify_zoo(zoo_dir)  # never hand on a build that is not the one its manifest describes
    files = [*sorted(marker["files"]), DONE_MARKER]
    mode = tar_mode(dest)
    if mode is not None:
        write_tarball(zoo_dir, files, marker["key"], dest, mode)
    else:
        copy_files(zoo_dir, files, dest)
    return dest


def write_tarball(zoo_dir: Path, files: list[str], key: str, dest: Path, mode: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, mode) as tar:
            for rel in files:
                tar.add(zoo_dir / rel, arcname=f"{key}/{rel}", recursive=False, filter=anonymous)
        tmp.replace(dest)  # a reader never sees half a tarball
    finally:
        tmp.unlink(missing_ok=True)


def anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def copy_files(zoo_dir: Path, files: list[str], dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FbhError("already exists and is not an empty folder", file=str(dest),
                       fix="remove it, or export to a new folder or a .tar.gz")
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(zoo_dir / rel, dest / rel)


# ----------------------------------------------------------------------------- import

@dataclass(frozen=True)
class Imported:
    path: Path
    digest: str
    status: str          # installed | replaced | already installed
    suites: list[str]    # suites whose zoo has this key with this checkout's builder code


def import_zoo(src: Path, force: bool = False) -> Imported:
    """Check every file of an export against its manifest and the manifest against its digest, then
    install it under cache/zoo/<key> in one rename. A different build already installed under that key
    is replaced only with force; the same build is left as it is."""
    src = Path(src)
    if not src.exists():
        raise FbhError("no such file or folder", file=str(src), fix=IMPORT_FIX)
    root = cache_dir() / "zoo"
    root.mkdir(parents=True, exist_ok=True)
    unpacked = root / f".import-{os.getpid()}"
    shutil.rmtree(unpacked, ignore_errors=True)
    unpacked.mkdir()
    try:
        build = unpack_tarball(src, unpacked) if src.is_file() else copy_folder(src, unpacked / "build")
        marker = checked_export(build, src)
        final = root / marker["key"]
        with file_lock(final.with_suffix(".lock")):
            installed = read_marker(final)
            if installed is not None and installed["digest"] == marker["digest"] and not force:
                status = "already installed"
            elif installed is not None and not force:
                raise FbhError(f"a different build of '{marker['key']}' is installed (digest "
                               f"{installed['digest']}); the export has {marker['digest']}", file=str(src),
                               fix="pass --force to replace the installed build with the export")
            else:
                status = "installed" if not final.exists() else "replaced"
                replace_dir(build, final)
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
    return Imported(final, marker["digest"], status, suites_using(marker["key"]))


def refuse(src: Path, message: str) -> FbhError:
    return FbhError(f"refused: {message}", file=str(src), fix=IMPORT_FIX)


def unpack_tarball(src: Path, into: Path) -> Path:
    """Unpack regular files and folders only, all below one top-level folder; anything else (a link, a
    device, a path climbing out with '..' or starting at '/') refuses the whole tarball."""
    try:
        tar = tarfile.open(src, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise refuse(src, f"not a readable tarball ({exc})") from None
    tops: set[str] = set()
    with tar:
        for member in tar:
            parts = safe_parts(src, member.name)
            if member.issym() or member.islnk():
                raise refuse(src, f"'{member.name}' is a link; an export holds regular files only")
            if not (member.isfile() or member.isdir()):
                raise refuse(src, f"'{member.name}' is not a regular file or folder")
            tops.add(parts[0])
            if len(tops) > 1:
                raise refuse(src, f"it has more than one top-level entry ({', '.join(sorted(tops))})")
            extract(tar, member, into.joinpath(*parts), src)
    build = into / tops.pop() if tops else None
    if build is None or not build.is_dir():
        raise refuse(src, "it holds no build folder")
    return build


def safe_parts(src: Path, name: str) -> tuple[str, ...]:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or "\\" in name:
        raise refuse(src, f"'{name}' is a path escaping the export's folder")
    return path.parts


def extract(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, src: Path) -> None:
    try:
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with tar.extractfile(member) as data, open(target, "xb") as out:
            shutil.copyfileobj(data, out)
    except FileExistsError:
        raise refuse(src, f"'{member.name}' appears twice") from None
    except OSError as exc:
        raise refuse(src, f"'{member.name}' cannot be unpacked ({exc.strerror})") from None


def copy_folder(src: Path, into: Path, folder: Path | None = None) -> Path:
    """Copy an exported folder's regular files; a link or any other kind of entry refuses it."""
    into.mkdir()
    for entry in sorted((folder or src).iterdir()):
        if entry.is_symlink():
            raise refuse(src, f"'{entry}' is a link; an export holds regular files only")
        if entry.is_dir():
            copy_folder(src, into / entry.name, entry)
        elif entry.is_file():
            shutil.copyfile(entry, into / entry.name)
        else:
            raise refuse(src, f"'{entry}' is not a regular file or folder")
    return into


def checked_export(build: Path, src: Path) -> dict[str, Any]:
    """The export's marker, once its manifest matches its digest, names only safe paths, and every file
    is there with its size and sha256 and no file is there that the manifest does not list."""
    try:
        marker = json.loads((build / DONE_MARKER).read_text())
    except FileNotFoundError:
        raise refuse(src, f"it has no {DONE_MARKER} (manifest and digest): not a zoo export") from None
    except (OSError, ValueError) as exc:
        raise refuse(src, f"its {DONE_MARKER} is not readable JSON ({exc})") from None
    files, digest, key, builder = (marker.get(k) if isinstance(marker, dict) else None
                                   for k in ("files", "digest", "key", "builder"))
    if not isinstance(files, dict) or not isinstance(digest, str) or not re.fullmatch(DIGEST_PATTERN, digest):
        raise refuse(src, f"its {DONE_MARKER} has no manifest and digest (built by older fbh code?)")
    known = isinstance(builder, str) and builder in BUILDERS
    key_pattern = rf"{re.escape(builder)}-[0-9a-f]{{12}}" if known else None
    if key_pattern is None or not isinstance(key, str) or not re.fullmatch(key_pattern, key):
        raise refuse(src, f"its {DONE_MARKER} names no known builder and key (builder {builder!r}, key {key!r})")
    for rel in files:
        safe_parts(src, rel)
    try:
        if manifest_digest(files) != digest:
            raise refuse(src, f"its manifest does not have the digest its {DONE_MARKER} gives ({digest})")
        verify_manifest(build, files, what=f"the export {src.name}", fix=IMPORT_FIX)
    except CorruptFile as exc:  # named inside the export, not by the scratch folder it was unpacked into
        raise CorruptFile(exc.message, file=str(src), fix=exc.fix) from None
    except (KeyError, TypeError) as exc:
        raise refuse(src, f"its manifest has a malformed entry ({exc})") from None
    unlisted = sorted({p.relative_to(build).as_posix() for p in tree_files(build)} - set(files) - {DONE_MARKER})
    if unlisted:
        raise refuse(src, f"it holds files its manifest does not list: {', '.join(unlisted[:3])}")
    return marker
