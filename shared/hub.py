"""Whether a backbone loader may download: the one check every domain's loader makes
after a local path and the cache have failed, before it asks a hub for weights."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

HUGGING_FACE = "huggingface.co"
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def offline(host: str = HUGGING_FACE) -> str | None:
    """Why nothing can be downloaded from `host`, or None when it may be tried.

    Offline when the user says so (`PEFTLAB_OFFLINE=1` or `HF_HUB_OFFLINE=1`), or when
    the host's name does not resolve: the hub clients retry a failed request with
    backoff, about 45 s of "Retrying in 8s" for a name that will never resolve, before
    the error a user can act on. Behind a proxy the proxy resolves names, so no lookup."""
    for variable in ("PEFTLAB_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(variable, "") not in ("", "0"):
            return f"{variable} is set"
    if host == HUGGING_FACE:
        host = urlparse(os.environ.get("HF_ENDPOINT", f"https://{HUGGING_FACE}")).hostname or HUGGING_FACE
    if any(os.environ.get(variable) for variable in PROXY_VARIABLES):
        return None
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError) as error:
        return f"{host} cannot be resolved: {getattr(error, 'strerror', None) or error}"
    return None
