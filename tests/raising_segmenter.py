"""A segmenter plug-in (`raising_segmenter:Raising`) that raises the error it is told to, when it
is built (`at="setup"`) or on every batch (`at="segment"`), logging each batch's category: the
tests of which errors the executors retry import it in every worker, wherever it runs."""

from __future__ import annotations

from xpaste_stream.config import ConfigError

ERRORS = {"ConfigError": ConfigError, "RuntimeError": RuntimeError}


class Raising:
    name = "raising"

    def __init__(self, error: str, log: str, at: str = "segment"):
        self.error, self.log = ERRORS[error], log
        if at == "setup":
            raise self.error(f"raising segmenter refuses to start ({error})")

    def segment(self, images, categories):
        with open(self.log, "a") as f:
            f.write(f"{categories[0]}\n")
        raise self.error(f"raising segmenter fails a batch of {categories[0]}")
