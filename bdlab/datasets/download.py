"""Download-when-possible for the torchvision-hosted datasets; offline, a one-line error."""

from __future__ import annotations

import logging
from pathlib import Path

from torchvision.datasets.utils import download_and_extract_archive, download_url

log = logging.getLogger(__name__)


def try_download(url: str, root: Path, md5: str | None, extract: bool = True) -> bool:
    """Fetch (and unpack) ``url`` into ``root``; False when there is no network or the file is wrong."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        if extract:
            download_and_extract_archive(url, download_root=str(root), md5=md5)
        else:
            download_url(url, root=str(root), md5=md5)
    except Exception as error:  # no network, HTTP error, checksum mismatch: all mean "not available"
        log.warning("download of %s failed: %s", url, error)
        return False
    return True
