"""Push DVC's run cache *and every output its entries name* to a DVC remote, so that another
machine's ``dvc repro --pull`` restores those runs instead of training again.

Why not just ``dvc push --run-cache``: on DVC 3.67 it sends the run-cache entries
(``.dvc/cache/runs``) plus the outputs that the workspace's dvc.lock names, not the outputs of the
other runs, and never the ``cache: false`` metrics (``reports/<role>/metrics.json``, ``timing.json``),
although a run-cache entry names them and DVC keeps them in the local cache for it (treeverse/dvc
#3778). ``dvc repro --pull`` on the other machine finds the entry, cannot fetch those objects
(``dvc/stage/cache.py``, ``StageCache.restore``: ``outs_cached()`` is false) and trains the stage
again. This pushes the objects of every run-cache entry in the local cache, metrics included.

    python scripts/push_run_cache.py [-r REMOTE]

It names the remote it pushed to, and a failure in one line (exit status 1), with the URL's
credentials masked (``ssh://user:***@host/path``): DVC's own errors quote the URL as configured.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kdlib.data.fetch import mask_url


def run_cache_entries(runs: Path) -> list[tuple[str, str]]:
    """(key, value) of every entry under ``.dvc/cache/runs/<xx>/<key>/<value>``."""
    if not runs.is_dir():
        return []
    return sorted((entry.parent.name, entry.name) for entry in runs.glob("*/*/*") if entry.is_file())


class PushError(RuntimeError):
    """The push failed; the message names the remote with its URL's credentials masked."""


def remote_url(repo: object, remote: str | None) -> tuple[str, str]:
    """``(name, URL)`` of ``remote`` (the default remote when None) in ``repo``'s DVC config;
    empty strings for what the config lacks (DVC's own error then says so)."""
    config = getattr(repo, "config", {})
    name = remote or config.get("core", {}).get("remote") or ""
    return name, str(config.get("remote", {}).get(name, {}).get("url", ""))


def push_run_cache(root: str | os.PathLike = ".", remote: str | None = None) -> tuple[int, int, str]:
    """Push the run cache of the DVC project at ``root`` and the objects its entries name to
    ``remote`` (the default remote when None). Returns (entries, objects transferred, the remote
    as ``name (URL)`` with the URL's credentials masked).

    Errors raised by DVC and the file systems under it may quote the remote's URL with its
    password (DVC 3.67: ``run-cache is not supported for http filesystem: https://user:pw@host/...``):
    they are re-raised as :class:`PushError` with every URL masked (:func:`kdlib.data.fetch.mask_url`)."""
    from dvc.repo import Repo

    shown, url = remote or "the default remote", ""
    try:
        with Repo(str(root)) as repo:
            name, url = remote_url(repo, remote)
            shown = f"{name or shown} ({mask_url(url, url)})" if url else (name or shown)
            entries = run_cache_entries(Path(repo.stage_cache.cache_dir))
            repo.stage_cache.push(remote)
            transferred = 0
            objects = set().union(*repo.stage_cache.get_used_objs(entries).values()) if entries else set()
            if objects:
                # the local cache is the source; DataCloud.push splits DVC 2 (md5-dos2unix) from DVC 3 objects
                result = repo.cloud.push(objects, remote=remote)
                if result.failed:
                    raise PushError(f"{len(result.failed)} object(s) failed to upload to remote {shown}: the local "
                                    "cache lacks them (`dvc gc` removed them?)")
                transferred = len(result.transferred)
    except PushError:
        raise
    except Exception as err:  # noqa: BLE001 - DVC, fsspec, asyncssh, aiohttp: any may quote the URL; one masked line
        raise PushError(mask_url(f"pushing to {shown} failed: {type(err).__name__}: {err}", url)) from None
    return len(entries), transferred, shown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-r", "--remote", help="DVC remote name (default: the project's default remote)")
    args = parser.parse_args(argv)
    try:
        entries, transferred, shown = push_run_cache(".", args.remote)
    except PushError as err:
        print(f"push_run_cache: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(f"push_run_cache: {entries} run-cache entries, {transferred} object(s) uploaded to {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
