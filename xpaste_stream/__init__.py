"""xpaste-stream: X-Paste-style copy-paste augmentation at scale (see README.md, ARCHITECTURE.md)."""

__version__ = "0.1.0"
