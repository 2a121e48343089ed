"""Resolving ``pretrained: false | true`` without ever hanging on the network (a ``<path>`` is
loaded by :mod:`kdlib.models.adapt`).

``true`` asks timm for the model's default weights. Offline, huggingface_hub retries a HEAD
request for about 50 s before failing, so the hub is probed first (DNS + TCP, one second in
all); if it is unreachable, a copy in the local Hugging Face cache is used, and otherwise
:class:`PretrainedUnavailable` says how to give a local file instead.
"""
from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import timm

HUB_HOST = "huggingface.co"


class PretrainedUnavailable(RuntimeError):
    pass


def hub_reachable(host: str = HUB_HOST, timeout_s: float = 1.0) -> bool:
    """True when ``host:443`` accepts a TCP connection within ``timeout_s`` (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo has no timeout of its own, so the probe runs in a thread we stop waiting for.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def _cached_hub_file(arch: str) -> Path | None:
    cfg = timm.models.get_pretrained_cfg(arch)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def pretrained_kwargs(arch: str, pretrained: bool | str, reachable: bool | None = None) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments that load ``pretrained`` for ``arch``.

    Args:
        arch: timm architecture name.
        pretrained: ``False`` (random init) or ``True`` (timm's default weights); a file path
            is refused (:func:`kdlib.models.adapt.load_pretrained` loads files).
        reachable: override of the hub probe (tests); ``None`` probes.
    """
    if pretrained is False:
        return {"pretrained": False}
    if isinstance(pretrained, str):
        # one loader for files, which reports what it adapted (kdlib.models.adapt); timm's
        # pretrained_cfg_overlay path would adapt silently and differently (antialiased pos_embed)
        raise TypeError(f"pretrained={pretrained!r} for {arch!r}: a weights file is loaded by "
                        "kdlib.models.adapt.load_pretrained (build_model does it), not through timm's kwargs")
    cached = _cached_hub_file(arch)
    if cached is not None:
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(cached)}}
    if reachable is None:
        reachable = hub_reachable()
    if not reachable:
        raise PretrainedUnavailable(
            f"pretrained: true for {arch!r} needs its weights from {HUB_HOST}, which cannot be "
            "reached, and they are not in the local Hugging Face cache. Download the weights "
            "elsewhere (e.g. `huggingface-cli download timm/<model> model.safetensors`) and set "
            "the model preset's `pretrained` to that file's path."
        )
    return {"pretrained": True}
