"""Where finished media go: a folder or any fsspec URL (``results_url``). A job's record holds
the location, not the bytes, so records stay small in SQLite or Redis and any replica that can
reach the URL serves the content."""

from __future__ import annotations

import fsspec


class MediaStore:
    def __init__(self, url: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)

    def put(self, job_id: str, suffix: str, media: bytes) -> str:
        """Write ``media`` as ``<job_id>.<suffix>``; its location."""
        path = f"{self.root.rstrip('/')}/{job_id}.{suffix}"
        self.fs.pipe_file(path, media)
        return path

    def get(self, location: str) -> bytes:
        """The media at ``location`` (``FileNotFoundError`` once evicted)."""
        return self.fs.cat_file(location)

    def delete(self, location: str) -> None:
        try:
            self.fs.rm_file(location)
        except FileNotFoundError:   # another replica evicted it first
            pass
